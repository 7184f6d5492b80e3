"""VQA v2: examples, heads, losses, predictions and the official accuracy.

Everything VQA-specific lives here (shared TASKS.md "VQA v2"); the loop, the
input pipeline and the checkpoints ask this module and know nothing of VQA.
GQA (`vlpjax.tasks.gqa`) runs the same on its own question table: the table
openers, the iterator and the interface functions it calls take `table`
('vqa' by default).

What the other fine-tuning tasks (SNLI-VE, NLVR2, referring expressions) build
on is here too: `configure_finetuning` (their `configure`'s recipe, text
length, val/test evaluators), `open_text_inputs` and `PairExamples` (a text
table's split with its tokenizer and images), `task_train_iterator`,
`SplitEvaluator` (an evaluator's batch sharding and prediction file),
`prediction_step`/`predicted_answers`/`gather_predictions`, and for
`vlpjax.load` `run_tokenizer`, `blank_image`, `restore_for_inference` and
`image_regions`.

The task interface (`vlpjax.tasks`) is at the end of the module: `configure`
(the `config.vqa` section, the published recipes, the evaluators), `prepare`,
`make_model`, `make_train_iterator`, `make_inputs`, `compute_losses`,
`make_evaluators` (`VqaEvaluator`: the official accuracy and the server's
prediction file).

Heads (`HEADS` gives each design's default; `default_vqa_config().head`
overrides it):
  'pooled_mlp'  LXMERT, UNITER, ViLBERT (whose backbone `pooled` is already
                text_pooled * image_pooled): pooled [B, P] -> Linear(P, 2P) ->
                GELU -> LayerNorm(1e-12) -> Linear(2P, A). This is
                `heads.AnswerHead`, LXMERT's pretraining QA head, under the
                same param name 'answer_head', so that head can start it
                (`transfer_answer_head`, answers matched by string).
  'mask_slot'   VisualBERT (original): the question is followed by `? [MASK]`
                (its own final '?' is that '?'; truncation cuts the question,
                never the slot); the hidden state at [MASK] -> dropout ->
                Linear(H, A).
  'pooled_linear'  pooled [B, P] -> dropout -> Linear(P, A) (ViLBERT's heads
                of its other tasks, e.g. SNLI-VE's `vil_tri_prediction`).

Losses (`DEFAULT_LOSS` per head; `default_vqa_config().loss` overrides it):
  'bce'  BCE-with-logits against the soft scores, averaged over examples and
         answers, times A ("instance-level BCE", LXMERT/UNITER/ViLBERT).
  'kl'   KL(scores / sum(scores) || softmax(logits)), averaged over the
         examples that have a target (VisualBERT).

Batches (`VqaExamples`, `make_examples`, `make_question_iterator`):
  input_ids, text_mask, token_type_ids int32 [B, T]; answer_slot int32 [B]
  (position of [MASK]; 0 for 'pooled_mlp', which does not read it);
  region_feats [B, R, F] (the table's dtype), region_loc float32 [B, R, L],
  region_mask int32 [B, R] (the design's region inputs,
  `vlpjax.data.examples.region_batch`); answer_scores float32 [B, A]; has_answers
  float32 [B] (1 when the question has at least one answer in the answer
  vocabulary: 0 for test questions, which have no answers); question_id int64 [B]
  (evaluation batches only: training needs none, and an int64 does not survive
  as a `jax.Array` without x64).

Evaluation is pure functions the evaluator composes: `predict` (argmax, on
the device), `answer_strings`, `prediction_records` (the server's file),
`read_ground_truth` + `accuracy_stats` (the official accuracy through
`vlpjax.tasks.vqa_accuracy`, per answer type, summable over processes), and
`soft_score_accuracy` (the soft-score cross-check, on the device).

Answer types: a table that stores `answer_type` (per question, as the official
annotations) is used as it is. Neither the embedded world's vqa table nor the
VQA v2 table built by `annotations_builder` stores one, so `derive_answer_type`
assigns it from the ground-truth answers: 'yes/no' when the most common answer
is yes or no, 'number' when it is a number (after the official normalisation,
so 'two' counts), else 'other'. The official annotations' types come from the
annotation process, not from this rule, so the two can differ on questions
with mixed answers.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlpjax import paths
from vlpjax.data import examples as examples_lib
from vlpjax.data import input_pipeline, tables
from vlpjax.data.tokenizer import BertTokenizer
from vlpjax.models import DESIGNS, get_model
from vlpjax.models import heads as heads_lib
from vlpjax.models import layers
from vlpjax.objectives.common import ratio, weighted_mean
from vlpjax.tasks import vqa_accuracy

HEAD_KINDS = ('pooled_mlp', 'mask_slot', 'pooled_linear')
# Each design's original head (TASKS.md). mmf's VisualBERT uses 'pooled_mlp'
# with BCE instead: set `vqa.head='pooled_mlp'`.
HEADS = {'visualbert': 'mask_slot', 'vilbert': 'pooled_mlp', 'lxmert': 'pooled_mlp',
         'uniter': 'pooled_mlp'}
LOSS_KINDS = ('bce', 'kl')
DEFAULT_LOSS = {'pooled_mlp': 'bce', 'mask_slot': 'kl', 'pooled_linear': 'bce'}
# Param name of each head beside 'backbone'. 'answer_head' is LXMERT's
# pretraining QA head's name (same structure), so its params transfer by key.
HEAD_PARAM_NAMES = {'pooled_mlp': 'answer_head', 'mask_slot': 'slot_head',
                    'pooled_linear': 'linear_head'}
# The backbone's param name (VqaModel's attribute, as in the pretraining modules).
BACKBONE = 'backbone'
# The metric of the `vqa_test` evaluator a comparison of designs reports.
HEADLINE_METRIC = 'accuracy'

# The vqa table's fields a batch is made of (pipeline data contract).
QUESTION_KEYS = ('question_id', 'question', 'image_index', 'answer_labels', 'answer_scores')
# What `VqaModel.__call__` takes from a batch (the rest are targets and ids).
MODEL_INPUT_KEYS = ('input_ids', 'text_mask', 'token_type_ids', 'region_feats', 'region_loc',
                    'region_mask', 'answer_slot')
# Region arrays the VQA models read; the per-region labels of `region_batch`
# (object ids, class distributions) are pretraining targets and stay on the host.
REGION_KEYS = ('region_feats', 'region_loc', 'region_mask')


def default_vqa_config() -> ml_collections.ConfigDict:
  """The `config.vqa` section of a VQA run (None: the design's default)."""
  return ml_collections.ConfigDict(dict(
      train_split='train',
      head=ml_collections.config_dict.placeholder(str),  # HEAD_KINDS; None: HEADS[design]
      loss=ml_collections.config_dict.placeholder(str),  # LOSS_KINDS; None: DEFAULT_LOSS[head]
      # One answer a line, or LXMERT's trainval_ans2label.json; None: the vqa
      # table's answers.txt. Labels are matched to it by string.
      answer_vocab_file=ml_collections.config_dict.placeholder(str),
      dropout_rate=ml_collections.config_dict.placeholder(float),  # None: model.dropout_rate
      # With init.source='workdir:DIR' of a run with a QA head (LXMERT's image-QA
      # pretraining), start 'pooled_mlp' from it, answers matched by string.
      head_from_pretraining=True,
  ))


def choose(field: str, value: str, choices: Sequence[str]) -> str:
  """`value` if it is one of `choices`, else a ValueError naming `field` (a
  config field, e.g. 'vqa.head', the tasks' checks of their choices)."""
  if value not in choices:
    raise ValueError(f'{field} must be one of {tuple(choices)}, got {value!r}')
  return value


def resolve_head(design: str, head: str | None = None) -> str:
  """`head`, or the design's default (HEADS); errors name the valid choices."""
  if design not in HEADS:
    raise ValueError(f'unknown design {design!r}; expected one of {tuple(HEADS)}')
  return choose('vqa.head', HEADS[design] if head is None else head, HEAD_KINDS)


def resolve_loss(head: str, loss: str | None = None) -> str:
  """`loss`, or the head's default (DEFAULT_LOSS)."""
  head = choose('vqa.head', head, HEAD_KINDS)
  return choose('vqa.loss', DEFAULT_LOSS[head] if loss is None else loss, LOSS_KINDS)


# ----------------------------------------------------------------------------
# Heads and the model.


class MaskSlotHead(nn.Module):
  """VisualBERT's VQA head: hidden state at the [MASK] slot -> dropout -> Linear(H, A).

  Submodules: output (Dense H -> num_answers).
  """
  num_answers: int
  dropout_rate: float = 0.1
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, text: jax.Array, answer_slot: jax.Array,
               deterministic: bool = True) -> jax.Array:
    """text: [B, T, H]; answer_slot: [B] int -> logits [B, A]."""
    hidden = heads_lib.gather_positions(text, answer_slot[:, None])[:, 0]  # [B, H]
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    return layers.Dense(self.num_answers, ('embed', 'vocab'), dtype=self.dtype,
                        param_dtype=self.param_dtype, name='output')(hidden)


