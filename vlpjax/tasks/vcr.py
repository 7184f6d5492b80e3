"""VCR (Visual Commonsense Reasoning): four answers, then four rationales.

Shared TASKS.md "VCR". Each example is a question about an image, four
candidate answers and four candidate rationales; words may refer to the
image's objects (VCR's token lists: `["What", "colour", "is", [0], "?"]`, a
reference being a list of indices into the example's `objects`). Each
(context, candidate) pair is one sequence through the backbone with the
image's regions: Q->A scores (question, answer k), QA->R (question + the gold
answer, rationale k); the choice is the best-scoring of the four.

Regions: references index the image's regions, so the regions are the
ground-truth regions table (`gt_images`; `data.gt_images_dataset` names
another, e.g. an LXMERT-TSV table of VCR's annotated boxes in `objects` order,
as UNITER's `vcr_gt` features): the embedded world's `gt_images` has one
region per object, its true box, in object order, so region k is object k
(the detected `images` table is sorted by confidence and is not). UNITER and
ViLBERT also append detected regions after the annotated ones; here the
regions are the annotated ones alone.

What differs per design is in tables (`config.vcr` fields override):

References (`REFERENCES`, `config.vcr.references`):
  'names'          r2c, ViLBERT, VisualBERT: a `person` object becomes a
                   gender-neutral name, `NAMES[index % 15]` (r2c's list, with
                   its second 'Peyton'; ViLBERT draws names at random, here
                   they are a function of the index), any other object its
                   class name; several indices are joined with 'and' (r2c
                   writes them one after the other).
  'region_tokens'  UNITER: each index k becomes the token V' + k (V' the
                   word table's rows, `layers.padded_vocab_size`), one token
                   per index; the word table grows by
                   NUM_REGION_TOKENS (81, UNITER's `init_word_embedding`).
                   The new rows are the model's param EXTRA_WORDS_NAME [81, H],
                   passed as the backbone's `extra_word_embeddings` (UNITER's
                   backbone takes it), so a pretrained backbone loads as it is;
                   they start as fresh N(0, 0.02) rows, as the original's.
Token types and layout (`LAYOUTS`):
  UNITER (its `data/vcr.py`): `[CLS] question [SEP] answer [SEP]` for Q->A and
  `[CLS] question [SEP] gold-answer [SEP] rationale [SEP]` for QA->R; types
  0 for [CLS] and the question, 2 for an answer (candidate or gold), 3 for a
  rationale (1 is the regions'), each [SEP] the type of the part after it
  (the last, of the part before). Types 2 and 3 are the model's param
  EXTRA_TYPES_NAME [2, H], rows past the backbone's 2-row table (the
  backbone's `extra_token_type_embeddings`), started as copies of row 0 in
  `init_heads`, as UNITER's `init_type_embedding`.
  ViLBERT (vilbert-multi-task `vcr_dataset.py`), LXMERT: BERT's text_a /
  text_b: `[CLS] context [SEP] candidate [SEP]`, the context (the question, in
  QA->R `question [SEP] gold-answer`) type 0, the candidate and its [SEP] type 1.
  VisualBERT (its `vcr_data_utils.py`, r2c's): as ViLBERT but the QA->R
  context is the question followed by the gold answer with no [SEP].
  Too long a sequence loses tokens from the end of its longest part first.
Heads and losses (`HEADS`, `config.vcr.head`; the loss follows the head):
  'pair_mlp'  UNITER (`model/vcr.py` `vcr_output`): pooled -> Linear(H, 2H) ->
              ReLU -> LayerNorm(1e-12) -> Linear(2H, 2) per sequence (the
              original's activation is ReLU, not GELU); cross-entropy over the
              two logits of every sequence, target 1 on the right candidate
              and 0 on the others, averaged over the sequences
              (`train_vcr.py`); a candidate's score is its logit 1
              (`rank_scores[:, 1:]`).
  'linear'    ViLBERT (vilbert-multi-task's `vil_logit`), VisualBERT: pooled ->
              dropout -> Linear(P, 1) per candidate; softmax cross-entropy
              over the four.
  'mlp'       LXMERT, which has no VCR of its own: its VQA head
              (`heads.AnswerHead`, GELU) to 1 logit per candidate; softmax
              cross-entropy over the four.

Training: every table row gives two instances, Q->A and QA->R, as UNITER
trains both (`VcrExamples`: instance i is row i // 2 at stage i % 2). Batches:
input_ids, text_mask, token_type_ids int32 [B, 4, T]; region_feats [B, R, F],
region_loc [B, R, L], region_mask [B, R] (the design's region inputs, once per
example: the model repeats them for the 4 sequences, [4B, ...]); label int32 [B].

Evaluation (`VcrEvaluator`, type 'vcr'), the leaderboard's protocol: per
example the 4 answer sequences and the 16 rationale sequences (each rationale
conditioned on each answer): input_ids [B, 20, T], answer_label and
rationale_label int32 [B] (-1 when the split has none: VCR's test).
`qa_accuracy` (Q->A), `qar_accuracy` (the rationale chosen given the gold
answer), `q_ar_accuracy` (both right) over the labelled examples, and `count`
(every example, once: the last batch padded and masked), from counts summed
over processes. Predictions: `predictions/<name>_step<N>.csv`, the VCR
leaderboard's file (r2c's `eval_for_leaderboard.py`): `annot_id,answer_0..3,
rationale_conditioned_on_a0_0..a3_3`, softmax probabilities over each group
of four, one row per example in split order, written in parts and merged by
process 0.

The vcr table (`data.vcr_dataset`, e.g. 'vcr/vcr1' of `annotations_builder.Vcr`;
by default the world's `<size>_vcr`): annot_id, image_index, image_id,
question, answer_choices, rationale_choices, objects (VCR's JSON as text),
answer_label, rationale_label.

Recipes at `base`: UNITER's `config/train-vcr-base-4gpu.json` (lr 6e-5, 8,000
steps, warmup 800, AdamW (0.9, 0.98), weight decay 0.01, clip 2, no head lr
multiplier; batches of 4,000 tokens per GPU, 4 GPUs, 5 accumulation steps:
about 700 instances of ~115 tokens, here 640). UNITER starts from a
second-stage pretraining on VCR's images and text (its `checkpoint_from:
vcr_pretrain`): give it as `init.source`. ViLBERT, VisualBERT and LXMERT:
their VQA recipes (`vqa.RECIPES`). Text lengths: UNITER's max_txt_len 220;
the others have no VCR length among the facts read here: 128 for VisualBERT
(its VQA length), 60 for ViLBERT and LXMERT (their VQA lengths, 23 and 20,
cannot hold a question, an answer and a rationale). The embedded world:
its VQA recipe, WORLD_TEXT_LENGTH.

`vlpjax.load` gives a `VcrPredictor`: `choose(question, answers, rationales,
objects, features, boxes, image_size)` on an image of your own features.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from vlpjax.data import examples as examples_lib
from vlpjax.data import input_pipeline, tables
from vlpjax.data import world as world_lib
from vlpjax.data.tokenizer import BertTokenizer
from vlpjax.models import get_design, get_model
from vlpjax.models import heads as heads_lib
from vlpjax.models import layers
from vlpjax.objectives.common import mean
from vlpjax.tasks import vqa

TABLE = 'vcr'
REGIONS_TABLE = 'gt_images'
EVAL_TYPE = 'vcr'
# The metric of the `vcr_test` evaluator a comparison of designs reports.
HEADLINE_METRIC = 'q_ar_accuracy'
CHOICES = world_lib.VCR_CHOICES
# The table's fields a batch is made of.
EXAMPLE_KEYS = ('annot_id', 'image_index', 'answer_label', 'rationale_label'
                ) + world_lib.VCR_JSON_FIELDS
MODEL_INPUT_KEYS = ('input_ids', 'text_mask', 'token_type_ids') + vqa.REGION_KEYS
# A training instance's stage: Q->A, QA->R.
STAGES = ('answer', 'rationale')
# Sequences per evaluated example: 4 answers, then 4 rationales for each answer.
EVAL_SEQUENCES = CHOICES + CHOICES * CHOICES

# r2c's GENDER_NEUTRAL_NAMES (VisualBERT's copy too), 'Peyton' twice as there.
NAMES = ('Casey', 'Riley', 'Jessie', 'Jackie', 'Avery', 'Jaime', 'Peyton', 'Kerry', 'Jody',
         'Kendall', 'Peyton', 'Skyler', 'Frankie', 'Pat', 'Quinn')
PERSON = 'person'
# UNITER's NUM_SPECIAL_TOKENS: the word table grows by this many region tokens.
NUM_REGION_TOKENS = 81

REFERENCE_KINDS = ('names', 'region_tokens')
REFERENCES = {'uniter': 'region_tokens', 'vilbert': 'names', 'visualbert': 'names',
              'lxmert': 'names'}
HEAD_KINDS = ('pair_mlp', 'linear', 'mlp')
HEADS = {'uniter': 'pair_mlp', 'vilbert': 'linear', 'visualbert': 'linear', 'lxmert': 'mlp'}
HEAD_NAME = 'vcr_head'
EXTRA_TYPES_NAME = 'vcr_token_type_embeddings'
EXTRA_WORDS_NAME = 'vcr_word_embeddings'


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a design lays out a (context, candidate) sequence (module docstring).

  Attributes:
    question_type: the type of [CLS] and the question.
    context_answer_type: the gold answer's in a QA->R context.
    answer_type, rationale_type: a candidate answer's, a candidate rationale's.
    separator_takes_next: a [SEP] between two parts has the type of the part
      after it (UNITER), else of the part before (BERT's segments).
    separate_context: a [SEP] between the question and the gold answer in a
      QA->R context.
  """
  question_type: int
  context_answer_type: int
  answer_type: int
  rationale_type: int
  separator_takes_next: bool
  separate_context: bool

  @property
  def num_types(self) -> int:
    return 1 + max(self.question_type, self.context_answer_type, self.answer_type,
                   self.rationale_type)


