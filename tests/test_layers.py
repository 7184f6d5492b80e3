"""Shared layers: BERT numerics, attention paths, masking semantics."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax.models import heads, layers
from vlpjax.objectives import common


def _inputs(batch=2, length=5, width=32):
  x = jax.random.normal(jax.random.key(0), (batch, length, width))
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])[:batch, :length]
  return x, mask


def test_gelu_is_exact_erf():
  x = jnp.linspace(-4, 4, 101)
  expected = 0.5 * x * (1 + jax.scipy.special.erf(x / np.sqrt(2)))
  np.testing.assert_allclose(layers.gelu(x), expected, atol=1e-6)
  assert np.abs(layers.gelu(x) - jax.nn.gelu(x)).max() > 1e-4  # not the tanh form


def test_layer_norm_eps_is_bert():
  # Tiny variance: eps 1e-12 still normalises fully, Flax's default 1e-6 would not.
  x = jnp.array([[0.0, 0.0, 0.0, 1e-3]])
  norm = layers.LayerNorm()
  out = norm.apply(norm.init(jax.random.key(0), x), x)
  expected = (x - x.mean()) / x.std()
  np.testing.assert_allclose(out, expected, rtol=1e-4)


@pytest.mark.parametrize('impl', ['xla', 'auto'])
def test_fused_and_explicit_attention_agree(impl):
  x, mask = _inputs()
  layer = layers.TransformerLayer(4, 64, attention_impl=impl)
  params = layer.init(jax.random.key(1), x, mask)
  fused, none = layer.apply(params, x, mask)
  explicit, probs = layer.apply(params, x, mask, True, True)
  assert none is None
  np.testing.assert_allclose(fused, explicit, atol=1e-5)
  assert probs.shape == (2, 4, 5, 5)
  np.testing.assert_allclose(probs[0, :, :, 3:], 0.0)  # padded keys get no weight
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)


def test_explicit_attention_matches_the_fused_path_in_bfloat16():
  """Scores and softmax in float32 on both paths: bf16 outputs agree (before,
  with bf16 scores, they differed by up to 0.375 on these inputs)."""
  q, k, v = (3 * jax.random.normal(jax.random.key(i), (4, 40, 4, 64)).astype(jnp.bfloat16)
             for i in range(3))
  key_mask = (jax.random.uniform(jax.random.key(9), (4, 40)) > 0.2).astype(jnp.int32)
  fused, _ = layers.attend(q, k, v, key_mask, impl='xla')
  explicit, probs = layers.attend(q, k, v, key_mask, impl='xla', return_probs=True)
  assert fused.dtype == explicit.dtype == jnp.bfloat16 and probs.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(explicit, np.float32),
                             atol=1e-2)


def test_boolean_mask_matches_additive_minus_10000():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 3, 2, 8)) for i in range(3))
  key_mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  context, _ = layers.attend(q, k, v, key_mask)
  scores = jnp.einsum('btnd,bsnd->bnts', q, k) / np.sqrt(8)
  scores = scores + (1.0 - key_mask[:, None, None, :]) * -10000.0
  expected = jnp.einsum('bnts,bsnd->btnd', jax.nn.softmax(scores, -1), v)
  np.testing.assert_allclose(context, expected, atol=1e-6)


def test_padding_does_not_change_valid_outputs():
  x, mask = _inputs()
  layer = layers.TransformerLayer(4, 64)
  params = layer.init(jax.random.key(1), x, mask)
  out, _ = layer.apply(params, x, mask)
  garbage = x.at[0, 3:].set(100.0)
  out2, _ = layer.apply(params, garbage, mask)
  np.testing.assert_allclose(out[0, :3], out2[0, :3], atol=1e-5)


def test_dropout_needs_rng_and_changes_output():
  x, mask = _inputs()
  layer = layers.TransformerLayer(4, 64)
  params = layer.init(jax.random.key(1), x, mask)
  eval_out, _ = layer.apply(params, x, mask)
  train_out, _ = layer.apply(params, x, mask, False, rngs={'dropout': jax.random.key(2)})
  assert np.abs(train_out - eval_out).max() > 1e-3
  with pytest.raises(Exception):
    layer.apply(params, x, mask, False)


def test_bf16_compute_keeps_fp32_params():
  x, mask = _inputs()
  layer = layers.TransformerLayer(4, 64, dtype=jnp.bfloat16)
  params = layer.init(jax.random.key(1), x, mask)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(flax.linen.meta.unbox(params)))
  out, _ = layer.apply(params, x, mask)
  assert out.dtype == jnp.bfloat16
  ref, _ = layers.TransformerLayer(4, 64).apply(params, x, mask)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.1)


def test_remat_gives_same_values_and_grads():
  x, mask = _inputs()
  plain = layers.TransformerLayer(4, 64)
  remat = layers.maybe_remat(layers.TransformerLayer, True)(4, 64)
  params = plain.init(jax.random.key(1), x, mask)
  loss = lambda m: lambda p: m.apply(p, x, mask, True, False)[0].sum()
  np.testing.assert_allclose(loss(plain)(params), loss(remat)(params), rtol=1e-6)
  g1, g2 = jax.grad(loss(plain))(params), jax.grad(loss(remat))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_every_param_has_logical_axes():
  x, mask = _inputs()
  params = layers.TransformerLayer(4, 64).init(jax.random.key(1), x, mask)
  boxed = jax.tree.leaves(params, is_leaf=lambda l: isinstance(l, flax.linen.Partitioned))
  assert boxed and all(isinstance(p, flax.linen.Partitioned) for p in boxed)


def test_unknown_attention_impl_is_an_error():
  with pytest.raises(ValueError, match='attention_impl'):
    layers.resolve_attention_impl('flash', jnp.float32)


@pytest.mark.parametrize('vocab_size, rows', [(1, 128), (128, 128), (129, 256), (30522, 30592),
                                              (28996, 29056)])
def test_word_tables_are_padded_to_a_multiple_of_128(vocab_size, rows):
  assert layers.padded_vocab_size(vocab_size) == rows


def test_mlm_head_masks_the_padding_ids():
  """Padding ids get the lowest logit: the loss over the padded table equals the
  loss over the vocabulary, and no gradient reaches the padding rows."""
  vocab_size, hidden = 100, 16
  rows = layers.padded_vocab_size(vocab_size)
  head = heads.MaskedLMHead(vocab_size)
  states = jax.random.normal(jax.random.key(0), (2, 5, hidden))
  positions = jnp.array([[0, 2, 4], [1, 3, 3]])
  table = jax.random.normal(jax.random.key(1), (rows, hidden))
  params = head.init(jax.random.key(2), states, positions, table)
  targets = jnp.array([[3, 99, 0], [50, 7, 98]])

  def loss(table, keep):
    logits = head.apply(params, states, positions, table)[..., :keep]
    return common.cross_entropy(logits, targets).mean()

  logits = head.apply(params, states, positions, table)
  assert logits.shape == (2, 3, rows)
  np.testing.assert_array_equal(logits[..., vocab_size:], jnp.finfo(jnp.float32).min)
  np.testing.assert_allclose(loss(table, rows), loss(table, vocab_size), rtol=1e-6)
  gradient = jax.grad(loss)(table, rows)
  np.testing.assert_array_equal(gradient[vocab_size:], 0.0)
  assert np.abs(gradient[:vocab_size]).max() > 0


def test_float32_logits_of_the_mlm_head_in_bfloat16():
  """`float32_logits`: a bf16 model's MLM logits come out in float32 and close to
  the float32 model's (bf16 logits are rounded to about 3 digits)."""
  vocab, hidden = 1000, 64
  rng = np.random.default_rng(0)
  states = jnp.asarray(rng.normal(size=(2, 6, hidden)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(layers.padded_vocab_size(vocab), hidden)), jnp.float32)
  positions = jnp.asarray([[1, 2], [3, 4]], jnp.int32)
  reference = heads.MaskedLMHead(vocab)
  params = reference.init(jax.random.key(0), states, positions, table)
  want = reference.apply(params, states, positions, table)
  logits = {}
  for float32_logits in (False, True):
    head = heads.MaskedLMHead(vocab, dtype=jnp.bfloat16, float32_logits=float32_logits)
    logits[float32_logits] = head.apply(params, states.astype(jnp.bfloat16), positions, table)
  assert logits[False].dtype == jnp.bfloat16 and logits[True].dtype == jnp.float32
  real = np.arange(table.shape[0]) < vocab
  error = {k: float(jnp.max(jnp.abs(v[..., real].astype(jnp.float32) - want[..., real])))
           for k, v in logits.items()}
  # What is left with float32 logits is the bf16 transform's rounding.
  assert error[True] < error[False], error
