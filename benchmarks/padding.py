r"""How much of a batch is padding: the share of text + region positions that
are real, in the pipeline's fixed shapes today, and what length bucketing could
reach with a bounded set of shapes (a simulation, for its design).

  python -m benchmarks.padding [--batches=20] [--max_regions=100] [--window=16]
      [--out=benchmarks/results/padding.json]

Measured: UNITER batches of 256 from the real pipeline on the default embedded
world (`data.max_regions` 36, as trained today, and `--max_regions`, all of its
boxes). Simulated, with the same code path for both: the issue's UNITER-style
distribution (regions uniform in 10-100, text in 8-60 tokens), padded to fixed
(60, 100) today; and bucketing, where a window of `--window` batches is sorted
by region bucket, then text length, cut into batches, and each batch padded up
to the next boundary of a bucket set per axis (the number of compiled shapes is the number
of (text, regions) bucket pairs that occur).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from typing import Any, Sequence

import numpy as np

RESULTS = os.path.join(os.path.dirname(__file__), 'results', 'padding.json')
BATCH = 256
TEXT_RANGE, REGION_RANGE = (8, 60), (10, 100)
# Bucket boundaries per axis for the simulation: (text, regions).
BUCKET_SETS = {
    'fixed (60, 100)': ((60,), (100,)),
    '3 x 3': ((24, 40, 60), (40, 70, 100)),
    '4 x 4': ((20, 32, 44, 60), (32, 55, 78, 100)),
    '4 x 6': ((20, 32, 44, 60), (25, 40, 55, 70, 85, 100)),
    '6 x 8': ((16, 24, 32, 40, 50, 60), (21, 32, 43, 54, 65, 77, 88, 100)),
}


def real_share(text: np.ndarray, regions: np.ndarray, text_pad: np.ndarray,
               region_pad: np.ndarray) -> float:
  """Real positions / padded positions over batches: text, regions [N, B] real
  lengths; text_pad, region_pad [N] each batch's padded lengths."""
  return float((text.sum() + regions.sum()) / (BATCH * (text_pad.sum() + region_pad.sum())))


def bucketed(text: np.ndarray, regions: np.ndarray, boundaries: tuple[Sequence[int], ...],
             window: int) -> dict[str, Any]:
  """The real share and shape count of bucketing examples `text`, `regions`
  [M] (M a multiple of window x BATCH): sort each window by region bucket,
  then by text length, cut it into batches, pad each axis to the next
  boundary."""
  text_bounds, region_bounds = (np.asarray(b) for b in boundaries)
  per_window = window * BATCH
  key = np.searchsorted(region_bounds, regions) * (text.max() + 1) + text
  order = np.concatenate([start + np.argsort(key[start:start + per_window], kind='stable')
                          for start in range(0, len(regions), per_window)])
  t, r = text[order].reshape(-1, BATCH), regions[order].reshape(-1, BATCH)
  t_pad = text_bounds[np.searchsorted(text_bounds, t.max(1))]
  r_pad = region_bounds[np.searchsorted(region_bounds, r.max(1))]
  shapes = sorted(set(zip(t_pad.tolist(), r_pad.tolist())))
  return dict(real_share=real_share(t, r, t_pad, r_pad), shapes=len(shapes),
              possible_shapes=len(text_bounds) * len(region_bounds))


def simulate(batches: int, window: int, seed: int = 0) -> dict[str, Any]:
  """Every bucket set on the UNITER-style distribution."""
  rng = np.random.default_rng(seed)
  n = batches * window * BATCH
  text = rng.integers(TEXT_RANGE[0], TEXT_RANGE[1] + 1, n)
  regions = rng.integers(REGION_RANGE[0], REGION_RANGE[1] + 1, n)
  return {name: bucketed(text, regions, bounds, window if len(bounds[1]) > 1 else 1)
          for name, bounds in BUCKET_SETS.items()}


def measure_world(batches: int, max_regions: int) -> dict[str, Any]:
  """The pipeline's UNITER batches on the default world: real share at its
  fixed shapes."""
  from vlpjax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  config = input_pipeline.default_data_config()
  config.update(max_regions=max_regions)
  iterator = input_pipeline.make_pretraining_iterator(config, 'uniter', global_batch_size=BATCH,
                                                      seed=0)
  text, regions = [], []
  for batch in itertools.islice(iterator, batches):
    text.append(batch['text_mask'].sum(1))
    regions.append(batch['region_mask'].sum(1))
  text, regions = np.stack(text), np.stack(regions)
  shape = (batch['text_mask'].shape[1], batch['region_mask'].shape[1])
  return dict(shape=shape, real_share=real_share(text, regions, np.full(batches, shape[0]),
                                                 np.full(batches, shape[1])),
              mean_text=float(text.mean()), mean_regions=float(regions.mean()),
              regions_range=(int(regions.min()), int(regions.max())))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--max_regions', type=int, default=100)
  parser.add_argument('--window', type=int, default=16)
  parser.add_argument('--out', default=RESULTS)
  args = parser.parse_args()
  from benchmarks.train_step import machine  # pylint: disable=import-outside-toplevel
  world = {f'max_regions={m}': measure_world(args.batches, m) for m in (36, args.max_regions)}
  for name, result in world.items():
    print(f"embedded world, UNITER, {name}: shape {result['shape']}, "
          f"{result['real_share']:.1%} real (mean text {result['mean_text']:.1f}, regions "
          f"{result['mean_regions']:.1f}, {result['regions_range'][0]}-"
          f"{result['regions_range'][1]} boxes)")
  simulated = simulate(args.batches, args.window)
  for name, result in simulated.items():
    print(f"UNITER-style (text {TEXT_RANGE[0]}-{TEXT_RANGE[1]}, regions {REGION_RANGE[0]}-"
          f"{REGION_RANGE[1]}), {name}: {result['real_share']:.1%} real, {result['shapes']} of "
          f"{result['possible_shapes']} shapes used")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(dict(machine=machine(), batch=BATCH, window=args.window, world=world,
                   simulated=simulated, bucket_sets={k: list(v) for k, v in BUCKET_SETS.items()}),
              f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
