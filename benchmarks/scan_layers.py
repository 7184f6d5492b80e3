r"""Compile time of each design's pretraining step, its layers one module each
against `model.scan_layers` (each stack of repeated layers one `nn.scan`).

  python -m benchmarks.scan_layers [--designs=visualbert,vilbert,lxmert,uniter]
      [--size=base] [--batch=8] [--steps=0]

Each case compiles the real jitted step (`benchmarks.train_step.PretrainingStep`,
synthetic batches of text length 20 and 36 regions, fp32) in a process of its own
with no compilation cache, and reports the compile seconds and the compiled
program's memory. `--steps=N` also materialises the state and times N steps
after one warm-up (their median), to show what the loop over a stack costs.
That the two layouts compute the same values is tests/test_scan_layers.py's.
Figures go to stdout and to benchmarks/results/scan_layers.json.
"""
from __future__ import annotations

import argparse
import json
import os

from benchmarks import train_step

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'scan_layers.json')


def run_one(design: str, size: str, scan: bool, batch: int, steps: int) -> dict:
  step = train_step.PretrainingStep(design, size, batch, 'float32', materialize=steps > 0,
                                    scan_layers=scan)
  result = dict(design=design, size=size, scan_layers=scan, task=step.objective, batch=batch,
                compile_s=step.compile(), memory_gib=step.memory_bytes() / 2**30)
  if steps:
    result['step_s'], result['loss'] = step.time_steps(steps)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--designs', default='visualbert,vilbert,lxmert,uniter')
  parser.add_argument('--size', default='base')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=0, help='timed steps (0: compile only)')
  parser.add_argument('--out', default=RESULTS)
  parser.add_argument('--one', help=argparse.SUPPRESS)  # child process: design:scan
  args = parser.parse_args()
  if args.one:
    design, scan = args.one.split(':')
    print('RESULT ' + json.dumps(run_one(design, args.size, scan == 'scan', args.batch,
                                         args.steps)))
    return
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
  results = []
  for design in args.designs.split(','):
    for scan in ('layers', 'scan'):
      result, errors = train_step.run_child('benchmarks.scan_layers', [
          f'--one={design}:{scan}', f'--size={args.size}', f'--batch={args.batch}',
          f'--steps={args.steps}'], env)
      if result is None:
        raise RuntimeError(f'{design} {scan}: {errors}')
      results.append(result)
      timed = f", {result['step_s']:.3f} s/step" if 'step_s' in result else ''
      print(f"{design:>10} {args.size} scan_layers={result['scan_layers']!s:5} "
            f"compile {result['compile_s']:6.1f} s, program {result['memory_gib']:.2f} GiB"
            f'{timed}', flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(dict(machine=train_step.machine(), results=results), f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
