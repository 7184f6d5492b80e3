"""A procedural vision-language world: scenes, pixels, detector outputs, features, text.

Everything is a pure function of (`WorldConfig.seed`, image index): each image
draws from its own random streams (`_rng`), so any table can be regenerated
alone and all tables agree on what image i shows.

  Scene        2-7 objects, each a shape (8), colour (10) and size (3) at a
               position; objects never overlap. Scenes reuse a small palette
               of shapes and colours so counting questions have real answers.
  render       RGB uint8 image [H, W, 3]: noisy background with a gradient,
               shaded objects with pixel noise.
  detect       detector-like outputs: jittered ground-truth boxes, duplicate and
               background boxes, noisy class distributions over
               OBJECT_CLASSES (0 = background) with shape confusions, attribute
               labels over ATTRIBUTE_CLASSES (0 = none) with colour confusions,
               confidences; regions sorted by confidence as BUTD detectors do.
  FeatureExtractor
               region features from the pixels inside each box only: each box
               is area-pooled to a grid of RGB + edge means (exact integer
               integral images), then a fixed seeded random projection + ReLU.
  text         captions, VQA questions with ten noisy annotator answers (and
               the same questions with their one true answer, GQA-style),
               referring expressions, NLVR2-style statements about pairs
               of images, SNLI-VE-style entailment statements about one
               (entailment / neutral / contradiction) and VCR-style
               multiple-choice questions with rationales that refer to
               objects by index, from a grammar with attributes and spatial
               relations.

`make_world(config)` builds (and caches) the scenes and all text tables of one
world; `World.image_examples` streams the images table with features.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'ring', 'cross', 'hexagon', 'star')
COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange', 'white', 'gray',
           'cyan', 'pink')
COLOUR_RGB = np.array([
    (215, 40, 40), (40, 170, 60), (45, 80, 220), (230, 210, 50), (135, 55, 185),
    (240, 135, 30), (235, 235, 235), (128, 128, 128), (50, 205, 215), (245, 150, 190),
], np.float32) / 255.0
SIZES = ('small', 'medium', 'large')
# Object radius as a fraction of min(H, W), per size.
SIZE_RADIUS = (0.075, 0.11, 0.15)
OBJECT_CLASSES = ('background',) + SHAPES
ATTRIBUTE_CLASSES = ('none',) + COLOURS
NUMBER_WORDS = ('no', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight',
                'nine', 'ten')
MAX_COUNT = 10
ANSWERS = (('no', 'yes') + tuple(str(n) for n in range(MAX_COUNT + 1)) + COLOURS + SHAPES
           + SIZES)
SPLITS = ('train', 'validation', 'test')
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')

# What a detector (or a careless annotator) mistakes each value for.
SHAPE_CONFUSIONS = {
    'circle': ('ring', 'hexagon'), 'square': ('diamond', 'hexagon'),
    'triangle': ('diamond', 'star'), 'diamond': ('square', 'triangle'),
    'ring': ('circle',), 'cross': ('star',), 'hexagon': ('circle', 'square'),
    'star': ('cross', 'triangle')}
COLOUR_CONFUSIONS = {
    'red': ('orange', 'pink'), 'green': ('cyan', 'yellow'), 'blue': ('purple', 'cyan'),
    'yellow': ('orange', 'green'), 'purple': ('blue', 'pink'), 'orange': ('red', 'yellow'),
    'white': ('gray',), 'gray': ('white',), 'cyan': ('blue', 'green'),
    'pink': ('red', 'purple')}

# Random stream ids: one independent stream per (purpose, item).
_SCENE, _RENDER, _DETECT, _CAPTION, _VQA, _REFEXP, _NLVR2, _PAIRS = range(8)
_ENTAILMENT = 8
_VCR = 9


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, stream, index])


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Sizes and seeds of one world.

  Attributes:
    num_images: images in the images table (all splits together).
    num_regions: most detector boxes per image (R).
    min_regions: fewest boxes per image; equal to num_regions for a fixed count.
    feature_dim: F, the region feature size (2048 mimics the BUTD detector).
    image_height, image_width: inclusive pixel ranges of the image size.
    num_objects: inclusive range of objects per scene.
    captions_per_image, questions_per_image, refexps_per_image: text per image.
    nlvr2_per_image: NLVR2 statements per image of a split (pairs = round(n * this)).
    snli_ve_per_image: entailment statements per image (SNLI-VE-style).
    vcr_per_image: multiple-choice questions per image (VCR-style).
    split_fractions: train/validation/test fractions of the images (contiguous
      index ranges in that order).
    vocab_size: the most WordPiece tokens the vocabulary trainer may make.
    seed: seed of everything except the feature extractor.
    feature_seed: seed of the fixed feature extractor's weights.
    feature_grid: G, each box is pooled to a G x G grid before projection.
    max_annotator_noise: each question's annotators err with a probability
      drawn uniformly from [0, this].
  """
  num_images: int
  num_regions: int
  min_regions: int
  feature_dim: int
  image_height: tuple[int, int] = (72, 104)
  image_width: tuple[int, int] = (88, 128)
  num_objects: tuple[int, int] = (2, 7)
  captions_per_image: int = 5
  questions_per_image: int = 6
  refexps_per_image: int = 3
  nlvr2_per_image: float = 1.0
  snli_ve_per_image: int = 3
  vcr_per_image: int = 3
  split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
  vocab_size: int = 1024
  seed: int = 0
  feature_seed: int = 1234
  feature_grid: int = 8
  max_annotator_noise: float = 0.4

  def __post_init__(self):
    def check(ok: bool, field: str, why: str):
      if not ok:
        raise ValueError(f'WorldConfig.{field}={getattr(self, field)!r}: {why}')
    for field in ('num_images', 'num_regions', 'min_regions', 'feature_dim', 'feature_grid',
                  'captions_per_image', 'questions_per_image', 'refexps_per_image',
                  'snli_ve_per_image', 'vcr_per_image'):
      check(getattr(self, field) > 0, field, 'must be positive')
    for field in ('image_height', 'image_width', 'num_objects'):
      low, high = getattr(self, field)
      check(0 < low <= high, field, 'must be an inclusive range (low, high) with 0 < low <= high')
    check(min(self.image_height[0], self.image_width[0]) >= 32, 'image_height',
          'images must be at least 32 pixels on each side')
    check(self.num_objects[1] <= MAX_COUNT, 'num_objects', f'at most {MAX_COUNT} objects')
    check(self.num_objects[1] <= self.min_regions <= self.num_regions, 'min_regions',
          f'must lie in [num_objects[1]={self.num_objects[1]}, num_regions={self.num_regions}]'
          ' so every object gets a box')
    check(len(self.split_fractions) == 3 and all(f > 0 for f in self.split_fractions)
          and abs(sum(self.split_fractions) - 1) < 1e-6, 'split_fractions',
          'must be three positive fractions summing to 1')
    check(min(self.split_sizes) >= 2, 'num_images',
          f'every split needs >= 2 images (NLVR2 pairs); sizes {self.split_sizes}')
    check(self.nlvr2_per_image > 0, 'nlvr2_per_image', 'must be positive')
    check(0 <= self.max_annotator_noise < 1, 'max_annotator_noise', 'must lie in [0, 1)')

  @property
  def split_sizes(self) -> tuple[int, int, int]:
    train = round(self.num_images * self.split_fractions[0])
    validation = round(self.num_images * self.split_fractions[1])
    return train, validation, self.num_images - train - validation


