"""Region features of images: pixels -> the regions a vlpjax model reads.

  extractor = RegionExtractor.from_orbax('/tmp/butd_detector')  # vlpjax.convert's output
  regions = extractor(image)   # a PIL image, or an RGB array [H, W, 3] in 0-255
  vlpjax.load(vqa_workdir).answer(['what is on the table?'], regions['features'],
                                  regions['boxes'], regions['image_size'])

Each image is resized as the detector was trained (short side `min_size`, long
side at most `max_size`). One image (`__call__`) runs by default at its own
size, as the Caffe original runs one image at a time: one compiled program per
resized shape. `padded_size=(h, w)` zero-pads every image to that size instead.

`batch(images)` runs several images at once, zero-padded to one bucket
(`bucket_size`: the resized sides rounded up to `BUCKET_MULTIPLE`, so a dataset
compiles a few programs) and split over the local devices' data axes. Padding
changes what the RPN proposes (as in the PyTorch port's batches, which pad to
the largest image), so padded regions are not those of the unpadded image; a
batch's regions equal those of `__call__` with `padded_size` set to its bucket.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from vlpjax import sharding
from vlpjax.detector import model as detector_model
from vlpjax.detector import weights as detector_weights

Params = Any
# Padded image sides are multiples of this: 640 x 1024 at most for the published
# config (short side 600, long side <= 1000), a handful of buckets per dataset.
BUCKET_MULTIPLE = 64


def bucket_size(config: detector_model.DetectorConfig, height: int, width: int,
                multiple: int = BUCKET_MULTIPLE) -> tuple[int, int]:
  """The padded (h, w) of a `height` x `width` image: its resized shape, each
  side rounded up to `multiple`."""
  new_h, new_w = detector_model.resized_shape(height, width, config.min_size, config.max_size)
  return -(-new_h // multiple) * multiple, -(-new_w // multiple) * multiple


def rgb_pixels(image: Any) -> np.ndarray:
  """A PIL image (any mode) or an RGB array [H, W, 3] in 0-255 -> the array.

  Raises:
    ValueError for any other shape.
  """
  if hasattr(image, 'convert'):  # a PIL image
    image = image.convert('RGB')
  pixels = np.asarray(image)
  if pixels.ndim != 3 or pixels.shape[-1] != 3 or min(pixels.shape[:2]) < 1:
    raise ValueError(f'an image must be RGB [H, W, 3], got shape {pixels.shape}')
  return pixels


class RegionExtractor:
  """The detector and its params, jitted for one image or a batch.

  Attributes:
    config: the `DetectorConfig`; params: the detector's params; mesh: the
    local devices' mesh that batches are split over.
  """

  def __init__(self, params: Params, config: detector_model.DetectorConfig | None = None,
               padded_size: tuple[int, int] | None = None):
    """`padded_size`: (h, w) every resized image of `__call__` is padded to;
    None: none (the module docstring)."""
    self.config = config or detector_model.DetectorConfig()
    self.params = params
    self.padded_size = padded_size
    detector = detector_model.FasterRCNN(self.config)
    detect = lambda p, images, sizes, scales: detector.apply(
        {'params': p}, images, sizes, scales)['regions']
    self._detect = jax.jit(detect)
    mesh_config = ml_collections.ConfigDict(dict(mesh=sharding.mesh_config()))
    self.mesh = sharding.make_mesh(mesh_config, jax.local_devices())
    self._batch_sharding = sharding.batch_sharding(self.mesh, mesh_config.mesh.data_axes)
    self._detect_batch = jax.jit(
        detect, in_shardings=(sharding.replicated(self.mesh),) + (self._batch_sharding,) * 3,
        out_shardings=self._batch_sharding)
    self._replicated_params = None

  @classmethod
  def from_orbax(cls, directory: str | os.PathLike,
                 config: detector_model.DetectorConfig | None = None,
                 padded_size: tuple[int, int] | None = None) -> RegionExtractor:
    """The extractor of the params `vlpjax.convert --from=butd-detectron2|hf-frcnn`
    wrote; `config` None: the one saved with them (`detector_weights.read_config`)."""
    from vlpjax import checkpointing  # pylint: disable=import-outside-toplevel
    config = config or detector_weights.read_config(directory)
    return cls(checkpointing.restore_params(directory, detector_weights.param_shapes(config)),
               config, padded_size)

  @property
  def batch_multiple(self) -> int:
    """Batches are padded to a multiple of this (the devices they are split over)."""
    return self._batch_sharding.num_devices

  def __call__(self, image: Any) -> dict[str, Any]:
    """The regions of one image.

    Args:
      image: a PIL image (any mode; converted to RGB) or an RGB array [H, W, 3]
        of values in 0-255.

    Returns:
      The selected regions (`FasterRCNN`'s, the valid ones only), each [N, ...]:
      boxes [N, 4] (x1, y1, x2, y2 in the image's pixels), features [N, F],
      classes, scores, attributes, attribute_scores [N], class_probs [N, K+1];
      and image_size (width, height).
    """
    pixels = rgb_pixels(image)
    inputs = detector_model.preprocess(self.config, [pixels[..., ::-1]], self.padded_size)
    return _valid_regions(jax.device_get(self._detect(self.params, *inputs)), [pixels])[0]

  def batch(self, images: Sequence[Any], padded_size: tuple[int, int] | None = None
            ) -> list[dict[str, Any]]:
    """The regions of each of `images` (as `__call__`), run together.

    The images are padded to `padded_size` (default: the largest of their
    buckets, `bucket_size`) and the batch to a multiple of `batch_multiple`,
    then split over the mesh's data axes.
    """
    pixels = [rgb_pixels(image) for image in images]
    if padded_size is None:
      buckets = [bucket_size(self.config, *p.shape[:2]) for p in pixels]
      padded_size = (max(b[0] for b in buckets), max(b[1] for b in buckets))
    # Filler rows repeat the first image, which fits the padding; their regions are dropped.
    filled = pixels + [pixels[0]] * (-len(pixels) % self.batch_multiple)
    inputs = detector_model.preprocess(self.config, [p[..., ::-1] for p in filled], padded_size)
    if self._replicated_params is None:
      self._replicated_params = jax.device_put(self.params, sharding.replicated(self.mesh))
    regions = jax.device_get(self._detect_batch(self._replicated_params, *inputs))
    return _valid_regions(regions, pixels)


def _valid_regions(regions: dict[str, np.ndarray], pixels: Sequence[np.ndarray]
                   ) -> list[dict[str, Any]]:
  """Per image of `pixels`, its valid regions of the batch's `regions` and its
  image_size (width, height); rows past `len(pixels)` are padding."""
  out = []
  for index, image in enumerate(pixels):
    valid = np.asarray(regions['valid'][index], bool)
    image_regions = {k: np.asarray(v[index])[valid] for k, v in regions.items()
                     if k not in ('valid', 'num_boxes')}
    image_regions['image_size'] = (image.shape[1], image.shape[0])
    out.append(image_regions)
  return out
