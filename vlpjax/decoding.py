"""Autoregressive decoding: greedy and beam search over any model's step function.

The model hides behind a step function and a cache pytree (e.g. flax's
'cache' collection of keys and values; every leaf has the batch as its
leading axis):

  step_fn(cache, tokens [N] int32, index int32 scalar) -> (logits [N, V], cache)

`tokens` are the tokens just chosen, `index` how many tokens were decoded
before them (0 for the first), so the caller places them at its prompt length
+ index. The prefill (the caller's) gives `first_logits` [B, V], the
prediction of the first token. Both searches run in one `lax.while_loop` with
static shapes (jittable, batched, deterministic: ties go to the lower id, as
`argmax` and `top_k` break them), stop once every sequence has ended, and
give the same result whether or not they stop early: after an end token come
`pad_id`s.

Beam search follows the t5x / flax-examples design: K alive beams and K
finished hypotheses per example; each step ranks the 2K best continuations of
the alive beams, an end token (or reaching `max_len`) moves one to the
finished set, scored by log-probability over the brevity penalty ((5 + length)
/ 6) ** alpha; it stops when no alive beam can still beat the worst finished
one (exact: log-probabilities only fall and the penalty is largest at
`max_len`). The cache's rows are example-major (rows b*K .. b*K + K - 1 are
example b's beams) and are gathered after each step's selection.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Cache = Any
StepFn = Callable[[Cache, jax.Array, jax.Array], tuple[jax.Array, Cache]]
NEG_INF = -1.0e30  # a finite "impossible" score: -inf - -inf would give NaN


class DecodeResult(NamedTuple):
  """Decoded sequences.

  tokens: int32 [B, max_len], the end token included when produced, pad after.
  lengths: int32 [B], tokens up to and including the end token (or max_len).
  log_prob: float32 [B], the summed log-softmax of the chosen tokens.
  score: float32 [B], what the search ranked by (log_prob / brevity penalty;
    log_prob for greedy).
  """
  tokens: jax.Array
  lengths: jax.Array
  log_prob: jax.Array
  score: jax.Array


def brevity_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT's ((5 + length) / 6) ** alpha (1 for alpha 0)."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _check(max_len: int, first_logits: jax.Array) -> None:
  if max_len < 1:
    raise ValueError(f'max_len must be >= 1, got {max_len}')
  if first_logits.ndim != 2:
    raise ValueError(f'first_logits must be [B, V], got {first_logits.shape}')


def _next_logits(step_fn: StepFn, cache: Cache, tokens: jax.Array, index: jax.Array,
                 max_len: int, vocab: int) -> tuple[jax.Array, Cache]:
  """step_fn's logits for token index + 1, or zeros once no further token is chosen."""
  def step(operands):
    logits, new_cache = step_fn(*operands)
    return logits.astype(jnp.float32), new_cache
  def skip(operands):
    return jnp.zeros((tokens.shape[0], vocab), jnp.float32), operands[0]
  return jax.lax.cond(index + 1 < max_len, step, skip, (cache, tokens, index))


def greedy_decode(step_fn: StepFn, cache: Cache, first_logits: jax.Array, *, max_len: int,
                  eos_id: int, pad_id: int = 0) -> DecodeResult:
  """The argmax token at each step, for every row of `first_logits` [B, V]."""
  _check(max_len, first_logits)
  batch, vocab = first_logits.shape

  def body(state):
    i, logits, cache, tokens, log_prob, done = state
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    token = jnp.where(done, pad_id, token)
    picked = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    log_prob = log_prob + jnp.where(done, 0.0, picked)
    tokens = tokens.at[:, i].set(token)
    done = done | (token == eos_id)
    logits, cache = _next_logits(step_fn, cache, token, i, max_len, vocab)
    return i + 1, logits, cache, tokens, log_prob, done

  def cond(state):
    i, *_, done = state
    return (i < max_len) & ~jnp.all(done)

  state = (jnp.zeros((), jnp.int32), first_logits.astype(jnp.float32), cache,
           jnp.full((batch, max_len), pad_id, jnp.int32), jnp.zeros((batch,), jnp.float32),
           jnp.zeros((batch,), bool))
  _, _, _, tokens, log_prob, _ = jax.lax.while_loop(cond, body, state)
  ended = tokens == eos_id
  lengths = jnp.where(jnp.any(ended, axis=1), jnp.argmax(ended, axis=1) + 1, max_len)
  return DecodeResult(tokens, lengths.astype(jnp.int32), log_prob, log_prob)


