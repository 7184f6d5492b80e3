"""The one path type of vlpjax: local paths and gs:// URIs alike.

Every file vlpjax reads or writes (workdirs, checkpoints, metrics, TensorBoard
events, configs, predictions, data dirs, vocabulary and answer files, converted
weights) is reached through `path(...)`, an `etils.epath.Path`: local paths go to
the OS, `gs://` to gcsfs (through fsspec). Orbax's arrays (tensorstore),
ArrayRecord tables (riegeli) and TensorBoard events (tensorboardX) read and write
gs:// with their own clients, given the same URI.
"""
from __future__ import annotations

import os

from etils import epath

PathLike = str | os.PathLike


def path(location: PathLike) -> epath.Path:
  """`location` as a Path: `~` expanded and local paths made absolute (from the
  working directory; orbax finds nothing at a relative path); URIs as they are."""
  resolved = epath.Path(location)
  if is_local(resolved):
    resolved = resolved.expanduser()
    if not resolved.is_absolute():
      resolved = resolved.absolute()
  return resolved


def is_local(location: PathLike) -> bool:
  """False for a URI (gs://, s3://, ...), True for a path on this machine."""
  return '://' not in os.fspath(location)


def join(location: PathLike, *names: str) -> str:
  """`location/names...` as a string, for the libraries that take one."""
  return os.fspath(path(location).joinpath(*names))
