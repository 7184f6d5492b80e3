"""The train state: created sharded (never whole on one device), and
initialised from scratch, from a vlpjax checkpoint or from BERT.

The state is initialised under `jit` with `out_shardings` computed from
`jax.eval_shape` of the init. On the CPU the state also carries gradient
buffers, which each step overwrites in place (`keeps_grad_buffers`).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental import multihost_utils

from vlpjax import checkpointing, sharding
from vlpjax.models import layers


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar: updates applied so far
  params: Any
  opt_state: Any
  # The last step's gradients, kept only to be overwritten in place by the next
  # (`train.keep_grad_buffers`); never checkpointed.
  grads: Any = None


def _zeros_like_spec(spec: jax.ShapeDtypeStruct, batch: int = 1) -> jax.Array:
  """Zeros of `spec`'s dtype with the leading (batch) dim set to `batch`."""
  return jnp.zeros((batch,) + tuple(spec.shape[1:]), spec.dtype)


def _init_params_boxed(model: nn.Module, input_specs: Mapping[str, jax.ShapeDtypeStruct],
                       rng: jax.Array) -> Any:
  """Params with their logical-axis boxes, from a one-example input of `input_specs`."""
  inputs = {k: _zeros_like_spec(v) for k, v in input_specs.items()}
  return model.init({'params': rng}, **inputs)['params']


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation,
                         input_specs: Mapping[str, jax.ShapeDtypeStruct],
                         mesh: jax.sharding.Mesh, rules: sharding.Rules
                         ) -> tuple[TrainState, TrainState]:
  """(abstract TrainState of ShapeDtypeStructs with shardings, its shardings)."""
  rng = jax.random.key(0)
  boxed = jax.eval_shape(functools.partial(_init_params_boxed, model, input_specs), rng)
  param_specs = nn.get_partition_spec(boxed)
  params = nn.meta.unbox(boxed)
  opt_state = jax.eval_shape(tx.init, params)
  # Optimiser moments shard like their params; counters are replicated.
  opt_specs = optax.tree_utils.tree_map_params(
      tx, lambda _, spec: spec, opt_state, param_specs,
      transform_non_params=lambda _: jax.sharding.PartitionSpec(),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=opt_state)
  specs = TrainState(step=jax.sharding.PartitionSpec(), params=param_specs,
                     opt_state=opt_specs)
  shardings = sharding.shardings_from_logical(specs, abstract, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return abstract, shardings


def init_train_state(model: nn.Module, tx: optax.GradientTransformation,
                     input_specs: Mapping[str, jax.ShapeDtypeStruct], seed: int,
                     shardings: TrainState) -> TrainState:
  """A fresh state, created directly in `shardings` (params from `key(seed)`)."""
  def init(rng):
    params = nn.meta.unbox(_init_params_boxed(model, input_specs, rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def keeps_grad_buffers(train_config: ml_collections.ConfigDict) -> bool:
  """`train.keep_grad_buffers`, where None means: on the CPU only.

  XLA gives each step's gradients fresh memory; on the CPU that memory comes from
  the OS page by page (LXMERT-base: 285,000 page faults per step). Kept in the
  state, the gradients are written over the last step's buffers (its CPU step
  3.7 s -> 3.1-3.3 s, benchmarks/RESULTS.md).
  Accelerators' allocators reuse memory already, and there the buffers would only
  raise the peak (they live through the forward pass).
  """
  keep = train_config.keep_grad_buffers
  return jax.default_backend() == 'cpu' if keep is None else bool(keep)


def with_grad_buffers(state: TrainState, shardings: TrainState
                      ) -> tuple[TrainState, TrainState]:
  """`state` and `shardings` with zero gradient buffers laid out like the params."""
  shardings = shardings.replace(grads=shardings.params)
  grads = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p),
                  out_shardings=shardings.params)(state.params)
  return state.replace(grads=grads), shardings


def to_host(tree: Any) -> Any:
  """Global arrays -> numpy on every process (gathers across processes)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def from_host(tree: Any, shardings: Any) -> Any:
  """Numpy (the same on every process) -> global arrays in `shardings`."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
      tree, shardings)


def init_from(source: str, model_config: ml_collections.ConfigDict, state: TrainState,
              abstract: TrainState) -> TrainState:
  """Replaces params per `config.init.source` ('workdir:DIR', 'orbax:DIR' or 'bert:DIR').

  'workdir:DIR': the backbone of the newest checkpoint of a vlpjax run in DIR
  (pretraining, or another task), e.g. to fine-tune a pretrained model.
  'orbax:DIR': the full params of this model, or only its backbone's (the tree
  under params['backbone'], as `vlpjax.convert` writes for a backbone, or the
  backbone of another model's params, e.g. a converted pretraining checkpoint
  for a fine-tuning task), read straight into the state's shardings. 'bert:DIR': a transformers BertModel into
  the text side (`vlpjax.checkpoints.hf.import_bert`). DIR is local (relative to
  the working directory) or gs://.
  The optimiser state stays fresh (zero moments).

  Raises:
    FileNotFoundError: DIR does not exist.
    ValueError: DIR holds no checkpoint of that kind, or one that does not fit
      the model (`CheckpointMismatchError`).
  """
  kind, directory = source.split(':', 1)
  params = dict(state.params)
  if kind == 'workdir':
    params['backbone'], _ = checkpointing.restore_workdir_params(
        directory, abstract.params['backbone'], subtree='backbone')
  elif kind == 'orbax':
    stored = checkpointing.stored_top_level_keys(directory)
    if 'backbone' in params and 'backbone' not in stored:
      params['backbone'] = checkpointing.restore_params(directory, abstract.params['backbone'])
    elif 'backbone' in params and stored != set(params):
      # Another model's params around the same backbone (a converted pretraining
      # checkpoint for a fine-tuning task): its backbone alone.
      params['backbone'] = checkpointing.restore_params(directory, abstract.params['backbone'],
                                                        subtree='backbone')
    else:
      params = checkpointing.restore_params(directory, abstract.params)
  else:
    from vlpjax.checkpoints import hf  # pylint: disable=g-import-not-at-top
    # The BERT rules name layers one by one: a scanned stack is filled unstacked.
    host = layers.unstacked_layers(to_host(params['backbone']))
    imported = layers.layers_like(hf.import_bert(model_config, directory, host),
                                  abstract.params['backbone'])
    params['backbone'] = from_host(imported, jax.tree.map(lambda a: a.sharding,
                                                          abstract.params['backbone']))
  logging.info('init: params from %s', source)
  return state.replace(params=params)
