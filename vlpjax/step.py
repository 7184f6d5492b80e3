"""The jitted train step, for any task: the task makes the inputs and targets,
the design's model runs forward, the task computes the losses.

Randomness: every step's masking and dropout keys are `fold_in(key(seed), step)`,
so restoring the step restores the RNG exactly.

Gradient accumulation (`train.grad_accum_steps = K`): the inputs and targets of
the whole global batch are made once (masking as for one step), then a `scan`
over K microbatches runs each one's forward and backward and sums their
gradients and losses: one microbatch's activations and outputs live at a time,
and nothing is recomputed. Every loss and metric is a ratio whose denominator
depends on targets alone (`objectives.common.ratio`); the full batch's
denominators are recorded once and each microbatch divides by them, so the
sums are the full batch's losses and gradient, up to float rounding. Only
dropout draws differ (one key per microbatch).

A task (`vlpjax.tasks`) gives `make_inputs(config, batch, rng, objective) ->
(model kwargs, targets)` and `compute_losses(config, outputs, targets,
objective) -> (total, {name: loss})`; `objective` is static (one compiled
step per objective: UNITER's sampled pretraining tasks).
"""
from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlpjax import sharding
from vlpjax.objectives import common, masking
from vlpjax.state import TrainState

# Backbone outputs that are parameters, not per-example activations.
PARAM_OUTPUTS = ('word_embeddings',)


def _split_microbatches(x: jax.Array, num: int) -> jax.Array:
  """[B, ...] -> [num, B/num, ...], microbatch j = examples j, j+num, j+2num, ...

  Strided so that each microbatch keeps an equal share of every device's batch
  shard (a contiguous split would put microbatch 0 on the first devices only).
  """
  return jnp.swapaxes(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 0, 1)


def forward(model: nn.Module, params: Any, model_kwargs: Mapping[str, Any],
            dropout_rng: jax.Array) -> dict[str, Any]:
  """The model's training outputs; parameter outputs (`PARAM_OUTPUTS`) are
  dropped: losses need activations only."""
  outputs = model.apply({'params': params}, **model_kwargs, deterministic=False,
                        rngs={'dropout': dropout_rng})
  return {k: v for k, v in outputs.items() if k not in PARAM_OUTPUTS}


Losses = Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[jax.Array, dict[str, jax.Array]]]


def accumulated_value_and_grad(model: nn.Module, losses_of: Losses, params: Any,
                               model_kwargs: Mapping[str, Any], targets: Mapping[str, Any],
                               dropout_rng: jax.Array, num_microbatches: int
                               ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Any]:
  """((total, named losses), grads) of `losses_of(outputs, targets)` over the
  whole batch, summed over `num_microbatches` (module docstring). Inputs and
  targets [B, ...] are split over the microbatches; those [1, ...] (shared by
  every example, e.g. captioning's attention mask) go whole to each.

  Raises:
    ValueError: an input or target whose leading axis is neither B nor 1.
  """
  leaves = jax.tree_util.tree_leaves_with_path((model_kwargs, targets))
  batch = max(jnp.shape(leaf)[0] for _, leaf in leaves if jnp.ndim(leaf))
  for path, leaf in leaves:
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] not in (batch, 1):
      raise ValueError(f'gradient accumulation splits every input and target over the batch '
                       f'({batch}) or shares it whole ([1, ...]); '
                       f'{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}')
  output_specs = jax.eval_shape(lambda p: forward(model, p, model_kwargs, dropout_rng), params)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), output_specs)
  # The full batch's denominators, from targets alone (the zero outputs'
  # numerators are dead code, which XLA removes).
  with common.recorded_denominators() as denominators:
    value_spec = losses_of(zeros, targets)
  split = lambda tree: jax.tree.map(
      lambda x: (_split_microbatches(x, num_microbatches) if x.shape[0] == batch else
                 jnp.broadcast_to(x, (num_microbatches,) + x.shape)), tree)
  rngs = jax.random.split(dropout_rng, num_microbatches)

  def micro_losses(params, kwargs, micro_targets, rng):
    outputs = forward(model, params, kwargs, rng)
    with common.replayed_denominators(denominators):
      return losses_of(outputs, micro_targets)

  def body(carry, inputs):
    value_and_grads = jax.value_and_grad(micro_losses, has_aux=True)(params, *inputs)
    return jax.tree.map(jnp.add, carry, value_and_grads), None

  initial = jax.tree.map(jnp.zeros_like, (value_spec, params))
  (value, grads), _ = jax.lax.scan(body, initial, (split(model_kwargs), split(targets), rngs))
  return value, grads


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *,
               config: ml_collections.ConfigDict, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               task: ModuleType, objective: str) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on a global batch for the task's `objective` (static).

  Returns the new state and scalar metrics: 'loss', each named loss,
  'grad_norm', 'learning_rate' (the rate this update used).
  """
  input_rng, dropout_rng = jax.random.split(masking.step_rng(config.seed, state.step))
  # Named scopes label the step's parts in HLO metadata and profiles
  # (benchmarks/step_profile.py); the model's ops carry its module names.
  with jax.named_scope('inputs'):
    model_kwargs, targets = task.make_inputs(config, batch, input_rng, objective)

  def losses_of(outputs, targets):
    with jax.named_scope('losses'):
      return task.compute_losses(config, outputs, targets, objective)

  if config.train.grad_accum_steps > 1:
    (loss, losses), grads = accumulated_value_and_grad(
        model, losses_of, state.params, model_kwargs, targets, dropout_rng,
        config.train.grad_accum_steps)
  else:
    loss_fn = lambda params: losses_of(forward(model, params, model_kwargs, dropout_rng), targets)
    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  with jax.named_scope('optimizer'):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, **losses, 'grad_norm': optax.global_norm(grads),
             'learning_rate': schedule(state.step)}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                    grads=None if state.grads is None else grads), metrics


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: jax.sharding.Mesh, state_shardings: TrainState,
                    task: ModuleType, objective: str
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step` for `objective`, jitted over the mesh; the state argument is donated.

  With gradient buffers in the state, `keep_unused`: the buffers are never read,
  and an input that jit pruned could not be donated.
  """
  step = functools.partial(train_step, config=config, model=model, tx=tx,
                           schedule=schedule, task=task, objective=objective)
  return jax.jit(step,
                 in_shardings=(state_shardings,
                               sharding.batch_sharding(mesh, config.mesh.data_axes)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0, keep_unused=state_shardings.grads is not None)


def model_input_specs(config: ml_collections.ConfigDict, task: ModuleType, objective: str,
                      batch_spec: Mapping[str, jax.ShapeDtypeStruct]
                      ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of the model's keyword inputs for a batch of `batch_spec`."""
  return jax.eval_shape(lambda b, r: task.make_inputs(config, b, r, objective)[0],
                        batch_spec, jax.random.key(0))
