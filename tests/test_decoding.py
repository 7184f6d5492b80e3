"""Greedy and beam search (`vlpjax.decoding`) on toy models whose step is exact:
against a Python loop, exhaustive search, and with caches that must be gathered."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax import decoding

V, EOS, PAD, L = 5, 1, 0, 4


def history_model(seed=0, vocab=V, max_len=L):
  """Logits depend on the whole history (through a hash kept in the cache) and
  the step index, so a wrongly gathered cache changes the results."""
  table = jax.random.normal(jax.random.key(seed), (97, vocab)) * 2.0

  def logits_of(history_hash):
    return table[history_hash % 97]

  def step_fn(cache, tokens, index):
    new_hash = (cache['hash'] * 31 + tokens + 7 * index + 3) % 9973
    history = cache['history'].at[:, index].set(tokens)
    return logits_of(new_hash), dict(hash=new_hash, history=history)

  def init(batch_seeds):
    hashes = jnp.asarray(batch_seeds, jnp.int32)
    return (dict(hash=hashes, history=jnp.full((len(batch_seeds), max_len), -1, jnp.int32)),
            logits_of(hashes))
  return step_fn, init, logits_of


def python_sequence_log_prob(logits_of, seed, sequence):
  """Summed log-softmax of `sequence` under the history model, step by step."""
  h, total = seed, 0.0
  for index, token in enumerate(sequence):
    log_probs = np.asarray(jax.nn.log_softmax(logits_of(jnp.int32(h))))
    total += float(log_probs[token])
    h = (h * 31 + token + 7 * index + 3) % 9973
  return total


def exhaustive_best(logits_of, seed, alpha):
  """The best (sequence, score) over every sequence up to L tokens, ending at EOS or L."""
  best = (None, -np.inf)
  for length in range(1, L + 1):
    for body in itertools.product([t for t in range(V) if t != EOS], repeat=length - 1):
      for last in range(V):
        if length < L and last != EOS:
          continue
        sequence = list(body) + [last]
        score = python_sequence_log_prob(logits_of, seed, sequence) / (
            ((5 + length) / 6) ** alpha)
        if score > best[1] + 1e-9:
          best = (sequence, score)
  return best


def test_greedy_equals_a_python_loop():
  step_fn, init, logits_of = history_model()
  seeds = [3, 11, 42]
  cache, first = init(seeds)
  result = jax.jit(functools.partial(decoding.greedy_decode, step_fn, max_len=L, eos_id=EOS))(
      cache, first)
  for row, seed in enumerate(seeds):
    h, sequence = seed, []
    for index in range(L):
      token = int(jnp.argmax(logits_of(jnp.int32(h))))
      sequence.append(token)
      if token == EOS:
        break
      h = (h * 31 + token + 7 * index + 3) % 9973
    expected = sequence + [PAD] * (L - len(sequence))
    assert np.asarray(result.tokens[row]).tolist() == expected
    assert int(result.lengths[row]) == len(sequence)
    np.testing.assert_allclose(result.log_prob[row],
                               python_sequence_log_prob(logits_of, seed, sequence), atol=1e-5)


def test_beam_of_one_is_greedy():
  step_fn, init, _ = history_model(1)
  cache, first = init([5, 6, 7])
  greedy = decoding.greedy_decode(step_fn, cache, first, max_len=L, eos_id=EOS)
  beam = decoding.beam_search(step_fn, cache, first, beam_size=1, max_len=L, eos_id=EOS)
  np.testing.assert_array_equal(greedy.tokens, beam.tokens)
  np.testing.assert_array_equal(greedy.lengths, beam.lengths)
  np.testing.assert_allclose(greedy.log_prob, beam.log_prob, atol=1e-6)


@pytest.mark.parametrize('alpha', [0.0, 1.0])
def test_a_wide_beam_finds_the_exhaustive_best(alpha):
  step_fn, init, logits_of = history_model(2)
  seeds = [4, 9]
  cache, first = init(seeds)
  # V ** (L - 1) beams hold every prefix: the search is exact.
  result = jax.jit(functools.partial(decoding.beam_search, step_fn, beam_size=V ** (L - 1),
                                     max_len=L, eos_id=EOS, length_penalty=alpha))(cache, first)
  for row, seed in enumerate(seeds):
    sequence, score = exhaustive_best(logits_of, seed, alpha)
    length = int(result.lengths[row])
    assert np.asarray(result.tokens[row, :length]).tolist() == sequence
    assert np.all(np.asarray(result.tokens[row, length:]) == PAD)
    np.testing.assert_allclose(result.score[row], score, atol=1e-5)
    np.testing.assert_allclose(result.log_prob[row],
                               python_sequence_log_prob(logits_of, seed, sequence), atol=1e-5)


def test_beam_results_are_scored_by_their_own_history():
  """Each returned sequence's log-prob is its own (the caches followed their beams)."""
  step_fn, init, logits_of = history_model(3, max_len=6)
  seeds = [1, 2, 3]
  cache, first = init(seeds)
  result = decoding.beam_search(step_fn, cache, first, beam_size=3, max_len=6, eos_id=EOS,
                                length_penalty=0.6)
  for row, seed in enumerate(seeds):
    sequence = np.asarray(result.tokens[row, :int(result.lengths[row])]).tolist()
    assert EOS not in sequence[:-1]
    np.testing.assert_allclose(result.log_prob[row],
                               python_sequence_log_prob(logits_of, seed, sequence), atol=1e-5)


def test_eos_pads_the_rest_and_an_early_stop_changes_nothing():
  """A model that ends every caption at once: length 1 and pads after, whatever max_len."""
  def step_fn(cache, tokens, index):
    del index
    return jnp.zeros((tokens.shape[0], V)).at[:, EOS].set(5.0), cache
  first = jnp.zeros((2, V)).at[:, EOS].set(5.0)
  for search in (functools.partial(decoding.greedy_decode),
                 functools.partial(decoding.beam_search, beam_size=2)):
    short = search(step_fn, {'c': jnp.zeros((2,))}, first, max_len=3, eos_id=EOS)
    long = search(step_fn, {'c': jnp.zeros((2,))}, first, max_len=8, eos_id=EOS)
    np.testing.assert_array_equal(short.lengths, [1, 1])
    np.testing.assert_array_equal(short.tokens, [[EOS, PAD, PAD]] * 2)
    np.testing.assert_array_equal(long.tokens[:, :3], short.tokens)
    np.testing.assert_allclose(long.log_prob, short.log_prob)


def test_rows_decode_independently():
  step_fn, init, _ = history_model(4)
  seeds = [8, 13, 21]
  cache, first = init(seeds)
  together = decoding.beam_search(step_fn, cache, first, beam_size=3, max_len=L, eos_id=EOS)
  for row, seed in enumerate(seeds):
    alone_cache, alone_first = init([seed])
    alone = decoding.beam_search(step_fn, alone_cache, alone_first, beam_size=3, max_len=L,
                                 eos_id=EOS)
    np.testing.assert_array_equal(together.tokens[row], alone.tokens[0])
    np.testing.assert_allclose(together.score[row], alone.score[0], atol=1e-6)


def test_bad_arguments_are_errors():
  step_fn, init, _ = history_model()
  cache, first = init([0])
  with pytest.raises(ValueError, match='max_len'):
    decoding.greedy_decode(step_fn, cache, first, max_len=0, eos_id=EOS)
  with pytest.raises(ValueError, match='beam_size'):
    decoding.beam_search(step_fn, cache, first, beam_size=0, max_len=L, eos_id=EOS)
