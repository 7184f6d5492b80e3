"""ViLBERT (Lu et al., 2019): two streams joined by co-attention (Co-TRM) layers.

Follows facebookresearch/vilbert-multi-task `vilbert/vilbert.py` (see shared
MODELS.md). The text stream is BERT; the vision (region) stream has its own width
(`v_hidden_size`), heads and FFN; Co-TRM layer k lets each stream attend to the
other at width `bi_hidden_size` (no self-attention inside a Co-TRM), then each
stream has its own output dense + residual LayerNorm and its own FFN.

Layer schedule: for each pair (v_id, t_id) of `zip(v_biattention_id,
t_biattention_id)`, run the text layers up to t_id and the vision layers up to
v_id, then the next Co-TRM; afterwards the remaining vision and text layers (the
streams are independent between Co-TRMs, so only the order across a Co-TRM
matters).
With the published 6/6 config ([0..5], [6..11]) text layers 0-5 run first, the
vision stream enters Co-TRM 0 straight from its embeddings, then five rounds of
(text layer 6+i, vision layer i, Co-TRM i+1), then vision layer 5 and text layer 11.

As in the original: text position ids are always arange(T), the co-attention
masks are the two streams' key masks (the original's separate
`co_attention_mask` is ignored by its code), region 0 is the [IMG] token
(prepared by the data pipeline: mean feature, box [0, 0, 1, 1, 1]), and the
unused `q_dense` weights of the original checkpoints do not exist here.
"""
from __future__ import annotations

import functools
from typing import Any, Collection, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlpjax import flops
from vlpjax.models import design
from vlpjax.models import heads
from vlpjax.models import layers
from vlpjax.objectives import masking

LOC_DIM = 5  # [x1, y1, x2, y2, area], normalised by the image size


class RegionEmbeddings(nn.Module):
  """`LN(Linear(F -> Hv)(feat) + Linear(5 -> Hv)(loc))` then dropout.

  Submodules: feature_projection, location_projection, norm.
  """
  hidden_size: int
  dropout_rate: float = 0.1
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, region_feats: jax.Array, region_loc: jax.Array,
               deterministic: bool = True) -> jax.Array:
    """region_feats: [B, R, F]; region_loc: [B, R, 5] -> [B, R, Hv]."""
    if region_loc.shape[-1] != LOC_DIM:
      raise ValueError(f'ViLBERT region_loc must be [B, R, {LOC_DIM}] '
                       f'([x1, y1, x2, y2, area] normalised), got {region_loc.shape}')
    dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    x = (dense(self.hidden_size, ('feature', 'embed'), name='feature_projection')(
        region_feats.astype(self.dtype)) +
         dense(self.hidden_size, ('loc', 'embed'), name='location_projection')(
             region_loc.astype(self.dtype)))
    x = layers.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='norm')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return layers.constrain(x, ('batch', 'regions', 'embed'))


