r"""Run a config's evaluators on a checkpoint, without training.

  python -m vlpjax.evaluate --config=configs/lxmert.py:small,task=vqa \
      --workdir=/tmp/lxmert_vqa [--checkpoint_step=600]

Reads the newest checkpoint in `<workdir>/checkpoints` (or `--checkpoint_step`),
runs every evaluator of `config.evals`, logs their metrics and writes them to
`<workdir>/eval_step<N>.json`, and their prediction files into
`<workdir>/predictions/` (the run's own `metrics.jsonl` is left as it is). Use
the config the run trained with (`<workdir>/config.json` shows it).
"""
from __future__ import annotations

import json
import logging

from absl import app, flags
import flax.linen as nn
import jax
import ml_collections
from ml_collections import config_flags

from vlpjax import config_lib, paths, sharding

def evaluate(config: ml_collections.ConfigDict, workdir: str,
             checkpoint_step: int | None = None) -> dict[str, dict[str, float]]:
  """Runs `config.evals` on a checkpoint of `workdir`: {evaluator: {metric: value}}.

  Raises:
    FileNotFoundError: the workdir has no checkpoint (of that step).
  """
  # Imported here: after `jax.distributed` would be initialised by a caller.
  from vlpjax import checkpointing, optim, state as state_lib  # pylint: disable=g-import-not-at-top
  from vlpjax import step as step_lib, train  # pylint: disable=g-import-not-at-top
  from vlpjax.models import get_design  # pylint: disable=g-import-not-at-top
  from vlpjax.tasks import get_task  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config)
  train.validate_config(config, mesh)
  task = get_task(config.task)
  rules = sharding.logical_axis_rules(config)
  config = task.prepare(config)
  model = task.make_model(config)
  tx, _ = optim.make_optimizer(config.train, get_design(config.model.name))
  iterator = task.make_train_iterator(config, mesh)
  input_specs = step_lib.model_input_specs(config, task, task.objectives(config)[0],
                                           train.peek_batch_spec(iterator))
  abstract, _ = state_lib.abstract_train_state(model, tx, input_specs, mesh, rules)
  # The params alone: the optimiser and data position do not matter here, so
  # any batch size or schedule evaluates the checkpoint.
  params, step = checkpointing.restore_workdir_params(workdir, abstract.params,
                                                      step=checkpoint_step)
  results = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for evaluator in task.make_evaluators(config, model, mesh, workdir):
      results[evaluator.name] = dict(evaluator.run(params, step))
      logging.info('eval %s step %d | %s', evaluator.name, step,
                   ' '.join(f'{k} {v:.4g}' for k, v in results[evaluator.name].items()))
  if jax.process_index() == 0:
    paths.path(workdir).joinpath(f'eval_step{step}.json').write_text(
        json.dumps(results, indent=2), encoding='utf-8')
  return results


def main() -> None:
  """The command line. Its flags are defined here, not at import, so that the
  library function `evaluate` imports beside other commands' flags."""
  config = config_flags.DEFINE_config_file(
      'config', None, 'Run config file, e.g. configs/lxmert.py:small,task=vqa.',
      lock_config=True)
  workdir = flags.DEFINE_string('workdir', None, "The run's workdir (its checkpoints/).")
  step = flags.DEFINE_integer('checkpoint_step', None,
                              'Checkpoint to evaluate; default: newest.')
  flags.mark_flags_as_required(['config', 'workdir'])

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    config_lib.clean_logging()
    evaluate(config.value, workdir.value, step.value)

  app.run(run, flags_parser=config_lib.flags_parser(config))


if __name__ == '__main__':
  main()
