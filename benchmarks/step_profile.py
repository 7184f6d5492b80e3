r"""Where a pretraining step's time goes: a profile of the real jitted step,
its XLA ops grouped by what they do.

  python -m benchmarks.step_profile [--designs=lxmert] [--size=base] [--batch=8]
      [--steps=3] [--out=benchmarks/results/step_profile.json]

The step (`benchmarks.train_step.PretrainingStep`, fp32, synthetic batches of
text length 20 and 36 regions) runs `--steps` times under `jax.profiler.trace`.
Every op event of the trace is matched to its instruction in the compiled HLO
and put in one group:

  matmuls        an op that is, or fuses, a dot (forward and backward)
  optimizer      the step's 'optimizer' scope: AdamW, clipping, the update
  inputs         the 'inputs' scope: MLM and region masking, target building
  losses         the 'losses' scope: heads' softmax/cross-entropy reductions
  layer norms    ops of a module whose name has 'norm'
  attention      other ops of attention modules: masks, softmax, reshapes
  activations    other ops of FFN modules ('intermediate': GELU)
  other          embeddings, copies, transposes, everything else

by op metadata (the model's module path, the step's named scopes). Times are
thread-seconds per step, since XLA's CPU ops run on several threads at once; the
wall time of a step is shown beside them. The figures go to stdout and to the
results file.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any

from benchmarks.train_step import PretrainingStep, machine

RESULTS = os.path.join(os.path.dirname(__file__), 'results', 'step_profile.json')
GROUPS = ('matmuls', 'optimizer', 'inputs', 'losses', 'layer norms', 'attention',
          'activations', 'other')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\(')
_CALLS = re.compile(r'calls=%([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_groups(hlo: str) -> dict[str, str]:
  """{instruction name: group} for every instruction of an HLO module's text."""
  computations: dict[str, list[str]] = {}
  current: list[str] = []
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith('{'):
      name = line.split()[1] if line.startswith('ENTRY') else line.split()[0]
      current = computations.setdefault(name.lstrip('%'), [])
    else:
      current.append(line)
  with_dot = {name for name, lines in computations.items()
              if any(' dot(' in l or ' convolution(' in l for l in lines)}
  groups = {}
  for lines in computations.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      name, opcode = match.groups()
      calls = _CALLS.search(line)
      op_name = _OP_NAME.search(line)
      groups[name] = group_of(opcode, calls.group(1) in with_dot if calls else False,
                              op_name.group(1) if op_name else '')
  return groups


def group_of(opcode: str, fuses_dot: bool, op_name: str) -> str:
  """The group (GROUPS) of an instruction from its opcode and metadata."""
  scopes = op_name.lower().split('/')
  if opcode in ('dot', 'convolution') or fuses_dot:
    return 'matmuls'
  for scope, group in (('optimizer', 'optimizer'), ('inputs', 'inputs'), ('losses', 'losses')):
    if scope in scopes:
      return group
  if any('norm' in s for s in scopes):
    return 'layer norms'
  if any('attention' in s for s in scopes):
    return 'attention'
  if any('intermediate' in s for s in scopes):
    return 'activations'
  return 'other'


def profile(design: str, size: str, batch: int, steps: int) -> dict[str, Any]:
  """Per-group thread-seconds per step, and the step's wall seconds."""
  import jax  # pylint: disable=import-outside-toplevel
  step = PretrainingStep(design, size, batch, 'float32')
  step.compile()
  groups = hlo_groups(step.compiled.as_text())
  step.time_steps(1)  # warm-up
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      began = time.perf_counter()
      for _ in range(steps):
        step.state, metrics = step.compiled(step.state, step.batch)
        jax.block_until_ready(metrics)
      wall = (time.perf_counter() - began) / steps
    (trace_file,) = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                              recursive=True)
    with gzip.open(trace_file) as f:
      trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  seconds: dict[str, float] = collections.Counter()
  for event in events:
    if event.get('ph') == 'X' and event.get('name') in groups:
      seconds[groups[event['name']]] += event.get('dur', 0.0) / 1e6 / steps
  total = sum(seconds.values())
  return dict(design=design, size=size, batch=batch, steps=steps, objective=step.objective,
              wall_s_per_step=wall, op_thread_s_per_step=total,
              model_gflop_per_step=step.flops_per_step / 1e9,
              groups={g: dict(thread_s=seconds.get(g, 0.0),
                              share=seconds.get(g, 0.0) / total if total else 0.0)
                      for g in GROUPS})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--designs', default='lxmert')
  parser.add_argument('--size', default='base')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--out', default=RESULTS)
  args = parser.parse_args()
  results = []
  for design in args.designs.split(','):
    result = profile(design, args.size, args.batch, args.steps)
    results.append(result)
    print(f"{design} {args.size} batch {args.batch}: {result['wall_s_per_step']:.2f} s/step wall, "
          f"{result['op_thread_s_per_step']:.2f} s of op time on all threads")
    for group, entry in result['groups'].items():
      print(f"  {group:>12}: {entry['thread_s']:6.2f} s  {entry['share']:6.1%}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(dict(machine=machine(), results=results), f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
