"""VQA evaluator throughput: examples/s of `VqaEvaluator.run` per design.

  python -m benchmarks.vqa_eval [--size=small] [--split=validation] [--batch_size=128]
      [--data_dir=DIR] [--designs=uniter,lxmert,visualbert,vilbert]   (from the repo root)

Evaluates freshly initialised models of `--size` on the embedded world's vqa
split (built under --data_dir on first use): every question once, the official
accuracy and the prediction file, as in training. The first run of each design
(compilation included) is reported apart from the second (steady state). Writes
the figures and the machine to benchmarks/results/vqa_eval.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import tempfile
import time

import flax.linen as nn
import jax

from vlpjax import optim, sharding, state as state_lib, step as step_lib, train
from vlpjax.models import DESIGNS, get_design
from vlpjax.tasks import vqa

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'vqa_eval.json')


def measure(design: str, size: str, split: str, batch_size: int, data_dir: str | None
            ) -> dict[str, float]:
  """Seconds and examples/s of two evaluations of one design's fresh model."""
  config = importlib.import_module(f'configs.{design}').get_config(f'{size},task=vqa')
  if data_dir:
    config.data.data_dir = data_dir
  config.evals = {'bench': dict(type='vqa', split=split, batch_size=batch_size, log_steps=1)}
  mesh = sharding.make_mesh(config)
  rules = sharding.logical_axis_rules(config)
  config = vqa.prepare(config)
  model = vqa.make_model(config)
  tx, _ = optim.make_optimizer(config.train, get_design(design))
  iterator = vqa.make_train_iterator(config, mesh)
  specs = step_lib.model_input_specs(config, vqa, 'vqa', train.peek_batch_spec(iterator))
  _, shardings = state_lib.abstract_train_state(model, tx, specs, mesh, rules)
  params = state_lib.init_train_state(model, tx, specs, config.seed, shardings).params
  times = []
  with tempfile.TemporaryDirectory() as workdir, jax.set_mesh(mesh), \
      nn.logical_axis_rules(rules):
    (evaluator,) = vqa.make_evaluators(config, model, mesh, workdir)
    for run in range(2):
      began = time.perf_counter()
      metrics = dict(evaluator.run(params, run))
      times.append(time.perf_counter() - began)
  count = metrics['count']
  return dict(design=design, size=size, examples=int(count), batch_size=batch_size,
              first_seconds=times[0], seconds=times[1], examples_per_second=count / times[1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', default='small')
  parser.add_argument('--split', default='validation')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--designs', default=','.join(DESIGNS))
  args = parser.parse_args()
  rows = []
  for design in args.designs.split(','):
    row = measure(design, args.size, args.split, args.batch_size, args.data_dir)
    rows.append(row)
    print(f"{design:10s} {row['examples']} questions: {row['examples_per_second']:8.1f} "
          f"examples/s ({row['seconds']:.1f} s; first run with compilation "
          f"{row['first_seconds']:.1f} s)", flush=True)
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, 'w', encoding='utf-8') as f:
    json.dump(dict(machine=dict(platform=platform.platform(), processor=platform.processor(),
                                cpus=os.cpu_count(), devices=[str(d) for d in jax.devices()],
                                jax=jax.__version__),
                   results=rows), f, indent=2)
  print(f'wrote {RESULTS}')


if __name__ == '__main__':
  main()
