"""Orbax checkpoints (state + data iterator), retention, params import, preemption,
a full disk."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlpjax import checkpointing, train


pytestmark = pytest.mark.usefixtures('compile_cache')


class CountingIterator:
  """An iterator whose position is its state (dict-state like grain's DatasetIterator,
  or bytes-state like grain's DataLoaderIterator)."""

  def __init__(self, as_bytes: bool = False):
    self.position = 0
    self.as_bytes = as_bytes

  def __next__(self) -> int:
    self.position += 1
    return self.position

  def get_state(self):
    state = {'position': self.position}
    return json.dumps(state).encode() if self.as_bytes else state

  def set_state(self, state) -> None:
    self.position = (json.loads(state.decode()) if self.as_bytes else state)['position']


def make_state(mesh, scale: float) -> dict:
  fsdp = NamedSharding(mesh, P('fsdp', None))
  return dict(step=jnp.asarray(3, jnp.int32),
              params={'kernel': jax.device_put(scale * jnp.arange(32.).reshape(8, 4), fsdp),
                      'bias': jnp.full((4,), scale)})


def checkpoint_config(**overrides) -> ml_collections.ConfigDict:
  config = checkpointing.checkpoint_config()
  config.update(overrides)
  return config


@pytest.fixture
def mesh():
  return jax.make_mesh((2, 4), ('data', 'fsdp'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.parametrize('as_bytes', [False, True])
def test_state_and_iterator_round_trip_into_new_shardings(tmp_path, mesh, as_bytes):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), checkpoint_config(every_steps=5))
  iterator = CountingIterator(as_bytes)
  for _ in range(7):
    next(iterator)
  state = make_state(mesh, 2.0)
  assert checkpointer.save(5, state, iterator)
  checkpointer.close()
  assert os.path.exists(tmp_path / 'checkpoints' / '5' / 'data_iterator' /
                        'process_0-of-1.json')

  # A fresh process: read back into a different sharding, iterator at the start.
  restorer = checkpointing.Checkpointer(str(tmp_path), checkpoint_config(every_steps=5))
  assert restorer.latest_step() == 5
  tensor = NamedSharding(mesh, P(None, 'fsdp'))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=tensor)
                          if a.ndim == 2 else jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  fresh = CountingIterator(as_bytes)
  restored = restorer.restore(5, abstract, fresh)
  restorer.close()
  assert fresh.position == 7
  assert restored['params']['kernel'].sharding == tensor
  for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_interval_and_retention(tmp_path, mesh):
  """Saves every 2 steps; keeps the newest 2 plus every 4th step."""
  checkpointer = checkpointing.Checkpointer(
      str(tmp_path), checkpoint_config(every_steps=2, keep_last=2, keep_every=4))
  iterator = CountingIterator()
  saved = []
  for step in range(1, 12):
    next(iterator)
    if checkpointer.save(step, make_state(mesh, float(step)), iterator,
                         force=step == 11):
      saved.append(step)
  checkpointer.close()
  assert saved == [2, 4, 6, 8, 10, 11]
  assert sorted(checkpointer.all_steps()) == [4, 8, 10, 11]


@pytest.mark.parametrize('overrides', [dict(keep_last=1), dict(every_steps=0),
                                       dict(on_corrupt='ignore')])
def test_bad_checkpoint_config(tmp_path, overrides):
  with pytest.raises(ValueError, match='config.checkpoint'):
    checkpointing.Checkpointer(str(tmp_path), checkpoint_config(**overrides))


def test_restore_on_another_process_count_takes_the_saved_position(tmp_path, mesh):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), checkpoint_config())
  saved = CountingIterator()
  for _ in range(3):
    next(saved)
  checkpointer.save(1, make_state(mesh, 1.0), saved, force=True)
  checkpointer.close()
  data_dir = tmp_path / 'checkpoints' / '1' / 'data_iterator'
  # As if 2 processes had saved it (the same global position each).
  text = (data_dir / 'process_0-of-1.json').read_text()
  os.remove(data_dir / 'process_0-of-1.json')
  for index in range(2):
    (data_dir / f'process_{index}-of-2.json').write_text(text)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          make_state(mesh, 1.0))
  restorer = checkpointing.Checkpointer(str(tmp_path), checkpoint_config())
  restored = CountingIterator()
  restorer.restore(1, abstract, restored)
  assert restored.get_state() == saved.get_state()
  restorer.close()
  # Saved states that disagree cannot be one global position.
  (data_dir / 'process_1-of-2.json').write_text(text.replace('3', '4'))
  restorer = checkpointing.Checkpointer(str(tmp_path), checkpoint_config())
  with pytest.raises(checkpointing.CheckpointCorruptError, match='differ'):
    restorer.restore(1, abstract, CountingIterator())
  restorer.close()