class CoAttentionLayer(nn.Module):
  """A Co-TRM block (`BertConnectionLayer`): cross-attention both ways, then FFNs.

  Both attentions read the block's inputs. Submodules: text_to_vision_attention
  (text queries over region keys), vision_to_text_attention (region queries over
  text keys), text_ffn, vision_ffn. The attention-mask blocks (position 5, after
  the static deterministic/return_probs) are traced under `layers.maybe_remat`.
  """
  bi_hidden_size: int
  bi_num_heads: int
  intermediate_size: int
  v_intermediate_size: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  attention_impl: str = 'xla'
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, streams: tuple[jax.Array, jax.Array],
               masks: tuple[jax.Array, jax.Array], deterministic: bool = True,
               return_probs: bool = False,
               attention_masks: dict[str, jax.Array | None] | None = None,
               decoding: layers.Decoding | None = None
               ) -> tuple[tuple[jax.Array, jax.Array], dict[str, jax.Array | None]]:
    """streams: (text [B, T, Ht], vision [B, R, Hv]); masks: ([B, T], [B, R]) key
    masks; attention_masks: `layers.attention_mask_blocks` of a full mask (this
    block reads 'text_to_vision' [B, T, R] and 'vision_to_text' [B, R, T]) or None.
    decoding: the KV cache (`layers.Decoding`) of the text->vision attention; a
    step takes (new tokens [B, Q, Ht], None) and returns (text, None).

    Returns ((text [B, T, Ht], vision [B, R, Hv]), {'text_to_vision':
    [B, N, T, R] or None, 'vision_to_text': [B, N, R, T] or None}).
    """
    text, vision = streams
    text_mask, vision_mask = masks
    blocks = attention_masks or {}
    attention = functools.partial(
        layers.Attention, self.bi_num_heads, self.bi_hidden_size,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype)
    ffn = functools.partial(layers.FeedForward, dropout_rate=self.dropout_rate,
                            dtype=self.dtype, param_dtype=self.param_dtype)
    new_text, text_to_vision = attention(name='text_to_vision_attention')(
        text, vision, vision_mask, deterministic, return_probs, blocks.get('text_to_vision'),
        decoding)
    new_text = ffn(self.intermediate_size, name='text_ffn')(new_text, deterministic)
    if layers.is_step(decoding):  # the regions' keys are cached, the vision side final
      return (layers.constrain(new_text, ('batch', 'length', 'embed')), None), {}
    new_vision, vision_to_text = attention(name='vision_to_text_attention')(
        vision, text, text_mask, deterministic, return_probs, blocks.get('vision_to_text'))
    new_vision = ffn(self.v_intermediate_size, name='vision_ffn')(new_vision, deterministic)
    return ((layers.constrain(new_text, ('batch', 'length', 'embed')),
             layers.constrain(new_vision, ('batch', 'regions', 'embed'))),
            dict(text_to_vision=text_to_vision, vision_to_text=vision_to_text))


VISION_AXES = ('batch', 'regions', 'embed')


def layer_schedule(num_layers: int, v_num_layers: int, v_biattention_id: Sequence[int],
                   t_biattention_id: Sequence[int]) -> list[tuple[str, int]]:
  """The order the original runs layers in: [('text'|'vision'|'co', index), ...],
  each entry naming the layer `f'{kind}_layer_{index}'`."""
  if len(v_biattention_id) != len(t_biattention_id):
    raise ValueError(f'ViLBERT v_biattention_id {list(v_biattention_id)} and '
                     f't_biattention_id {list(t_biattention_id)} must pair up (same length)')
  for name, ids, count in (('v_biattention_id', v_biattention_id, v_num_layers),
                           ('t_biattention_id', t_biattention_id, num_layers)):
    if list(ids) != sorted(ids) or any(not 0 <= i <= count for i in ids):
      raise ValueError(f'ViLBERT {name} must be ascending layer ids in [0, {count}], '
                       f'got {list(ids)}')
  schedule, v_start, t_start = [], 0, 0
  for k, (v_end, t_end) in enumerate(zip(v_biattention_id, t_biattention_id)):
    schedule += [('text', i) for i in range(t_start, t_end)]
    schedule += [('vision', i) for i in range(v_start, v_end)]
    schedule.append(('co', k))
    v_start, t_start = v_end, t_end
  schedule += [('vision', i) for i in range(v_start, v_num_layers)]
  schedule += [('text', i) for i in range(t_start, num_layers)]
  return schedule


def layer_runs(schedule: Sequence[tuple[str, int]]) -> list[tuple[str, int, int]]:
  """`layer_schedule` as runs of consecutive layers of one kind: [(kind, first
  index, count), ...]."""
  runs = []
  for kind, index in schedule:
    if runs and runs[-1][0] == kind and runs[-1][1] + runs[-1][2] == index:
      runs[-1] = (kind, runs[-1][1], runs[-1][2] + 1)
    else:
      runs.append((kind, index, 1))
  return runs


Segment = tuple[tuple[str, int, int], ...]  # layer runs (kind, first, count)


