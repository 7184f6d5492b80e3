"""Orbax checkpoints of the train state and the data iterator, and preemption.

Layout: `<workdir>/checkpoints/<step>/{state, data_iterator}`. `state` is the
sharded train state (params, optimiser state, step; the RNG is a function of
(seed, step), so the step restores it); `data_iterator` holds one JSON file per
process with that process's `iterator.get_state()`, so a restored run reads
exactly the batches it would have read.

Damage: each save records a checksum of every array of the state, which a
restore checks. A newest checkpoint that does not read back (a truncated or
altered file, a missing one, empty metadata) is moved aside to `<step>.corrupt`
and the run resumes from the newest one that does (`on_corrupt='fallback'`), or
stops (`'fail'`). Saves that never finished (orbax's `*.orbax-checkpoint-tmp*`
directories, left by a kill or a full disk) are removed at start. A failed save
ends the run with one `CheckpointWriteError` naming the directory and its free
space.

Preemption: a Cloud TPU (and most schedulers) send SIGTERM before evicting a job.
Single-process runs catch it with a Python handler; multi-process runs use JAX's
preemption sync manager (`multihost_utils.reached_preemption_sync_point`), which
makes every process stop at the same step. Either way the train loop saves at
that step and exits cleanly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import threading
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from vlpjax import paths
from vlpjax.models import layers

STATE = 'state'
DATA_ITERATOR = 'data_iterator'
ON_CORRUPT = ('fallback', 'fail')
# Where an unreadable checkpoint goes: `<step>.corrupt` (orbax ignores the name).
CORRUPT_SUFFIX = '.corrupt'
# The key of the state's checksums in each checkpoint's custom metadata.
CHECKSUMS = 'state_checksums'


def checkpoint_config() -> ml_collections.ConfigDict:
  """The `config.checkpoint` section."""
  return ml_collections.ConfigDict(dict(
      every_steps=1000,    # save interval
      keep_last=3,         # keep the newest N >= 2 checkpoints...
      keep_every=0,        # ...plus every M-th step for good (0: none)
      async_save=True,     # write in the background while training continues
      # A newest checkpoint that does not read back: move it aside and resume
      # from the newest that does ('fallback'), or stop ('fail').
      on_corrupt='fallback',
  ))


class CheckpointCorruptError(ValueError):
  """A checkpoint does not read back; the message is `<path>: <reason>`."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (a full disk, say); the message names the
  directory and its free space."""


def _reason(error: BaseException) -> str:
  """'<type>: <first line>' of the innermost cause of `error` (orbax wraps
  tensorstore's errors, which go on with pages of spec)."""
  while error.__cause__ is not None:
    error = error.__cause__
  # A KeyError's str() is the repr of its argument.
  message = error.args[0] if isinstance(error, KeyError) and error.args else error
  return f'{type(error).__name__}: {(str(message).strip().splitlines() or [""])[0]}'


@contextlib.contextmanager
def _read_errors(path: epath.Path) -> Iterator[None]:
  """Re-raises what reading the checkpoint at `path` raised as one CheckpointCorruptError."""
  try:
    yield
  except CheckpointCorruptError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught  (orbax raises bare Exception)
    raise CheckpointCorruptError(f'{path}: {_reason(e)}') from None


def _free_space(directory: epath.Path) -> str:
  """'12.34 MiB free' for a local directory ('free space unknown' for gs:// and such)."""
  try:
    return f'{shutil.disk_usage(os.fspath(directory)).free / 2**20:.2f} MiB free'
  except OSError:
    return 'free space unknown'


def _on_any_process(flag: bool) -> bool:
  """Whether `flag` holds on some process (all processes must take the same path)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@jax.jit
def _array_checksum(x: jax.Array) -> jax.Array:
  bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize])
  return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


def _checksums(tree: Any) -> dict[str, int]:
  """Per array of `tree` (by key path): the sum of its elements' bit patterns mod
  2**32. Integer sums do not depend on the sharding or the order of summation,
  and a changed value changes them (unless changes cancel out mod 2**32).
  One program per array: the arrays of a tree may live on different devices."""
  sums = jax.device_get(jax.tree.map(_array_checksum, tree))
  return {jax.tree_util.keystr(path): int(s)
          for path, s in jax.tree_util.tree_leaves_with_path(sums)}


def _remove_unfinished_saves(directory: epath.Path) -> None:
  """Removes what saves that never finished left: orbax ignores it, and on a full
  disk it holds the space a rerun needs."""
  for path in directory.glob(f'*{ocp.path.atomicity_types.TMP_DIR_SUFFIX}*'):
    logging.warning('checkpoint: removing %s, left by a save that did not finish', path)
    path.rmtree()


def _drop_closed_loop_callback_errors() -> None:
  """Keeps tensorstore's late callbacks out of the error output.

  When one read or write of a checkpoint fails, orbax closes its event loop while
  tensorstore still completes the others; each completion then fails to call back
  into the closed loop and is reported as an unraisable 'Event loop is closed':
  dozens of traces that bury the one real error.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop_callback_errors', False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and
            str(unraisable.exc_value) == 'Event loop is closed'):
      previous(unraisable)

  hook.drops_closed_loop_callback_errors = True
  sys.unraisablehook = hook


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves `iterator.get_state()` as JSON, one file per process.

  Accepts iterators whose state is a JSON-able dict (grain `DatasetIterator`
  style) or UTF-8 bytes (grain `DataLoaderIterator` style), and restores the
  same kind. vlpjax's iterators walk one global order (`endless_batches`), so
  every process saves the same state, and a run restarted on another number of
  processes restores the saved one (checked to agree across the saved files).
  """

  def _file(self, directory: epath.Path) -> epath.Path:
    return directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'

  def save(self, directory: epath.Path, args: 'DataIteratorSave') -> None:
    state = args.iterator.get_state()
    record = ({'kind': 'bytes', 'state': state.decode()} if isinstance(state, bytes)
              else {'kind': 'json', 'state': state})
    self._file(directory).write_text(json.dumps(record))

  def restore(self, directory: epath.Path, args: 'DataIteratorRestore') -> Any:
    """Returns the saved state; the caller sets it (its errors are not damage)."""
    del args
    path = self._file(directory)
    if path.exists():
      return self._read(path)
    found = sorted(directory.glob('process_*.json'))
    if not found:
      raise CheckpointCorruptError(f'{path}: missing')
    states = [self._read(p) for p in found]
    if any(s != states[0] for s in states):
      raise CheckpointCorruptError(
          f'{directory}: the data states of {[p.name for p in found]} differ, so they '
          f'cannot be restored on {jax.process_count()} process(es)')
    logging.info('checkpoint: data position from %s (saved by another number of '
                 'processes; the data order is global)', found[0].name)
    return states[0]

  def _read(self, path: epath.Path) -> Any:
    try:
      record = json.loads(path.read_text())
      return record['state'].encode() if record['kind'] == 'bytes' else record['state']
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise CheckpointCorruptError(f'{path}: {_reason(e)}') from None

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
  pass


class Checkpointer:
  """Saves and restores (train state, data iterator) under `<workdir>/checkpoints`.

  Saves every `every_steps` steps (plus forced saves at preemption and at the
  end), keeps the newest `keep_last` and every `keep_every`-th step. Process 0
  removes unfinished saves of earlier runs when it is created.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    # Two at least: the newest is known good only once the step after it was
    # finite (`train._check_finite`), and the one before must still be there.
    if (config.every_steps < 1 or config.keep_last < 2 or config.keep_every < 0 or
        config.on_corrupt not in ON_CORRUPT):
      raise ValueError('config.checkpoint: every_steps must be >= 1, keep_last >= 2, '
                       f'keep_every >= 0 and on_corrupt one of {ON_CORRUPT}, got '
                       f'{config.to_dict()}')
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
    self.directory = paths.path(workdir) / 'checkpoints'
    self._on_corrupt = config.on_corrupt
    self._write_failed = False
    _drop_closed_loop_callback_errors()
    if jax.process_index() == 0:
      _remove_unfinished_saves(self.directory)
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

  @contextlib.contextmanager
  def _write_errors(self) -> Iterator[None]:
    """Re-raises a failed write as one CheckpointWriteError (orbax has logged the
    details)."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-exception-caught  (orbax raises bare Exception)
      self._write_failed = True
      raise CheckpointWriteError(
          f'{self.directory}: writing a checkpoint failed with '
          f'{_free_space(self.directory)}: {_reason(e)}') from None

  def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether it did.

    With async saving, the state's arrays are copied before this returns, so the
    caller may donate them to the next step right away.

    Raises:
      CheckpointWriteError: this save, or the asynchronous one before, failed.
    """
    if not (force or self.should_save(step)):
      return False
    checksums = _checksums(state)
    with self._write_errors():
      saved = self._manager.save(
          step, args=ocp.args.Composite(**{
              STATE: ocp.args.StandardSave(state),
              DATA_ITERATOR: DataIteratorSave(data_iterator)}),
          custom_metadata={CHECKSUMS: checksums}, force=True)
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
      The restored state, its checksums checked against the saved ones.

    Raises:
      CheckpointCorruptError: the checkpoint does not read back.
    """
    step_dir = self.directory / str(step)
    # The small item first: a damaged one then costs no read of the state.
    with _read_errors(step_dir / DATA_ITERATOR):
      iterator_state = self._manager.restore(
          step, args=ocp.args.Composite(**{DATA_ITERATOR: DataIteratorRestore()})
      )[DATA_ITERATOR]
    with _read_errors(step_dir / STATE):
      state = self._manager.restore(
          step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)})
      )[STATE]
      # Checkpoints of earlier versions have none.
      saved = self._manager.metadata(step).custom_metadata.get(CHECKSUMS)
    if saved is not None:
      changed = sorted(k for k, v in _checksums(state).items() if saved.get(k) != v)
      if changed:
        raise CheckpointCorruptError(
            f'{step_dir / STATE}: {len(changed)} array(s) differ from what was saved '
            f'(checksums), e.g. {changed[0]}')
    data_iterator.set_state(iterator_state)
    logging.info('checkpoint: restored step %d from %s', step, self.directory)
    return state

  def restore_latest(self, abstract_state: Any, data_iterator: Any) -> Any | None:
    """Restores the newest checkpoint that reads back (as `restore`); None if none.

    With `on_corrupt='fallback'` an unreadable one is logged and the one before
    tried; once one restores, the unreadable ones are moved to
    `<step>.corrupt`, so that later runs do not try them again and this one can
    save those steps anew.

    Raises:
      CheckpointCorruptError: with 'fail', the newest does not read back; with
        'fallback', none does (each is named; none is moved).
    """
    unreadable = []
    for step in sorted(self.all_steps(), reverse=True):
      error = None
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except CheckpointCorruptError as e:
        error = e
      if _on_any_process(error is not None):
        error = error or CheckpointCorruptError(
            f'{self.directory / str(step)}: does not read back on another process')
        if self._on_corrupt == 'fail':
          raise CheckpointCorruptError(
              f"{error} (config.checkpoint.on_corrupt='fail'; 'fallback' resumes from "
              'the newest checkpoint that reads back)') from None
        logging.warning('checkpoint: %s; trying the one before', error)
        unreadable.append((step, error))
        continue
      for bad_step, _ in unreadable:
        self._move_aside(bad_step)
      return state
    if unreadable:
      raise CheckpointCorruptError(f'no checkpoint in {self.directory} reads back: ' +
                                   '; '.join(str(e) for _, e in unreadable))
    return None

  def _move_aside(self, step: int) -> None:
    """Renames the checkpoint of `step` to `<step>.corrupt` (replacing an older one)."""
    path = self.directory / str(step)
    if jax.process_index() == 0:
      target = self.directory / f'{step}{CORRUPT_SUFFIX}'
      if target.exists():
        target.rmtree()
      path.rename(target)
      logging.warning('checkpoint: moved %s, which does not read back, to %s', path, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint: moved step {step} aside')
    self._manager.reload()

  def remove(self, step: int) -> bool:
    """Deletes the checkpoint of `step` (once its save finished); returns whether
    there was one."""
    self.wait_until_finished()
    if step not in self.all_steps():
      return False
    self._manager.delete(step)
    logging.warning('checkpoint: removed step %d from %s', step, self.directory)
    return True

  def wait_until_finished(self) -> None:
    """Raises CheckpointWriteError if the last asynchronous save failed."""
    with self._write_errors():
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last save and closes orbax's manager, also after a failed
    save: its threads, left running, die noisily at interpreter shutdown.

    Raises:
      CheckpointWriteError: the last save failed (unless this checkpointer has
        raised one already: the run is stopping on it).
    """
    failed_before = self._write_failed
    try:
      with self._write_errors():
        try:
          self._manager.wait_until_finished()
        finally:
          self._manager.close()
    except CheckpointWriteError as e:
      if not failed_before:
        raise
      logging.warning('checkpoint: closing after the failed save: %s', e)