class VqaModel(nn.Module):
  """A design's backbone plus a VQA head.

  Params: {'backbone': <the backbone's own params, as a pretraining module's
  params['backbone']>, HEAD_PARAM_NAMES[head]: <head params>}.

  Attributes:
    backbone: `vlpjax.models.get_model(config.model, pretraining=False)`.
    num_answers: A, the answer vocabulary's size.
    head: one of HEAD_KINDS.
    dropout_rate: the 'mask_slot' and 'pooled_linear' heads' dropout
      ('pooled_mlp' has none, as LXMERT's and UNITER's heads).
    dtype, param_dtype: of the head (the backbone has its own).
  """
  backbone: nn.Module
  num_answers: int
  head: str = 'pooled_mlp'
  dropout_rate: float = 0.1
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, token_type_ids: jax.Array,
               region_feats: jax.Array, region_loc: jax.Array, region_mask: jax.Array,
               answer_slot: jax.Array | None = None, deterministic: bool = True
               ) -> dict[str, jax.Array]:
    """Answers the questions.

    Args:
      input_ids, text_mask, token_type_ids: [B, T] int.
      region_feats: [B, R, F]; region_loc: [B, R, L] (the design's width);
      region_mask: [B, R].
      answer_slot: [B] int, the [MASK] position ('mask_slot' only).
      deterministic: no dropout when True.

    Returns:
      {'logits': float32 [B, A]}.
    """
    if self.head not in HEAD_KINDS:
      raise ValueError(f'VqaModel.head must be one of {HEAD_KINDS}, got {self.head!r}')
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    outputs = self.backbone(input_ids, text_mask, region_feats, region_loc, region_mask,
                            token_type_ids=token_type_ids, deterministic=deterministic)
    name = HEAD_PARAM_NAMES[self.head]
    if self.head == 'pooled_mlp':
      pooled = outputs['pooled']  # [B, P]; ViLBERT: text_pooled * image_pooled
      logits = heads_lib.AnswerHead(self.num_answers, pooled.shape[-1], dtype=dtype,
                                    param_dtype=param_dtype, name=name)(pooled)
    elif self.head == 'pooled_linear':
      pooled = nn.Dropout(self.dropout_rate)(outputs['pooled'], deterministic=deterministic)
      logits = layers.Dense(self.num_answers, ('embed', 'vocab'), dtype=dtype,
                            param_dtype=param_dtype, name=name)(pooled)
    else:
      if answer_slot is None:
        raise ValueError("the 'mask_slot' head needs answer_slot [B], the [MASK] positions")
      logits = MaskSlotHead(self.num_answers, self.dropout_rate, dtype=dtype,
                            param_dtype=param_dtype, name=name)(
          outputs['text'], answer_slot, deterministic)
    # Losses and argmax in float32 whatever the compute dtype.
    return {'logits': layers.constrain(logits.astype(jnp.float32), ('batch', 'vocab'))}


def build_model(model_config: ml_collections.ConfigDict, num_answers: int, *,
               head: str | None = None, dropout_rate: float | None = None) -> VqaModel:
  """The VqaModel of `config.model` (head None: the design's; dropout None: the model's)."""
  head = resolve_head(model_config.name, head)
  return VqaModel(
      backbone=get_model(model_config, pretraining=False), num_answers=num_answers, head=head,
      dropout_rate=model_config.dropout_rate if dropout_rate is None else dropout_rate,
      dtype=model_config.dtype, param_dtype=model_config.param_dtype)


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The VqaModel keyword arguments in a batch (MODEL_INPUT_KEYS)."""
  return {k: batch[k] for k in MODEL_INPUT_KEYS}


def transfer_answer_head(pretrained: Mapping[str, Any], fresh: Mapping[str, Any],
                         pretrained_answers: Sequence[str], answers: Sequence[str]
                         ) -> tuple[dict[str, Any], int]:
  """Starts a 'pooled_mlp' head from LXMERT's pretraining QA head, as LXMERT does.

  The hidden layer and LayerNorm are copied; each output column (kernel
  [2P, A] and bias [A]) of an answer in both vocabularies is copied from the
  pretrained column of the same string, the others keep their fresh init.

  Args:
    pretrained: params of the pretraining 'answer_head' (hidden, norm, output).
    fresh: params of the VqaModel's freshly initialised 'answer_head'.
    pretrained_answers: the pretraining head's answer vocabulary (its A').
    answers: the task's answer vocabulary (A).

  Returns:
    (params of the new head, number of answers matched).
  """
  pretrained, fresh = nn.meta.unbox(pretrained), nn.meta.unbox(fresh)
  for part in ('hidden', 'norm'):
    for key, value in fresh[part].items():
      if np.shape(pretrained[part][key]) != np.shape(value):
        raise ValueError(f'answer_head/{part}/{key}: pretrained shape '
                         f'{np.shape(pretrained[part][key])} vs {np.shape(value)}')
  kernel = np.array(fresh['output']['kernel'])
  bias = np.array(fresh['output']['bias'])
  source_kernel = np.asarray(pretrained['output']['kernel'])
  source_bias = np.asarray(pretrained['output']['bias'])
  if source_kernel.shape[1] != len(pretrained_answers):
    raise ValueError(f'the pretrained answer head has {source_kernel.shape[1]} answers, '
                     f'its vocabulary {len(pretrained_answers)}')
  source_index = {answer: i for i, answer in enumerate(pretrained_answers)}
  matched = [(j, source_index[a]) for j, a in enumerate(answers) if a in source_index]
  if matched:
    rows, source_rows = map(np.array, zip(*matched))
    kernel[:, rows] = source_kernel[:, source_rows]
    bias[rows] = source_bias[source_rows]
  params = {part: {k: jnp.asarray(v) for k, v in pretrained[part].items()}
            for part in ('hidden', 'norm')}
  params['output'] = {'kernel': jnp.asarray(kernel, kernel.dtype),
                      'bias': jnp.asarray(bias, bias.dtype)}
  return params, len(matched)


# ----------------------------------------------------------------------------
# Losses. All in float32; `weights` [B] are 0 on padded rows.


def bce_per_example(logits: jax.Array, answer_scores: jax.Array) -> jax.Array:
  """BCE-with-logits summed over answers: logits, answer_scores [B, A] -> [B].

  The sum over A is the mean over answers times A (instance-level BCE).
  """
  x = logits.astype(jnp.float32)
  z = answer_scores.astype(jnp.float32)
  # max(x, 0) - x z + log(1 + exp(-|x|)): stable for any x.
  return jnp.sum(jnp.maximum(x, 0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x))), axis=-1)


def bce_loss(logits: jax.Array, answer_scores: jax.Array, weights: jax.Array) -> jax.Array:
  """Instance-level BCE: mean over weighted examples of `bce_per_example` -> scalar.

  weights [B]: 1 on real rows (training batches have no padding), as LXMERT,
  which trains questions with no in-vocabulary answer towards all-zero
  targets; times `has_answers` to leave those (and test questions) out.
  """
  return weighted_mean(bce_per_example(logits, answer_scores), weights)


def kl_per_example(logits: jax.Array, answer_scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """KL(p || softmax(logits)) with p = scores / sum(scores): [B, A] -> ([B], has_target [B]).

  Rows whose scores sum to 0 have no distribution: their KL is 0 and
  has_target 0. Terms with p = 0 contribute 0.
  """
  scores = answer_scores.astype(jnp.float32)
  total = jnp.sum(scores, axis=-1, keepdims=True)
  has_target = total[:, 0] > 0
  target = scores / jnp.where(total > 0, total, 1.0)
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jax.scipy.special.xlogy(target, target) - target * log_q, axis=-1)
  return jnp.where(has_target, kl, 0.0), has_target.astype(jnp.float32)


def kl_loss(logits: jax.Array, answer_scores: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean KL over the weighted examples that have a target -> scalar."""
  kl, has_target = kl_per_example(logits, answer_scores)
  return weighted_mean(kl, weights.astype(jnp.float32) * has_target)


