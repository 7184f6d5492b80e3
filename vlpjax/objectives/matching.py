"""Image-text matching: a 2-way cross-entropy over the pair's label.

Labels are in the design's own convention (`Design.matched_label`; the data
pipeline emits `match_label` in it), so the loss needs no design.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlpjax.objectives.common import cross_entropy, mean, ratio


def matching_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None
                  ) -> jax.Array:
  """Mean 2-way cross-entropy over the batch: logits [B, 2], labels [B] -> scalar;
  with `weights` [B] (0 on padded rows) the weighted mean."""
  losses = cross_entropy(logits, labels)
  if weights is None:
    return mean(losses)
  weights = weights.astype(jnp.float32)
  return ratio(jnp.sum(losses * weights), jnp.maximum(jnp.sum(weights), 1.0))