# ----------------------------------------------------------------------------
# Scenes.

# Shape extents in units of the radius, (u_min, v_min, u_max, v_max); v points down.
_SHAPE_EXTENTS = {
    'circle': (-1, -1, 1, 1), 'square': (-0.85, -0.85, 0.85, 0.85),
    'triangle': (-0.866, -1, 0.866, 0.5), 'diamond': (-1, -1, 1, 1), 'ring': (-1, -1, 1, 1),
    'cross': (-0.95, -0.95, 0.95, 0.95), 'hexagon': (-1, -0.866, 1, 0.866),
    'star': (-0.866, -1, 0.866, 1)}


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One object; shape/colour/size index SHAPES/COLOURS/SIZES; centre and radius in pixels."""
  shape: int
  colour: int
  size: int
  cx: float
  cy: float
  radius: float

  @property
  def box(self) -> np.ndarray:
    """Tight box of the rendered shape, [4] float32 pixels (x1, y1, x2, y2)."""
    u0, v0, u1, v1 = _SHAPE_EXTENTS[SHAPES[self.shape]]
    r = self.radius
    return np.array([self.cx + u0 * r, self.cy + v0 * r, self.cx + u1 * r, self.cy + v1 * r],
                    np.float32)


@dataclasses.dataclass(frozen=True)
class Scene:
  index: int
  height: int
  width: int
  background: tuple[float, float, float]
  objects: tuple[SceneObject, ...]

  @property
  def image_id(self) -> str:
    return f'world_{self.index:07d}'

  @property
  def boxes(self) -> np.ndarray:
    """Ground-truth boxes [M, 4] float32 pixels."""
    return np.stack([o.box for o in self.objects])


def make_scene(config: WorldConfig, index: int) -> Scene:
  """Samples scene `index`: a palette of shapes/colours, then non-overlapping objects."""
  rng = _rng(config.seed, _SCENE, index)
  height = int(rng.integers(config.image_height[0], config.image_height[1] + 1))
  width = int(rng.integers(config.image_width[0], config.image_width[1] + 1))
  background = tuple(float(c) for c in rng.uniform(0.02, 0.25, 3))
  num_objects = int(rng.integers(config.num_objects[0], config.num_objects[1] + 1))
  shapes = rng.choice(len(SHAPES), size=int(rng.integers(2, 5)), replace=False)
  colours = rng.choice(len(COLOURS), size=int(rng.integers(2, 5)), replace=False)
  objects = []
  for _ in range(num_objects):
    size = int(rng.integers(len(SIZES)))
    radius = SIZE_RADIUS[size] * min(height, width) * rng.uniform(0.92, 1.08)
    # Rejection sampling; an object that finds no free spot is left out.
    for _ in range(40):
      cx = rng.uniform(radius + 1, width - radius - 1)
      cy = rng.uniform(radius + 1, height - radius - 1)
      if all(np.hypot(cx - o.cx, cy - o.cy) > radius + o.radius + 2 for o in objects):
        objects.append(SceneObject(int(rng.choice(shapes)), int(rng.choice(colours)), size,
                                   float(cx), float(cy), float(radius)))
        break
  return Scene(index, height, width, background, tuple(objects))


# ----------------------------------------------------------------------------
# Rendering.


def _convex(u: np.ndarray, v: np.ndarray, vertices: Sequence[tuple[float, float]]) -> np.ndarray:
  """Inside a convex polygon whose vertices run clockwise on screen (v down)."""
  inside = np.ones(u.shape, bool)
  for (ua, va), (ub, vb) in zip(vertices, vertices[1:] + vertices[:1]):
    inside &= (ub - ua) * (v - va) - (vb - va) * (u - ua) >= 0
  return inside


_UP_TRIANGLE = [(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)]
_DOWN_TRIANGLE = [(0.0, 1.0), (-0.866, -0.5), (0.866, -0.5)]
_HEXAGON = [(np.cos(a), np.sin(a)) for a in np.arange(6) * np.pi / 3]

SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    'circle': lambda u, v: u * u + v * v <= 1,
    'square': lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.85,
    'triangle': lambda u, v: _convex(u, v, _UP_TRIANGLE),
    'diamond': lambda u, v: np.abs(u) + np.abs(v) <= 1,
    'ring': lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.36),
    'cross': lambda u, v: ((np.abs(u) <= 0.3) | (np.abs(v) <= 0.3))
                          & (np.maximum(np.abs(u), np.abs(v)) <= 0.95),
    'hexagon': lambda u, v: _convex(u, v, _HEXAGON),
    'star': lambda u, v: _convex(u, v, _UP_TRIANGLE) | _convex(u, v, _DOWN_TRIANGLE),
}


def render(scene: Scene, seed: int) -> np.ndarray:
  """The scene's RGB image, uint8 [H, W, 3]; pixel centres sit at half-integers."""
  rng = _rng(seed, _RENDER, scene.index)
  h, w = scene.height, scene.width
  gradient = np.linspace(-0.06, 0.06, h, dtype=np.float32)[:, None, None] * rng.choice([-1, 1])
  image = (np.asarray(scene.background, np.float32) + gradient
           + 0.025 * rng.standard_normal((h, w, 3), dtype=np.float32))
  for obj in scene.objects:
    x1, y1, x2, y2 = obj.box
    cols = np.arange(max(int(x1), 0), min(int(np.ceil(x2)) + 1, w))
    rows = np.arange(max(int(y1), 0), min(int(np.ceil(y2)) + 1, h))
    u = (cols[None, :] + 0.5 - obj.cx) / obj.radius
    v = (rows[:, None] + 0.5 - obj.cy) / obj.radius
    mask = SHAPE_MASKS[SHAPES[obj.shape]](np.broadcast_to(u, (len(rows), len(cols))),
                                          np.broadcast_to(v, (len(rows), len(cols))))
    shade = COLOUR_RGB[obj.colour] * rng.uniform(0.85, 1.05)
    noise = 0.03 * rng.standard_normal((len(rows), len(cols), 3), dtype=np.float32)
    window = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    window[mask] = (shade + noise)[mask]
  return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------
# Detector-like outputs.