def repeated_segments(runs: Sequence[tuple[str, int, int]]) -> list[tuple[Segment, int]]:
  """The runs cut after each Co-TRM into segments, consecutive segments of the
  same shape (the same kinds and counts) grouped: [(first segment, repeats)].
  ViLBERT-base: ([text 0-5, co 0], 1), ([text 6, vision 0, co 1], 5),
  ([vision 5, text 11], 1)."""
  segments, current = [], []
  for run in runs:
    current.append(run)
    if run[0] == 'co':
      segments.append(tuple(current))
      current = []
  if current:
    segments.append(tuple(current))
  shape = lambda segment: tuple((kind, count) for kind, _, count in segment)
  grouped = []
  for segment in segments:
    if grouped and shape(grouped[-1][0]) == shape(segment) and _shifted(
        grouped[-1][0], grouped[-1][1]) == segment:
      grouped[-1] = (grouped[-1][0], grouped[-1][1] + 1)
    else:
      grouped.append((segment, 1))
  return grouped


def _stride(segment: Segment, stream: str) -> int:
  """How far a stream's layer indices move from one repeat of `segment` to the
  next: its layers in the segment (a Co-TRM's attentions count Co-TRMs)."""
  kind = 'co' if stream in ('text_to_vision', 'vision_to_text') else stream
  return sum(count for k, _, count in segment if k == kind)


def _shifted(segment: Segment, repeats: int) -> Segment:
  """`segment` `repeats` repeats later: each run's first layer moved on by its kind's count."""
  return tuple((kind, first + repeats * _stride(segment, kind), count)
               for kind, first, count in segment)


def run_segment(segment: Segment, streams: tuple[jax.Array, jax.Array | None],
                masks: tuple[jax.Array, jax.Array], rest: tuple[Any, Any], *,
                layer_kwargs: dict[str, dict[str, Any]], deterministic: bool,
                return_probs: bool, remat: bool, step: bool, scan_first: bool = False
                ) -> tuple[tuple[jax.Array, jax.Array | None], dict[tuple[str, int], Any]]:
  """Runs a segment's layers (submodules `{kind}_layer_{i}`, called in a compact
  method) on (text, vision): ((text, vision), {(stream, layer index): probs}).

  scan_first: a run from layer 0 of a stream is one scanned `{kind}_layers`
  (`layers.layer_stack`). In a decoding step the vision layers are skipped.
  """
  (text, vision), (text_mask, region_mask), (blocks, decoding) = streams, masks, rest
  attention = {}
  for kind, first, count in segment:
    if kind == 'co':
      (text, vision), probs = layers.maybe_remat(CoAttentionLayer, remat)(
          **layer_kwargs['co'], name=f'co_layer_{first}')(
              (text, vision), (text_mask, region_mask), deterministic, return_probs,
              blocks, decoding)
      attention.update({(stream, first): value for stream, value in probs.items()})
      continue
    if kind == 'vision' and step:
      continue
    stack = functools.partial(
        layers.layer_stack, layers.TransformerLayer, layer_kwargs[kind], count, f'{kind}_layer',
        deterministic=deterministic, return_probs=return_probs, remat=remat,
        scan=scan_first and first == 0 and count > 1, first=first)
    if kind == 'text':
      text, probs = stack(text, text_mask, (blocks['text'], decoding))
    else:
      vision, probs = stack(vision, region_mask, (blocks['vision'],),
                            after_each=lambda v: layers.constrain(v, VISION_AXES))
    attention.update({(kind, first + i): p for i, p in enumerate(probs)})
  return (text, vision), attention


class SegmentStep(nn.Module):
  """One repeat of a segment under `nn.scan` (`model.scan_layers`): its layers
  are the first repeat's submodules, their params stacked over the repeats
  (`layers.layers_like` reads the stride from the names)."""
  segment: Segment
  layer_kwargs: Any
  deterministic: bool
  return_probs: bool
  remat: bool
  step: bool

  @nn.compact
  def __call__(self, streams: Any, masks: Any, rest: Any) -> tuple[Any, Any]:
    return run_segment(self.segment, streams, masks, rest, layer_kwargs=self.layer_kwargs,
                       deterministic=self.deterministic, return_probs=self.return_probs,
                       remat=self.remat, step=self.step)