LOSSES = {'bce': bce_loss, 'kl': kl_loss}


def vqa_loss(kind: str, logits: jax.Array, answer_scores: jax.Array, weights: jax.Array
             ) -> jax.Array:
  """The `kind` loss (LOSS_KINDS): logits, answer_scores [B, A], weights [B] -> scalar."""
  if kind not in LOSSES:
    raise ValueError(f'vqa.loss must be one of {LOSS_KINDS}, got {kind!r}')
  return LOSSES[kind](logits, answer_scores, weights)


# ----------------------------------------------------------------------------
# Answer vocabularies.


def read_answer_vocab(path: str) -> list[str]:
  """An answer vocabulary, index -> answer.

  Formats: a text file with one answer a line (the line number is the index;
  `answers.txt`), a JSON object {answer: index} (LXMERT's
  `trainval_ans2label.json`) or a JSON list of answers (`trainval_label2ans.json`).
  Errors name the file and what is wrong with it.
  """
  path = os.fspath(paths.path(path))
  if not paths.path(path).is_file():
    raise FileNotFoundError(f'answer vocabulary {path!r} does not exist')
  text = paths.path(path).read_text(encoding='utf-8')
  if path.endswith('.json'):
    answers = _answers_from_json(path, text)
  else:
    answers = text.splitlines()
  if not answers:
    raise ValueError(f'answer vocabulary {path}: no answers')
  # Text files are reported by line number (from 1), JSON by index.
  where, first = ('index', 0) if path.endswith('.json') else ('line', 1)
  seen = {}
  for index, answer in enumerate(answers):
    if not isinstance(answer, str):
      raise ValueError(f'answer vocabulary {path}: {where} {index + first} is {answer!r}, '
                       'not a string')
    if answer in seen:
      raise ValueError(f'answer vocabulary {path}: {where} {index + first}: duplicate answer '
                       f'{answer!r} (first at {where} {seen[answer] + first})')
    seen[answer] = index
  return answers


def _answers_from_json(path: str, text: str) -> list[str]:
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'answer vocabulary {path}: not valid JSON ({e})') from e
  if isinstance(data, list):
    return data
  if not isinstance(data, dict):
    raise ValueError(f'answer vocabulary {path}: expected a JSON object {{answer: index}} '
                     f'or a list of answers, got {type(data).__name__}')
  answers = [None] * len(data)
  for answer, index in data.items():
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(data):
      raise ValueError(f'answer vocabulary {path}: answer {answer!r} has index {index!r}; '
                       f'indices must be the integers 0..{len(data) - 1}')
    if answers[index] is not None:
      raise ValueError(f'answer vocabulary {path}: index {index} is given to both '
                       f'{answers[index]!r} and {answer!r}')
    answers[index] = answer
  return answers


def answer_label_map(table_answers: Sequence[str], model_answers: Sequence[str]) -> np.ndarray:
  """For each table label, the model's label of the same answer string, or -1: int64 [A_table]."""
  index = {answer: i for i, answer in enumerate(model_answers)}
  return np.array([index.get(answer, -1) for answer in table_answers], np.int64)


def _vocab_digest(answers: Sequence[str]) -> str:
  return hashlib.sha1('\n'.join(answers).encode('utf-8')).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Examples.


def encode_questions(tokenizer: BertTokenizer, questions: Sequence[str],
                     append_mask_slot: bool) -> dict[str, np.ndarray]:
  """Tokenises questions; with `append_mask_slot`, each gets VisualBERT's answer slot.

  The question is followed by `? [MASK]`, its own final '?' (if any) being that
  '?': `[CLS] q ? [MASK] [SEP]`, as tokenising `q? [MASK]` (or `q ? [MASK]`)
  gives. A question too long for max_len loses its last words, never the slot.

  Returns:
    input_ids, text_mask, token_type_ids int32 [B, T]; answer_slot int32 [B]
    (the [MASK] position; 0, the [CLS], without a slot).
  """
  if not append_mask_slot:
    batch = tokenizer.encode(questions)
    batch['answer_slot'] = np.zeros((len(questions),), np.int32)
    return batch
  # Without its final '?', a question tokenises to the same word pieces less that
  # '?' ('?' is punctuation: it always splits off), so cutting these pieces and
  # appending the slot's truncates the question, not the slot.
  bare = [q.rstrip()[:-1] if q.rstrip().endswith('?') else q for q in questions]
  batch = tokenizer.encode(bare)
  b, max_len = batch['input_ids'].shape
  encoded = tokenizer.encode(['? [MASK]'])
  slot = encoded['input_ids'][0, 1:encoded['text_mask'][0].sum() - 1]  # ['?', '[MASK]']
  if not len(slot) or slot[-1] != tokenizer.mask_id:
    raise ValueError(f'max_text_len {max_len} leaves no room for [CLS], the answer slot '
                     "'? [MASK]' and [SEP]")
  input_ids = np.full((b, max_len), tokenizer.pad_id, np.int32)
  text_mask = np.zeros((b, max_len), np.int32)
  answer_slot = np.zeros((b,), np.int32)
  for row in range(b):
    length = int(batch['text_mask'][row].sum())
    # The question's pieces (already cut to max_len - 2), cut to leave room for the slot.
    words = batch['input_ids'][row, 1:length - 1][:max_len - 2 - len(slot)]
    ids = np.concatenate([[tokenizer.cls_id], words, slot, [tokenizer.sep_id]])
    input_ids[row, :len(ids)] = ids
    text_mask[row, :len(ids)] = 1
    answer_slot[row] = len(ids) - 2  # [MASK] sits just before the final [SEP]
  return dict(input_ids=input_ids, text_mask=text_mask,
              token_type_ids=np.zeros((b, max_len), np.int32), answer_slot=answer_slot)


