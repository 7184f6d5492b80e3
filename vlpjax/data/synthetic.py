"""Random batches in the pipeline's layout, for step benchmarks and sharding tests.

Shapes follow the data contract (README, "Data"): padding in both text and
regions, token ids in bert-base's convention ([CLS] 101, [SEP] 102, words from
106), head targets sized by the model config rather than by a dataset.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from vlpjax.models import get_design


def synthetic_batch(model: ml_collections.ConfigDict, batch_size: int, text_len: int,
                    regions: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A pretraining batch for `model` (a design's model config).

  Returns numpy arrays: input_ids/text_mask/token_type_ids [B, T],
  region_feats [B, R, F], region_loc [B, R, L], region_mask [B, R],
  match_label [B], and the targets the design's losses read (class_probs
  [B, R, C]; object/attribute labels and confidences [B, R]; answer_scores
  [B, A], qa_valid and shows_question [B]).
  """
  rs = np.random.RandomState(seed)
  design = get_design(model.name)
  components = design.recipe.components
  text_lengths = rs.randint(min(4, text_len), text_len + 1, batch_size)
  text_mask = np.arange(text_len)[None] < text_lengths[:, None]
  ids = rs.randint(106, max(model.vocab_size, 107), (batch_size, text_len))
  ids[:, 0] = 101
  ids[np.arange(batch_size), text_lengths - 1] = 102
  ids[~text_mask] = 0
  region_mask = np.arange(regions)[None] < rs.randint(min(2, regions), regions + 1,
                                                      batch_size)[:, None]
  batch = dict(
      input_ids=ids.astype(np.int32), text_mask=text_mask.astype(np.int32),
      token_type_ids=np.zeros((batch_size, text_len), np.int32),
      region_feats=(rs.rand(batch_size, regions, model.feature_dim) * region_mask[..., None]
                    ).astype(np.float32),
      region_loc=rs.rand(batch_size, regions, design.loc_dim).astype(np.float32),
      region_mask=region_mask.astype(np.int32),
      match_label=rs.randint(0, 2, batch_size).astype(np.int32))
  if design.needs_class_probs:
    probs = rs.rand(batch_size, regions, model.num_region_classes)
    batch['class_probs'] = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
  per_region = (batch_size, regions)
  if 'obj' in components:
    batch.update(object_ids=rs.randint(0, model.num_object_labels, per_region).astype(np.int32),
                 object_conf=rs.rand(*per_region).astype(np.float32))
  if 'attr' in components:
    batch.update(attr_ids=rs.randint(0, model.num_attr_labels, per_region).astype(np.int32),
                 attr_conf=rs.rand(*per_region).astype(np.float32))
  if 'qa' in components:
    batch.update(
        answer_scores=(rs.rand(batch_size, model.num_answers) > 0.9).astype(np.float32),
        qa_valid=np.ones(batch_size, np.float32),
        shows_question=np.ones(batch_size, np.float32))
  return batch
