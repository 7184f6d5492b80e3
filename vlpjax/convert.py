r"""Converts published checkpoints to vlpjax params (orbax) and back to PyTorch.

Import: reads a checkpoint strictly (any missing, unexpected or misshapen weight
is an error) and writes the params pytree with orbax's StandardCheckpointer, the
form `--config.init.source=orbax:DIR` reads:

  python -m vlpjax.convert --from=uniter --src=uniter-base.pt --out=/tmp/uniter_base \
      --config=configs/uniter.py:base

Sources (`--from`): hf-lxmert, hf-visualbert (transformers `save_pretrained`
directories or weight files), bert (a transformers BERT into the text side of any
design; the other params are freshly initialised from `config.seed`), uniter
(ChenRocks/UNITER `.pt`), vilbert (vilbert-multi-task `.bin`).
The region detector's weights (`vlpjax.detector`, its published config, no
`--config`): hf-frcnn (HF `unc-nlp/frcnn-vg-finetuned`), butd-detectron2
(detectron2's `.pkl` of the converted Caffe weights, read without running code):

  python -m vlpjax.convert --from=butd-detectron2 --src=faster_rcnn_from_caffe_attr.pkl \
      --out=/tmp/butd_detector

`--target=backbone` writes the backbone's params only: use it for backbone-only
checkpoints (HF `LxmertModel`, a bare `UniterModel`), or to keep only the
backbone of a pretraining checkpoint (its heads are left out, logged).

Export: an orbax params checkpoint back to a `.safetensors` state dict in the
design's own format (HF for LXMERT/VisualBERT, the original code's for
UNITER/ViLBERT):

  python -m vlpjax.convert --to=torch --src=/tmp/uniter_base \
      --out=/tmp/uniter_base.safetensors --config=configs/uniter.py:base

Paths are local (relative to the working directory) or gs://. `--out` must not
exist yet; that is checked before `--src` is read.
"""
from __future__ import annotations

import logging
from typing import Any

from absl import app
from absl import flags
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import orbax.checkpoint as ocp

from vlpjax import checkpointing, paths
from vlpjax import config_lib
from vlpjax.checkpoints import hf
from vlpjax.checkpoints import original
from vlpjax.checkpoints import state_dict as sd
from vlpjax.detector import model as detector_model
from vlpjax.detector import weights as detector_weights
from vlpjax.models import get_design, get_model

Params = Any

# --from -> the design it loads into (None: any design).
SOURCES = {'hf-lxmert': 'lxmert', 'hf-visualbert': 'visualbert', 'bert': None,
           'uniter': 'uniter', 'vilbert': 'vilbert'}
IMPORTERS = {'hf-lxmert': hf.import_hf, 'hf-visualbert': hf.import_hf,
             'uniter': original.import_uniter, 'vilbert': original.import_vilbert}
EXPORTERS = {'lxmert': hf.export_hf, 'visualbert': hf.export_hf,
             'uniter': original.export_uniter, 'vilbert': original.export_vilbert}
# --from -> the importer of the region detector's params (`vlpjax.detector`).
DETECTOR_IMPORTERS = {'hf-frcnn': detector_weights.import_hf_frcnn,
                      'butd-detectron2': detector_weights.import_detectron2}
TARGETS = ('pretraining', 'backbone')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A design config, e.g. configs/uniter.py:base; its model section '
    'must match the checkpoint.', lock_config=True)
_FROM = flags.DEFINE_enum('from', None, list(SOURCES) + list(DETECTOR_IMPORTERS),
                          'Kind of checkpoint to import (not with --to=torch).')
_SRC = flags.DEFINE_string('src', None, 'Checkpoint to read: a weight file or directory '
                           '(import), or an orbax params directory (--to=torch).')
_OUT = flags.DEFINE_string('out', None, 'Where to write: a new orbax directory (import), '
                           'or a .safetensors file or directory (--to=torch).')
_TO = flags.DEFINE_enum('to', 'orbax', ['orbax', 'torch'],
                        'orbax: import --src into vlpjax params; torch: export them back.')
_TARGET = flags.DEFINE_enum('target', 'pretraining', list(TARGETS),
                            'Import into the pretraining model or its backbone only.')


def example_inputs(model_config: ml_collections.ConfigDict, pretraining: bool
                   ) -> dict[str, jax.Array]:
  """A one-example input batch that fixes every param shape of the design."""
  design = get_design(model_config.name)
  feature_dim = model_config.feature_dim
  inputs = dict(input_ids=jnp.zeros((1, 2), jnp.int32), text_mask=jnp.ones((1, 2), jnp.int32),
                region_feats=jnp.zeros((1, 1, feature_dim)),
                region_loc=jnp.zeros((1, 1, design.loc_dim)),
                region_mask=jnp.ones((1, 1), jnp.int32))
  if pretraining:
    inputs['mlm_positions'] = jnp.zeros((1, 1), jnp.int32)
  return inputs


def _init(model_config: ml_collections.ConfigDict, pretraining: bool, rng: jax.Array
          ) -> Params:
  # Converted checkpoints keep one entry per layer whatever `model.scan_layers`
  # says: a scanned model reads them (`checkpointing`), and the rules name layers.
  per_layer = model_config.copy_and_resolve_references()
  per_layer.scan_layers = False
  model = get_model(per_layer, pretraining=pretraining)
  return nn.meta.unbox(model.init(rng, **example_inputs(model_config, pretraining)))['params']


