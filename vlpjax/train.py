"""Pretraining: sharded train state, AdamW, the jitted train step and the loop.

`train_and_evaluate(config, workdir)` pretrains `config.model` on `config.data`
with the design's objectives (`vlpjax.objectives.pretraining`), resuming from
the newest checkpoint in `workdir` if there is one.

Sharding: the mesh and logical-axis rules come from `config.mesh`
(`vlpjax.sharding`). The state is initialised under `jit` with `out_shardings`
computed from `jax.eval_shape` of the init, so no array is ever materialised
whole on one device; the step is jitted with `in_shardings`/`out_shardings` and
donates the state. On the CPU the state also carries gradient buffers, which
each step overwrites in place (`keeps_grad_buffers`).

Randomness: every step's masking and dropout keys are `fold_in(key(seed), step)`,
so restoring the step restores the RNG exactly.

Gradient accumulation (`train.grad_accum_steps = K`): the masked inputs of the
whole global batch are made once; the forward pass runs over K microbatches in a
`scan` whose body is rematerialised, so only one microbatch's activations live
at a time while the losses see the outputs of the whole batch. The update is
therefore the full batch's (for any loss normalisation), up to float rounding;
only dropout draws differ (one key per microbatch).
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import os
from typing import Any, Callable, Iterator, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental import multihost_utils

from vlpjax import checkpointing, config_lib, flops, metrics as metrics_lib, sharding
from vlpjax.data import pipeline, tokenizer
from vlpjax.models import DESIGNS, get_model
from vlpjax.objectives import masking, pretraining

# Backbone outputs that are parameters, not per-example activations.
PARAM_OUTPUTS = ('word_embeddings',)


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar: updates applied so far
  params: Any
  opt_state: Any
  # The last step's gradients, kept only to be overwritten in place by the next
  # (`train.keep_grad_buffers`); never checkpointed.
  grads: Any = None


class NonFiniteLossError(FloatingPointError):
  """A loss or the gradient norm became NaN/Inf; the run stopped, keeping only
  checkpoints whose next step was finite."""


# ----------------------------------------------------------------------------
# Optimiser.

def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_fraction * num_steps`,
  then linear decay to `end_learning_rate` at `num_steps` (BERT/BertAdam style)."""
  warmup = int(round(train_config.warmup_fraction * train_config.num_steps))
  return optax.join_schedules([
      optax.linear_schedule(0.0, train_config.learning_rate, max(warmup, 1)),
      optax.linear_schedule(train_config.learning_rate, train_config.end_learning_rate,
                            max(train_config.num_steps - warmup, 1)),
  ], boundaries=[warmup])


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: not on biases or LayerNorm scales (BERT)."""
  def decays(path, _):
    return path[-1].key not in ('bias', 'scale')
  return jax.tree_util.tree_map_with_path(decays, params)


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


def make_optimizer(train_config: ml_collections.ConfigDict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping (if `grad_clip_norm` > 0) then AdamW on the schedule."""
  schedule = learning_rate_schedule(train_config)
  adamw = optax.adamw(schedule, b1=train_config.adam_b1, b2=train_config.adam_b2,
                      eps=train_config.adam_eps, weight_decay=train_config.weight_decay,
                      mask=decay_mask)
  if train_config.grad_clip_norm > 0:
    return optax.chain(clip_by_global_norm(train_config.grad_clip_norm), adamw), schedule
  return adamw, schedule


# ----------------------------------------------------------------------------
# Checks that run before anything is compiled.

