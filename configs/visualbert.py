"""VisualBERT: single-stream BERT over text then regions (see shared MODELS.md).

Usage:
  python -m vlpjax.main --config=configs/visualbert.py:base --workdir=/tmp/visualbert
  # Fine-tune a pretraining run (workdir /tmp/visualbert_small) on VQA:
  python -m vlpjax.main --config=configs/visualbert.py:small,task=vqa --workdir=/tmp/visualbert_vqa --config.init.source=workdir:/tmp/visualbert_small

Config args: 'base' (BERT-base, 2048-d BUTD features as VQA/COCO), 'base_nlvr2'
(1024-d features), 'base_vcr' (512-d features), 'small' (4 x 256, sized for the
embedded world), 'tiny' (for tests).
"""
import ml_collections

from vlpjax import config_lib

# Region feature width of the detector each published checkpoint was trained on.
FEATURE_DIMS = {'base': 2048, 'base_nlvr2': 1024, 'base_vcr': 512}


def model_config(size: str = 'base') -> ml_collections.ConfigDict:
  """Model fields (the dataclass fields of `vlpjax.models.visualbert.VisualBert`)."""
  config = config_lib.model_defaults()
  config.name = 'visualbert'
  if size in FEATURE_DIMS:
    config.update(dict(
        vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
        intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
        feature_dim=FEATURE_DIMS[size]))
  elif size == 'small':
    config = config_lib.small_model('visualbert', ('vocab_size', 'feature_dim'), num_layers=4)
  elif size == 'tiny':
    config.update(dict(
        vocab_size=120, hidden_size=64, num_layers=2, num_heads=4,
        intermediate_size=128, max_position_embeddings=64, type_vocab_size=2,
        feature_dim=40))
  else:
    raise ValueError(f'configs/visualbert.py: unknown size {size!r}; '
                     f'want one of {[*FEATURE_DIMS, "small", "tiny"]}')
  # Token type of every region: 1 as in HF checkpoints; the original code uses 0.
  config.visual_token_type = 1
  # Visual position/type tables start as copies of the text tables (HF default).
  config.special_visual_initialize = True
  return config


def get_config(arg: str = 'base') -> ml_collections.ConfigDict:
  """`--config=configs/visualbert.py:SIZE[,task=TASK]` (task 'pretrain' by default)."""
  # make_config adds the run sections (train, pretrain, data, mesh, checkpoint,
  # init) and the task's.
  size, options = config_lib.config_arg(arg)
  return config_lib.make_config(model_config(size), size, **options)
