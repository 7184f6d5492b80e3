"""Masking for pretraining, done in the train step (not the data pipeline).

Everything here is traceable with static shapes and deterministic given the rng,
which the train step derives from (seed, step) with `step_rng`.

Text (all four originals, BERT's recipe): each real, non-special token is picked
with probability `mask_prob`; a picked token becomes [MASK] (80%), a random word
(10%) or stays (10%), and is predicted. Predictions use a fixed number P of
slots per example (static shape); when more than P tokens are picked, a random
P of them are kept and the others are left untouched (neither corrupted nor
predicted). `default_max_predictions` makes that rare.

Regions: each real region is picked with probability `mask_prob`, then
  UNITER: zero-filled (and flagged, for its mask embedding); at least one.
  LXMERT: zeroed (80%), replaced by a random real region's feature from its
    group of DONOR_GROUP examples of the batch (10%; the original draws from
    the whole dataset) or kept (10%).
  ViLBERT: zeroed (90%) or kept (10%); region 0 ([IMG]) is never picked and its
    feature is recomputed as the mean of the masked real regions, since the
    original computes it after masking.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

# LXMERT's replacement features come from groups of this many consecutive examples.
DONOR_GROUP = 8

class TokenMasking(NamedTuple):
  """Result of `mask_tokens`.

  input_ids: [B, T] int32, picked tokens replaced.
  positions: [B, P] int32 text positions of the prediction slots, ascending;
    unused slots point at position 0 with weight 0.
  targets: [B, P] int32 original token ids at `positions`.
  weights: [B, P] float32, 1 for used slots.
  """
  input_ids: jax.Array
  positions: jax.Array
  targets: jax.Array
  weights: jax.Array


def step_rng(seed: int, step: int | jax.Array) -> jax.Array:
  """The masking rng for a training step: a pure function of (seed, step)."""
  return jax.random.fold_in(jax.random.key(seed), step)


def default_max_predictions(length: int, mask_prob: float = 0.15) -> int:
  """Prediction slots per example: the expected count plus three standard deviations.

  With `length` candidates the number picked is Binomial(length, mask_prob), so
  fewer than ~1% of examples pick more than this (those keep a random subset).
  """
  mean = mask_prob * length
  std = math.sqrt(length * mask_prob * (1.0 - mask_prob))
  return max(1, min(length, math.ceil(mean + 3.0 * std)))


def _first_true(x: jax.Array) -> jax.Array:
  """[B, N] bool -> [B, N] bool with only the first True of each row kept."""
  return x & (jnp.cumsum(x, axis=1) == 1)


def mask_tokens(rng: jax.Array, input_ids: jax.Array, text_mask: jax.Array, *,
                mask_token_id: int, special_token_ids: Sequence[int], vocab_size: int,
                max_predictions: int, mask_prob: float = 0.15, random_token_min: int = 0,
                at_least_one: bool = False) -> TokenMasking:
  """BERT-style 80/10/10 masking of real, non-special tokens.

  Args:
    rng: masking rng (see `step_rng`).
    input_ids: [B, T] int; text_mask: [B, T], nonzero on real tokens.
    mask_token_id: id of [MASK].
    special_token_ids: ids never masked ([CLS], [SEP], [PAD], ...).
    vocab_size: random replacement words are drawn from [random_token_min, vocab_size).
    max_predictions: P, prediction slots per example (static).
    mask_prob: probability of picking each candidate token.
    random_token_min: first id a random replacement may take (UNITER draws from
      '!' onwards; BERT, LXMERT, ViLBERT and VisualBERT from the whole vocabulary).
    at_least_one: if an example picks nothing, its first candidate token is
      replaced by [MASK] and predicted (UNITER's rule).

  Returns:
    TokenMasking with positions/targets/weights of shape [B, P].
  """
  batch, length = input_ids.shape
  if not 1 <= max_predictions <= length:
    raise ValueError(f'max_predictions must be in [1, {length}] (text length), '
                     f'got {max_predictions}')
  if not random_token_min < vocab_size:
    raise ValueError(f'random_token_min {random_token_min} must be below vocab_size '
                     f'{vocab_size}')
  # One draw for all four decisions (pick, order, action, word): each random
  # call adds a hash to the compiled program.
  pick_u, order_u, action, word_u = jax.random.uniform(rng, (4, batch, length))
  input_ids = input_ids.astype(jnp.int32)
  special = jnp.isin(input_ids, jnp.asarray(list(special_token_ids), jnp.int32))
  candidates = text_mask.astype(bool) & ~special
  picked = candidates & (pick_u < mask_prob)
  forced = jnp.zeros_like(picked)
  if at_least_one:
    forced = _first_true(candidates) & ~picked.any(axis=1, keepdims=True)
    picked = picked | forced

  # Keep a random subset of at most P picked positions; the priority of an
  # unpicked position (-1) is below every picked one (in [0, 1)).
  priority = jnp.where(picked, order_u, -1.0)
  # top_k's indices (ties: the lower index first), as a stable sort: XLA's SPMD
  # partitioner replicates TopK, all-gathering the batch's priorities onto every
  # device, but splits a sort over the batch.
  slots = jnp.argsort(-priority, axis=1, stable=True)[:, :max_predictions]
  slot_used = jnp.take_along_axis(picked, slots, axis=1)
  positions = jnp.sort(jnp.where(slot_used, slots, length), axis=1)
  weights = positions < length
  positions = jnp.where(weights, positions, 0).astype(jnp.int32)
  predicted = jnp.zeros((batch, length), bool).at[
      jnp.arange(batch)[:, None], positions].max(weights)

  to_mask = predicted & ((action < 0.8) | forced)
  to_random = predicted & ~forced & (action >= 0.8) & (action < 0.9)
  num_words = vocab_size - random_token_min
  random_words = random_token_min + jnp.minimum((word_u * num_words).astype(jnp.int32),
                                                num_words - 1)
  masked_ids = jnp.where(to_mask, mask_token_id,
                         jnp.where(to_random, random_words, input_ids))
  targets = jnp.take_along_axis(input_ids, positions, axis=1)
  return TokenMasking(masked_ids, positions, targets, weights.astype(jnp.float32))


def pick_regions(rng: jax.Array, region_mask: jax.Array, *, mask_prob: float = 0.15,
                 at_least_one: bool = False, skip_first: bool = False) -> jax.Array:
  """Picks regions to mask: [B, R] region_mask -> [B, R] bool.

  Each real region is picked with probability `mask_prob`. `at_least_one` picks
  one random real region where none was (UNITER); `skip_first` never picks
  region 0 (ViLBERT's [IMG] token).
  """
  candidates = jnp.asarray(region_mask).astype(bool)
  if skip_first:
    candidates = candidates.at[:, 0].set(False)
  pick_u, force_u = jax.random.uniform(rng, (2,) + candidates.shape)
  picked = candidates & (pick_u < mask_prob)
  if at_least_one:
    score = jnp.where(candidates, force_u, -1.0)
    one = jax.nn.one_hot(jnp.argmax(score, axis=1), candidates.shape[1], dtype=bool)
    picked = picked | (one & candidates & ~picked.any(axis=1, keepdims=True))
  return picked


def zero_regions(region_feats: jax.Array, picked: jax.Array) -> jax.Array:
  """UNITER: picked regions' features set to 0. [B, R, F], [B, R] -> [B, R, F]."""
  return jnp.where(picked[..., None], 0.0, region_feats).astype(region_feats.dtype)


def lxmert_mask_regions(rng: jax.Array, region_feats: jax.Array, region_mask: jax.Array,
                        picked: jax.Array) -> jax.Array:
  """LXMERT: picked regions zeroed (80%), swapped for a random feature (10%) or kept.

  The random feature is a uniformly drawn real region of an example in the
  same group of DONOR_GROUP consecutive examples (the original draws from the
  whole dataset). Groups keep the draw on the device that holds the batch rows
  whenever the per-device batch is a multiple of the group, where a draw from
  the global batch would all-gather every region feature onto every device;
  the values do not depend on the mesh. [B, R, F], [B, R], [B, R] -> [B, R, F].
  """
  batch, regions, dim = region_feats.shape
  group = math.gcd(batch, DONOR_GROUP)
  action, source_u = jax.random.uniform(rng, (2, batch, regions))
  # The k-th real region (k uniform) of the group: searchsorted on the running
  # count of real regions, O(g R log(g R)) rather than a [g R, g R] draw.
  real_count = jnp.cumsum(jnp.asarray(region_mask).reshape(batch // group, group * regions)
                          .astype(jnp.int32), axis=1)
  total = real_count[:, -1:]
  k = jnp.minimum((source_u.reshape(real_count.shape) * total).astype(jnp.int32), total - 1)
  source = jax.vmap(functools.partial(jnp.searchsorted, side='right'))(real_count, k)
  random_feats = jnp.take_along_axis(
      region_feats.reshape(batch // group, group * regions, dim), source[..., None],
      axis=1).reshape(batch, regions, dim)
  out = jnp.where((picked & (action < 0.8))[..., None], 0.0, region_feats)
  out = jnp.where((picked & (action >= 0.8) & (action < 0.9))[..., None], random_feats, out)
  return out.astype(region_feats.dtype)


def vilbert_mask_regions(rng: jax.Array, region_feats: jax.Array, region_mask: jax.Array,
                         picked: jax.Array) -> jax.Array:
  """ViLBERT: picked regions zeroed (90%) or kept (10%); [IMG] = mean of the result.

  Region 0 is the [IMG] token (never picked); its feature becomes the mean over
  the real regions 1.. of the masked features, as the original computes it after
  masking. (The original's denominator also leaves out regions overlapping a
  masked one by IoU > 0.4 and counts padding slots; we use the plain mean, the
  convention the data pipeline and the original's fine-tuning loaders use.)
  [B, R, F], [B, R], [B, R] -> [B, R, F].
  """
  zeroed = picked & (jax.random.uniform(rng, picked.shape) < 0.9)
  out = jnp.where(zeroed[..., None], 0.0, region_feats)
  real = jnp.asarray(region_mask).astype(out.dtype).at[:, 0].set(0.0)
  mean = (jnp.einsum('brf,br->bf', out, real)
          / jnp.maximum(real.sum(axis=1, keepdims=True), 1.0))
  return out.at[:, 0].set(mean).astype(region_feats.dtype)
