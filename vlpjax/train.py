"""Training: `train_and_evaluate(config, workdir)` trains `config.task`
(`vlpjax.tasks`: pretraining or a downstream task) with the design of
`config.model`, runs the task's evaluators on their schedule, and resumes from
the newest checkpoint in `workdir` if there is one.

Sharding: the mesh and logical-axis rules come from `config.mesh`
(`vlpjax.sharding`); the state is created sharded (`vlpjax.state`) and the step
(`vlpjax.step`) is jitted with explicit shardings and donates the state.
"""
from __future__ import annotations

import logging
import math
import time
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import ml_collections
import optax

from vlpjax import checkpointing, config_lib, flops, metrics as metrics_lib, paths, sharding
from vlpjax import optim, state as state_lib, step as step_lib
from vlpjax.data import tables, tokenizer
from vlpjax.evaluators import common as evaluators
from vlpjax.models import get_design
from vlpjax.tasks import get_task


# Files of a workdir beside checkpoints/ (`write_run_files`).
RUN_CONFIG = 'config.json'
RUN_VOCAB = 'vocab.txt'


class NonFiniteLossError(FloatingPointError):
  """A loss or the gradient norm became NaN/Inf; the run stopped, keeping only
  checkpoints whose next step was finite."""


def validate_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Raises ValueError, naming the config field, for settings that cannot work."""
  config_lib.check_fields(config)
  get_design(config.model.name)  # raises for an unknown design
  get_task(config.task)
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
  if source and (kind not in ('workdir', 'orbax', 'bert') or not directory):
    raise ValueError(f"config.init.source must be '', 'workdir:DIR', 'orbax:DIR' or "
                     f"'bert:DIR', got {source!r}")


def peek_batch_spec(iterator: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes/dtypes of the iterator's batches, leaving its position unchanged."""
  position = iterator.get_state()
  batch = next(iterator)
  iterator.set_state(position)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def step_flops_of(config: ml_collections.ConfigDict, task: ModuleType, objectives: list[str],
                  input_specs: Mapping[str, jax.ShapeDtypeStruct]) -> Callable[[int], float]:
  """Train step s (from 1) -> its model FLOPs: the global batch's examples of the
  step's objective (the task's `flops_per_example`, `vlpjax.flops`)."""
  flops_of = {o: config.train.global_batch_size * task.flops_per_example(config, input_specs, o)
              for o in objectives}
  return lambda step: flops_of[task.objective_for_step(config, objectives, step - 1)]


def training_flops(config: ml_collections.ConfigDict) -> float:
  """Model FLOPs of the run's `train.num_steps` train steps, from the shapes of
  its first batch (nothing is compiled or trained)."""
  task = get_task(config.task)
  config = task.prepare(config)
  objectives = task.objectives(config)
  batch_spec = peek_batch_spec(task.make_train_iterator(config, sharding.make_mesh(config)))
  input_specs = step_lib.model_input_specs(config, task, objectives[0], batch_spec)
  step_flops = step_flops_of(config, task, objectives, input_specs)
  return float(sum(step_flops(step) for step in range(1, config.train.num_steps + 1)))


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