def validate_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Raises ValueError, naming the config field, for settings that cannot work."""
  config_lib.check_fields(config)
  if config.model.name not in DESIGNS:
    raise ValueError(f'config.model.name must be one of {DESIGNS}, got {config.model.name!r}')
  train = config.train
  if train.num_steps < 1 or train.grad_accum_steps < 1:
    raise ValueError(f'config.train.num_steps ({train.num_steps}) and grad_accum_steps '
                     f'({train.grad_accum_steps}) must be >= 1')
  shards = sharding.data_parallel_size(mesh, config.mesh.data_axes)
  unit = math.lcm(shards * train.grad_accum_steps, jax.process_count())
  if train.global_batch_size <= 0 or train.global_batch_size % unit:
    raise ValueError(
        f'config.train.global_batch_size={train.global_batch_size} must be a multiple of '
        f'{unit}: the data axes {tuple(config.mesh.data_axes)} give {shards} batch shards, '
        f'times grad_accum_steps={train.grad_accum_steps}, over '
        f'{jax.process_count()} process(es)')
  source = config.init.source
  kind, _, directory = source.partition(':')
  if source and (kind not in ('orbax', 'bert') or not directory):
    raise ValueError(f"config.init.source must be '', 'orbax:DIR' or 'bert:DIR', "
                     f'got {source!r}')


def check_against_data(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> None:
  """Checks the model config against `pipeline.dataset_info`: feature width,
  vocabulary, and the class/answer counts the enabled objectives predict, which
  must also cover the largest object/attribute ids of the images table (an id
  past a head's labels gives a NaN loss, not an error)."""
  model, tasks = config.model, set(config.pretrain.tasks)
  def require(field, value, what):
    if value is not None and model[field] != value:
      raise ValueError(f'config.model.{field}={model[field]} but the dataset '
                       f'{config.data.name!r} has {what} {value}; set '
                       f'--config.model.{field}={value} or use matching data')
  def covers(field, max_id, first_label, what):
    # Label of id k: first_label + k.
    if max_id is not None and model[field] < max_id + first_label + 1:
      raise ValueError(f'config.model.{field}={model[field]} is too small: the images table '
                       f'{pipeline.table_name(config.data, "images")!r} has {what} up to '
                       f'{max_id}; set --config.model.{field} to at least '
                       f'{max_id + first_label + 1} (the detector\'s label count) or use '
                       'matching data')
  require('feature_dim', info['feature_dim'], 'region feature width')
  if model.vocab_size < info['vocab_size']:
    raise ValueError(f'config.model.vocab_size={model.vocab_size} is smaller than the '
                     f'tokenizer vocabulary ({info["vocab_size"]}, {info["vocab_file"]})')
  if tasks & {'region_kl', 'mrc', 'mrckl'}:
    require('num_region_classes', info['num_object_classes'],
            'detector classes (incl. background):')
    covers('num_region_classes', info['max_object_id'], 1,
           'object ids (label = id + 1, 0 being background)')
  if 'obj' in tasks:
    if info['num_object_classes'] is not None:
      require('num_object_labels', info['num_object_classes'] - 1,
              'object classes (less background):')
    covers('num_object_labels', info['max_object_id'], 0, 'object ids')
  if 'attr' in tasks:
    require('num_attr_labels', info['num_attributes'], 'attributes:')
    covers('num_attr_labels', info['max_attr_id'], 0, 'attribute ids')
  if 'qa' in tasks:
    if not config.data.qa:
      raise ValueError("config.pretrain.tasks has 'qa' but config.data.qa is False; "
                       'set --config.data.qa=True or drop the qa task')
    require('num_answers', info['num_answers'], 'answers:')


def with_vocab_token_ids(config: ml_collections.ConfigDict,
                         vocab: Mapping[str, int]) -> ml_collections.ConfigDict:
  """A copy of `config` whose `pretrain` token ids are those of `vocab`.

  The objectives default to bert-base's ids; the vocabulary in use decides.
  """
  config = copy.deepcopy(config)
  with config.unlocked():
    config.pretrain.mask_token_id = vocab['[MASK]']
    config.pretrain.special_token_ids = tuple(vocab[t] for t in ('[PAD]', '[CLS]', '[SEP]'))
  if config.pretrain.random_token_min >= len(vocab):
    raise ValueError(f'config.pretrain.random_token_min={config.pretrain.random_token_min} '
                     f'leaves no word of the {len(vocab)}-token vocabulary to draw')
  return config


# ----------------------------------------------------------------------------
# State.

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


def _to_host(tree: Any) -> Any:
  """Global arrays -> numpy on every process (gathers across processes)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def _from_host(tree: Any, shardings: Any) -> Any:
  """Numpy (the same on every process) -> global arrays in `shardings`."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
      tree, shardings)


