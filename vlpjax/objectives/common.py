"""Small numerics shared by the loss modules (all in float32), and the one
way every loss and metric of a batch reduces: `ratio` (`mean`, `weighted_mean`).

Gradient accumulation (`vlpjax.step`) relies on it. Each reduction is a
numerator over a denominator that depends on the batch's targets and weights,
never on the model's outputs. The step records the full batch's denominators
once (`recorded_denominators`, with outputs of zeros), then computes each
microbatch's losses with those denominators in their place
(`replayed_denominators`). So the microbatches' values and gradients sum
exactly to the full batch's, without holding the full batch's outputs.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp


class _Denominators(threading.local):
  recorded: list | None = None
  replayed: Iterator | None = None


_DENOMINATORS = _Denominators()


def ratio(numerator: jax.Array, denominator: jax.Array | float) -> jax.Array:
  """numerator / denominator, the denominator a function of targets and weights
  alone (recorded or replaced under gradient accumulation; module docstring)."""
  if _DENOMINATORS.recorded is not None:
    _DENOMINATORS.recorded.append(denominator)
  elif _DENOMINATORS.replayed is not None:
    denominator = next(_DENOMINATORS.replayed, None)
    if denominator is None:
      raise RuntimeError('a microbatch reduced more often than the full batch did')
  return numerator / denominator


def mean(values: jax.Array) -> jax.Array:
  """The mean of every element, in float32 (`ratio` of the sum and the count)."""
  return ratio(jnp.sum(values.astype(jnp.float32)), float(values.size))


@contextlib.contextmanager
def recorded_denominators() -> Iterator[list]:
  """Collects, in call order, the denominator of every `ratio` in the block."""
  if _DENOMINATORS.recorded is not None or _DENOMINATORS.replayed is not None:
    raise RuntimeError('denominators are already being recorded or replayed')
  _DENOMINATORS.recorded = recorded = []
  try:
    yield recorded
  finally:
    _DENOMINATORS.recorded = None


@contextlib.contextmanager
def replayed_denominators(denominators: Sequence[jax.Array | float]) -> Iterator[None]:
  """Each `ratio` in the block divides by the next of `denominators` instead of
  its own; the block must use them all."""
  if _DENOMINATORS.recorded is not None or _DENOMINATORS.replayed is not None:
    raise RuntimeError('denominators are already being recorded or replayed')
  remaining = iter(denominators)
  _DENOMINATORS.replayed = remaining
  try:
    yield
  finally:
    _DENOMINATORS.replayed = None
  if next(remaining, None) is not None:
    raise RuntimeError('a microbatch reduced less often than the full batch did')


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
  return ratio(jnp.sum(values.astype(jnp.float32) * weights), jnp.where(total > 0, total, 1.0))
