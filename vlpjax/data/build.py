"""Builds every table of the embedded world with TFDS.

  python -m vlpjax.data.build --size=default --data_dir=~/tensorflow_datasets
  python -m vlpjax.data.build --size=tiny --data_dir=/tmp/vlp_world

Tables already built under `data_dir` are kept. Prints each table's location,
its size on disk and the wall and CPU time taken.
"""
from __future__ import annotations

import os
import time

from absl import app
from absl import flags
import tensorflow_datasets as tfds

from vlpjax import config_lib, paths
from vlpjax.data import vlp_world

_SIZE = flags.DEFINE_enum('size', 'default', list(vlp_world.WORLD_SIZES),
                            'World size to build.')
_DATA_DIR = flags.DEFINE_string('data_dir', '~/tensorflow_datasets', 'TFDS data directory.')


def directory_bytes(path: str) -> int:
  return sum((root / name).stat().length
             for root, _, names in paths.path(path).walk() for name in names)


def build(size: str, data_dir: str) -> dict[str, str]:
  """Builds the tables of world `size` under `data_dir`; returns table -> data directory."""
  data_dir = os.fspath(paths.path(data_dir))
  start_wall, start_cpu = time.perf_counter(), time.process_time()
  built = {}
  for table in vlp_world.TABLES:
    wall, cpu = time.perf_counter(), time.process_time()
    builder = tfds.builder(f'vlp_world/{size}_{table}', data_dir=data_dir)
    builder.download_and_prepare()
    built[table] = builder.data_dir
    splits = ', '.join(f'{name} {info.num_examples}' for name, info in builder.info.splits.items())
    print(f'{table:9s} {builder.data_dir}  [{splits}]  '
          f'{directory_bytes(builder.data_dir) / 2**20:.1f} MiB  '
          f'{time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} s CPU',
          flush=True)
  print(f'vlp_world/{size}: wrote {data_dir}/vlp_world/{size}_* in '
        f'{time.perf_counter() - start_wall:.1f} s wall, '
        f'{time.process_time() - start_cpu:.1f} s CPU (this process)')
  return built


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config_lib.clean_logging()
  build(_SIZE.value, _DATA_DIR.value)


if __name__ == '__main__':
  app.run(main)
