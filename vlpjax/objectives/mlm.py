"""Masked language modelling loss at gathered positions."""
from __future__ import annotations

import jax

from vlpjax.objectives.common import cross_entropy, weighted_mean


def masked_lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean cross-entropy over the used prediction slots.

  logits: [B, P, V] (the model's MLM logits at `mlm_positions`); targets: [B, P]
  original ids; weights: [B, P] (0 for unused slots or excluded examples).
  Equals the originals' `CrossEntropyLoss(ignore_index=-1)`: a mean over every
  masked token of the batch.
  """
  return weighted_mean(cross_entropy(logits, targets), weights)