def test_restore_latest_names_every_unreadable_checkpoint_and_moves_none(tmp_path, mesh):
  checkpointer = checkpointing.Checkpointer(str(tmp_path), checkpoint_config())
  for step in (1, 2):
    checkpointer.save(step, make_state(mesh, 1.0), CountingIterator(), force=True)
  checkpointer.close()
  files = [tmp_path / 'checkpoints' / str(step) / 'data_iterator' / 'process_0-of-1.json'
           for step in (2, 1)]
  for path in files:
    path.write_text('{"kind": "json", "sta')
  restorer = checkpointing.Checkpointer(str(tmp_path), checkpoint_config())
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          make_state(mesh, 1.0))
  with pytest.raises(checkpointing.CheckpointCorruptError) as error:
    restorer.restore_latest(abstract, CountingIterator())
  restorer.close()
  assert re.fullmatch(re.escape(f'no checkpoint in {tmp_path}/checkpoints reads back: ') +
                      '; '.join(re.escape(f'{path}: JSONDecodeError: Unterminated string') +
                                '[^;]*' for path in files), str(error.value))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']


def test_restore_params_checks_paths_and_shapes(tmp_path, mesh):
  params = make_state(mesh, 3.0)['params']
  directory = str(tmp_path / 'params')
  with ocp.StandardCheckpointer() as saver:
    saver.save(directory, params)
  assert checkpointing.stored_top_level_keys(directory) == {'kernel', 'bias'}
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          params)
  restored = checkpointing.restore_params(directory, abstract)
  np.testing.assert_array_equal(np.asarray(restored['kernel']), np.asarray(params['kernel']))
  assert restored['kernel'].sharding == params['kernel'].sharding

  wrong = dict(abstract, bias=jax.ShapeDtypeStruct((5,), jnp.float32),
               extra=jax.ShapeDtypeStruct((2,), jnp.float32))
  with pytest.raises(ValueError, match=r"missing \[\"\['extra'\]\"\].*stored \(4,\), model \(5,\)"):
    checkpointing.restore_params(directory, wrong)


def test_preemption_watcher_catches_sigterm_and_restores_the_handler():
  previous = signal.getsignal(signal.SIGTERM)
  with checkpointing.PreemptionWatcher() as watcher:
    assert not watcher.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.reached(2)
  assert signal.getsignal(signal.SIGTERM) is previous


def tiny_run_config(data_dir: str, **train_overrides) -> ml_collections.ConfigDict:
  """What `tiny_run_flags` make of configs/visualbert.py:tiny."""
  from configs import visualbert  # pylint: disable=g-import-not-at-top
  config = visualbert.get_config('tiny')
  config.data.update(data_dir=data_dir, size='tiny')
  config.model.vocab_size = 144
  config.train.update(global_batch_size=8, num_steps=1000, log_every_steps=1)
  config.train.update(train_overrides)
  config.checkpoint.every_steps = 1000
  return config


def tiny_run_flags(data_dir: str) -> list[str]:
  return [f'--config.data.data_dir={data_dir}', '--config.data.size=tiny',
          '--config.model.vocab_size=144', '--config.train.global_batch_size=8',
          '--config.train.num_steps=1000', '--config.train.log_every_steps=1',
          '--config.checkpoint.every_steps=1000']


