"""PyTorch-style state dicts <-> vlpjax param pytrees, strictly.

A converter is a list of `Rule`s, one per PyTorch key. Importing checks that the
state dict holds exactly the keys the rules name (less any the caller says to
skip) and that every array has the shape the model expects; anything else is an
error naming the keys and shapes, never a partial load. Exporting runs the
rules backwards, so a round trip is exact.

Reading never runs pickled code: safetensors, or `torch.load(weights_only=True)`
for `.bin`/`.pt` files (torch is imported only then).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Iterable, Mapping

import flax
import numpy as np

Params = Any
StateDict = dict[str, np.ndarray]
Transform = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model config (missing/unexpected keys, shapes)."""


def identity(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  del shape
  return x


def linear(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """torch Linear weight [out, in] -> kernel of `shape` ([in, out] or [in, N, D]
  or [N, D, out]), by transpose then reshape."""
  return x.T.reshape(shape)


def reshape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Bias [N*D] -> [N, D] and the like."""
  return x.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One PyTorch key <-> one param, `path` being '/'-joined flax names."""
  torch_key: str
  path: str
  transform: Transform = identity

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


def embedding_rules(torch_prefix: str, path: str) -> list[Rule]:
  return [Rule(f'{torch_prefix}.weight', f'{path}/embedding')]


def read_state_dict(path: str | os.PathLike) -> StateDict:
  """Reads weights from a file (.safetensors, .bin, .pt, .pth, .npz) or from a
  transformers checkpoint directory (model.safetensors or pytorch_model.bin)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    found = [os.path.join(path, f) for f in WEIGHT_FILES
             if os.path.exists(os.path.join(path, f))]
    if not found:
      raise FileNotFoundError(f'{path} holds none of {WEIGHT_FILES}')
    path = found[0]
  if not os.path.exists(path):
    raise FileNotFoundError(path)
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return dict(load_file(path))
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  if path.endswith(('.bin', '.pt', '.pth')):
    import torch  # pylint: disable=import-outside-toplevel
    loaded = torch.load(path, map_location='cpu', weights_only=True)
    if 'state_dict' in loaded and isinstance(loaded['state_dict'], Mapping):
      loaded = loaded['state_dict']
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in loaded.items()}
  raise ValueError(f'{path}: unknown weight file type (want .safetensors, .bin, .pt, .npz)')


def write_state_dict(state_dict: StateDict, path: str | os.PathLike) -> None:
  """Writes a state dict as safetensors (contiguous copies of every array)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, os.fspath(path))


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
      problems.append(f'{rule.torch_key}: checkpoint shape {array.shape} does not fit '
                      f'{rule.path} of shape {shape}')
      continue
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
  load into a [2V, H/2] one), equal sizes for explicit reshapes."""
  if rule.transform is identity:
    return tuple(torch_shape) == tuple(shape)
  if rule.transform is linear:
    return tuple(torch_shape) == _linear_torch_shape(rule.path, tuple(shape))
  return int(np.prod(torch_shape)) == int(np.prod(shape))
