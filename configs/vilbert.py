"""ViLBERT model configs (shapes of vilbert-multi-task `config/bert_base_6layer_6conect.json`).

Usage:
  python -m vlpjax.main --config=configs/vilbert.py:base --workdir=/tmp/vilbert
  # Fine-tune a pretraining run (workdir /tmp/vilbert_small) on VQA:
  python -m vlpjax.main --config=configs/vilbert.py:small,task=vqa --workdir=/tmp/vilbert_vqa --config.init.source=workdir:/tmp/vilbert_small

Sizes: 'base' (BERT-base text stream; image stream 6 x 1024, 8 heads, FFN 1024;
6 Co-TRM layers of width 1024 after text layers 5..10 and image layers -1..4)
'small' (text 4 x 256, image 2 x 256, 2 Co-TRM layers, heads sized for the
embedded world) and 'tiny' (the shapes of the parity fixture
tests/data/reference/vilbert_tiny.json).
Other published placements (2-, 4-, 8-layer) only change `v_biattention_id` /
`t_biattention_id` (and `v_num_layers`), e.g. 2-layer: [0, 1] / [10, 11].
"""
import ml_collections

from vlpjax import config_lib

SIZES = dict(
    base=dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
              intermediate_size=3072, max_position_embeddings=512, feature_dim=2048,
              v_hidden_size=1024, v_num_layers=6, v_num_heads=8, v_intermediate_size=1024,
              bi_hidden_size=1024, bi_num_heads=8,
              v_biattention_id=(0, 1, 2, 3, 4, 5), t_biattention_id=(6, 7, 8, 9, 10, 11),
              num_region_classes=1601),
    tiny=dict(vocab_size=120, hidden_size=64, num_layers=4, num_heads=4,
              intermediate_size=128, max_position_embeddings=64, feature_dim=40,
              v_hidden_size=48, v_num_layers=2, v_num_heads=4, v_intermediate_size=48,
              bi_hidden_size=32, bi_num_heads=4,
              v_biattention_id=(0, 1), t_biattention_id=(2, 3), num_region_classes=11),
)


def model_config(size: str) -> ml_collections.ConfigDict:
  """ViLBERT model config of `size` in {'base', 'small', 'tiny'}."""
  if size == 'small':
    return config_lib.small_model(
        'vilbert', ('vocab_size', 'feature_dim', 'num_region_classes'), num_layers=4,
        v_hidden_size=256, v_num_layers=2, v_num_heads=4, v_intermediate_size=256,
        bi_hidden_size=256, bi_num_heads=4, v_biattention_id=(0, 1), t_biattention_id=(2, 3))
  if size not in SIZES:
    raise ValueError(f'configs/vilbert.py: unknown size {size!r}; choose one of {[*SIZES, "small"]}')
  config = config_lib.model_defaults()
  config.name = 'vilbert'
  config.type_vocab_size = 2
  config.update(SIZES[size])  # vocab: bert-base-uncased; 1601 = VG classes + background
  return config


def get_config(arg: str = 'base') -> ml_collections.ConfigDict:
  """`--config=configs/vilbert.py:SIZE[,task=TASK]` (task 'pretrain' by default)."""
  # make_config adds the run sections (train, pretrain, data, mesh, checkpoint,
  # init) and the task's.
  size, options = config_lib.config_arg(arg)
  return config_lib.make_config(model_config(size), size, **options)
