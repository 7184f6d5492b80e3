"""The jitted train step, for any task: the task makes the inputs and targets,
the design's model runs forward, the task computes the losses.

Randomness: every step's masking and dropout keys are `fold_in(key(seed), step)`,
so restoring the step restores the RNG exactly.

Gradient accumulation (`train.grad_accum_steps = K`): the inputs of the whole
global batch are made once; the forward pass runs over K microbatches in a
`scan` whose body is rematerialised, so only one microbatch's activations live
at a time while the losses see the outputs of the whole batch. The update is
therefore the full batch's (for any loss normalisation), up to float rounding;
only dropout draws differ (one key per microbatch).

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
from vlpjax.objectives import masking
from vlpjax.state import TrainState

# Backbone outputs that are parameters, not per-example activations.
PARAM_OUTPUTS = ('word_embeddings',)


def _split_microbatches(x: jax.Array, num: int) -> jax.Array:
  """[B, ...] -> [num, B/num, ...], microbatch j = examples j, j+num, j+2num, ...

  Strided so that each microbatch keeps an equal share of every device's batch
  shard (a contiguous split would put microbatch 0 on the first devices only).
  """
  return jnp.swapaxes(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 0, 1)


def _merge_microbatches(x: jax.Array) -> jax.Array:
  """Inverse of `_split_microbatches`: [num, B/num, ...] -> [B, ...]."""
  return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def forward(model: nn.Module, params: Any, model_kwargs: Mapping[str, Any],
            dropout_rng: jax.Array, num_microbatches: int) -> dict[str, Any]:
  """The model's outputs for the whole batch, in `num_microbatches` pieces.

  Parameter outputs (`PARAM_OUTPUTS`) are dropped: losses need activations only.
  """
  def apply(params, kwargs, rng):
    outputs = model.apply({'params': params}, **kwargs, deterministic=False,
                          rngs={'dropout': rng})
    return {k: v for k, v in outputs.items() if k not in PARAM_OUTPUTS}

  if num_microbatches == 1:
    return apply(params, model_kwargs, dropout_rng)
  micro = jax.tree.map(lambda x: _split_microbatches(x, num_microbatches), model_kwargs)
  rngs = jax.random.split(dropout_rng, num_microbatches)
  apply_remat = jax.checkpoint(apply)

  def body(carry, inputs):
    kwargs, rng = inputs
    return carry, apply_remat(params, kwargs, rng)

  _, stacked = jax.lax.scan(body, None, (micro, rngs))
  return jax.tree.map(_merge_microbatches, stacked)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *,
               config: ml_collections.ConfigDict, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               task: ModuleType, objective: str) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on a global batch for the task's `objective` (static).

  Returns the new state and scalar metrics: 'loss', each named loss,
  'grad_norm', 'learning_rate' (the rate this update used).
  """
  input_rng, dropout_rng = jax.random.split(masking.step_rng(config.seed, state.step))
  model_kwargs, targets = task.make_inputs(config, batch, input_rng, objective)

  def loss_fn(params):
    outputs = forward(model, params, model_kwargs, dropout_rng,
                      config.train.grad_accum_steps)
    return task.compute_losses(config, outputs, targets, objective)

  (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
