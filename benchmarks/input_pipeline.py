"""Input-pipeline throughput: examples/s of pretraining batches on this machine.

  python -m benchmarks.input_pipeline [--data_dir=DIR] [--batches=20]  (from the repo root)

Batches of 256 examples, 36 regions of 2048-d float16 features, 20-token text,
LXMERT inputs (4-d boxes; no class distributions), in-process (worker_count=0,
one prefetch thread) and with 1 and 2 grain worker processes, reading the images
from ArrayRecord per batch, from memory (`cache_images`) and from the raw
memory-mapped store on local disk (`images_store_dir`, in the temporary
directory; built before the timing). The store is timed twice: as it is (the OS
keeps its pages in memory while they fit), and with its pages evicted from the
page cache before every batch (`posix_fadvise(DONTNEED)`, in-process only), so
that every batch reads its images from the disk, as a table much larger than
memory would. Reads the embedded
world's default tables under --data_dir if they are built there; otherwise it
writes a synthetic images table in the data contract's format (ReLU of Gaussians,
about half zeros, like detector features) plus a captions table into a temporary
directory. Writes the figures, the data used, its on-disk size per image and a
machine description to benchmarks/results/input_pipeline.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from vlpjax.data import input_pipeline, tables, vlp_world
from vlpjax.data.features_builder import images_features

BATCH_SIZE = 256
NUM_REGIONS = 36
FEATURE_DIM = 2048
TEXT_LEN = 20
SYNTHETIC_IMAGES = 1000
CAPTIONS_PER_IMAGE = 5
WORDS = [f'w{i}' for i in range(200)]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                       'input_pipeline.json')


# Unregistered: the pipeline reads the written files without these classes, so
# grain's worker processes need not import this script.
class BenchmarkImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Synthetic images table in the data contract's format (no class_probs)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                 features=images_features(FEATURE_DIM, num_classes=None))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(SYNTHETIC_IMAGES):
      corner = rng.uniform(0, 300, (NUM_REGIONS, 2)).astype(np.float32)
      yield i, dict(
          index=i, image_id=f'{i:012d}', image_h=480, image_w=640, num_boxes=NUM_REGIONS,
          boxes=np.concatenate([corner, corner + rng.uniform(10, 300, (NUM_REGIONS, 2))],
                               1).astype(np.float32),
          features=np.maximum(rng.standard_normal((NUM_REGIONS, FEATURE_DIM)), 0
                              ).astype(np.float16),
          object_ids=rng.integers(1, 1601, NUM_REGIONS).astype(np.int32),
          object_conf=rng.random(NUM_REGIONS).astype(np.float32),
          attr_ids=rng.integers(0, 400, NUM_REGIONS).astype(np.int32),
          attr_conf=rng.random(NUM_REGIONS).astype(np.float32))


class BenchmarkCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Synthetic captions: CAPTIONS_PER_IMAGE of 8-16 words per image."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self,
                                 features=vlp_world.table_features('captions', FEATURE_DIM))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(1)
    for c in range(SYNTHETIC_IMAGES * CAPTIONS_PER_IMAGE):
      image = c // CAPTIONS_PER_IMAGE
      text = ' '.join(rng.choice(WORDS, rng.integers(8, 17)))
      yield c, dict(caption_id=c, text=text, image_index=image, image_id=f'{image:012d}')


def synthetic_config(data_dir: str):
  """Writes the synthetic tables and a vocabulary; returns their data config."""
  for builder in (BenchmarkImages(data_dir=data_dir), BenchmarkCaptions(data_dir=data_dir)):
    builder.download_and_prepare(file_format='array_record')
  vocab = os.path.join(data_dir, 'vocab.txt')
  with open(vocab, 'w') as f:
    f.write('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + WORDS) + '\n')
  config = input_pipeline.default_data_config()
  config.update(name='benchmark', data_dir=data_dir, vocab_file=vocab,
                images_dataset='benchmark_images', captions_dataset='benchmark_captions')
  return config


def embedded_config(data_dir: str):
  """The embedded world's default tables under `data_dir`, or None if not built."""
  config = input_pipeline.default_data_config()
  config.update(data_dir=data_dir, build_if_missing=False)
  try:
    info = tables.dataset_info(config)
  except Exception:  # pylint: disable=broad-except
    return None
  return config if info['feature_dim'] == FEATURE_DIM else None


def bytes_per_image(config) -> float:
  builder = tfds.builder(tables.table_name(config, 'images'), data_dir=config.data_dir)
  files = [f for f in os.listdir(builder.data_dir) if '.array_record' in f]
  size = sum(os.path.getsize(os.path.join(builder.data_dir, f)) for f in files)
  return size / builder.info.splits[config.images_split].num_examples