def _stored_tree(checkpointer: ocp.StandardCheckpointer, directory: str | os.PathLike
                 ) -> tuple[epath.Path, Any]:
  """(absolute path, tree metadata) of the params checkpoint at `directory`."""
  path = paths.path(directory)
  if not path.exists():
    raise FileNotFoundError(f'params checkpoint {directory}: not found ({path})')
  stored = checkpointer.metadata(path).item_metadata if path.is_dir() else None
  if stored is None:
    hint = ''
    if (path / 'checkpoints').is_dir():
      hint = ('; it looks like a vlpjax workdir (it has checkpoints/): pass it as '
              '--workdir to resume that run')
    elif (path / STATE).is_dir() and (path / DATA_ITERATOR).is_dir():
      hint = (f'; it looks like a train checkpoint (<workdir>/checkpoints/<step>, with '
              f'{STATE}/ and {DATA_ITERATOR}/): pass its workdir as --workdir to resume '
              'that run')
    raise ValueError(f'{path} is not an orbax params checkpoint (a StandardCheckpointer '
                     f'save, as vlpjax.convert writes){hint}')
  return path, stored


def stored_top_level_keys(directory: str | os.PathLike) -> set[str]:
  """Top-level keys of a params pytree saved with orbax's StandardCheckpointer.

  Raises:
    FileNotFoundError, ValueError: as `restore_params`, for a `directory` that is
      missing or holds no such save.
  """
  with ocp.StandardCheckpointer() as checkpointer:
    return set(_stored_tree(checkpointer, directory)[1].keys())