def answer_targets(records: Sequence[Mapping[str, Any]], num_answers: int,
                   label_map: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Soft-score targets of vqa records.

  Args:
    records: with 'answer_labels' [K] (into the table's answer vocabulary) and
      'answer_scores' [K].
    num_answers: A.
    label_map: table label -> model label or -1 (`answer_label_map`); None:
      the model uses the table's vocabulary.

  Returns:
    answer_scores float32 [B, A]; has_answers float32 [B] (1 when some answer
    is in the vocabulary).
  """
  scores = np.zeros((len(records), num_answers), np.float32)
  for row, record in enumerate(records):
    labels = np.asarray(record['answer_labels'], np.int64).reshape(-1)
    values = np.asarray(record['answer_scores'], np.float32).reshape(-1)
    if label_map is not None:
      if labels.size and (labels.min() < 0 or labels.max() >= len(label_map)):
        raise ValueError(f'question {record.get("question_id")}: answer labels '
                         f'{labels.tolist()} outside the table vocabulary ({len(label_map)})')
      labels = label_map[labels]
      values = values[labels >= 0]
      labels = labels[labels >= 0]
    if labels.size and (labels.min() < 0 or labels.max() >= num_answers):
      raise ValueError(f'question {record.get("question_id")}: answer labels '
                       f'{labels.tolist()} outside [0, {num_answers}): does the answer '
                       'vocabulary match the table?')
    scores[row, labels] = values
  return dict(answer_scores=scores, has_answers=(scores > 0).any(-1).astype(np.float32))


@dataclasses.dataclass
class VqaExamples:
  """Builds VQA batches from the tables; `examples(indices)` or, as grain's
  function, `examples_fn(epochs, indices)` (`endless_batches`).

  Attributes:
    design: one of vlpjax.models.DESIGNS (region inputs).
    tokenizer: BertTokenizer (max_len = T).
    images: the images table.
    questions: the vqa table (QUESTION_KEYS).
    num_answers: A.
    append_mask_slot: VisualBERT's `? [MASK]` ('mask_slot' head).
    label_map: table label -> model label (`answer_label_map`), or None.
    with_question_id: keep question_id int64 [B] (evaluation).
  """
  design: str
  tokenizer: BertTokenizer
  images: tables.ImageTable
  questions: tables.Table
  num_answers: int
  append_mask_slot: bool
  label_map: np.ndarray | None = None
  with_question_id: bool = True

  def __len__(self) -> int:
    return len(self.questions)

  def examples(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The batch of vqa records `indices` [B] (see the module docstring)."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    records = self.questions.read(indices)
    batch = encode_questions(self.tokenizer, [tables.as_text(r['question']) for r in records],
                             self.append_mask_slot)
    image_index = np.array([r['image_index'] for r in records], np.int64).reshape(-1)
    regions = examples_lib.region_batch(self.design, self.images, image_index)
    batch.update({k: regions[k] for k in REGION_KEYS})
    batch.update(answer_targets(records, self.num_answers, self.label_map))
    if self.with_question_id:
      batch['question_id'] = np.array([r['question_id'] for r in records], np.int64
                                      ).reshape(-1)
    return batch

  def examples_fn(self, epochs: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    del epochs  # no per-example randomness: the shuffle is grain's
    return self.examples(indices)


@dataclasses.dataclass
class PairExamples:
  """The tables a text table's batches are built from, where each row pairs a
  text with images by row (SNLI-VE's statements, NLVR2's sentences): a
  subclass's `examples(indices)` builds the batch; `endless_batches`'
  function is `examples_fn(epochs, indices)`.

  Attributes:
    design: one of vlpjax.models.DESIGNS (region inputs).
    tokenizer: BertTokenizer (max_len = T).
    images: the images table.
    pairs: the text table (the task's keys, as `open_text_inputs` opens it).
  """
  design: str
  tokenizer: BertTokenizer
  images: tables.ImageTable
  pairs: tables.Table

  def __len__(self) -> int:
    return len(self.pairs)

  def examples(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The batch of records `indices` [B]: the task's."""
    raise NotImplementedError(f'{type(self).__name__} builds no batches')

  def examples_fn(self, epochs: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    del epochs  # no per-example randomness: the shuffle is grain's
    return self.examples(indices)


def make_examples(design: str, tokenizer: BertTokenizer, images: tables.ImageTable,
                  vqa_table: tables.Table, num_answers: int, indices: Sequence[int],
                  append_mask_slot: bool, label_map: np.ndarray | None = None
                  ) -> dict[str, np.ndarray]:
  """The batch of vqa records `indices` [B]; see `VqaExamples.examples`."""
  return VqaExamples(design, tokenizer, images, vqa_table, num_answers, append_mask_slot,
                     label_map).examples(indices)


def open_questions(data_config: ml_collections.ConfigDict, split: str, *,
                   with_ground_truth: bool = False, table: str = 'vqa') -> tables.Table:
  """The vqa table's `split`: QUESTION_KEYS, plus 'answers' (and 'answer_type' when
  the table has it) with `with_ground_truth` (slower to read: keep it off for training).

  `table`: the question table, 'vqa' or another with QUESTION_KEYS ('gqa').
  """
  keys = QUESTION_KEYS
  if with_ground_truth:
    features = tables.open_table(data_config, table, split).dataset_info.features
    keys = ('question_id', 'answers') + tuple(k for k in ('answer_type',) if k in features)
  return tables.open_split(data_config, table, split, keys)


def open_tokenizer_and_images(data_config: ml_collections.ConfigDict,
                              images_table: str = 'images'
                              ) -> tuple[BertTokenizer, tables.ImageTable]:
  """The tokenizer (`data.max_text_len`) and the images table (regions only, no
  class distributions) that a text table's examples are made of; `images_table`:
  another table of the same images (referring expressions' 'gt_images')."""
  tokenizer = BertTokenizer(tables.vocab_file(data_config), data_config.max_text_len,
                            lowercase=data_config.lowercase)
  images = tables.open_image_table(data_config, images_table)
  return tokenizer, images


def open_text_inputs(data_config: ml_collections.ConfigDict, design: str, table: str,
                     split: str, keys: Sequence[str], images_table: str = 'images'
                     ) -> tuple[BertTokenizer, tables.ImageTable, tables.Table]:
  """What the examples of a text table's split are made of: (the tokenizer and
  `images_table`, as `open_tokenizer_and_images`; the `keys` of `table`'s
  `split`), the split checked to index those images (`tables.check_same_images`).

  Raises:
    ValueError: `design` is not one of DESIGNS, or the tables do not match.
  """
  if design not in DESIGNS:
    raise ValueError(f'design must be one of {DESIGNS}, got {design!r}')
  tokenizer, images = open_tokenizer_and_images(data_config, images_table)
  text = tables.open_split(data_config, table, split, keys)
  tables.check_same_images(data_config, table, split, images_table=images_table)
  return tokenizer, images, text


def open_examples(data_config: ml_collections.ConfigDict, design: str, *, split: str,
                  head: str | None = None, answer_vocab_file: str | None = None,
                  with_question_id: bool = True, table: str = 'vqa'
                  ) -> tuple[VqaExamples, list[str]]:
  """Opens the tables of a VQA split for `design`.

  Returns:
    (VqaExamples, the model's answer vocabulary): the vocabulary is
    `answer_vocab_file`'s (table labels matched to it by string) or the
    question table's own `answers.txt` (`table`: see `open_questions`).
  """
  tokenizer, images, questions = open_text_inputs(data_config, design, table, split,
                                                  QUESTION_KEYS)
  head = resolve_head(design, head)
  table_answers = tables.answer_vocab(data_config, table)
  answers, label_map = table_answers, None
  if answer_vocab_file:
    answers = read_answer_vocab(answer_vocab_file)
    if list(answers) != list(table_answers):
      label_map = answer_label_map(table_answers, answers)
  examples = VqaExamples(design=design, tokenizer=tokenizer, images=images,
                         questions=questions, num_answers=len(answers),
                         append_mask_slot=head == 'mask_slot', label_map=label_map,
                         with_question_id=with_question_id)
  return examples, answers


# ----------------------------------------------------------------------------
# Training iterator.


def make_question_iterator(data_config: ml_collections.ConfigDict, design: str, *,
                        global_batch_size: int, seed: int, mesh: Mesh | None = None,
                        data_axes: Sequence[str] = ('data', 'fsdp'), split: str = 'train',
                        head: str | None = None, answer_vocab_file: str | None = None,
                        table: str = 'vqa') -> input_pipeline.PretrainingIterator:
  """Endless, shuffled (afresh each epoch), resumable VQA training batches.

  range(questions) -> this process's contiguous shard -> shuffle(seed) ->
  repeat -> batch(local, drop_remainder) -> VqaExamples, as the pretraining
  pipeline; `get_state`/`set_state` restore the exact position (JSON, or
  grain's orbax handler). Batches: the module docstring's keys less
  question_id; global `jax.Array`s sharded over `data_axes` when `mesh` is given.

  Args:
    data_config: `input_pipeline.default_data_config()` fields.
    design: one of vlpjax.models.DESIGNS.
    global_batch_size: examples per step over all processes.
    seed: run seed; `data.seed` overrides it for the data order when set.
    split: the vqa table's split.
    head: HEAD_KINDS; None: HEADS[design]. 'mask_slot' appends `? [MASK]`.
    answer_vocab_file: see `open_examples`.
    table: the question table (`open_questions`).
  """
  head = resolve_head(design, head)
  examples, answers = open_examples(data_config, design, split=split, head=head,
                                    answer_vocab_file=answer_vocab_file,
                                    with_question_id=False, table=table)
  return iterate_examples(
      data_config, examples, dict(task=table, design=design, head=head,
                                  num_answers=len(answers), answers=_vocab_digest(answers)),
      global_batch_size=global_batch_size, seed=seed, mesh=mesh, data_axes=data_axes,
      split=split, table=table)


def iterate_examples(data_config: ml_collections.ConfigDict, examples: Any,
                     fingerprint: Mapping[str, Any], *, global_batch_size: int, seed: int,
                     mesh: Mesh | None, data_axes: Sequence[str], split: str, table: str
                     ) -> input_pipeline.PretrainingIterator:
  """`make_question_iterator`'s stream over any examples of one text table's
  split (`VqaExamples` or a task's own: `len()`, `examples_fn`, `images`).

  `fingerprint`: what else the batches follow (task, design, head, labels); the
  iterator adds the layout (seed, batch, processes, split, sizes, tables).
  """
  rows, seed, sharding = input_pipeline.batch_layout(
      data_config, global_batch_size, seed, mesh, data_axes)
  num_questions = len(examples)
  stream = input_pipeline.endless_batches(data_config, num_questions, global_batch_size, rows,
                                          seed, examples.examples_fn)
  fingerprint = dict(
      fingerprint, seed=seed, global_batch_size=global_batch_size,
      split=split, num_questions=num_questions,
      num_images=examples.images.num_images,
      tables=[tables.table_name(data_config, t) for t in ('images', table)],
      max_text_len=data_config.max_text_len, max_regions=data_config.max_regions,
      worker_count=data_config.worker_count)
  return input_pipeline.PretrainingIterator(iter(stream), fingerprint, sharding)


def task_train_iterator(config: ml_collections.ConfigDict, mesh: Mesh, examples: Any,
                        split: str, table: str, **fingerprint: Any
                        ) -> input_pipeline.PretrainingIterator:
  """A task's `make_train_iterator` over its `examples` of `split` of `table`:
  `iterate_examples` with the run's batch, seed, mesh and data axes; the
  fingerprint names the task (`table`), the design and `fingerprint`'s fields."""
  return iterate_examples(
      config.data, examples, dict(task=table, design=config.model.name, **fingerprint),
      global_batch_size=config.train.global_batch_size, seed=config.seed, mesh=mesh,
      data_axes=tuple(config.mesh.data_axes), split=split, table=table)


# ----------------------------------------------------------------------------
# Evaluation: pure functions.


def predict(logits: jax.Array) -> jax.Array:
  """The predicted answer of each question: logits [B, A] -> int32 [B] (argmax)."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def answer_strings(indices: Sequence[int] | np.ndarray, answer_vocab: Sequence[str]
                   ) -> list[str]:
  """Answer indices [B] -> their strings."""
  indices = np.asarray(indices).reshape(-1)
  outside = (indices < 0) | (indices >= len(answer_vocab))
  if outside.any():
    raise ValueError(f'answer indices {indices[outside].tolist()} outside the vocabulary '
                     f'of {len(answer_vocab)} answers')
  return [answer_vocab[int(i)] for i in indices]


def prediction_records(question_ids: Sequence[int] | np.ndarray, answers: Sequence[str]
                       ) -> list[dict[str, Any]]:
  """The evaluation server's format: [{"question_id": int, "answer": str}]."""
  question_ids = np.asarray(question_ids).reshape(-1)
  if len(question_ids) != len(answers):
    raise ValueError(f'{len(question_ids)} question ids but {len(answers)} answers')
  return [{'question_id': int(q), 'answer': str(a)} for q, a in zip(question_ids, answers)]


def soft_score_accuracy(predictions: jax.Array, answer_scores: jax.Array, weights: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """The soft score of each prediction, summed: predictions [B] int, answer_scores
  [B, A], weights [B] -> (sum of weighted scores, sum of weights).

  Equals the official accuracy up to its answer normalisation (TASKS.md): a
  cross-check and a training metric, not the reported number.
  """
  scores = jnp.take_along_axis(answer_scores.astype(jnp.float32),
                               predictions[:, None].astype(jnp.int32), axis=-1)[:, 0]
  weights = weights.astype(jnp.float32)
  return jnp.sum(scores * weights), jnp.sum(weights)


_NUMBER = re.compile(r'\d+(\.\d+)?')


def derive_answer_type(answers: Sequence[str]) -> str:
  """'yes/no', 'number' or 'other' from the ground truths, for tables with no
  answer_type: the type of the most common answer (ties: the first given),
  read after the official normalisation ('Yes' -> yes/no, 'two' -> number)."""
  if not answers:
    raise ValueError('derive_answer_type needs at least one answer')
  majority = collections.Counter(vqa_accuracy.strip_answer(a) for a in answers
                                 ).most_common(1)[0][0]
  normalized = vqa_accuracy.normalize_answer(majority)
  if normalized in ('yes', 'no'):
    return 'yes/no'
  if _NUMBER.fullmatch(normalized):
    return 'number'
  return 'other'


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """One question's raw annotator answers and answer type (stored or derived)."""
  answers: tuple[str, ...]
  answer_type: str | None  # None when the question has no answers (test splits)


def ground_truth_of(record: Mapping[str, Any]) -> GroundTruth:
  """A vqa record's GroundTruth ('answers', and 'answer_type' if the table stores it)."""
  answers = tuple(tables.as_text(a) for a in record['answers'])
  if 'answer_type' in record:
    answer_type = tables.as_text(record['answer_type'])
  else:
    answer_type = derive_answer_type(answers) if answers else None
  return GroundTruth(answers, answer_type)


def read_ground_truth(table: tables.Table, indices: Sequence[int] | None = None,
                      chunk: int = 4096) -> dict[int, GroundTruth]:
  """question_id -> GroundTruth for rows `indices` (None: all) of a vqa table
  opened with `open_questions(..., with_ground_truth=True)`."""
  rows = np.arange(len(table)) if indices is None else np.asarray(indices).reshape(-1)
  truth = {}
  for start in range(0, len(rows), chunk):
    for record in table.read(rows[start:start + chunk]):
      truth[int(record['question_id'])] = ground_truth_of(record)
  return truth


def accuracy_stats(question_ids: Sequence[int] | np.ndarray, predicted_answers: Sequence[str],
                   ground_truth: Mapping[int, GroundTruth],
                   mask: Sequence[bool] | np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Official-accuracy sufficient statistics (`vqa_accuracy.compute_stats`) of a batch.

  Rows with mask 0 (padding) and questions without ground-truth answers (test
  splits) are skipped; merge batches and processes with
  `vqa_accuracy.merge_stats`, report with `vqa_accuracy.summary`.
  """
  question_ids = np.asarray(question_ids).reshape(-1)
  if len(question_ids) != len(predicted_answers):
    raise ValueError(f'{len(question_ids)} question ids but {len(predicted_answers)} answers')
  keep = (np.ones(len(question_ids), bool) if mask is None
          else np.asarray(mask).reshape(-1).astype(bool))
  predictions, gts, types = [], [], []
  for question_id, answer, kept in zip(question_ids, predicted_answers, keep):
    if not kept:
      continue
    truth = ground_truth.get(int(question_id))
    if truth is None:
      raise KeyError(f'question {int(question_id)} has no ground-truth record')
    if not truth.answers:
      continue
    predictions.append(answer)
    gts.append(truth.answers)
    types.append(truth.answer_type)
  return vqa_accuracy.compute_stats(predictions, gts, types)


# ----------------------------------------------------------------------------
# The task interface (`vlpjax.tasks`).

# Published fine-tuning recipes at `base` (TASKS.md), as `config.train` fields;
# epochs are turned into steps with the published split sizes.
RECIPES = {
    # 4 epochs of train + nominival (632,117 questions) at batch 32.
    'lxmert': dict(global_batch_size=32, learning_rate=5e-5, warmup_fraction=0.1,
                   num_steps=79_015, grad_clip_norm=5.0),
    # config/train-vqa-base-4gpu.json: 6k steps, warmup 600, AdamW (0.9, 0.98),
    # wd 0.01, clip 2, the heads at 10x the lr. The original batches by tokens
    # (5,120 per GPU, 4 GPUs, 5 accumulation steps): about 256 questions.
    'uniter': dict(global_batch_size=256, learning_rate=8e-5, warmup_fraction=0.1,
                   num_steps=6_000, adam_b2=0.98, weight_decay=0.01, grad_clip_norm=2.0,
                   head_lr_multiplier=10.0),
    # configs/vqa/fine-tune.json: 10 epochs of train (443,757 questions) at batch
    # 64, gradients clipped to norm 0.25.
    'visualbert': dict(global_batch_size=64, learning_rate=2e-5, warmup_fraction=0.1,
                       num_steps=69_337, grad_clip_norm=0.25),
    # vilbert-multi-task's vilbert_tasks.yml (VQA): 20 epochs of trainval
    # (658,111 questions) at batch 128, lr 4e-5.
    'vilbert': dict(global_batch_size=128, learning_rate=4e-5, warmup_fraction=0.1,
                    num_steps=102_830),
}
# Question length in word pieces (with [CLS], [SEP] and VisualBERT's '? [MASK]'
# slot): LXMERT's MAX_VQA_LENGTH, UNITER's max_txt_len, VisualBERT's
# max_seq_length, vilbert-multi-task's max_seq_length.
TEXT_LENGTHS = {'lxmert': 20, 'uniter': 60, 'visualbert': 128, 'vilbert': 23}
# The embedded world ('small'/'tiny'): minutes on 2 CPU cores. Its questions
# take at most 16 word pieces.
WORLD_RECIPE = dict(global_batch_size=32, learning_rate=1e-4, warmup_fraction=0.1,
                    num_steps=600, log_every_steps=50, end_learning_rate=0.0)
WORLD_TEXT_LENGTH = 20
WORLD_EVAL_BATCH = 128


def configure(config: ml_collections.ConfigDict, size: str) -> None:
  """Makes `config` (from `config_lib.make_config`) a VQA run: `config.vqa`,
  the design's published recipe and question length (the embedded world's for
  'small'/'tiny'), evaluators on validation (every 200 steps on the world) and
  test (at the end)."""
  configure_finetuning(config, size, 'vqa', default_vqa_config(), RECIPES)


def configure_finetuning(config: ml_collections.ConfigDict, size: str, task: str,
                         section: ml_collections.ConfigDict, recipes: Mapping[str, Any],
                         text_lengths: Mapping[str, int] = TEXT_LENGTHS) -> bool:
  """What the fine-tuning tasks' `configure` share: `config.task = task`,
  `config.<task> = section`, the design's recipe (`recipes`, `config.train`
  fields) and text length (`text_lengths`), or for 'small'/'tiny' the embedded
  world's (WORLD_RECIPE, WORLD_TEXT_LENGTH); evaluators of type `task`,
  `<task>_val` on validation (every 200 steps on the world, 5,000 at base) and
  `<task>_test` on test (at the end), in batches of WORLD_EVAL_BATCH (512 at
  base); a checkpoint every 200 (5,000) steps. Returns whether `size` is the
  world's."""
  from vlpjax import config_lib  # pylint: disable=g-import-not-at-top
  world = size in config_lib.WORLD_SIZES
  design = config.model.name
  config.task = task
  config[task] = section
  config.train.update(WORLD_RECIPE if world else recipes[design])
  config.data.max_text_len = WORLD_TEXT_LENGTH if world else text_lengths[design]
  batch = WORLD_EVAL_BATCH if world else 512
  config.evals = ml_collections.ConfigDict({
      f'{task}_val': dict(type=task, split='validation', batch_size=batch,
                          log_steps=200 if world else 5_000),
      f'{task}_test': dict(type=task, split='test', batch_size=batch,
                           log_steps=config.train.num_steps)})
  config.checkpoint.every_steps = 200 if world else 5_000
  return world


def _answers(config: ml_collections.ConfigDict, table: str = 'vqa') -> list[str]:
  return (read_answer_vocab(config.vqa.answer_vocab_file) if config.vqa.answer_vocab_file
          else tables.answer_vocab(config.data, table))


ANSWERS_FILE = 'answers.txt'


def inference_files(config: ml_collections.ConfigDict, table: str = 'vqa'
                    ) -> dict[str, list[str]]:
  """The answer vocabulary (of `table`'s run), one a line (`load` reads it back)."""
  return {ANSWERS_FILE: list(_answers(config, table))}


def init_heads(config: ml_collections.ConfigDict, params: Mapping[str, Any],
               abstract_params: Mapping[str, Any], table: str = 'vqa') -> dict[str, Any]:
  """Starts the 'pooled_mlp' head from the QA head of the `init.source` workdir's
  run, as LXMERT fine-tunes from its pretraining QA head: hidden layer and
  LayerNorm copied, each answer's output column copied from the same answer's
  (`transfer_answer_head`). Without such a head (or with
  `vqa.head_from_pretraining=False`) the fresh head stays. `table`: the
  question table whose answers the head has (`open_questions`).
  """
  from vlpjax import checkpointing, state as state_lib  # pylint: disable=g-import-not-at-top
  kind, _, directory = config.init.source.partition(':')
  name = HEAD_PARAM_NAMES['pooled_mlp']
  answers_file = paths.join(directory, ANSWERS_FILE)
  if (kind != 'workdir' or not config.vqa.head_from_pretraining
      or resolve_head(config.model.name, config.vqa.head) != 'pooled_mlp'
      or name not in checkpointing.workdir_param_keys(directory)
      or not paths.path(answers_file).is_file()):
    return dict(params)
  pretrained, step = checkpointing.restore_workdir_params(directory, subtree=name)
  answers = _answers(config, table)
  head, matched = transfer_answer_head(pretrained, state_lib.to_host(params[name]),
                                       read_answer_vocab(answers_file), answers)
  logging.info('init: %s from %s (step %d), %d of %d answers matched', name, directory,
               step, matched, len(answers))
  shardings = jax.tree.map(lambda a: a.sharding, abstract_params[name])
  return dict(params, **{name: state_lib.from_host(head, shardings)})


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the model against the data (`check_model_against_data`) and the
  `config.vqa` choices; the config is used as it is."""
  check_model_against_data(config)
  resolve_loss(resolve_head(config.model.name, config.vqa.head), config.vqa.loss)
  return config


def check_model_against_data(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError when `config.model`'s feature width or vocabulary does
  not fit the images table and the tokenizer vocabulary."""
  info = tables.dataset_info(config.data)
  if config.model.feature_dim != info['feature_dim']:
    raise ValueError(f'config.model.feature_dim={config.model.feature_dim} but the images '
                     f'table has features of width {info["feature_dim"]}')
  if config.model.vocab_size < info['vocab_size']:
    raise ValueError(f'config.model.vocab_size={config.model.vocab_size} is smaller than the '
                     f'tokenizer vocabulary ({info["vocab_size"]}, {info["vocab_file"]})')


def make_model(config: ml_collections.ConfigDict, table: str = 'vqa') -> VqaModel:
  """The design's backbone with its VQA head over the answer vocabulary (of `table`)."""
  return build_model(config.model, len(_answers(config, table)), head=config.vqa.head,
                     dropout_rate=config.vqa.dropout_rate)


def make_train_iterator(config: ml_collections.ConfigDict, mesh: Mesh, table: str = 'vqa'
                        ) -> input_pipeline.PretrainingIterator:
  """Endless, resumable VQA batches of `config.vqa.train_split` of `table`."""
  return make_question_iterator(
      config.data, config.model.name, global_batch_size=config.train.global_batch_size,
      seed=config.seed, mesh=mesh, data_axes=tuple(config.mesh.data_axes),
      split=config.vqa.train_split, head=config.vqa.head,
      answer_vocab_file=config.vqa.answer_vocab_file, table=table)


def objectives(config: ml_collections.ConfigDict) -> list[str]:
  """One compiled step: the VQA loss."""
  del config
  return ['vqa']


def objective_for_step(config: ml_collections.ConfigDict, names: list[str], step: int) -> str:
  del config, step
  return names[0]


def make_inputs(config: ml_collections.ConfigDict, batch: Mapping[str, jax.Array],
                rng: jax.Array, objective: str
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """VqaModel kwargs (features widened to float32) and the soft-score targets.

  Every question weighs 1, as the originals train (one with no answer in the
  vocabulary pulls every logit down).
  """
  del config, rng, objective
  kwargs = model_inputs(batch)
  kwargs['region_feats'] = kwargs['region_feats'].astype(jnp.float32)
  scores = batch['answer_scores']
  return kwargs, dict(answer_scores=scores, weights=jnp.ones(scores.shape[:1], jnp.float32))


def compute_losses(config: ml_collections.ConfigDict, outputs: Mapping[str, jax.Array],
                   targets: Mapping[str, jax.Array], objective: str
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The head's loss (`vqa.loss`) and the batch's soft-score accuracy."""
  del objective
  kind = resolve_loss(resolve_head(config.model.name, config.vqa.head), config.vqa.loss)
  logits = outputs['logits']
  loss = vqa_loss(kind, logits, targets['answer_scores'], targets['weights'])
  score, count = soft_score_accuracy(predict(logits), targets['answer_scores'],
                                     targets['weights'])
  return loss, {kind: loss, 'train_score': ratio(score, jnp.maximum(count, 1.0))}


def flops_per_example(config: ml_collections.ConfigDict,
                      input_specs: Mapping[str, jax.ShapeDtypeStruct], objective: str) -> float:
  """The design's backbone, x3 (the answer head on the pooled vector is
  negligible)."""
  from vlpjax import flops  # pylint: disable=g-import-not-at-top
  del objective  # one
  return flops.model_flops_per_example(config.model, input_specs['input_ids'].shape[1],
                                       input_specs['region_feats'].shape[1], 0, components=())


def prediction_step(model: nn.Module, sharding: jax.sharding.NamedSharding,
                    inputs: Callable[[Mapping[str, jax.Array]], dict[str, jax.Array]]
                    | None = None,
                    read: Callable[[Mapping[str, jax.Array]], jax.Array] | None = None
                    ) -> Callable[[Any, Mapping[str, jax.Array]], jax.Array]:
  """The evaluators' jitted step: (params, batch) -> predicted answers int32 [B],
  sharded as the batch. `inputs`: a batch -> the model's kwargs (another
  task's model, e.g. NLVR2's); None: VqaModel's, features widened to float32.
  `read`: the model's outputs -> what the step returns, [B, ...] (VCR's
  candidate scores); None: the predicted answers (`predict` of 'logits')."""
  def answer(params, batch):
    if inputs is not None:
      kwargs = inputs(batch)
    else:
      kwargs = model_inputs(batch)
      kwargs['region_feats'] = kwargs['region_feats'].astype(jnp.float32)
    outputs = model.apply({'params': params}, **kwargs, deterministic=True)
    return predict(outputs['logits']) if read is None else read(outputs)

  return jax.jit(answer, out_shardings=sharding)


def predicted_answers(answer_step: Callable[[Any, Mapping[str, jax.Array]], jax.Array],
                      params: Any, examples: VqaExamples, answers: Sequence[str],
                      batch_size: int, sharding: jax.sharding.NamedSharding
                      ) -> Iterator[tuple[np.ndarray, list[str]]]:
  """Answers every question of `examples` once (`evaluators.common.eval_batches`:
  the last batch padded, its padding left out), as the evaluators of VQA-style
  tasks do.

  Yields, per batch of `batch_size`, this process's real rows: (their indices
  in the split, int32 [L'], their predicted answer strings [L']).
  """
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  for batch in common.eval_batches(len(examples), batch_size, examples.examples, sharding):
    predicted = common.local_rows(answer_step(params, batch))
    real = common.local_rows(batch[common.MASK_KEY]).astype(bool)
    yield (common.local_rows(batch[common.INDEX_KEY])[real],
           answer_strings(predicted[real], answers))


def gather_predictions(answer_step: Callable[[Any, Mapping[str, jax.Array]], jax.Array],
                       params: Any, examples: Any, answers: Sequence[str], batch_size: int,
                       sharding: jax.sharding.NamedSharding, ids: np.ndarray,
                       make_records: Callable[[np.ndarray, list[str]], list[dict[str, Any]]]
                       ) -> tuple[np.ndarray, list[str], list[dict[str, Any]]]:
  """`predicted_answers` over the whole split, gathered, as the evaluators of
  tasks scored on answer strings (GQA, SNLI-VE) use them.

  Returns this process's rows: (their indices in the split, int64 [L]; their
  predicted answer strings [L]; `make_records(ids[indices], answers)` of each
  batch, each record with its `_index` for `evaluators.common.write_prediction_parts`).
  """
  indices, predicted, records = [np.zeros((0,), np.int64)], [], []
  for index, batch_answers in predicted_answers(answer_step, params, examples, answers,
                                                batch_size, sharding):
    indices.append(index.astype(np.int64))
    predicted += batch_answers
    records += [dict(record, _index=int(i)) for record, i in
                zip(make_records(ids[index], batch_answers), index)]
  return np.concatenate(indices), predicted, records


class SplitEvaluator:
  """What the fine-tuning tasks' evaluators (`evaluators.common.Evaluator`) share:
  the `config.evals` entry's name, log_steps and batch size, the batches'
  sharding over the data axes, and the path of a step's prediction file."""

  def __init__(self, name: str, eval_config: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, mesh: Mesh, workdir: str):
    self.name, self.log_steps = name, eval_config.log_steps
    self.batch_size = eval_config.batch_size
    self.sharding = input_pipeline.batch_sharding(mesh, tuple(config.mesh.data_axes),
                                                  self.batch_size)
    self.prediction_dir = paths.join(workdir, 'predictions')

  def prediction_path(self, step: int, extension: str = 'json') -> str:
    """`<workdir>/predictions/<name>_step<step>.<extension>`."""
    return paths.join(self.prediction_dir, f'{self.name}_step{step}.{extension}')


class VqaEvaluator(SplitEvaluator):
  """Official VQA accuracy on a split, and the server's prediction file.

  Every question is answered once (`evaluators.common.eval_batches`); accuracy
  statistics are summed over processes; predictions go to
  `<workdir>/predictions/<name>_step<N>.json` ([{"question_id", "answer"}]),
  written in parts and merged by process 0. Questions without answers (test
  splits of VQA v2) get predictions only.
  """

  def __init__(self, name: str, eval_config: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, model: VqaModel, mesh: Mesh,
               workdir: str):
    from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
    self._common = common
    super().__init__(name, eval_config, config, mesh, workdir)
    self.examples, self.answers = open_examples(
        config.data, config.model.name, split=eval_config.split, head=config.vqa.head,
        answer_vocab_file=config.vqa.answer_vocab_file, with_question_id=False)
    truth_table = open_questions(config.data, eval_config.split, with_ground_truth=True)
    self.ground_truth = read_ground_truth(truth_table)
    # Row order of the split, as `_index` counts.
    self.question_ids = np.fromiter(self.ground_truth, np.int64, len(self.ground_truth))
    self._answer = prediction_step(model, self.sharding)

  def run(self, params: Any, step: int) -> Iterator[tuple[str, float]]:
    """Yields (metric, value): accuracy, per answer type, and counts."""
    common = self._common
    stats = vqa_accuracy.zero_stats()
    records = []
    for index, answers in predicted_answers(self._answer, params, self.examples, self.answers,
                                            self.batch_size, self.sharding):
      question_ids = self.question_ids[index]
      stats = vqa_accuracy.merge_stats(
          stats, accuracy_stats(question_ids, answers, self.ground_truth))
      records += [dict(record, _index=int(i)) for record, i in
                  zip(prediction_records(question_ids, answers), index)]
    stats = common.process_sum(stats)
    common.write_prediction_parts(self.prediction_path(step), records)
    yield from vqa_accuracy.summary(stats).items()


def make_evaluators(config: ml_collections.ConfigDict, model: VqaModel, mesh: Mesh,
                    workdir: str) -> list[VqaEvaluator]:
  """The `config.evals` entries (all of type 'vqa')."""
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  return common.build_evaluators(config, 'vqa', {'vqa': VqaEvaluator}, model, mesh,
                                 workdir)


def init_extra_type_rows(config: ml_collections.ConfigDict, params: Mapping[str, Any],
                         abstract_params: Mapping[str, Any], name: str, row: int
                         ) -> Mapping[str, Any]:
  """A task's token type rows past the backbone's table (param `name` [K, H],
  NLVR2's right image, VCR's answer and rationale types) after `init.source`
  gave the backbone: each a copy of row `row` of the loaded table, as UNITER's
  `init_type_embedding`. Without such a param, or from an 'orbax:' source of
  this model's full params (which holds its own rows), `params` as they are."""
  from vlpjax import checkpointing  # pylint: disable=g-import-not-at-top
  kind, _, directory = config.init.source.partition(':')
  if name not in params or (
      kind == 'orbax' and checkpointing.stored_top_level_keys(directory) == set(params)):
    return params
  table = params[BACKBONE]['embeddings']['token_type_embeddings']['embedding']
  extra = params[name]
  rows = jnp.broadcast_to(jnp.asarray(table)[row], extra.shape).astype(extra.dtype)
  return dict(params, **{name: jax.device_put(rows, abstract_params[name].sharding)})


# One image of your own, as the predictors take it: (features [N, F], boxes [N, 4]
# x1, y1, x2, y2 in pixels, image_size (width, height)).
Image = tuple[np.ndarray, np.ndarray, tuple[float, float]]


def image_regions(config: ml_collections.ConfigDict, design: Any, features: np.ndarray,
                  boxes: np.ndarray, image_size: tuple[float, float], num: int
                  ) -> dict[str, np.ndarray]:
  """The design's region inputs (REGION_KEYS, [num, S, ...]) of one image of your
  own features [N, F] and boxes [N, 4] (x1, y1, x2, y2 in pixels; image_size =
  (width, height)), repeated for `num` texts; the first `data.max_regions` are used.
  `design`: a `Design`. What the predictors of the fine-tuning tasks feed."""
  features, boxes = np.asarray(features, np.float32), np.asarray(boxes, np.float32)
  if features.ndim != 2 or features.shape[1] != config.model.feature_dim:
    raise ValueError(f'features must be [N, {config.model.feature_dim}], got '
                     f'{features.shape}')
  if boxes.shape != (len(features), 4):
    raise ValueError(f'boxes must be [N, 4] for the N={len(features)} features, got '
                     f'{boxes.shape}')
  count = min(len(features), config.data.max_regions)
  slots = design.leading_slots + config.data.max_regions
  feats = np.zeros((num, slots, features.shape[1]), np.float32)
  padded_boxes = np.zeros((num, slots, 4), np.float32)
  first = design.leading_slots
  feats[:, first:first + count] = features[:count]
  padded_boxes[:, first:first + count] = boxes[:count]
  regions = examples_lib.region_inputs(design, dict(
      feats=feats, boxes=padded_boxes, count=np.full((num,), count, np.int32),
      image_w=np.full((num,), image_size[0], np.float32),
      image_h=np.full((num,), image_size[1], np.float32)))
  return {k: regions[k] for k in REGION_KEYS}


def blank_image(config: ml_collections.ConfigDict
                ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
  """(features [1, F], boxes [1, 4], image_size) of a one-region image of zeros:
  what a predictor traces its params' shapes with."""
  return (np.zeros((1, config.model.feature_dim), np.float32),
          np.array([[0, 0, 1, 1]], np.float32), (1, 1))


def run_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> BertTokenizer:
  """The tokenizer a run trained with: its workdir's vocabulary (`train.RUN_VOCAB`),
  `data.max_text_len` and `data.lowercase`. What the predictors encode text with."""
  from vlpjax import train  # pylint: disable=g-import-not-at-top
  return BertTokenizer(paths.join(workdir, train.RUN_VOCAB), config.data.max_text_len,
                       lowercase=config.data.lowercase)


def abstract_params(model: nn.Module, example: Mapping[str, np.ndarray]) -> Any:
  """ShapeDtypeStructs on the first device of `model`'s params, traced from its
  kwargs for one input `example` (`eval_shape`: nothing is initialised)."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), **example)['params'])))


def restore_for_inference(model: nn.Module, example: Mapping[str, np.ndarray], workdir: str,
                          step: int | None, output: str
                          ) -> tuple[Any, int, Callable[[Any, Mapping[str, Any]], jax.Array]]:
  """A predictor's model from a run's checkpoint.

  Args:
    model: the run's task model.
    example: the model's kwargs for one input ([1, ...] arrays): the params'
      shapes are traced from it (`eval_shape`: nothing is initialised).
    workdir: the run's workdir; step: its checkpoint (None: the latest).
    output: the model output the predictor reads ('logits', 'scores').

  Returns:
    (params on the first device, the checkpoint's step, the jitted
    (params, kwargs) -> outputs[output] in inference mode).
  """
  from vlpjax import checkpointing  # pylint: disable=g-import-not-at-top
  params, step = checkpointing.restore_workdir_params(
      workdir, abstract_params(model, example), step=step)
  apply = jax.jit(lambda params, kwargs: model.apply(
      {'params': params}, **kwargs, deterministic=True)[output])
  return params, step, apply


class VqaPredictor:
  """Answers questions about images of your own features (`vlpjax.load`).

  Attributes:
    config: the run's config; model: the VqaModel; params: its params (first
    device); answers: the answer vocabulary; step: the checkpoint's step.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, step: int | None,
               head: str | None = None):
    """`head`: the run's head kind (HEAD_KINDS); None: `config.vqa`'s (another
    task's run, e.g. SNLI-VE's, names its own)."""
    from vlpjax.models import get_design  # pylint: disable=g-import-not-at-top
    self.config = config
    self.design = get_design(config.model.name)
    self.head = resolve_head(config.model.name, config.vqa.head) if head is None else head
    self.answers = read_answer_vocab(paths.join(workdir, ANSWERS_FILE))
    self.tokenizer = run_tokenizer(config, workdir)
    # Inference is deterministic: the dropout rate changes nothing.
    self.model = build_model(config.model, len(self.answers), head=self.head)
    self.params, self.step, self._logits = restore_for_inference(
        self.model, self.inputs(['?'], *blank_image(config)), workdir, step, 'logits')

  def inputs(self, questions: Sequence[str], features: np.ndarray, boxes: np.ndarray,
             image_size: tuple[float, float]) -> dict[str, np.ndarray]:
    """Model inputs for `questions` [Q] about one image: features [N, F], boxes
    [N, 4] (x1, y1, x2, y2 in pixels), image_size (width, height); the first
    `data.max_regions` regions are used."""
    regions = image_regions(self.config, self.design, features, boxes, image_size,
                            len(questions))
    batch = encode_questions(self.tokenizer, list(questions), self.head == 'mask_slot')
    return dict(batch, **regions)

  def logits(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """Answer logits [B, A] of a batch with the model's inputs (`inputs`, or
    `VqaExamples` batches of the run's tables; other keys are ignored)."""
    return np.asarray(self._logits(self.params, model_inputs(batch)))

  def answer(self, questions: Sequence[str], features: np.ndarray, boxes: np.ndarray,
             image_size: tuple[float, float]) -> list[str]:
    """The predicted answer to each question about one image (see `inputs`)."""
    logits = self.logits(self.inputs(questions, features, boxes, image_size))
    return answer_strings(predict(logits), self.answers)


def predictor(config: ml_collections.ConfigDict, workdir: str, step: int | None
              ) -> VqaPredictor:
  """`vlpjax.load`'s object for a VQA run."""
  return VqaPredictor(config, workdir, step)
