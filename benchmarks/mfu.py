r"""MFU of UNITER-base and LXMERT pretraining in bf16 on one accelerator: XLA and
cuDNN attention, the largest batch that fits, compile time. One prepared run
that fits in 5 minutes on a device machine, and runs on the CPU at tiny sizes.

  python -m benchmarks.mfu [--designs=uniter,lxmert] [--size=base]
      [--dtype=bfloat16] [--steps=10] [--batch=0] [--max_batch=1024]
      [--budget_s=270] [--out=benchmarks/results/mfu.json]

Per design, the real jitted pretraining step (`benchmarks.train_step.PretrainingStep`:
synthetic batches of text length 20 and 36 regions, the design's first
objective) in three attention variants:

  explicit  the default training config: attention dropout 0.1, which only the
            explicit path (einsums, fp32 scores and softmax) has
  xla       attention dropout 0: `jax.nn.dot_product_attention`, XLA
  cudnn     attention dropout 0: the fused cuDNN kernel (GPU only)

so the cost of attention dropout (the fused kernels have none) is the
explicit / xla ratio. The largest batch is searched once per design, with the
explicit variant, from compiled memory alone (nothing runs out of memory):
the step's memory at `--max_batch` / 16 and twice that, a straight line through
both, the batch under 90% of the device's `bytes_limit` rounded down to a
multiple of 8, checked by one more compile (halved until it fits; the explicit
variant then loads that program from the persistent compilation cache, which
the script turns on, in a temporary directory unless one is configured). Where the
device reports no limit (CPU), `--batch` (default 8) is used. Each variant is
then compiled (seconds reported) and timed over `--steps` steps (median); MFU is
model FLOPs (`vlpjax.flops`, the heads of the step's losses) over the compute
dtype's peak (`flops.PEAK_FLOPS`; none for CPU). Variants left when
`--budget_s` has passed are reported as skipped. Figures go to stdout and to
the results file.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

from benchmarks.train_step import PretrainingStep, machine

RESULTS = os.path.join(os.path.dirname(__file__), 'results', 'mfu.json')
# Attention variants: `config.model` overrides.
VARIANTS = {
    'explicit': dict(attention_impl='xla', attention_dropout_rate=0.1),
    'xla': dict(attention_impl='xla', attention_dropout_rate=0.0),
    'cudnn': dict(attention_impl='cudnn', attention_dropout_rate=0.0),
}
MEMORY_HEADROOM = 0.9


def memory_limit() -> int | None:
  """Bytes the first device may hold, or None where it reports no limit."""
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('bytes_limit')


def step_memory(design: str, size: str, batch: int, dtype: str) -> int:
  """Compiled memory of the default (explicit) step at `batch`."""
  step = PretrainingStep(design, size, batch, dtype, materialize=False, **VARIANTS['explicit'])
  step.compile()
  return step.memory_bytes()


def largest_batch(design: str, size: str, dtype: str, limit: int, max_batch: int
                  ) -> dict[str, Any]:
  """The largest multiple of 8 (<= `max_batch`) whose step fits in
  MEMORY_HEADROOM x `limit`, from a straight-line fit of compiled memory."""
  small = max(8, max_batch // 16)
  began = time.perf_counter()
  at_small, at_double = (step_memory(design, size, b, dtype) for b in (small, 2 * small))
  per_example = max((at_double - at_small) / small, 1.0)
  fixed = at_small - per_example * small
  batch = int((MEMORY_HEADROOM * limit - fixed) / per_example) // 8 * 8
  batch = max(8, min(batch, max_batch))
  memory = step_memory(design, size, batch, dtype)
  while memory > MEMORY_HEADROOM * limit and batch > 8:
    batch = max(8, batch // 2 // 8 * 8)
    memory = step_memory(design, size, batch, dtype)
  return dict(batch=batch, memory_gib=memory / 2**30, fixed_gib=fixed / 2**30,
              per_example_mib=per_example / 2**20, limit_gib=limit / 2**30,
              search_s=time.perf_counter() - began)


def run_variant(design: str, size: str, batch: int, dtype: str, variant: str,
                steps: int) -> dict[str, Any]:
  """Compile time, step time, throughput and MFU of one attention variant."""
  import jax  # pylint: disable=import-outside-toplevel
  from vlpjax import flops  # pylint: disable=import-outside-toplevel
  step = PretrainingStep(design, size, batch, dtype, **VARIANTS[variant])
  compile_s = step.compile()
  step_s, loss = step.time_steps(steps)
  device = jax.devices()[0]
  return dict(design=design, size=size, variant=variant, dtype=dtype, batch=batch,
              objective=step.objective, compile_s=compile_s, step_s=step_s,
              examples_per_s=batch / step_s,
              model_tflops_per_s=step.flops_per_step / step_s / 1e12,
              mfu=flops.mfu(step.flops_per_step, step_s, device.device_kind,
                            jax.device_count(), dtype),
              memory_gib=step.memory_bytes() / 2**30, loss=loss)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--designs', default='uniter,lxmert')
  parser.add_argument('--size', default='base')
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--steps', type=int, default=10, help='timed steps per variant')
  parser.add_argument('--batch', type=int, default=0,
                      help='batch per step; 0: the largest that fits (8 without a memory limit)')
  parser.add_argument('--max_batch', type=int, default=1024)
  parser.add_argument('--budget_s', type=float, default=270.0,
                      help='no variant starts after this many seconds')
  parser.add_argument('--out', default=RESULTS)
  args = parser.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel

  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='mfu_cache_'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  began = time.perf_counter()
  on_gpu = jax.default_backend() == 'gpu'
  limit = memory_limit()
  report: dict[str, Any] = dict(machine=machine(), size=args.size, dtype=args.dtype,
                                steps=args.steps, designs={}, skipped=[])
  for design in args.designs.split(','):
    entry: dict[str, Any] = dict(variants={})
    report['designs'][design] = entry
    if args.batch:
      batch = args.batch
    elif limit is None:
      batch = 8
      entry['largest_batch'] = 'not searched: the device reports no memory limit'
    else:
      entry['largest_batch'] = largest_batch(design, args.size, args.dtype, limit,
                                             args.max_batch)
      batch = entry['largest_batch']['batch']
      print(f"{design}: largest batch {batch} ({entry['largest_batch']['memory_gib']:.1f} "
            f"of {entry['largest_batch']['limit_gib']:.1f} GiB, searched in "
            f"{entry['largest_batch']['search_s']:.0f} s)", flush=True)
    for variant in VARIANTS:
      if variant == 'cudnn' and not on_gpu:
        entry['variants'][variant] = 'skipped: cuDNN attention needs a GPU'
        continue
      if time.perf_counter() - began > args.budget_s:
        report['skipped'].append(f'{design}/{variant}: past --budget_s={args.budget_s:.0f}')
        continue
      result = run_variant(design, args.size, batch, args.dtype, variant, args.steps)
      entry['variants'][variant] = result
      mfu = f"{result['mfu']:.1%}" if result['mfu'] is not None else '-'
      print(f"{design:>7} {variant:>8} batch {batch:4d}: compile {result['compile_s']:5.1f} s, "
            f"{result['step_s'] * 1e3:8.1f} ms/step, {result['examples_per_s']:8.1f} ex/s, "
            f"{result['model_tflops_per_s']:7.2f} TFLOP/s, MFU {mfu}", flush=True)
    explicit, fused = (entry['variants'].get(v) for v in ('explicit', 'xla'))
    if isinstance(explicit, dict) and isinstance(fused, dict):
      entry['attention_dropout_cost'] = explicit['step_s'] / fused['step_s']
      print(f"{design}: attention dropout (explicit path) / fused XLA step time = "
            f"{entry['attention_dropout_cost']:.2f}x", flush=True)
  report['seconds'] = time.perf_counter() - began
  for line in report['skipped']:
    print(f'skipped {line}')
  print(f"total {report['seconds']:.0f} s")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {args.out}')
  return report


if __name__ == '__main__':
  main()
