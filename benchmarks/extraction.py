"""Region extraction speed: images/s of the bottom-up-attention detector at the
published size, vlpjax on this machine's devices, beside HF's PyTorch port.

  python -m benchmarks.extraction [--images=4] [--batch_size=4] [--image_shape=480x640] \
      [--selection=hf] [--port_inputs=/tmp/extraction_inputs]
  <torch env>/bin/python benchmarks/extraction_port.py --port_dir=<the port's lxmert/ folder> \
      --inputs=/tmp/extraction_inputs

Random weights of the published architecture (`DetectorConfig()`: ResNet-101
C4, 6,000 -> 300 proposals, 1,600 classes, 400 attributes) and `--images`
random images of `--image_shape` (COCO's most common 480 x 640, resized to
600 x 800). `--selection`: 'generate_tsv' (the original features, 10-100 boxes)
or 'hf' (the port's, 10-36 boxes: the same work as the port). Batch 1 runs
each image alone at its own size, as the original extraction; `--batch_size`
images run padded to their bucket (`extractor.bucket_size`: 640 x 832) and
split over the devices. Each after one compiling call.

FLOPs per image are XLA's count (`cost_analysis`) of the batch-1 program
with every proposal in one res5 chunk (XLA counts a loop's body once). The accelerator figures are projected, not measured: those
FLOPs over one chip's float32 peak (the detector runs in float32: TF32 on
NVIDIA) times an assumed utilisation `--mfu`.

`--port_inputs=DIR` also writes the weights in the port's layout
(`weights.export_hf_frcnn`), the port's config and the images to DIR. The port
script (its own environment: torch 2.14.1, torchvision 0.29.1, and the port's
`modeling_frcnn.py`, `processing_image.py`, `utils.py` from
huggingface/transformers-research-projects, none of them vlpjax dependencies)
times the port on them on this CPU, compares its regions of the first image
with vlpjax's (`vlpjax_regions_0.npz`), and adds its figures to the results file.
Writes benchmarks/results/extraction.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from vlpjax import flops
from vlpjax.detector import extractor as extractor_lib
from vlpjax.detector import model as detector_model
from vlpjax.detector import weights

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'extraction.json')
CHIP = 'NVIDIA H200'
SELECTION_BOXES = {'generate_tsv': (10, 100), 'hf': (10, 36)}


def hf_config(config: detector_model.DetectorConfig) -> dict:
  """The port's config (`utils.Config` fields) of the same detector."""
  return {
      'MODEL': dict(DEVICE='cpu', PIXEL_MEAN=list(config.pixel_mean), PIXEL_STD=[1.0] * 3,
                    MAX_POOL=config.caffe_maxpool),
      'RESNETS': dict(NORM='BN', STEM_OUT_CHANNELS=config.stem_channels, OUT_FEATURES=['res4'],
                      DEPTH=101, NUM_GROUPS=1, WIDTH_PER_GROUP=config.width_per_group,
                      RES2_OUT_CHANNELS=config.res2_channels, STRIDE_IN_1X1=config.stride_in_1x1,
                      RES5_DILATION=1),
      'BACKBONE': dict(FREEZE_AT=2),
      'PROPOSAL_GENERATOR': dict(HIDDEN_CHANNELS=config.rpn_hidden, MIN_SIZE=0),
      'RPN': dict(IN_FEATURES=['res4'], NMS_THRESH=config.rpn_nms_threshold,
                  BATCH_SIZE_PER_IMAGE=256, POSITIVE_FRACTION=0.5, SMOOTH_L1_BETA=0.0,
                  LOSS_WEIGHT=1.0, PRE_NMS_TOPK_TRAIN=config.rpn_pre_nms_topk,
                  PRE_NMS_TOPK_TEST=config.rpn_pre_nms_topk,
                  POST_NMS_TOPK_TRAIN=config.rpn_post_nms_topk,
                  POST_NMS_TOPK_TEST=config.rpn_post_nms_topk, BOUNDARY_THRESH=-1,
                  BBOX_REG_WEIGHTS=list(config.rpn_box_weights), IOU_THRESHOLDS=[0.3, 0.7],
                  IOU_LABELS=[0, -1, 1]),
      'ANCHOR_GENERATOR': dict(SIZES=[list(config.anchor_sizes)],
                               ASPECT_RATIOS=[list(config.anchor_ratios)],
                               OFFSET=config.anchor_offset),
      'ROI_HEADS': dict(POSITIVE_FRACTION=0.25, IN_FEATURES=['res4'],
                        NUM_CLASSES=config.num_classes, PROPOSAL_APPEND_GT=True,
                        SCORE_THRESH_TEST=config.score_threshold,
                        NMS_THRESH_TEST=config.nms_threshold),
      'ROI_BOX_HEAD': dict(CLS_AGNOSTIC_BBOX_REG=False, POOLER_RESOLUTION=config.pooler_resolution,
                           POOLER_SAMPLING_RATIO=0, RES5HALVE=config.res5_dilation == 1,
                           ATTR=True, NUM_ATTRS=config.num_attributes, SMOOTH_L1_BETA=0.0,
                           BBOX_REG_WEIGHTS=list(config.roi_box_weights)),
      'MIN_DETECTIONS': config.min_boxes, 'MAX_DETECTIONS': config.max_boxes,
      'INPUT': dict(MIN_SIZE_TEST=config.min_size, MAX_SIZE_TEST=config.max_size, FORMAT='BGR'),
      'SIZE_DIVISIBILITY': 0, 'PAD_VALUE': 0.0,
  }