class VilbertFields(nn.Module):
  """The fields of `configs/vilbert.py:model_config` (less `name`), shared by the
  backbone and the pretraining model."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  feature_dim: int
  v_hidden_size: int
  v_num_layers: int
  v_num_heads: int
  v_intermediate_size: int
  bi_hidden_size: int
  bi_num_heads: int
  v_biattention_id: Sequence[int]
  t_biattention_id: Sequence[int]
  num_region_classes: int  # used by the pretraining heads only
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention_impl: str = 'xla'
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  remat: bool = False
  scan_layers: bool = False  # each stack of repeated layers as one nn.scan (layers.layer_stack)
  float32_logits: bool = False  # the MLM head's logits in float32 (heads only)


class Vilbert(VilbertFields):
  """ViLBERT backbone (the original `BertModel`). See the module docstring.

  Submodules: embeddings (TextEmbeddings), region_embeddings (RegionEmbeddings),
  text_layer_{i}, vision_layer_{i} (TransformerLayer), co_layer_{k}
  (CoAttentionLayer), text_pooler, vision_pooler (ReLU, -> bi_hidden_size).
  """

  @nn.compact
  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, region_feats: jax.Array,
               region_loc: jax.Array, region_mask: jax.Array,
               token_type_ids: jax.Array | None = None, deterministic: bool = True,
               return_attention: bool = False,
               attention_mask: jax.Array | None = None,
               decoding: layers.Decoding | None = None) -> dict[str, jax.Array]:
    """Encodes the two streams.

    Args:
      input_ids: [B, T] int, [CLS] ... [SEP] padded with 0.
      text_mask: [B, T], 1 on real tokens.
      region_feats: [B, R, F]; region 0 is the [IMG] token (mean of the real regions).
      region_loc: [B, R, 5] [x1, y1, x2, y2, area] normalised; [IMG] is [0, 0, 1, 1, 1].
      region_mask: [B, R], 1 on [IMG] and the real regions.
      token_type_ids: [B, T] (default 0).
      deterministic: no dropout when True.
      return_attention: also return attention probabilities per layer.
      attention_mask: [B, T+R, T+R] or None over [text; regions] (region 0 the
        [IMG] token), ANDed with the key masks: [:T, :T] in the text layers,
        [T:, T:] in the vision layers, [:T, T:] / [T:, :T] in the Co-TRMs'
        text_to_vision / vision_to_text attention.
      decoding: the KV cache for captioning (`layers.Decoding`): the prefill
        caches the text layers' and the Co-TRMs' text->vision keys/values; a
        step runs the text side on the new tokens only (the vision stream is
        final) and returns 'text' and 'word_embeddings'.

    Returns:
      dict with 'text' [B, T, Ht], 'vision' [B, R, Hv], 'pooled' [B, bi]
      (text_pooled * image_pooled), 'text_pooled' and 'image_pooled' [B, bi],
      'word_embeddings' [V, Ht] and, if asked, 'attention' in the schema of
      `layers.ATTENTION_STREAMS` (float32): 'text/layer_i' [B, N, T, T] (text
      layer i), 'vision/layer_i' [B, v_N, R, R] (vision layer i),
      'text_to_vision/layer_k' [B, bi_N, T, R] and 'vision_to_text/layer_k'
      [B, bi_N, R, T] (Co-TRM k).
    """
    if region_feats.shape[-1] != self.feature_dim:
      raise ValueError(f'ViLBERT feature_dim is {self.feature_dim} but region_feats has '
                       f'shape {region_feats.shape}')
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    num_text = text_mask.shape[1]  # the cached layout's text slots in a decoding step
    step = layers.is_step(decoding)
    attention_mask = layers.check_attention_mask(attention_mask, input_ids.shape[0], num_text,
                                                 region_feats.shape[1], decoding)
    blocks = layers.attention_mask_blocks(attention_mask, num_text)
    text, word_table = layers.TextEmbeddings(
        self.vocab_size, self.hidden_size, self.max_position_embeddings,
        self.type_vocab_size, self.dropout_rate, dtype=dtype, param_dtype=param_dtype,
        name='embeddings')(
            input_ids, token_type_ids,
            decoding.position_ids(input_ids.shape[1]) if decoding is not None else None,
            deterministic)
    vision = None  # a decoding step leaves the (final) vision stream out
    if not step:
      vision = RegionEmbeddings(self.v_hidden_size, self.dropout_rate, dtype=dtype,
                                param_dtype=param_dtype, name='region_embeddings')(
                                    region_feats, region_loc, deterministic)

    common = dict(dropout_rate=self.dropout_rate,
                  attention_dropout_rate=self.attention_dropout_rate,
                  attention_impl=self.attention_impl, dtype=dtype, param_dtype=param_dtype)
    layer_kwargs = dict(
        text=dict(num_heads=self.num_heads, intermediate_size=self.intermediate_size, **common),
        vision=dict(num_heads=self.v_num_heads, intermediate_size=self.v_intermediate_size,
                    **common),
        co=dict(bi_hidden_size=self.bi_hidden_size, bi_num_heads=self.bi_num_heads,
                intermediate_size=self.intermediate_size,
                v_intermediate_size=self.v_intermediate_size, **common))
    # The cache is written inside the layers: no remat around them when decoding.
    run = dict(layer_kwargs=layer_kwargs, deterministic=deterministic,
               return_probs=return_attention, remat=self.remat and decoding is None, step=step)
    streams, masks, rest = (text, vision), (text_mask, region_mask), (blocks, decoding)
    attention = {}
    for segment, repeats in repeated_segments(layer_runs(layer_schedule(
        self.num_layers, self.v_num_layers, self.v_biattention_id, self.t_biattention_id))):
      if self.scan_layers and repeats > 1:
        streams, probs = layers.scanned(SegmentStep, repeats)(
            segment, **run, name=f'co_layer_{segment[-1][1]}_blocks')(streams, masks, rest)
        for (stream, index), value in probs.items():
          for i in range(repeats):  # repeat i runs the segment's layers i strides on
            attention[layers.attention_key(stream, index + i * _stride(segment, stream))] = (
                None if value is None else value[i])
        continue
      for i in range(repeats):
        streams, probs = run_segment(_shifted(segment, i), streams, masks, rest, **run,
                                     scan_first=self.scan_layers)
        attention.update({layers.attention_key(*key): v for key, v in probs.items()})
    text, vision = streams
    if step:
      return dict(text=text, word_embeddings=word_table)

    pooler = functools.partial(layers.Pooler, self.bi_hidden_size, nn.relu, dtype=dtype,
                               param_dtype=param_dtype)
    text_pooled = pooler(name='text_pooler')(text)
    image_pooled = pooler(name='vision_pooler')(vision)  # on region 0, the [IMG] token
    outputs = dict(text=text, vision=vision, pooled=text_pooled * image_pooled,
                   text_pooled=text_pooled, image_pooled=image_pooled,
                   word_embeddings=word_table)
    if return_attention:
      outputs['attention'] = attention
    return outputs


class VilbertPreTraining(VilbertFields):
  """ViLBERT with the heads of the original `BertForMultiModalPreTraining`.

  Submodules: backbone (Vilbert), mlm (MaskedLMHead tied to the word table),
  alignment (Dense on dropout(pooled) -> 2, label 0 = aligned), region_head
  (ClassifierHead over every region output -> num_region_classes).
  """

  def setup(self):
    self.backbone = Vilbert(**layers.backbone_fields(self, VilbertFields))
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    self.mlm = heads.MaskedLMHead(self.vocab_size, dtype=dtype, param_dtype=param_dtype,
                                  float32_logits=self.float32_logits)
    self.pooled_dropout = nn.Dropout(self.dropout_rate)
    self.alignment = layers.Dense(2, ('embed', None), dtype=dtype, param_dtype=param_dtype)
    self.region_head = heads.ClassifierHead(self.num_region_classes, self.v_hidden_size,
                                            dtype=dtype, param_dtype=param_dtype)

  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, region_feats: jax.Array,
               region_loc: jax.Array, region_mask: jax.Array, mlm_positions: jax.Array,
               token_type_ids: jax.Array | None = None, deterministic: bool = True,
               return_attention: bool = False,
               attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Backbone outputs plus 'mlm_logits' [B, P, V] at `mlm_positions` [B, P],
    'alignment_logits' [B, 2] (0 = aligned) and 'region_logits'
    [B, R, num_region_classes] (region 0, the [IMG] token, included).
    `attention_mask` [B, T+R, T+R] goes to the backbone (see `Vilbert.__call__`)."""
    outputs = self.backbone(input_ids, text_mask, region_feats, region_loc, region_mask,
                            token_type_ids, deterministic, return_attention, attention_mask)
    pooled = self.pooled_dropout(outputs['pooled'], deterministic=deterministic)
    return dict(
        outputs,
        mlm_logits=self.mlm(outputs['text'], mlm_positions, outputs['word_embeddings']),
        alignment_logits=self.alignment(pooled),
        region_logits=self.region_head(outputs['vision']))


