"""PyTorch-style state dicts <-> vlpjax param pytrees, strictly.

A converter is a list of `Rule`s, one per PyTorch key. Importing checks that the
state dict holds exactly the keys the rules name (less any the caller says to
skip) and that every array has the shape the model expects; anything else is an
error naming the keys and shapes, never a partial load. Exporting runs the
rules backwards, so a round trip is exact.

Reading never runs pickled code: safetensors, `torch.load(weights_only=True)`
for `.bin`/`.pt` files (torch is imported only then), and detectron2's `.pkl`
files (`{'model': {name: array}, ...}`) through `formats.ArrayUnpickler`, which
admits numpy arrays and plain data only. Paths are local or gs://
(etils.epath).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Callable, Iterable, Mapping

from etils import epath
import flax
import numpy as np

from vlpjax import paths
from vlpjax.data import formats

Params = Any
StateDict = dict[str, np.ndarray]
Transform = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
# Where training scripts put the model's state dict in what they save
# (`torch.save({'model': model.state_dict(), 'epoch': 3}, ...)`; DeepSpeed: 'module').
NESTING_KEYS = ('state_dict', 'model', 'module', 'model_state_dict')
# Key prefix of a model saved inside (Distributed)DataParallel.
DATA_PARALLEL_PREFIX = 'module.'


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model config (missing/unexpected keys, shapes)."""