def _check_fits(what: str, stored: Any, abstract: Any) -> None:
  """Raises ValueError naming the paths where the stored tree (metadata) and the
  model's (ShapeDtypeStructs) differ: missing, unexpected or of another shape."""
  stored_shapes = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in
                   jax.tree_util.tree_leaves_with_path(stored)}
  wanted_shapes = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in
                   jax.tree_util.tree_leaves_with_path(abstract)}
  missing = sorted(set(wanted_shapes) - set(stored_shapes))
  unexpected = sorted(set(stored_shapes) - set(wanted_shapes))
  wrong = sorted(f'{k}: stored {stored_shapes[k]}, model {wanted_shapes[k]}'
                 for k in set(wanted_shapes) & set(stored_shapes)
                 if stored_shapes[k] != wanted_shapes[k])
  if missing or unexpected or wrong:
    raise ValueError(f'{what} does not fit the model: missing {missing[:10]} '
                     f'({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}), '
                     f'shape mismatches {wrong[:10]} ({len(wrong)})')


def _layouts_differ(stored: Any, abstract: Any) -> bool:
  """Whether a stored params tree and the model's hold their layers in different
  layouts (one with `model.scan_layers`, one without; `layers.layers_like`)."""
  return (abstract is not None
          and layers.has_scanned_stack(stored) != layers.has_scanned_stack(abstract))


