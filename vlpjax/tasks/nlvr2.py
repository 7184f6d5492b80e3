"""NLVR2: is a sentence true of a pair of images?

Shared TASKS.md "NLVR2". Each example is one sentence, a left and a right
image and a True/False label; every design answers with its own way of seeing
two images (`HEADS` per design, `config.nlvr2.head` overrides):

  'paired_mlp'    LXMERT, ViLBERT: the sentence with each image through the
                  backbone (a batch of 2B), the two pooled vectors concatenated
                  [B, 2P] -> Linear(2P, 2P) -> GELU -> LayerNorm(1e-12) ->
                  Linear(2P, 2) (`heads.AnswerHead` with 2 outputs).
  'paired_attn'   UNITER's default (`UniterForNlvr2PairedAttn`, its
                  'paired-attn'): the two sequences [text; regions] of the
                  batch of 2B attend to each other, one attention per
                  direction (`PairAttention`, as torch's MultiheadAttention:
                  no residual, no LayerNorm); each side's [attended; own] ->
                  fc(2H -> H, ReLU, dropout), shared; attention pooling
                  (`AttentionPool`, shared) -> [B, 2H] -> Linear(2H, 2).
  'paired'        UNITER's 'paired': the two pooled vectors concatenated ->
                  Linear(2H, 2).
  'joint_linear'  VisualBERT: one sequence [text][left regions][right regions]
                  -> pooled -> dropout -> Linear(H, 2).

Region token types: a design that declares `Design.pair_image_token_types`
gets them as `visual_token_type_ids` (UNITER 1 for the left image's regions, 2
for the right's; VisualBERT 0 and 1). Types past the backbone's table (UNITER's
third row: the original grows its table to 3) are the model's param
'pair_token_type_embeddings' [K, H], passed as the backbone's
`extra_token_type_embeddings`, so a pretrained backbone (2 rows) loads as it is;
they start as copies of the left image's row, as UNITER's
`init_type_embedding` (row 2 <- row 1), in `init_heads` after `init.source`.

Loss: softmax cross-entropy over the two labels (all four originals).

The nlvr2 table (`data.nlvr2_dataset`, e.g. 'nlvr2/lil_lab' of
`annotations_builder.Nlvr2`; by default the embedded world's `<size>_nlvr2`):
identifier (lil-lab's `<split>-<set>-<pair>-<sentence>`), text,
left_image_index, right_image_index, left_image_id, right_image_id, label
(1 = True). The world's tables built before it stored `identifier` get it
computed from their rows as the world does (`world.nlvr2_identifiers`).

Batches (`Nlvr2Examples`): input_ids, text_mask, token_type_ids int32 [B, T];
{left,right}_region_feats [B, R, F] (the table's dtype),
{left,right}_region_loc float32 [B, R, L], {left,right}_region_mask int32
[B, R] (each image's `examples.region_batch`); label int32 [B].

Evaluation (`Nlvr2Evaluator`, type 'nlvr2'): every example once
(`vqa.predicted_answers`: the last batch padded and masked); `accuracy`,
`consistency` (lil-lab `metrics.py`: the share of sentences, the identifier
with its pair field blanked, whose every example is right) and `count`, from
per-sentence counts summed over processes; predictions go to
`predictions/<name>_step<N>.csv`, lines `identifier,True|False` in split order,
written in parts and merged by process 0. `vlpjax.load` gives an
`Nlvr2Predictor`: `judge(sentences, left, right)` on images of your own features.

Recipes at `base`: LXMERT's is TASKS.md's (batch 32, lr 5e-5, 4 epochs of
NLVR2's 86,373 training examples); UNITER's is its
`config/train-nlvr2-base-1gpu.json` (lr 3e-5, 8,000 steps, warmup 800, AdamW
(0.9, 0.98), weight decay 0.01, clip 2; batches of 10,240 tokens: about 80
pairs); TASKS.md gives none for ViLBERT and VisualBERT: their VQA recipes
(`vqa.RECIPES`). Text lengths: VQA's per design; the embedded world's recipe
is VQA's.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from vlpjax.data import examples as examples_lib
from vlpjax.data import input_pipeline, tables
from vlpjax.data import world as world_lib
from vlpjax.models import get_design, get_model
from vlpjax.models import heads as heads_lib
from vlpjax.models import layers
from vlpjax.objectives.common import mean
from vlpjax.tasks import vqa

TABLE = 'nlvr2'
EVAL_TYPE = 'nlvr2'
# The metric of the `nlvr2_test` evaluator a comparison of designs reports.
HEADLINE_METRIC = 'accuracy'
# Label ids -> lil-lab's label strings (label 1 = the sentence is true).
LABELS = ('False', 'True')
SIDES = ('left', 'right')
# The table's fields a batch is made of.
PAIR_KEYS = ('text', 'left_image_index', 'right_image_index', 'label')
# What `Nlvr2Model.__call__` takes from a batch.
MODEL_INPUT_KEYS = ('input_ids', 'text_mask', 'token_type_ids') + tuple(
    f'{side}_{key}' for side in SIDES for key in vqa.REGION_KEYS)

HEAD_KINDS = ('paired_mlp', 'paired_attn', 'paired', 'joint_linear')
HEADS = {'lxmert': 'paired_mlp', 'vilbert': 'paired_mlp', 'uniter': 'paired_attn',
         'visualbert': 'joint_linear'}
HEAD_NAME = 'nlvr2_head'  # the head's param name beside 'backbone'
# Token type rows past the backbone's table (UNITER's right image).
EXTRA_TYPES_NAME = 'pair_token_type_embeddings'

# NLVR2's training examples (lil-lab train.json).
TRAIN_EXAMPLES = 86_373
RECIPES = {
    **vqa.RECIPES,
    # TASKS.md: batch 32, lr 5e-5, 4 epochs; warmup and clipping as its VQA recipe.
    'lxmert': dict(vqa.RECIPES['lxmert'], num_steps=math.ceil(4 * TRAIN_EXAMPLES / 32)),
    # config/train-nlvr2-base-1gpu.json (its optimiser has no head multiplier).
    'uniter': dict(global_batch_size=80, learning_rate=3e-5, warmup_fraction=0.1,
                   num_steps=8_000, adam_b2=0.98, weight_decay=0.01, grad_clip_norm=2.0),
}


def default_nlvr2_config() -> ml_collections.ConfigDict:
  """The `config.nlvr2` section (None: the design's default)."""
  return ml_collections.ConfigDict(dict(
      train_split='train',
      head=ml_collections.config_dict.placeholder(str),  # HEAD_KINDS; None: HEADS[design]
      dropout_rate=ml_collections.config_dict.placeholder(float),  # None: model.dropout_rate
  ))


def resolve_head(design: str, head: str | None = None) -> str:
  """`head`, or the design's (HEADS); errors name the valid choices."""
  if design not in HEADS:
    raise ValueError(f'unknown design {design!r}; expected one of {tuple(HEADS)}')
  return vqa.choose('nlvr2.head', HEADS[design] if head is None else head, HEAD_KINDS)


# ----------------------------------------------------------------------------
# Heads and the model.


class PairAttention(nn.Module):
  """Multi-head attention as torch's `nn.MultiheadAttention` (UNITER's attn1/attn2):
  Q from `x`, K/V from `context`, an output projection; no residual, no LayerNorm.

  Submodules: query, key, value, output (HeadsDense).
  """
  num_heads: int
  attention_dropout_rate: float = 0.1
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array,
               deterministic: bool = True) -> jax.Array:
    """x: [B, S, H]; context: [B, S', H]; context_mask: [B, S'] -> [B, S, H]."""
    hidden = x.shape[-1]
    if hidden % self.num_heads:
      raise ValueError(f'hidden {hidden} is not divisible by num_heads {self.num_heads}')
    depth = hidden // self.num_heads
    def project(inputs, name):
      return layers.HeadsDense(self.num_heads, depth, dtype=self.dtype,
                               param_dtype=self.param_dtype, name=name)(inputs)
    rng = (self.make_rng('dropout') if self.attention_dropout_rate > 0 and not deterministic
           else None)
    heads, _ = layers.attend(project(x, 'query'), project(context, 'key'),
                             project(context, 'value'), context_mask,
                             dropout_rate=self.attention_dropout_rate,
                             deterministic=deterministic, dropout_rng=rng)
    return layers.HeadsDense(self.num_heads, depth, hidden, dtype=self.dtype,
                             param_dtype=self.param_dtype, name='output')(heads)