LAYOUTS = {
    'uniter': Layout(0, 2, 2, 3, separator_takes_next=True, separate_context=True),
    'vilbert': Layout(0, 0, 1, 1, separator_takes_next=False, separate_context=True),
    'lxmert': Layout(0, 0, 1, 1, separator_takes_next=False, separate_context=True),
    'visualbert': Layout(0, 0, 1, 1, separator_takes_next=False, separate_context=False),
}

# UNITER's config/train-vcr-base-4gpu.json; the others their VQA recipes.
RECIPES = {
    **vqa.RECIPES,
    'uniter': dict(global_batch_size=640, learning_rate=6e-5, warmup_fraction=800 / 8_000,
                   num_steps=8_000, adam_b2=0.98, weight_decay=0.01, grad_clip_norm=2.0),
}
TEXT_LENGTHS = dict(uniter=220, vilbert=60, lxmert=60, visualbert=128)
# The world's longest QA->R sequence takes 30 word pieces.
WORLD_TEXT_LENGTH = 40
# Examples per evaluation batch (20 sequences each).
EVAL_BATCH = 32


def default_vcr_config() -> ml_collections.ConfigDict:
  """The `config.vcr` section (None: the design's default)."""
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict(dict(
      train_split='train',
      head=placeholder(str),        # HEAD_KINDS; None: HEADS[design]
      references=placeholder(str),  # REFERENCE_KINDS; None: REFERENCES[design]
      dropout_rate=placeholder(float),  # None: model.dropout_rate
  ))


