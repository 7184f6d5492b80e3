"""Region modelling losses: UNITER's MRFR/MRC/MRC-kl, LXMERT's object, attribute
and feature losses, ViLBERT's masked-region KL.

Label spaces. The detector (BUTD, Visual Genome) scores 1601 classes, class 0 =
background; `class_probs` [B, R, 1601] is that distribution. `object_ids` follow
the LXMERT TSV convention: the argmax over the 1600 non-background classes,
numbered 0..1599, so `object_ids == k` is `class_probs[..., k + 1]`. LXMERT's
object head predicts the 1600 `object_ids` classes; UNITER's MRC and ViLBERT's
region head predict the 1601 detector classes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from vlpjax.objectives.common import cross_entropy, kl_divergence, ratio, weighted_mean

# LXMERT's `visual_loss_normalizer` (1 / mask rate) on every visual loss.
LXMERT_VISUAL_LOSS_NORMALIZER = 1 / 0.15


def mrfr_loss(pred: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
  """UNITER MRFR: squared error to the raw feature, mean over the weighted regions
  and the feature dims (the original's `mse_loss(...).mean()`).

  pred, target: [B, R, F]; weights: [B, R] (masked regions).
  """
  error = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  return weighted_mean(error, weights)


def mrc_labels(class_probs: jax.Array) -> jax.Array:
  """UNITER MRC target: the argmax detector class, background excluded.

  class_probs [..., C] -> [...] int32 in [1, C).
  """
  return jnp.argmax(class_probs[..., 1:], axis=-1).astype(jnp.int32) + 1


def mrc_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """UNITER MRC: mean CE over weighted regions. logits [B, R, C]; labels, weights [B, R]."""
  return weighted_mean(cross_entropy(logits, labels), weights)


def mrc_kl_loss(logits: jax.Array, class_probs: jax.Array, weights: jax.Array) -> jax.Array:
  """UNITER MRC-kl: KL(detector distribution || prediction) on masked regions.

  The original reduces `kl_div(..., reduction='none')` with `.mean()` over
  regions x classes, so the per-region KL is divided by C as well.
  logits, class_probs: [B, R, C]; weights: [B, R].
  """
  return weighted_mean(kl_divergence(class_probs, logits), weights) / logits.shape[-1]


def vilbert_region_loss(logits: jax.Array, class_probs: jax.Array, weights: jax.Array
                        ) -> jax.Array:
  """ViLBERT masked multimodal modelling, image side (`visual_target` 0).

  KL(detector distribution || prediction) summed over classes, averaged over the
  masked regions (the original divides the sum by the masked-region count).
  logits, class_probs: [B, R, C]; weights: [B, R] (masked regions, never [IMG]).
  """
  return weighted_mean(kl_divergence(class_probs, logits), weights)


def lxmert_label_loss(logits: jax.Array, labels: jax.Array, confidence: jax.Array,
                      region_weights: jax.Array, region_mask: jax.Array) -> jax.Array:
  """LXMERT object / attribute loss: `(CE * weight * conf).mean() / 0.15`.

  In the original the weight is the detector confidence alone, i.e. every region
  is predicted, masked or not (airsplay/lxmert#41); pass `region_weights =
  region_mask` for that, or the masked regions to predict only those. The mean
  runs over the real regions (the original's batches have no padded regions).
  logits: [B, R, K]; labels: [B, R] (negative = no label, left out);
  confidence, region_weights, region_mask: [B, R].
  """
  weight = (region_weights.astype(jnp.float32) * confidence.astype(jnp.float32)
            * (labels >= 0) * region_mask.astype(jnp.float32))
  total = jnp.sum(cross_entropy(logits, labels) * weight)
  return ratio(total, jnp.maximum(jnp.sum(region_mask), 1)) * LXMERT_VISUAL_LOSS_NORMALIZER


def lxmert_feature_loss(pred: jax.Array, target: jax.Array, picked: jax.Array,
                        region_mask: jax.Array) -> jax.Array:
  """LXMERT RoI-feature regression: smooth-L1 (beta 1) averaged over the feature
  dims, on masked regions, `(loss * mask).mean() / 0.15` over the real regions.

  pred, target: [B, R, F]; picked, region_mask: [B, R].
  """
  # optax's Huber loss with delta 1 is PyTorch's SmoothL1Loss with beta 1.
  error = jnp.mean(optax.huber_loss(pred.astype(jnp.float32), target.astype(jnp.float32),
                                    delta=1.0), axis=-1)
  weight = picked.astype(jnp.float32) * region_mask.astype(jnp.float32)
  total = jnp.sum(error * weight)
  return ratio(total, jnp.maximum(jnp.sum(region_mask), 1)) * LXMERT_VISUAL_LOSS_NORMALIZER
