"""Small numerics shared by the loss modules (all in float32)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy: logits [..., C], integer labels [...] -> [...] float32.

  A negative label gives the loss of class 0 (callers weight such "no label"
  entries out); a label >= C gives NaN, so that a label-space mismatch between
  data and head stops training loudly instead of being clipped silently.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  index = jnp.maximum(labels.astype(jnp.int32), 0)[..., None]
  return -jnp.take_along_axis(log_probs, index, axis=-1, mode='fill',
                              fill_value=jnp.nan)[..., 0]


def kl_divergence(target_probs: jax.Array, logits: jax.Array) -> jax.Array:
  """KL(target || softmax(logits)) summed over the last axis: [..., C] -> [...].

  Terms with target 0 contribute 0 (as `torch.nn.functional.kl_div` does).
  """
  target = target_probs.astype(jnp.float32)
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jax.scipy.special.xlogy(target, target) - target * log_q, axis=-1)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(values * weights) / sum(weights), 0 when the weights sum to 0.

  Matches PyTorch's mean over the selected elements (e.g. `ignore_index`),
  without its NaN on an empty selection.
  """
  weights = weights.astype(jnp.float32)
  total = jnp.sum(weights)
  return jnp.sum(values.astype(jnp.float32) * weights) / jnp.where(total > 0, total, 1.0)