def resolve_head(design: str, head: str | None = None) -> str:
  """`head`, or the design's (HEADS)."""
  if design not in HEADS:
    raise ValueError(f'unknown design {design!r}; expected one of {tuple(HEADS)}')
  return vqa.choose('vcr.head', HEADS[design] if head is None else head, HEAD_KINDS)


def resolve_references(design: str, references: str | None = None) -> str:
  """`references`, or the design's (REFERENCES)."""
  if design not in REFERENCES:
    raise ValueError(f'unknown design {design!r}; expected one of {tuple(REFERENCES)}')
  return vqa.choose('vcr.references', REFERENCES[design] if references is None else references,
                    REFERENCE_KINDS)


# ----------------------------------------------------------------------------
# Text: references, sequences.


def object_name(objects: Sequence[str], index: int) -> str:
  """The 'names' rendering of object `index`: a person's gender-neutral name
  (NAMES by index), else the object's class name."""
  return NAMES[index % len(NAMES)] if objects[index] == PERSON else objects[index]


def render_references(tokens: Sequence[Any], objects: Sequence[str], references: str,
                      region_token_base: int) -> list[str | int]:
  """A VCR token list with its references rendered: words stay words; a
  reference becomes, with 'names', its objects' names joined with 'and' (one
  word string), with 'region_tokens', the token id `region_token_base + k` of
  each index k.

  Raises:
    ValueError: a reference out of range of `objects` (or, with
      'region_tokens', of the NUM_REGION_TOKENS tokens).
  """
  vqa.choose('vcr.references', references, REFERENCE_KINDS)
  rendered = []
  for token in tokens:
    if isinstance(token, str):
      rendered.append(token)
      continue
    indices = [int(i) for i in token]
    outside = [i for i in indices if not 0 <= i < len(objects)]
    if outside:
      raise ValueError(f'object reference {list(token)} is out of range of the '
                       f'{len(objects)} objects {list(objects)}')
    if references == 'names':
      rendered.append(' and '.join(object_name(objects, i) for i in indices))
    else:
      if max(indices) >= NUM_REGION_TOKENS:
        raise ValueError(f'object reference {list(token)}: region tokens go up to '
                         f'{NUM_REGION_TOKENS - 1}')
      rendered.extend(region_token_base + i for i in indices)
  return rendered


@dataclasses.dataclass(frozen=True)
class Example:
  """One VCR example's text: VCR's token lists and object names; labels (-1: none)."""
  annot_id: str
  question: list[Any]
  answer_choices: list[list[Any]]
  rationale_choices: list[list[Any]]
  objects: list[str]
  answer_label: int
  rationale_label: int

  @classmethod
  def from_record(cls, record: Mapping[str, Any]) -> Example:
    """From a row of the vcr table (its JSON text fields decoded)."""
    fields = {k: json.loads(tables.as_text(record[k])) for k in world_lib.VCR_JSON_FIELDS}
    return cls(annot_id=tables.as_text(record['annot_id']), **fields,
               answer_label=int(record['answer_label']),
               rationale_label=int(record['rationale_label']))