def random_params(config: detector_model.DetectorConfig) -> dict:
  """Random params with activations of order 1 through the 101 layers: flax's
  initialisers, frozen batch norms of unit variance and small scale."""
  size = 2 * detector_model.FEATURE_STRIDE
  params = jax.jit(detector_model.FasterRCNN(config).init)(
      jax.random.key(0), np.zeros((1, size, size, 3), np.float32),
      np.full((1, 2), size, np.int32), np.ones((1, 2), np.float32))['params']
  rng = np.random.default_rng(0)

  def fill(path, value):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      return np.ones(value.shape, np.float32)
    if "'scale'" in name:
      return rng.uniform(0.2, 0.5, value.shape).astype(np.float32)
    return np.asarray(value)
  return jax.tree_util.tree_map_with_path(fill, params)


def timed(run) -> float:
  """Seconds `run()` takes (its results are on the host)."""
  began = time.perf_counter()
  run()
  return time.perf_counter() - began


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=4, help='images timed per case')
  parser.add_argument('--batch_size', type=int, default=4)
  parser.add_argument('--image_shape', default='480x640', help='HxW of the random images')
  parser.add_argument('--selection', choices=sorted(SELECTION_BOXES), default='hf')
  parser.add_argument('--mfu', type=float, default=0.4, help='assumed utilisation (projection)')
  parser.add_argument('--port_inputs', default=None, help='write the port\'s inputs here')
  parser.add_argument('--note', default='', help='recorded with the results')
  args = parser.parse_args()
  height, width = (int(x) for x in args.image_shape.split('x'))
  min_boxes, max_boxes = SELECTION_BOXES[args.selection]
  config = detector_model.DetectorConfig(selection=args.selection, min_boxes=min_boxes,
                                         max_boxes=max_boxes)
  params = random_params(config)
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (height, width, 3)).astype(np.uint8) for _ in range(args.images)]
  extractor = extractor_lib.RegionExtractor(params, config)

  single_inputs = detector_model.preprocess(config, [images[0][..., ::-1]])
  # All proposals in one res5 chunk: XLA counts a loop's body once, so the scan
  # over chunks would be undercounted otherwise.
  one_chunk = detector_model.FasterRCNN(config.replace(roi_batch=config.rpn_post_nms_topk))
  image_flops = float(jax.jit(one_chunk.apply).lower({'params': params}, *single_inputs)
                      .cost_analysis()['flops'])
  first = timed(lambda: extractor(images[0]))
  single = timed(lambda: [extractor(image) for image in images])
  bucket = extractor_lib.bucket_size(config, height, width)
  batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
  batch_first = timed(lambda: extractor.batch(batches[0]))
  batched = timed(lambda: [extractor.batch(b) for b in batches])
  regions = extractor(images[0])
  peak = flops.peak_flops(CHIP, 'float32')
  rows = [
      dict(impl='vlpjax', case='batch 1 (own size)', padded_size=list(single_inputs[0].shape[1:3]),
           first_call_seconds=first, seconds=single, images=len(images),
           images_per_second=len(images) / single),
      dict(impl='vlpjax', case=f'batch {args.batch_size} (bucket)', padded_size=list(bucket),
           first_call_seconds=batch_first, seconds=batched, images=len(images),
           images_per_second=len(images) / batched),
  ]
  for row in rows:
    print(f"vlpjax {row['case']:20s} {row['images_per_second']:.3f} images/s "
          f"({row['seconds']:.1f} s for {row['images']}; first call {row['first_call_seconds']:.1f} s)",
          flush=True)
  projected = peak * args.mfu / image_flops
  print(f'XLA FLOPs per image (batch 1, {single_inputs[0].shape[1]}x{single_inputs[0].shape[2]}): '
        f'{image_flops / 1e12:.2f} TFLOP; projected {projected:.0f} images/s on one {CHIP} '
        f'at {args.mfu:.0%} of its float32 peak; {len(regions["boxes"])} regions kept')
  results = dict(
      machine=dict(platform=platform.platform(), processor=platform.processor(),
                   cpus=os.cpu_count(), devices=[str(d) for d in jax.devices()],
                   jax=jax.__version__),
      note=args.note, image_shape=[height, width], selection=args.selection,
      boxes=[min_boxes, max_boxes], flops_per_image=image_flops,
      projection=dict(chip=CHIP, float32_peak=peak, assumed_mfu=args.mfu,
                      images_per_second=projected),
      results=rows)
  if args.port_inputs:
    os.makedirs(args.port_inputs, exist_ok=True)
    np.savez(os.path.join(args.port_inputs, 'weights.npz'), **weights.export_hf_frcnn(params, config))
    np.savez(os.path.join(args.port_inputs, 'images.npz'), *images)
    np.savez(os.path.join(args.port_inputs, 'vlpjax_regions_0.npz'),
             **{k: regions[k] for k in ('boxes', 'features', 'classes', 'scores')})
    with open(os.path.join(args.port_inputs, 'hf_config.json'), 'w', encoding='utf-8') as f:
      json.dump(dict(hf_config(config), batch_size=args.batch_size), f, indent=1)
    print(f'wrote the port\'s inputs to {args.port_inputs}')
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {RESULTS}')


if __name__ == '__main__':
  main()
