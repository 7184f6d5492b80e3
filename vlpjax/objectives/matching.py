"""Image-text matching losses: a 2-way cross-entropy, each design with its labels.

Label conventions (the originals'; the data pipeline emits `match_label` in the
model's own convention):
  VisualBERT sentence-image prediction: 1 = the second caption matches.
  LXMERT matched: 1 = matched (caption replaced otherwise).
  UNITER ITM: 1 = positive (image replaced otherwise).
  ViLBERT multimodal alignment: 0 = aligned (caption replaced otherwise).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlpjax.objectives.common import cross_entropy

MATCHED_LABEL = {'visualbert': 1, 'lxmert': 1, 'uniter': 1, 'vilbert': 0}


def is_matched(design: str, match_label: jax.Array) -> jax.Array:
  """[B] labels in `design`'s convention -> [B] bool, True for matching pairs."""
  if design not in MATCHED_LABEL:
    raise ValueError(f'unknown design {design!r}; expected one of {sorted(MATCHED_LABEL)}')
  return match_label == MATCHED_LABEL[design]


def matching_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean 2-way cross-entropy over the batch: logits [B, 2], labels [B] -> scalar."""
  return jnp.mean(cross_entropy(logits, labels))
