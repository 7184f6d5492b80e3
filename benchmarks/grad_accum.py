r"""Gradient accumulation's cost: XLA's FLOP count and the time per example of a
pretraining step in K microbatches against the same global batch in one.

  python -m benchmarks.grad_accum [--designs=lxmert,uniter] [--size=small]
      [--batch=32] [--accumulate=4] [--steps=5] [--label=after]
      [--out=benchmarks/results/grad_accum.json]

Each design's real jitted pretraining step (synthetic batches of text length 20,
36 regions, the design's first objective) is compiled for K=1 and K=`--accumulate`
on one device; FLOPs are the compiled program's `cost_analysis()` with the
microbatch loop unrolled (XLA counts a loop's body once, whatever its trip
count; this compile only counts), time the median of `--steps` steps of the
program as trained after a warm-up (the two take turns, one step each).
It uses only the library's step API, so the same script measures an earlier
checkout (run it with that checkout first on PYTHONPATH); `--label` names the
entry it adds to the results file.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import statistics
import time
from typing import Any

TEXT_LEN, REGIONS = 20, 36
RESULTS = os.path.join(os.path.dirname(__file__), 'results', 'grad_accum.json')


def compiled_step(design: str, size: str, batch_size: int, accumulate: int) -> dict[str, Any]:
  """The compiled step of `accumulate` microbatches, its state, batch and FLOPs."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from vlpjax import optim, sharding, state as state_lib, step as step_lib  # pylint: disable=import-outside-toplevel
  from vlpjax.data import synthetic  # pylint: disable=import-outside-toplevel
  from vlpjax.models import get_design, get_model  # pylint: disable=import-outside-toplevel
  from vlpjax.tasks import pretrain  # pylint: disable=import-outside-toplevel

  config = importlib.import_module(f'configs.{design}').get_config(size)
  config.train.update(global_batch_size=batch_size, grad_accum_steps=accumulate,
                      keep_grad_buffers=False)
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  rules = sharding.logical_axis_rules(config)
  model = get_model(config.model)
  tx, schedule = optim.make_optimizer(config.train, get_design(design))
  objective = pretrain.objectives(config)[0]
  regions = REGIONS + (design == 'vilbert')
  host_batch = synthetic.synthetic_batch(config.model, batch_size, TEXT_LEN, regions)
  batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host_batch.items()}
  input_specs = step_lib.model_input_specs(config, pretrain, objective, batch_spec)
  _, shardings = state_lib.abstract_train_state(model, tx, input_specs, mesh, rules)
  state = state_lib.init_train_state(model, tx, input_specs, config.seed, shardings)
  batch = jax.device_put(host_batch, sharding.batch_sharding(mesh, config.mesh.data_axes))
  make = lambda: step_lib.make_train_step(config, model, tx, schedule, mesh, shardings,
                                         pretrain, objective).lower(state, batch).compile()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    began = time.perf_counter()
    step = make()
    compile_s = time.perf_counter() - began
    scan = jax.lax.scan
    jax.lax.scan = functools.partial(scan, unroll=True)
    try:
      cost = make().cost_analysis()
    finally:
      jax.lax.scan = scan
  cost = cost[0] if isinstance(cost, list) else cost
  return dict(step=step, state=state, batch=batch, flops=float(cost['flops']),
              compile_s=compile_s, objective=objective)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--designs', default='lxmert,uniter')
  parser.add_argument('--size', default='small')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--accumulate', type=int, default=4)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--label', default='after')
  parser.add_argument('--out', default=RESULTS)
  args = parser.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks.train_step import machine  # pylint: disable=import-outside-toplevel

  entry: dict[str, Any] = dict(machine=machine(), size=args.size, batch=args.batch,
                               accumulate=args.accumulate, steps=args.steps, designs={})
  for design in args.designs.split(','):
    cases = {k: compiled_step(design, args.size, args.batch, k) for k in (1, args.accumulate)}
    times: dict[int, list[float]] = {k: [] for k in cases}
    for k, case in cases.items():  # warm-up
      case['state'], metrics = case['step'](case['state'], case['batch'])
      jax.block_until_ready(metrics)
    for _ in range(args.steps):
      for k, case in cases.items():
        began = time.perf_counter()
        case['state'], metrics = case['step'](case['state'], case['batch'])
        jax.block_until_ready(metrics)
        times[k].append(time.perf_counter() - began)
    result = {}
    for k, case in cases.items():
      step_s = statistics.median(times[k])
      result[f'k{k}'] = dict(flops=case['flops'], compile_s=case['compile_s'], step_s=step_s,
                             ms_per_example=1e3 * step_s / args.batch)
    one, many = result['k1'], result[f'k{args.accumulate}']
    result['flops_ratio'] = many['flops'] / one['flops']
    result['time_ratio'] = many['step_s'] / one['step_s']
    entry['designs'][design] = result
    print(f"{args.label} {design} {args.size} batch {args.batch}: K=1 {one['flops'] / 1e9:.1f} "
          f"GFLOP, {one['ms_per_example']:.2f} ms/example; K={args.accumulate} "
          f"{many['flops'] / 1e9:.1f} GFLOP ({result['flops_ratio']:.3f}x), "
          f"{many['ms_per_example']:.2f} ms/example ({result['time_ratio']:.2f}x)", flush=True)
  results = {}
  if os.path.exists(args.out):
    with open(args.out, encoding='utf-8') as f:
      results = json.load(f)
  results[args.label] = entry
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {args.out} ({args.label})')


if __name__ == '__main__':
  main()
