"""What every evaluator shares (google-research/big_vision's shape).

* `eval_batches`: every example of a split exactly once. The last, partial
  batch is padded and each batch carries `_mask` [B] (True = real example) and
  `_index` [B] (the example's index in the split, -1 on padding); nothing is
  ever dropped.
* `process_sum`: sums per-process sufficient statistics (counts, totals, never
  means) over processes, int64/float64 exactly.
* `write_prediction_parts`: each process writes its part of a prediction file;
  process 0 merges the parts, in example order, into one JSON list.
* `Evaluator`, `should_run`, `evaluator_configs`, `build_evaluators`: what a
  task evaluator gives the training loop, when it runs, the checks on
  `config.evals`, and a task's `make_evaluators` from them.

Multi-process flow of an evaluator: the batches are global arrays (sharded like
training batches); a jitted step predicts on them; each process takes *its*
rows back with `local_rows` (rows [p*L, (p+1)*L) of the global batch on a
batch-sharded mesh), scores the real ones (`_mask`) on the host, and adds its
statistics into the global ones with `process_sum`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from vlpjax import paths

MASK_KEY = '_mask'
INDEX_KEY = '_index'
# `_index` is int32 because JAX (x64 off) would narrow int64 to int32 anyway.
_MAX_EXAMPLES = np.iinfo(np.int32).max
# An evaluation logs its progress (batches, ETA) at most this often.
PROGRESS_SECONDS = 30.0


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------

def num_batches(num_examples: int, global_batch_size: int) -> int:
  """Batches that cover `num_examples` with the last one padded: ceil(N / B)."""
  _check_positive_int('global_batch_size', global_batch_size)
  if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) \
      or num_examples < 0:
    raise ValueError(f'num_examples must be a non-negative int, got {num_examples!r}')
  return math.ceil(int(num_examples) / int(global_batch_size))


def local_row_indices(global_batch_size: int,
                      sharding: jax.sharding.Sharding | None) -> np.ndarray:
  """Rows of each global batch that this process builds, in order: int64 [L].

  With a sharding: the rows its addressable devices hold (for a batch-sharded
  mesh, [p*L, (p+1)*L) with L = global_batch_size / process_count), the layout
  `jax.make_array_from_process_local_data` expects. Without one: the
  contiguous block [p*L, (p+1)*L), i.e. the whole batch on one process.

  Raises:
    ValueError if the batch does not split evenly over the sharding's devices
    or (without a sharding) over the processes.
  """
  _check_positive_int('global_batch_size', global_batch_size)
  if sharding is None:
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
      raise ValueError(f'global_batch_size {global_batch_size} must be a multiple of the '
                       f'process count {count}')
    local = global_batch_size // count
    return np.arange(index * local, (index + 1) * local, dtype=np.int64)
  try:
    slices = sharding.addressable_devices_indices_map((global_batch_size,)).values()
  except ValueError as e:  # IndivisibleError is a ValueError
    raise ValueError(f'global_batch_size {global_batch_size} does not split over the '
                     f'sharding {sharding}: {e}') from None
  rows = set()
  for (rows_slice, *_) in slices:
    rows.update(range(*rows_slice.indices(global_batch_size)))
  return np.array(sorted(rows), dtype=np.int64)


def eval_batches(num_examples: int, global_batch_size: int,
                 make_batch: Callable[[np.ndarray], dict[str, np.ndarray]],
                 sharding: jax.sharding.NamedSharding | None
                 ) -> Iterator[dict[str, jax.Array | np.ndarray]]:
  """The examples [0, num_examples) in `num_batches(...)` global batches, each once.

  Args:
    num_examples: size of the split.
    global_batch_size: B, rows of every batch (the last one padded).
    make_batch: builds this process's rows from their example indices, int64
      [L], all in [0, num_examples); returns a dict of arrays with leading
      dimension L. Padding rows ask for example 0, so it never sees an index
      out of range.
    sharding: the batch sharding (leading axis over the data axes). With it,
      every value becomes a global `jax.Array` [B, ...]; without, numpy arrays
      of this process's rows (the whole batch [B, ...] on one process).

  Yields:
    dicts with make_batch's keys plus `_mask` bool [B] (True = real example)
    and `_index` int32 [B] (the example's index, -1 on padding). Process 0 logs
    the progress with an ETA every PROGRESS_SECONDS.

  Raises:
    ValueError on an invalid size, a batch that does not split over the
    devices/processes, or a make_batch result with the wrong keys or rows.
  """
  total = num_batches(num_examples, global_batch_size)
  if num_examples > _MAX_EXAMPLES:
    raise ValueError(f'num_examples {num_examples} exceeds int32 `_index` ({_MAX_EXAMPLES})')
  rows = local_row_indices(global_batch_size, sharding)
  began = last_log = time.perf_counter()
  for batch_index in range(total):
    now = time.perf_counter()
    if batch_index and now - last_log >= PROGRESS_SECONDS and jax.process_index() == 0:
      last_log = now
      logging.info('evaluating: %d of %d batches (%.0f s), ETA %.0f s', batch_index, total,
                   now - began, (now - began) / batch_index * (total - batch_index))
    example_indices = batch_index * global_batch_size + rows
    real = example_indices < num_examples
    batch = make_batch(np.where(real, example_indices, 0))
    for key in (MASK_KEY, INDEX_KEY):
      if key in batch:
        raise ValueError(f'make_batch must not return {key!r}; eval_batches adds it')
    batch = dict(batch)
    for key, value in batch.items():
      if np.shape(value)[:1] != (len(rows),):
        raise ValueError(f'make_batch returned {key!r} of shape {np.shape(value)}; '
                         f'expected leading dimension {len(rows)} (the local rows)')
    batch[MASK_KEY] = real
    batch[INDEX_KEY] = np.where(real, example_indices, -1).astype(np.int32)
    if sharding is not None:
      batch = {k: jax.make_array_from_process_local_data(
          sharding, v, (global_batch_size,) + np.shape(v)[1:]) for k, v in batch.items()}
    yield batch


def local_rows(x: jax.Array | np.ndarray) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order, as numpy [L, ...].

  For a global array laid out like `eval_batches`' batches (or a jitted output
  with the same sharding), these are the rows this process built, so each
  example is scored by exactly one process. An array replicated over processes
  gives all its rows on every process (so would count them several times).
  Numpy arrays are returned as they are.
  """
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.ndim == 0:
    raise ValueError('local_rows needs an array with a batch axis, got a scalar')
  shards = {}
  for shard in x.addressable_shards:  # devices that replicate a block hold it twice
    start = shard.index[0].indices(x.shape[0])[0] if shard.index else 0
    shards.setdefault(start, shard.data)
  return np.concatenate([np.asarray(shards[s]) for s in sorted(shards)], axis=0)


# ----------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------

def _host_value(leaf: Any) -> np.ndarray:
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    # A global array already holds every process's part (a jitted sum is
    # replicated); adding it over processes would count it process_count times.
    raise ValueError('process_sum sums per-process values; got a global jax.Array that '
                     'spans processes. Use jax.device_get (replicated) or local_rows first.')
  return np.asarray(leaf)


def process_sum(tree: Any) -> Any:
  """Sums a pytree of per-process statistics over processes; numpy on every process.

  Leaves: numpy/jax scalars or arrays, Python numbers; the same structure,
  shapes and dtypes on every process. Each leaf keeps its dtype (bool leaves
  count as int64), so int64/float64 stay exact: with JAX x64 off a collective
  would narrow them to 32 bits, so the leaves travel as raw bytes (one uint8
  `process_allgather` for the whole tree) and are summed in numpy. On one
  process this is the identity (as numpy).
  """
  leaves, treedef = jax.tree.flatten(tree)
  values = [_host_value(leaf) for leaf in leaves]
  values = [v.astype(np.int64) if v.dtype == np.bool_ else v for v in values]
  if jax.process_count() == 1 or not values:
    return jax.tree.unflatten(treedef, values)
  payload = np.concatenate([np.ascontiguousarray(v).reshape(-1).view(np.uint8)
                            for v in values])
  gathered = np.asarray(multihost_utils.process_allgather(payload))  # [P, bytes]
  sums, offset = [], 0
  for v in values:
    part = gathered[:, offset:offset + v.nbytes]
    offset += v.nbytes
    per_process = np.ascontiguousarray(part).view(v.dtype).reshape((-1,) + v.shape)
    sums.append(per_process.sum(axis=0, dtype=v.dtype))
  return jax.tree.unflatten(treedef, sums)


# ----------------------------------------------------------------------------
# Prediction files
# ----------------------------------------------------------------------------

def part_path(path: str | epath.PathLike, process_index: int, process_count: int
              ) -> epath.Path:
  """`<path>.part-<process_index>-of-<process_count>`."""
  path = paths.path(path)
  return path.with_name(f'{path.name}.part-{process_index}-of-{process_count}')


def _json_default(value: Any) -> Any:
  # Evaluators produce numpy scalars (question ids, scores); JSON wants Python.
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f'{type(value).__name__} is not JSON serialisable: {value!r}')


