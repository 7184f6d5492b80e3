"""The command line: `python -m vlpjax.main --config=configs/<design>.py:<arg> --workdir=DIR`
with `--config.field=value` overrides, and what it prints."""
import importlib
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

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
  # A clean log: vlpjax's lines as 'HH:MM:SS message', no library INFO chatter
  # (orbax writes ~30 lines per checkpoint), one line per checkpoint saved.
  lines = result.stderr.splitlines()
  assert re.fullmatch(r'\d\d:\d\d:\d\d step 2/1000 \| .*', line[0]), line[0]
  assert not [l for l in lines if re.match(r'[IW]\d{4} ', l)], result.stderr[-3000:]
  assert sum('checkpoint: saving step' in l for l in lines) == 1, result.stderr[-3000:]
  assert os.path.isdir(workdir / 'checkpoints' / '2')
  assert (workdir / 'metrics.jsonl').read_text().count('\n') == 2


def test_unknown_override_is_an_error(tmp_path):
  result = subprocess.run(command(str(tmp_path), '--config.train.no_such_field=1'),
                          cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'no_such_field' in result.stderr


# Overrides the command line rejects before anything runs, and what it says: one
# line, naming the field.
CONFIG_ERRORS = [
    ('--config.train.nope=1', "--config.train.nope: config.train has no field 'nope'; "
     'its fields: adam_b1, '),
    ('--config.init.from=orbax:x', "config.init has no field 'from'; its fields: source"),
    ('--config.model.dtpye=bfloat16', "no field 'dtpye'; nearest: config.model.dtype"),
    ('--config.model.dtype=float13', "config.model.dtype must be one of ('float32', "
     "'bfloat16', 'float16'), got 'float13'"),
    ('--config.model.attention_impl=flash', 'config.model.attention_impl must be one of'),
    ('--config.mesh.shape=(2,a,1)', "config.mesh.shape: could not parse '(2,a,1)' as a "
     'tuple of integers'),
]


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('FATAL Flags parsing error: ') and message in last, last


@pytest.mark.parametrize('override, message', CONFIG_ERRORS)
def test_config_errors_are_one_line(tmp_path, tmp_path_factory, override, message):
  result = subprocess.run(command(str(tmp_path / 'run'), *tiny_run_flags(str(tmp_path)),
                                  override),
                          cwd=REPO, env=cpu_env(tmp_path_factory), capture_output=True,
                          text=True, timeout=300)
  assert_one_line_error(result, message)


def outside_checkout_env(tmp_path_factory) -> dict[str, str]:
  """`cpu_env` as a job elsewhere sees it: the installed package, no checkout on
  the path (a config file must import only installed modules)."""
  env = cpu_env(tmp_path_factory)
  del env['PYTHONPATH']
  return dict(env, VLPJAX=REPO)


def readme_block(marker: str) -> str:
  """The README's ```bash block that contains `marker`."""
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    blocks = re.findall(r'```bash\n(.*?)```', f.read(), re.S)
  found = [b for b in blocks if marker in b]
  assert len(found) == 1, marker
  return found[0]


def test_readme_starts_runs_from_weights(tmp_path, tmp_path_factory):
  """The README's commands, as written, from a directory outside the checkout:
  convert an HF checkpoint to orbax, then start a run from it (a relative
  orbax:DIR) and one from a BERT directory (bert:DIR). The first update's
  learning rate is 0 (warmup), so the step-1 checkpoints hold the loaded weights."""
  shapes = dict(vocab_size=144, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=64, type_vocab_size=2)
  torch.manual_seed(0)
  visualbert = transformers.VisualBertForPreTraining(
      transformers.VisualBertConfig(**shapes, visual_embedding_dim=40))
  visualbert.save_pretrained(tmp_path / 'visualbert_tiny')
  bert = transformers.BertModel(transformers.BertConfig(**shapes))
  bert.save_pretrained(tmp_path / 'bert_tiny')

  result = subprocess.run(['bash', '-e', '-c', readme_block('init.source=orbax:conv/')],
                          cwd=tmp_path, env=outside_checkout_env(tmp_path_factory),
                          capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  for run, source in (('from_orbax', 'orbax:conv/visualbert_tiny'),
                      ('from_bert', 'bert:bert_tiny')):
    assert f'init: params from {source}' in result.stderr
    with ocp.StandardCheckpointer() as checkpointer:
      state = checkpointer.restore(tmp_path / 'runs' / run / 'checkpoints' / '1' / 'state')
    embeddings = state['params']['backbone']['embeddings']
    expected = (visualbert.visual_bert if run == 'from_orbax' else bert).embeddings
    words = expected.word_embeddings.weight.detach().numpy()  # [144, H]; ours padded to 256
    np.testing.assert_array_equal(embeddings['word_embeddings']['embedding'][:len(words)], words)
    np.testing.assert_array_equal(embeddings['norm']['scale'],
                                  expected.LayerNorm.weight.detach().numpy())


def test_missing_init_source_is_named(tmp_path, tmp_path_factory):
  result = subprocess.run(
      [sys.executable, '-m', 'vlpjax.main', f'--config={REPO}/configs/visualbert.py:tiny',
       f'--workdir={tmp_path}/run', *tiny_run_flags(str(tmp_path / 'tfds')),
       '--config.init.source=orbax:conv/nothing_here'],
      cwd=tmp_path, env=outside_checkout_env(tmp_path_factory), capture_output=True,
      text=True, timeout=900)
  assert result.returncode != 0
  assert (f'params checkpoint conv/nothing_here: not found ({tmp_path}/conv/nothing_here)'
          in result.stderr), result.stderr[-3000:]


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
  assert config.init.source == ''   # `from`, a keyword, could not be set on the command line


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
