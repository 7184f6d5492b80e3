"""Region features of single images: pixels -> the regions a vlpjax model reads.

  extractor = RegionExtractor.from_orbax('/tmp/butd_detector')  # vlpjax.convert's output
  regions = extractor(image)   # a PIL image, or an RGB array [H, W, 3] in 0-255
  vlpjax.load(vqa_workdir).answer(['what is on the table?'], regions['features'],
                                  regions['boxes'], regions['image_size'])

Each image is resized as the detector was trained (short side `min_size`, long
side at most `max_size`). By default it then runs at its own size, as the Caffe
original runs one image at a time: one compiled program per resized shape.
`padded_size=(h, w)` zero-pads every image to that size instead: one program
for all, but the padding changes what the RPN proposes (as it does in the
PyTorch port's batches, which pad to the largest image), so the regions are
not those of the unpadded image.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from vlpjax.detector import model as detector_model
from vlpjax.detector import weights as detector_weights

Params = Any


class RegionExtractor:
  """The detector and its params, jitted for one image at a time.

  Attributes:
    config: the `DetectorConfig`; params: the detector's params.
  """

  def __init__(self, params: Params, config: detector_model.DetectorConfig | None = None,
               padded_size: tuple[int, int] | None = None):
    """`padded_size`: (h, w) every resized image is padded to; None: none (the
    module docstring)."""
    self.config = config or detector_model.DetectorConfig()
    self.params = params
    self.padded_size = padded_size
    detector = detector_model.FasterRCNN(self.config)
    self._detect = jax.jit(lambda p, images, sizes, scales: detector.apply(
        {'params': p}, images, sizes, scales)['regions'])

  @classmethod
  def from_orbax(cls, directory: str | os.PathLike,
                 config: detector_model.DetectorConfig | None = None,
                 padded_size: tuple[int, int] | None = None) -> RegionExtractor:
    """The extractor of the params `vlpjax.convert --from=butd-detectron2|hf-frcnn` wrote."""
    from vlpjax import checkpointing  # pylint: disable=import-outside-toplevel
    config = config or detector_model.DetectorConfig()
    return cls(checkpointing.restore_params(directory, detector_weights.param_shapes(config)),
               config, padded_size)

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
    if hasattr(image, 'convert'):  # a PIL image
      image = image.convert('RGB')
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or min(pixels.shape[:2]) < 1:
      raise ValueError(f'an image must be RGB [H, W, 3], got shape {pixels.shape}')
    height, width = pixels.shape[:2]
    bgr = pixels[..., ::-1].astype(np.float32)
    inputs = detector_model.preprocess(self.config, [bgr], self.padded_size)
    regions = jax.device_get(self._detect(self.params, *inputs))
    valid = np.asarray(regions['valid'][0], bool)
    out = {k: np.asarray(v[0])[valid] for k, v in regions.items()
           if k not in ('valid', 'num_boxes')}
    out['image_size'] = (width, height)
    return out
