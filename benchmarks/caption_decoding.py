"""Caption decoding speed: greedy and beam search, KV cache vs recomputing the
prefix, per design and size.

  python -m benchmarks.caption_decoding [--sizes=small,base] [--beams=1,5]
      [--designs=uniter,lxmert,visualbert,vilbert] [--batch=8] [--base_batch=2]
      [--length=20] [--repeats=2] [--base_repeats=1] [--results=FILE]

Each case decodes a batch of `--batch` images (`--base_batch` at base, whose
recomputing takes minutes on a CPU) of 36 random regions of the size's
feature width, with random weights for exactly `--length` tokens (the
[SEP] id is set past the vocabulary so no caption ends early: every case does
the same work), through `vlpjax.tasks.caption.decode_batch` jitted, after one
compiling call; the figure is the mean of `--repeats` (`--base_repeats`) calls. tokens/s counts
the batch's decoded tokens (beams not multiplied), images/s the images.
Writes benchmarks/results/caption_decoding.json or `--results`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlpjax.models import DESIGNS, get_design
from vlpjax.tasks import caption

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                       'caption_decoding.json')
REGIONS = 36


def setup(design: str, size: str, batch: int, length: int):
  """(config, model, params, regions) of a random model and images."""
  config = importlib.import_module(f'configs.{design}').get_config(f'{size},task=caption')
  config.data.max_text_len = length + 1
  config.caption.max_len = length
  # An end token no model emits: every case decodes `length` tokens.
  config.caption.token_ids.sep = config.model.vocab_size + 1
  model = caption.build_model(config.model)
  info = get_design(design)
  slots = info.leading_slots + REGIONS
  rng = np.random.default_rng(0)
  regions = dict(
      region_feats=jnp.asarray(rng.normal(size=(batch, slots, config.model.feature_dim)),
                               jnp.float32),
      region_loc=jnp.asarray(rng.uniform(size=(batch, slots, info.loc_dim)), jnp.float32),
      region_mask=jnp.ones((batch, slots), jnp.int32))
  text = jnp.ones((1, config.data.max_text_len), jnp.int32)
  params = nn.meta.unbox(jax.jit(model.init)(
      jax.random.key(0), text, text, jnp.zeros_like(text),
      **{k: v[:1] for k, v in regions.items()}, positions=jnp.zeros((1, 1), jnp.int32),
      attention_mask=jnp.asarray(caption.seq2seq_mask(config.data.max_text_len, slots))
  )['params'])
  return config, model, params, regions


def measure(config, model, params, regions, beam: int, kind: str, repeats: int) -> dict:
  config.caption.update(beam_size=beam, decoding=kind)
  run = jax.jit(lambda p, r: caption.decode_batch(model, p, r, config))
  began = time.perf_counter()
  result = jax.block_until_ready(run(params, regions))
  first = time.perf_counter() - began
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    result = jax.block_until_ready(run(params, regions))
    times.append(time.perf_counter() - began)
  seconds = float(np.mean(times))
  tokens = int(np.asarray(result.lengths).sum())
  batch = regions['region_mask'].shape[0]
  return dict(beam=beam, decoding=kind, first_call_seconds=first, seconds=seconds,
              tokens=tokens, tokens_per_second=tokens / seconds,
              images_per_second=batch / seconds)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='small,base')
  parser.add_argument('--designs', default=','.join(DESIGNS))
  parser.add_argument('--beams', default='1,5')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--base_batch', type=int, default=2)
  parser.add_argument('--length', type=int, default=20)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--base_repeats', type=int, default=1)
  parser.add_argument('--note', default='', help='recorded with the results')
  parser.add_argument('--results', default=RESULTS, help='the results file')
  args = parser.parse_args()
  rows = []
  for size in args.sizes.split(','):
    for design in args.designs.split(','):
      batch = args.base_batch if size == 'base' else args.batch
      repeats = args.base_repeats if size == 'base' else args.repeats
      config, model, params, regions = setup(design, size, batch, args.length)
      for beam in map(int, args.beams.split(',')):
        cases = {kind: measure(config, model, params, regions, beam, kind, repeats)
                 for kind in caption.DECODINGS}
        speedup = cases['recompute']['seconds'] / cases['cache']['seconds']
        for kind, row in cases.items():
          rows.append(dict(row, design=design, size=size, batch=batch,
                           length=args.length, cache_speedup=speedup))
        print(f"{design:10s} {size:5s} beam {beam}: cache "
              f"{cases['cache']['tokens_per_second']:8.1f} tok/s "
              f"{cases['cache']['images_per_second']:6.2f} img/s | recompute "
              f"{cases['recompute']['tokens_per_second']:8.1f} tok/s "
              f"{cases['recompute']['images_per_second']:6.2f} img/s | cache x{speedup:.1f}",
              flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
  with open(args.results, 'w', encoding='utf-8') as f:
    json.dump(dict(machine=dict(platform=platform.platform(), processor=platform.processor(),
                                cpus=os.cpu_count(), devices=[str(d) for d in jax.devices()],
                                jax=jax.__version__),
                   note=args.note, regions=REGIONS, results=rows), f, indent=2)
  print(f'wrote {args.results}')


if __name__ == '__main__':
  main()
