"""Gradient accumulation gives the full batch's losses, metrics and update, for
every task's losses (pretraining of each design, each fine-tuning task): each
microbatch divides by the full batch's denominators (`objectives.common.ratio`)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from test_finetune import tiny_config
from vlpjax import optim, sharding, state as state_lib, step as step_lib
from vlpjax.models import DESIGNS, get_design
from vlpjax.objectives import common
from vlpjax.tasks import TASKS, get_task

pytestmark = pytest.mark.usefixtures('compile_cache')

# The default run checks the losses of LXMERT's and UNITER's pretraining (VisualBERT's:
# test_train.py), VQA and captioning (inputs shared by the batch); the others are slow.
DEFAULT = (('pretrain', 'lxmert'), ('pretrain', 'uniter'), ('vqa', 'uniter'),
           ('caption', 'uniter'))
CASES = [pytest.param(task, design, marks=() if (task, design) in DEFAULT else pytest.mark.slow)
         for task, design in ([('pretrain', design) for design in DESIGNS]
                              + [(task, 'uniter') for task in TASKS if task != 'pretrain']
                              + [('nlvr2', 'lxmert'), ('vcr', 'vilbert')])]


def one_step(config, task, objective, batch, accumulate: int):
  config = config.copy_and_resolve_references()
  config.train.grad_accum_steps = accumulate
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  rules = sharding.logical_axis_rules(config)
  model = task.make_model(config)
  tx, schedule = optim.make_optimizer(config.train, get_design(config.model.name))
  batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  input_specs = step_lib.model_input_specs(config, task, objective, batch_spec)
  _, shardings = state_lib.abstract_train_state(model, tx, input_specs, mesh, rules)
  state = state_lib.init_train_state(model, tx, input_specs, config.seed, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = step_lib.make_train_step(config, model, tx, schedule, mesh, shardings, task,
                                    objective)
    state, metrics = step(state, batch)
  return jax.device_get(metrics), jax.device_get(state.params)


@pytest.mark.parametrize('task_name, design', CASES)
def test_accumulation_gives_the_full_batch_update(data_dir, task_name, design):
  task = get_task(task_name)
  config = tiny_config(design, data_dir, task_name)
  config.model.dropout_rate = config.model.attention_dropout_rate = 0.0
  config.train.warmup_fraction = 0.0
  config = task.prepare(config)
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  batch = jax.device_get(next(task.make_train_iterator(config, mesh)))
  objectives = task.objectives(config)
  for objective in objectives:
    full_metrics, full_params = one_step(config, task, objective, batch, 1)
    micro_metrics, micro_params = one_step(config, task, objective, batch, 4)
    assert set(micro_metrics) == set(full_metrics)
    for key, want in full_metrics.items():
      np.testing.assert_allclose(micro_metrics[key], want, rtol=2e-5, atol=1e-6,
                                 err_msg=f'{objective}: {key}')
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(full_params),
                                 jax.tree_util.tree_leaves(micro_params)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6,
                                 err_msg=f'{objective}: {jax.tree_util.keystr(path)}')


def test_denominators_are_replayed_in_order_and_all_used():
  values = np.arange(4.0)
  with common.recorded_denominators() as recorded:
    common.mean(values)
    common.ratio(1.0, 4.0)
  assert recorded == [4.0, 4.0]
  with common.replayed_denominators([8.0, 2.0]):
    assert common.mean(values) == 6.0 / 8.0
    assert common.ratio(1.0, 4.0) == 0.5
  with pytest.raises(RuntimeError, match='less often'):
    with common.replayed_denominators([8.0, 2.0]):
      common.mean(values)
  with pytest.raises(RuntimeError, match='more often'):
    with common.replayed_denominators([8.0]):
      common.mean(values)
      common.mean(values)
