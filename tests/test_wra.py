"""UNITER word-region alignment: IPOT against an independent numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np

from vlpjax.objectives import wra


def _numpy_ipot(cost, beta=0.5, iterations=50):
  """Textbook IPOT (Xie et al. 2018), uniform marginals, one inner step.

  `cost` is [text, image]. UNITER puts the image on the rows of its plan and
  starts the text scaling at 1/|text|, so this runs on cost.T and returns the
  plan transposed back to [text, image].
  """
  c = cost.T.astype(np.float64)  # rows: image, columns: text
  rows, cols = c.shape
  kernel = np.exp(-c / beta)
  plan = np.ones_like(c)
  col_scale = np.full(cols, 1.0 / cols)
  for _ in range(iterations):
    q = kernel * plan
    row_scale = (1.0 / rows) / (q @ col_scale)
    col_scale = (1.0 / cols) / (q.T @ row_scale)
    plan = row_scale[:, None] * q * col_scale[None, :]
  return plan.T


def _numpy_cosine_cost(x, y):
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-5)
  y = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-5)
  return 1.0 - x @ y.T


def _padded_case(seed=0):
  rng = np.random.default_rng(seed)
  lengths = [(5, 4), (3, 6), (7, 2)]  # (text, regions) real lengths
  text = rng.normal(size=(3, 7, 8)).astype(np.float32)
  vision = rng.normal(size=(3, 6, 8)).astype(np.float32)
  text_mask = np.array([[1] * t + [0] * (7 - t) for t, _ in lengths], np.int32)
  region_mask = np.array([[1] * r + [0] * (6 - r) for _, r in lengths], np.int32)
  return lengths, text, vision, text_mask, region_mask


def test_distance_matches_numpy_ipot_on_unpadded_slices():
  lengths, text, vision, text_mask, region_mask = _padded_case()
  distance = wra.ot_distance(jnp.asarray(text), jnp.asarray(vision), text_mask, region_mask)
  for b, (t, r) in enumerate(lengths):
    cost = _numpy_cosine_cost(text[b, :t].astype(np.float64), vision[b, :r].astype(np.float64))
    expected = np.sum(cost * _numpy_ipot(cost))
    np.testing.assert_allclose(distance[b], expected, rtol=1e-5)


def test_plan_matches_reference_and_marginals():
  lengths, text, vision, text_mask, region_mask = _padded_case(1)
  joint = text_mask[:, :, None] * region_mask[:, None, :]
  cost = np.where(joint, wra.cosine_cost(text, vision), 0.0)
  plan = np.asarray(wra.ipot_plan(jnp.asarray(cost), text_mask, region_mask))
  for b, (t, r) in enumerate(lengths):
    reference = _numpy_ipot(cost[b, :t, :r])
    np.testing.assert_allclose(plan[b, :t, :r], reference, rtol=1e-4, atol=1e-7)
    assert np.all(plan[b, t:] == 0) and np.all(plan[b, :, r:] == 0)
    # The last update rescales the text side, so its marginal is exact.
    np.testing.assert_allclose(plan[b, :t, :r].sum(axis=1), 1.0 / t, rtol=1e-5)
    np.testing.assert_allclose(plan[b, :t, :r].sum(), 1.0, rtol=1e-3)


def test_padding_values_do_not_matter():
  _, text, vision, text_mask, region_mask = _padded_case(2)
  noisy_text = np.where(text_mask[..., None], text, 100.0)
  noisy_vision = np.where(region_mask[..., None], vision, -7.0)
  clean = wra.ot_distance(text, vision, text_mask, region_mask)
  noisy = wra.ot_distance(noisy_text, noisy_vision, text_mask, region_mask)
  np.testing.assert_allclose(clean, noisy, rtol=1e-6)


def test_no_gradient_through_the_plan():
  lengths, text, vision, text_mask, region_mask = _padded_case(3)
  plans = np.zeros((3, 7, 6), np.float32)
  for b, (t, r) in enumerate(lengths):
    plans[b, :t, :r] = _numpy_ipot(_numpy_cosine_cost(text[b, :t].astype(np.float64),
                                                      vision[b, :r].astype(np.float64)))

  def with_fixed_plan(x, y):  # <C(x, y), plan> with the plan a constant
    return jnp.sum(wra.cosine_cost(x, y) * plans)

  got = jax.grad(lambda x, y: wra.ot_distance(x, y, text_mask, region_mask).sum(),
                 argnums=(0, 1))(text, vision)
  want = jax.grad(with_fixed_plan, argnums=(0, 1))(text, vision)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-6)
  # Gradients through the plan would differ: the plan depends on the cost.
  assert np.abs(got[0]).max() > 0


def test_half_precision_inputs_compute_in_float32():
  _, text, vision, text_mask, region_mask = _padded_case(4)
  full = wra.ot_distance(text, vision, text_mask, region_mask)
  half = wra.ot_distance(jnp.asarray(text, jnp.bfloat16), jnp.asarray(vision, jnp.bfloat16),
                         text_mask, region_mask)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, rtol=2e-2)


def test_wra_loss_pulls_positives_and_pushes_negatives():
  distance = jnp.array([0.5, 0.25, 1.0, 2.0])
  positive = jnp.array([True, False, True, False])
  # UNITER: (sum positive - sum negative) / batch.
  np.testing.assert_allclose(wra.wra_loss(distance, positive), (0.5 + 1.0 - 0.25 - 2.0) / 4)