@dataclasses.dataclass(frozen=True)
class Detections:
  """Per-region detector outputs of one image, N regions.

  boxes [N, 4] float32 pixels x1y1x2y2; class_probs [N, C] float32 over
  OBJECT_CLASSES; object_ids [N] int32 (best foreground class as an index into
  SHAPES, i.e. its class_probs column - 1: labels exclude background as in
  LXMERT's TSV files); object_conf [N] float32; attr_ids [N] int32 (best
  attribute as an index into COLOURS); attr_conf [N] float32.
  """
  boxes: np.ndarray
  class_probs: np.ndarray
  object_ids: np.ndarray
  object_conf: np.ndarray
  attr_ids: np.ndarray
  attr_conf: np.ndarray


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of boxes a [N, 4] and b [M, 4] -> [N, M]."""
  lo = np.maximum(a[:, None, :2], b[None, :, :2])
  hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _softmax(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _confusion_matrix(names: Sequence[str], confusions: dict[str, tuple[str, ...]],
                      offset: int) -> np.ndarray:
  """[K, K + offset] 0/1 rows: which labels (shifted by `offset`) each value is confused with."""
  matrix = np.zeros((len(names), len(names) + offset), np.float32)
  for i, name in enumerate(names):
    for other in confusions[name]:
      matrix[i, names.index(other) + offset] = 1
  return matrix


_SHAPE_CONFUSION = _confusion_matrix(SHAPES, SHAPE_CONFUSIONS, 1)
_COLOUR_CONFUSION = _confusion_matrix(COLOURS, COLOUR_CONFUSIONS, 1)


def _noisy_distribution(rng: np.random.Generator, true_label: np.ndarray, foreground: np.ndarray,
                        quality: np.ndarray, confusion: np.ndarray) -> np.ndarray:
  """Class distributions [N, K+1] (0 = background/none) of a noisy detector.

  Foreground regions peak on their label (sharper for better boxes) and leak
  mass to confusable labels; other regions peak on 0.
  """
  n, k = len(true_label), confusion.shape[1]
  logits = rng.normal(0, 0.8, (n, k))
  strength = 2.0 + 3.0 * quality + rng.normal(0, 0.6, n)
  rows = np.arange(n)
  fg_label = np.where(foreground, true_label + 1, 0)
  logits[rows, fg_label] += np.where(foreground, strength, 3.0)
  logits += (foreground * strength * rng.uniform(0.2, 0.7, n))[:, None] * confusion[true_label]
  return _softmax(logits)


def detect(scene: Scene, config: WorldConfig) -> Detections:
  """Detector-like regions of `scene`: each object once (small jitter), then
  duplicates (large jitter) and background boxes up to N in [min_regions, num_regions]."""
  rng = _rng(config.seed, _DETECT, scene.index)
  gt = scene.boxes
  num_objects = len(gt)
  n = int(rng.integers(config.min_regions, config.num_regions + 1))
  size = np.concatenate([gt[:, 2:] - gt[:, :2]] * 2, axis=1)
  num_duplicates = (n - num_objects) // 2
  num_background = n - num_objects - num_duplicates
  source = rng.integers(num_objects, size=num_duplicates)
  main = gt + rng.normal(0, 0.05, gt.shape) * size
  duplicates = gt[source] + rng.normal(0, 0.25, (num_duplicates, 4)) * size[source]
  extent = np.array([scene.width, scene.height] * 2, np.float32)
  wh = rng.uniform(0.08, 0.5, (num_background, 2)) * extent[:2]
  corner = rng.uniform(0, 1, (num_background, 2)) * (extent[:2] - wh)
  background = np.concatenate([corner, corner + wh], axis=1)
  boxes = np.concatenate([main, duplicates, background]).astype(np.float32)
  # Inside the image and at least 2 pixels wide and high.
  boxes[:, :2] = np.clip(boxes[:, :2], 0, extent[:2] - 2)
  boxes[:, 2:] = np.clip(boxes[:, 2:], boxes[:, :2] + 2, extent[:2])

  iou = box_iou(boxes, gt)
  best = iou.argmax(1)
  best_iou = iou[np.arange(n), best]
  foreground = best_iou >= 0.5
  quality = np.clip((best_iou - 0.5) / 0.5, 0, 1)
  shapes = np.array([o.shape for o in scene.objects])[best]
  colours = np.array([o.colour for o in scene.objects])[best]
  class_probs = _noisy_distribution(rng, shapes, foreground, quality, _SHAPE_CONFUSION)
  attr_probs = _noisy_distribution(rng, colours, foreground, quality, _COLOUR_CONFUSION)
  # Labels count from 0 without background/none, as in LXMERT's TSV files.
  object_ids = class_probs[:, 1:].argmax(1)
  attr_ids = attr_probs[:, 1:].argmax(1)
  object_conf = class_probs[np.arange(n), object_ids + 1]
  order = np.argsort(-object_conf, kind='stable')
  return Detections(
      boxes=boxes[order], class_probs=class_probs[order].astype(np.float32),
      object_ids=object_ids[order].astype(np.int32),
      object_conf=object_conf[order].astype(np.float32),
      attr_ids=attr_ids[order].astype(np.int32),
      attr_conf=attr_probs[np.arange(n), attr_ids + 1][order].astype(np.float32))


# ----------------------------------------------------------------------------
# Region features.


class FeatureExtractor:
  """Fixed region features computed from pixels only.

  Each box is split into a G x G grid; each cell holds the mean R, G, B and
  edge strength (|dx| + |dy| of R+G+B, forward differences, so the last
  row/column looks one pixel past the box) of the pixels it covers, from
  integer integral images, so equal pixels under equal boxes give bit-equal
  features anywhere in the image (boxes moved by whole pixels). The 4 G^2
  descriptor is centred and mapped through a fixed random projection (seeded
  by `seed`) + ReLU to `feature_dim` values.
  """

  def __init__(self, feature_dim: int, grid: int = 8, seed: int = 1234):
    self.feature_dim = feature_dim
    self.grid = grid
    rng = np.random.default_rng(seed)
    depth = 4 * grid * grid
    self.projection = (rng.standard_normal((depth, feature_dim)) * np.sqrt(2.0 / depth)
                       ).astype(np.float32)
    self.bias = rng.normal(0, 0.1, feature_dim).astype(np.float32)

  def descriptors(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """image uint8 [H, W, 3], boxes [N, 4] pixels -> descriptors float32 [N, 4 G^2]."""
    h, w, _ = image.shape
    pixels = image.astype(np.int64)
    gray = pixels.sum(-1)
    edges = np.zeros_like(gray)
    edges[:, :-1] += np.abs(np.diff(gray, axis=1))
    edges[:-1, :] += np.abs(np.diff(gray, axis=0))
    channels = np.concatenate([pixels, edges[..., None]], axis=-1)  # [H, W, 4]
    integral = np.zeros((h + 1, w + 1, 4), np.int64)
    integral[1:, 1:] = channels.cumsum(0).cumsum(1)

    steps = np.arange(self.grid + 1) / self.grid

    def cell_edges(lo, hi, limit):
      """Integer [lo, hi) pixel ranges of the G cells along one axis, each >= 1 pixel."""
      cuts = lo[:, None] + steps[None, :] * (hi - lo)[:, None]
      start = np.clip(np.floor(cuts[:, :-1]), 0, limit - 1).astype(np.int64)
      stop = np.clip(np.ceil(cuts[:, 1:]), start + 1, limit).astype(np.int64)
      return start, stop

    x0, x1 = cell_edges(boxes[:, 0], boxes[:, 2], w)
    y0, y1 = cell_edges(boxes[:, 1], boxes[:, 3], h)
    rows0, rows1 = y0[:, :, None], y1[:, :, None]
    cols0, cols1 = x0[:, None, :], x1[:, None, :]
    sums = (integral[rows1, cols1] - integral[rows0, cols1] - integral[rows1, cols0]
            + integral[rows0, cols0])  # [N, G, G, 4]
    area = ((rows1 - rows0) * (cols1 - cols0))[..., None]
    means = sums / area / np.array([255, 255, 255, 2 * 765], np.float64)
    centred = means - np.array([0.5, 0.5, 0.5, 0.05])
    return centred.reshape(len(boxes), -1).astype(np.float32)

  def project(self, descriptors: np.ndarray) -> np.ndarray:
    """[..., 4 G^2] -> features float32 [..., feature_dim]."""
    return np.maximum(descriptors @ self.projection + self.bias, 0)

  def __call__(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """image uint8 [H, W, 3], boxes [N, 4] pixels -> features float32 [N, F]."""
    return self.project(self.descriptors(image, boxes))


# ----------------------------------------------------------------------------
# Text: phrases and relations.

# (size, colour, shape) attribute sets a description may use; colour or shape is always there.
_DESCRIPTIONS = tuple((size, colour, shape) for size in (False, True) for colour in (False, True)
                      for shape in (False, True) if colour or shape)
RELATION_WORDS = {'left': 'to the left of', 'right': 'to the right of', 'above': 'above',
                  'below': 'below'}
_OPPOSITE = {'left': 'right', 'right': 'left', 'above': 'below', 'below': 'above'}
_EXTREME_WORDS = {'left': 'leftmost', 'right': 'rightmost', 'above': 'topmost',
                  'below': 'lowest'}


def _article(phrase: str) -> str:
  return ('an ' if phrase[0] in 'aeiou' else 'a ') + phrase


def _plural(noun: str) -> str:
  return noun + ('es' if noun.endswith('s') else 's')


def describe(obj: SceneObject, description: tuple[bool, bool, bool] = (False, True, True)) -> str:
  """Noun phrase of `obj` with the chosen (size, colour, shape) attributes: 'small red circle'."""
  size, colour, shape = description
  return ' '.join(([SIZES[obj.size]] if size else []) + ([COLOURS[obj.colour]] if colour else [])
                  + [SHAPES[obj.shape] if shape else 'object'])


def _matches(obj: SceneObject, target: SceneObject, description: tuple[bool, bool, bool]) -> bool:
  size, colour, shape = description
  return ((not size or obj.size == target.size) and (not colour or obj.colour == target.colour)
          and (not shape or obj.shape == target.shape))


def unique_descriptions(scene: Scene, i: int, leave_out: int | None = None) -> list[str]:
  """Phrases that pick out object i alone; `leave_out` (0 size, 1 colour, 2 shape) is never used."""
  target = scene.objects[i]
  return [describe(target, d) for d in _DESCRIPTIONS
          if (leave_out is None or not d[leave_out])
          and sum(_matches(o, target, d) for o in scene.objects) == 1]


def relation(a: SceneObject, b: SceneObject) -> str:
  """Where a lies relative to b along the axis on which they are further apart."""
  dx, dy = a.cx - b.cx, a.cy - b.cy
  if abs(dx) >= abs(dy):
    return 'left' if dx < 0 else 'right'
  return 'above' if dy < 0 else 'below'


def _on_side(a: SceneObject, b: SceneObject, side: str) -> bool:
  """a's centre lies on `side` of b's centre (any amount)."""
  return {'left': a.cx < b.cx, 'right': a.cx > b.cx, 'above': a.cy < b.cy,
          'below': a.cy > b.cy}[side]


def _extreme_key(side: str) -> Callable[[SceneObject], float]:
  """Key whose minimum is the object furthest to `side`."""
  return {'left': lambda o: o.cx, 'right': lambda o: -o.cx, 'above': lambda o: o.cy,
          'below': lambda o: -o.cy}[side]


def _in_group(obj: SceneObject, colour: int | None, shape: int | None) -> bool:
  return (colour is None or obj.colour == colour) and (shape is None or obj.shape == shape)


def count(objects: Sequence[SceneObject], colour: int | None, shape: int | None) -> int:
  """Objects of that colour and shape (None: any)."""
  return sum(_in_group(o, colour, shape) for o in objects)


def _group_phrase(colour: int | None, shape: int | None, plural: bool) -> str:
  noun = SHAPES[shape] if shape is not None else 'object'
  return ' '.join(([COLOURS[colour]] if colour is not None else [])
                  + [_plural(noun) if plural else noun])


def _random_group(rng: np.random.Generator, objects: Sequence[SceneObject],
                  present: float) -> tuple[int | None, int | None]:
  """(colour, shape) of a random present object with prob. `present`, else random
  values; one of the two may be dropped (None)."""
  if objects and rng.uniform() < present:
    obj = objects[int(rng.integers(len(objects)))]
    colour, shape = obj.colour, obj.shape
  else:
    colour, shape = int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))
  kind = int(rng.integers(3))
  return (None if kind == 1 else colour), (None if kind == 2 else shape)


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
  return items[int(rng.integers(len(items)))]


# ----------------------------------------------------------------------------
# Captions.


def _caption_relation(scene: Scene, rng: np.random.Generator) -> str | None:
  if len(scene.objects) < 2:
    return None
  i, j = rng.choice(len(scene.objects), 2, replace=False)
  a, b = scene.objects[i], scene.objects[j]
  description = (bool(rng.integers(2)), True, True)
  return (f'{_article(describe(a, description))} {RELATION_WORDS[relation(a, b)]} '
          f'{_article(describe(b))}')


def _caption_list(scene: Scene, rng: np.random.Generator) -> str:
  k = min(len(scene.objects), 3)
  picked = [scene.objects[i] for i in rng.choice(len(scene.objects), k, replace=False)]
  phrases = [_article(describe(o, (bool(rng.integers(2)), True, True))) for o in picked]
  listed = phrases[0] if k == 1 else ', '.join(phrases[:-1]) + ' and ' + phrases[-1]
  return _pick(rng, ('', 'there is ', 'a picture of ')) + listed


def _caption_count(scene: Scene, rng: np.random.Generator) -> str:
  colour, shape = _random_group(rng, scene.objects, present=1.0)
  n = count(scene.objects, colour, shape)
  others = [o for o in scene.objects if not _in_group(o, colour, shape)]
  text = f'{NUMBER_WORDS[n]} {_group_phrase(colour, shape, n != 1)}'
  return text + (f' and {_article(describe(_pick(rng, others)))}' if others else '')


def _caption_total(scene: Scene, rng: np.random.Generator) -> str | None:
  if len(scene.objects) < 2:
    return None
  i, j = rng.choice(len(scene.objects), 2, replace=False)
  return (f'{NUMBER_WORDS[len(scene.objects)]} objects, including '
          f'{_article(describe(scene.objects[i]))} and {_article(describe(scene.objects[j]))}')


def _caption_extreme(scene: Scene, rng: np.random.Generator) -> str:
  side = _pick(rng, tuple(_EXTREME_WORDS))
  obj = min(scene.objects, key=_extreme_key(side))
  return f'the {_EXTREME_WORDS[side]} object is {_article(describe(obj, (True, True, True)))}'


_CAPTION_TEMPLATES = (_caption_relation, _caption_list, _caption_count, _caption_total,
                      _caption_extreme)


def _distinct(make: Callable[[], Any], wanted: int, key: Callable[[Any], str],
              tries: int = 50) -> list[Any]:
  """Up to `wanted` results of `make` with distinct keys (None results are skipped)."""
  out, seen = [], set()
  for _ in range(tries):
    if len(out) == wanted:
      break
    item = make()
    if item is not None and key(item) not in seen:
      seen.add(key(item))
      out.append(item)
  return out


def captions(scene: Scene, config: WorldConfig) -> list[str]:
  """Up to `captions_per_image` distinct captions of the scene."""
  rng = _rng(config.seed, _CAPTION, scene.index)
  return _distinct(lambda: _pick(rng, _CAPTION_TEMPLATES)(scene, rng),
                   config.captions_per_image, key=lambda c: c)


# ----------------------------------------------------------------------------
# VQA.


def _question_colour(scene, rng):
  i = int(rng.integers(len(scene.objects)))
  phrases = unique_descriptions(scene, i, leave_out=1)
  if not phrases:
    return None
  return f'what color is the {_pick(rng, phrases)}?', COLOURS[scene.objects[i].colour], 'color'


def _question_shape(scene, rng):
  i = int(rng.integers(len(scene.objects)))
  phrases = unique_descriptions(scene, i, leave_out=2)
  if not phrases:
    return None
  return f'what shape is the {_pick(rng, phrases)}?', SHAPES[scene.objects[i].shape], 'shape'


def _question_size(scene, rng):
  i = int(rng.integers(len(scene.objects)))
  phrases = unique_descriptions(scene, i, leave_out=0)
  if not phrases:
    return None
  return f'what size is the {_pick(rng, phrases)}?', SIZES[scene.objects[i].size], 'size'


def _question_count(scene, rng):
  colour, shape = _random_group(rng, scene.objects, present=0.75)
  return (f'how many {_group_phrase(colour, shape, plural=True)} are there?',
          str(count(scene.objects, colour, shape)), 'count')


def _question_exist(scene, rng):
  colour, shape = _random_group(rng, scene.objects, present=0.5)
  answer = 'yes' if count(scene.objects, colour, shape) else 'no'
  return f'is there {_article(_group_phrase(colour, shape, plural=False))}?', answer, 'exist'


def _question_relation(scene, rng):
  """Yes/no about the relation of two uniquely described objects; a 'no' asks the
  opposite side, so the answer is never a matter of degree."""
  if len(scene.objects) < 2:
    return None
  i, j = rng.choice(len(scene.objects), 2, replace=False)
  phrase_a, phrase_b = unique_descriptions(scene, i), unique_descriptions(scene, j)
  if not (phrase_a and phrase_b):
    return None
  side = relation(scene.objects[i], scene.objects[j])
  answer = _pick(rng, ('yes', 'no'))
  asked = side if answer == 'yes' else _OPPOSITE[side]
  return (f'is the {_pick(rng, phrase_a)} {RELATION_WORDS[asked]} the {_pick(rng, phrase_b)}?',
          answer, 'relation')


def _question_neighbour(scene, rng):
  """Colour or shape of the only object on one side of a uniquely described object."""
  j = int(rng.integers(len(scene.objects)))
  phrases = unique_descriptions(scene, j)
  side = _pick(rng, tuple(RELATION_WORDS))
  on_side = [o for o in scene.objects if _on_side(o, scene.objects[j], side)]
  if not phrases or len(on_side) != 1:
    return None
  attribute = _pick(rng, ('color', 'shape'))
  answer = COLOURS[on_side[0].colour] if attribute == 'color' else SHAPES[on_side[0].shape]
  return (f'what {attribute} is the object {RELATION_WORDS[side]} the {_pick(rng, phrases)}?',
          answer, 'relation')


_QUESTION_TEMPLATES = (_question_colour, _question_shape, _question_size, _question_count,
                       _question_exist, _question_relation, _question_neighbour)


def confusable_answers(answer: str) -> tuple[str, ...]:
  """Wrong answers a careless annotator gives instead of `answer`."""
  if answer in ('yes', 'no'):
    return ('no',) if answer == 'yes' else ('yes',)
  if answer.isdigit():
    n = int(answer)
    return tuple(str(m) for m in (n - 1, n + 1) if 0 <= m <= MAX_COUNT)
  if answer in COLOUR_CONFUSIONS:
    return COLOUR_CONFUSIONS[answer]
  if answer in SHAPE_CONFUSIONS:
    return SHAPE_CONFUSIONS[answer]
  k = SIZES.index(answer)
  return tuple(SIZES[m] for m in (k - 1, k + 1) if 0 <= m < len(SIZES))


def soft_scores(answers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """VQA soft targets: (labels int32 [K] into ANSWERS, ascending; scores float32 [K]
  = min(1, 0.3 * number of annotators who gave the answer))."""
  labels, counts = np.unique([ANSWERS.index(a) for a in answers], return_counts=True)
  return labels.astype(np.int32), np.minimum(1.0, 0.3 * counts).astype(np.float32)


def questions(scene: Scene, config: WorldConfig) -> list[dict[str, Any]]:
  """Up to `questions_per_image` distinct questions, each with ten annotator answers."""
  rng = _rng(config.seed, _VQA, scene.index)
  asked = _distinct(lambda: _pick(rng, _QUESTION_TEMPLATES)(scene, rng),
                    config.questions_per_image, key=lambda q: q[0])
  out = []
  for question, answer, question_type in asked:
    error_rate = rng.uniform(0, config.max_annotator_noise)
    wrong = confusable_answers(answer)
    answers = [_pick(rng, wrong) if rng.uniform() < error_rate else answer for _ in range(10)]
    out.append(dict(question=question, answer=answer, question_type=question_type,
                    answers=answers))
  return out


# ----------------------------------------------------------------------------
# Referring expressions.


def referring_expressions(scene: Scene, i: int) -> list[str]:
  """Every expression the grammar has that picks out object i alone."""
  target = scene.objects[i]
  expressions = [f'the {phrase}' for phrase in unique_descriptions(scene, i)]
  group = [o for o in scene.objects if _matches(o, target, (False, True, True))]
  if len(group) > 1:
    expressions += [f'the {_EXTREME_WORDS[side]} {describe(target)}' for side in _EXTREME_WORDS
                    if min(group, key=_extreme_key(side)) is target]
    for j, anchor in enumerate(scene.objects):
      if anchor is target:
        continue
      for phrase in unique_descriptions(scene, j):
        expressions += [f'the {describe(target)} {RELATION_WORDS[side]} the {phrase}'
                        for side in RELATION_WORDS
                        if [o for o in group if _on_side(o, anchor, side)] == [target]]
  return expressions


def refexps(scene: Scene, config: WorldConfig) -> list[tuple[str, int]]:
  """Up to `refexps_per_image` (expression, object index) pairs on distinct objects."""
  rng = _rng(config.seed, _REFEXP, scene.index)
  out = []
  for i in rng.permutation(len(scene.objects)):
    expressions = referring_expressions(scene, int(i))
    if expressions and len(out) < config.refexps_per_image:
      out.append((_pick(rng, expressions), int(i)))
  return out


# ----------------------------------------------------------------------------
# NLVR2-style statements about a pair of images.


def _statement(left: Scene, right: Scene, rng: np.random.Generator) -> tuple[str, bool]:
  objects = left.objects + right.objects
  colour, shape = _random_group(rng, objects, present=0.8)
  n_left, n_right = count(left.objects, colour, shape), count(right.objects, colour, shape)
  one = _article(_group_phrase(colour, shape, plural=False))
  kind = int(rng.integers(6))
  if kind == 0:
    n = max(n_left + n_right + int(rng.integers(-1, 2)), 0)
    return (f'the two images contain {NUMBER_WORDS[n]} {_group_phrase(colour, shape, n != 1)} '
            'in total', n == n_left + n_right)
  if kind == 1:
    side = _pick(rng, ('left', 'right'))
    more = n_left > n_right if side == 'left' else n_right > n_left
    other = 'right' if side == 'left' else 'left'
    return (f'the {side} image has more {_group_phrase(colour, shape, True)} than the {other} '
            'image', more)
  if kind == 2:
    return f'both images contain {one}', n_left > 0 and n_right > 0
  if kind == 3:
    return f'exactly one image contains {one}', (n_left > 0) != (n_right > 0)
  if kind == 4:
    side = _pick(rng, ('left', 'right'))
    return f'the {side} image contains {one}', (n_left if side == 'left' else n_right) > 0
  return f'neither image contains {one}', n_left == 0 and n_right == 0


def nlvr2_statement(left: Scene, right: Scene, seed: int, pair_id: int) -> tuple[str, int]:
  """(statement, label 1 = true) about the pair; the wanted label is drawn first
  and statements are drawn until one has it, so labels are balanced."""
  rng = _rng(seed, _NLVR2, pair_id)
  want = bool(rng.integers(2))
  for _ in range(50):
    text, truth = _statement(left, right, rng)
    if truth == want:
      break
  return text, int(truth)


# ----------------------------------------------------------------------------
# SNLI-VE-style entailment: the image is the premise, a statement the hypothesis.

# Label ids (the table's `label`, the 3-way head's outputs) in this order.
ENTAILMENT_LABELS = ('entailment', 'neutral', 'contradiction')
_ENTAILED, _NEUTRAL, _CONTRADICTED = range(3)


def _entailment_contains(scene: Scene, colour: int | None, shape: int | None
                         ) -> tuple[str, int]:
  """About this image alone: decided by the scene."""
  present = count(scene.objects, colour, shape) > 0
  return (f'the image contains {_article(_group_phrase(colour, shape, plural=False))}',
          _ENTAILED if present else _CONTRADICTED)


def _entailment_count(scene: Scene, colour: int | None, shape: int | None,
                      rng: np.random.Generator, max_count: int) -> tuple[str, int]:
  """A count of this image: right (entailed) or off by one or two (contradicted)."""
  n_true = count(scene.objects, colour, shape)
  n = int(np.clip(n_true + _pick(rng, (0, 0, -1, 1, 2)), 0, max_count))
  return (f'the image contains {NUMBER_WORDS[n]} {_group_phrase(colour, shape, n != 1)}',
          _ENTAILED if n == n_true else _CONTRADICTED)


def _entailment_both(scene: Scene, colour: int | None, shape: int | None) -> tuple[str, int]:
  """About this image and an unseen second one: contradicted when this image
  lacks the object, else undecidable (the other image is not shown)."""
  present = count(scene.objects, colour, shape) > 0
  return (f'both images contain {_article(_group_phrase(colour, shape, plural=False))}',
          _NEUTRAL if present else _CONTRADICTED)


def _entailment_neither(scene: Scene, colour: int | None, shape: int | None
                        ) -> tuple[str, int]:
  """Contradicted when this image has the object, else undecidable."""
  present = count(scene.objects, colour, shape) > 0
  return (f'neither image contains {_article(_group_phrase(colour, shape, plural=False))}',
          _CONTRADICTED if present else _NEUTRAL)


def _entailment_total(scene: Scene, colour: int | None, shape: int | None,
                      rng: np.random.Generator, max_count: int) -> tuple[str, int]:
  """A total over this image and an unseen one: contradicted when this image
  alone holds more, else undecidable (the other may hold the rest)."""
  n_here = count(scene.objects, colour, shape)
  n = int(np.clip(n_here + rng.integers(-2, 3), 0, max_count))
  return (f'the two images contain {NUMBER_WORDS[n]} {_group_phrase(colour, shape, n != 1)} '
          'in total', _CONTRADICTED if n < n_here else _NEUTRAL)


def _entailment_statement(scene: Scene, rng: np.random.Generator, max_count: int
                          ) -> tuple[str, int]:
  colour, shape = _random_group(rng, scene.objects, present=0.6)
  kind = int(rng.integers(5))
  if kind == 0:
    return _entailment_contains(scene, colour, shape)
  if kind == 1:
    return _entailment_count(scene, colour, shape, rng, max_count)
  if kind == 2:
    return _entailment_both(scene, colour, shape)
  if kind == 3:
    return _entailment_neither(scene, colour, shape)
  return _entailment_total(scene, colour, shape, rng, max_count)


def entailment_statement(scene: Scene, rng: np.random.Generator, max_count: int
                         ) -> tuple[str, int]:
  """(statement, label into ENTAILMENT_LABELS) with the image as the premise.

  Entailed and contradicted statements are decided by the scene; neutral ones
  speak of a second image that is not shown ('both images contain a red
  circle' when this one has one), so the scene neither shows nor excludes
  them. The label is a function of (scene, statement); the wanted label is
  drawn first and statements are drawn until one has it, so labels are balanced.
  Counts stay at most `max_count` (the most objects a scene has), so every
  word is one the other tables use (the vocabulary is trained on those).
  """
  want = int(rng.integers(len(ENTAILMENT_LABELS)))
  for _ in range(50):
    text, label = _entailment_statement(scene, rng, max_count)
    if label == want:
      break
  return text, label


def entailment_statements(scene: Scene, config: WorldConfig) -> list[tuple[str, int]]:
  """Up to `snli_ve_per_image` distinct (statement, label) pairs about the scene."""
  rng = _rng(config.seed, _ENTAILMENT, scene.index)
  return _distinct(lambda: entailment_statement(scene, rng, config.num_objects[1]),
                   config.snli_ve_per_image,
                   key=lambda s: s[0])


# ----------------------------------------------------------------------------
# VCR-style multiple choice: a question, four answers, four rationales.
#
# Text is VCR's token list: words, and object references as lists of object
# indices into the scene's objects (`[0]` is object 0: region 0 of the
# ground-truth regions table, which holds one region per object in object
# order). Every word is one the vocabulary's corpus has (or spells in word
# pieces): VCR's own punctuation '.' would be [UNK].

VCR_CHOICES = 4
# The vcr table's fields that hold VCR's JSON (token lists, object names).
VCR_JSON_FIELDS = ('question', 'answer_choices', 'rationale_choices', 'objects')
# A VCR token list: words and object references (lists of object indices).
VcrTokens = list[Any]


def _vcr_objects(scene: Scene, rng: np.random.Generator, k: int) -> list[int]:
  """k distinct objects to refer to, among those whose shape no other object
  has when there are k of them, so a reference rendered as the object's class
  name (the 'names' references of r2c and ViLBERT) still picks it out."""
  shapes = collections.Counter(o.shape for o in scene.objects)
  unique = [i for i, o in enumerate(scene.objects) if shapes[o.shape] == 1]
  pool = unique if len(unique) >= k else list(range(len(scene.objects)))
  return [int(i) for i in rng.choice(pool, k, replace=False)]


def _wrong_colours(colour: int, rng: np.random.Generator, k: int) -> list[int]:
  """k colours other than `colour`: its confusions first (shuffled), then others."""
  confused = [COLOURS.index(c) for c in COLOUR_CONFUSIONS[COLOURS[colour]]]
  others = [c for c in range(len(COLOURS)) if c != colour and c not in confused]
  return ([int(c) for c in rng.permutation(confused)]
          + [int(c) for c in rng.permutation(others)])[:k]


def _relation_tokens(side: str) -> list[str]:
  return RELATION_WORDS[side].split()


def _vcr_colour(scene: Scene, rng: np.random.Generator
                ) -> tuple[VcrTokens, list[VcrTokens], list[VcrTokens]]:
  """What colour is [i]? Answers: its colour and three confusable ones. Rationales
  `[i] is the <colour> <shape> <relation> [j]`: the true one, two with the wrong
  answers' colours and one with the true colour but the opposite relation
  (false: only the image tells it from the right one)."""
  i, j = _vcr_objects(scene, rng, 2)
  obj = scene.objects[i]
  side = relation(obj, scene.objects[j])
  colours = [obj.colour] + _wrong_colours(obj.colour, rng, VCR_CHOICES - 1)
  answers = [[[i], 'is', COLOURS[c]] for c in colours]
  def rationale(colour: int, relation_side: str) -> VcrTokens:
    return [[i], 'is', 'the', COLOURS[colour], SHAPES[obj.shape],
            *_relation_tokens(relation_side), [j]]
  rationales = [rationale(obj.colour, side), rationale(colours[1], side),
                rationale(colours[2], side), rationale(obj.colour, _OPPOSITE[side])]
  return ['what', 'color', 'is', [i], '?'], answers, rationales


def _vcr_position(scene: Scene, rng: np.random.Generator
                  ) -> tuple[VcrTokens, list[VcrTokens], list[VcrTokens]]:
  """Where is [i]? Answers: [i] is <relation> [j], one per relation (the true
  one is `relation`'s). Rationales `the <colour> <shape> is <relation> the
  <colour> <shape>`: the true one, two with the wrong answers' relations and
  one with the true relation but a wrong colour of [i]."""
  i, j = _vcr_objects(scene, rng, 2)
  a, b = scene.objects[i], scene.objects[j]
  side = relation(a, b)
  sides = [side] + [str(s) for s in rng.permutation([s for s in RELATION_WORDS if s != side])]
  answers = [[[i], 'is', *_relation_tokens(s), [j]] for s in sides]
  def rationale(colour: int, relation_side: str) -> VcrTokens:
    return ['the', COLOURS[colour], SHAPES[a.shape], 'is', *_relation_tokens(relation_side),
            'the', COLOURS[b.colour], SHAPES[b.shape]]
  rationales = [rationale(a.colour, side), rationale(a.colour, sides[1]),
                rationale(a.colour, sides[2]), rationale(_wrong_colours(a.colour, rng, 1)[0], side)]
  return ['where', 'is', [i], '?'], answers, rationales


def vcr_question(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
  """One VCR-style example: question, answer_choices [4], answer_label,
  rationale_choices [4], rationale_label (token lists as VCR's jsonl, the
  choices shuffled) and objects (every object's class name, in object order)."""
  question, answers, rationales = _pick(rng, (_vcr_colour, _vcr_position))(scene, rng)
  answer_order = rng.permutation(VCR_CHOICES)
  rationale_order = rng.permutation(VCR_CHOICES)
  return dict(question=question, answer_choices=[answers[k] for k in answer_order],
              answer_label=int(np.argmin(answer_order)),
              rationale_choices=[rationales[k] for k in rationale_order],
              rationale_label=int(np.argmin(rationale_order)),
              objects=[SHAPES[o.shape] for o in scene.objects])


def vcr_questions(scene: Scene, config: WorldConfig) -> list[dict[str, Any]]:
  """Up to `vcr_per_image` distinct VCR-style examples about the scene."""
  rng = _rng(config.seed, _VCR, scene.index)
  return _distinct(lambda: vcr_question(scene, rng), config.vcr_per_image,
                   key=lambda q: repr(q['question']))


def nlvr2_identifiers(split: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """lil-lab's `<split>-<set>-<pair>-<sentence>` identifier of each row, from its text.

  NLVR2 asks each sentence of several image pairs, and its consistency counts
  the sentences whose every pair is right. The world draws one statement per
  pair, from templates, so pairs of one split with the same statement are that
  sentence's pairs: set = the statement's rank by first appearance in the
  split, pair = its rank among them, sentence = 0. Computed from the drawn rows,
  so no draw changes.
  """
  sets: dict[str, int] = {}
  pairs: collections.Counter[str] = collections.Counter()
  identifiers = []
  for row in rows:
    text = row['text']
    set_id = sets.setdefault(text, len(sets))
    identifiers.append(f'{split}-{set_id}-{pairs[text]}-0')
    pairs[text] += 1
  return identifiers


# ----------------------------------------------------------------------------
# The world.


class World:
  """Scenes and text tables of one `WorldConfig`; images stream via `image_examples`.

  Splits are contiguous image index ranges (train, validation, test); text rows
  belong to their image's split, NLVR2 pairs draw both images from one split.
  """

  def __init__(self, config: WorldConfig):
    self.config = config
    self.scenes = [make_scene(config, i) for i in range(config.num_images)]
    bounds = np.cumsum((0,) + config.split_sizes)
    self.split_images = {split: range(int(bounds[k]), int(bounds[k + 1]))
                         for k, split in enumerate(SPLITS)}

  def _image_fields(self, index: int) -> dict[str, Any]:
    return dict(image_index=index, image_id=self.scenes[index].image_id)

  @functools.cached_property
  def captions(self) -> dict[str, list[dict[str, Any]]]:
    """Split -> rows {caption_id, text, image_index, image_id}."""
    per_image = self.config.captions_per_image
    return {split: [dict(caption_id=i * per_image + k, text=text, **self._image_fields(i))
                    for i in indices
                    for k, text in enumerate(captions(self.scenes[i], self.config))]
            for split, indices in self.split_images.items()}

  @functools.cached_property
  def _questions(self) -> dict[str, list[tuple[int, int, dict[str, Any]]]]:
    """Split -> (image index, question id, `questions` entry): what the vqa and
    gqa tables ask, generated once for both."""
    per_image = self.config.questions_per_image
    return {split: [(i, i * per_image + k, q) for i in indices
                    for k, q in enumerate(questions(self.scenes[i], self.config))]
            for split, indices in self.split_images.items()}

  @functools.cached_property
  def vqa(self) -> dict[str, list[dict[str, Any]]]:
    """Split -> rows {question_id, question, image_index, image_id, answers,
    answer_labels, answer_scores, question_type}."""
    rows = {}
    for split, asked in self._questions.items():
      rows[split] = []
      for i, question_id, q in asked:
        labels, scores = soft_scores(q['answers'])
        rows[split].append(dict(
            question_id=question_id, question=q['question'], **self._image_fields(i),
            answers=q['answers'], answer_labels=labels, answer_scores=scores,
            question_type=q['question_type']))
    return rows

  @functools.cached_property
  def gqa(self) -> dict[str, list[dict[str, Any]]]:
    """Split -> rows {question_id (text, as GQA's ids), question, image_index,
    image_id, answer, answer_labels [1] (into ANSWERS), answer_scores [1] (1.0)}:
    the vqa table's questions with their one true answer, as GQA's, instead of
    ten noisy annotators'."""
    return {split: [dict(question_id=str(question_id), question=q['question'],
                         **self._image_fields(i), answer=q['answer'],
                         answer_labels=np.array([ANSWERS.index(q['answer'])], np.int32),
                         answer_scores=np.ones(1, np.float32))
                    for i, question_id, q in asked]
            for split, asked in self._questions.items()}

  @functools.cached_property
  def refexp(self) -> dict[str, list[dict[str, Any]]]:
    """Split -> rows {ref_id, text, image_index, image_id, target_box [4] pixels}."""
    per_image = self.config.refexps_per_image
    return {split: [dict(ref_id=i * per_image + k, text=text, **self._image_fields(i),
                         target_box=self.scenes[i].objects[obj].box)
                    for i in indices
                    for k, (text, obj) in enumerate(refexps(self.scenes[i], self.config))]
            for split, indices in self.split_images.items()}

  @functools.cached_property
  def nlvr2(self) -> dict[str, list[dict[str, Any]]]:
    """Split -> rows {pair_id, text, left/right_image_index, left/right_image_id,
    label, identifier} (`nlvr2_identifiers`: pairs of one statement share a sentence)."""
    rows, pair_id = {}, 0
    for split, indices in self.split_images.items():
      rows[split] = []
      rng = _rng(self.config.seed, _PAIRS, SPLITS.index(split))
      for _ in range(round(len(indices) * self.config.nlvr2_per_image)):
        left, right = (indices[int(k)] for k in rng.choice(len(indices), 2, replace=False))
        text, label = nlvr2_statement(self.scenes[left], self.scenes[right], self.config.seed,
                                      pair_id)
        rows[split].append(dict(
            pair_id=pair_id, text=text, left_image_index=left, right_image_index=right,
            left_image_id=self.scenes[left].image_id, right_image_id=self.scenes[right].image_id,
            label=label))
        pair_id += 1
      for row, identifier in zip(rows[split], nlvr2_identifiers(split, rows[split])):
        row['identifier'] = identifier
    return rows

  @functools.cached_property
  def snli_ve(self) -> dict[str, list[dict[str, Any]]]:
    """Split -> rows {pair_id (text, as SNLI-VE's pairID), text, image_index,
    image_id, label int into ENTAILMENT_LABELS}. Not in `texts`: its words are
    the other tables', and adding it would reorder the vocabulary."""
    per_image = self.config.snli_ve_per_image
    return {split: [dict(pair_id=str(i * per_image + k), text=text, **self._image_fields(i),
                         label=label)
                    for i in indices
                    for k, (text, label) in enumerate(
                        entailment_statements(self.scenes[i], self.config))]
            for split, indices in self.split_images.items()}

  @functools.cached_property
  def vcr(self) -> dict[str, list[dict[str, Any]]]:
    """Split -> rows {annot_id (VCR's `<split>-<n>`), image_index, image_id,
    question, answer_choices, rationale_choices, objects (VCR's token lists and
    object names, as JSON text: `vcr_question`), answer_label, rationale_label}.
    References index the ground-truth regions table (`gt_image_examples`:
    region k is object k). Not in `texts`: its words are the other tables'."""
    rows = {}
    for split, indices in self.split_images.items():
      rows[split] = []
      for i in indices:
        for example in vcr_questions(self.scenes[i], self.config):
          rows[split].append(dict(
              annot_id=f'{split}-{len(rows[split])}', **self._image_fields(i),
              **{k: json.dumps(example[k]) for k in VCR_JSON_FIELDS},
              answer_label=example['answer_label'],
              rationale_label=example['rationale_label']))
    return rows

  def texts(self) -> Iterator[str]:
    """Every sentence and answer of every table and split (the vocabulary's corpus)."""
    for table, field in ((self.captions, 'text'), (self.vqa, 'question'),
                         (self.refexp, 'text'), (self.nlvr2, 'text')):
      for rows in table.values():
        for row in rows:
          yield row[field]
    yield from ANSWERS

  @functools.cached_property
  def feature_extractor(self) -> FeatureExtractor:
    return FeatureExtractor(self.config.feature_dim, self.config.feature_grid,
                            self.config.feature_seed)

  def image_examples(self, indices: range) -> Iterator[dict[str, Any]]:
    """Images-table rows for `indices`: render, detect, extract features.

    Rows: index, image_id, image_h, image_w, num_boxes, boxes [N, 4] float32,
    features [N, F] float16, object_ids, object_conf, attr_ids, attr_conf [N],
    class_probs [N, C] float16.
    """
    for index in indices:
      scene = self.scenes[index]
      det = detect(scene, self.config)
      features = self.feature_extractor(render(scene, self.config.seed), det.boxes)
      yield dict(
          index=index, image_id=scene.image_id, image_h=scene.height, image_w=scene.width,
          num_boxes=len(det.boxes), boxes=det.boxes, features=features.astype(np.float16),
          object_ids=det.object_ids, object_conf=det.object_conf, attr_ids=det.attr_ids,
          attr_conf=det.attr_conf, class_probs=det.class_probs.astype(np.float16))

  def gt_image_examples(self, indices: range) -> Iterator[dict[str, Any]]:
    """Ground-truth-regions table rows for `indices` (the images table's fields):
    one region per object, its true box, in object order, with the features of
    the same extractor, true labels at confidence 1 and one-hot class
    distributions, as referring-expression models are trained and scored "on
    ground-truth boxes". Draws no random numbers: the other tables are unchanged.
    """
    for index in indices:
      scene = self.scenes[index]
      boxes = scene.boxes
      features = self.feature_extractor(render(scene, self.config.seed), boxes)
      shapes = np.array([o.shape for o in scene.objects], np.int32)
      colours = np.array([o.colour for o in scene.objects], np.int32)
      class_probs = np.zeros((len(boxes), len(OBJECT_CLASSES)), np.float16)
      class_probs[np.arange(len(boxes)), shapes + 1] = 1  # column 0 is background
      ones = np.ones(len(boxes), np.float32)
      yield dict(
          index=index, image_id=scene.image_id, image_h=scene.height, image_w=scene.width,
          num_boxes=len(boxes), boxes=boxes, features=features.astype(np.float16),
          object_ids=shapes, object_conf=ones, attr_ids=colours, attr_conf=ones,
          class_probs=class_probs)


@functools.lru_cache(maxsize=2)
def make_world(config: WorldConfig) -> World:
  """The world of `config`, built once per process (every table of a build shares it)."""
  return World(config)
