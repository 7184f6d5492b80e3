"""What the user sees during training: a progress line, TensorBoard, metrics.jsonl.

Only process 0 writes (every process computes the same global metrics). Files
in the workdir: `metrics.jsonl` (one JSON object per logged step, appended so a
resumed run continues the file) and TensorBoard event files under `tensorboard/`.
A run resumed from step S repeats the steps after S that an interrupted run may
have logged already: `metrics.jsonl` drops them, and TensorBoard hides them.
On gs:// (no appends to an object) `metrics.jsonl` is rewritten whole, at most
every REMOTE_FLUSH_SECONDS and on close, as tensorboardX does its event files.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Callable, Mapping

import jax
import tensorboardX
from etils import epath

from vlpjax import flops, paths

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
REMOTE_FLUSH_SECONDS = 30.0


def format_duration(seconds: float) -> str:
  """1h02m03s / 2m03s / 3s."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m{seconds:02d}s'
  return f'{minutes}m{seconds:02d}s' if minutes else f'{seconds}s'


class MetricWriter:
  """Writes scalars per logged step and prints the progress line.

  Throughput and ETA cover the steps since the previous `write` (the first
  interval after (re)start includes compilation, so it reads slow).
  """

  def __init__(self, workdir: str, *, start_step: int, total_steps: int,
               examples_per_step: int, step_flops: Callable[[int], float] | None = None,
               compute_dtype: str = 'bfloat16'):
    """
    Args:
      start_step: the step the run (re)starts from; records of later steps are
        dropped from `metrics.jsonl`.
      total_steps: the run's last step, for the ETA.
      examples_per_step: global batch size.
      step_flops: step s -> its model FLOPs (`vlpjax.flops`; the objective of a
        step decides its heads); on devices with a known peak the line shows
        MFU over the steps since the previous write.
      compute_dtype: the model's compute dtype, whose peak MFU divides by.
    """
    self.total_steps = total_steps
    self.examples_per_step = examples_per_step
    self.step_flops = step_flops
    self.compute_dtype = compute_dtype
    self._writes = jax.process_index() == 0
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._jsonl = None
    self._tensorboard = None
    self._sums: dict[str, list[float]] = {}  # name -> [sum, steps] since the last line
    if self._writes:
      workdir = paths.path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = _JsonlFile(workdir / METRICS_FILE, start_step)
      # TensorBoard hides the events of earlier files from this step on (it reads
      # the purge step as a restart, SessionLog.START).
      self._tensorboard = tensorboardX.SummaryWriter(
          os.fspath(workdir / TENSORBOARD_DIR), purge_step=start_step + 1)

  def observe(self, scalars: Mapping[str, float]) -> None:
    """Adds one step's `scalars` to the running means the next progress line
    shows (each over the steps that had it: UNITER's tasks alternate)."""
    for name, value in scalars.items():
      total = self._sums.setdefault(name, [0.0, 0])
      total[0] += float(value)
      total[1] += 1

  def write(self, step: int, scalars: Mapping[str, float]) -> dict[str, float]:
    """Logs `scalars` (host floats) at `step` to metrics.jsonl and TensorBoard;
    the progress line shows the running means of the steps `observe`d since
    the previous line, when there were several. Returns the record, with
    throughput added."""
    now = time.perf_counter()
    record = {k: float(v) for k, v in scalars.items()}
    if step > self._last_step:
      seconds_per_step = (now - self._last_time) / (step - self._last_step)
      record['examples_per_second'] = self.examples_per_step / seconds_per_step
      record['eta_seconds'] = seconds_per_step * (self.total_steps - step)
      mfu = self.step_flops and flops.mfu(
          sum(map(self.step_flops, range(self._last_step + 1, step + 1)))
          / (step - self._last_step), seconds_per_step, jax.devices()[0].device_kind,
          jax.device_count(), self.compute_dtype)
      if mfu:
        record['mfu'] = mfu
    self._last_step, self._last_time = step, now
    means = {k: (s / n, n) for k, (s, n) in self._sums.items()}
    self._sums = {}
    if self._emit(step, record):
      logging.info('%s', self.progress_line(step, record, means))
    return record

  def _emit(self, step: int, record: Mapping[str, float]) -> bool:
    """Appends `record` to metrics.jsonl and TensorBoard; True if this process writes."""
    if self._writes:
      self._jsonl.append(json.dumps({'step': step, **record}) + '\n')
      # A NaN (an accuracy over no examples, a diverged loss the loop reports
      # itself) is no point on a curve: TensorBoard gets the finite values.
      for name, value in record.items():
        if math.isfinite(value):
          self._tensorboard.add_scalar(name, value, step)
      self._tensorboard.flush()
    return self._writes

  def write_eval(self, step: int, name: str, scalars: Mapping[str, float],
                 seconds: float) -> None:
    """Logs evaluator `name`'s metrics at `step` as `{name}/{metric}`; its
    `seconds` are left out of the training throughput and ETA."""
    self._last_time += seconds
    record = {f'{name}/{k}': float(v) for k, v in scalars.items()}
    if self._emit(step, record):
      logging.info('eval %s step %d/%d | %s | %s', name, step, self.total_steps,
                   ' '.join(f'{k} {v:.4g}' for k, v in scalars.items()),
                   format_duration(seconds))

  def progress_line(self, step: int, record: Mapping[str, float],
                    means: Mapping[str, tuple[float, int]] | None = None) -> str:
    """'step 120/1000 | loss 3.21 mlm 2.10 ... | lr 1.0e-04 | 512 ex/s | MFU 41% | ETA 3m02s'.

    With `means` ({name: (mean, steps)}) over several steps, the losses are
    those means: 'mean of 50 steps: loss 3.30 itm 0.69 (17) mlm 5.02 (16) ...',
    a name's step count shown where it is not every step's.
    """
    skip = {'learning_rate', 'examples_per_second', 'eta_seconds', 'mfu'}
    steps = max((n for _, n in (means or {}).values()), default=1)
    if steps > 1:
      losses = f'mean of {steps} steps: ' + ' '.join(
          f'{k} {v:.4g}' + (f' ({n})' if n < steps else '')
          for k, (v, n) in means.items() if k not in skip)
    else:
      losses = ' '.join(f'{k} {v:.4g}' for k, v in record.items() if k not in skip)
    parts = [f'step {step}/{self.total_steps}', losses,
             f"lr {record.get('learning_rate', float('nan')):.2e}"]
    if 'examples_per_second' in record:
      parts.append(f"{record['examples_per_second']:.1f} ex/s")
    if 'mfu' in record:
      parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if 'eta_seconds' in record:
      parts.append(f"ETA {format_duration(record['eta_seconds'])}")
    return ' | '.join(parts)

  def close(self) -> None:
    if self._writes:
      self._jsonl.close()
      self._tensorboard.close()


