"""Referring expressions (RefCOCO, RefCOCO+, RefCOCOg): pick the region an expression names.

Shared TASKS.md "Referring expressions". Each region of the image is scored
from the backbone's region states; the prediction is the box of the
best-scoring region, right when IoU(predicted box, ground-truth box) > 0.5
(strictly, as UNITER's `validate` and vilbert-multi-task's `select_target > 0.5`).
The metric is reported on detected regions and on ground-truth regions.

Heads (`HEADS`; `config.refexp.head` overrides):
  'linear'  region state [B, R, H] -> Linear(H, 1) (UNITER's `re_output`, mlp=1;
            ViLBERT's `vision_logit`).
  'mlp'     Linear(H, H) -> GELU -> LayerNorm(1e-12) -> Linear(H, 1) (UNITER mlp=2).
  TASKS.md is silent on LXMERT and VisualBERT: they take UNITER's head and loss.
Padded regions score MASKED_SCORE (UNITER's `masked_fill(obj_masks, -1e4)`).

Losses (`LOSSES`; `config.refexp.loss` overrides):
  'ce'   softmax cross-entropy over the image's regions, target the region of
         highest IoU with the ground-truth box (on ground-truth regions: the
         referred object itself, UNITER's `ann_ids.index(ann_id)`), averaged
         over the batch (UNITER sums it; the mean only rescales the gradient,
         which AdamW undoes but for clipping).
  'bce'  ViLBERT: BCE-with-logits per region against the region's IoU with the
         ground-truth box, IoUs below BCE_MIN_IOU set to 0 (vilbert-multi-task's
         `mix_target[mix_target < 0.5] = 0`), summed over the real regions and
         averaged over the batch (its `loss.mean() * target.size(1)`).

Regions (`REGION_SOURCES`): 'detected' (the images table), 'gt' (the
ground-truth regions table, `data.gt_images_dataset`; the embedded world's
`gt_images`: one region per object, its true box) or 'mixed' (the detected
regions followed by the ground-truth ones, at most `data.max_regions`, as
vilbert-multi-task trains). Training uses `TRAIN_REGIONS[design]` (UNITER
trains on ground-truth boxes; ViLBERT on the mix; LXMERT and VisualBERT as
UNITER), `config.refexp.train_regions` overrides; each evaluator names its own
(`config.evals.<name>.regions`, 'detected' or 'gt'). The ground-truth regions
table must hold the images table's images row for row (checked by fingerprint).
The mix keeps at most `data.max_regions` regions, as the original's 101: where
the detector fills them all (the default world's 36 per image), it is the
detected regions alone.

Region slots: a design may put slots before the image's regions (ViLBERT's
[IMG], `Design.leading_slots`); the model drops them, so score k is region k of
the image, whatever the design. ViLBERT's original also scores its whole-image
region 0 as a candidate box; here only the image's regions are candidates.

Batches (`RefexpExamples`): input_ids, text_mask, token_type_ids int32 [B, T];
region_feats [B, S, F], region_loc [B, S, L], region_mask [B, S] (the design's
region inputs, S = leading slots + R); candidate_mask int32 [B, R] (the image's
real regions); region_boxes float32 [B, R, 4] (x1, y1, x2, y2 in the images
table's coordinates, pixels); region_iou float32 [B, R] (IoU with the target,
0 on padding); target_region int32 [B]; target_box float32 [B, 4].

Prediction file (`predictions/<name>_step<N>.json`): a JSON list in split
order of {"ref_id": int, "box": [x1, y1, x2, y2], "region": int} (the predicted
region's index among the image's regions and its box), plus "sent_id" when the
table has one row per sentence of a ref (`annotations_builder.Refcoco`).

`vlpjax.load(workdir)` gives a `RefexpPredictor`: `locate(expressions,
features, boxes, image_size)` -> (region index [Q], box [Q, 4]) in an image of
your own features.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from vlpjax.data import examples as examples_lib
from vlpjax.data import input_pipeline, tables
from vlpjax.data.tokenizer import BertTokenizer
from vlpjax.models import design as design_lib
from vlpjax.models import get_model
from vlpjax.models import layers
from vlpjax.objectives.common import mean, ratio
from vlpjax.tasks import gqa, vqa

TABLE = 'refexp'
GT_IMAGES = 'gt_images'
EVAL_TYPE = 'refexp'
# The metric of the `refexp_test` evaluator a comparison of designs reports.
HEADLINE_METRIC = 'accuracy'

HEAD_KINDS = ('linear', 'mlp')
HEADS = {'uniter': 'linear', 'vilbert': 'linear', 'lxmert': 'linear', 'visualbert': 'linear'}
LOSS_KINDS = ('ce', 'bce')
LOSSES = {'uniter': 'ce', 'vilbert': 'bce', 'lxmert': 'ce', 'visualbert': 'ce'}
REGION_SOURCES = ('detected', 'gt', 'mixed')
EVAL_REGION_SOURCES = ('detected', 'gt')
TRAIN_REGIONS = {'uniter': 'gt', 'vilbert': 'mixed', 'lxmert': 'gt', 'visualbert': 'gt'}
HEAD_PARAM_NAME = 'refexp_head'
MASKED_SCORE = -1e4
CORRECT_IOU = 0.5   # right when IoU > this
BCE_MIN_IOU = 0.5   # ViLBERT's soft targets: IoUs below this are 0

REF_KEYS = ('text', 'image_index', 'target_box')
MODEL_INPUT_KEYS = ('input_ids', 'text_mask', 'token_type_ids', 'region_feats', 'region_loc',
                    'region_mask')

# Fine-tuning recipes at `base`, as `config.train` fields. TASKS.md gives none:
# UNITER's config/train-refcoco-base-1gpu.json (batch 128, lr 1e-4, 24k steps,
# warmup 1,500, AdamW (0.9, 0.98), wd 0.01, clip 2, no head lr multiplier);
# vilbert-multi-task's vilbert_tasks.yml RefCOCO+ (batch 256, lr 2e-5, 20 epochs
# of its 120,624 training expressions: 9,424 steps; warmup 10%, train_tasks.py's
# default); LXMERT and VisualBERT, without one, their VQA recipes.
RECIPES = {
    **vqa.RECIPES,
    'uniter': dict(global_batch_size=128, learning_rate=1e-4, warmup_fraction=1_500 / 24_000,
                   num_steps=24_000, adam_b2=0.98, weight_decay=0.01, grad_clip_norm=2.0),
    'vilbert': dict(vqa.RECIPES['vilbert'], global_batch_size=256, learning_rate=2e-5,
                    num_steps=9_424),
}
# Expression lengths in word pieces: UNITER's max_txt_len 60, vilbert-multi-task's
# max_seq_length 20; LXMERT and VisualBERT their VQA lengths.
TEXT_LENGTHS = dict(vqa.TEXT_LENGTHS, uniter=60, vilbert=20)


def default_refexp_config() -> ml_collections.ConfigDict:
  """The `config.refexp` section (None: the design's default)."""
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict(dict(
      train_split='train',
      head=placeholder(str),           # HEAD_KINDS; None: HEADS[design]
      loss=placeholder(str),           # LOSS_KINDS; None: LOSSES[design]
      train_regions=placeholder(str),  # REGION_SOURCES; None: TRAIN_REGIONS[design]
  ))


def resolve_head(config: ml_collections.ConfigDict) -> str:
  """`refexp.head`, or the design's (HEADS)."""
  head = config.refexp.head or HEADS[config.model.name]
  return vqa.choose('refexp.head', head, HEAD_KINDS)


def resolve_loss(config: ml_collections.ConfigDict) -> str:
  """`refexp.loss`, or the design's (LOSSES)."""
  return vqa.choose('refexp.loss', config.refexp.loss or LOSSES[config.model.name], LOSS_KINDS)


def resolve_train_regions(config: ml_collections.ConfigDict) -> str:
  """`refexp.train_regions`, or the design's (TRAIN_REGIONS)."""
  regions = config.refexp.train_regions or TRAIN_REGIONS[config.model.name]
  return vqa.choose('refexp.train_regions', regions, REGION_SOURCES)


# ----------------------------------------------------------------------------
# Boxes.


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of boxes a [..., 4] and b [..., 4] (x1, y1, x2, y2; broadcast) -> [...].

  Continuous areas, which equal the refer toolkit's (UNITER's `computeIoU`)
  inclusive-pixel formula; boxes with no area (union 0) have IoU 0.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  lo = np.maximum(a[..., :2], b[..., :2])
  hi = np.minimum(a[..., 2:], b[..., 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
  area = lambda x: np.prod(np.clip(x[..., 2:] - x[..., :2], 0, None), axis=-1)
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def is_correct(predicted_boxes: np.ndarray, target_boxes: np.ndarray) -> np.ndarray:
  """[..., 4], [..., 4] -> bool [...]: IoU strictly above CORRECT_IOU."""
  return box_iou(predicted_boxes, target_boxes) > CORRECT_IOU


# ----------------------------------------------------------------------------
# The model.


class RegionScoreHead(nn.Module):
  """Region states [B, R, H] -> scores [B, R] ('linear' or 'mlp', module docstring).

  Submodules: output; 'mlp' also hidden, norm.
  """
  kind: str = 'linear'
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, regions: jax.Array) -> jax.Array:
    vqa.choose('RegionScoreHead.kind', self.kind, HEAD_KINDS)
    h = regions
    axis = 'embed'
    if self.kind == 'mlp':
      h = layers.Dense(regions.shape[-1], ('embed', 'mlp'), dtype=self.dtype,
                       param_dtype=self.param_dtype, name='hidden')(h)
      h = layers.LayerNorm('mlp', dtype=self.dtype, param_dtype=self.param_dtype,
                           name='norm')(layers.gelu(h))
      axis = 'mlp'
    return layers.Dense(1, (axis, None), dtype=self.dtype, param_dtype=self.param_dtype,
                        name='output')(h)[..., 0]


class RefexpModel(nn.Module):
  """A design's backbone plus the region-scoring head.

  Params: {'backbone': <the backbone's>, HEAD_PARAM_NAME: <head>}.

  Attributes:
    backbone: `vlpjax.models.get_model(config.model, pretraining=False)`.
    head: one of HEAD_KINDS.
    leading_slots: the design's region slots before the image's regions
      (`Design.leading_slots`), dropped from the scores.
    dtype, param_dtype: of the head.
  """
  backbone: nn.Module
  head: str = 'linear'
  leading_slots: int = 0
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  @nn.compact
  def __call__(self, input_ids: jax.Array, text_mask: jax.Array, token_type_ids: jax.Array,
               region_feats: jax.Array, region_loc: jax.Array, region_mask: jax.Array,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Scores the image's regions for the expressions.

    Args:
      input_ids, text_mask, token_type_ids: [B, T] int.
      region_feats [B, S, F], region_loc [B, S, L], region_mask [B, S]; S =
        leading_slots + R.
      deterministic: no dropout when True.

    Returns:
      {'scores': float32 [B, R]}: region k of the image is score k; padded
      regions score MASKED_SCORE.
    """
    outputs = self.backbone(input_ids, text_mask, region_feats, region_loc, region_mask,
                            token_type_ids=token_type_ids, deterministic=deterministic)
    regions = outputs['vision'][:, self.leading_slots:]  # [B, R, H]
    scores = RegionScoreHead(self.head, dtype=jnp.dtype(self.dtype),
                             param_dtype=jnp.dtype(self.param_dtype),
                             name=HEAD_PARAM_NAME)(regions).astype(jnp.float32)
    real = region_mask[:, self.leading_slots:] > 0
    scores = jnp.where(real, scores, MASKED_SCORE)
    return {'scores': layers.constrain(scores, ('batch', 'regions'))}


def build_model(config: ml_collections.ConfigDict) -> RefexpModel:
  """The RefexpModel of a run config (`config.model`, `config.refexp`)."""
  design = design_lib.get_design(config.model.name)
  return RefexpModel(backbone=get_model(config.model, pretraining=False),
                     head=resolve_head(config), leading_slots=design.leading_slots,
                     dtype=config.model.dtype, param_dtype=config.model.param_dtype)


# ----------------------------------------------------------------------------
# Losses.


def ce_loss(scores: jax.Array, target_region: jax.Array) -> jax.Array:
  """Softmax CE over regions: scores [B, R] (padding at MASKED_SCORE), target [B] -> scalar."""
  log_probs = jax.nn.log_softmax(scores, axis=-1)
  picked = jnp.take_along_axis(log_probs, target_region[:, None].astype(jnp.int32), axis=-1)
  return -mean(picked)


def bce_loss(scores: jax.Array, region_iou: jax.Array, candidate_mask: jax.Array) -> jax.Array:
  """ViLBERT's: BCE-with-logits against IoU targets (below BCE_MIN_IOU: 0), summed
  over the real regions, averaged over the batch. [B, R] each -> scalar."""
  targets = jnp.where(region_iou >= BCE_MIN_IOU, region_iou, 0.0)
  per_region = optax.sigmoid_binary_cross_entropy(scores, targets)
  return ratio(jnp.sum(per_region * candidate_mask.astype(jnp.float32)), float(scores.shape[0]))


def predict(scores: jax.Array) -> jax.Array:
  """The best-scoring region: scores [B, R] -> int32 [B]."""
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------
# Examples.


def append_regions(gathered: dict[str, np.ndarray], extra: dict[str, np.ndarray],
                   first_slot: int) -> None:
  """Appends `extra`'s regions after `gathered`'s, in place, up to the slots there are
  ('mixed' regions). Both are `ImageTable.gather` results of the same images;
  `gathered`'s regions start at `first_slot`, `extra`'s at 0. Only the region
  inputs (feats, boxes, count) are merged."""
  slots = gathered['feats'].shape[1]
  for row in range(len(gathered['count'])):
    start = first_slot + int(gathered['count'][row])
    take = min(int(extra['count'][row]), slots - start)
    for key in ('feats', 'boxes'):
      gathered[key][row, start:start + take] = extra[key][row, :take]
    gathered['count'][row] += take


@dataclasses.dataclass
class RefexpExamples:
  """Builds referring-expression batches (the module docstring's keys);
  `examples(indices)` or `endless_batches`' `examples_fn(epochs, indices)`.

  Attributes:
    design: the model's design (its region inputs and leading slots).
    tokenizer: BertTokenizer (max_len = T).
    images: the regions table ('detected' and 'mixed': the images table; 'gt':
      the ground-truth regions).
    refs: the refexp table (REF_KEYS).
    extra_images: 'mixed' only: the ground-truth regions appended to `images`'.
  """
  design: design_lib.Design
  tokenizer: BertTokenizer
  images: tables.ImageTable
  refs: tables.Table
  extra_images: tables.ImageTable | None = None

  def __len__(self) -> int:
    return len(self.refs)

  def examples(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64).reshape(-1)
    records = self.refs.read(indices)
    batch = self.tokenizer.encode([tables.as_text(r['text']) for r in records])
    image_index = np.array([r['image_index'] for r in records], np.int64).reshape(-1)
    first = self.design.leading_slots
    gathered = self.images.gather(image_index, first_slot=first)
    if self.extra_images is not None:
      append_regions(gathered, self.extra_images.gather(image_index), first)
    regions = examples_lib.region_inputs(self.design, gathered)
    boxes = gathered['boxes'][:, first:]  # [B, R, 4]
    candidates = np.arange(boxes.shape[1])[None, :] < gathered['count'][:, None]
    target_box = np.stack([np.asarray(r['target_box'], np.float32).reshape(4)
                           for r in records]) if records else np.zeros((0, 4), np.float32)
    iou = np.where(candidates, box_iou(boxes, target_box[:, None]), 0.0).astype(np.float32)
    batch.update({k: regions[k] for k in vqa.REGION_KEYS})
    batch.update(candidate_mask=candidates.astype(np.int32), region_boxes=boxes,
                 region_iou=iou, target_region=iou.argmax(-1).astype(np.int32),
                 target_box=target_box)
    return batch

  def examples_fn(self, epochs: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
    del epochs  # no per-example randomness: the shuffle is grain's
    return self.examples(indices)


def open_examples(data_config: ml_collections.ConfigDict, design: str, *, split: str,
                  regions: str) -> RefexpExamples:
  """The tables of a refexp split for `design`, on `regions` (REGION_SOURCES)."""
  vqa.choose('regions', regions, REGION_SOURCES)
  main = GT_IMAGES if regions == 'gt' else 'images'
  tokenizer, images, refs = vqa.open_text_inputs(data_config, design, TABLE, split, REF_KEYS,
                                                 images_table=main)
  extra = None
  if regions == 'mixed':
    _, extra = vqa.open_tokenizer_and_images(data_config, GT_IMAGES)
    tables.check_same_images(data_config, TABLE, split, images_table=GT_IMAGES)
  return RefexpExamples(design_lib.get_design(design), tokenizer, images, refs, extra)


# ----------------------------------------------------------------------------
# Evaluation.


def accuracy_stats(predicted_boxes: np.ndarray, target_boxes: np.ndarray
                   ) -> dict[str, np.int64]:
  """{'correct', 'count'} int64 of [N, 4] predicted and target boxes; sum them
  over processes (`evaluators.common.process_sum`), report with `gqa.summary`."""
  correct = is_correct(np.reshape(predicted_boxes, (-1, 4)), np.reshape(target_boxes, (-1, 4)))
  return {'correct': np.int64(correct.sum()), 'count': np.int64(correct.size)}


def prediction_records(ids: Mapping[str, np.ndarray], regions: np.ndarray, boxes: np.ndarray
                       ) -> list[dict[str, Any]]:
  """[{"ref_id", ("sent_id",) "box": [x1, y1, x2, y2], "region"}] of N predictions:
  ids {name: [N]} ('ref_id', and 'sent_id' if the table has it), regions [N], boxes [N, 4]."""
  return [dict({k: int(v[i]) for k, v in ids.items()},
               box=[float(x) for x in boxes[i]], region=int(regions[i]))
          for i in range(len(regions))]


def read_ids(data_config: ml_collections.ConfigDict, split: str, chunk: int = 4096
             ) -> dict[str, np.ndarray]:
  """'ref_id' (and 'sent_id' when the table has it) of every row of `split`, int64 [N]."""
  features = tables.open_table(data_config, TABLE, split).dataset_info.features
  keys = ('ref_id',) + (('sent_id',) if 'sent_id' in features else ())
  records = tables.read_all(tables.open_split(data_config, TABLE, split, keys), chunk)
  return {k: np.array([r[k] for r in records], np.int64) for k in keys}


class RefexpEvaluator(vqa.SplitEvaluator):
  """Accuracy (IoU > 0.5) on a split, on detected or ground-truth regions
  (`regions` of the eval config), and the prediction file.

  Every expression is scored once (`evaluators.common.eval_batches`: the last
  batch padded, its padding left out); the counts are summed over processes;
  predictions go to `<workdir>/predictions/<name>_step<N>.json`, written in
  parts and merged by process 0.
  """

  def __init__(self, name: str, eval_config: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, model: RefexpModel, mesh: Mesh,
               workdir: str):
    super().__init__(name, eval_config, config, mesh, workdir)
    regions = vqa.choose(f'config.evals.{name}.regions', eval_config.get('regions', 'detected'),
                      EVAL_REGION_SOURCES)
    self.examples = open_examples(config.data, config.model.name, split=eval_config.split,
                                  regions=regions)
    self.ids = read_ids(config.data, eval_config.split)

    def best_region(params, batch):
      kwargs = {k: batch[k] for k in MODEL_INPUT_KEYS}
      kwargs['region_feats'] = kwargs['region_feats'].astype(jnp.float32)
      return predict(model.apply({'params': params}, **kwargs, deterministic=True)['scores'])

    self._predict = jax.jit(best_region, out_shardings=self.sharding)

  def run(self, params: Any, step: int) -> Iterator[tuple[str, float]]:
    """Yields (metric, value): accuracy and count."""
    from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
    stats = {'correct': np.int64(0), 'count': np.int64(0)}
    records = []
    for batch in common.eval_batches(len(self.examples), self.batch_size,
                                     self.examples.examples, self.sharding):
      real = common.local_rows(batch[common.MASK_KEY]).astype(bool)
      index = common.local_rows(batch[common.INDEX_KEY])[real]
      regions = common.local_rows(self._predict(params, batch))[real]
      boxes = common.local_rows(batch['region_boxes'])[real]
      predicted = boxes[np.arange(len(regions)), regions]
      batch_stats = accuracy_stats(predicted, common.local_rows(batch['target_box'])[real])
      stats = {k: stats[k] + batch_stats[k] for k in stats}
      ids = {k: v[index] for k, v in self.ids.items()}
      records += [dict(record, _index=int(i)) for record, i in
                  zip(prediction_records(ids, regions, predicted), index)]
    stats = common.process_sum(stats)
    common.write_prediction_parts(self.prediction_path(step), records)
    yield from gqa.summary(stats).items()


# ----------------------------------------------------------------------------
# The task interface (`vlpjax.tasks`).


def configure(config: ml_collections.ConfigDict, size: str) -> None:
  """Makes `config` a referring-expression run: `config.refexp`,
  `data.refexp_dataset` and `data.gt_images_dataset`, the design's recipe
  (RECIPES) and expression length at base (the world's VQA recipe and length
  for 'small'/'tiny'), evaluators of type 'refexp': on the world validation
  (every 200 steps) and test (at the end), each on detected and on
  ground-truth regions; at base RefCOCO/RefCOCO+'s val (every 5,000 steps),
  testA and testB (at the end), on detected regions (for RefCOCOg's umd
  splits, give `config.evals` val and test)."""
  world = vqa.configure_finetuning(config, size, 'refexp', default_refexp_config(), RECIPES,
                                   TEXT_LENGTHS)
  config.data.refexp_dataset = ml_collections.config_dict.placeholder(str)
  config.data.gt_images_dataset = ml_collections.config_dict.placeholder(str)
  # Evaluators of their own (on which regions, testA/testB at base) replace the val/test pair.
  steps = config.train.num_steps
  batch = vqa.WORLD_EVAL_BATCH if world else 512
  entry = lambda split, log_steps, regions='detected': dict(
      type=EVAL_TYPE, split=split, batch_size=batch, log_steps=log_steps, regions=regions)
  if world:
    evals = dict(refexp_val=entry('validation', 200), refexp_val_gt=entry('validation', 200, 'gt'),
                 refexp_test=entry('test', steps), refexp_test_gt=entry('test', steps, 'gt'))
  else:
    evals = dict(refexp_val=entry('validation', 5_000), refexp_testA=entry('testA', steps),
                 refexp_testB=entry('testB', steps))
  config.evals = ml_collections.ConfigDict(evals)


def _uses_gt_regions(config: ml_collections.ConfigDict) -> bool:
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  return resolve_train_regions(config) != 'detected' or any(
      e.get('regions', 'detected') == 'gt' for _, e in common.evaluator_configs(config.evals))


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the model against the data (and the ground-truth regions table's
  feature width when it is used) and the `config.refexp` choices."""
  vqa.check_model_against_data(config)
  resolve_head(config)
  resolve_loss(config)
  if _uses_gt_regions(config):
    source = tables.open_table(config.data, GT_IMAGES, config.data.images_split)
    width = source.dataset_info.features['features'].shape[-1]
    if width != config.model.feature_dim:
      raise ValueError(f'config.model.feature_dim={config.model.feature_dim} but the '
                       f'ground-truth regions table {tables.table_name(config.data, GT_IMAGES)} '
                       f'has features of width {width}')
  return config


def make_model(config: ml_collections.ConfigDict) -> RefexpModel:
  """The design's backbone with its region-scoring head."""
  return build_model(config)


def make_train_iterator(config: ml_collections.ConfigDict, mesh: Mesh
                        ) -> input_pipeline.PretrainingIterator:
  """Endless, resumable batches of `config.refexp.train_split` on the training regions."""
  split, regions = config.refexp.train_split, resolve_train_regions(config)
  examples = open_examples(config.data, config.model.name, split=split, regions=regions)
  region_tables = [tables.table_name(config.data, t) for t in
                   {'detected': ['images'], 'gt': [GT_IMAGES],
                    'mixed': ['images', GT_IMAGES]}[regions]]
  return vqa.task_train_iterator(config, mesh, examples, split, TABLE, regions=regions,
                                 region_tables=region_tables)


def objectives(config: ml_collections.ConfigDict) -> list[str]:
  """One compiled step: the region loss."""
  del config
  return [TABLE]


objective_for_step = vqa.objective_for_step


def make_inputs(config: ml_collections.ConfigDict, batch: Mapping[str, jax.Array],
                rng: jax.Array, objective: str
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """RefexpModel kwargs (features widened to float32) and the region targets."""
  del config, rng, objective
  kwargs = {k: batch[k] for k in MODEL_INPUT_KEYS}
  kwargs['region_feats'] = kwargs['region_feats'].astype(jnp.float32)
  targets = {k: batch[k] for k in ('target_region', 'region_iou', 'candidate_mask')}
  return kwargs, targets


def compute_losses(config: ml_collections.ConfigDict, outputs: Mapping[str, jax.Array],
                   targets: Mapping[str, jax.Array], objective: str
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The design's loss (`resolve_loss`) and the batch's accuracy (IoU of the
  best-scoring region > 0.5)."""
  del objective
  kind = resolve_loss(config)
  scores = outputs['scores']
  if kind == 'ce':
    loss = ce_loss(scores, targets['target_region'])
  else:
    loss = bce_loss(scores, targets['region_iou'], targets['candidate_mask'])
  picked_iou = jnp.take_along_axis(targets['region_iou'], predict(scores)[:, None], axis=-1)
  accuracy = mean((picked_iou > CORRECT_IOU).astype(jnp.float32))
  return loss, {kind: loss, 'train_accuracy': accuracy}


flops_per_example = vqa.flops_per_example


def inference_files(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """None: the run's config and vocabulary are all inference needs."""
  del config
  return {}


def init_heads(config: ml_collections.ConfigDict, params: Mapping[str, Any],
               abstract_params: Mapping[str, Any]) -> Mapping[str, Any]:
  """The region head starts fresh (no pretraining head scores regions for text)."""
  del config, abstract_params
  return params


class RefexpPredictor:
  """Finds the region each expression names in an image of your own features
  (`vlpjax.load`).

  Attributes:
    config: the run's config; model: the RefexpModel; params: its params
    (first device); step: the checkpoint's step.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, step: int | None):
    self.config = config
    self.design = design_lib.get_design(config.model.name)
    self.tokenizer = vqa.run_tokenizer(config, workdir)
    self.model = build_model(config)
    self.params, self.step, self._scores = vqa.restore_for_inference(
        self.model, self.inputs(['?'], *vqa.blank_image(config)), workdir, step, 'scores')

  def inputs(self, expressions: Sequence[str], features: np.ndarray, boxes: np.ndarray,
             image_size: tuple[float, float]) -> dict[str, np.ndarray]:
    """Model inputs for `expressions` [Q] about one image (`vqa.image_regions`)."""
    regions = vqa.image_regions(self.config, self.design, features, boxes, image_size,
                                len(expressions))
    return dict(self.tokenizer.encode(list(expressions)), **regions)

  def locate(self, expressions: Sequence[str], features: np.ndarray, boxes: np.ndarray,
             image_size: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The region each expression names: (indices into `boxes` int32 [Q], their
    boxes float32 [Q, 4]); features [N, F], boxes [N, 4] (x1, y1, x2, y2 in
    pixels), image_size (width, height)."""
    scores = self._scores(self.params, self.inputs(expressions, features, boxes, image_size))
    regions = np.asarray(predict(scores))
    return regions, np.asarray(boxes, np.float32)[regions]


def predictor(config: ml_collections.ConfigDict, workdir: str, step: int | None
              ) -> RefexpPredictor:
  """`vlpjax.load`'s object for a referring-expression run."""
  return RefexpPredictor(config, workdir, step)


def make_evaluators(config: ml_collections.ConfigDict, model: RefexpModel, mesh: Mesh,
                    workdir: str) -> list[RefexpEvaluator]:
  """The `config.evals` entries (all of type 'refexp')."""
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  return common.build_evaluators(config, 'refexp', {EVAL_TYPE: RefexpEvaluator}, model, mesh,
                                 workdir)
