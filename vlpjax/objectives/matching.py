"""Image-text matching: a 2-way cross-entropy over the pair's label.

Labels are in the design's own convention (`Design.matched_label`; the data
pipeline emits `match_label` in it), so the loss needs no design.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlpjax.objectives.common import cross_entropy


def matching_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean 2-way cross-entropy over the batch: logits [B, 2], labels [B] -> scalar."""
  return jnp.mean(cross_entropy(logits, labels))
