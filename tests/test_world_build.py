"""The embedded world is built once per data_dir: a lock file for a local one
(hosts sharing it over NFS, or processes on one machine), process 0 for gs://.

A fake table stands in for TFDS (prepared = its marker file exists), so these
run the real `tables._build_once` in threads without building anything.
"""
import logging
import os
import threading
import time

import pytest

from vlpjax.data import tables

NAME = 'vlp_world/tiny_vqa'


class FakeTables:
  """`tfds.builder(name, data_dir).is_prepared()` and the build, counted."""

  def __init__(self, data_dir, build_seconds=0.3, fail_first=False):
    self.marker = os.path.join(data_dir, 'prepared')
    self.build_seconds = build_seconds
    self.fail_first = fail_first
    self.builds = []

  def builder(self, name, data_dir):
    del name, data_dir
    fake = self

    class Builder:
      def is_prepared(self):
        return os.path.exists(fake.marker)
    return Builder()

  def build(self, name, data_dir):
    self.builds.append(threading.current_thread().name)
    time.sleep(self.build_seconds)
    if self.fail_first and len(self.builds) == 1:
      raise RuntimeError('the first build died')
    open(self.marker, 'w').close()


@pytest.fixture
def fake(tmp_path, monkeypatch):
  def install(**kwargs):
    fake_tables = FakeTables(str(tmp_path), **kwargs)
    monkeypatch.setattr(tables.tfds, 'builder', fake_tables.builder)
    monkeypatch.setattr(tables, '_build_world_table', fake_tables.build)
    return fake_tables
  return install


def _race(data_dir, count=3):
  """`_build_once` from `count` threads at once; the errors they raised."""
  errors = []

  def run():
    try:
      tables._build_once(NAME, data_dir)
    except Exception as error:  # pylint: disable=broad-except
      errors.append(error)
  threads = [threading.Thread(target=run, name=f'process-{i}') for i in range(count)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=30)
  return errors


def test_local_data_dir_is_built_once_while_the_others_wait(tmp_path, fake):
  tables_ = fake()
  assert _race(str(tmp_path)) == []
  assert len(tables_.builds) == 1
  assert os.path.exists(tables_.marker)
  assert not (tmp_path / 'vlp_world_tiny_vqa.building').exists()  # the lock is released


def test_a_build_that_dies_is_taken_over_by_a_waiting_process(tmp_path, fake):
  tables_ = fake(fail_first=True)
  errors = _race(str(tmp_path), count=2)
  assert [str(e) for e in errors] == ['the first build died']  # the builder's own error
  assert len(tables_.builds) == 2 and os.path.exists(tables_.marker)


def test_a_stale_lock_is_removed(tmp_path, fake, caplog):
  tables_ = fake()
  lock = tmp_path / 'vlp_world_tiny_vqa.building'
  lock.touch()
  old = time.time() - tables.WORLD_BUILD_TIMEOUT_SECONDS - 1
  os.utime(lock, (old, old))
  with caplog.at_level(logging.WARNING):
    tables._build_once(NAME, str(tmp_path))
  assert len(tables_.builds) == 1 and not lock.exists()
  assert 'removing a stale lock' in caplog.text


@pytest.mark.parametrize('process', [0, 1])
def test_remote_data_dir_is_built_by_process_0_only(tmp_path, fake, monkeypatch, process):
  tables_ = fake()
  monkeypatch.setattr(tables.paths, 'is_local', lambda path: False)
  monkeypatch.setattr(tables.jax, 'process_index', lambda: process)
  if process == 0:
    tables._build_once(NAME, str(tmp_path))
    assert len(tables_.builds) == 1
    return
  # Process 1 waits until process 0's table appears, and builds nothing itself.
  appear = threading.Timer(0.3, lambda: open(tables_.marker, 'w').close())
  appear.start()
  tables._build_once(NAME, str(tmp_path))
  assert tables_.builds == [] and os.path.exists(tables_.marker)  # returned once it appeared
