"""The four fusion designs. `get_model(config.model)` builds one from its config.

Each design module `vlpjax.models.<name>` defines `MODEL` (the backbone) and
`PRETRAINING` (backbone + the design's pretraining heads); their dataclass
fields are exactly the keys of the design's model config.
"""
from __future__ import annotations

import importlib

import flax.linen as nn
import ml_collections

DESIGNS = ('visualbert', 'vilbert', 'lxmert', 'uniter')


def get_model(model_config: ml_collections.ConfigDict, *, pretraining: bool = True
              ) -> nn.Module:
  """Builds the design named by `model_config.name` with the other fields as kwargs."""
  name = model_config.get('name')
  if name not in DESIGNS:
    raise ValueError(f'config.model.name must be one of {DESIGNS}, got {name!r}')
  module = importlib.import_module(f'vlpjax.models.{name}')
  fields = {k: v for k, v in model_config.items() if k != 'name'}
  return (module.PRETRAINING if pretraining else module.MODEL)(**fields)