# A sequence part: (word piece ids, token type, preceded by a [SEP]).
Part = tuple[list[int], int, bool]


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """Turns examples into the (context, candidate) sequences of a design.

  Attributes:
    tokenizer: max_len = T.
    references: REFERENCE_KINDS.
    layout: the design's `Layout`.
    region_token_base: the word table's rows (region token k is this + k).
  """
  tokenizer: BertTokenizer
  references: str
  layout: Layout
  region_token_base: int

  def piece_ids(self, example: Example) -> dict[str, Any]:
    """Word piece ids of the example's question [L], answers [4][L] and
    rationales [4][L] (errors name the annot_id)."""
    token_lists = [example.question, *example.answer_choices, *example.rationale_choices]
    try:
      rendered = [render_references(t, example.objects, self.references, self.region_token_base)
                  for t in token_lists]
    except ValueError as e:
      raise ValueError(f'VCR example {example.annot_id}: {e}') from None
    # Runs of words go through the tokenizer in one batch; region tokens stay ids.
    runs = [' '.join(run) for items in rendered for run in _word_runs(items)]
    encoded = self.tokenizer.encode(runs) if runs else None
    run_ids = iter([] if encoded is None else
                   [row[1:length - 1].tolist() for row, length in
                    zip(encoded['input_ids'], encoded['text_mask'].sum(-1))])
    pieces = []
    for items in rendered:
      ids = []
      for item in _grouped(items):
        ids.extend(next(run_ids) if isinstance(item, list) else [item])
      pieces.append(ids)
    return dict(question=pieces[0], answers=pieces[1:1 + CHOICES],
                rationales=pieces[1 + CHOICES:])

  def answer_parts(self, pieces: Mapping[str, Any]) -> list[list[Part]]:
    """The 4 Q->A sequences' parts."""
    layout = self.layout
    return [[(pieces['question'], layout.question_type, False),
             (answer, layout.answer_type, True)] for answer in pieces['answers']]

  def rationale_parts(self, pieces: Mapping[str, Any], answer: int) -> list[list[Part]]:
    """The 4 QA->R sequences' parts, the context's answer being `answer`."""
    layout = self.layout
    context = [(pieces['question'], layout.question_type, False),
               (pieces['answers'][answer], layout.context_answer_type, layout.separate_context)]
    return [context + [(rationale, layout.rationale_type, True)]
            for rationale in pieces['rationales']]

  def sequence(self, parts: Sequence[Part]) -> tuple[list[int], list[int]]:
    """(ids, types) of `[CLS] part [SEP]? part ... [SEP]`, the longest part
    losing its last pieces first until the sequence fits max_len."""
    tokenizer = self.tokenizer
    parts = [(list(ids), kind, separated) for ids, kind, separated in parts]
    budget = tokenizer.max_len - 2 - sum(separated for _, _, separated in parts[1:])
    while sum(len(ids) for ids, _, _ in parts) > budget:
      max(parts, key=lambda p: len(p[0]))[0].pop()
    ids, types = [tokenizer.cls_id], [parts[0][1]]
    for k, (piece_ids, kind, separated) in enumerate(parts):
      if k and separated:
        ids.append(tokenizer.sep_id)
        types.append(kind if self.layout.separator_takes_next else parts[k - 1][1])
      ids += piece_ids
      types += [kind] * len(piece_ids)
    return ids + [tokenizer.sep_id], types + [parts[-1][1]]

  def encode(self, sequences: Sequence[Sequence[Sequence[Part]]]) -> dict[str, np.ndarray]:
    """input_ids, text_mask, token_type_ids int32 [B, C, T] of B examples' C sequences."""
    b, c, t = len(sequences), len(sequences[0]) if sequences else 0, self.tokenizer.max_len
    arrays = {k: np.zeros((b, c, t), np.int32)
              for k in ('input_ids', 'text_mask', 'token_type_ids')}
    arrays['input_ids'][...] = self.tokenizer.pad_id
    for row, example in enumerate(sequences):
      for column, parts in enumerate(example):
        ids, types = self.sequence(parts)
        arrays['input_ids'][row, column, :len(ids)] = ids
        arrays['text_mask'][row, column, :len(ids)] = 1
        arrays['token_type_ids'][row, column, :len(ids)] = types
    return arrays


def _word_runs(items: Sequence[str | int]) -> list[list[str]]:
  return [run for run in _grouped(items) if isinstance(run, list)]


def _grouped(items: Sequence[str | int]) -> list[list[str] | int]:
  """Consecutive words as lists, region token ids alone: ['a', 'b', 7] -> [['a', 'b'], 7]."""
  grouped = []
  for item in items:
    if isinstance(item, str):
      if grouped and isinstance(grouped[-1], list):
        grouped[-1].append(item)
      else:
        grouped.append([item])
    else:
      grouped.append(item)
  return grouped


def make_encoder(model_config: ml_collections.ConfigDict, tokenizer: BertTokenizer,
                 references: str | None = None) -> TextEncoder:
  """The design's TextEncoder (references None: the design's)."""
  design = model_config.name
  return TextEncoder(tokenizer, resolve_references(design, references), LAYOUTS[design],
                     layers.padded_vocab_size(model_config.vocab_size))


# ----------------------------------------------------------------------------
# Heads and the model.