def evict(directory: str) -> None:
  """Drops the page-cache pages of every file under `directory`."""
  for root, _, files in os.walk(directory):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def measure(config, worker_count: int, read: str, batches: int, store_dir: str) -> dict:
  """examples/s with images read as `read`: 'records', 'memory', 'store' or
  'store, evicted' (module docstring)."""
  config = config.copy_and_resolve_references()
  config.update(worker_count=worker_count, cache_images=read == 'memory',
                images_store_dir=store_dir if read.startswith('store') else None,
                max_regions=NUM_REGIONS, max_text_len=TEXT_LEN)
  start = time.perf_counter()
  iterator = input_pipeline.make_pretraining_iterator(config, 'lxmert',
                                                      global_batch_size=BATCH_SIZE, seed=0)
  first = next(iterator)
  startup = time.perf_counter() - start
  assert first['region_feats'].shape == (BATCH_SIZE, NUM_REGIONS, FEATURE_DIM)
  next(iterator)  # let the workers fill their buffers once
  cold = read == 'store, evicted'
  evicting = 0.0
  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    if cold:
      began = time.perf_counter()
      evict(store_dir)
      evicting += time.perf_counter() - began
    next(iterator)
  seconds = time.perf_counter() - start - evicting
  cpu_seconds = time.process_time() - start_cpu
  iterator.close()
  run = dict(worker_count=worker_count, read=read, batches=batches,
             seconds=round(seconds, 3), examples_per_s=round(batches * BATCH_SIZE / seconds, 1),
             startup_s=round(startup, 2), load_average=os.getloadavg())
  if worker_count == 0:
    # All the work is in this process: its CPU time is the pipeline's cost, which
    # the other jobs on a shared machine inflate less than wall time.
    run['cpu_s_per_batch'] = round(cpu_seconds / batches, 4)
    run['examples_per_cpu_s'] = round(batches * BATCH_SIZE / cpu_seconds, 1)
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default=os.path.expanduser('~/tensorflow_datasets'))
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    config = embedded_config(args.data_dir)
    data = 'embedded world default tables in ' + args.data_dir
    if config is None:
      start = time.perf_counter()
      config = synthetic_config(tmp)
      data = (f'synthetic contract-format tables ({SYNTHETIC_IMAGES} images, '
              f'{SYNTHETIC_IMAGES * CAPTIONS_PER_IMAGE} captions), written in '
              f'{time.perf_counter() - start:.1f}s')
    print(f'data: {data}')
    per_image = bytes_per_image(config)
    print(f'on-disk size per image: {per_image / 1024:.1f} KiB '
          f'(raw float16 features {NUM_REGIONS * FEATURE_DIM * 2 / 1024:.1f} KiB)')
    runs = []
    store_dir = os.path.join(tmp, 'store')
    start = time.perf_counter()
    stored = config.copy_and_resolve_references()
    stored.update(images_store_dir=store_dir, max_regions=NUM_REGIONS)
    tables.open_image_table(stored)  # builds the store
    store_s = time.perf_counter() - start
    print(f'stored the images table in {store_s:.1f} s')
    cases = [(read, workers) for read in ('records', 'memory', 'store')
             for workers in args.workers] + [('store, evicted', 0)]
    for read, workers in cases:
      run = measure(config, workers, read, args.batches, store_dir)
      cpu = (f'; {run["examples_per_cpu_s"]:.0f} examples per CPU-second'
             if 'examples_per_cpu_s' in run else '')
      print(f'worker_count={workers} images from {read}: '
            f'{run["examples_per_s"]:.0f} examples/s ({run["batches"]} batches of '
            f'{BATCH_SIZE} in {run["seconds"]:.2f}s; first batch after '
            f'{run["startup_s"]:.1f}s; load average {run["load_average"][0]:.1f}{cpu})',
            flush=True)
      runs.append(run)
  results = dict(
      batch_size=BATCH_SIZE, regions=NUM_REGIONS, feature_dim=FEATURE_DIM,
      text_len=TEXT_LEN, design='lxmert', data=data, bytes_per_image=round(per_image),
      store_build_s=round(store_s, 1),
      runs=runs,
      machine=dict(cpu_count=os.cpu_count(), load_average=os.getloadavg(),
                   platform=platform.platform(), processor=platform.processor(),
                   python=platform.python_version(), numpy=np.__version__,
                   jax=jax.__version__, grain=getattr(grain, '__version__', 'unknown'),
                   tfds=tfds.__version__))
  os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
  with open(RESULTS, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {RESULTS}')


if __name__ == '__main__':
  main()