def abstract_params(model_config: ml_collections.ConfigDict, pretraining: bool) -> Params:
  """ShapeDtypeStructs of the params of the pretraining model or its backbone."""
  return jax.eval_shape(lambda: _init(model_config, pretraining, jax.random.key(0)))


def import_checkpoint(model_config: ml_collections.ConfigDict, source: str, src: str,
                      pretraining: bool = True, seed: int = 0) -> Params:
  """Reads checkpoint `src` of kind `source` (a key of SOURCES) into params.

  Raises:
    ValueError: the source does not load into `model_config`'s design.
    CheckpointMismatchError: the checkpoint does not fit the model config.
  """
  if source not in SOURCES:
    raise ValueError(f'--from must be one of {list(SOURCES)}, got {source!r}')
  design = SOURCES[source]
  if design is not None and design != model_config.name:
    raise ValueError(f'--from={source} loads into {design}, but the config is '
                     f'{model_config.name} (config.model.name)')
  if source == 'bert':
    params = jax.jit(lambda rng: _init(model_config, pretraining, rng))(jax.random.key(seed))
    return hf.import_bert(model_config, src, jax.device_get(params))
  return IMPORTERS[source](model_config, src, abstract_params(model_config, pretraining))


def new_output(out: str) -> epath.Path:
  """`out` as an absolute path, checked not to exist (so nothing is overwritten).

  Raises:
    FileExistsError naming the path.
  """
  path = paths.path(out)
  if path.exists():
    raise FileExistsError(f'--out={out} exists ({path}); choose a new path')
  return path


def save_params(params: Params, out: str) -> None:
  """Writes the params pytree with orbax's StandardCheckpointer (`out` must not exist)."""
  path = new_output(out)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, params)
    checkpointer.wait_until_finished()


def torch_output(out: str) -> epath.Path:
  """The file an export to `out` writes, checked not to exist: `out` itself if it
  ends in `.safetensors`, else `out/model.safetensors`."""
  return new_output(out if out.endswith('.safetensors') else f'{out}/{sd.WEIGHT_FILES[0]}')


def export_to_torch(model_config: ml_collections.ConfigDict, src: str, out: str) -> str:
  """Writes the orbax params at `src` as the design's PyTorch state dict.

  `out` is a `.safetensors` path, or a directory that gets `model.safetensors`;
  that file must not exist. Returns the path written.
  """
  written = torch_output(out)
  pretraining = 'backbone' in checkpointing.stored_top_level_keys(src)
  params = checkpointing.restore_params(src, abstract_params(model_config, pretraining))
  state_dict = EXPORTERS[model_config.name](model_config, jax.device_get(params))
  written.parent.mkdir(parents=True, exist_ok=True)
  sd.write_state_dict(state_dict, written)
  return str(written)


def import_detector(source: str, src: str, out: str,
                    config: detector_model.DetectorConfig | None = None) -> None:
  """Writes the detector params read from `src` (kind `source`, a key of
  DETECTOR_IMPORTERS) for `config` (None: the published one) to `out`, with
  the config beside them (`detector_weights.save_config`)."""
  new_output(out)   # before the read of --src
  config = config or detector_model.DetectorConfig()
  params = DETECTOR_IMPORTERS[source](src, config)
  save_params(params, out)
  detector_weights.save_config(config, out)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config_lib.clean_logging()
  if _FROM.value in DETECTOR_IMPORTERS:
    if _CONFIG.value is not None or _TO.value != 'orbax' or _TARGET.present:
      raise app.UsageError(f'--from={_FROM.value} imports the detector (its published '
                           'config): give --src and --out only')
    for holder in (_SRC, _OUT):
      if holder.value is None:
        raise app.UsageError(f'--{holder.name} is required')
    import_detector(_FROM.value, _SRC.value, _OUT.value)
    logging.info('wrote the detector params of %s to %s', _SRC.value, _OUT.value)
    return
  for holder in (_CONFIG, _SRC, _OUT):
    if holder.value is None:
      raise app.UsageError(f'--{holder.name} is required')
  model_config = _CONFIG.value.model
  if _TO.value == 'torch':
    if _FROM.present or _TARGET.present:
      raise app.UsageError('--from and --target are for imports; --to=torch exports the '
                           'orbax params at --src in the design\'s own format')
    written = export_to_torch(model_config, _SRC.value, _OUT.value)
    logging.info('wrote %s', written)
    return
  if _FROM.value is None:
    raise app.UsageError(f'--from is required to import; one of {list(SOURCES)}')
  new_output(_OUT.value)   # before the (possibly long) read of --src
  params = import_checkpoint(model_config, _FROM.value, _SRC.value,
                             pretraining=_TARGET.value == 'pretraining',
                             seed=_CONFIG.value.get('seed', 0))
  save_params(params, _OUT.value)
  logging.info('wrote %s params of %s (%s) to %s', _TARGET.value, model_config.name,
               _SRC.value, _OUT.value)


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.flags_parser(_CONFIG))