def _sort_key_fn(sort_key: str | Callable[[Mapping[str, Any]], Any]
                 ) -> Callable[[Mapping[str, Any]], Any]:
  if callable(sort_key):
    return sort_key
  def by_field(record):
    if sort_key not in record:
      raise KeyError(f'prediction record has no sort key {sort_key!r}: {record!r}')
    return record[sort_key]
  return by_field


def merge_prediction_parts(path: str | epath.PathLike, process_count: int,
                           sort_key: str | Callable[[Mapping[str, Any]], Any] = INDEX_KEY,
                           drop_private_keys: bool = True,
                           render: Callable[[list[dict[str, Any]]], str] | None = None) -> int:
  """Merges the parts at `path` into one file, sorted; removes the parts.

  Returns the number of records. Keys starting with '_' (`_index`, ...) are
  dropped from the merged file when `drop_private_keys`. `render`: the merged
  records -> the file's text (e.g. NLVR2's CSV lines); None: one JSON list.

  Raises:
    FileNotFoundError naming the first missing part.
  """
  path = paths.path(path)
  parts = [part_path(path, i, process_count) for i in range(process_count)]
  records = []
  for part in parts:
    if not part.exists():
      raise FileNotFoundError(
          f'prediction part {part} is missing (process {parts.index(part)} of '
          f'{process_count} did not write it, or wrote it where process 0 cannot read; '
          'the path must be shared by all processes, e.g. gs://)')
    records.extend(json.loads(line) for line in part.read_text().splitlines() if line)
  records.sort(key=_sort_key_fn(sort_key))  # stable: ties keep part order
  if drop_private_keys:
    records = [{k: v for k, v in r.items() if not k.startswith('_')} for r in records]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(records) if render is None else render(records))
  for part in parts:
    part.unlink()
  return len(records)


