r"""The four designs compared on equal data and compute, on the embedded world.

  python -m benchmarks.compare --workdir=/tmp/vlpjax/compare [--quick] \
      [--designs=uniter,lxmert,vilbert,visualbert] [--tasks=vqa,gqa,...] [--seeds=0,1,2] \
      [--pretrain_steps=2000] [--finetune_steps=400] [--budgets=steps,flops] \
      [--flops_reference=uniter]

For each seed and budget, every design pretrains on the world (`task=pretrain`,
its own recipe), then fine-tunes on every task both from that run and from
scratch. Every design sees the same tables (captions, questions, region
features), the same tokenizer, batch size, seed and number of examples per step.
Budgets:

  steps  every design trains --pretrain_steps, then --finetune_steps
  flops  every design trains for the model FLOPs (`vlpjax.flops`, through each
         task's `flops_per_example`) that --flops_reference spends in those
         steps: its steps scaled by the reference's FLOPs per step over its own

Cells run one after another in this process (`train.train_and_evaluate`, the
config a user would pass to `vlpjax.main`), each task's test-split evaluators at
the last step only. A finished cell (`<workdir>/cells/<run>.json`) is read, not
rerun; an interrupted run resumes from its checkpoint. Runs that are the same
config (the reference design's two budgets) are run once.

Writes into --workdir: `comparison.md` (design x init x budget rows, each task's
headline metric, mean +- std over seeds), `comparison.csv` (one row per cell
and seed: metric, steps, FLOPs, seconds), `pretraining_loss.png` (training loss
against steps and against FLOPs) and `metric_vs_flops.png` (per task).
`--quick` runs the same matrix with 'tiny' models on the tiny world for a few
steps (what CI runs); the default is the 'small' models on the default world.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import io
import json
import logging
import os
import time
from typing import Any, Sequence

import jax
import matplotlib
from matplotlib.figure import Figure
import ml_collections
import numpy as np

from vlpjax import config_lib, paths, train
from vlpjax.metrics import METRICS_FILE
from vlpjax.models import DESIGNS
from vlpjax.tasks import get_task


TASKS = ('vqa', 'gqa', 'snli_ve', 'nlvr2', 'refexp', 'retrieval', 'caption')
BUDGETS = ('steps', 'flops')
INITS = ('pretrained', 'scratch')
PRETRAIN = 'pretrain'


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every cell shares."""
  size: str = 'small'            # model config size
  world: str = 'default'         # embedded world size (data.size)
  data_dir: str | None = None    # TFDS data_dir of the world's tables
  pretrain_steps: int = 2000
  finetune_steps: int = 400
  batch_size: int = 32
  eval_batch_size: int | None = None  # None: each task's own
  flops_reference: str = 'uniter'


QUICK = dict(size='tiny', world='tiny', pretrain_steps=4, finetune_steps=2, batch_size=8,
             eval_batch_size=16)