def identity(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  del shape
  return x


def not_a_pretraining_checkpoint(source: str, state_dict: Mapping[str, Any], prefix: str
                                 ) -> CheckpointMismatchError:
  """The error for a pretraining import from a state dict without the backbone's
  key `prefix`, naming its likely causes in `vlpjax.convert`'s terms."""
  return CheckpointMismatchError(
      f'{source} has no {prefix!r} keys (its first keys: {sorted(state_dict)[:5]}), so it is '
      "not this design's pretraining checkpoint: either it is another model's file (check "
      '--from and --src), or a backbone-only state dict, which lacks the pretraining heads: '
      'convert that with --target=backbone (in Python: load it into '
      'get_model(config, pretraining=False)).')


def linear(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """torch Linear weight [out, in] -> kernel of `shape` ([in, out] or [in, N, D]
  or [N, D, out]), by transpose then reshape."""
  return x.T.reshape(shape)


def reshape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Bias [N*D] -> [N, D] and the like."""
  return x.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One PyTorch key <-> one param, `path` being '/'-joined flax names.

  `vocab_rows`: set for a word table or MLM bias, the checkpoint's vocabulary
  size: the param has more rows (`layers.padded_vocab_size`), zero on import
  and cut off on export.
  """
  torch_key: str
  path: str
  transform: Transform = identity
  vocab_rows: int | None = None

  def to_torch(self, value: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
    if self.transform is linear:
      return np.asarray(value).reshape(torch_shape[::-1]).T
    return np.asarray(value).reshape(torch_shape)


def linear_rules(torch_prefix: str, path: str) -> list[Rule]:
  """Rules for a torch `nn.Linear` at `torch_prefix` and a flax Dense at `path`."""
  return [Rule(f'{torch_prefix}.weight', f'{path}/kernel', linear),
          Rule(f'{torch_prefix}.bias', f'{path}/bias', reshape)]


def layer_norm_rules(torch_prefix: str, path: str) -> list[Rule]:
  return [Rule(f'{torch_prefix}.weight', f'{path}/scale'),
          Rule(f'{torch_prefix}.bias', f'{path}/bias')]


def embedding_rules(torch_prefix: str, path: str, vocab_rows: int | None = None
                    ) -> list[Rule]:
  """A torch `nn.Embedding`; `vocab_rows` for a padded word table (`Rule`)."""
  return [Rule(f'{torch_prefix}.weight', f'{path}/embedding', vocab_rows=vocab_rows)]


def read_state_dict(path: str | os.PathLike) -> StateDict:
  """Reads weights from a file (.safetensors, .bin, .pt, .pth, .npz, .pkl) or from a
  transformers checkpoint directory (model.safetensors or pytorch_model.bin).

  A pickled training checkpoint's state dict nested under one of NESTING_KEYS,
  and the keys' DataParallel prefix 'module.', are unwrapped.

  Raises:
    FileNotFoundError: nothing is at `path`, or its directory holds no WEIGHT_FILES.
    ValueError naming the file: of an unknown type, unreadable as its type, or
      holding no state dict.
  """
  given, path = path, paths.path(path)
  if path.is_dir():
    found = [path / f for f in WEIGHT_FILES if (path / f).exists()]
    if not found:
      raise FileNotFoundError(f'{path} holds none of {WEIGHT_FILES} (not a transformers '
                              'save_pretrained directory)')
    path = found[0]
  if not path.exists():
    raise FileNotFoundError(f'{os.fspath(given)}: not found ({path})')
  if path.suffix not in _LOADERS:
    raise ValueError(f'{path}: unknown weight file type (want .safetensors, .bin, .pt, '
                     '.pth, .npz, .pkl)')
  try:
    loaded = _LOADERS[path.suffix](path)
  except Exception as error:  # pylint: disable=broad-except
    # Each library raises its own kinds (a corrupt .pt can give a KeyError); all
    # mean that this file is unreadable, and the caller needs its name.
    raise ValueError(f'{path}: cannot read it as a {path.suffix} weight file: '
                     f'{type(error).__name__}: {error}') from error
  state_dict = _state_dict_in(loaded, path)
  if state_dict and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state_dict):
    state_dict = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state_dict.items()}
  return {k: _to_numpy(v) for k, v in state_dict.items()}


def _load_safetensors(path: epath.Path) -> StateDict:
  from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
  return load(path.read_bytes())


def _load_npz(path: epath.Path) -> StateDict:
  with path.open('rb') as f, np.load(f, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _load_torch(path: epath.Path) -> Any:
  import torch  # pylint: disable=import-outside-toplevel
  with path.open('rb') as f:
    return torch.load(f, map_location='cpu', weights_only=True)


def _load_pickle(path: epath.Path) -> Any:
  with path.open('rb') as f:
    return formats.ArrayUnpickler(f, os.fspath(path)).load()


_LOADERS = {'.safetensors': _load_safetensors, '.npz': _load_npz, '.bin': _load_torch,
            '.pt': _load_torch, '.pth': _load_torch, '.pkl': _load_pickle}


def _is_array(value: Any) -> bool:
  """A numpy array or torch tensor."""
  return hasattr(value, 'shape') and hasattr(value, 'dtype')


def _to_numpy(value: Any) -> np.ndarray:
  """A numpy array, or a torch tensor as numpy (floats as float32: numpy has no bf16)."""
  if isinstance(value, np.ndarray):
    return value
  return (value.float() if value.is_floating_point() else value).numpy()


def _state_dict_in(loaded: Any, path: epath.Path) -> Mapping[str, Any]:
  """The state dict in what a weight file holds: itself, or nested under NESTING_KEYS."""
  while isinstance(loaded, Mapping) and not all(_is_array(v) for v in loaded.values()):
    key = next((k for k in NESTING_KEYS if isinstance(loaded.get(k), Mapping)), None)
    if key is None:
      entries = {k: type(v).__name__ for k, v in list(loaded.items())[:10]}
      raise ValueError(f'{path} holds no state dict: its entries {entries} ({len(loaded)} '
                       f'in all) are not all tensors, and none of {NESTING_KEYS} holds one')
    logging.info('%s: reading the state dict under %r (beside %s)', path, key,
                 [k for k in loaded if k != key])
    loaded = loaded[key]
  if not isinstance(loaded, Mapping):
    raise ValueError(f'{path} holds a {type(loaded).__name__}, not a state dict')
  return loaded


def write_state_dict(state_dict: StateDict, path: str | os.PathLike) -> None:
  """Writes a state dict as safetensors (contiguous copies of every array)."""
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  paths.path(path).write_bytes(save({k: np.ascontiguousarray(v) for k, v in state_dict.items()}))


def _flat_shapes(params: Params) -> dict[str, tuple[int, ...]]:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return {k: tuple(v.shape) for k, v in flat.items()}


def import_params(state_dict: StateDict, rules: Iterable[Rule], target: Params, *,
                  skip: Iterable[str] = (), source: str = 'checkpoint') -> Params:
  """Builds a param pytree shaped like `target` from `state_dict` by `rules`.

  Args:
    state_dict: torch key -> array.
    rules: one per torch key; several keys may not map to one path.
    target: params (or `jax.eval_shape` structs) giving every path and shape.
    skip: regexes of torch keys to ignore (e.g. ViLBERT's unused q_dense).
    source: name of the checkpoint for error messages.

  Raises:
    CheckpointMismatchError naming missing keys, unexpected keys, shape
    mismatches and params no rule fills.
  """
  rules = list(rules)
  shapes = _flat_shapes(target)
  skip_re = [re.compile(s) for s in skip]
  wanted = {r.torch_key for r in rules}
  present = {k for k in state_dict if not any(s.fullmatch(k) for s in skip_re)}
  problems = []
  if missing := sorted(wanted - present):
    problems.append(f'missing keys ({len(missing)}): {missing[:20]}')
  if unexpected := sorted(present - wanted):
    problems.append(f'unexpected keys ({len(unexpected)}): {unexpected[:20]}')
  unfilled = sorted(set(shapes) - {r.path for r in rules})
  if unfilled:
    problems.append(f'params no key fills ({len(unfilled)}): {unfilled[:20]}')
  flat = {}
  for rule in rules:
    if rule.torch_key not in state_dict or rule.path not in shapes:
      if rule.path not in shapes:
        problems.append(f'{rule.torch_key} maps to {rule.path}, which the model lacks')
      continue
    array = np.asarray(state_dict[rule.torch_key])
    shape = shapes[rule.path]
    if not _fits(rule, array.shape, shape):
      vocabulary = ('' if rule.vocab_rows is None else
                    f' (a vocabulary of {rule.vocab_rows}, config.model.vocab_size, padded)')
      problems.append(f'{rule.torch_key}: checkpoint shape {array.shape} does not fit '
                      f'{rule.path} of shape {shape}{vocabulary}')
      continue
    if rule.vocab_rows is not None:
      padding = np.zeros((shape[0] - rule.vocab_rows,) + shape[1:], array.dtype)
      array = np.concatenate([array, padding])
    flat[rule.path] = rule.transform(array, shape).astype(np.float32)
  if problems:
    raise CheckpointMismatchError(f'{source} does not fit the model config:\n  ' +
                                  '\n  '.join(problems))
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def export_state_dict(params: Params, rules: Iterable[Rule],
                      torch_shapes: Mapping[str, tuple[int, ...]] | None = None
                      ) -> StateDict:
  """Runs `rules` backwards: params -> torch key -> array (float32).

  torch shapes default to: Linear weights [out, in] (kernel flattened to 2-d and
  transposed), everything else flattened to the torch convention of 1-d biases
  and 2-d tables. Pass `torch_shapes` to override.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  out = {}
  for rule in rules:
    value = np.asarray(flat[rule.path], dtype=np.float32)
    if rule.vocab_rows is not None:
      value = value[:rule.vocab_rows]
    if torch_shapes and rule.torch_key in torch_shapes:
      shape = tuple(torch_shapes[rule.torch_key])
    elif rule.transform is linear:
      shape = _linear_torch_shape(rule.path, value.shape)
    elif rule.transform is reshape:
      shape = (value.size,)
    else:
      shape = value.shape
    out[rule.torch_key] = rule.to_torch(value, shape)
  return out


def _linear_torch_shape(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
  """Torch [out, in] shape of a flax kernel: [in, out], [in, N, D] (Q/K/V
  projections) or [N, D, out] (attention output)."""
  if len(shape) == 2:
    return shape[1], shape[0]
  if len(shape) == 3 and path.endswith('output/kernel'):
    return shape[2], shape[0] * shape[1]
  if len(shape) == 3:
    return shape[1] * shape[2], shape[0]
  raise ValueError(f'{path}: cannot infer the torch shape of a {shape} kernel')


def _fits(rule: Rule, torch_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
  """Whether a checkpoint array fits a param: the exact torch shape for Linear
  kernels and untransformed params (equal sizes alone would let a [V, H] table
  load into a [2V, H/2] one), equal sizes for explicit reshapes; a padded
  vocabulary param has `vocab_rows` rows in the checkpoint and at least as many."""
  if rule.vocab_rows is not None:
    return (tuple(torch_shape) == (rule.vocab_rows,) + tuple(shape[1:])
            and shape[0] >= rule.vocab_rows)
  if rule.transform is identity:
    return tuple(torch_shape) == tuple(shape)
  if rule.transform is linear:
    return tuple(torch_shape) == _linear_torch_shape(rule.path, tuple(shape))
  return int(np.prod(torch_shape)) == int(np.prod(shape))
