"""LXMERT: two streams (9 language, 5 relationship layers) + 5 cross layers.

Usage:
  python -m vlpjax.main --config=configs/lxmert.py:base --workdir=/tmp/lxmert
  # Fine-tune a pretraining run (workdir /tmp/lxmert_small) on VQA:
  python -m vlpjax.main --config=configs/lxmert.py:small,task=vqa --workdir=/tmp/lxmert_vqa --config.init.source=workdir:/tmp/lxmert_small

Config args: 'base' (published shapes, as HF `LxmertForPreTraining`), 'small'
(2/2/2 layers of width 256, heads sized for the embedded world), 'tiny' (for
tests; keeps two layers of each kind).
"""
import ml_collections

from vlpjax import config_lib


def model_config(size: str = 'base') -> ml_collections.ConfigDict:
  """Model fields (the dataclass fields of `vlpjax.models.lxmert.Lxmert`)."""
  config = config_lib.model_defaults()
  config.name = 'lxmert'
  if size == 'small':
    config = config_lib.small_model(
        'lxmert', ('vocab_size', 'feature_dim', 'num_answers', 'num_object_labels',
                   'num_attr_labels'),
        num_language_layers=2, num_relation_layers=2, num_cross_layers=2)
  elif size == 'base':
    config.update(dict(
        vocab_size=30522, hidden_size=768, num_heads=12, intermediate_size=3072,
        max_position_embeddings=512, type_vocab_size=2,
        num_language_layers=9, num_relation_layers=5, num_cross_layers=5,
        feature_dim=2048, num_answers=9500, num_object_labels=1600,
        num_attr_labels=400))
  elif size == 'tiny':
    config.update(dict(
        vocab_size=120, hidden_size=64, num_heads=4, intermediate_size=128,
        max_position_embeddings=64, type_vocab_size=2,
        num_language_layers=2, num_relation_layers=2, num_cross_layers=2,
        feature_dim=40, num_answers=30, num_object_labels=16, num_attr_labels=8))
  else:
    raise ValueError(f"configs/lxmert.py: unknown size {size!r}; want 'base', 'small' or 'tiny'")
  config.visual_pos_dim = 4  # boxes (x1, y1, x2, y2) / (W, H)
  return config


def get_config(arg: str = 'base') -> ml_collections.ConfigDict:
  """`--config=configs/lxmert.py:SIZE[,task=TASK]` (task 'pretrain' by default)."""
  # make_config adds the run sections (train, pretrain, data, mesh, checkpoint,
  # init) and the task's.
  size, options = config_lib.config_arg(arg)
  return config_lib.make_config(model_config(size), size, **options)