class _JsonlFile:
  """metrics.jsonl: the records up to `start_step` kept, new lines appended
  (locally) or the whole file rewritten (gs://, throttled)."""

  def __init__(self, path: epath.Path, start_step: int):
    self.path = path
    self._local = paths.is_local(path)
    self._lines, dropped = _records_until(path, start_step)
    self._written = time.monotonic()
    if dropped:
      self._rewrite()
    self._file = path.open('a', encoding='utf-8') if self._local else None

  def append(self, line: str) -> None:
    if self._local:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      if time.monotonic() - self._written >= REMOTE_FLUSH_SECONDS:
        self._rewrite()

  def close(self) -> None:
    if self._local:
      self._file.close()
    else:
      self._rewrite()

  def _rewrite(self) -> None:
    """Writes the kept lines whole, atomically: a kill leaves either file whole
    (a gs:// object is replaced at once; locally through a renamed copy)."""
    if self._local:
      scratch = self.path.with_name(self.path.name + '.tmp')
      scratch.write_text(''.join(self._lines), encoding='utf-8')
      scratch.replace(self.path)
    else:
      self.path.write_text(''.join(self._lines), encoding='utf-8')
    self._written = time.monotonic()


def _records_until(path: epath.Path, step: int) -> tuple[list[str], int]:
  """(the lines of the metrics file at `path` (if any) of steps up to `step`,
  how many others it held): a resumed run repeats the later ones."""
  if not path.exists():
    return [], 0
  lines = path.read_text(encoding='utf-8').splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= step:
        kept.append(line)
    except (ValueError, KeyError):
      pass  # the torn last line of a killed run
  if len(kept) < len(lines):
    logging.info('%s: dropping %d record(s) after step %d, which this run repeats',
                 path, len(lines) - len(kept), step)
  return kept, len(lines) - len(kept)
