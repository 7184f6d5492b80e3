"""LXMERT image-QA pretraining loss.

As the original: for each matched example that has a question with at least one
answer in the vocabulary, one answer is sampled with probability proportional
to its soft score and used as a hard cross-entropy target; mismatched pairs and
examples without a (known) answer are left out of the mean.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlpjax.objectives.common import cross_entropy, weighted_mean


def sample_answers(rng: jax.Array, answer_scores: jax.Array, valid: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """Samples one answer per example by score.

  Args:
    rng: sampling rng.
    answer_scores: [B, A] soft scores (>= 0).
    valid: [B], nonzero where the example should train QA (matched, has a question).

  Returns:
    (labels [B] int32, weights [B] float32); weight 0 where `valid` is 0 or no
    answer has a positive score.
  """
  scores = answer_scores.astype(jnp.float32)
  has_answer = jnp.any(scores > 0, axis=-1)
  logits = jnp.where(scores > 0, jnp.log(jnp.where(scores > 0, scores, 1.0)), -jnp.inf)
  logits = jnp.where(has_answer[:, None], logits, 0.0)
  labels = jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
  weights = (valid.astype(bool) & has_answer).astype(jnp.float32)
  return labels, weights


def qa_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean CE over weighted examples: logits [B, A], labels [B], weights [B] -> scalar."""
  return weighted_mean(cross_entropy(logits, labels), weights)