class AttentionPool(nn.Module):
  """UNITER's attention pooling: scores ReLU(Linear(H, 1)), padding at -1e4,
  softmax, dropout, the weighted sum. Submodules: score (Dense H -> 1)."""
  dropout_rate: float = 0.1
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
    """x: [B, S, H]; mask: [B, S] (1 = real) -> [B, H]."""
    score = nn.relu(layers.Dense(1, ('embed', None), dtype=self.dtype,
                                 param_dtype=self.param_dtype, name='score')(x))[..., 0]
    score = score.astype(jnp.float32) + (1.0 - mask.astype(jnp.float32)) * -1e4
    weights = nn.Dropout(self.dropout_rate)(jax.nn.softmax(score, axis=-1),
                                            deterministic=deterministic)
    return jnp.einsum('bs,bsh->bh', weights.astype(x.dtype), x)


class PairedAttentionHead(nn.Module):
  """UNITER's 'paired-attn' head on the two sequences of each example.

  Submodules: left_to_right, right_to_left (PairAttention), fc (Dense 2H -> H,
  both sides), pool (AttentionPool, both sides), output (Dense 2H -> 2).
  """
  num_heads: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, left: jax.Array, left_mask: jax.Array, right: jax.Array,
               right_mask: jax.Array, deterministic: bool = True) -> jax.Array:
    """left, right: [B, S, H]; left_mask, right_mask: [B, S] -> logits [B, 2]."""
    hidden = left.shape[-1]
    attention = dict(num_heads=self.num_heads, attention_dropout_rate=self.attention_dropout_rate,
                     dtype=self.dtype, param_dtype=self.param_dtype)
    left_to_right = PairAttention(**attention, name='left_to_right')(
        left, right, right_mask, deterministic)
    right_to_left = PairAttention(**attention, name='right_to_left')(
        right, left, left_mask, deterministic)
    fc = layers.Dense(hidden, ('mlp', 'embed'), dtype=self.dtype, param_dtype=self.param_dtype,
                      name='fc')
    dropout = nn.Dropout(self.dropout_rate)
    pool = AttentionPool(self.attention_dropout_rate, dtype=self.dtype,
                         param_dtype=self.param_dtype, name='pool')
    pooled = []
    for attended, own, mask in ((left_to_right, left, left_mask),
                                (right_to_left, right, right_mask)):
      fused = dropout(nn.relu(fc(jnp.concatenate([attended, own], axis=-1))),
                      deterministic=deterministic)
      pooled.append(pool(fused, mask, deterministic))
    return layers.Dense(len(LABELS), ('mlp', 'vocab'), dtype=self.dtype,
                        param_dtype=self.param_dtype, name='output')(
        jnp.concatenate(pooled, axis=-1))