def read_losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subprocess_env(tmp_path_factory) -> tuple[str, dict[str, str]]:
  """(repo root, environment) for a `vlpjax.main` subprocess on 8 CPU devices,
  sharing the tests' compilation cache."""
  cache_dir = str(tmp_path_factory.getbasetemp() / 'jax_cache')
  return REPO, dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='8', PYTHONPATH=REPO,
                    JAX_COMPILATION_CACHE_DIR=cache_dir,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(tmp_path, tmp_path_factory):
  """A real SIGTERM to a training process: it saves the step it reached and exits 0;
  resuming gives the next steps' losses of an uninterrupted run."""
  data_dir = str(tmp_path_factory.getbasetemp() / 'tfds_tiny')
  workdir = tmp_path / 'preempted'
  repo, env = _subprocess_env(tmp_path_factory)
  proc = subprocess.Popen(
      [sys.executable, '-m', 'vlpjax.main', '--config=configs/visualbert.py:tiny',
       f'--workdir={workdir}', *tiny_run_flags(data_dir)],
      cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics_file = workdir / 'metrics.jsonl'
  deadline = time.time() + 900
  while not (metrics_file.exists() and metrics_file.read_text().count('\n') >= 2):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  stderr = proc.communicate(timeout=300)[1]
  assert proc.returncode == 0, stderr[-3000:]
  assert 'preempted: saved step' in stderr
  stopped = max(read_losses(workdir))
  assert stopped < 1000
  steps = [int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()]
  assert steps == [stopped]

  # Resume for two steps, and compare with an uninterrupted run to the same step.
  train.train_and_evaluate(tiny_run_config(data_dir, max_steps_this_run=2), str(workdir))
  reference = tmp_path / 'reference'
  train.train_and_evaluate(tiny_run_config(data_dir, max_steps_this_run=stopped + 2),
                           str(reference))
  got, want = read_losses(workdir), read_losses(reference)
  assert sorted(got) == sorted(want) == list(range(1, stopped + 3))
  for step in (stopped + 1, stopped + 2):
    assert got[step] == pytest.approx(want[step], rel=1e-6), step


# Python's file writes under checkpoints/ fail as on a full disk: orbax's metadata
# and the data iterator's JSON, in orbax's background threads as on a real one
# (tensorstore writes the arrays from C++, unaffected).
FULL_DISK_MAIN = """
import builtins, errno, os, runpy, sys
open_ = builtins.open
def full_disk_open(file, mode='r', *args, **kwargs):
  if set(mode) & set('wax+') and f'{os.sep}checkpoints{os.sep}' in os.fspath(file):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
  return open_(file, mode, *args, **kwargs)
builtins.open = full_disk_open
sys.argv[0] = 'vlpjax.main'
runpy.run_module('vlpjax.main', run_name='__main__')
"""


def test_full_disk_ends_with_one_error_and_the_rerun_removes_the_unfinished_save(
    tmp_path, tmp_path_factory, caplog):
  data_dir = str(tmp_path_factory.getbasetemp() / 'tfds_tiny')
  workdir = tmp_path / 'full'
  repo, env = _subprocess_env(tmp_path_factory)
  result = subprocess.run(
      [sys.executable, '-c', FULL_DISK_MAIN, '--config=configs/visualbert.py:tiny',
       f'--workdir={workdir}', *tiny_run_flags(data_dir), '--config.train.max_steps_this_run=2'],
      cwd=repo, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 1
  # The end of the output is one line naming the directory and its free space.
  assert re.fullmatch(
      rf'vlpjax\.checkpointing\.CheckpointWriteError: {re.escape(str(workdir))}/checkpoints: '
      r'writing a checkpoint failed with [0-9.]+ MiB free: OSError: \[Errno 28\] No space '
      r'left on device: .*', result.stderr.rstrip().splitlines()[-1]), result.stderr[-3000:]
  for noise in ('sys.meta_path is None', 'Event loop is closed'):
    assert noise not in result.stderr
  leftovers = [name for name in os.listdir(workdir / 'checkpoints')
               if ocp.path.atomicity_types.TMP_DIR_SUFFIX in name]
  assert leftovers

  # Space freed, the rerun starts by removing what the failed save left.
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(tiny_run_config(data_dir, max_steps_this_run=2), str(workdir))
  for name in leftovers:
    assert f'removing {workdir}/checkpoints/{name}, left by a save that did not finish' in (
        caplog.text)
  assert os.listdir(workdir / 'checkpoints') == ['2']