def beam_search(step_fn: StepFn, cache: Cache, first_logits: jax.Array, *, beam_size: int,
                max_len: int, eos_id: int, length_penalty: float = 0.0, pad_id: int = 0
                ) -> DecodeResult:
  """The best of `beam_size` beams per row of `first_logits` [B, V] (module docstring).

  step_fn sees B*K rows: the cache's leaves repeated K times along axis 0,
  example-major, and re-gathered after every selection.
  """
  _check(max_len, first_logits)
  if beam_size < 1:
    raise ValueError(f'beam_size must be >= 1, got {beam_size}')
  batch, vocab = first_logits.shape
  k = beam_size
  if 2 * k > k * vocab:
    raise ValueError(f'beam_size {k} needs a vocabulary of at least 2 ids, got {vocab}')
  rows = jnp.arange(batch)[:, None]

  def body(state):
    (i, logits, cache, alive_seqs, alive_logp, fin_seqs, fin_scores, fin_logp, fin_len,
     _) = state
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, vocab)
    candidates = (alive_logp[:, :, None] + log_probs).reshape(batch, k * vocab)
    top_logp, top_index = jax.lax.top_k(candidates, 2 * k)  # [B, 2K]
    parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(alive_seqs, parent[:, :, None], axis=1).at[:, :, i].set(token)
    ends = (token == eos_id) | (i == max_len - 1)
    possible = top_logp > NEG_INF / 2
    # Finished: the best K of the old and the newly ended.
    new_scores = jnp.where(ends & possible, top_logp / brevity_penalty(i + 1, length_penalty),
                           NEG_INF)
    all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
    fin_scores, best = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.concatenate([fin_seqs, seqs], axis=1)[rows, best]
    fin_logp = jnp.concatenate([fin_logp, top_logp], axis=1)[rows, best]
    fin_len = jnp.concatenate([fin_len, jnp.full((batch, 2 * k), i + 1, jnp.int32)],
                              axis=1)[rows, best]
    # Alive: the best K that did not end (2K candidates leave at least K).
    alive_scores, keep = jax.lax.top_k(jnp.where(ends, NEG_INF, top_logp), k)
    alive_seqs = seqs[rows, keep]
    alive_logp = jnp.where(alive_scores > NEG_INF / 2, top_logp[rows, keep], NEG_INF)
    flat_parent = (rows * k + parent[rows, keep]).reshape(-1)
    cache = jax.tree.map(lambda x: jnp.take(x, flat_parent, axis=0), cache)
    logits, cache = _next_logits(step_fn, cache, token[rows, keep].reshape(-1), i, max_len,
                                 vocab)
    # No alive beam can beat the worst finished one any more.
    best_alive = alive_logp[:, 0] / brevity_penalty(jnp.asarray(max_len), length_penalty)
    done = jnp.all(fin_scores[:, -1] >= best_alive) | (i + 1 >= max_len)
    return (i + 1, logits, cache, alive_seqs, alive_logp, fin_seqs, fin_scores, fin_logp,
            fin_len, done)

  def cond(state):
    return ~state[-1]

  # Step 0: the K beams are one (the others impossible), all from the prefill.
  alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (batch, 1))
  state = (jnp.zeros((), jnp.int32), jnp.repeat(first_logits.astype(jnp.float32), k, axis=0),
           jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache),
           jnp.full((batch, k, max_len), pad_id, jnp.int32), alive_logp,
           jnp.full((batch, k, max_len), pad_id, jnp.int32),
           jnp.full((batch, k), NEG_INF, jnp.float32), jnp.zeros((batch, k), jnp.float32),
           jnp.zeros((batch, k), jnp.int32), jnp.zeros((), bool))
  (_, _, _, _, _, fin_seqs, fin_scores, fin_logp, fin_len, _) = jax.lax.while_loop(
      cond, body, state)
  return DecodeResult(fin_seqs[:, 0], fin_len[:, 0], fin_logp[:, 0], fin_scores[:, 0])