def _repeat_pair(x: jax.Array) -> jax.Array:
  """[B, ...] -> [2B, ...]: the rows for the left images, then for the right."""
  return jnp.concatenate([x, x], axis=0)


class Nlvr2Model(nn.Module):
  """A design's backbone plus an NLVR2 head (module docstring).

  Params: {'backbone': <the backbone's own params>, HEAD_NAME: <head params>
  and, with extra_token_types, EXTRA_TYPES_NAME [K, H]}.

  Attributes:
    backbone: `vlpjax.models.get_model(config.model, pretraining=False)`.
    head: one of HEAD_KINDS.
    pair_image_token_types: the left and right images' region token types
      (`Design.pair_image_token_types`), or None (the backbone takes none).
    extra_token_types: K, the types past the backbone's table (module docstring).
    hidden_size: H, the width of those rows.
    num_heads: the 'paired_attn' head's attention heads (the backbone's).
    dropout_rate, attention_dropout_rate: of the head.
    dtype, param_dtype: of the head (the backbone has its own).
  """
  backbone: nn.Module
  head: str = 'paired_mlp'
  pair_image_token_types: tuple[int, int] | None = None
  extra_token_types: int = 0
  hidden_size: int = 768
  num_heads: int = 12
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def _region_types(self, left_mask: jax.Array, right_mask: jax.Array, axis: int
                    ) -> dict[str, jax.Array]:
    """The backbone's region type kwargs: 'visual_token_type_ids' (the two
    images' types joined on `axis`) and 'extra_token_type_embeddings'; {} without
    pair types."""
    if self.pair_image_token_types is None:
      return {}
    left_type, right_type = self.pair_image_token_types
    kwargs = {'visual_token_type_ids': jnp.concatenate(
        [jnp.full(left_mask.shape, left_type, jnp.int32),
         jnp.full(right_mask.shape, right_type, jnp.int32)], axis=axis)}
    if self.extra_token_types:
      kwargs['extra_token_type_embeddings'] = self.param(
          EXTRA_TYPES_NAME, layers.normal_init(('types', 'embed')),
          (self.extra_token_types, self.hidden_size), jnp.dtype(self.param_dtype))
    return kwargs

  @nn.compact
  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, token_type_ids: jax.Array,
               left_region_feats: jax.Array, left_region_loc: jax.Array,
               left_region_mask: jax.Array, right_region_feats: jax.Array,
               right_region_loc: jax.Array, right_region_mask: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Judges each sentence against its two images.

    Args:
      input_ids, text_mask, token_type_ids: [B, T] int.
      {left,right}_region_feats: [B, R, F]; {left,right}_region_loc: [B, R, L];
      {left,right}_region_mask: [B, R].
      deterministic: no dropout when True.

    Returns:
      {'logits': float32 [B, 2]} (index 1 = True).
    """
    if self.head not in HEAD_KINDS:
      raise ValueError(f'Nlvr2Model.head must be one of {HEAD_KINDS}, got {self.head!r}')
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    dense = dict(dtype=dtype, param_dtype=param_dtype, name=HEAD_NAME)
    if self.head == 'joint_linear':
      outputs = self.backbone(
          input_ids, text_mask,
          jnp.concatenate([left_region_feats, right_region_feats], axis=1),
          jnp.concatenate([left_region_loc, right_region_loc], axis=1),
          jnp.concatenate([left_region_mask, right_region_mask], axis=1),
          token_type_ids=token_type_ids, deterministic=deterministic,
          **self._region_types(left_region_mask, right_region_mask, axis=1))
      pooled = nn.Dropout(self.dropout_rate)(outputs['pooled'], deterministic=deterministic)
      logits = layers.Dense(len(LABELS), ('embed', 'vocab'), **dense)(pooled)
    else:
      region_mask = jnp.concatenate([left_region_mask, right_region_mask], axis=0)
      outputs = self.backbone(
          _repeat_pair(input_ids), _repeat_pair(text_mask),
          jnp.concatenate([left_region_feats, right_region_feats], axis=0),
          jnp.concatenate([left_region_loc, right_region_loc], axis=0), region_mask,
          token_type_ids=_repeat_pair(token_type_ids), deterministic=deterministic,
          **self._region_types(left_region_mask, right_region_mask, axis=0))
      num = input_ids.shape[0]
      if self.head == 'paired_attn':
        sequence = jnp.concatenate([outputs['text'], outputs['vision']], axis=1)
        mask = jnp.concatenate([_repeat_pair(text_mask), region_mask], axis=1)
        logits = PairedAttentionHead(self.num_heads, self.dropout_rate,
                                     self.attention_dropout_rate, **dense)(
            sequence[:num], mask[:num], sequence[num:], mask[num:], deterministic)
      else:
        pooled = outputs['pooled']  # [2B, P]; ViLBERT: text_pooled * image_pooled
        pair = jnp.concatenate([pooled[:num], pooled[num:]], axis=-1)  # [B, 2P]
        if self.head == 'paired_mlp':
          logits = heads_lib.AnswerHead(len(LABELS), pooled.shape[-1], **dense)(pair)
        else:
          logits = layers.Dense(len(LABELS), ('mlp', 'vocab'), **dense)(pair)
    return {'logits': layers.constrain(logits.astype(jnp.float32), ('batch', 'vocab'))}


def extra_token_types(model_config: ml_collections.ConfigDict) -> int:
  """Token types the design's pair types need past its table (UNITER: 1)."""
  types = get_design(model_config.name).pair_image_token_types
  return 0 if types is None else max(0, max(types) + 1 - model_config.type_vocab_size)


