"""Tasks: what is learned and scored. `get_task(config.task)` gives the module.

A task module `vlpjax.tasks.<name>` answers everything that depends on the
task, for any design (where the originals differ per design, a table in the
task says how):

  prepare(config) -> config              checks against the data; the run's config
  make_model(config) -> nn.Module        the design's backbone with the task's heads
  make_train_iterator(config, mesh)      endless, resumable global batches
  objectives(config) -> [str]            static step variants (one compiled step each)
  objective_for_step(config, names, step) -> str
  make_inputs(config, batch, rng, objective) -> (model kwargs, targets)
  compute_losses(config, outputs, targets, objective) -> (total, {name: loss})
  flops_per_example(config, input_specs, objective) -> float
  inference_files(config) -> {file name: lines}   written into the workdir
  init_heads(config, params, abstract_params)   heads from `init.source`, after it
  predictor(config, workdir, step)       `vlpjax.load`'s object
  make_evaluators(config, model, mesh, workdir) -> [Evaluator]   (`vlpjax.evaluators`)
  HEADLINE_METRIC (fine-tuning tasks)   the `<task>_test` metric comparisons report

The loop, the step, the sharding and the checkpoints call these and know no
task by name.
"""
from __future__ import annotations

import importlib
from types import ModuleType

TASKS = ('pretrain', 'vqa', 'gqa', 'snli_ve', 'refexp', 'retrieval', 'nlvr2', 'vcr', 'caption')


def get_task(name: str) -> ModuleType:
  """The task module `vlpjax.tasks.<name>`.

  Raises:
    ValueError: `name` is not one of TASKS.
  """
  if name not in TASKS:
    raise ValueError(f'config.task must be one of {TASKS}, got {name!r}')
  return importlib.import_module(f'vlpjax.tasks.{name}')
