"""UNITER (Chen et al., 2020): a single-stream BERT over text and image regions.

Follows ChenRocks/UNITER `model/model.py` and `model/pretrain.py` (see shared
MODELS.md). Text: word + position + type(0) embeddings, LayerNorm. Regions:
`LN(LN_feat(W_feat f) + LN_loc(W_loc p) + type_emb[1])`, the type table shared with
the text, p = [x1, y1, x2, y2, w, h, w*h] normalised. One BERT stack then runs
over the concatenation of the padded text [B, T] and the padded regions [B, R].

The original packs each example without inner padding (`gather_index`: the
regions of example b start right after its text). Here regions start at T for
every example. At every real position the two layouts give the same outputs:
regions carry no position embedding, text positions are the same in both, and
attention ignores padded keys, so attention is invariant to where the real
tokens sit. Padded positions hold values nobody should read.
"""
from __future__ import annotations

import functools
from typing import Collection

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlpjax import flops
from vlpjax.models import design
from vlpjax.models import heads
from vlpjax.models import layers
from vlpjax.objectives import masking, wra

LOC_DIM = 7  # [x1, y1, x2, y2, w, h, w*h]
IMAGE_TOKEN_TYPE = 1


class RegionEmbeddings(nn.Module):
  """UNITER region embeddings (the original `UniterImageEmbeddings`).

  Submodules: feature_projection, feature_norm, location_projection,
  location_norm, norm; param `mask_embedding` [2, F]. Row 1 is added to the
  features of masked regions. The original zeroes row 0 in place on every
  masked forward so that unmasked regions get nothing; here row 0 is simply
  never read (it stays in the params only so that checkpoints round-trip
  exactly).
  """
  hidden_size: int
  dropout_rate: float = 0.1
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, region_feats: jax.Array, region_loc: jax.Array,
               type_embedding: jax.Array, masked_regions: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """region_feats: [B, R, F]; region_loc: [B, R, 7]; type_embedding: [H] or
    [B, R, H]; masked_regions: [B, R] bool or None -> [B, R, H]."""
    if region_loc.shape[-1] != LOC_DIM:
      raise ValueError(f'UNITER region_loc must be [B, R, {LOC_DIM}] '
                       f'([x1, y1, x2, y2, w, h, w*h]), got {region_loc.shape}')
    feature_dim = region_feats.shape[-1]
    dense = functools.partial(layers.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(layers.LayerNorm, dtype=self.dtype, param_dtype=self.param_dtype)
    # Rows are (unmasked, masked); never sharded.
    mask_table = self.param('mask_embedding', layers.normal_init((None, 'feature')),
                            (2, feature_dim), self.param_dtype)
    feats = region_feats.astype(self.dtype)
    if masked_regions is not None:
      feats = feats + masked_regions[..., None].astype(self.dtype) * mask_table[1].astype(
          self.dtype)
    feats = norm(name='feature_norm')(
        dense(self.hidden_size, ('feature', 'embed'), name='feature_projection')(feats))
    loc = norm(name='location_norm')(
        dense(self.hidden_size, ('loc', 'embed'), name='location_projection')(
            region_loc.astype(self.dtype)))
    x = norm(name='norm')(feats + loc + type_embedding.astype(self.dtype))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return layers.constrain(x, ('batch', 'regions', 'embed'))


class UniterFields(nn.Module):
  """The fields of `configs/uniter.py:model_config` (less `name`), shared by the
  backbone and the pretraining model."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  feature_dim: int
  num_region_classes: int  # used by the pretraining heads only
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention_impl: str = 'xla'
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  remat: bool = False
  scan_layers: bool = False  # each stack of repeated layers as one nn.scan (layers.layer_stack)
  float32_logits: bool = False  # the MLM head's logits in float32 (heads only)


class Uniter(UniterFields):
  """UNITER backbone (the original `UniterModel`). See the module docstring.

  Submodules: embeddings (TextEmbeddings), region_embeddings (RegionEmbeddings),
  layer_{i} (TransformerLayer), pooler (tanh on [CLS]).
  """

  @nn.compact
  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, region_feats: jax.Array,
               region_loc: jax.Array, region_mask: jax.Array,
               token_type_ids: jax.Array | None = None, deterministic: bool = True,
               return_attention: bool = False, masked_regions: jax.Array | None = None,
               attention_mask: jax.Array | None = None,
               visual_token_type_ids: jax.Array | None = None,
               extra_token_type_embeddings: jax.Array | None = None,
               extra_word_embeddings: jax.Array | None = None,
               decoding: layers.Decoding | None = None) -> dict[str, jax.Array]:
    """Encodes text and regions jointly.

    Args:
      input_ids: [B, T] int, [CLS] ... [SEP] padded with 0.
      text_mask: [B, T], 1 on real tokens.
      region_feats: [B, R, F] detector features, zero-padded.
      region_loc: [B, R, 7] normalised [x1, y1, x2, y2, w, h, w*h].
      region_mask: [B, R], 1 on real regions.
      token_type_ids: [B, T] text types (default 0), rows of the token type
        table grown by `extra_token_type_embeddings` (VCR: answer 2, rationale 3).
      deterministic: no dropout when True.
      return_attention: also return per-layer attention probabilities.
      masked_regions: [B, R] bool, regions masked for MRFR/MRC (their features
        should already be zeroed); they get `mask_embedding[1]` added.
      attention_mask: [B, T+R, T+R] or None, 1 where a query of [text; regions]
        may attend to a key of [text; regions] (the joint sequence's own order),
        ANDed with text_mask/region_mask in every layer (see `layers`).
      visual_token_type_ids: [B, R] int, the regions' rows of the token type
        table (the original's `img_type_ids`; NLVR2: 1 left image, 2 right);
        None: IMAGE_TOKEN_TYPE for every region.
      extra_token_type_embeddings: [K, H] or None, rows type_vocab_size ..
        type_vocab_size + K - 1 of the token type table for
        `visual_token_type_ids` and `token_type_ids`: a task's new types
        (NLVR2's right image, VCR's answer and rationale: the original's grown
        table) that a pretrained table lacks, held by the task.
      extra_word_embeddings: [K, H] or None, rows vocab_size .. vocab_size + K - 1
        of the word table for `input_ids`: a task's new tokens (VCR's region
        references, the original's `init_word_embedding`), held by the task.
      decoding: the KV cache for captioning (`layers.Decoding`): the prefill
        caches every layer's keys/values over [text; regions]; a step embeds
        only the new tokens and returns 'text' and 'word_embeddings'.

    Returns:
      dict with 'text' [B, T, H], 'vision' [B, R, H], 'pooled' [B, H],
      'word_embeddings' [V, H] and, if asked, 'attention' in the schema of
      `layers.ATTENTION_STREAMS`: {'joint/layer_i': float32 [B, N, T+R, T+R]}.
    """
    if region_feats.shape[-1] != self.feature_dim:
      raise ValueError(f'UNITER feature_dim is {self.feature_dim} but region_feats has '
                       f'shape {region_feats.shape}')
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    text_embeddings = layers.TextEmbeddings(
        self.vocab_size, self.hidden_size, self.max_position_embeddings,
        self.type_vocab_size, self.dropout_rate, dtype=dtype, param_dtype=param_dtype,
        name='embeddings')
    position_ids = decoding.position_ids(input_ids.shape[1]) if decoding is not None else None
    text, word_table = text_embeddings(input_ids, token_type_ids, position_ids, deterministic,
                                       extra_word_embeddings, extra_token_type_embeddings)
    num_text = text_mask.shape[1]  # the cached layout's text slots in a decoding step
    attention_mask = layers.check_attention_mask(attention_mask, input_ids.shape[0], num_text,
                                                 region_feats.shape[1], decoding)
    mask = jnp.concatenate([text_mask, region_mask], axis=1)
    if layers.is_step(decoding):  # the regions' keys and values are in the cache
      return dict(text=layers.joint_layers(self, text, mask, deterministic, False,
                                           attention_mask, decoding)[0],
                  word_embeddings=word_table)
    # The region type embedding is a row of the text's token type table (shared).
    type_table = nn.meta.unbox(
        text_embeddings.variables['params']['token_type_embeddings']['embedding'])
    if extra_token_type_embeddings is not None:
      type_table = jnp.concatenate(
          [type_table, extra_token_type_embeddings.astype(type_table.dtype)], axis=0)
    region_types = (type_table[IMAGE_TOKEN_TYPE] if visual_token_type_ids is None
                    else jnp.take(type_table, visual_token_type_ids, axis=0))
    regions = RegionEmbeddings(self.hidden_size, self.dropout_rate, dtype=dtype,
                               param_dtype=param_dtype, name='region_embeddings')(
                                   region_feats, region_loc, region_types,
                                   masked_regions, deterministic)
    x, attention = layers.joint_layers(self, jnp.concatenate([text, regions], axis=1), mask,
                                       deterministic, return_attention, attention_mask,
                                       decoding)
    outputs = dict(
        text=x[:, :num_text],
        vision=layers.constrain(x[:, num_text:], ('batch', 'regions', 'embed')),
        pooled=layers.Pooler(self.hidden_size, jnp.tanh, dtype=dtype,
                             param_dtype=param_dtype, name='pooler')(x),
        word_embeddings=word_table)
    if return_attention:
      outputs['attention'] = attention
    return outputs


class UniterPreTraining(UniterFields):
  """UNITER with the heads of the original `UniterForPretraining`.

  Submodules: backbone (Uniter), mlm (MaskedLMHead tied to the word table),
  itm (Dense on pooled), mrfr_transform (+ param `mrfr_bias` [F]: the output
  projection is tied to the region feature projection, h @ W_feat + b), mrc
  (ClassifierHead -> num_region_classes; MRC and MRC-kl share these logits).
  """

  def setup(self):
    self.backbone = Uniter(**layers.backbone_fields(self, UniterFields))
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    self.mlm = heads.MaskedLMHead(self.vocab_size, dtype=dtype, param_dtype=param_dtype,
                                  float32_logits=self.float32_logits)
    self.itm = layers.Dense(2, ('embed', None), dtype=dtype, param_dtype=param_dtype)
    self.mrfr_transform = heads.PredictionTransform(self.hidden_size, dtype=dtype,
                                                    param_dtype=param_dtype)
    self.mrfr_bias = self.param('mrfr_bias', layers.zeros_init(('feature',)),
                                (self.feature_dim,), param_dtype)
    self.mrc = heads.ClassifierHead(self.num_region_classes, self.hidden_size, dtype=dtype,
                                    param_dtype=param_dtype)

  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, region_feats: jax.Array,
               region_loc: jax.Array, region_mask: jax.Array, mlm_positions: jax.Array,
               token_type_ids: jax.Array | None = None, deterministic: bool = True,
               return_attention: bool = False, masked_regions: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Backbone outputs plus 'mlm_logits' [B, P, V] at `mlm_positions` [B, P],
    'itm_logits' [B, 2] (1 = positive pair), 'mrfr_pred' [B, R, F] and
    'mrc_logits' [B, R, num_region_classes] over every region. `attention_mask`
    [B, T+R, T+R] goes to the backbone (see `Uniter.__call__`)."""
    outputs = self.backbone(input_ids, text_mask, region_feats, region_loc, region_mask,
                            token_type_ids, deterministic, return_attention, masked_regions,
                            attention_mask)
    dtype = jnp.dtype(self.dtype)
    # The MRFR decoder reuses the region feature projection, transposed.
    feature_kernel = nn.meta.unbox(self.backbone.variables['params']['region_embeddings']
                                   ['feature_projection']['kernel'])
    mrfr_hidden = self.mrfr_transform(outputs['vision'])
    mrfr_pred = jnp.einsum('brh,fh->brf', mrfr_hidden, feature_kernel.astype(dtype))
    return dict(
        outputs,
        mlm_logits=self.mlm(outputs['text'], mlm_positions, outputs['word_embeddings']),
        itm_logits=self.itm(outputs['pooled']),
        mrfr_pred=mrfr_pred + self.mrfr_bias.astype(dtype),
        mrc_logits=self.mrc(outputs['vision']))


def bert_text_paths(model_config) -> dict:
  """Where BERT's text weights go in the backbone params (for BERT init)."""
  return dict(embeddings='embeddings',
              layers=[f'layer_{i}' for i in range(model_config.num_layers)],
              pooler='pooler')


MODEL = Uniter
PRETRAINING = UniterPreTraining


def location_features(corners: np.ndarray) -> np.ndarray:
  """[B, S, 4] normalised (x1, y1, x2, y2) -> [B, S, 7] (x1, y1, x2, y2, w, h, w*h)."""
  wh = corners[..., 2:] - corners[..., :2]
  return np.concatenate([corners, wh, wh[..., :1] * wh[..., 1:]], -1)


def forward_flops(model: ml_collections.ConfigDict, text_len: int, regions: int,
                  mlm_predictions: int, components: Collection[str] | None = None) -> float:
  """`UniterPreTraining`: one stack over text + regions, and the MLM/ITM/MRFR/MRC
  heads that `components` use (None: all)."""
  h, r = model.hidden_size, regions
  uses = functools.partial(flops.uses, components)
  heads = (uses('mlm') * flops.mlm_head(mlm_predictions, h,
                                        layers.padded_vocab_size(model.vocab_size))
           + uses('itm') * flops.pooler_and_matching(h)
           + uses('mrfr') * (flops.dense(r, h, h) + flops.dense(r, h, model.feature_dim))
           + uses('mrc', 'mrckl') * (flops.dense(r, h, h)
                                     + flops.dense(r, h, model.num_region_classes)))
  return (flops.dense(r, model.feature_dim, h) + flops.dense(r, LOC_DIM, h)
          + model.num_layers * flops.bert_layer(text_len + r, h, model.intermediate_size)
          + heads)


# LayerNorms that the original names other than `LayerNorm` (img_layer_norm,
# pos_layer_norm, the MRFR/MRC heads' Sequential), so its rule decays them.
_DECAYED_NORMS = ('feature_norm', 'location_norm', 'mrfr_transform', 'mrc')


def decays(path: tuple[str, ...]) -> bool:
  """UNITER's rule: no decay on a name containing 'bias' (`mrfr_bias` too) or
  'LayerNorm.weight'."""
  if any('bias' in name for name in path):
    return False
  return path[-1] != 'scale' or any(name in _DECAYED_NORMS for name in path)


def wra_loss(outputs: dict[str, jax.Array], targets: dict[str, jax.Array],
             components: tuple[str, ...], weights: dict[str, float]) -> dict[str, jax.Array]:
  """Word-region alignment (optimal transport) rides on the ITM task."""
  if 'itm' not in components or weights['wra'] <= 0:
    return {}
  distance = wra.ot_distance(outputs['text'], outputs['vision'], targets['text_mask'],
                             targets['region_mask'])
  return {'wra': wra.wra_loss(distance, targets['matched'], targets['real'])}


DESIGN = design.Design(
    name='uniter', model=Uniter, pretraining=UniterPreTraining,
    location_features=location_features, loc_dim=LOC_DIM, needs_class_probs=True,
    matching_head='itm',
    matched_label=1, pairing=design.REPLACE_IMAGE, max_text_len=60, world_text_len=20,
    recipe=design.PretrainingRecipe(
        components=('itm', 'mlm', 'mrfr', 'mrc', 'mrckl'),
        default_tasks=('itm', 'mlm', 'mrfr', 'mrckl'), mix='sample',
        default_ratios=(2, 2, 1, 1),
        # Random words from '!' (106 in bert-base-cased) upwards.
        random_token_min=106, conditional_masking=True, at_least_one=True,
        mask_regions=lambda rng, feats, mask, picked: masking.zero_regions(feats, picked),
        positives_only=True, extra_losses=wra_loss,
        # The original's `itm_ot_lambda`.
        default_loss_weights={'wra': 0.1}),
    forward_flops=forward_flops,
    optimizer=dict(learning_rate=5e-5, warmup_fraction=0.05, num_steps=200_000,
                   adam_b1=0.9, adam_b2=0.98, adam_eps=1e-6, weight_decay=0.01,
                   grad_clip_norm=5.0),
    decays=decays, bert_text_paths=bert_text_paths,
    # train_nlvr2.py's `img_type_ids`: the left image's regions type 1, the
    # right's 2, a third row (`init_type_embedding`) that a task passes as
    # `extra_token_type_embeddings`.
    pair_image_token_types=(IMAGE_TOKEN_TYPE, IMAGE_TOKEN_TYPE + 1),
    # On the world, matching sampled with the masked objectives stays at chance
    # (val itm 0.68 after 6,000 steps of the 2:2:1:1 mix, at any weight, ratio
    # or learning rate tried); alone it leaves chance in ~500 steps and then holds
    # there while the others join (benchmarks/RESULTS.md, world pretraining).
    world_pretrain=dict(first_stage_steps=600, first_stage_ratios=(1, 0, 0, 0)))
