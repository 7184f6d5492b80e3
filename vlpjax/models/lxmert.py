"""LXMERT (Tan & Bansal, 2019): two streams joined by cross-modality layers.

Order: text embeddings and region embeddings; all language layers on the text
(`text_layer_{i}`); all object-relationship layers on the regions
(`vision_layer_{i}`); then the cross layers (`cross_layer_{k}`), each
running cross-attention (ONE module shared by both directions, as the original),
then per-modality self-attention, then per-modality FFN. Pooler: tanh on the
text [CLS] after the cross layers. Regions have no position or type
embedding: `(LN(Linear(feat)) + LN(Linear(box))) / 2` + dropout, boxes being
(x1, y1, x2, y2) divided by the image width/height.

Param names map one to one onto HF `LxmertModel`/`LxmertForPreTraining`
(see `vlpjax.checkpoints.hf`); the text layers are BERT-shaped
`TransformerLayer`s, so BERT weights load into them.
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
from vlpjax.objectives import masking

TEXT_AXES = ('batch', 'length', 'embed')
VISION_AXES = ('batch', 'regions', 'embed')


class RegionEmbeddings(nn.Module):
  """`(LN(Dense(feat)) + LN(Dense(box))) / 2` + dropout: [B, R, F], [B, R, 4] -> [B, R, H].

  Submodules: feature_projection, feature_norm, location_projection, location_norm.
  """
  hidden_size: int
  dropout_rate: float
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, region_feats: jax.Array, region_loc: jax.Array,
               deterministic: bool = True) -> jax.Array:
    dense = functools.partial(layers.Dense, self.hidden_size, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    norm = functools.partial(layers.LayerNorm, dtype=self.dtype, param_dtype=self.param_dtype)
    feats = norm(name='feature_norm')(
        dense(('feature', 'embed'), name='feature_projection')(region_feats))
    boxes = norm(name='location_norm')(
        dense(('loc', 'embed'), name='location_projection')(region_loc))
    x = nn.Dropout(self.dropout_rate)((feats + boxes) / 2, deterministic=deterministic)
    return layers.constrain(x, VISION_AXES)


class CrossLayer(nn.Module):
  """One cross-modality layer (HF `LxmertXLayer`).

  Submodules: cross_attention (ONE module whose weights both directions,
  text_to_vision and vision_to_text, share, as the original's
  `visual_attention`), text_self_attention, vision_self_attention, text_ffn,
  vision_ffn. Streams and masks come as pairs so that `layers.maybe_remat`
  (static deterministic/return_probs at positions 3 and 4) applies; the
  attention-mask blocks (position 5) are traced.
  """
  num_heads: int
  intermediate_size: int
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
               ) -> tuple[tuple[jax.Array, jax.Array], dict[str, jax.Array] | None]:
    """streams: (text [B, T, H], vision [B, R, H]); masks: ([B, T], [B, R]) key
    masks; attention_masks: `layers.attention_mask_blocks` of a full mask (or None).
    decoding: the KV cache (`layers.Decoding`) of the text side's attentions;
    a step takes (new tokens [B, Q, H], None) and returns (text, None).

    Returns ((text, vision), probs) with probs (if asked) keyed by stream:
    'text_to_vision' [B, N, T, R], 'vision_to_text' [B, N, R, T], 'text'
    [B, N, T, T], 'vision' [B, N, R, R] (self-attentions).
    """
    text, vision = streams
    text_mask, vision_mask = masks
    blocks = attention_masks or {}
    attention = functools.partial(
        layers.Attention, self.num_heads, text.shape[-1], dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype)
    ffn = functools.partial(layers.FeedForward, self.intermediate_size, self.dropout_rate,
                            dtype=self.dtype, param_dtype=self.param_dtype)
    cross = attention(name='cross_attention')
    # Both directions read the streams as they entered the layer. In a decoding
    # step the regions' keys are cached and the vision side is final.
    new_text, text_to_vision = cross(text, vision, vision_mask, deterministic, return_probs,
                                     blocks.get('text_to_vision'), decoding)
    new_text, text_self = attention(name='text_self_attention')(
        new_text, new_text, text_mask, deterministic, return_probs, blocks.get('text'),
        decoding)
    new_text = ffn(name='text_ffn')(new_text, deterministic)
    if layers.is_step(decoding):
      return (layers.constrain(new_text, TEXT_AXES), None), None
    new_vision, vision_to_text = cross(vision, text, text_mask, deterministic, return_probs,
                                       blocks.get('vision_to_text'))
    new_vision, vision_self = attention(name='vision_self_attention')(
        new_vision, new_vision, vision_mask, deterministic, return_probs, blocks.get('vision'))
    new_vision = ffn(name='vision_ffn')(new_vision, deterministic)
    probs = None
    if return_probs:
      probs = dict(text_to_vision=text_to_vision, vision_to_text=vision_to_text,
                   text=text_self, vision=vision_self)
    return ((layers.constrain(new_text, TEXT_AXES), layers.constrain(new_vision, VISION_AXES)),
            probs)


class Lxmert(nn.Module):
  """LXMERT backbone (HF `LxmertModel`).

  Layer counts: num_language_layers / num_relation_layers / num_cross_layers are
  the original's l_layers / r_layers / x_layers (9 / 5 / 5), the submodules
  text_layer_{i} / vision_layer_{i} / cross_layer_{k} (after embeddings and
  region_embeddings; then pooler, tanh on the text [CLS]). The head sizes
  (num_answers, num_object_labels, num_attr_labels) are used by
  `LxmertForPreTraining` only.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  num_language_layers: int = 9
  num_relation_layers: int = 5
  num_cross_layers: int = 5
  feature_dim: int = 2048
  visual_pos_dim: int = 4
  num_answers: int = 9500
  num_object_labels: int = 1600
  num_attr_labels: int = 400
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention_impl: str = 'auto'
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  remat: bool = False
  scan_layers: bool = False  # each stack of repeated layers as one nn.scan (layers.layer_stack)
  float32_logits: bool = False  # the MLM head's logits in float32 (heads only)

  def check_inputs(self, input_ids: jax.Array, region_feats: jax.Array,
                   region_loc: jax.Array) -> None:
    layers.check_inputs(input_ids, region_feats, feature_dim=self.feature_dim,
                        max_position_embeddings=self.max_position_embeddings)
    if region_loc.shape[-1] != self.visual_pos_dim:
      raise ValueError(f'region_loc has {region_loc.shape[-1]} coordinates but the model '
                       f'config says visual_pos_dim={self.visual_pos_dim} (x1, y1, x2, y2)')

  @nn.compact
  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, region_feats: jax.Array,
               region_loc: jax.Array, region_mask: jax.Array,
               token_type_ids: jax.Array | None = None, deterministic: bool = True,
               return_attention: bool = False,
               attention_mask: jax.Array | None = None,
               decoding: layers.Decoding | None = None) -> dict[str, Any]:
    """Runs both streams and the cross layers.

    Args:
      input_ids: [B, T] int; text_mask: [B, T] (1 = real token).
      region_feats: [B, R, F]; region_loc: [B, R, 4] normalised boxes;
      region_mask: [B, R] (1 = real region).
      token_type_ids: [B, T] (default 0).
      attention_mask: [B, T+R, T+R] or None over [text; regions], ANDed with
        the key masks: [:T, :T] in the text layers and the cross layers'
        text self-attention, [T:, T:] in the vision layers and the
        cross layers' vision self-attention, [:T, T:] / [T:, :T] in the
        cross-attention's text->vision / vision->text directions.
      decoding: the KV cache for captioning (`layers.Decoding`): the prefill
        caches the text self-attentions' and the text->vision keys/values; a
        step runs the text side of the layers on the new tokens only (the
        vision stream is final) and returns 'text' and 'word_embeddings'.

    Returns:
      dict with 'text' [B, T, H], 'vision' [B, R, H], 'pooled' [B, H],
      'word_embeddings' [V, H] and, if `return_attention`, 'attention' in the
      schema of `layers.ATTENTION_STREAMS` (float32): 'text/layer_i' [B, N, T, T]
      (i < num_language_layers: the text layers, then one per cross layer),
      'vision/layer_i' [B, N, R, R] (the vision layers, then one per
      cross layer), 'text_to_vision/layer_k' [B, N, T, R] and
      'vision_to_text/layer_k' [B, N, R, T] (cross layer k).
    """
    self.check_inputs(input_ids, region_feats, region_loc)
    num_text = text_mask.shape[1]  # the cached layout's text slots in a decoding step
    step = layers.is_step(decoding)
    attention_mask = layers.check_attention_mask(attention_mask, input_ids.shape[0], num_text,
                                                 region_feats.shape[1], decoding)
    blocks = layers.attention_mask_blocks(attention_mask, num_text)
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    common = dict(dropout_rate=self.dropout_rate,
                  attention_dropout_rate=self.attention_dropout_rate,
                  attention_impl=self.attention_impl, dtype=dtype, param_dtype=param_dtype)
    text, word_table = layers.TextEmbeddings(
        self.vocab_size, self.hidden_size, self.max_position_embeddings,
        self.type_vocab_size, self.dropout_rate, dtype=dtype, param_dtype=param_dtype,
        name='embeddings')(
            input_ids, token_type_ids,
            decoding.position_ids(input_ids.shape[1]) if decoding is not None else None,
            deterministic)

    attention = {}
    # The cache is written inside the layers: no remat around them when decoding.
    stack = functools.partial(layers.layer_stack, deterministic=deterministic,
                              return_probs=return_attention,
                              remat=self.remat and decoding is None, scan=self.scan_layers)
    single = dict(num_heads=self.num_heads, intermediate_size=self.intermediate_size, **common)
    text, probs = stack(layers.TransformerLayer, single, self.num_language_layers, 'text_layer',
                        text, text_mask, (blocks['text'], decoding))
    attention.update({layers.attention_key('text', i): p for i, p in enumerate(probs)})
    vision = None  # a decoding step leaves the (final) vision stream out
    if not step:
      vision = RegionEmbeddings(self.hidden_size, self.dropout_rate, dtype=dtype,
                                param_dtype=param_dtype, name='region_embeddings')(
          region_feats, region_loc, deterministic)
      vision, probs = stack(layers.TransformerLayer, single, self.num_relation_layers,
                            'vision_layer', vision, region_mask, (blocks['vision'],),
                            after_each=lambda v: layers.constrain(v, VISION_AXES))
      attention.update({layers.attention_key('vision', i): p for i, p in enumerate(probs)})
    (text, vision), probs = stack(CrossLayer, single, self.num_cross_layers, 'cross_layer',
                                  (text, vision), (text_mask, region_mask), (blocks, decoding))
    # Self-attentions inside cross layer k are layer num_*_layers + k of their stream.
    offsets = dict(text=self.num_language_layers, vision=self.num_relation_layers,
                   text_to_vision=0, vision_to_text=0)
    for k, layer_probs in enumerate(probs):
      for stream, value in (layer_probs or {}).items():
        attention[layers.attention_key(stream, offsets[stream] + k)] = value
    if step:
      return dict(text=text, word_embeddings=word_table)

    outputs = dict(
        text=text, vision=vision, word_embeddings=word_table,
        pooled=layers.Pooler(self.hidden_size, dtype=dtype, param_dtype=param_dtype,
                             name='pooler')(text))
    if return_attention:
      outputs['attention'] = attention
    return outputs