def write_run_files(config: ml_collections.ConfigDict, workdir: str, task: ModuleType) -> None:
  """What inference needs beside the checkpoints, in the workdir (process 0):
  `config.json`, the tokenizer's `vocab.txt` and the task's own files (VQA:
  `answers.txt`), so that `vlpjax.load` needs no data tables."""
  if jax.process_index() != 0:
    return
  workdir = paths.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / RUN_CONFIG).write_text(config.to_json_best_effort(indent=2), encoding='utf-8')
  files = {RUN_VOCAB: list(tokenizer.read_vocab(tables.vocab_file(config.data))),
           **task.inference_files(config)}
  for name, lines in files.items():
    (workdir / name).write_text(''.join(f'{line}\n' for line in lines), encoding='utf-8')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains per `config`, resuming from `workdir`; returns the last step's metrics.

  Stops at `train.num_steps`, after `train.max_steps_this_run` steps of this run,
  or at a preemption (SIGTERM); each time with a checkpoint of the final step.
  The task's evaluators (`config.evals`) run every `log_steps`, at the run's
  first step and at its last (unless an entry's `at_first_step` /
  `at_last_step` is False).

  Raises:
    ValueError: a config that cannot work (before anything is compiled).
    NonFiniteLossError: a loss became NaN/Inf; the checkpoints kept are those
      whose next step was finite, and the message names the step a rerun
      resumes from.
    checkpointing.CheckpointCorruptError: no checkpoint reads back (or, with
      `checkpoint.on_corrupt='fail'`, the newest does not).
    checkpointing.CheckpointWriteError: a checkpoint could not be written.
  """
  mesh = sharding.make_mesh(config)
  validate_config(config, mesh)
  task = get_task(config.task)
  rules = sharding.logical_axis_rules(config)
  config = task.prepare(config)
  objectives = task.objectives(config)
  model = task.make_model(config)
  tx, schedule = optim.make_optimizer(config.train, get_design(config.model.name))
  iterator = task.make_train_iterator(config, mesh)
  batch_spec = peek_batch_spec(iterator)
  write_run_files(config, workdir, task)

  input_specs = step_lib.model_input_specs(config, task, objectives[0], batch_spec)
  abstract, shardings = state_lib.abstract_train_state(model, tx, input_specs, mesh, rules)
  logging.info('train state: %s over mesh %s', sharding.describe(shardings, abstract),
               dict(mesh.shape))
  checkpointer = checkpointing.Checkpointer(workdir, config.checkpoint)
  try:
    state = checkpointer.restore_latest(abstract, iterator)
    if state is None:
      state = state_lib.init_train_state(model, tx, input_specs, config.seed, shardings)
      if config.init.source:
        state = state_lib.init_from(config.init.source, config.model, state, abstract)
        state = state.replace(params=task.init_heads(config, state.params, abstract.params))
    if state_lib.keeps_grad_buffers(config.train):
      state, shardings = state_lib.with_grad_buffers(state, shardings)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      evals = task.make_evaluators(config, model, mesh, workdir)
      return _loop(config, workdir, task, model, tx, schedule, mesh, shardings, objectives,
                   state, iterator, checkpointer, input_specs, batch_spec, evals)
  finally:
    checkpointer.close()


def _loop(config: ml_collections.ConfigDict, workdir: str, task: ModuleType,
          model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
          mesh: jax.sharding.Mesh, shardings: state_lib.TrainState, objectives: list[str],
          state: state_lib.TrainState, iterator: Iterator,
          checkpointer: checkpointing.Checkpointer,
          input_specs: Mapping[str, jax.ShapeDtypeStruct],
          batch_spec: Mapping[str, jax.ShapeDtypeStruct],
          evals: list[evaluators.Evaluator]) -> dict[str, float]:
  """The step loop of `train_and_evaluate` (arguments as built there).

  Step metrics stay on the device until a step that logs, evaluates or saves:
  then every step's since the last fetch comes over in one transfer and is
  checked (`_check_finite`: a non-finite one also removes the checkpoint of the
  step before), so the host never waits on a plain step. A log step's values
  are fetched after the next step is dispatched, so the device keeps working;
  before any checkpoint is written its step's own metrics are checked.
  Evaluators run on the params after their step, before its checkpoint, so a
  run preempted in its final evaluation reruns it.
  """
  train = config.train
  start = int(state.step)
  last = train.num_steps
  if train.max_steps_this_run > 0:
    last = min(last, start + train.max_steps_this_run)
  # FLOPs only serve MFU, which needs the device's peak (none on CPU).
  mfu_known = flops.peak_flops(jax.devices()[0].device_kind, config.model.dtype) is not None
  step_flops = step_flops_of(config, task, objectives, input_specs) if mfu_known else None
  writer = metrics_lib.MetricWriter(
      workdir, start_step=start, total_steps=train.num_steps,
      examples_per_step=train.global_batch_size, compute_dtype=config.model.dtype,
      step_flops=step_flops)
  # Every objective's program before step 1 (UNITER samples one of four per
  # step): no compile lands in the middle of the run, or on one host only.
  began = time.perf_counter()
  compiled = {objective: step_lib.make_train_step(config, model, tx, schedule, mesh, shardings,
                                                  task, objective).lower(state, batch_spec).compile()
              for objective in objectives}
  logging.info('compiled the train step%s in %.1f s',
               f' of {len(objectives)} objectives' if len(objectives) > 1 else '',
               time.perf_counter() - began)
  unchecked: list[tuple[int, dict[str, jax.Array]]] = []
  host_metrics: dict[str, float] = {}

  def logs(step: int) -> bool:
    # The run's first step is logged too: the starting loss.
    return step % train.log_every_steps == 0 or step in (start + 1, last)

  def check(through: int) -> None:
    """Fetches, checks and logs the metrics of the steps up to `through`."""
    nonlocal host_metrics
    ready = [entry for entry in unchecked if entry[0] <= through]
    del unchecked[:len(ready)]
    for step, values in jax.device_get(ready):
      host_metrics = {k: float(v) for k, v in values.items()}
      _check_finite(step, host_metrics, checkpointer)
      writer.observe(host_metrics)
      if logs(step):
        writer.write(step, host_metrics)

  schedules = {e.name: evaluators.schedule(config.evals[e.name]) for e in evals}
  try:
    with checkpointing.PreemptionWatcher() as preemption:
      for step in range(start + 1, last + 1):
        objective = task.objective_for_step(config, objectives, step - 1)
        state, step_metrics = compiled[objective](state, next(iterator))
        unchecked.append((step, step_metrics))
        due = [e for e in evals if evaluators.should_run(step, start + 1, last,
                                                          **schedules[e.name])]
        preempted = preemption.reached(step)
        if preempted or due or step == last or checkpointer.should_save(step):
          check(through=step)
        elif logs(step - 1):
          check(through=step - 1)
        for evaluator in due:
          began = time.perf_counter()
          results = dict(evaluator.run(state.params, step))
          writer.write_eval(step, evaluator.name, results, time.perf_counter() - began)
        if preempted or step == last or checkpointer.should_save(step):
          checkpointer.save(step, state.replace(grads=None), iterator, force=True)
        if preempted:
          logging.warning('preempted: saved step %d, exiting', step)
          break
  finally:
    writer.close()
  return host_metrics
