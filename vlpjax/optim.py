"""The optimiser: AdamW on BERT's warmup-then-linear-decay schedule, with
global-norm clipping, the design's weight-decay rule and an optional learning-rate
multiplier for the task heads."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlpjax.models import Design


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_fraction * num_steps`,
  then linear decay to `end_learning_rate` at `num_steps` (BERT/BertAdam style)."""
  warmup = int(round(train_config.warmup_fraction * train_config.num_steps))
  return optax.join_schedules([
      optax.linear_schedule(0.0, train_config.learning_rate, max(warmup, 1)),
      optax.linear_schedule(train_config.learning_rate, train_config.end_learning_rate,
                            max(train_config.num_steps - warmup, 1)),
  ], boundaries=[warmup])


def decay_mask(design: Design) -> Callable[[Any], Any]:
  """params -> a tree of bools, True where `design`'s original rule decays the
  parameter (`Design.decays`)."""
  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: design.decays(tuple(k.key for k in path)), params)
  return mask


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` as one scalar factor: g * min(1, max_norm / |g|).

  The same clip (to rounding); a scalar multiply fuses into AdamW's update, while
  optax's per-element divide makes XLA write a clipped copy of every gradient
  first (a sixth of the LXMERT-base step on CPU).
  """
  def update(updates, state, params=None):
    del params
    factor = jnp.minimum(1.0, max_norm / optax.global_norm(updates))
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def scale_heads(multiplier: float, backbone: str = 'backbone'
                ) -> optax.GradientTransformation:
  """Multiplies the updates of every top-level params entry but `backbone` (the
  task's heads) by `multiplier`.

  Applied after AdamW this is the heads' learning rate x `multiplier` (decay
  included, as a PyTorch AdamW param group with that lr): UNITER fine-tunes its
  heads at 10x the backbone's rate.
  """
  def update(updates, state, params=None):
    del params
    return {name: tree if name == backbone else jax.tree.map(lambda u: u * multiplier, tree)
            for name, tree in updates.items()}, state

  return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(train_config: ml_collections.ConfigDict, design: Design
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping (if `grad_clip_norm` > 0) then AdamW on the schedule,
  decaying the parameters `design`'s rule decays, then the heads' updates scaled
  by `head_lr_multiplier` (if not 1)."""
  schedule = learning_rate_schedule(train_config)
  transforms = [optax.adamw(schedule, b1=train_config.adam_b1, b2=train_config.adam_b2,
                            eps=train_config.adam_eps, weight_decay=train_config.weight_decay,
                            mask=decay_mask(design))]
  if train_config.grad_clip_norm > 0:
    transforms.insert(0, clip_by_global_norm(train_config.grad_clip_norm))
  if train_config.head_lr_multiplier != 1:
    transforms.append(scale_heads(train_config.head_lr_multiplier))
  return (optax.chain(*transforms) if len(transforms) > 1 else transforms[0]), schedule
