r"""UNITER pretraining: useful examples/s with negatives on every batch vs only
on the steps whose task is matching.

  python -m benchmarks.uniter_negatives [--size=small] [--batch=32] [--steps=40]
      [--rounds=2] [--data_size=default]

UNITER's MLM, MRFR and MRC-kl give mismatched pairs weight 0, so a negative
drawn for one of their steps costs a forward and backward and teaches nothing.
Both pipelines here are the real one on the embedded world (`--data_size`), with
the real jitted step of each sampled task (the default ratios 2:2:1:1, no first
stage); 'every batch' is `make_pretraining_iterator` without `negatives_at` (the
behaviour before), 'by step' the train task's iterator. A useful example is one
some loss of its step weighs: every example of an ITM step, the matched ones
otherwise. The two take turns for `--rounds`, `--steps` steps each, from the
same initial state. Figures go to stdout and benchmarks/results/uniter_negatives.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import time

RESULTS = os.path.join(os.path.dirname(__file__), 'results', 'uniter_negatives.json')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--size', default='small')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--steps', type=int, default=40, help='timed steps per round and mode')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--data_size', default='default', help="embedded world: 'default' or 'tiny'")
  parser.add_argument('--out', default=RESULTS)
  args = parser.parse_args()

  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks.train_step import machine  # pylint: disable=import-outside-toplevel
  from vlpjax import optim, sharding, state as state_lib, step as step_lib, train  # pylint: disable=import-outside-toplevel
  from vlpjax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  from vlpjax.models import get_design  # pylint: disable=import-outside-toplevel
  from vlpjax.objectives import pretraining  # pylint: disable=import-outside-toplevel
  from vlpjax.tasks import pretrain as task  # pylint: disable=import-outside-toplevel

  config = importlib.import_module('configs.uniter').get_config(args.size)
  config.train.global_batch_size = args.batch
  config.data.size = args.data_size
  config.pretrain.first_stage_steps = 0
  mesh = sharding.make_mesh(config)
  train.validate_config(config, mesh)
  config = task.prepare(config)
  rules = sharding.logical_axis_rules(config)
  model = task.make_model(config)
  tx, schedule = optim.make_optimizer(config.train, get_design(config.model.name))
  iterators = {
      'every batch': input_pipeline.make_pretraining_iterator(
          config.data, 'uniter', global_batch_size=args.batch, seed=config.seed, mesh=mesh,
          data_axes=tuple(config.mesh.data_axes)),
      'by step': task.make_train_iterator(config, mesh)}
  objectives = task.objectives(config)
  batch_spec = train.peek_batch_spec(iterators['by step'])
  input_specs = step_lib.model_input_specs(config, task, objectives[0], batch_spec)
  _, shardings = state_lib.abstract_train_state(model, tx, input_specs, mesh, rules)
  initial = state_lib.init_train_state(model, tx, input_specs, config.seed, shardings)
  if state_lib.keeps_grad_buffers(config.train):  # as train_and_evaluate does
    initial, shardings = state_lib.with_grad_buffers(initial, shardings)
  matched_label = get_design('uniter').matched_label
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    began = time.perf_counter()
    compiled = {o: step_lib.make_train_step(config, model, tx, schedule, mesh, shardings,
                                            task, o).lower(initial, batch_spec).compile()
                for o in objectives}
    print(f'compiled {len(compiled)} objectives in {time.perf_counter() - began:.1f} s',
          flush=True)
    totals = {mode: dict(steps=0, seconds=0.0, examples=0, useful=0) for mode in iterators}
    position = {mode: 0 for mode in iterators}
    states = {mode: jax.tree.map(lambda x: x.copy(), initial) for mode in iterators}
    for round_number in range(args.rounds):
      for mode, iterator in iterators.items():
        state, useful = states[mode], 0
        # The first step of a round is untimed (the host catches up).
        batch = next(iterator)
        step = position[mode]
        state, metrics = compiled[task.objective_for_step(config, objectives, step)](state, batch)
        jax.block_until_ready(metrics)
        began = time.perf_counter()
        for step in range(position[mode] + 1, position[mode] + 1 + args.steps):
          objective = task.objective_for_step(config, objectives, step)
          batch = next(iterator)
          state, metrics = compiled[objective](state, batch)
          if objective in pretraining.MATCHING_LOGITS:
            useful += args.batch
          else:
            useful += int(np.sum(np.asarray(batch['match_label']) == matched_label))
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - began
        states[mode], position[mode] = state, step + 1
        total = totals[mode]
        total.update(steps=total['steps'] + args.steps, seconds=total['seconds'] + seconds,
                     examples=total['examples'] + args.steps * args.batch,
                     useful=total['useful'] + useful)
        print(f'round {round_number + 1}/{args.rounds} {mode:>11}: {args.steps} steps in '
              f'{seconds:.1f} s, {useful / (args.steps * args.batch):.1%} useful', flush=True)
  results = {}
  for mode, total in totals.items():
    results[mode] = dict(total, examples_per_s=total['examples'] / total['seconds'],
                         useful_share=total['useful'] / total['examples'],
                         useful_examples_per_s=total['useful'] / total['seconds'])
    print(f"{mode:>11}: {results[mode]['examples_per_s']:.1f} examples/s, "
          f"{results[mode]['useful_share']:.1%} useful, "
          f"{results[mode]['useful_examples_per_s']:.1f} useful examples/s")
  gain = results['by step']['useful_examples_per_s'] / results['every batch']['useful_examples_per_s']
  print(f'useful examples/s, by step / every batch: {gain:.2f}x')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(dict(machine=machine(), size=args.size, batch=args.batch, steps=args.steps,
                   rounds=args.rounds, data_size=args.data_size,
                   ratios=dict(pretraining.task_ratios(config, 0)), results=results,
                   useful_examples_per_s_gain=gain), f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
