"""Retrieval evaluation cost: seconds for a 1,000-image x 5,000-caption matrix
(Flickr30k's test split) through each design's cross-encoder.

  python -m benchmarks.retrieval_eval [--sizes=tiny,base] [--blocks=3]
      [--image_block=16] [--caption_block=16] [--designs=uniter,lxmert,visualbert,vilbert]

Times the evaluator's block scorer (`vlpjax.tasks.retrieval.block_scorer`:
[image_block images] x [caption_block captions] per call, pairs formed on the
device) on this machine's devices with random weights and random inputs of the
size's shapes (`base`: each design's retrieval caption length and 36 regions of
2048-d features, as Flickr30k's BUTD features; `tiny`: the test shapes). The
1,000 x 5,000 figure is *extrapolated*: the mean seconds of `--blocks`
measured blocks (after one compiling call) times the number of blocks the
matrix takes. The accelerator figure is *projected*, not measured: the
matrix's forward FLOPs (`vlpjax.flops`) over one chip's dense bf16 peak times
an assumed MFU (`--mfu`). Writes benchmarks/results/retrieval_eval.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import time

import flax.linen as nn
import jax
import numpy as np

from vlpjax import flops, sharding
from vlpjax.models import DESIGNS, get_design
from vlpjax.tasks import retrieval

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                       'retrieval_eval.json')
NUM_IMAGES, NUM_CAPTIONS = 1_000, 5_000
BASE_REGIONS = 36
# The chip of the projection: dense bf16 peak (vlpjax.flops.PEAK_FLOPS).
CHIP = 'NVIDIA H200'


def random_inputs(config, design: str, images: int, captions: int, regions: int,
                  rng: np.random.Generator) -> tuple[dict, dict]:
  """Random image and caption blocks of the model's shapes."""
  model = config.model
  slots = get_design(design).leading_slots + regions
  loc_dim = get_design(design).loc_dim
  text_len = config.data.max_text_len
  image_batch = dict(
      region_feats=rng.normal(size=(images, slots, model.feature_dim)).astype(np.float16),
      region_loc=rng.uniform(size=(images, slots, loc_dim)).astype(np.float32),
      region_mask=np.ones((images, slots), np.int32))
  caption_batch = dict(
      input_ids=rng.integers(1, model.vocab_size, (captions, text_len)).astype(np.int32),
      text_mask=np.ones((captions, text_len), np.int32),
      token_type_ids=np.zeros((captions, text_len), np.int32))
  return image_batch, caption_batch


def measure(design: str, size: str, blocks: int, image_block: int, caption_block: int,
            mfu: float) -> dict:
  """Seconds per block and the 1,000 x 5,000 extrapolation of one design at `size`."""
  config = importlib.import_module(f'configs.{design}').get_config(f'{size},task=retrieval')
  regions = BASE_REGIONS if size == 'base' else 10
  mesh = sharding.make_mesh(config)
  rules = sharding.logical_axis_rules(config)
  model = retrieval.make_model(config)
  rng = np.random.default_rng(0)
  images, captions = random_inputs(config, design, image_block, caption_block, regions, rng)
  one = {k: v[:1] for k, v in {**images, **captions}.items()}
  one['region_feats'] = one['region_feats'].astype(np.float32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), **one)['params'])
  params = jax.device_put(params, sharding.replicated(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    image_sharding = sharding.batch_sharding(mesh, config.mesh.data_axes)
    caption_sharding = sharding.replicated(mesh)
    score = retrieval.block_scorer(model, image_sharding, caption_sharding)
    image_arrays = {k: jax.device_put(v, image_sharding) for k, v in images.items()}
    caption_arrays = retrieval.replicated_batch(caption_sharding, captions)
    began = time.perf_counter()
    jax.block_until_ready(score(params, image_arrays, caption_arrays))
    first = time.perf_counter() - began
    times = []
    for _ in range(blocks):
      began = time.perf_counter()
      jax.block_until_ready(score(params, image_arrays, caption_arrays))
      times.append(time.perf_counter() - began)
  per_block = float(np.mean(times))
  count = math.ceil(NUM_IMAGES / image_block) * math.ceil(NUM_CAPTIONS / caption_block)
  pair_flops = flops.forward_flops(config.model, config.data.max_text_len,
                                   get_design(design).leading_slots + regions, 0)
  peak = flops.PEAK_FLOPS[CHIP]['bfloat16']
  return dict(
      design=design, size=size, image_block=image_block, caption_block=caption_block,
      text_len=config.data.max_text_len, regions=regions, blocks_measured=blocks,
      first_call_seconds=first, seconds_per_block=per_block,
      pairs_per_second=image_block * caption_block / per_block,
      blocks_for_matrix=count, extrapolated_seconds=per_block * count,
      forward_flops_per_pair=pair_flops,
      projected_chip=CHIP, projected_peak_flops=peak, assumed_mfu=mfu,
      projected_chip_seconds=pair_flops * NUM_IMAGES * NUM_CAPTIONS / (peak * mfu))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='tiny,base')
  parser.add_argument('--designs', default=','.join(DESIGNS))
  parser.add_argument('--blocks', type=int, default=3, help='measured blocks per case')
  parser.add_argument('--base_blocks', type=int, default=1, help='measured blocks at base')
  parser.add_argument('--image_block', type=int, default=16)
  parser.add_argument('--caption_block', type=int, default=16)
  parser.add_argument('--base_image_block', type=int, default=4)
  parser.add_argument('--base_caption_block', type=int, default=4)
  parser.add_argument('--mfu', type=float, default=0.4,
                      help='assumed MFU of the projection (bf16 inference)')
  parser.add_argument('--note', default='', help='recorded with the results')
  args = parser.parse_args()
  rows = []
  for size in args.sizes.split(','):
    base = size == 'base'
    for design in args.designs.split(','):
      row = measure(design, size, args.base_blocks if base else args.blocks,
                    args.base_image_block if base else args.image_block,
                    args.base_caption_block if base else args.caption_block, args.mfu)
      rows.append(row)
      print(f"{design:10s} {size:5s} {row['image_block']}x{row['caption_block']} block: "
            f"{row['seconds_per_block']:.3f} s ({row['pairs_per_second']:.0f} pairs/s); "
            f"1,000 x 5,000 extrapolated {row['extrapolated_seconds']:,.0f} s on this CPU, "
            f"projected {row['projected_chip_seconds']:.1f} s on one {CHIP} at "
            f"{args.mfu:.0%} MFU", flush=True)
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, 'w', encoding='utf-8') as f:
    json.dump(dict(machine=dict(platform=platform.platform(), processor=platform.processor(),
                                cpus=os.cpu_count(), devices=[str(d) for d in jax.devices()],
                                jax=jax.__version__),
                   note=args.note, matrix=[NUM_IMAGES, NUM_CAPTIONS], results=rows),
              f, indent=2)
  print(f'wrote {RESULTS}')


if __name__ == '__main__':
  main()
