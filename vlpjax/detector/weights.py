"""Detector weights -> `FasterRCNN` params, strictly.

Two sources, with the same key names:

* HF `unc-nlp/frcnn-vg-finetuned` (`import_hf_frcnn`): the `state_dict()` of
  the port's `GeneralizedRCNN` (`pytorch_model.bin`, read with
  `torch.load(weights_only=True)`, or the same keys as safetensors / npz).
* detectron2's `.pkl` of the converted Caffe weights (airsplay/py-bottom-up-attention's
  `faster_rcnn_from_caffe_attr.pkl`, MILVLG/bottom-up-attention.pytorch;
  `import_detectron2`): `{'model': {name: numpy array}, '__author__': ...}`,
  read by `formats.ArrayUnpickler` (numpy arrays and plain data only, never
  code). Caffe2 blob names (`res2_0_branch2a_w`), which detectron2 maps by
  name heuristics, are refused with that explanation.

Every key must map to a param of the config's
shape and every param must be filled (`state_dict.import_params`); two kinds
of buffer are not params:

* `*.num_batches_tracked` of every batch norm: a training counter, ignored.
* `proposal_generator.anchor_generator.cell_anchors.0` [A, 4]: the anchors the
  port derives from its config; required in HF's checkpoint (optional in a
  detectron2 file, which may leave the buffer out), and it must equal
  `model.cell_anchors(config)` (a checkpoint of other anchor sizes is an error,
  not a silent mismatch).

Key layout (torch -> flax):

  backbone.stem.conv1.*                  backbone/stem/*
  backbone.res{2,3,4}.{i}.{conv1..3,shortcut}.*
                                         backbone/res{s}_{i}/{...}/*
  proposal_generator.rpn_head.{conv,objectness_logits,anchor_deltas}.*
                                         rpn_head/{...}/*
  roi_heads.res5.{i}.*                   res5/block_{i}/*
  roi_heads.box_predictor.{cls_score,bbox_pred,cls_embedding,fc_attr,attr_score}.*
                                         box_predictor/{...}/*

with conv `weight` [O, I, kh, kw] -> `kernel` [kh, kw, I, O], Linear weight
[out, in] -> kernel [in, out], norm weight/bias/running_mean/running_var ->
scale/bias/mean/var, Embedding weight -> embedding.

`vlpjax.convert` writes the imported params with their `DetectorConfig` beside
them (`CONFIG_FILE`, `save_config`), so what reads them (`read_config`,
`RegionExtractor.from_orbax`, `vlpjax.extract`) builds the detector they fit.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vlpjax import paths
from vlpjax.checkpoints import state_dict as sd
from vlpjax.checkpoints.state_dict import CheckpointMismatchError, Rule
from vlpjax.detector import model as detector_model

Params = Any

CELL_ANCHORS_KEY = 'proposal_generator.anchor_generator.cell_anchors.0'
BATCH_COUNTER_KEYS = r'.*\.num_batches_tracked'
CONFIG_FILE = 'detector_config.json'
_NORM_LEAVES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                'var': 'running_var'}


def conv_kernel(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """torch Conv2d weight [O, I, kh, kw] -> flax kernel [kh, kw, I, O] (`shape`)."""
  del shape
  return np.transpose(x, (2, 3, 1, 0))


def _torch_module(path: list[str]) -> list[str]:
  """Flax module names -> torch module names (see the module docstring)."""
  head, rest = path[0], path[1:]
  if head == 'backbone':
    if rest[0] == 'stem':
      return ['backbone', 'stem', 'conv1'] + rest[1:]
    stage, index = rest[0].split('_')
    return ['backbone', stage, index] + rest[1:]
  if head == 'rpn_head':
    return ['proposal_generator', 'rpn_head'] + rest
  if head == 'res5':
    return ['roi_heads', 'res5', rest[0].removeprefix('block_')] + rest[1:]
  if head == 'box_predictor':
    return ['roi_heads', 'box_predictor'] + rest
  raise ValueError(f'no torch module for flax path {"/".join(path)}')


def rules(target: Params) -> list[Rule]:
  """One Rule per param of `target` (params or their `jax.eval_shape` structs)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(target), sep='/')
  out = []
  for path, value in sorted(flat.items()):
    *modules, leaf = path.split('/')
    torch_prefix = '.'.join(_torch_module(modules))
    if modules[-1] == 'norm':
      out.append(Rule(f'{torch_prefix}.{_NORM_LEAVES[leaf]}', path))
    elif leaf == 'kernel':
      transform = conv_kernel if len(value.shape) == 4 else sd.linear
      out.append(Rule(f'{torch_prefix}.weight', path, transform))
    elif leaf == 'embedding':
      out.append(Rule(f'{torch_prefix}.weight', path))
    else:
      out.append(Rule(f'{torch_prefix}.{leaf}', path))
  return out