def init_from(source: str, model_config: ml_collections.ConfigDict, state: TrainState,
              abstract: TrainState) -> TrainState:
  """Replaces params per `config.init.source` ('orbax:DIR' or 'bert:DIR').

  'orbax:DIR': the full params of this model, or only its backbone's (the tree
  under params['backbone'], as `vlpjax.convert` writes for a backbone), read
  straight into the state's shardings. 'bert:DIR': a transformers BertModel into
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
  if kind == 'orbax':
    stored = checkpointing.stored_top_level_keys(directory)
    if 'backbone' in params and 'backbone' not in stored:
      params['backbone'] = checkpointing.restore_params(directory, abstract.params['backbone'])
    else:
      params = checkpointing.restore_params(directory, abstract.params)
  else:
    from vlpjax.checkpoints import hf  # pylint: disable=g-import-not-at-top
    host = _to_host(params['backbone'])
    params['backbone'] = _from_host(hf.import_bert(model_config, directory, host),
                                    jax.tree.map(lambda a: a.sharding,
                                                 abstract.params['backbone']))
  logging.info('init: params from %s', source)
  return state.replace(params=params)


# ----------------------------------------------------------------------------
# The step.

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
  """The pretraining model's outputs for the whole batch, in `num_microbatches` pieces.

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
               task: str) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update on a global batch for the pretraining `task` (static).

  Returns the new state and scalar metrics: 'loss', each named loss,
  'grad_norm', 'learning_rate' (the rate this update used).
  """
  design = config.model.name
  mask_rng, dropout_rng = jax.random.split(masking.step_rng(config.seed, state.step))
  model_kwargs, targets = pretraining.make_inputs(design, batch, mask_rng, task, config)

  def loss_fn(params):
    outputs = forward(model, params, model_kwargs, dropout_rng,
                      config.train.grad_accum_steps)
    return pretraining.compute_losses(design, outputs, targets, task, config)

  (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, **losses, 'grad_norm': optax.global_norm(grads),
             'learning_rate': schedule(state.step)}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                    grads=None if state.grads is None else grads), metrics


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: jax.sharding.Mesh, state_shardings: TrainState, task: str
                    ) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step` for `task`, jitted over the mesh; the state argument is donated.

  With gradient buffers in the state, `keep_unused`: the buffers are never read,
  and an input that jit pruned could not be donated.
  """
  step = functools.partial(train_step, config=config, model=model, tx=tx,
                           schedule=schedule, task=task)
  return jax.jit(step,
                 in_shardings=(state_shardings,
                               sharding.batch_sharding(mesh, config.mesh.data_axes)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0, keep_unused=state_shardings.grads is not None)


def model_input_specs(config: ml_collections.ConfigDict, task: str,
                      batch_spec: Mapping[str, jax.ShapeDtypeStruct]
                      ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of the pretraining model's keyword inputs for a batch of `batch_spec`."""
  make = functools.partial(pretraining.make_inputs, config.model.name, task=task,
                           config=config)
  return jax.eval_shape(lambda b, r: make(b, r)[0], batch_spec, jax.random.key(0))


def peek_batch_spec(iterator: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes/dtypes of the iterator's batches, leaving its position unchanged."""
  position = iterator.get_state()
  batch = next(iterator)
  iterator.set_state(position)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def task_for_step(config: ml_collections.ConfigDict, tasks: list[str], step: int) -> str:
  """The task of `step`: sampled by ratio (UNITER mixing) or the single task."""
  if len(tasks) == 1:
    return tasks[0]
  return pretraining.sample_task(config.seed, step, pretraining.task_ratios(config))


def _check_finite(step: int, host_metrics: Mapping[str, float],
                  checkpointer: checkpointing.Checkpointer) -> None:
  """Raises NonFiniteLossError if a metric of `step` is NaN/Inf.

  Step s's metrics come from the parameters after step s - 1, so a checkpoint of
  step s - 1 holds parameters that gave them (resumed, it would fail at once): it
  is removed first. Every checkpoint left had a finite step after it.
  """
  bad = {k: v for k, v in host_metrics.items() if not math.isfinite(v)}
  if not bad:
    return
  removed = checkpointer.remove(step - 1)
  resume = checkpointer.latest_step()
  raise NonFiniteLossError(
      f'step {step}: non-finite ' + ', '.join(f'{k}={v}' for k, v in bad.items()) + '; ' +
      (f'removed the checkpoint of step {step - 1}, whose parameters gave them; '
       if removed else '') +
      (f'a rerun resumes from step {resume}' if resume is not None else
       'no checkpoint is left: a rerun starts afresh'))


# ----------------------------------------------------------------------------
# The loop.

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Pretrains per `config`, resuming from `workdir`; returns the last step's metrics.

  Stops at `train.num_steps`, after `train.max_steps_this_run` steps of this run,
  or at a preemption (SIGTERM); each time with a checkpoint of the final step.

  Raises:
    ValueError: a config that cannot work (before anything is compiled).
    NonFiniteLossError: a loss became NaN/Inf; the checkpoints kept are those
      whose next step was finite, and the message names the step a rerun
      resumes from.
    checkpointing.CheckpointCorruptError: no checkpoint reads back (or, with
      `checkpoint.on_corrupt='fail'`, the newest does not).
    checkpointing.CheckpointWriteError: a checkpoint could not be written.
  """
  design = config.model.name
  mesh = sharding.make_mesh(config)
  validate_config(config, mesh)
  rules = sharding.logical_axis_rules(config)
  info = pipeline.dataset_info(config.data)
  check_against_data(config, info)
  config = with_vocab_token_ids(config, tokenizer.read_vocab(info['vocab_file']))
  tasks = list(pretraining.tasks_for(design, config))
  model = get_model(config.model)
  tx, schedule = make_optimizer(config.train)
  iterator = pipeline.make_pretraining_iterator(
      config.data, design, global_batch_size=config.train.global_batch_size,
      seed=config.seed, mesh=mesh, data_axes=tuple(config.mesh.data_axes))
  batch_spec = peek_batch_spec(iterator)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))

  input_specs = model_input_specs(config, tasks[0], batch_spec)
  abstract, shardings = abstract_train_state(model, tx, input_specs, mesh, rules)
  logging.info('train state: %s over mesh %s', sharding.describe(shardings, abstract),
               dict(mesh.shape))
  checkpointer = checkpointing.Checkpointer(workdir, config.checkpoint)
  try:
    state = checkpointer.restore_latest(abstract, iterator)
    if state is None:
      state = init_train_state(model, tx, input_specs, config.seed, shardings)
      if config.init.source:
        state = init_from(config.init.source, config.model, state, abstract)
    if keeps_grad_buffers(config.train):
      state, shardings = with_grad_buffers(state, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return _loop(config, workdir, model, tx, schedule, mesh, shardings, tasks, state,
                   iterator, checkpointer, input_specs)
  finally:
    checkpointer.close()


def _loop(config: ml_collections.ConfigDict, workdir: str, model: nn.Module,
          tx: optax.GradientTransformation, schedule: optax.Schedule,
          mesh: jax.sharding.Mesh, shardings: TrainState, tasks: list[str],
          state: TrainState, iterator: Iterator, checkpointer: checkpointing.Checkpointer,
          input_specs: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, float]:
  """The step loop of `train_and_evaluate` (arguments as built there).

  The metrics of step s are fetched after step s+1 is dispatched, so the host
  waits while the device works; before any checkpoint is written the step's own
  metrics are checked, and non-finite ones also remove the checkpoint of the
  step before (`_check_finite`).
  """
  train = config.train
  start = int(state.step)
  last = train.num_steps
  if train.max_steps_this_run > 0:
    last = min(last, start + train.max_steps_this_run)
  # FLOPs only serve MFU, which needs the device's peak (none on CPU).
  mfu_known = flops.peak_flops(jax.devices()[0].device_kind) is not None
  writer = metrics_lib.MetricWriter(
      workdir, start_step=start, total_steps=train.num_steps,
      examples_per_step=train.global_batch_size,
      flops_per_step=flops_per_step(config, input_specs) if mfu_known else None)
  compiled = {}
  pending: tuple[int, dict[str, jax.Array]] | None = None
  host_metrics: dict[str, float] = {}

  def finish(step, step_metrics):
    nonlocal host_metrics
    host_metrics = metrics_lib.to_host(step_metrics)
    _check_finite(step, host_metrics, checkpointer)
    # The run's first step is logged too: the starting loss.
    if step % train.log_every_steps == 0 or step in (start + 1, last):
      writer.write(step, host_metrics)

  try:
    with checkpointing.PreemptionWatcher() as preemption:
      for step in range(start + 1, last + 1):
        task = task_for_step(config, tasks, step - 1)
        if task not in compiled:
          compiled[task] = make_train_step(config, model, tx, schedule, mesh, shardings, task)
        state, step_metrics = compiled[task](state, next(iterator))
        if pending:
          finish(*pending)
        pending = (step, step_metrics)
        preempted = preemption.reached(step)
        if preempted or step == last or checkpointer.should_save(step):
          finish(*pending)
          pending = None
          checkpointer.save(step, state.replace(grads=None), iterator, force=True)
        if preempted:
          logging.warning('preempted: saved step %d, exiting', step)
          break
  finally:
    writer.close()
  return host_metrics


def flops_per_step(config: ml_collections.ConfigDict,
                   input_specs: Mapping[str, jax.ShapeDtypeStruct]) -> float:
  """Model FLOPs of one step over the global batch (`vlpjax.flops`)."""
  return config.train.global_batch_size * flops.model_flops_per_example(
      config.model, input_specs['input_ids'].shape[1], input_specs['region_feats'].shape[1])
