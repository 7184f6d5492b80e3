"""VisualBERT (Li et al., 2019): one BERT stack over text followed by regions.

Single-stream, early fusion: `[CLS] text [SEP]` (padded to T) and the regions
(padded to R) run as one sequence of length T+R through a 12-layer BERT encoder
with a key mask built from `text_mask` and `region_mask`. Each region enters as
`Linear(feat)(F -> H) + region_position(0) + region_token_type(type)`, and the
joined sequence gets ONE LayerNorm + dropout (as HF `VisualBertEmbeddings`).

Param names follow `TextEmbeddings`/`TransformerLayer` so HF and BERT
checkpoints map one to one (see `vlpjax.checkpoints.hf`). Not supported: HF's
`image_text_alignment` (VCR visual position ids) and `bypass_transformer`.
"""
from __future__ import annotations

import functools
from typing import Any, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlpjax import flops
from vlpjax.models import design
from vlpjax.models import heads
from vlpjax.models import layers

TEXT_AXES = ('batch', 'length', 'embed')
VISION_AXES = ('batch', 'regions', 'embed')


class VisualBertEmbeddings(nn.Module):
  """Text and region embeddings joined under one LayerNorm and dropout.

  Submodules word_embeddings, position_embeddings, token_type_embeddings and
  norm are named as in `layers.TextEmbeddings` (so BERT weights load there);
  feature_projection is Dense(F -> H) on the region features; params
  region_position_embeddings [max_position_embeddings, H] and
  region_token_type_embeddings [type_vocab, H] (HF's visual_* tables).
  """
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  type_vocab_size: int
  special_visual_initialize: bool
  dropout_rate: float
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  def region_table(self, name: str, text_table: jax.Array, axes: layers.Axes) -> jax.Array:
    """A region table shaped like `text_table`; starts as its copy if asked."""
    if self.special_visual_initialize:
      init = nn.with_logical_partitioning(lambda *_: text_table.astype(self.param_dtype), axes)
    else:
      init = layers.normal_init(axes)
    return self.param(name, init, text_table.shape, self.param_dtype).astype(self.dtype)

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
               region_feats: jax.Array | None, visual_token_type_ids: jax.Array,
               deterministic: bool = True, position_ids: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """input_ids, token_type_ids: [B, T]; region_feats: [B, R, F];
    visual_token_type_ids: [B, R] -> ([B, T+R, H], word table [V', H], V' the
    padded vocabulary). region_feats None: the text alone, [B, T, H] (a
    decoding step, `position_ids` [1, T] its tokens' positions)."""
    embed = functools.partial(layers.Embed, dtype=self.dtype, param_dtype=self.param_dtype)
    if position_ids is None:
      position_ids = jnp.arange(input_ids.shape[1])[None, :]
    words, word_table = embed(layers.padded_vocab_size(self.vocab_size), self.hidden_size,
                              name='word_embeddings')(input_ids)
    positions, position_table = embed(
        self.max_position_embeddings, self.hidden_size, ('positions', 'embed'),
        name='position_embeddings')(position_ids)
    types, type_table = embed(self.type_vocab_size, self.hidden_size, ('types', 'embed'),
                              name='token_type_embeddings')(token_type_ids)
    norm = layers.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='norm')
    if region_feats is None:
      x = norm(words + positions + types)
      return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic), word_table
    region_positions = self.region_table('region_position_embeddings', position_table,
                                         ('positions', 'embed'))
    region_types = self.region_table('region_token_type_embeddings', type_table,
                                     ('types', 'embed'))
    regions = layers.Dense(self.hidden_size, ('feature', 'embed'), dtype=self.dtype,
                           param_dtype=self.param_dtype, name='feature_projection')(region_feats)
    # Every region has visual position id 0 (HF without image_text_alignment).
    regions = (regions + region_positions[0]
               + jnp.take(region_types, visual_token_type_ids, axis=0))
    x = norm(jnp.concatenate([words + positions + types, regions], axis=1))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return x, word_table