def _to_layout(what: str, host: Any, abstract: Any) -> Any:
  """Host arrays of a stored tree -> global arrays in the layout, dtypes and
  shardings of `abstract` (the model's, with the other layer layout)."""
  host = layers.layers_like(host, abstract)
  _check_fits(what, host, abstract)
  return jax.tree.map(
      lambda x, a: jax.make_array_from_callback(
          x.shape, a.sharding, lambda index: np.asarray(x[index], a.dtype)), host, abstract)


def restore_params(directory: str | os.PathLike, abstract_params: Any,
                   subtree: str | None = None) -> Any:
  """Reads a params pytree saved with orbax (e.g. by `vlpjax.convert`).

  Args:
    directory: the checkpoint directory (a `StandardCheckpointer` save): local
      (relative to the working directory) or gs://.
    abstract_params: ShapeDtypeStructs with shardings for the tree to read.
    subtree: read only the stored tree under this top-level key (e.g.
      'backbone'), leaving the rest of the save unread.

  A save whose layers are in the other layout (`model.scan_layers`) is read
  and converted (`layers.layers_like`).

  Raises:
    FileNotFoundError: `directory` does not exist.
    ValueError: `directory` is not such a save (with a hint if it is a vlpjax
      workdir or train checkpoint), or its paths are missing, unexpected or of
      another shape (each named).
  """
  with ocp.StandardCheckpointer() as checkpointer:
    path, stored = _stored_tree(checkpointer, directory)
  stored = dict(stored)  # orbax's tree metadata: its top level is not a dict
  if _layouts_differ(stored if subtree is None else stored[subtree], abstract_params):
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                        stored if subtree is None else {subtree: stored[subtree]})
    with ocp.PyTreeCheckpointer() as checkpointer:
      host = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=item, partial_restore=subtree is not None,
          restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)))
    return _to_layout(f'{path}' + ('' if subtree is None else f' ({subtree})'),
                      host if subtree is None else host[subtree], abstract_params)
  _check_fits(f'{path}' + ('' if subtree is None else f' ({subtree})'),
              stored if subtree is None else stored[subtree], abstract_params)
  if subtree is None:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(path, abstract_params)
  item = {subtree: abstract_params}
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))[subtree]


