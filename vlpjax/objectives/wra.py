"""UNITER word-region alignment (WRA): optimal transport between text and image outputs.

The distance is <C, T> for the cosine cost C [B, M, N] between text tokens and
regions, with the transport plan T from IPOT (inexact proximal point: beta 0.5,
50 outer iterations, k = 1 inner) under uniform marginals over the real tokens
and regions. As in UNITER's `ot.py`: everything runs in float32, padded
positions get zero cost and zero plan, and no gradient flows through the plan.

The loss (UNITER's `pretrain.py`) pulls matched pairs together and pushes
mismatched ones apart: (sum of positive distances - sum of negative distances)
/ batch size, added to the ITM loss with weight 0.1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vlpjax.objectives import common

NORMALIZE_EPS = 1e-5  # UNITER's F.normalize eps
PAD_PENALTY = 1e4     # keeps padded entries of the scaling vectors at ~0


def cosine_cost(x: jax.Array, y: jax.Array) -> jax.Array:
  """1 - cosine similarity: x [B, M, D], y [B, N, D] -> [B, M, N] (float32)."""
  def normalize(v):
    v = v.astype(jnp.float32)
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), NORMALIZE_EPS)
  return 1.0 - jnp.einsum('bmd,bnd->bmn', normalize(x), normalize(y))


def ipot_plan(cost: jax.Array, x_mask: jax.Array, y_mask: jax.Array, *, beta: float = 0.5,
              iterations: int = 50, inner_steps: int = 1) -> jax.Array:
  """IPOT transport plan for uniform marginals over the real positions.

  Args:
    cost: [B, M, N], already 0 at padded pairs.
    x_mask: [B, M], y_mask: [B, N]; nonzero on real positions (at least one each).
    beta: proximal step size; iterations, inner_steps: outer and inner (k) loops.

  Returns:
    plan [B, M, N] (0 at padded pairs), rows summing to 1/|x|, columns to 1/|y|.
  """
  cost = jax.lax.stop_gradient(cost.astype(jnp.float32))
  x_real = x_mask.astype(jnp.float32)
  y_real = y_mask.astype(jnp.float32)
  joint = x_real[:, :, None] * y_real[:, None, :]
  x_len = x_real.sum(axis=1, keepdims=True)  # [B, 1]
  y_len = y_real.sum(axis=1, keepdims=True)
  x_pad = (1.0 - x_real) * PAD_PENALTY
  y_pad = (1.0 - y_real) * PAD_PENALTY
  kernel = jnp.exp(-cost / beta) * joint

  def outer(_, state):
    plan, sigma = state
    q = kernel * plan
    delta = jnp.ones_like(y_real)
    for _ in range(inner_steps):
      delta = 1.0 / (y_len * jnp.einsum('bmn,bm->bn', q, sigma) + y_pad)
      sigma = 1.0 / (x_len * jnp.einsum('bmn,bn->bm', q, delta) + x_pad)
    return delta[:, None, :] * q * sigma[:, :, None], sigma

  sigma0 = x_real / x_len
  plan, _ = jax.lax.fori_loop(0, iterations, outer, (joint, sigma0))
  return jax.lax.stop_gradient(plan * joint)


def ot_distance(text: jax.Array, vision: jax.Array, text_mask: jax.Array,
                region_mask: jax.Array, *, beta: float = 0.5, iterations: int = 50,
                inner_steps: int = 1) -> jax.Array:
  """Optimal-transport distance per example: [B, M, D], [B, N, D], masks -> [B] float32.

  Gradients flow through the cost only (the plan is a constant).
  """
  joint = text_mask.astype(bool)[:, :, None] & region_mask.astype(bool)[:, None, :]
  cost = jnp.where(joint, cosine_cost(text, vision), 0.0)
  plan = ipot_plan(cost, text_mask, region_mask, beta=beta, iterations=iterations,
                   inner_steps=inner_steps)
  return jnp.sum(cost * plan, axis=(1, 2))


def wra_loss(distance: jax.Array, positive: jax.Array, weights: jax.Array | None = None
             ) -> jax.Array:
  """(sum of positive distances - sum of negative distances) / B.

  distance: [B]; positive: [B] bool (matched pairs); weights: [B] (0 on padded
  rows) or None, for the weighted mean.
  """
  signed = jnp.where(positive, distance, -distance)
  if weights is None:
    return common.mean(signed)
  weights = weights.astype(jnp.float32)
  return common.ratio(jnp.sum(signed * weights), jnp.maximum(jnp.sum(weights), 1.0))