class VisualBert(nn.Module):
  """VisualBERT backbone (HF `VisualBertModel`).

  `visual_token_type` is the token type of every region unless the call passes
  `visual_token_type_ids`: 1 as in HF (so HF checkpoints behave as trained);
  the original code uses 0 (NLVR2: 0 for the left image, 1 for the right).
  `special_visual_initialize` starts the region position/type tables as copies
  of the text tables (HF default True).

  Submodules: embeddings (`VisualBertEmbeddings`), layer_{i} (TransformerLayer),
  pooler (tanh on [CLS]).
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  feature_dim: int = 2048
  visual_token_type: int = 1
  special_visual_initialize: bool = True
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention_impl: str = 'auto'
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  remat: bool = False
  scan_layers: bool = False  # each stack of repeated layers as one nn.scan (layers.layer_stack)
  float32_logits: bool = False  # the MLM head's logits in float32 (heads only)


  @nn.compact
  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, region_feats: jax.Array,
               region_loc: jax.Array, region_mask: jax.Array,
               token_type_ids: jax.Array | None = None, deterministic: bool = True,
               return_attention: bool = False,
               visual_token_type_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None,
               decoding: layers.Decoding | None = None) -> dict[str, Any]:
    """Runs the joint stack.

    Args:
      input_ids: [B, T] int; text_mask: [B, T] (1 = real token).
      region_feats: [B, R, F]; region_loc: [B, R, L], unused (VisualBERT has no
        box input); region_mask: [B, R] (1 = real region).
      token_type_ids: [B, T] (default 0).
      visual_token_type_ids: [B, R] (default `visual_token_type`).
      attention_mask: [B, T+R, T+R] or None, 1 where a query of [text; regions]
        may attend to a key of [text; regions] (the joint sequence's own order),
        ANDed with text_mask/region_mask in every layer (see `layers`).
      decoding: the KV cache for captioning (`layers.Decoding`): the prefill
        caches every layer's keys/values over [text; regions]; a step embeds
        only the new tokens and returns 'text' and 'word_embeddings'.

    Returns:
      dict with 'text' [B, T, H], 'vision' [B, R, H] (the region part of the
      joint sequence), 'pooled' [B, H] (tanh on [CLS]), 'word_embeddings'
      [V, H] and, if `return_attention`, 'attention' in the schema of
      `layers.ATTENTION_STREAMS`: {'joint/layer_i': float32 [B, N, T+R, T+R]}.
    """
    del region_loc
    layers.check_inputs(input_ids, region_feats, feature_dim=self.feature_dim,
                        max_position_embeddings=self.max_position_embeddings)
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    num_text = text_mask.shape[1]  # the cached layout's text slots in a decoding step
    step = layers.is_step(decoding)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if visual_token_type_ids is None:
      visual_token_type_ids = jnp.full(region_mask.shape, self.visual_token_type, jnp.int32)
    # A step embeds the new tokens only: the regions' keys and values are in the cache.
    x, word_table = VisualBertEmbeddings(
        self.vocab_size, self.hidden_size, self.max_position_embeddings,
        self.type_vocab_size, self.special_visual_initialize, self.dropout_rate,
        dtype=dtype, param_dtype=param_dtype, name='embeddings')(
            input_ids, token_type_ids, None if step else region_feats, visual_token_type_ids,
            deterministic,
            decoding.position_ids(input_ids.shape[1]) if decoding is not None else None)
    attention_mask = layers.check_attention_mask(attention_mask, input_ids.shape[0], num_text,
                                                 region_feats.shape[1], decoding)
    mask = jnp.concatenate([text_mask, region_mask], axis=1)
    x, attention = layers.joint_layers(self, x, mask, deterministic, return_attention and not step,
                                       attention_mask, decoding)
    if step:
      return dict(text=x, word_embeddings=word_table)
    outputs = dict(
        text=layers.constrain(x[:, :num_text], TEXT_AXES),
        vision=layers.constrain(x[:, num_text:], VISION_AXES),
        pooled=layers.Pooler(self.hidden_size, dtype=dtype, param_dtype=param_dtype,
                             name='pooler')(x),
        word_embeddings=word_table)
    if return_attention:
      outputs['attention'] = attention
    return outputs


class VisualBertForPreTraining(VisualBert):
  """Backbone (submodule `backbone`) + MLM and sentence-image heads.

  'sentence_image_logits' [B, 2]: label 1 = the caption matches (original code;
  HF's docs claim the reverse). Submodules: backbone, mlm_head (tied to the
  word table), sentence_image_head.
  """

  @nn.compact
  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, region_feats: jax.Array,
               region_loc: jax.Array, region_mask: jax.Array, mlm_positions: jax.Array,
               token_type_ids: jax.Array | None = None, deterministic: bool = True,
               return_attention: bool = False,
               visual_token_type_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> dict[str, Any]:
    """Backbone arguments plus mlm_positions [B, P] (text positions to predict).

    Returns the backbone dict plus 'mlm_logits' [B, P, V] and
    'sentence_image_logits' [B, 2].
    """
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    outputs = VisualBert(**layers.backbone_fields(self, VisualBert), name='backbone')(
        input_ids, text_mask, region_feats, region_loc, region_mask, token_type_ids,
        deterministic, return_attention, visual_token_type_ids=visual_token_type_ids,
        attention_mask=attention_mask)
    outputs['mlm_logits'] = heads.MaskedLMHead(
        self.vocab_size, dtype=dtype, param_dtype=param_dtype,
        float32_logits=self.float32_logits, name='mlm_head')(
        outputs['text'], mlm_positions, outputs['word_embeddings'])
    outputs['sentence_image_logits'] = layers.Dense(
        2, ('embed', None), dtype=dtype, param_dtype=param_dtype,
        name='sentence_image_head')(outputs['pooled'])
    return outputs


def bert_text_paths(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Where BERT's embeddings, layers and pooler sit in the backbone params."""
  return dict(embeddings='embeddings',
              layers=[f'layer_{i}' for i in range(model_config.num_layers)],
              pooler='pooler')


MODEL = VisualBert
PRETRAINING = VisualBertForPreTraining


def after_bert_import(backbone_params: Any, model_config: ml_collections.ConfigDict) -> Any:
  """The original's `special_visual_initialize` after BERT's text weights load.

  uclanlp/visualbert copies the (loaded) BERT position and token-type tables into
  the visual (region) ones once BERT is in place;
  `VisualBertEmbeddings.region_table` copies them at init, i.e. from the random
  tables, so `hf.import_bert` calls this to copy them again from the loaded
  ones. A no-op unless `model_config.special_visual_initialize` (as
  `region_table` decides).

  Args:
    backbone_params: the backbone params (unboxed) with BERT's text weights loaded.
    model_config: the VisualBERT model config.

  Returns:
    `backbone_params` with `region_position_embeddings` and
    `region_token_type_embeddings` replaced by copies of the text tables.
  """
  if not model_config.get('special_visual_initialize',
                          VisualBert.special_visual_initialize):
    return backbone_params
  path = bert_text_paths(model_config)['embeddings']
  embeddings = dict(backbone_params[path])
  for region, text in (('region_position_embeddings', 'position_embeddings'),
                       ('region_token_type_embeddings', 'token_type_embeddings')):
    table = embeddings[text]['embedding']
    if table.shape != embeddings[region].shape:
      raise ValueError(f'{path}/{region} has shape {embeddings[region].shape}, '
                       f'{path}/{text} {table.shape}: cannot copy')
    embeddings[region] = table.astype(embeddings[region].dtype)  # astype copies
  return {**backbone_params, path: embeddings}


def forward_flops(model: ml_collections.ConfigDict, text_len: int, regions: int,
                  mlm_predictions: int, components: Collection[str] | None = None) -> float:
  """`VisualBertForPreTraining`: one stack over text + regions, and the MLM and
  sentence-image heads that `components` use (None: both)."""
  h = model.hidden_size
  uses = functools.partial(flops.uses, components)
  return (flops.dense(regions, model.feature_dim, h)
          + model.num_layers * flops.bert_layer(text_len + regions, h, model.intermediate_size)
          + uses('mlm') * flops.mlm_head(mlm_predictions, h,
                                         layers.padded_vocab_size(model.vocab_size))
          + uses('sentence_image') * flops.pooler_and_matching(h))


DESIGN = design.Design(
    name='visualbert', model=VisualBert, pretraining=VisualBertForPreTraining,
    location_features=lambda corners: corners, loc_dim=4,
    # Two sentences per input (`[CLS] a [SEP] b [SEP]`): the original's 128 word
    # pieces; the embedded world's sentences fit 40.
    mlm_head='mlm_head',
    matching_head='sentence_image_head',
    matched_label=1, pairing=design.SECOND_CAPTION, max_text_len=128, world_text_len=40,
    recipe=design.PretrainingRecipe(
        components=('mlm', 'sentence_image'), default_tasks=('mlm', 'sentence_image'),
        mix='sum', mask_regions=None),
    forward_flops=forward_flops,
    optimizer=dict(learning_rate=5e-5, warmup_fraction=0.1, num_steps=100_000,
                   adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6, weight_decay=0.01,
                   grad_clip_norm=1.0),
    decays=design.no_bias_name_decays, bert_text_paths=bert_text_paths,
    after_bert_import=after_bert_import,
    # The original's NLVR2: one sequence, the left image's regions type 0, the right's 1.
    pair_image_token_types=(0, 1))