class VcrModel(nn.Module):
  """A design's backbone plus a VCR head, over C candidate sequences per example.

  Params: {'backbone', HEAD_NAME, and EXTRA_TYPES_NAME [K, H] with
  extra_token_types, EXTRA_WORDS_NAME [NUM_REGION_TOKENS, H] with region_tokens}.

  Attributes:
    backbone: `vlpjax.models.get_model(config.model, pretraining=False)`.
    head: one of HEAD_KINDS.
    extra_token_types: K, the text types past the backbone's table (UNITER: 2).
    region_tokens: the word rows past the backbone's table (UNITER: 81; 0 for
      'names' references).
    hidden_size: H, the width of those rows.
    dropout_rate: the 'linear' head's.
    dtype, param_dtype: of the head and the rows.
  """
  backbone: nn.Module
  head: str = 'linear'
  extra_token_types: int = 0
  region_tokens: int = 0
  hidden_size: int = 768
  dropout_rate: float = 0.1
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, token_type_ids: jax.Array,
               region_feats: jax.Array, region_loc: jax.Array, region_mask: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Scores the candidates.

    Args:
      input_ids, text_mask, token_type_ids: [B, C, T] int, C sequences per example.
      region_feats: [B, R, F]; region_loc: [B, R, L]; region_mask: [B, R]: the
        example's regions, the same for its C sequences.
      deterministic: no dropout when True.

    Returns:
      {'logits': float32 [B, C, K] (K = 2 for 'pair_mlp', else 1),
       'scores': float32 [B, C], each candidate's score (its last logit: the
       'right' logit of 'pair_mlp')}.
    """
    if self.head not in HEAD_KINDS:
      raise ValueError(f'VcrModel.head must be one of {HEAD_KINDS}, got {self.head!r}')
    b, c, t = input_ids.shape
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    flat = lambda x: x.reshape((b * c, t))
    # Row b * C + k is candidate k of example b, as `flat` orders the text.
    repeat = lambda x: jnp.repeat(x, c, axis=0)
    kwargs = {}
    if self.extra_token_types:
      kwargs['extra_token_type_embeddings'] = self.param(
          EXTRA_TYPES_NAME, layers.normal_init(('types', 'embed')),
          (self.extra_token_types, self.hidden_size), param_dtype)
    if self.region_tokens:
      # Unsharded rows: 81 need not divide a mesh axis.
      kwargs['extra_word_embeddings'] = self.param(
          EXTRA_WORDS_NAME, layers.normal_init((None, 'embed')),
          (self.region_tokens, self.hidden_size), param_dtype)
    outputs = self.backbone(flat(input_ids), flat(text_mask), repeat(region_feats),
                            repeat(region_loc), repeat(region_mask),
                            token_type_ids=flat(token_type_ids), deterministic=deterministic,
                            **kwargs)
    pooled = outputs['pooled']  # [BC, P]; ViLBERT: text_pooled * image_pooled
    dense = dict(dtype=dtype, param_dtype=param_dtype, name=HEAD_NAME)
    if self.head == 'pair_mlp':
      logits = heads_lib.AnswerHead(2, pooled.shape[-1], activation=nn.relu, **dense)(pooled)
    elif self.head == 'mlp':
      logits = heads_lib.AnswerHead(1, pooled.shape[-1], **dense)(pooled)
    else:
      pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=deterministic)
      logits = layers.Dense(1, ('embed', None), **dense)(pooled)
    logits = logits.astype(jnp.float32).reshape(b, c, -1)
    return {'logits': logits, 'scores': logits[..., -1]}


def extra_token_types(model_config: ml_collections.ConfigDict) -> int:
  """Text types the design's layout needs past its table (UNITER: 2)."""
  return max(0, LAYOUTS[model_config.name].num_types - model_config.type_vocab_size)


def build_model(model_config: ml_collections.ConfigDict, *, head: str | None = None,
                references: str | None = None, dropout_rate: float | None = None
                ) -> VcrModel:
  """The VcrModel of `config.model` (None: the design's head, references, dropout)."""
  design = model_config.name
  region_tokens = (NUM_REGION_TOKENS if resolve_references(design, references) == 'region_tokens'
                   else 0)
  return VcrModel(
      backbone=get_model(model_config, pretraining=False), head=resolve_head(design, head),
      extra_token_types=extra_token_types(model_config), region_tokens=region_tokens,
      hidden_size=model_config.hidden_size,
      dropout_rate=model_config.dropout_rate if dropout_rate is None else dropout_rate,
      dtype=model_config.dtype, param_dtype=model_config.param_dtype)


def model_inputs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The VcrModel keyword arguments of a batch, region features widened to float32."""
  kwargs = {k: batch[k] for k in MODEL_INPUT_KEYS}
  kwargs['region_feats'] = kwargs['region_feats'].astype(jnp.float32)
  return kwargs


# ----------------------------------------------------------------------------
# Examples.


@dataclasses.dataclass
class VcrExamples(vqa.PairExamples):
  """Builds VCR batches (module docstring) from the tables (`vqa.PairExamples`;
  `pairs`: the vcr table, EXAMPLE_KEYS; `images`: its regions table).

  Attributes:
    encoder: the design's TextEncoder.
    evaluation: one item per row with its 20 sequences and both labels; else
      two training instances per row (Q->A, QA->R: instance i is row i // 2
      at stage i % 2) with their 4 sequences and label.
  """
  encoder: TextEncoder | None = None
  evaluation: bool = False

  def __len__(self) -> int:
    return len(self.pairs) * (1 if self.evaluation else len(STAGES))

  def examples(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The batch of items `indices` [B] (see the class docstring)."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    rows, stages = (indices, None) if self.evaluation else np.divmod(indices, len(STAGES))
    records = self.pairs.read(rows)
    examples = [Example.from_record(r) for r in records]
    pieces = [self.encoder.piece_ids(e) for e in examples]
    if self.evaluation:
      sequences = [self.encoder.answer_parts(p) + [
          parts for answer in range(CHOICES) for parts in self.encoder.rationale_parts(p, answer)]
                   for p in pieces]
      labels = dict(answer_label=[e.answer_label for e in examples],
                    rationale_label=[e.rationale_label for e in examples])
    else:
      sequences, label = [], []
      for example, piece, stage in zip(examples, pieces, stages):
        if min(example.answer_label, example.rationale_label) < 0:
          raise ValueError(f'{self.pairs.name}: example {example.annot_id} has no labels '
                           '(a test split?): it cannot be trained on')
        if STAGES[stage] == 'answer':
          sequences.append(self.encoder.answer_parts(piece))
          label.append(example.answer_label)
        else:
          sequences.append(self.encoder.rationale_parts(piece, example.answer_label))
          label.append(example.rationale_label)
      labels = dict(label=label)
    batch = self.encoder.encode(sequences)
    image_index = np.array([r['image_index'] for r in records], np.int64).reshape(-1)
    regions = examples_lib.region_batch(self.design, self.images, image_index)
    batch.update({k: regions[k] for k in vqa.REGION_KEYS})
    batch.update({k: np.array(v, np.int32).reshape(-1) for k, v in labels.items()})
    return batch


def open_examples(config: ml_collections.ConfigDict, split: str, evaluation: bool
                  ) -> VcrExamples:
  """The examples of a split of the vcr table for the run's design and references."""
  tokenizer, images, text = vqa.open_text_inputs(config.data, config.model.name, TABLE, split,
                                                 EXAMPLE_KEYS, images_table=REGIONS_TABLE)
  return VcrExamples(config.model.name, tokenizer, images, text,
                     make_encoder(config.model, tokenizer, config.vcr.references), evaluation)