def _all_processes_ok(ok: bool) -> np.ndarray:
  """Barrier that also tells every process which processes failed (so a failure
  before it makes everyone raise instead of leaving the others waiting)."""
  return np.asarray(multihost_utils.process_allgather(np.int32(ok))).reshape(-1)


def _on_every_process(work: Callable[[], Any], failure: str) -> None:
  """Runs `work` here, then waits for every process: an error raises here, and
  a failure elsewhere raises `RuntimeError(failure)` ({failed}: their indices)."""
  error = None
  try:
    work()
  except Exception as e:  # pylint: disable=broad-except
    error = e
  ok = _all_processes_ok(error is None)
  if error is not None:
    raise error
  if not ok.all():
    raise RuntimeError(failure.format(failed=np.flatnonzero(ok == 0).tolist()))


def write_prediction_parts(path: str | epath.PathLike, records: Sequence[Mapping[str, Any]],
                           sort_key: str | Callable[[Mapping[str, Any]], Any] = INDEX_KEY,
                           drop_private_keys: bool = True,
                           render: Callable[[list[dict[str, Any]]], str] | None = None
                           ) -> None:
  """Writes this process's prediction `records`; process 0 merges all into `path`.

  Every process must call this (it holds two barriers). Each writes
  `<path>.part-<p>-of-<P>` (JSON lines); after a barrier process 0 merges the
  parts, ordered by `sort_key` (a record field such as `_index`, or a
  callable), into one JSON list at `path`, e.g. `[{"question_id": 1,
  "answer": "yes"}]` (the VQA server format), and removes the parts. A second
  barrier keeps any process from returning before the file exists. Keys
  starting with '_' are dropped from the merged file when `drop_private_keys`;
  `render` writes the merged file in another format (`merge_prediction_parts`).
  `path` may be local or gs:// (etils.epath), shared by all processes.

  Raises:
    FileNotFoundError (process 0) naming a missing part; RuntimeError on the
    other processes when a process failed to write or merge.
  """
  path = paths.path(path)
  count, index = jax.process_count(), jax.process_index()
  def write_part():
    lines = ''.join(json.dumps(dict(r), default=_json_default) + '\n' for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    part_path(path, index, count).write_text(lines)

  def merge():
    if index == 0:
      merge_prediction_parts(path, count, sort_key, drop_private_keys, render)

  if count == 1:
    write_part()
    merge()
    return
  # Barriers are allgathers of an "ok" flag, not sync_global_devices: an error on
  # one process then reaches all of them instead of leaving them waiting.
  _on_every_process(write_part, f'{path}: processes {{failed}} failed to write their '
                    'prediction parts; see their logs')
  _on_every_process(merge, f'{path}: process 0 failed to merge the prediction parts; '
                    'see its log')


# ----------------------------------------------------------------------------
# Evaluators and config.evals
# ----------------------------------------------------------------------------

@runtime_checkable
class Evaluator(Protocol):
  """A task evaluator, built from one entry of `config.evals`.

  Attributes:
    name: the entry's name in `config.evals`; the loop logs metrics under it.
    log_steps: runs every `log_steps` steps (and at the first and last step).
  """
  name: str
  log_steps: int

  def run(self, params: Any, step: int) -> Iterator[tuple[str, float]]:
    """Evaluates `params` (of train step `step`, which names any prediction
    file) on the whole split; yields (metric, value) pairs, the same on every
    process (every process must iterate it to the end, since it runs
    collectives)."""
    ...


def should_run(step: int, first_step: int, last_step: int, log_steps: int, *,
               at_first_step: bool = True, at_last_step: bool = True) -> bool:
  """True every `log_steps` steps, and at `first_step` (the first step this run
  executes, so a resumed run reports at once) and `last_step` (so a run always
  ends with an evaluation) unless `at_first_step` / `at_last_step` say not."""
  _check_positive_int('log_steps', log_steps)
  return ((at_first_step and step == first_step) or (at_last_step and step == last_step)
          or step % log_steps == 0)


def schedule(eval_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`should_run`'s keywords from an eval entry: log_steps and the optional
  `at_first_step` / `at_last_step` (default True)."""
  return dict(log_steps=eval_config.log_steps,
              at_first_step=eval_config.get('at_first_step', True),
              at_last_step=eval_config.get('at_last_step', True))


_REQUIRED_FIELDS = ('type', 'split', 'batch_size', 'log_steps')


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f'{name} must be a positive int, got {value!r}')


def evaluator_configs(config_evals: Mapping[str, Any] | ml_collections.ConfigDict | None
                      ) -> list[tuple[str, ml_collections.ConfigDict]]:
  """The entries of `config.evals` as (name, ConfigDict), after checking them.

  Every entry needs `type` and `split` (non-empty strings), `batch_size` and
  `log_steps` (positive ints); `at_first_step` and `at_last_step` (bools,
  default True) are optional; other fields belong to the evaluator. The order
  is the mapping's (a ConfigDict's is sorted by name), the same on every
  process.

  Raises:
    ValueError naming the field, e.g. "config.evals.vqa_val.batch_size must be
    a positive int, got 0".
  """
  if config_evals is None:
    return []
  if not isinstance(config_evals, (Mapping, ml_collections.ConfigDict)):
    raise ValueError(f'config.evals must be a dict of name -> eval config, got '
                     f'{type(config_evals).__name__}')
  entries = []
  for name, entry in config_evals.items():
    where = f'config.evals.{name}'
    if isinstance(entry, Mapping):
      entry = ml_collections.ConfigDict(dict(entry))
    if not isinstance(entry, ml_collections.ConfigDict):
      raise ValueError(f'{where} must be a dict of eval fields, got {type(entry).__name__}')
    for field in _REQUIRED_FIELDS:
      if field not in entry:
        raise ValueError(f'{where}.{field} is missing (every eval needs '
                         f'{", ".join(_REQUIRED_FIELDS)})')
    for field in ('type', 'split'):
      if not isinstance(entry[field], str) or not entry[field]:
        raise ValueError(f'{where}.{field} must be a non-empty string, got {entry[field]!r}')
    for field in ('batch_size', 'log_steps'):
      _check_positive_int(f'{where}.{field}', entry[field])
    for field in ('at_first_step', 'at_last_step'):
      if not isinstance(entry.get(field, True), bool):
        raise ValueError(f'{where}.{field} must be True or False, got {entry[field]!r}')
    entries.append((name, entry))
  return entries


# A task's evaluator class: (name, eval_config, config, model, mesh, workdir) -> Evaluator.
EvaluatorFactory = Callable[[str, ml_collections.ConfigDict, ml_collections.ConfigDict, Any,
                             jax.sharding.Mesh, str], Evaluator]


def build_evaluators(config: ml_collections.ConfigDict, task: str,
                     factories: Mapping[str, EvaluatorFactory], model: Any,
                     mesh: jax.sharding.Mesh, workdir: str) -> list[Evaluator]:
  """A task's `make_evaluators`: one evaluator per `config.evals` entry
  (`evaluator_configs` order), built by `factories[entry.type]` as
  `factory(name, eval_config, config, model, mesh, workdir)`.

  Args:
    config: the run's config (its `evals` section).
    task: the task's name, for the error.
    factories: eval type -> evaluator class (or function), e.g.
      `{'gqa': GqaEvaluator}`.
    model, mesh, workdir: passed on to every factory.

  Raises:
    ValueError naming the entry, its type, the task and the valid types, e.g.
    "config.evals.gqa_val.type='vqa': the gqa task has evaluators of type 'gqa'".
  """
  evaluators = []
  for name, eval_config in evaluator_configs(config.evals):
    if eval_config.type not in factories:
      types = ' or '.join(repr(t) for t in factories)
      raise ValueError(f'config.evals.{name}.type={eval_config.type!r}: the {task} task has '
                       f'evaluators of type {types}')
    evaluators.append(factories[eval_config.type](name, eval_config, config, model, mesh,
                                                  workdir))
  return evaluators