def bert_text_paths(model_config) -> dict:
  """Where BERT's text weights go in the backbone params (for BERT init). The
  ReLU text pooler maps to bi_hidden_size, so BERT's pooler does not fit it."""
  return dict(embeddings='embeddings',
              layers=[f'text_layer_{i}' for i in range(model_config.num_layers)])


MODEL = Vilbert
PRETRAINING = VilbertPreTraining


def location_features(corners: np.ndarray) -> np.ndarray:
  """[B, S, 4] normalised (x1, y1, x2, y2) -> [B, S, 5] with the area fraction."""
  wh = corners[..., 2:] - corners[..., :2]
  return np.concatenate([corners, wh[..., :1] * wh[..., 1:]], -1)


def fill_image_slot(feats: np.ndarray, loc: np.ndarray, mask: np.ndarray,
                    count: np.ndarray) -> None:
  """The [IMG] slot 0 (in place): the mean of the real regions, location
  [0, 0, 1, 1, 1], no labels. Summed in float32 (then stored in feats' dtype);
  the ViLBERT region masking recomputes it on the device whenever it masks."""
  feats[:, 0] = feats[:, 1:].sum(1, dtype=np.float32) / np.maximum(count, 1)[:, None]
  loc[:, 0] = [0, 0, 1, 1, 1]
  mask[:, 0] = True