def read_annot_ids(data_config: ml_collections.ConfigDict, split: str) -> np.ndarray:
  """The annot_id of every row of the vcr table's `split`, in row order: object [N]."""
  records = tables.read_all(tables.open_split(data_config, TABLE, split, ('annot_id',)))
  return np.array([tables.as_text(r['annot_id']) for r in records], object)


# ----------------------------------------------------------------------------
# Evaluation: pure functions.


def choice_stats(answer_scores: np.ndarray, rationale_scores: np.ndarray,
                 answer_label: np.ndarray, rationale_label: np.ndarray
                 ) -> dict[str, np.int64]:
  """Sufficient statistics of VCR's accuracies over N examples; sum them over
  batches and processes.

  Args:
    answer_scores: [N, 4]; rationale_scores: [N, 4, 4] (rationale j given answer a
      at [n, a, j]); answer_label, rationale_label: [N] (-1: unlabelled).

  Returns:
    int64 {'qa_correct', 'qar_correct' (the best rationale given the gold
    answer is the gold rationale), 'q_ar_correct' (both), 'labelled' (examples
    with both labels), 'count' (every example)}.
  """
  answer_label = np.asarray(answer_label, np.int64).reshape(-1)
  rationale_label = np.asarray(rationale_label, np.int64).reshape(-1)
  answer_scores = np.asarray(answer_scores).reshape(-1, CHOICES)
  rationale_scores = np.asarray(rationale_scores).reshape(-1, CHOICES, CHOICES)
  if not len(answer_scores) == len(rationale_scores) == len(answer_label) == len(rationale_label):
    raise ValueError(f'{len(answer_scores)} answer scores, {len(rationale_scores)} rationale '
                     f'scores, {len(answer_label)} and {len(rationale_label)} labels')
  labelled = (answer_label >= 0) & (rationale_label >= 0)
  rows = np.arange(len(answer_label))
  given_gold = rationale_scores[rows, np.maximum(answer_label, 0)]  # [N, 4]
  qa = labelled & (answer_scores.argmax(-1) == answer_label)
  qar = labelled & (given_gold.argmax(-1) == rationale_label)
  return {'qa_correct': np.int64(qa.sum()), 'qar_correct': np.int64(qar.sum()),
          'q_ar_correct': np.int64((qa & qar).sum()), 'labelled': np.int64(labelled.sum()),
          'count': np.int64(len(answer_label))}


def zero_stats() -> dict[str, np.int64]:
  return choice_stats(np.zeros((0, CHOICES)), np.zeros((0, CHOICES, CHOICES)), [], [])