def run_config(settings: Settings, design: str, task: str, seed: int, steps: int,
               init_source: str = '') -> ml_collections.ConfigDict:
  """The config of one run: `configs/<design>.py:<size>[,task=<task>]` on the
  world, with the comparison's seed, steps and batch; only the test-split
  evaluators of a task, at its last step (pretraining: its own, at the last
  step)."""
  arg = settings.size if task == PRETRAIN else f'{settings.size},task={task}'
  config = importlib.import_module(f'configs.{design}').get_config(arg)
  config.data.update(size=settings.world, data_dir=settings.data_dir)
  if settings.size == 'tiny':
    config_lib.fit_model_to_tables(config)
  config.seed = seed
  config.train.update(num_steps=steps, global_batch_size=settings.batch_size,
                      log_every_steps=max(1, steps // 40))
  config.checkpoint.every_steps = min(config.checkpoint.every_steps, steps)
  config.init.source = init_source
  for name in list(config.evals):
    entry = config.evals[name]
    if task != PRETRAIN and entry.split != 'test':
      del config.evals[name]
      continue
    entry.update(log_steps=steps, at_first_step=False, at_last_step=True)
    if settings.eval_batch_size:
      entry.batch_size = settings.eval_batch_size
  return config


def headline_key(task: str) -> str:
  """The metrics.jsonl key of the task's headline metric on its test split."""
  return f'{task}_test/{get_task(task).HEADLINE_METRIC}'


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
  path = paths.path(run_dir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines() if line]


class Comparison:
  """The matrix of runs under `workdir` (see the module docstring)."""

  def __init__(self, settings: Settings, workdir: str):
    """Raises ValueError if `workdir` holds a comparison of other settings (its
    cells would not be this one's)."""
    self.settings = settings
    self.workdir = workdir
    settings_file = paths.path(workdir) / 'settings.json'
    wanted = dataclasses.asdict(settings)
    if settings_file.exists():
      stored = json.loads(settings_file.read_text())
      if stored != wanted:
        changed = sorted(k for k in wanted if stored.get(k) != wanted[k])
        there, now = [stored.get(k) for k in changed], [wanted[k] for k in changed]
        raise ValueError(f'{workdir} holds a comparison with other settings '
                         f'({", ".join(changed)}: {there} there, {now} now); use another --workdir')
    else:
      paths.path(workdir).mkdir(parents=True, exist_ok=True)
      settings_file.write_text(json.dumps(wanted, indent=1, sort_keys=True))
    self._flops_file = paths.path(workdir) / 'flops.json'
    self._flops = (json.loads(self._flops_file.read_text()) if self._flops_file.exists()
                   else {})

  def flops_per_step(self, design: str, task: str) -> float:
    """Training FLOPs per step of `design` on `task` (cached in flops.json)."""
    key = f'{design}/{task}'
    if key not in self._flops:
      steps = self.base_steps(task)
      config = run_config(self.settings, design, task, 0, steps)
      self._flops[key] = train.training_flops(config) / steps
      self._flops_file.write_text(json.dumps(self._flops, indent=1, sort_keys=True))
    return self._flops[key]

  def base_steps(self, task: str) -> int:
    return self.settings.pretrain_steps if task == PRETRAIN else self.settings.finetune_steps

  def budget_steps(self, design: str, task: str, budget: str) -> int:
    """The steps `design` trains on `task` under `budget`."""
    steps = self.base_steps(task)
    if budget == 'steps' or design == self.settings.flops_reference:
      return steps
    reference = self.flops_per_step(self.settings.flops_reference, task)
    return max(1, round(steps * reference / self.flops_per_step(design, task)))

  def run(self, design: str, task: str, seed: int, steps: int, pretrained: dict | None
          ) -> dict[str, Any]:
    """One run (read back if finished): its result record."""
    init = 'scratch' if pretrained is None else f'from{pretrained["steps"]}'
    name = f'{task}_{design}_{init}_{steps}steps_s{seed}' if task != PRETRAIN else (
        f'{task}_{design}_{steps}steps_s{seed}')
    result_file = paths.path(self.workdir) / 'cells' / f'{name}.json'
    if result_file.exists():
      return json.loads(result_file.read_text())
    run_dir = paths.join(self.workdir, 'runs', name)
    source = f'workdir:{pretrained["run_dir"]}' if pretrained else ''
    config = run_config(self.settings, design, task, seed, steps, source)
    began = time.time()
    train.train_and_evaluate(config, run_dir)
    records = read_metrics(run_dir)
    value = None
    if task != PRETRAIN:
      values = [r[headline_key(task)] for r in records
                if r.get('step') == steps and headline_key(task) in r]
      if not values:
        raise RuntimeError(f'{run_dir}: no {headline_key(task)} at step {steps} in '
                           f'{METRICS_FILE}')
      value = values[-1]
    flops = self.flops_per_step(design, task) * steps
    result = dict(name=name, design=design, task=task, seed=seed, steps=steps,
                  run_dir=run_dir, value=value, flops=flops,
                  seconds=round(time.time() - began, 1),
                  pretrain_steps=pretrained['steps'] if pretrained else 0,
                  pretrain_flops=pretrained['flops'] if pretrained else 0.0)
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=1))
    return result

  def cells(self, designs: Sequence[str], tasks: Sequence[str], seeds: Sequence[int],
            budgets: Sequence[str]) -> list[dict[str, Any]]:
    """Runs the matrix (pretraining first, then every task); returns one record
    per (design, task, init, budget, seed)."""
    plan = [(seed, budget, design, task, init) for seed in seeds for budget in budgets
            for design in designs for task in (PRETRAIN, *tasks)
            for init in ((None,) if task == PRETRAIN else INITS)]
    records, pretrained, ran, running = [], {}, 0, 0.0
    for done, (seed, budget, design, task, init) in enumerate(plan):
      steps = self.budget_steps(design, task, budget)
      source = pretrained[seed, budget, design] if init == 'pretrained' else None
      began = time.time()
      result = self.run(design, task, seed, steps, source)
      if result['seconds'] and time.time() - began > 1:  # trained now, not read back
        ran, running = ran + 1, running + time.time() - began
      if task == PRETRAIN:
        pretrained[seed, budget, design] = result
      records.append(dict(result, init=init or '-', budget=budget))
      left = len(plan) - done - 1
      logging.info('compare: %d of %d cells (%s %s %s %s, seed %d)%s', done + 1, len(plan),
                   design, task, init or '', budget, seed,
                   f', ETA {running / ran * left:.0f} s' if ran and left else '')
    return records


