"""Orbax checkpoints of the train state and the data iterator, and preemption.

Layout: `<workdir>/checkpoints/<step>/{state, data_iterator}`. `state` is the
sharded train state (params, optimiser state, step; the RNG is a function of
(seed, step), so the step restores it); `data_iterator` holds one JSON file per
process with that process's `iterator.get_state()`, so a restored run reads
exactly the batches it would have read.

Preemption: a Cloud TPU (and most schedulers) send SIGTERM before evicting a job.
Single-process runs catch it with a Python handler; multi-process runs use JAX's
preemption sync manager (`multihost_utils.reached_preemption_sync_point`), which
makes every process stop at the same step. Either way the train loop saves at
that step and exits cleanly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

STATE = 'state'
DATA_ITERATOR = 'data_iterator'


def checkpoint_config() -> ml_collections.ConfigDict:
  """The `config.checkpoint` section."""
  return ml_collections.ConfigDict(dict(
      every_steps=1000,    # save interval
      keep_last=3,         # keep the newest N checkpoints...
      keep_every=0,        # ...plus every M-th step for good (0: none)
      async_save=True,     # write in the background while training continues
  ))


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves `iterator.get_state()` as JSON, one file per process.

  Accepts iterators whose state is a JSON-able dict (grain `DatasetIterator`
  style) or UTF-8 bytes (grain `DataLoaderIterator` style), and restores the
  same kind. Restoring with a different process count is an error: each
  process's position in its own shard would be lost.
  """

  def _file(self, directory: epath.Path) -> epath.Path:
    return directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'

  def save(self, directory: epath.Path, args: 'DataIteratorSave') -> None:
    state = args.iterator.get_state()
    record = ({'kind': 'bytes', 'state': state.decode()} if isinstance(state, bytes)
              else {'kind': 'json', 'state': state})
    self._file(directory).write_text(json.dumps(record))

  def restore(self, directory: epath.Path, args: 'DataIteratorRestore') -> Any:
    path = self._file(directory)
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise ValueError(f'{path} is missing (found {found}): the checkpoint was written '
                       f'by a different number of processes than {jax.process_count()}')
    record = json.loads(path.read_text())
    state = record['state'].encode() if record['kind'] == 'bytes' else record['state']
    args.iterator.set_state(state)
    return args.iterator

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


class Checkpointer:
  """Saves and restores (train state, data iterator) under `<workdir>/checkpoints`.

  Saves every `every_steps` steps (plus forced saves at preemption and at the
  end), keeps the newest `keep_last` and every `keep_every`-th step.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    if config.every_steps < 1 or config.keep_last < 1 or config.keep_every < 0:
      raise ValueError('config.checkpoint: every_steps and keep_last must be >= 1 and '
                       f'keep_every >= 0, got {config.to_dict()}')
    preservation = [ocp.checkpoint_managers.LatestN(config.keep_last)]
    if config.keep_every:
      preservation.append(ocp.checkpoint_managers.EveryNSteps(config.keep_every))
    options = ocp.CheckpointManagerOptions(
        # Exactly every N steps (orbax's default would also save the first step);
        # preemption and final saves are forced by the train loop.
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(config.every_steps),
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(preservation),
        enable_async_checkpointing=config.async_save,
        create=True)
    self.directory = epath.Path(workdir) / 'checkpoints'
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE, DATA_ITERATOR),
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA_ITERATOR: DataIteratorHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether `step` is due for a regular save."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether it did.

    With async saving, the state's arrays are copied before this returns, so the
    caller may donate them to the next step right away.
    """
    saved = self._manager.save(
        step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA_ITERATOR: DataIteratorSave(data_iterator)}), force=force)
    if saved:
      logging.info('checkpoint: saving step %d to %s', step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores the state of `step` into the shardings of `abstract_state`.

    Args:
      abstract_state: a tree of `jax.ShapeDtypeStruct`s with `sharding` set, so
        every array is read straight into its shards.
      data_iterator: set in place to the saved position.

    Returns:
      The restored state.
    """
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA_ITERATOR: DataIteratorRestore(data_iterator)}))
    logging.info('checkpoint: restored step %d from %s', step, self.directory)
    return restored[STATE]

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def stored_top_level_keys(directory: str) -> set[str]:
  """Top-level keys of a params pytree saved with orbax's StandardCheckpointer."""
  return set(ocp.StandardCheckpointer().metadata(directory).item_metadata.keys())


def restore_params(directory: str, abstract_params: Any) -> Any:
  """Reads a params pytree saved with orbax (e.g. by `vlpjax.convert`).

  Args:
    directory: the checkpoint directory (a `StandardCheckpointer` save).
    abstract_params: ShapeDtypeStructs with shardings for the tree to read.

  Raises:
    ValueError naming the paths that are missing, unexpected or of another shape.
  """
  checkpointer = ocp.StandardCheckpointer()
  stored = checkpointer.metadata(directory).item_metadata
  stored_shapes = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in
                   jax.tree_util.tree_leaves_with_path(stored)}
  wanted_shapes = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in
                   jax.tree_util.tree_leaves_with_path(abstract_params)}
  missing = sorted(set(wanted_shapes) - set(stored_shapes))
  unexpected = sorted(set(stored_shapes) - set(wanted_shapes))
  wrong = sorted(f'{k}: stored {stored_shapes[k]}, model {wanted_shapes[k]}'
                 for k in set(wanted_shapes) & set(stored_shapes)
                 if stored_shapes[k] != wanted_shapes[k])
  if missing or unexpected or wrong:
    raise ValueError(f'{directory} does not fit the model: missing {missing[:10]} '
                     f'({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}), '
                     f'shape mismatches {wrong[:10]} ({len(wrong)})')
  params = checkpointer.restore(directory, abstract_params)
  checkpointer.close()
  return params


class PreemptionWatcher:
  """Tells the train loop when to save and stop because the job is being preempted.

  Use as a context manager around the loop and call `reached(step)` after every
  step (every process, every step: the multi-process sync point needs that).
  """

  def __init__(self):
    self._signalled = threading.Event()
    self._distributed = jax.process_count() > 1
    self._previous_handler = None

  def __enter__(self) -> 'PreemptionWatcher':
    if not self._distributed:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)

  def _on_sigterm(self, signum: int, frame: Any) -> None:
    del signum, frame
    logging.warning('SIGTERM received (pid %d): saving and stopping after this step',
                    os.getpid())
    self._signalled.set()

  def reached(self, step: int) -> bool:
    """True once all processes should save at `step` and exit."""
    if self._distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled.is_set()