def _newest_state(workdir: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, int]:
  """(path of the state item, step) of checkpoint `step` (None: the newest) of a workdir."""
  directory = paths.path(workdir) / 'checkpoints'
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()
                 ) if directory.is_dir() else []
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(f'{workdir}: no train checkpoint{"" if step is None else f" of step {step}"} '
                            f'under {directory} (has {steps})')
  step = steps[-1] if step is None else step
  return directory / str(step) / STATE, step


class _NoStepMetadataWarning(logging.Filter):
  """Drops orbax's warning that an item directory has no step metadata: a
  manager keeps that file in the step directory, one level above the item a
  `PyTreeCheckpointer` reads here, so the warning says nothing wrong."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith('Metadata file does not exist')


@contextlib.contextmanager
def _state_item_reader() -> Iterator[ocp.PyTreeCheckpointer]:
  """A `PyTreeCheckpointer` for the state item of a manager's step directory."""
  quiet = _NoStepMetadataWarning()
  logging.getLogger('absl').addFilter(quiet)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      yield checkpointer
  finally:
    logging.getLogger('absl').removeFilter(quiet)


def workdir_param_keys(workdir: str | os.PathLike) -> set[str]:
  """Top-level keys of the params of a workdir's newest train checkpoint."""
  path, _ = _newest_state(workdir)
  with _state_item_reader() as checkpointer:
    return set(checkpointer.metadata(path).item_metadata.tree.get('params', {}))


def restore_workdir_params(workdir: str | os.PathLike, abstract_params: Any = None, *,
                          subtree: str | None = None, step: int | None = None
                          ) -> tuple[Any, int]:
  """Params of a train checkpoint in a vlpjax workdir (pretraining or any task),
  reading only those arrays: all of `params`, or only `params[subtree]` (e.g.
  'backbone').

  Args:
    workdir: the run's workdir (its checkpoints/).
    abstract_params: ShapeDtypeStructs with shardings of what to read; None:
      numpy arrays of the stored shapes.
    subtree: a top-level key of the params, to read that part alone.
    step: the checkpoint; None: the newest.

  Returns:
    (the params, the checkpoint's step). Layers stored in the other layout
    than `abstract_params`' (`model.scan_layers`) are converted to it.

  Raises:
    FileNotFoundError: the workdir has no train checkpoint (of `step`).
    ValueError: what is stored does not fit `abstract_params` (paths named).
  """
  path, step = _newest_state(workdir, step)
  keys = ('params',) + ((subtree,) if subtree else ())
  with _state_item_reader() as checkpointer:
    stored = checkpointer.metadata(path).item_metadata.tree
    for depth, key in enumerate(keys):
      if key not in stored:
        raise ValueError(f'{path}: no {"/".join(keys[:depth + 1])} (keys there: '
                         f'{sorted(stored)})')
      stored = stored[key]
    other_layout = _layouts_differ(stored, abstract_params)
    if abstract_params is None or other_layout:
      item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored)
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    else:
      _check_fits(f'{path} ({"/".join(keys)})', stored, abstract_params)
      item = abstract_params
      restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    for key in reversed(keys):
      item, restore_args = {key: item}, {key: restore_args}
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  for key in keys:
    restored = restored[key]
  if other_layout:
    restored = _to_layout(f'{path} ({"/".join(keys)})', restored, abstract_params)
  logging.info('read %s of %s (step %d)', '/'.join(keys), workdir, step)
  return restored, step


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