# ----------------------------------------------------------------------------
# The table and the plots.

CSV_FIELDS = ('design', 'task', 'metric', 'init', 'budget', 'seed', 'value', 'pretrain_steps',
              'finetune_steps', 'pretrain_flops', 'finetune_flops', 'total_flops', 'seconds')


def csv_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per fine-tuning cell and seed (CSV_FIELDS)."""
  rows = []
  for r in records:
    if r['task'] == PRETRAIN:
      continue
    rows.append(dict(
        design=r['design'], task=r['task'], metric=get_task(r['task']).HEADLINE_METRIC,
        init=r['init'], budget=r['budget'], seed=r['seed'], value=r['value'],
        pretrain_steps=r['pretrain_steps'], finetune_steps=r['steps'],
        pretrain_flops=r['pretrain_flops'], finetune_flops=r['flops'],
        total_flops=r['pretrain_flops'] + r['flops'], seconds=r['seconds']))
  return rows


def _mean_std(values: Sequence[float]) -> str:
  if len(values) == 1:
    return f'{values[0]:.3f}'
  return f'{np.mean(values):.3f} +- {np.std(values, ddof=1):.3f}'


def markdown(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
  """Rows: design x init x budget; columns: each task's metric (mean +- std over
  seeds), the fine-tuning steps and the total training FLOPs (mean over tasks)."""
  header = ('| design | init | budget | ' + ' | '.join(
      f'{t} ({get_task(t).HEADLINE_METRIC})' for t in tasks)
            + ' | fine-tune steps | training PFLOPs | fine-tune seconds |')
  lines = [header, '| --- | --- | --- |' + ' --- |' * (len(tasks) + 3)]
  keys = sorted({(r['design'], r['init'], r['budget']) for r in rows},
                key=lambda k: (k[0], INITS.index(k[1]), BUDGETS.index(k[2])))
  for design, init, budget in keys:
    mine = [r for r in rows if (r['design'], r['init'], r['budget']) == (design, init, budget)]
    cells = []
    for task in tasks:
      values = [r['value'] for r in mine if r['task'] == task]
      cells.append(_mean_std(values) if values else '-')
    steps = sorted({r['finetune_steps'] for r in mine})
    lines.append(f'| {design} | {init} | {budget} | ' + ' | '.join(cells)
                 + f' | {"/".join(map(str, steps))}'
                 + f' | {np.mean([r["total_flops"] for r in mine]) / 1e15:.4g}'
                 + f' | {sum(r["seconds"] for r in mine):.0f} |')
  return '\n'.join(lines) + '\n'


def _write_png(figure: Any, path: str) -> None:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=100, bbox_inches='tight')
  paths.path(path).write_bytes(buffer.getvalue())


def design_colours() -> dict[str, str]:
  return dict(zip(DESIGNS, matplotlib.rcParams['axes.prop_cycle'].by_key()['color']))


def plot_pretraining(records: Sequence[dict[str, Any]], path: str) -> None:
  """Training loss of every pretraining run against steps and against FLOPs."""
  figure = Figure(figsize=(12, 4.5))
  by_step, by_flops = figure.subplots(1, 2)
  colours = design_colours()
  for r in records:
    if r['task'] != PRETRAIN:
      continue
    logged = [m for m in read_metrics(r['run_dir']) if 'loss' in m and 'step' in m]
    steps = np.array([m['step'] for m in logged])
    losses = np.array([m['loss'] for m in logged])
    label = f'{r["design"]} ({r["budget"]}, seed {r["seed"]})'
    style = dict(label=label, color=colours[r['design']],
                 linestyle='-' if r['budget'] == 'steps' else '--')
    by_step.plot(steps, losses, **style)
    by_flops.plot(steps * r['flops'] / r['steps'], losses, **style)
  by_step.set_xlabel('step')
  by_flops.set_xlabel('training FLOPs')
  by_flops.set_xscale('log')
  for axis in (by_step, by_flops):
    axis.set_ylabel('pretraining loss (sum of the step\'s objectives)')
  by_flops.legend(fontsize=7)
  figure.suptitle('Pretraining on the embedded world')
  _write_png(figure, path)


def plot_metric_vs_flops(rows: Sequence[dict[str, Any]], tasks: Sequence[str],
                         path: str) -> None:
  """Per task: the headline metric against total training FLOPs, a marker per
  design, filled when pretrained; bars: the spread over seeds."""
  cols = min(len(tasks), 4)
  grid_rows = -(-len(tasks) // cols)
  figure = Figure(figsize=(4.2 * cols, 3.6 * grid_rows))
  axes = figure.subplots(grid_rows, cols, squeeze=False)
  colours = design_colours()
  markers = dict(steps='o', flops='s')
  for axis, task in zip(axes.flat, tasks):
    groups = sorted({(r['design'], r['init'], r['budget']) for r in rows if r['task'] == task})
    for design, init, budget in groups:
      mine = [r for r in rows if (r['task'], r['design'], r['init'], r['budget'])
              == (task, design, init, budget)]
      values = [r['value'] for r in mine]
      axis.errorbar(np.mean([r['total_flops'] for r in mine]), np.mean(values),
                    yerr=np.std(values) if len(values) > 1 else None,
                    marker=markers[budget], color=colours[design],
                    markerfacecolor=colours[design] if init == 'pretrained' else 'none',
                    linestyle='none', label=f'{design} {init} ({budget})')
    axis.set_xscale('log')
    axis.set_xlabel('training FLOPs (pretraining + fine-tuning)')
    axis.set_title(f'{task}: {get_task(task).HEADLINE_METRIC}')
  for axis in list(axes.flat)[len(tasks):]:
    axis.axis('off')
  axes.flat[0].legend(fontsize=6)
  _write_png(figure, path)


def write_outputs(records: Sequence[dict[str, Any]], tasks: Sequence[str], workdir: str
                  ) -> str:
  """comparison.md / .csv and the two plots; returns the markdown."""
  rows = csv_rows(records)
  table = markdown(rows, tasks)
  directory = paths.path(workdir)
  (directory / 'comparison.md').write_text(table, encoding='utf-8')
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, CSV_FIELDS)
  writer.writeheader()
  writer.writerows(rows)
  (directory / 'comparison.csv').write_text(buffer.getvalue(), encoding='utf-8')
  plot_pretraining(records, paths.join(workdir, 'pretraining_loss.png'))
  plot_metric_vs_flops(rows, tasks, paths.join(workdir, 'metric_vs_flops.png'))
  return table


def _names(text: str, allowed: Sequence[str], flag: str) -> list[str]:
  names = [n for n in text.split(',') if n]
  unknown = sorted(set(names) - set(allowed))
  if unknown or not names:
    raise SystemExit(f'{flag}: {unknown or text!r} not among {list(allowed)}')
  return names


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--quick', action='store_true', help='tiny models on the tiny world')
  parser.add_argument('--designs', default=','.join(DESIGNS))
  parser.add_argument('--tasks', default=','.join(TASKS))
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--budgets', default=','.join(BUDGETS))
  parser.add_argument('--pretrain_steps', type=int)
  parser.add_argument('--finetune_steps', type=int)
  parser.add_argument('--flops_reference', default='uniter', choices=DESIGNS)
  parser.add_argument('--data_dir', help='TFDS data_dir of the world (default TFDS\'s)')
  args = parser.parse_args(argv)
  fields = dict(QUICK if args.quick else {}, flops_reference=args.flops_reference,
                data_dir=args.data_dir)
  for name in ('pretrain_steps', 'finetune_steps'):
    if getattr(args, name) is not None:
      fields[name] = getattr(args, name)
  settings = Settings(**fields)
  # One persistent compilation cache for every run: a scratch and a pretrained
  # run compile the same programs, and a resumed comparison compiles nothing again.
  jax.config.update('jax_compilation_cache_dir', paths.join(args.workdir, 'jax_cache'))
  tasks = _names(args.tasks, TASKS + ('vcr',), '--tasks')
  comparison = Comparison(settings, args.workdir)
  records = comparison.cells(_names(args.designs, DESIGNS, '--designs'), tasks,
                             [int(s) for s in args.seeds.split(',')],
                             _names(args.budgets, BUDGETS, '--budgets'))
  table = write_outputs(records, tasks, args.workdir)
  print(table)
  logging.info('compare: wrote %s', os.path.join(args.workdir, 'comparison.md'))
  return table


if __name__ == '__main__':
  # force: an import may already have given the root logger a WARNING handler.
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S',
                      force=True)
  for library in config_lib.QUIET_LOGGERS:
    logging.getLogger(library).setLevel(logging.WARNING)
  main()