class ObjectHead(nn.Module):
  """HF `LxmertVisualObjHead`: one transform, then object/attribute/feature decoders.

  Submodules: transform, obj, attr, feat. [B, R, H] -> ([B, R, num_object_labels],
  [B, R, num_attr_labels], [B, R, feature_dim]).
  """
  num_object_labels: int
  num_attr_labels: int
  feature_dim: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, vision: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    h = heads.PredictionTransform(vision.shape[-1], dtype=self.dtype,
                                  param_dtype=self.param_dtype, name='transform')(vision)
    dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    return (dense(self.num_object_labels, ('embed_out', 'vocab'), name='obj')(h),
            dense(self.num_attr_labels, ('embed_out', 'vocab'), name='attr')(h),
            dense(self.feature_dim, ('embed_out', 'feature'), name='feat')(h))


class LxmertForPreTraining(Lxmert):
  """Backbone (submodule `backbone`) + HF `LxmertForPreTraining` heads.

  Submodules: backbone, mlm_head (tied to the word table), matched_head
  (label 1 = matched), object_head, answer_head (image QA over num_answers).
  """

  @nn.compact
  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, region_feats: jax.Array,
               region_loc: jax.Array, region_mask: jax.Array, mlm_positions: jax.Array,
               token_type_ids: jax.Array | None = None, deterministic: bool = True,
               return_attention: bool = False,
               attention_mask: jax.Array | None = None) -> dict[str, Any]:
    """Backbone arguments plus mlm_positions [B, P] (text positions to predict).

    Returns the backbone dict plus 'mlm_logits' [B, P, V], 'matched_logits'
    [B, 2], 'obj_logits' [B, R, num_object_labels], 'attr_logits'
    [B, R, num_attr_labels], 'feat_pred' [B, R, F], 'qa_logits' [B, num_answers].
    """
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    outputs = Lxmert(**layers.backbone_fields(self, Lxmert), name='backbone')(
        input_ids, text_mask, region_feats, region_loc, region_mask, token_type_ids,
        deterministic, return_attention, attention_mask=attention_mask)
    outputs['mlm_logits'] = heads.MaskedLMHead(
        self.vocab_size, dtype=dtype, param_dtype=param_dtype,
        float32_logits=self.float32_logits, name='mlm_head')(
        outputs['text'], mlm_positions, outputs['word_embeddings'])
    outputs['matched_logits'] = layers.Dense(
        2, ('embed', None), dtype=dtype, param_dtype=param_dtype,
        name='matched_head')(outputs['pooled'])
    outputs['obj_logits'], outputs['attr_logits'], outputs['feat_pred'] = ObjectHead(
        self.num_object_labels, self.num_attr_labels, self.feature_dim, dtype=dtype,
        param_dtype=param_dtype, name='object_head')(outputs['vision'])
    outputs['qa_logits'] = heads.AnswerHead(
        self.num_answers, self.hidden_size, dtype=dtype, param_dtype=param_dtype,
        name='answer_head')(outputs['pooled'])
    return outputs


