"""UNITER model configs (shapes of ChenRocks/UNITER `config/uniter-{base,large}.json`).

Usage:
  python -m vlpjax.main --config=configs/uniter.py:base --workdir=/tmp/uniter
  # Fine-tune a pretraining run (workdir /tmp/uniter_small) on VQA:
  python -m vlpjax.main --config=configs/uniter.py:small,task=vqa --workdir=/tmp/uniter_vqa --config.init.source=workdir:/tmp/uniter_small

Sizes: 'base' (12 x 768, 12 heads), 'large' (24 x 1024, 16 heads, FFN 4096),
'small' (4 x 256, heads sized for the embedded world: the README's main job) and
'tiny' (the shapes of the parity fixture tests/data/reference/uniter_tiny.json).
"""
import ml_collections

from vlpjax import config_lib

SIZES = dict(
    base=dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
              vocab_size=28996, max_position_embeddings=512, feature_dim=2048,
              num_region_classes=1601),
    large=dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
               vocab_size=28996, max_position_embeddings=512, feature_dim=2048,
               num_region_classes=1601),
    tiny=dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
              vocab_size=120, max_position_embeddings=64, feature_dim=40,
              num_region_classes=11),
)


def model_config(size: str) -> ml_collections.ConfigDict:
  """UNITER model config of `size` in {'base', 'large', 'small', 'tiny'}."""
  if size == 'small':
    return config_lib.small_model(
        'uniter', ('vocab_size', 'feature_dim', 'num_region_classes'), num_layers=4)
  if size not in SIZES:
    raise ValueError(f'configs/uniter.py: unknown size {size!r}; choose one of {[*SIZES, "small"]}')
  config = config_lib.model_defaults()
  config.name = 'uniter'
  config.type_vocab_size = 2       # text type 0, regions type 1 (one shared table)
  config.update(SIZES[size])      # vocab: bert-base-cased; 1601 = VG classes + background
  return config


def get_config(arg: str = 'base') -> ml_collections.ConfigDict:
  """`--config=configs/uniter.py:SIZE[,task=TASK]` (task 'pretrain' by default)."""
  # make_config adds the run sections (train, pretrain, data, mesh, checkpoint,
  # init) and the task's.
  size, options = config_lib.config_arg(arg)
  return config_lib.make_config(model_config(size), size, **options)
