"""Task x design on the embedded world: each task's headline test metric after
fine-tuning from scratch and from a pretraining run, at equal steps.

  python -m benchmarks.task_table --steps=200 \
      [--tasks=vqa,gqa,snli_ve,nlvr2,refexp,retrieval,vcr] [--designs=uniter,lxmert,...] \
      [--pretrained=uniter=/tmp/exp/uniter_6k,lxmert=/tmp/exp/lxmert_6k] \
      [--workdir=/tmp/task_table] [--size=small] [--results=FILE]

Every cell is one run of the command line a user types, in a subprocess:
`python -m vlpjax.main --config=configs/<design>.py:<size>,task=<task>` with
`train.num_steps=--steps`, the test-split evaluators at the last step only and
the validation ones not at all (`log_steps`, `at_first_step`, `at_last_step`), and, for the
pretrained column, `init.source=workdir:<run>`. The cell is the task's
`HEADLINE_METRIC` of its `<task>_test` evaluator (`vlpjax.tasks`). A design
without a `--pretrained` run gets the scratch column only. Runs already
finished under `--workdir` are read, not rerun, so an interrupted table
resumes, and cells of an earlier table at the same steps and size are kept.
Writes benchmarks/results/task_table.json or `--results` (each cell with its command, the
init.source included, and seconds) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

from vlpjax.metrics import METRICS_FILE
from vlpjax.tasks import get_task

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'task_table.json')
FINE_TUNING_TASKS = ('vqa', 'gqa', 'snli_ve', 'nlvr2', 'refexp', 'retrieval', 'vcr')
DESIGNS = ('uniter', 'lxmert', 'visualbert', 'vilbert')


def command(design: str, task: str, size: str, steps: int, workdir: str,
            pretrained: str | None) -> list[str]:
  """The run's command line: the test-split evaluators run at the last step, the
  others never (their step is past the run's end)."""
  config = importlib.import_module(f'configs.{design}').get_config(f'{size},task={task}')
  args = [sys.executable, '-m', 'vlpjax.main', f'--config=configs/{design}.py:{size},task={task}',
          f'--workdir={workdir}', f'--config.train.num_steps={steps}']
  for name, entry in config.evals.items():
    test = entry.split == 'test'
    args += [f'--config.evals.{name}.log_steps={steps if test else steps + 1}',
             f'--config.evals.{name}.at_first_step=False',
             f'--config.evals.{name}.at_last_step={test}']
  if pretrained:
    args.append(f'--config.init.source=workdir:{pretrained}')
  return args


def test_metric(workdir: str, task: str, steps: int) -> float | None:
  """The `<task>_test` headline metric logged at `steps`, or None if not logged."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return None
  key = f'{task}_test/{get_task(task).HEADLINE_METRIC}'
  with open(path, encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  values = [r[key] for r in records if r.get('step') == steps and key in r]
  return values[-1] if values else None


def markdown(cells: list[dict[str, Any]], tasks: list[str], designs: list[str]) -> str:
  """Rows: design x init; columns: tasks (their headline metric)."""
  header = '| design | init | ' + ' | '.join(
      f'{t} ({get_task(t).HEADLINE_METRIC})' for t in tasks) + ' |'
  lines = [header, '| --- | --- |' + ' --- |' * len(tasks)]
  for design in designs:
    for init in ('scratch', 'pretrained'):
      row = {c['task']: c['value'] for c in cells if c['design'] == design and c['init'] == init}
      if row:
        values = [f'{row[t]:.3f}' if row.get(t) is not None else '-' for t in tasks]
        lines.append(f'| {design} | {init} | ' + ' | '.join(values) + ' |')
  return '\n'.join(lines)


def merged_cells(cells: list[dict[str, Any]], steps: int, size: str,
                 results: str = RESULTS) -> list[dict[str, Any]]:
  """`cells` and those of the results file's earlier table at the same steps and
  size (so tables of several invocations add up); a cell read back from its
  finished run (no `seconds`) keeps the earlier entry, which has them."""
  if not os.path.exists(results):
    return cells
  with open(results, encoding='utf-8') as f:
    earlier = json.load(f)
  if (earlier.get('steps'), earlier.get('size')) != (steps, size):
    return cells
  key = lambda c: (c['design'], c['task'], c['init'])
  kept = {key(c): c for c in earlier['cells']}
  for cell in cells:
    if cell['seconds'] is not None or key(cell) not in kept:
      kept[key(cell)] = cell
  return list(kept.values())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--tasks', default=','.join(FINE_TUNING_TASKS))
  parser.add_argument('--designs', default=','.join(DESIGNS))
  parser.add_argument('--pretrained', default='',
                      help='design=workdir of a pretraining run, comma-separated')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--size', default='small')
  parser.add_argument('--workdir', default='/tmp/task_table')
  parser.add_argument('--note', default='', help='recorded with the results')
  parser.add_argument('--results', default=RESULTS,
                      help='the results file (JSON), another one for another table')
  args = parser.parse_args()
  tasks, designs = args.tasks.split(','), args.designs.split(',')
  pretrained = dict(item.split('=', 1) for item in args.pretrained.split(',') if item)
  unknown = sorted(set(pretrained) - set(designs))
  if unknown:
    raise ValueError(f'--pretrained names designs not in --designs: {unknown}')
  runs = [(design, task, init) for design in designs
          for init in ('scratch', 'pretrained') if init == 'scratch' or design in pretrained
          for task in tasks]
  os.makedirs(args.workdir, exist_ok=True)
  cells, started = [], time.time()
  for number, (design, task, init) in enumerate(runs, start=1):
    workdir = os.path.join(args.workdir, f'{design}_{task}_{init}_{args.steps}')
    args_list = command(design, task, args.size, args.steps, workdir,
                        pretrained.get(design) if init == 'pretrained' else None)
    value, seconds = test_metric(workdir, task, args.steps), None
    if value is None:
      run_started = time.time()
      with open(workdir + '.log', 'w', encoding='utf-8') as log:
        result = subprocess.run(args_list, stdout=log, stderr=subprocess.STDOUT, check=False)
      seconds = time.time() - run_started
      if result.returncode:
        raise RuntimeError(f'{design} {task} {init}: exit {result.returncode}; see {workdir}.log')
      value = test_metric(workdir, task, args.steps)
      if value is None:
        raise RuntimeError(f'{design} {task} {init}: no {task}_test metric at step {args.steps} '
                           f'in {workdir}/{METRICS_FILE}')
    cells.append(dict(design=design, task=task, init=init, value=value, seconds=seconds,
                      command=shlex.join(args_list[1:])))
    elapsed = time.time() - started
    print(f'[{number}/{len(runs)}] {design} {task} {init}: {value:.4f}'
          f'{f" in {seconds:.0f} s" if seconds else " (done before)"}; '
          f'ETA {elapsed / number * (len(runs) - number) / 60:.0f} min', flush=True)
  cells = merged_cells(cells, args.steps, args.size, args.results)
  table = markdown(cells, list(dict.fromkeys(c['task'] for c in cells)),
                   list(dict.fromkeys(c['design'] for c in cells)))
  print(table)
  os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
  with open(args.results, 'w', encoding='utf-8') as f:
    json.dump(dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
                   steps=args.steps, size=args.size, note=args.note,
                   cells=cells, markdown=table), f, indent=1)
  print(f'wrote {args.results}')


if __name__ == '__main__':
  main()