def merge_stats(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
  return {k: a[k] + b[k] for k in a}


def summary(stats: Mapping[str, Any]) -> dict[str, float]:
  """`qa_accuracy`, `qar_accuracy`, `q_ar_accuracy` over the labelled examples
  (NaN over none: VCR's test) and `count`, every example scored."""
  labelled = int(stats['labelled'])
  accuracy = lambda key: int(stats[key]) / labelled if labelled else float('nan')
  return {'qa_accuracy': accuracy('qa_correct'), 'qar_accuracy': accuracy('qar_correct'),
          'q_ar_accuracy': accuracy('q_ar_correct'), 'count': int(stats['count'])}


def probabilities(scores: np.ndarray) -> np.ndarray:
  """Scores [N, 20] (4 answers, then 4 rationales given each answer) -> softmax
  over each group of four: float64 [N, 5, 4] (the leaderboard's groups)."""
  groups = np.asarray(scores, np.float64).reshape(-1, 1 + CHOICES, CHOICES)
  exp = np.exp(groups - groups.max(-1, keepdims=True))
  return exp / exp.sum(-1, keepdims=True)


CSV_COLUMNS = (tuple(f'answer_{i}' for i in range(CHOICES))
               + tuple(f'rationale_conditioned_on_a{a}_{i}' for a in range(CHOICES)
                       for i in range(CHOICES)))


def prediction_records(annot_ids: Sequence[str], probs: np.ndarray) -> list[dict[str, Any]]:
  """{'annot_id', 'probabilities': [20] (CSV_COLUMNS order)} per example
  (`csv_text` writes the file); probs [N, 5, 4] (`probabilities`)."""
  probs = np.asarray(probs).reshape(-1, len(CSV_COLUMNS))
  if len(annot_ids) != len(probs):
    raise ValueError(f'{len(annot_ids)} annot_ids but {len(probs)} predictions')
  return [{'annot_id': str(i), 'probabilities': [float(p) for p in row]}
          for i, row in zip(annot_ids, probs)]


def csv_text(records: Sequence[Mapping[str, Any]]) -> str:
  """The leaderboard's CSV: a header `annot_id,answer_0,...`, one line an example."""
  lines = [','.join(('annot_id',) + CSV_COLUMNS)]
  lines += [','.join([r['annot_id']] + [repr(float(p)) for p in r['probabilities']])
            for r in records]
  return '\n'.join(lines) + '\n'


class VcrEvaluator(vqa.SplitEvaluator):
  """Q->A, QA->R and Q->AR accuracy on a split of the vcr table, and its CSV.

  Every example is scored once (`evaluators.common.eval_batches`: the last batch
  padded and masked); counts are summed over processes; predictions go to
  `<workdir>/predictions/<name>_step<N>.csv`, written in parts and merged by
  process 0.
  """

  def __init__(self, name: str, eval_config: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, model: VcrModel, mesh: Mesh, workdir: str):
    super().__init__(name, eval_config, config, mesh, workdir)
    self.examples = open_examples(config, eval_config.split, evaluation=True)
    self.annot_ids = read_annot_ids(config.data, eval_config.split)
    self._scores = vqa.prediction_step(model, self.sharding, model_inputs,
                                       read=lambda outputs: outputs['scores'])

  def run(self, params: Any, step: int) -> Iterator[tuple[str, float]]:
    """Yields (metric, value): qa_accuracy, qar_accuracy, q_ar_accuracy and count."""
    from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
    stats, records = zero_stats(), []
    for batch in common.eval_batches(len(self.examples), self.batch_size,
                                     self.examples.examples, self.sharding):
      real = common.local_rows(batch[common.MASK_KEY]).astype(bool)
      index = common.local_rows(batch[common.INDEX_KEY])[real]
      scores = common.local_rows(self._scores(params, batch))[real]  # [L, 20]
      stats = merge_stats(stats, choice_stats(
          scores[:, :CHOICES], scores[:, CHOICES:],
          common.local_rows(batch['answer_label'])[real],
          common.local_rows(batch['rationale_label'])[real]))
      records += [dict(record, _index=int(i)) for record, i in
                  zip(prediction_records(self.annot_ids[index], probabilities(scores)), index)]
    stats = common.process_sum(stats)
    common.write_prediction_parts(self.prediction_path(step, 'csv'), records, render=csv_text)
    yield from summary(stats).items()


# ----------------------------------------------------------------------------
# The task interface (`vlpjax.tasks`).

objective_for_step = vqa.objective_for_step


def configure(config: ml_collections.ConfigDict, size: str) -> None:
  """Makes `config` a VCR run: `config.vcr`, `data.vcr_dataset` and
  `data.gt_images_dataset` (the regions), the design's recipe and text length
  (module docstring; the world's for 'small'/'tiny'), evaluators of type 'vcr'
  on validation (every 200 steps on the world, 5,000 at base) and test (at the
  end), EVAL_BATCH examples a batch."""
  world = vqa.configure_finetuning(config, size, 'vcr', default_vcr_config(), RECIPES,
                                   TEXT_LENGTHS)
  if world:
    config.data.max_text_len = WORLD_TEXT_LENGTH
  for evaluator in config.evals.values():
    evaluator.batch_size = EVAL_BATCH
  config.data.vcr_dataset = ml_collections.config_dict.placeholder(str)
  config.data.gt_images_dataset = ml_collections.config_dict.placeholder(str)


def _backbone_takes(design: str, keyword: str) -> bool:
  return keyword in inspect.signature(get_design(design).model.__call__).parameters


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the model against the data and the `config.vcr` choices against
  the backbone (region tokens and extra token types need a backbone that takes
  extra rows: UNITER's)."""
  vqa.check_model_against_data(config)
  design = config.model.name
  resolve_head(design, config.vcr.head)
  needs = {'extra_token_type_embeddings': extra_token_types(config.model) > 0,
           'extra_word_embeddings':
               resolve_references(design, config.vcr.references) == 'region_tokens'}
  for keyword, needed in needs.items():
    if needed and not _backbone_takes(design, keyword):
      raise ValueError(f'{design}: vcr.references={config.vcr.references!r} and its token types '
                       f'need a backbone that takes {keyword} (UNITER\'s); use '
                       "vcr.references='names'")
  return config


def make_model(config: ml_collections.ConfigDict) -> VcrModel:
  """The design's backbone with its VCR head."""
  return build_model(config.model, head=config.vcr.head, references=config.vcr.references,
                     dropout_rate=config.vcr.dropout_rate)


def make_train_iterator(config: ml_collections.ConfigDict, mesh: Mesh
                        ) -> input_pipeline.PretrainingIterator:
  """Endless, resumable batches of Q->A and QA->R instances of `vcr.train_split`."""
  split = config.vcr.train_split
  examples = open_examples(config, split, evaluation=False)
  return vqa.task_train_iterator(
      config, mesh, examples, split, TABLE, head=resolve_head(config.model.name, config.vcr.head),
      references=examples.encoder.references)


def objectives(config: ml_collections.ConfigDict) -> list[str]:
  """One compiled step: the VCR loss."""
  del config
  return ['vcr']


def make_inputs(config: ml_collections.ConfigDict, batch: Mapping[str, jax.Array],
                rng: jax.Array, objective: str
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """VcrModel kwargs (features widened to float32) and the labels [B]."""
  del config, rng, objective
  return model_inputs(batch), {'label': batch['label']}


def compute_losses(config: ml_collections.ConfigDict, outputs: Mapping[str, jax.Array],
                   targets: Mapping[str, jax.Array], objective: str
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The head's loss (module docstring) and the batch's choice accuracy."""
  del objective
  labels = targets['label']
  scores = outputs['scores']  # [B, C]
  if resolve_head(config.model.name, config.vcr.head) == 'pair_mlp':
    right = (jnp.arange(scores.shape[1])[None, :] == labels[:, None]).astype(jnp.int32)
    loss = mean(optax.softmax_cross_entropy_with_integer_labels(outputs['logits'], right))
  else:
    loss = mean(optax.softmax_cross_entropy_with_integer_labels(scores, labels))
  accuracy = mean((vqa.predict(scores) == labels).astype(jnp.float32))
  return loss, {'ce': loss, 'train_accuracy': accuracy}


def flops_per_example(config: ml_collections.ConfigDict,
                      input_specs: Mapping[str, jax.ShapeDtypeStruct], objective: str) -> float:
  """The design's backbone over the C candidate sequences, x3 (the score head
  is negligible)."""
  from vlpjax import flops  # pylint: disable=g-import-not-at-top
  del objective  # one
  _, candidates, text = input_specs['input_ids'].shape
  return candidates * flops.model_flops_per_example(
      config.model, text, input_specs['region_feats'].shape[1], 0, components=())


def inference_files(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """None: the predictor needs only the run's config and vocabulary."""
  del config
  return {}


def init_heads(config: ml_collections.ConfigDict, params: Mapping[str, Any],
               abstract_params: Mapping[str, Any]) -> Mapping[str, Any]:
  """After `init.source` gave the backbone: the head and the region token rows
  stay fresh, and the token type rows past the backbone's table start as copies
  of row 0 of the loaded table, as UNITER's `init_type_embedding` (rows 2 and 3
  <- row 0). An 'orbax:' source of this model's full params keeps its own rows."""
  return vqa.init_extra_type_rows(config, params, abstract_params, EXTRA_TYPES_NAME,
                                  LAYOUTS[config.model.name].question_type)


def make_evaluators(config: ml_collections.ConfigDict, model: VcrModel, mesh: Mesh,
                    workdir: str) -> list[VcrEvaluator]:
  """The `config.evals` entries (all of type 'vcr')."""
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  return common.build_evaluators(config, 'vcr', {EVAL_TYPE: VcrEvaluator}, model, mesh,
                                 workdir)


class VcrPredictor:
  """Answers VCR questions about images of your own features (`vlpjax.load`).

  Attributes:
    config: the run's config; model: the VcrModel; params: its params (first
    device); step: the checkpoint's step; encoder: the run's TextEncoder.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, step: int | None):
    self.config = config
    self.design = get_design(config.model.name)
    self.encoder = make_encoder(config.model, vqa.run_tokenizer(config, workdir),
                                config.vcr.references)
    # Inference is deterministic: the dropout rate changes nothing.
    self.model = build_model(config.model, head=config.vcr.head,
                             references=config.vcr.references)
    blank = [['?']] * CHOICES
    self.params, self.step, self._scores = vqa.restore_for_inference(
        self.model, self.inputs(['?'], blank, blank, [], *vqa.blank_image(config)), workdir,
        step, 'scores')

  def inputs(self, question: Sequence[Any], answers: Sequence[Sequence[Any]],
             rationales: Sequence[Sequence[Any]], objects: Sequence[str], features: np.ndarray,
             boxes: np.ndarray, image_size: tuple[float, float]) -> dict[str, np.ndarray]:
    """Model inputs of one example's 20 sequences ([1, 20, T]); see `choose`."""
    if len(answers) != CHOICES or len(rationales) != CHOICES:
      raise ValueError(f'VCR asks {CHOICES} answers and {CHOICES} rationales, got '
                       f'{len(answers)} and {len(rationales)}')
    example = Example('input', list(question), [list(a) for a in answers],
                      [list(r) for r in rationales], list(objects), -1, -1)
    pieces = self.encoder.piece_ids(example)
    sequences = self.encoder.answer_parts(pieces) + [
        parts for answer in range(CHOICES) for parts in self.encoder.rationale_parts(pieces, answer)]
    batch = self.encoder.encode([sequences])
    return dict(batch, **vqa.image_regions(self.config, self.design, features, boxes,
                                           image_size, 1))

  def choose(self, question: Sequence[Any], answers: Sequence[Sequence[Any]],
             rationales: Sequence[Sequence[Any]], objects: Sequence[str], features: np.ndarray,
             boxes: np.ndarray, image_size: tuple[float, float]) -> dict[str, Any]:
    """The chosen answer, and the rationale chosen given it, of one VCR question.

    Args:
      question, answers [4], rationales [4]: VCR token lists (words, and object
        references as lists of indices into `objects`).
      objects: the class name of each object ('person' gets a name with 'names'
        references); object k is region k of `features`.
      features: [N, F], boxes [N, 4] (x1, y1, x2, y2 in pixels), image_size
        (width, height): the objects' regions first, in `objects` order; the
        first `data.max_regions` are used.

    Returns:
      {'answer': int, 'rationale': int (given that answer), 'probabilities':
      float [5, 4] (the answers', then the rationales' given each answer)}.
    """
    scores = self._scores(self.params, self.inputs(question, answers, rationales, objects,
                                                   features, boxes, image_size))
    probs = probabilities(np.asarray(scores))[0]
    answer = int(probs[0].argmax())
    return {'answer': answer, 'rationale': int(probs[1 + answer].argmax()),
            'probabilities': probs}


def predictor(config: ml_collections.ConfigDict, workdir: str, step: int | None
              ) -> VcrPredictor:
  """`vlpjax.load`'s object for a VCR run: `choose(question, answers, rationales,
  objects, features, boxes, image_size)`."""
  return VcrPredictor(config, workdir, step)