def bert_text_paths(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Where BERT's embeddings, first layers and pooler sit in the backbone params
  (the original also initialised its language layers from BERT this way)."""
  return dict(embeddings='embeddings',
              layers=[f'text_layer_{i}' for i in range(model_config.num_language_layers)],
              pooler='pooler')


MODEL = Lxmert
PRETRAINING = LxmertForPreTraining


def forward_flops(model: ml_collections.ConfigDict, text_len: int, regions: int,
                  mlm_predictions: int, components: Collection[str] | None = None) -> float:
  """`LxmertForPreTraining`: language, relationship and cross layers, and the
  MLM, matched, object/attribute/feature and QA heads that `components` use
  (None: all)."""
  t, r, h, ffn = text_len, regions, model.hidden_size, model.intermediate_size
  uses = functools.partial(flops.uses, components)
  cross = (flops.cross_attention(t, h, r, h, h, h) + flops.cross_attention(r, h, t, h, h, h)
           + flops.bert_layer(t, h, ffn) + flops.bert_layer(r, h, ffn))
  region_outputs = (uses('obj') * model.num_object_labels + uses('attr') * model.num_attr_labels
                    + uses('feat') * model.feature_dim)
  heads = (uses('mlm') * flops.mlm_head(mlm_predictions, h,
                                        layers.padded_vocab_size(model.vocab_size))
           + uses('matched', 'qa') * flops.dense(1, h, h)  # the pooler
           + uses('matched') * flops.dense(1, h, 2)
           + uses('obj', 'attr', 'feat') * flops.dense(r, h, h)  # their shared transform
           + flops.dense(r, h, region_outputs)
           + uses('qa') * (flops.dense(1, h, 2 * h) + flops.dense(1, 2 * h, model.num_answers)))
  return (flops.dense(r, model.feature_dim, h) + flops.dense(r, model.visual_pos_dim, h)
          + model.num_language_layers * flops.bert_layer(t, h, ffn)
          + model.num_relation_layers * flops.bert_layer(r, h, ffn)
          + model.num_cross_layers * cross + heads)


DESIGN = design.Design(
    name='lxmert', model=Lxmert, pretraining=LxmertForPreTraining,
    location_features=lambda corners: corners, loc_dim=4,
    mlm_head='mlm_head',
    matching_head='matched_head',
    matched_label=1, pairing=design.REPLACE_CAPTION, max_text_len=20, world_text_len=20,
    recipe=design.PretrainingRecipe(
        components=('mlm', 'matched', 'obj', 'attr', 'feat', 'qa'),
        default_tasks=('mlm', 'matched', 'obj', 'attr', 'feat', 'qa'), mix='sum',
        mask_regions=masking.lxmert_mask_regions, image_qa=True),
    forward_flops=forward_flops,
    optimizer=dict(learning_rate=1e-4, warmup_fraction=0.05, num_steps=100_000,
                   adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6, weight_decay=0.01,
                   grad_clip_norm=1.0),
    decays=design.bert_decays, bert_text_paths=bert_text_paths,
    # As the paper's first 10 epochs, image QA joins after a first stage; on the
    # world that stage shows captions only: with the world's templated questions
    # (about half of its sentences) in the batches, the matched loss stays at
    # chance for 3,000 steps, and without them it leaves chance by step 1,500.
    # The questions' pairs never enter the matched loss: a template fits almost
    # any image (benchmarks/RESULTS.md, world pretraining).
    world_pretrain=dict(first_stage_steps=1500, first_stage_ratios=(1, 1, 1, 1, 1, 0),
                        first_stage_sentences='captions', match_questions=False))