def build_model(model_config: ml_collections.ConfigDict, *, head: str | None = None,
                dropout_rate: float | None = None) -> Nlvr2Model:
  """The Nlvr2Model of `config.model` (head None: the design's; dropout None: the model's)."""
  design = model_config.name
  return Nlvr2Model(
      backbone=get_model(model_config, pretraining=False),
      head=resolve_head(design, head),
      pair_image_token_types=get_design(design).pair_image_token_types,
      extra_token_types=extra_token_types(model_config),
      hidden_size=model_config.hidden_size,
      num_heads=model_config.num_heads,
      dropout_rate=model_config.dropout_rate if dropout_rate is None else dropout_rate,
      attention_dropout_rate=model_config.attention_dropout_rate,
      dtype=model_config.dtype, param_dtype=model_config.param_dtype)


def model_inputs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """The Nlvr2Model keyword arguments of a batch, region features widened to float32."""
  kwargs = {k: batch[k] for k in MODEL_INPUT_KEYS}
  for side in SIDES:
    kwargs[f'{side}_region_feats'] = kwargs[f'{side}_region_feats'].astype(jnp.float32)
  return kwargs


# ----------------------------------------------------------------------------
# Examples.


class Nlvr2Examples(vqa.PairExamples):
  """Builds NLVR2 batches (module docstring) from the tables (`vqa.PairExamples`;
  `pairs`: the nlvr2 table, PAIR_KEYS)."""

  def examples(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The batch of nlvr2 records `indices` [B]."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    records = self.pairs.read(indices)
    batch = self.tokenizer.encode([tables.as_text(r['text']) for r in records])
    for side in SIDES:
      image_index = np.array([r[f'{side}_image_index'] for r in records], np.int64).reshape(-1)
      regions = examples_lib.region_batch(self.design, self.images, image_index)
      batch.update({f'{side}_{k}': regions[k] for k in vqa.REGION_KEYS})
    labels = np.array([r['label'] for r in records], np.int64).reshape(-1)
    bad = np.flatnonzero((labels < 0) | (labels >= len(LABELS)))
    if len(bad):
      raise ValueError(f'{self.pairs.name}: row {int(indices[bad[0]])} has label '
                       f'{int(labels[bad[0]])}; labels are 0 (False) or 1 (True)')
    batch['label'] = labels.astype(np.int32)
    return batch


def open_examples(data_config: ml_collections.ConfigDict, design: str, split: str
                  ) -> Nlvr2Examples:
  """The examples of a split of the nlvr2 table for `design`."""
  return Nlvr2Examples(design, *vqa.open_text_inputs(data_config, design, TABLE, split,
                                                     PAIR_KEYS))


def read_identifiers_and_labels(data_config: ml_collections.ConfigDict, split: str,
                                chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """(identifiers, object (str) array [N]; gold label strings, object array [N])
  of the nlvr2 table's `split`, in row order. A table without `identifier`
  (the world's, built before it stored one) gets `world.nlvr2_identifiers`."""
  source = tables.open_table(data_config, TABLE, split)
  # The features the table was written with (`dataset_info.features` are the
  # builder code's, which may have gained fields since).
  stored = 'identifier' in tfds.features.FeatureConnector.from_config(
      os.fspath(source.dataset_info.data_dir))
  keys = ('text', 'label') + (('identifier',) if stored else ())
  records = tables.read_all(tables.open_split(data_config, TABLE, split, keys), chunk)
  if stored:
    identifiers = [tables.as_text(r['identifier']) for r in records]
  else:
    identifiers = world_lib.nlvr2_identifiers(
        split, [{'text': tables.as_text(r['text'])} for r in records])
  return (np.array(identifiers, object),
          np.array([LABELS[int(r['label'])] for r in records], object))


# ----------------------------------------------------------------------------
# Evaluation: pure functions (lil-lab `metrics.py`).


def sentence_of(identifier: str) -> str:
  """The sentence an example asks: its identifier with the pair field (the
  third of `<split>-<set>-<pair>-<sentence>`) blanked, as lil-lab's metrics.py
  groups examples for consistency."""
  fields = str(identifier).split('-')
  if len(fields) < 4:
    raise ValueError(f'NLVR2 identifier {identifier!r} is not <split>-<set>-<pair>-<sentence>')
  fields[2] = ''
  return '-'.join(fields)


def sentence_groups(identifiers: Sequence[str]) -> np.ndarray:
  """Each example's sentence (`sentence_of`) as an int64 [N] in [0, sentences),
  numbered by first appearance (the same on every process)."""
  numbers: dict[str, int] = {}
  return np.array([numbers.setdefault(sentence_of(i), len(numbers)) for i in identifiers],
                  np.int64)


def pair_stats(predicted: Sequence[str], gold: Sequence[str], groups: np.ndarray,
               num_sentences: int) -> dict[str, np.ndarray]:
  """Sufficient statistics of accuracy and consistency over some examples:
  {'correct' int64, 'count' int64, 'wrong' int64 [S] (wrong examples per
  sentence), 'asked' int64 [S] (examples per sentence)}; sum them over batches
  and processes. Labels compare case-insensitively, as metrics.py."""
  if not len(predicted) == len(gold) == len(groups):
    raise ValueError(f'{len(predicted)} predictions, {len(gold)} labels, {len(groups)} groups')
  right = np.array([str(p).lower() == str(g).lower() for p, g in zip(predicted, gold)], bool)
  groups = np.asarray(groups, np.int64).reshape(-1)
  return {'correct': np.int64(right.sum()), 'count': np.int64(len(right)),
          'wrong': np.bincount(groups[~right], minlength=num_sentences).astype(np.int64),
          'asked': np.bincount(groups, minlength=num_sentences).astype(np.int64)}


def zero_stats(num_sentences: int) -> dict[str, np.ndarray]:
  return pair_stats([], [], np.zeros(0, np.int64), num_sentences)


def merge_stats(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
  return {k: a[k] + b[k] for k in a}


def summary(stats: Mapping[str, Any]) -> dict[str, float]:
  """`accuracy` (correct / count), `consistency` (sentences asked with no wrong
  example / sentences asked), fractions (NaN over none), and `count`."""
  count = int(stats['count'])
  asked = np.asarray(stats['asked']) > 0
  sentences = int(asked.sum())
  consistent = int((asked & (np.asarray(stats['wrong']) == 0)).sum())
  return {'accuracy': int(stats['correct']) / count if count else float('nan'),
          'consistency': consistent / sentences if sentences else float('nan'),
          'count': count}


def prediction_records(identifiers: Sequence[str], predicted: Sequence[str]
                       ) -> list[dict[str, str]]:
  """{'identifier', 'prediction'} per example (`csv_text` writes the file)."""
  if len(identifiers) != len(predicted):
    raise ValueError(f'{len(identifiers)} identifiers but {len(predicted)} predictions')
  unknown = sorted({str(p) for p in predicted if p not in LABELS})
  if unknown:
    raise ValueError(f'predictions {unknown} are not in {LABELS}')
  return [{'identifier': str(i), 'prediction': str(p)} for i, p in zip(identifiers, predicted)]


def csv_text(records: Sequence[Mapping[str, str]]) -> str:
  """lil-lab's prediction file: `identifier,True|False`, one line an example."""
  return ''.join(f'{r["identifier"]},{r["prediction"]}\n' for r in records)


class Nlvr2Evaluator(vqa.SplitEvaluator):
  """Accuracy and consistency on a split of the nlvr2 table, and its CSV file.

  Every example is judged once (`vqa.predicted_answers`: the last batch padded
  and masked); per-sentence counts are summed over processes; predictions go
  to `<workdir>/predictions/<name>_step<N>.csv`, written in parts and merged
  by process 0.
  """

  def __init__(self, name: str, eval_config: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, model: Nlvr2Model, mesh: Mesh,
               workdir: str):
    super().__init__(name, eval_config, config, mesh, workdir)
    self.examples = open_examples(config.data, config.model.name, eval_config.split)
    self.identifiers, self.gold = read_identifiers_and_labels(config.data, eval_config.split)
    self.groups = sentence_groups(self.identifiers)
    self.num_sentences = int(self.groups.max()) + 1 if len(self.groups) else 0
    self._predict = vqa.prediction_step(model, self.sharding, model_inputs)

  def run(self, params: Any, step: int) -> Iterator[tuple[str, float]]:
    """Yields (metric, value): accuracy, consistency and count."""
    from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
    stats, records = zero_stats(self.num_sentences), []
    for index, predicted in vqa.predicted_answers(self._predict, params, self.examples, LABELS,
                                                  self.batch_size, self.sharding):
      stats = merge_stats(stats, pair_stats(predicted, self.gold[index], self.groups[index],
                                            self.num_sentences))
      records += [dict(record, _index=int(i)) for record, i in
                  zip(prediction_records(self.identifiers[index], predicted), index)]
    stats = common.process_sum(stats)
    common.write_prediction_parts(self.prediction_path(step, 'csv'), records, render=csv_text)
    yield from summary(stats).items()


# ----------------------------------------------------------------------------
# The task interface (`vlpjax.tasks`).

objective_for_step = vqa.objective_for_step


def configure(config: ml_collections.ConfigDict, size: str) -> None:
  """Makes `config` an NLVR2 run: `config.nlvr2`, `data.nlvr2_dataset`, the
  design's recipe (module docstring; the world's for 'small'/'tiny') and
  question length, and evaluators of type 'nlvr2' on validation (every 200 steps on the world,
  5,000 at base) and test (at the end)."""
  vqa.configure_finetuning(config, size, 'nlvr2', default_nlvr2_config(), RECIPES)
  config.data.nlvr2_dataset = ml_collections.config_dict.placeholder(str)


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the model against the data and the `config.nlvr2` choices."""
  vqa.check_model_against_data(config)
  resolve_head(config.model.name, config.nlvr2.head)
  return config


def make_model(config: ml_collections.ConfigDict) -> Nlvr2Model:
  """The design's backbone with its NLVR2 head."""
  return build_model(config.model, head=config.nlvr2.head,
                     dropout_rate=config.nlvr2.dropout_rate)


def make_train_iterator(config: ml_collections.ConfigDict, mesh: Mesh
                        ) -> input_pipeline.PretrainingIterator:
  """Endless, resumable batches of the nlvr2 table's `config.nlvr2.train_split`."""
  split = config.nlvr2.train_split
  examples = open_examples(config.data, config.model.name, split)
  return vqa.task_train_iterator(config, mesh, examples, split, TABLE,
                                 head=resolve_head(config.model.name, config.nlvr2.head))


def objectives(config: ml_collections.ConfigDict) -> list[str]:
  """One compiled step: the NLVR2 loss."""
  del config
  return ['nlvr2']


def make_inputs(config: ml_collections.ConfigDict, batch: Mapping[str, jax.Array],
                rng: jax.Array, objective: str
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Nlvr2Model kwargs (features widened to float32) and the labels [B]."""
  del config, rng, objective
  return model_inputs(batch), {'label': batch['label']}


def compute_losses(config: ml_collections.ConfigDict, outputs: Mapping[str, jax.Array],
                   targets: Mapping[str, jax.Array], objective: str
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean softmax cross-entropy over the two labels, and the batch's accuracy."""
  del config, objective
  logits, labels = outputs['logits'], targets['label']
  loss = mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  accuracy = mean((vqa.predict(logits) == labels).astype(jnp.float32))
  return loss, {'ce': loss, 'train_accuracy': accuracy}


def flops_per_example(config: ml_collections.ConfigDict,
                      input_specs: Mapping[str, jax.ShapeDtypeStruct], objective: str) -> float:
  """The design's backbone over both images, x3: two sequences for the paired
  heads, one with both images' regions for 'joint_linear' (the head on the
  pooled vectors is negligible)."""
  from vlpjax import flops  # pylint: disable=g-import-not-at-top
  del objective  # one
  text = input_specs['input_ids'].shape[1]
  regions = input_specs['left_region_feats'].shape[1]
  if resolve_head(config.model.name, config.nlvr2.head) == 'joint_linear':
    return flops.model_flops_per_example(config.model, text, 2 * regions, 0, components=())
  return 2 * flops.model_flops_per_example(config.model, text, regions, 0, components=())


def inference_files(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """The labels, one a line (label id order)."""
  del config
  return {vqa.ANSWERS_FILE: list(LABELS)}


def init_heads(config: ml_collections.ConfigDict, params: Mapping[str, Any],
               abstract_params: Mapping[str, Any]) -> Mapping[str, Any]:
  """After `init.source` gave the backbone: the head stays fresh, and the token
  type rows past the backbone's table start as copies of the left image's row
  of the loaded table, as UNITER's `init_type_embedding` (row 2 <- row 1). An
  'orbax:' source of this model's full params keeps its own rows."""
  if EXTRA_TYPES_NAME not in params:  # designs with no pair token types
    return params
  return vqa.init_extra_type_rows(config, params, abstract_params, EXTRA_TYPES_NAME,
                                  get_design(config.model.name).pair_image_token_types[0])


def make_evaluators(config: ml_collections.ConfigDict, model: Nlvr2Model, mesh: Mesh,
                    workdir: str) -> list[Nlvr2Evaluator]:
  """The `config.evals` entries (all of type 'nlvr2')."""
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  return common.build_evaluators(config, 'nlvr2', {EVAL_TYPE: Nlvr2Evaluator}, model, mesh,
                                 workdir)


class Nlvr2Predictor:
  """Judges sentences about pairs of images of your own features (`vlpjax.load`).

  Attributes:
    config: the run's config; model: the Nlvr2Model; params: its params (first
    device); step: the checkpoint's step.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, step: int | None):
    self.config = config
    self.design = get_design(config.model.name)
    self.tokenizer = vqa.run_tokenizer(config, workdir)
    # Inference is deterministic: the dropout rate changes nothing.
    self.model = build_model(config.model, head=config.nlvr2.head)
    image = vqa.blank_image(config)
    self.params, self.step, self._logits = vqa.restore_for_inference(
        self.model, self.inputs(['?'], image, image), workdir, step, 'logits')

  def inputs(self, sentences: Sequence[str], left: vqa.Image, right: vqa.Image
             ) -> dict[str, np.ndarray]:
    """Model inputs for `sentences` [S], each about the same `left` and `right`
    images (`vqa.Image`); the first `data.max_regions` regions of each are used."""
    batch = self.tokenizer.encode(list(sentences))
    for side, (features, boxes, image_size) in zip(SIDES, (left, right)):
      regions = vqa.image_regions(self.config, self.design, features, boxes, image_size,
                                  len(sentences))
      batch.update({f'{side}_{k}': v for k, v in regions.items()})
    return batch

  def judge(self, sentences: Sequence[str], left: vqa.Image, right: vqa.Image) -> list[str]:
    """'True' or 'False' for each sentence about the two images (see `inputs`)."""
    logits = self._logits(self.params, self.inputs(sentences, left, right))
    return [LABELS[int(i)] for i in np.asarray(vqa.predict(logits))]


def predictor(config: ml_collections.ConfigDict, workdir: str, step: int | None
              ) -> Nlvr2Predictor:
  """`vlpjax.load`'s object for an NLVR2 run: `judge(sentences, left, right)`."""
  return Nlvr2Predictor(config, workdir, step)