def forward_flops(model: ml_collections.ConfigDict, text_len: int, regions: int,
                  mlm_predictions: int, components: Collection[str] | None = None) -> float:
  """`VilbertPreTraining`: text and image streams, co-attention layers, and the
  MLM, region and alignment heads that `components` use (None: all)."""
  t, r, h, ffn = text_len, regions, model.hidden_size, model.intermediate_size
  hv, bi = model.v_hidden_size, model.bi_hidden_size
  co_layer = (flops.cross_attention(t, h, r, hv, bi, h)
              + flops.cross_attention(r, hv, t, h, bi, hv)
              + 2 * flops.dense(t, h, ffn) + 2 * flops.dense(r, hv, model.v_intermediate_size))
  uses = functools.partial(flops.uses, components)
  heads = (uses('mlm') * flops.mlm_head(mlm_predictions, h,
                                        layers.padded_vocab_size(model.vocab_size))
           + uses('region_kl') * (flops.dense(r, hv, hv)
                                  + flops.dense(r, hv, model.num_region_classes))
           + uses('alignment') * (flops.dense(1, h, bi) + flops.dense(1, hv, bi)
                                  + flops.dense(1, bi, 2)))
  return (flops.dense(r, model.feature_dim, hv) + flops.dense(r, LOC_DIM, hv)
          + model.num_layers * flops.bert_layer(t, h, ffn)
          + model.v_num_layers * flops.bert_layer(r, hv, model.v_intermediate_size)
          + len(model.v_biattention_id) * co_layer + heads)


DESIGN = design.Design(
    name='vilbert', model=Vilbert, pretraining=VilbertPreTraining,
    location_features=location_features, loc_dim=LOC_DIM, needs_class_probs=True,
    leading_slots=1, fill_leading_slots=fill_image_slot,
    matching_head='alignment',
    matched_label=0, pairing=design.REPLACE_CAPTION, max_text_len=36, world_text_len=20,
    recipe=design.PretrainingRecipe(
        components=('mlm', 'region_kl', 'alignment'),
        default_tasks=('mlm', 'region_kl', 'alignment'), mix='sum',
        skip_first_region=True, mask_regions=masking.vilbert_mask_regions),
    forward_flops=forward_flops,
    optimizer=dict(learning_rate=1e-4, warmup_fraction=0.1, num_steps=100_000,
                   adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6, weight_decay=0.01,
                   grad_clip_norm=1.0),
    decays=design.no_bias_name_decays, bert_text_paths=bert_text_paths)
