"""The four fusion designs. `get_model(config.model)` builds one from its config.

Each design module `vlpjax.models.<name>` defines `MODEL` (the backbone),
`PRETRAINING` (backbone + the design's pretraining heads), whose dataclass
fields are exactly the keys of the design's model config, and `DESIGN`
(`vlpjax.models.design.Design`): everything else that depends on the design.
"""
from __future__ import annotations

import flax.linen as nn
import ml_collections

from vlpjax.models.design import DESIGNS, Design, get_design


def get_model(model_config: ml_collections.ConfigDict, *, pretraining: bool = True
              ) -> nn.Module:
  """Builds the design named by `model_config.name` with the other fields as kwargs."""
  design = get_design(model_config.get('name'))
  fields = {k: v for k, v in model_config.items() if k != 'name'}
  return (design.pretraining if pretraining else design.model)(**fields)


__all__ = ['DESIGNS', 'Design', 'get_design', 'get_model']