def export_hf_frcnn(params: Params, config: detector_model.DetectorConfig
                    ) -> dict[str, np.ndarray]:
  """The HF port's `state_dict()` of `params` (torch keys and layouts, the
  cell-anchor buffer included): what `import_hf_frcnn` reads back. Feeds the
  port the same weights (`benchmarks/extraction_port.py`)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  out = {}
  for rule in rules(params):
    value = np.asarray(flat[rule.path])
    if rule.transform is conv_kernel:
      value = np.transpose(value, (3, 2, 0, 1))
    elif rule.transform is sd.linear:
      value = value.T
    out[rule.torch_key] = np.ascontiguousarray(value)
  out[CELL_ANCHORS_KEY] = detector_model.cell_anchors(config).astype(np.float32)
  return out


def save_config(config: detector_model.DetectorConfig, directory: str | os.PathLike) -> None:
  """Writes `config` as `<directory>/CONFIG_FILE` (JSON of its fields)."""
  (paths.path(directory) / CONFIG_FILE).write_text(
      json.dumps(dataclasses.asdict(config), indent=1))


def read_config(directory: str | os.PathLike) -> detector_model.DetectorConfig:
  """The `DetectorConfig` saved beside the params in `directory`; the published
  config when there is none (params converted before configs were saved, which
  were all of the published config).

  Raises:
    ValueError naming the file and the field it does not know.
  """
  file = paths.path(directory) / CONFIG_FILE
  if not file.exists():
    logging.info('%s: no %s, so the published detector config', directory, CONFIG_FILE)
    return detector_model.DetectorConfig()
  fields = json.loads(file.read_text())
  known = {f.name for f in dataclasses.fields(detector_model.DetectorConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'{file}: unknown detector config fields {unknown}')
  return detector_model.DetectorConfig(**{
      k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def param_shapes(config: detector_model.DetectorConfig) -> Params:
  """The params' shapes (`jax.ShapeDtypeStruct`s) for `config`, without computing."""
  detector = detector_model.FasterRCNN(config)
  size = 2 * detector_model.FEATURE_STRIDE
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  sizes = jnp.full((1, 2), size, jnp.int32)
  scales = jnp.ones((1, 2), jnp.float32)
  variables = jax.eval_shape(detector.init, jax.random.key(0), images, sizes, scales)
  return variables['params']


def import_hf_frcnn(source: str | os.PathLike | Mapping[str, np.ndarray],
                    config: detector_model.DetectorConfig) -> Params:
  """Params of `FasterRCNN(config)` from an HF frcnn checkpoint (a weight file,
  a `save_pretrained` directory, or a loaded state dict).

  Raises:
    CheckpointMismatchError naming every missing, unexpected or misshapen key
    (conv weights are checked in torch's [O, I, kh, kw]), and a cell-anchor
    buffer that is absent or differs from the config's anchors.
  """
  return _import(*_read(source), config, anchors_required=True)


def import_detectron2(source: str | os.PathLike | Mapping[str, np.ndarray],
                      config: detector_model.DetectorConfig) -> Params:
  """Params of `FasterRCNN(config)` from a detectron2 `.pkl` of the converted
  Caffe weights (or its loaded state dict), as `import_hf_frcnn` but with the
  cell-anchor buffer optional (checked when present).

  Raises:
    ValueError: a Caffe2/Detectron1 blob file (names without dots), or a pickle
      that asks for anything but numpy arrays.
    CheckpointMismatchError: as `import_hf_frcnn`.
  """
  state_dict, name = _read(source)
  blob_names = [k for k in state_dict if '.' not in k]
  if blob_names:
    raise ValueError(f'{name} holds Caffe2/Detectron1 blob names (e.g. {blob_names[:3]}), '
                     'which detectron2 matches to its modules by name heuristics; convert it '
                     'to detectron2 names first (detectron2 DetectionCheckpointer, then '
                     'torch.save(model.state_dict()))')
  return _import(state_dict, name, config, anchors_required=False)


def _read(source: str | os.PathLike | Mapping[str, np.ndarray]
          ) -> tuple[dict[str, np.ndarray], str]:
  if isinstance(source, Mapping):
    return {k: np.asarray(v) for k, v in source.items()}, 'state dict'
  return sd.read_state_dict(source), os.fspath(source)


def _import(state_dict: dict[str, np.ndarray], name: str,
            config: detector_model.DetectorConfig, anchors_required: bool) -> Params:
  target = param_shapes(config)
  all_rules = rules(target)
  shapes = {path: tuple(v.shape) for path, v in
            flax.traverse_util.flatten_dict(flax.core.unfreeze(target), sep='/').items()}
  problems = []
  for rule in all_rules:
    if rule.transform is conv_kernel and rule.torch_key in state_dict:
      kh, kw, fan_in, fan_out = shapes[rule.path]
      found = tuple(state_dict[rule.torch_key].shape)
      if found != (fan_out, fan_in, kh, kw):
        problems.append(f'{rule.torch_key}: checkpoint shape {found} does not fit '
                        f'{rule.path}, which needs {(fan_out, fan_in, kh, kw)}')
  expected_anchors = detector_model.cell_anchors(config)
  anchors = state_dict.pop(CELL_ANCHORS_KEY, None)
  if anchors is None:
    if anchors_required:
      problems.append(f'missing keys (1): {[CELL_ANCHORS_KEY]}')
  elif anchors.shape != expected_anchors.shape or not np.allclose(
      anchors, expected_anchors, atol=1e-3):
    problems.append(f'{CELL_ANCHORS_KEY}: the checkpoint\'s anchors {anchors.tolist()} are '
                    f'not the config\'s {expected_anchors.tolist()} (anchor_sizes '
                    f'{config.anchor_sizes}, anchor_ratios {config.anchor_ratios})')
  try:
    params = sd.import_params(state_dict, all_rules, target, skip=[BATCH_COUNTER_KEYS],
                              source=name)
  except CheckpointMismatchError as error:
    problems.append(str(error))
  if problems:
    raise CheckpointMismatchError(f'{name} does not fit the detector config:\n  ' +
                                  '\n  '.join(problems))
  return params
