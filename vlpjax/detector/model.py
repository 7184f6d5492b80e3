"""The bottom-up-attention Faster R-CNN (ResNet-101 C4, Visual Genome) in Flax.

The detector that produced the region features all four designs read: a
Caffe-style ResNet-101 C4 backbone (stride in the 1x1 conv, frozen batch norm
as an affine map, ceil-mode max pool), an RPN (12 anchors per position at
stride 16), RoI max pooling 14x14 at 1/16, the res5 stage per region, mean
pooling to a 2048-d feature, a 1,601-way classifier with class-specific box
deltas and an attribute head (embedding of the predicted class concatenated
with the feature -> 512 -> 401).

Numerics follow HuggingFace's port (`lxmert/modeling_frcnn.py`, = mmf's
extractor, weights `unc-nlp/frcnn-vg-finetuned`): class and attribute columns
put background / "no attribute" LAST, torchvision's NMS (IoU > threshold
suppresses, no +1 in areas) and RoIPool rounding. Where that port differs from
the Caffe original, `DetectorConfig` has a switch (see its docstring).

Static shapes throughout, so the whole detector jits: images come padded to
one size [B, H, W, 3] with their true sizes [B, 2]; every image gets exactly
`rpn_post_nms_topk` proposal slots and `max_boxes` output slots, with validity
masks where fewer are real. Layout is NHWC ([B, H, W, C]); boxes are
(x1, y1, x2, y2) in input-image pixels unless a docstring says otherwise.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Any

SELECTIONS = ('generate_tsv', 'hf')
# res4 is 1/16 of the input: the stem's conv and pool, res3 and res4 each halve it.
FEATURE_STRIDE = 16
# dw, dh clamp of detectron2's Box2BoxTransform: a 16-pixel box grows to 1000 at most.
BOX_SCALE_CLAMP = math.log(1000.0 / 16)


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
  """Architecture and inference settings; defaults are the published model's.

  Switches (the Caffe original is bottom-up-attention's
  `models/vg/ResNet-101/faster_rcnn_end2end_final/test.prototxt` and
  `tools/generate_tsv.py`; the port is HF's `modeling_frcnn.py`):

  * `res5_dilation`: 2 (both the Caffe test.prototxt, whose res5a has stride 1
    and dilation-2 3x3 convs, and the port's `RES5HALVE: False`): res5 keeps
    the 14x14 pooled grid; 1: detectron2's standard res5 (`RES5HALVE: True`,
    stride 2 in the first block, no dilation, 7x7 per region).
  * `selection`, where the port and the original differ: 'generate_tsv' (the
    original features): per-class NMS over the proposals, best surviving class
    confidence per region, threshold, `min_boxes`..`max_boxes`, and the saved
    boxes are the proposals; 'hf' (the port's `do_nms`): one class-agnostic NMS
    over each region's regressed box of its best class, no score threshold, at
    most `max_boxes`, and the saved boxes are the regressed ones. For it,
    `nms_threshold` and `min_boxes` / `max_boxes` play the port's
    ROI_HEADS.NMS_THRESH_TEST and MIN_/MAX_DETECTIONS (set them from the
    checkpoint's config.yaml; the parity fixtures use 0.6, 2, 10).
  * `caffe_maxpool`: True: Caffe's stem pool (kernel 3, stride 2, no padding,
    ceil mode; the port's `MAX_POOL: True`); False: the padded floor-mode pool
    (`MAX_POOL: False`).

  Anchors are detectron2's (size^2 areas, ratio h/w, centred on the cell
  corner with `anchor_offset` 0), as the port builds them; the Caffe proposal
  layer generates its own (scales 4, 8, 16, 32 at stride 16), not offered here.
  RoI pooling needs no switch: Caffe's ROIPooling layer and torchvision's
  RoIPool share their arithmetic (C-rounded scaled corners, +1 extent, float
  bins of floor/ceil bounds), which `roi_pool` reproduces.
  """
  # Backbone (ResNet C4: stem, res2-res4; res5 runs per region).
  stage_blocks: tuple[int, int, int, int] = (3, 4, 23, 3)
  stem_channels: int = 64
  res2_channels: int = 256
  width_per_group: int = 64
  stride_in_1x1: bool = True
  caffe_maxpool: bool = True
  norm_eps: float = 1e-5
  res5_dilation: int = 2
  # Preprocessing: BGR pixels in [0, 255] minus these means; short side, long side cap.
  pixel_mean: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)
  min_size: int = 600
  max_size: int = 1000
  # RPN.
  rpn_hidden: int = 512
  anchor_sizes: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)
  anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
  anchor_offset: float = 0.0
  rpn_box_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
  rpn_pre_nms_topk: int = 6000
  rpn_post_nms_topk: int = 300
  rpn_nms_threshold: float = 0.7
  rpn_min_box_size: float = 0.0
  # RoI heads.
  pooler_resolution: int = 14
  num_classes: int = 1600
  num_attributes: int = 400
  roi_box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
  # Regions pooled and run through res5 at a time: bounds their memory.
  roi_batch: int = 64
  # Selection (see the class docstring).
  selection: str = 'generate_tsv'
  nms_threshold: float = 0.3
  score_threshold: float = 0.2
  min_boxes: int = 10
  max_boxes: int = 100

  def __post_init__(self):
    if self.selection not in SELECTIONS:
      raise ValueError(f'selection must be one of {SELECTIONS}, got {self.selection!r}')
    if self.res5_dilation not in (1, 2):
      raise ValueError(f'res5_dilation must be 1 or 2, got {self.res5_dilation}')
    if not 0 < self.min_boxes <= self.max_boxes:
      raise ValueError(f'need 0 < min_boxes <= max_boxes, got {self.min_boxes}, '
                       f'{self.max_boxes}')

  @property
  def num_anchors(self) -> int:
    return len(self.anchor_sizes) * len(self.anchor_ratios)

  @property
  def res5_channels(self) -> int:
    """The region feature's width: 8x res2's (2048)."""
    return self.res2_channels * 8

  def replace(self, **changes) -> DetectorConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def tiny(cls, **changes) -> DetectorConfig:
    """The parity fixtures' config (tests/data/frcnn): the architecture (block
    counts, C4, RPN, RoIPool, dilated res5, heads) at small widths and sizes."""
    return cls(**{**dict(stem_channels=8, res2_channels=16, width_per_group=4,
                         min_size=96, max_size=128, rpn_hidden=32,
                         anchor_sizes=(16.0, 32.0, 64.0, 96.0), rpn_pre_nms_topk=200,
                         rpn_post_nms_topk=50, num_classes=20, num_attributes=12,
                         roi_batch=16, min_boxes=2, max_boxes=10), **changes})


# ----------------------------------------------------------------------------------
# Layers.


class FrozenBatchNorm(nn.Module):
  """Batch norm in inference form: (x - mean) / sqrt(var + eps) * scale + bias over
  the last axis; the four [C] params are torch's weight, bias, running_mean, running_var."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones_init(), (channels,))
    bias = self.param('bias', nn.initializers.zeros_init(), (channels,))
    mean = self.param('mean', nn.initializers.zeros_init(), (channels,))
    var = self.param('var', nn.initializers.ones_init(), (channels,))
    # One scale and one shift per channel.
    alpha = scale * jax.lax.rsqrt(var + self.eps)
    return x * alpha + (bias - mean * alpha)


class ConvNorm(nn.Module):
  """Bias-free conv (kernel [kh, kw, in, out]) then FrozenBatchNorm `norm`:
  [N, H, W, in] -> [N, H', W', out], torch's symmetric padding `padding`."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.he_normal(),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(self.stride, self.stride),
        padding=((self.padding, self.padding),) * 2,
        rhs_dilation=(self.dilation, self.dilation),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return FrozenBatchNorm(self.eps, name='norm')(y)


class Bottleneck(nn.Module):
  """ResNet bottleneck 1x1 -> 3x3 -> 1x1 with a projection `shortcut` when the
  width changes; [N, H, W, in] -> [N, H/stride, W/stride, out]. Caffe style
  (`stride_in_1x1`) strides the first 1x1 conv, torchvision style the 3x3."""
  out_channels: int
  bottleneck_channels: int
  stride: int = 1
  dilation: int = 1
  stride_in_1x1: bool = True
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    stride_1x1, stride_3x3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    shortcut = x
    if x.shape[-1] != self.out_channels:
      shortcut = ConvNorm(self.out_channels, 1, self.stride, eps=self.eps, name='shortcut')(x)
    y = nn.relu(ConvNorm(self.bottleneck_channels, 1, stride_1x1, eps=self.eps,
                         name='conv1')(x))
    y = nn.relu(ConvNorm(self.bottleneck_channels, 3, stride_3x3, padding=self.dilation,
                         dilation=self.dilation, eps=self.eps, name='conv2')(y))
    y = ConvNorm(self.out_channels, 1, eps=self.eps, name='conv3')(y)
    return nn.relu(y + shortcut)


def max_pool_stem(x: jax.Array, caffe: bool) -> jax.Array:
  """The stem's 3x3 stride-2 max pool over [N, H, W, C]: Caffe's ceil mode without
  padding (windows may run past the bottom/right edge), or torch's pad-1 floor mode."""
  if caffe:
    pads = [(0, max(0, -(-(size - 3) // 2) * 2 + 3 - size)) for size in x.shape[1:3]]
  else:
    pads = [(1, 1), (1, 1)]
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               [(0, 0)] + pads + [(0, 0)])


class ResNetC4(nn.Module):
  """Stem (7x7 stride-2 conv, max pool) and res2-res4: [B, H, W, 3] -> res4
  [B, ~H/16, ~W/16, 4 * res2_channels]. Submodules `stem`, `res{2,3,4}_{i}`."""
  config: DetectorConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    config = self.config
    x = nn.relu(ConvNorm(config.stem_channels, 7, 2, padding=3, eps=config.norm_eps,
                         name='stem')(images))
    x = max_pool_stem(x, config.caffe_maxpool)
    out_channels, bottleneck = config.res2_channels, config.width_per_group
    for stage, num_blocks in zip((2, 3, 4), config.stage_blocks[:3]):
      for index in range(num_blocks):
        stride = 2 if index == 0 and stage > 2 else 1
        x = Bottleneck(out_channels, bottleneck, stride, stride_in_1x1=config.stride_in_1x1,
                       eps=config.norm_eps, name=f'res{stage}_{index}')(x)
      out_channels, bottleneck = out_channels * 2, bottleneck * 2
    return x


class Res5Head(nn.Module):
  """res5 on pooled regions, then the spatial mean: [N, P, P, C4] -> [N, 8 * res2].

  With `res5_dilation` 2 (the Caffe model and HF's port) the first block does
  not stride and all 3x3 convs dilate by 2; with 1 it is the plain stride-2 stage. The (carry,
  regions) -> (carry, features) signature lets `nn.scan` run it over chunks.
  """
  config: DetectorConfig

  @nn.compact
  def __call__(self, carry: Any, pooled: jax.Array) -> tuple[Any, jax.Array]:
    config = self.config
    dilation = config.res5_dilation
    x = pooled
    for index in range(config.stage_blocks[3]):
      stride = 2 if index == 0 and dilation == 1 else 1
      x = Bottleneck(config.res5_channels, config.width_per_group * 8, stride,
                     dilation=dilation, stride_in_1x1=config.stride_in_1x1,
                     eps=config.norm_eps, name=f'block_{index}')(x)
    return carry, x.mean(axis=(1, 2))


class BoxPredictor(nn.Module):
  """Per-region heads: [N, D] -> class logits [N, K+1] (background last), class
  box deltas [N, 4K] and attribute logits [N, A+1] ("no attribute" last).

  The attribute head embeds the argmax of all K+1 class logits (background
  included, as the port does), concatenates it with the feature (D + D/8),
  then Dense(D/4) -> ReLU -> Dense(A+1)."""
  config: DetectorConfig

  @nn.compact
  def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    config = self.config
    width = features.shape[-1]
    class_logits = nn.Dense(config.num_classes + 1, name='cls_score')(features)
    box_deltas = nn.Dense(config.num_classes * 4, name='bbox_pred')(features)
    predicted = jnp.argmax(class_logits, axis=-1)
    embedded = nn.Embed(config.num_classes + 1, width // 8, name='cls_embedding')(predicted)
    hidden = nn.relu(nn.Dense(width // 4, name='fc_attr')(
        jnp.concatenate([features, embedded], axis=-1)))
    attribute_logits = nn.Dense(config.num_attributes + 1, name='attr_score')(hidden)
    return class_logits, box_deltas, attribute_logits


class RPNHead(nn.Module):
  """3x3 conv (+ReLU) then 1x1 convs: [B, h, w, C] -> objectness [B, h, w, A] and
  anchor deltas [B, h, w, A, 4] (torch's channel a*4 + k is anchor a, coordinate k)."""
  config: DetectorConfig

  @nn.compact
  def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    config = self.config
    hidden = nn.relu(nn.Conv(config.rpn_hidden, (3, 3), padding=((1, 1), (1, 1)),
                             name='conv')(features))
    objectness = nn.Conv(config.num_anchors, (1, 1), name='objectness_logits')(hidden)
    deltas = nn.Conv(config.num_anchors * 4, (1, 1), name='anchor_deltas')(hidden)
    return objectness, deltas.reshape(deltas.shape[:-1] + (config.num_anchors, 4))


# ----------------------------------------------------------------------------------
# Boxes.


def cell_anchors(config: DetectorConfig) -> np.ndarray:
  """The A anchors around one position, [A, 4] float32: sizes outer, ratios inner
  (ratio = h / w), each of area size^2, centred on 0."""
  anchors = []
  for size in config.anchor_sizes:
    for ratio in config.anchor_ratios:
      width = math.sqrt(size ** 2 / ratio)
      height = ratio * width
      anchors.append([-width / 2, -height / 2, width / 2, height / 2])
  return np.asarray(anchors, np.float32)


def grid_anchors(config: DetectorConfig, height: int, width: int) -> np.ndarray:
  """All anchors of an h x w feature map, [h * w * A, 4] float32, position-major
  (row, column, anchor) as the RPN's outputs are flattened."""
  shifts_x = np.arange(width, dtype=np.float32) * FEATURE_STRIDE + np.float32(
      config.anchor_offset * FEATURE_STRIDE)
  shifts_y = np.arange(height, dtype=np.float32) * FEATURE_STRIDE + np.float32(
      config.anchor_offset * FEATURE_STRIDE)
  shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing='ij')
  shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4)
  return (shifts + cell_anchors(config)[None]).reshape(-1, 4)


def decode_boxes(deltas: jax.Array, boxes: jax.Array,
                 weights: Sequence[float]) -> jax.Array:
  """Applies (dx, dy, dw, dh) `deltas` [..., 4] to `boxes` [..., 4] (broadcast),
  dividing by `weights` and clamping dw, dh at log(1000/16)."""
  widths = boxes[..., 2] - boxes[..., 0]
  heights = boxes[..., 3] - boxes[..., 1]
  center_x = boxes[..., 0] + 0.5 * widths
  center_y = boxes[..., 1] + 0.5 * heights
  wx, wy, ww, wh = weights
  dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, BOX_SCALE_CLAMP)
  dh = jnp.minimum(deltas[..., 3] / wh, BOX_SCALE_CLAMP)
  new_x, new_y = dx * widths + center_x, dy * heights + center_y
  new_w, new_h = jnp.exp(dw) * widths, jnp.exp(dh) * heights
  return jnp.stack([new_x - 0.5 * new_w, new_y - 0.5 * new_h,
                    new_x + 0.5 * new_w, new_y + 0.5 * new_h], axis=-1)


def clip_boxes(boxes: jax.Array, image_size: jax.Array) -> jax.Array:
  """Clips boxes [..., 4] to an image of `image_size` (h, w), broadcastable to
  boxes[..., :2]."""
  image_size = jnp.asarray(image_size, boxes.dtype)
  upper = jnp.stack([image_size[..., 1], image_size[..., 0]] * 2, axis=-1)
  return jnp.clip(boxes, 0.0, upper)


def box_iou(boxes: jax.Array) -> jax.Array:
  """IoU of every pair of `boxes` [N, 4] -> [N, N], as torchvision computes it
  (areas without +1; an empty union gives 0/0, which no `>` test passes)."""
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  top_left = jnp.maximum(boxes[:, None, :2], boxes[None, :, :2])
  bottom_right = jnp.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
  size = jnp.maximum(bottom_right - top_left, 0.0)
  inter = size[..., 0] * size[..., 1]
  return inter / (area[:, None] + area[None, :] - inter)


def nms_mask(boxes: jax.Array, scores: jax.Array, valid: jax.Array, threshold: float,
             max_keep: int | None = None) -> jax.Array:
  """Greedy NMS as torchvision's `nms`: a box survives unless a higher-scoring
  surviving box overlaps it with IoU > `threshold` (strictly).

  Args:
    boxes: [N, 4]; scores: [N]; valid: [N] bool, invalid boxes never survive
      nor suppress.
    threshold: the IoU above which the lower-scoring box is dropped.
    max_keep: stop once this many survive (the rest read as not kept).

  Returns:
    [N] bool, which boxes survive. Equal scores rank the lower index first (the
    stable descending sort of torchvision's CPU kernel).
  """
  num = boxes.shape[0]
  max_keep = num if max_keep is None else max_keep
  order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
  # IoU of the boxes in their own order: under a vmap over score columns (the
  # per-class NMS) only `order` differs, so the [N, N] matrix is built once.
  overlaps = box_iou(boxes) > threshold

  def body(state):
    rank, keep, count = state
    index = order[rank]
    kept = valid[index] & ~jnp.any(keep & overlaps[:, index])
    return rank + 1, keep.at[index].set(kept), count + kept.astype(jnp.int32)

  def cond(state):
    rank, _, count = state
    return (rank < num) & (count < max_keep)

  _, keep, _ = jax.lax.while_loop(cond, body, (0, jnp.zeros(num, bool), 0))
  return keep


def nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array, threshold: float,
        max_keep: int) -> tuple[jax.Array, jax.Array]:
  """`nms_mask`'s survivors in descending score order, in `max_keep` slots:
  (indices [max_keep] int32, valid [max_keep] bool); empty slots hold index 0."""
  keep = nms_mask(boxes, scores, valid, threshold, max_keep)
  ranked = jnp.where(keep, -scores, jnp.inf)
  order = jnp.argsort(ranked, stable=True)[:max_keep]
  kept = keep[order]
  if order.shape[0] < max_keep:  # fewer boxes than slots
    order = jnp.pad(order, (0, max_keep - order.shape[0]))
    kept = jnp.pad(kept, (0, max_keep - kept.shape[0]))
  return jnp.where(kept, order, 0).astype(jnp.int32), kept


def round_half_away(x: jax.Array) -> jax.Array:
  """C's round(): halves away from zero (jnp.round rounds them to even)."""
  return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def _bin_tables(largest: int, output_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Bin bounds of RoIPool for every region extent 0..`largest` cells, [E+1, P]
  int32 each: floor(i * bin) and ceil((i + 1) * bin), bin = extent / P, all in
  float32 as torchvision's kernel. Tabled in numpy because XLA turns a division
  by a broadcast scalar into a multiplication by its reciprocal, whose rounding
  moves a bin edge whenever (i + 1) * bin lands on an integer."""
  extent = np.arange(largest + 1, dtype=np.float32)[:, None]
  bin_size = extent / np.float32(output_size)
  steps = np.arange(output_size, dtype=np.float32)[None]
  lower = np.floor(steps * bin_size).astype(np.int32)
  upper = np.ceil((steps + np.float32(1)) * bin_size).astype(np.int32)
  return lower, upper


def roi_pool(features: jax.Array, boxes: jax.Array, spatial_scale: float,
             output_size: int, max_bin_extent: int | None = None,
             roi_batch: int | None = None) -> jax.Array:
  """RoI max pooling exactly as torchvision's RoIPool (and Caffe's ROIPooling).

  Box corners scaled by `spatial_scale` round half away from zero; the region
  spans end - start + 1 cells (at least 1), split into `output_size` bins of
  [floor(i * bin), ceil((i + 1) * bin)), clipped to the map; an empty bin is 0.

  Args:
    features: [H, W, C] one image's map.
    boxes: [R, 4] (x1, y1, x2, y2) in input pixels.
    spatial_scale: map cells per input pixel (1/16).
    output_size: P.
    max_bin_extent: cells a bin may span, a static bound for the gather; None
      suffices for boxes whose scaled corners round to within [0, map size]
      (true of proposals clipped to the image), for which the result is
      exact. Larger boxes have their extent capped at max(H, W) + 1 cells.
    roi_batch: regions gathered at once (`jax.lax.map` batch); None: all. Each
      holds P * K * W * C floats in flight.

  Returns:
    [R, P, P, C].
  """
  height, width, _ = features.shape
  scaled = boxes.astype(jnp.float32) * jnp.float32(spatial_scale)
  start = round_half_away(scaled[:, :2]).astype(jnp.int32)  # [R, 2] (x, y)
  end = round_half_away(scaled[:, 2:]).astype(jnp.int32)
  largest = max(height, width) + 1
  extent = jnp.clip(end - start + 1, 1, largest)
  bin_lower, bin_upper = (jnp.asarray(t) for t in _bin_tables(largest, output_size))
  limits = jnp.array([width, height], jnp.int32)
  lower = jnp.clip(bin_lower[extent].swapaxes(1, 2) + start[:, None, :], 0, limits)  # [R, P, 2]
  upper = jnp.clip(bin_upper[extent].swapaxes(1, 2) + start[:, None, :], 0, limits)
  if max_bin_extent is None:
    max_bin_extent = -(-largest // output_size) + 1
  max_bin_extent = min(max_bin_extent, max(height, width))
  offsets = jnp.arange(max_bin_extent)
  cells = lower[..., None] + offsets  # [R, P, 2, K]
  inside = cells < upper[..., None]

  def pool_one(args):
    cells_one, inside_one = args  # [P, 2, K]
    rows = jnp.minimum(cells_one[:, 1], height - 1)  # [P, K]
    cols = jnp.minimum(cells_one[:, 0], width - 1)
    # Max over each bin's rows, then its columns: a rectangle's max is separable.
    by_rows = jnp.where(inside_one[:, 1, :, None, None], features[rows], -jnp.inf)
    by_rows = by_rows.max(axis=1)  # [P, W, C]
    by_cols = jnp.where(inside_one[None, :, 0, :, None], by_rows[:, cols], -jnp.inf)
    pooled = by_cols.max(axis=2)  # [P(rows), P(cols), C]
    empty = ~(inside_one[:, 1, 0][:, None] & inside_one[:, 0, 0][None, :])
    return jnp.where(empty[..., None], 0.0, pooled)

  return jax.lax.map(pool_one, (cells, inside), batch_size=roi_batch)


# ----------------------------------------------------------------------------------
# Proposals and selection.


def top_proposals(config: DetectorConfig, objectness: jax.Array, decoded: jax.Array,
                  image_sizes: jax.Array) -> dict[str, jax.Array]:
  """The RPN's proposals for each image: the `rpn_pre_nms_topk` best anchors,
  clipped, boxes of a side <= `rpn_min_box_size` dropped, NMS at
  `rpn_nms_threshold`, the first `rpn_post_nms_topk` survivors.

  Args:
    objectness: [B, N] logits; decoded: [B, N, 4] boxes; image_sizes: [B, 2] (h, w).

  Returns:
    boxes [B, P, 4], scores [B, P] (logits), valid [B, P] bool, best first.
  """
  num_candidates = min(config.rpn_pre_nms_topk, objectness.shape[1])

  def one_image(logits, boxes, image_size):
    scores, index = jax.lax.top_k(logits, num_candidates)
    boxes = clip_boxes(boxes[index], image_size)
    sides = boxes[:, 2:] - boxes[:, :2]
    nonempty = jnp.all(sides > config.rpn_min_box_size, axis=-1)
    keep, valid = nms(boxes, scores, nonempty, config.rpn_nms_threshold,
                      config.rpn_post_nms_topk)
    return (jnp.where(valid[:, None], boxes[keep], 0.0), jnp.where(valid, scores[keep], 0.0),
            valid)

  boxes, scores, valid = jax.vmap(one_image)(objectness, decoded, image_sizes)
  return dict(boxes=boxes, scores=scores, valid=valid)


def _gather_slots(index: jax.Array, valid: jax.Array, **arrays: jax.Array
                  ) -> dict[str, jax.Array]:
  """arrays[k][index] for one image, zeroed in invalid slots."""
  out = {}
  for name, array in arrays.items():
    picked = array[index]
    mask = valid.reshape(valid.shape + (1,) * (picked.ndim - 1))
    out[name] = jnp.where(mask, picked, jnp.zeros((), picked.dtype))
  return out


def select_hf(config: DetectorConfig, proposals: jax.Array, proposal_valid: jax.Array,
              class_logits: jax.Array, box_deltas: jax.Array, attribute_logits: jax.Array,
              features: jax.Array, image_sizes: jax.Array, scales_yx: jax.Array
              ) -> dict[str, jax.Array]:
  """HF's `do_nms` selection for a batch (see `DetectorConfig`): shapes as `select`.

  The port fails on an image with fewer than `min_boxes` survivors; here it
  returns them all (`num_boxes` < `min_boxes`)."""

  def one_image(boxes, valid, logits, deltas, attr_logits, feats, size, scale):
    probs = jax.nn.softmax(logits, axis=-1)[:, :-1]
    best_class = jnp.argmax(probs, axis=-1)
    best_score = jnp.max(probs, axis=-1)
    regressed = decode_boxes(deltas.reshape(deltas.shape[0], -1, 4), boxes[:, None],
                             config.roi_box_weights)
    regressed = clip_boxes(regressed, size)
    best_box = jnp.take_along_axis(regressed, best_class[:, None, None], axis=1)[:, 0]
    keep, kept = nms(best_box, best_score, valid, config.nms_threshold, config.max_boxes)
    attr_probs = jax.nn.softmax(attr_logits[:, :-1], axis=-1)
    scale_xy = jnp.stack([scale[1], scale[0]] * 2)
    out = _gather_slots(keep, kept, boxes=best_box * scale_xy, classes=best_class,
                        scores=best_score, attributes=jnp.argmax(attr_probs, axis=-1),
                        attribute_scores=jnp.max(attr_probs, axis=-1), features=feats,
                        class_probs=jax.nn.softmax(logits, axis=-1))
    return dict(out, valid=kept, num_boxes=kept.sum().astype(jnp.int32))

  return jax.vmap(one_image)(proposals, proposal_valid, class_logits, box_deltas,
                             attribute_logits, features, image_sizes, scales_yx)


def select_generate_tsv(config: DetectorConfig, proposals: jax.Array,
                        proposal_valid: jax.Array, class_logits: jax.Array,
                        attribute_logits: jax.Array, features: jax.Array,
                        scales_yx: jax.Array) -> dict[str, jax.Array]:
  """bottom-up-attention's `generate_tsv.py` selection for a batch (shapes as `select`).

  For every object class, NMS at `nms_threshold` over the proposals with that
  class's probability; a region's confidence is the best probability among the
  classes it survived for. Regions with confidence >= `score_threshold` are kept
  in proposal order; if fewer than `min_boxes` (more than `max_boxes`), the
  `min_boxes` (`max_boxes`) most confident, most confident first. Boxes are the
  proposals mapped to the original image, object ids and attribute ids the
  argmax over the real classes / attributes of the full softmax (background and
  "no attribute", the last columns, left out), as generate_tsv reads them.
  Equal confidences order as numpy's `argsort(...)[::-1]` with a stable sort:
  the higher index first.
  """
  num_classes = config.num_classes

  def one_image(boxes, valid, logits, attr_logits, feats, scale):
    probs = jax.nn.softmax(logits, axis=-1)
    survives = jax.vmap(lambda s: nms_mask(boxes, s, valid, config.nms_threshold),
                        in_axes=1, out_axes=1)(probs[:, :num_classes])
    confidence = jnp.max(jnp.where(survives, probs[:, :num_classes], 0.0), axis=-1)
    confidence = jnp.where(valid, confidence, -1.0)
    above = valid & (confidence >= config.score_threshold)
    num_above = above.sum()
    num_valid = valid.sum()
    num_regions = boxes.shape[0]
    # Stable ascending then reversed: most confident first, ties the higher index first.
    by_confidence = jnp.argsort(confidence, stable=True)[::-1]
    in_order = jnp.argsort(~above, stable=True)  # the regions above, in proposal order
    slots = min(config.max_boxes, num_regions)
    ranked = jnp.where(num_above > config.max_boxes, by_confidence[:slots],
                       jnp.where(num_above < config.min_boxes, by_confidence[:slots],
                                 in_order[:slots]))
    count = jnp.clip(num_above, config.min_boxes, config.max_boxes)
    count = jnp.minimum(count, num_valid)
    kept = jnp.arange(slots) < count
    if slots < config.max_boxes:
      ranked = jnp.pad(ranked, (0, config.max_boxes - slots))
      kept = jnp.pad(kept, (0, config.max_boxes - slots))
    attr_probs = jax.nn.softmax(attr_logits, axis=-1)[:, :-1]
    scale_xy = jnp.stack([scale[1], scale[0]] * 2)
    out = _gather_slots(ranked, kept, boxes=boxes * scale_xy,
                        classes=jnp.argmax(probs[:, :num_classes], axis=-1),
                        scores=jnp.max(probs[:, :num_classes], axis=-1),
                        attributes=jnp.argmax(attr_probs, axis=-1),
                        attribute_scores=jnp.max(attr_probs, axis=-1), features=feats,
                        class_probs=probs, confidence=confidence)
    return dict(out, valid=kept, num_boxes=count.astype(jnp.int32))

  return jax.vmap(one_image)(proposals, proposal_valid, class_logits, attribute_logits,
                             features, scales_yx)


# ----------------------------------------------------------------------------------
# The detector.


class FasterRCNN(nn.Module):
  """The whole detector: padded images -> regions, with static shapes.

  Submodules: `backbone` (ResNetC4), `rpn_head`, `res5` (Res5Head),
  `box_predictor`; `vlpjax.detector.weights` maps them to the HF keys.
  """
  config: DetectorConfig

  def setup(self):
    self.backbone = ResNetC4(self.config)
    self.rpn_head = RPNHead(self.config)
    # Regions go through res5 `roi_batch` at a time: all at once would hold
    # B * P * 14 * 14 * 2048 activations per layer.
    self.res5 = nn.scan(Res5Head, variable_broadcast='params', split_rngs={'params': False}
                        )(self.config)
    self.box_predictor = BoxPredictor(self.config)

  def __call__(self, images: jax.Array, image_sizes: jax.Array, scales_yx: jax.Array,
               return_stages: bool = False) -> dict[str, Any]:
    """Detects regions.

    Args:
      images: [B, H, W, 3] float32, BGR minus `pixel_mean`, zero-padded past
        each image's size (`preprocess` makes them).
      image_sizes: [B, 2] int (h, w) of each resized image inside the padding.
      scales_yx: [B, 2] original size / resized size, mapping output boxes back
        to the original pixels.
      return_stages: also return every intermediate (for parity tests; costs
        memory: the pooled regions are [B, P, 14, 14, C]).

    Returns:
      {'regions': the selection, each [B, max_boxes, ...]: boxes [.., 4] in
       original pixels, classes, scores, attributes, attribute_scores,
       features [.., 8 * res2], class_probs [.., K+1], valid bool, and
       num_boxes [B]} plus, with `return_stages`, 'stages': res4 [B, h, w, C4],
       rpn_objectness [B, h, w, A], rpn_deltas [B, h, w, A, 4], rpn_decoded
       [B, h*w*A, 4], proposals / proposal_scores / proposal_valid [B, P, ...],
       roi_pooled [B, P, 14, 14, C4], roi_features [B, P, 8 * res2],
       class_logits [B, P, K+1], box_deltas [B, P, 4K], attribute_logits [B, P, A+1].
    """
    config = self.config
    res4 = self.backbone(images)
    batch, height, width, _ = res4.shape
    objectness, deltas = self.rpn_head(res4)
    anchors = jnp.asarray(grid_anchors(config, height, width))
    decoded = decode_boxes(deltas.reshape(batch, -1, 4), anchors[None], config.rpn_box_weights)
    proposals = top_proposals(config, objectness.reshape(batch, -1), decoded, image_sizes)
    pooled = jax.vmap(lambda f, b: roi_pool(
        f, b, 1.0 / FEATURE_STRIDE, config.pooler_resolution,
        roi_batch=config.roi_batch))(res4, proposals['boxes'])
    flat_pooled = pooled.reshape((-1,) + pooled.shape[2:])
    num_regions = flat_pooled.shape[0]
    chunk = min(config.roi_batch, num_regions)
    padding = -num_regions % chunk
    chunks = jnp.pad(flat_pooled, ((0, padding), (0, 0), (0, 0), (0, 0)))
    _, features = self.res5(None, chunks.reshape((-1, chunk) + chunks.shape[1:]))
    features = features.reshape(-1, features.shape[-1])[:num_regions]
    class_logits, box_deltas, attribute_logits = self.box_predictor(features)
    per_image = lambda x: x.reshape((batch, -1) + x.shape[1:])
    features, class_logits, box_deltas, attribute_logits = map(
        per_image, (features, class_logits, box_deltas, attribute_logits))
    if config.selection == 'hf':
      regions = select_hf(config, proposals['boxes'], proposals['valid'], class_logits,
                          box_deltas, attribute_logits, features, image_sizes, scales_yx)
    else:
      regions = select_generate_tsv(config, proposals['boxes'], proposals['valid'],
                                    class_logits, attribute_logits, features, scales_yx)
    outputs = {'regions': regions}
    if return_stages:
      outputs['stages'] = dict(
          res4=res4, rpn_objectness=objectness, rpn_deltas=deltas, rpn_decoded=decoded,
          proposals=proposals['boxes'], proposal_scores=proposals['scores'],
          proposal_valid=proposals['valid'], roi_pooled=pooled, roi_features=features,
          class_logits=class_logits, box_deltas=box_deltas,
          attribute_logits=attribute_logits)
    return outputs


# ----------------------------------------------------------------------------------
# Preprocessing (host side: images arrive in many sizes).


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
  """The short side to `min_size`, the long side capped at `max_size`, rounded
  half up (detectron2's ResizeShortestEdge)."""
  scale = min_size / min(height, width)
  new_h, new_w = (min_size, scale * width) if height < width else (scale * height, min_size)
  if max(new_h, new_w) > max_size:
    cap = max_size / max(new_h, new_w)
    new_h, new_w = new_h * cap, new_w * cap
  return int(new_h + 0.5), int(new_w + 0.5)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """[H, W, C] -> [height, width, C] float32, as torch's bilinear interpolate with
  align_corners=False and no antialiasing (the port resizes float images so)."""
  image = np.asarray(image, np.float32)

  def taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = np.float32(in_size) / np.float32(out_size)
    source = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    source = np.maximum(source, np.float32(0))
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = np.clip(source - low.astype(np.float32), 0, 1).astype(np.float32)
    return low, high, frac

  y0, y1, fy = taps(image.shape[0], height)
  x0, x1, fx = taps(image.shape[1], width)
  fx = fx[None, :, None]
  top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
  bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
  fy = fy[:, None, None]
  return (top * (1 - fy) + bottom * fy).astype(np.float32)


def preprocess(config: DetectorConfig, images: Sequence[np.ndarray],
               padded_size: tuple[int, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Raw BGR images [h, w, 3] (0-255) -> the detector's inputs.

  Each is resized (`resized_shape`, `resize_bilinear`), has `pixel_mean`
  subtracted and is zero-padded at the bottom/right to `padded_size` (default:
  the largest in the batch, as the port pads; a fixed bucket keeps jit shapes).

  Returns:
    images [B, H, W, 3] float32, image_sizes [B, 2] int32 (h, w), scales_yx
    [B, 2] float32 (original / resized).
  """
  resized, sizes, scales = [], [], []
  mean = np.asarray(config.pixel_mean, np.float32)
  for image in images:
    height, width = image.shape[:2]
    new_h, new_w = resized_shape(height, width, config.min_size, config.max_size)
    resized.append(resize_bilinear(image, new_h, new_w) - mean)
    sizes.append((new_h, new_w))
    scales.append((height / new_h, width / new_w))
  if padded_size is None:
    padded_size = tuple(max(s[i] for s in sizes) for i in range(2))
  if any(s[0] > padded_size[0] or s[1] > padded_size[1] for s in sizes):
    raise ValueError(f'resized images {sizes} do not fit padded_size {padded_size}')
  batch = np.zeros((len(images),) + tuple(padded_size) + (3,), np.float32)
  for index, image in enumerate(resized):
    batch[index, :image.shape[0], :image.shape[1]] = image
  return batch, np.asarray(sizes, np.int32), np.asarray(scales, np.float32)
