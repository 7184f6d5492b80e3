"""The command line: `python -m vlpjax.main --config=configs/<design>.py:<arg> --workdir=DIR`
with `--config.field=value` overrides, and what it prints."""
import importlib
import os
import subprocess
import sys

import ml_collections
import pytest

from vlpjax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGNS = ('visualbert', 'vilbert', 'lxmert', 'uniter')


def command(workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, '-m', 'vlpjax.main', '--config=configs/visualbert.py:tiny',
          f'--workdir={workdir}', *overrides]


def cpu_env(tmp_path_factory) -> dict[str, str]:
  """8 CPU devices and the session's compilation cache (shared with test_train)."""
  return dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='8', PYTHONPATH=REPO,
              JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.getbasetemp() / 'jax_cache'),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def tiny_run_flags(data_dir: str) -> list[str]:
  """The tiny world's sizes, and the schedule of test_train's runs (same program)."""
  return [f'--config.data.data_dir={data_dir}', '--config.data.size=tiny',
          '--config.model.vocab_size=144', '--config.train.global_batch_size=8',
          '--config.train.num_steps=1000', '--config.train.log_every_steps=1',
          '--config.checkpoint.every_steps=2']


def test_command_line_trains_and_reports(tmp_path, tmp_path_factory):
  workdir = tmp_path / 'run'
  result = subprocess.run(
      command(str(workdir), *tiny_run_flags(str(tmp_path / 'tfds')),
              '--config.train.max_steps_this_run=2'),
      cwd=REPO, env=cpu_env(tmp_path_factory), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  # The progress line: step, each loss, learning rate, throughput, ETA.
  line = [l for l in result.stderr.splitlines() if 'step 2/1000 |' in l]
  assert line, result.stderr[-3000:]
  for part in ('loss ', 'mlm ', 'sentence_image ', 'lr ', 'ex/s', 'ETA '):
    assert part in line[0]
  assert os.path.isdir(workdir / 'checkpoints' / '2')
  assert (workdir / 'metrics.jsonl').read_text().count('\n') == 2


def test_unknown_override_is_an_error(tmp_path):
  result = subprocess.run(command(str(tmp_path), '--config.train.no_such_field=1'),
                          cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'no_such_field' in result.stderr


def test_distributed_arguments_go_together():
  with pytest.raises(ValueError, match='go together'):
    sharding.maybe_initialize_distributed('localhost:1234', None, 0)
  assert not sharding.cluster_detected()   # a plain machine: stays single-process
  sharding.maybe_initialize_distributed()


@pytest.mark.parametrize('design', DESIGNS)
def test_design_configs_give_full_run_configs(design):
  module = importlib.import_module(f'configs.{design}')
  assert f'python -m vlpjax.main --config=configs/{design}.py:' in module.__doc__
  config = module.get_config('tiny')
  assert {'model', 'train', 'pretrain', 'data', 'mesh', 'checkpoint', 'init'} <= set(config)
  assert config.model.name == design


def config_field_types(config: ml_collections.ConfigDict, prefix: str = 'config.'):
  """(dotted name, type) of every leaf field."""
  for name in config.keys():
    if isinstance(config[name], ml_collections.ConfigDict):
      yield from config_field_types(config[name], f'{prefix}{name}.')
    else:
      yield prefix + name, config.get_type(name)


@pytest.mark.parametrize('design', DESIGNS)
def test_every_field_can_be_set_on_the_command_line(design):
  """config_flags cannot parse a value for a field typed NoneType: optional fields
  must be typed placeholders."""
  config = importlib.import_module(f'configs.{design}').get_config('small')
  untyped = [name for name, kind in config_field_types(config) if kind is type(None)]
  assert not untyped
