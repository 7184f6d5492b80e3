r"""Pretrain a fusion design.

  python -m vlpjax.main --config=configs/uniter.py:base --workdir=/tmp/uniter \
      [--config.train.global_batch_size=64 --config.mesh.shape='(-1,2,1)' ...]

With no data options it pretrains on the embedded world (`vlp_world`, built
under `--config.data.data_dir` on first use). Rerunning the same command resumes
from the newest checkpoint in the workdir. SIGTERM saves a checkpoint and exits.

Multi-process: on Cloud TPU, Slurm, Open MPI or Kubernetes,
`jax.distributed.initialize()` finds the coordinator from the environment (every
process runs the same command); elsewhere pass `--coordinator_address`,
`--num_processes` and `--process_id`.

Compilation cache: compiled programs persist in `config.compilation_cache_dir`
(local or gs://; when it is empty, JAX's own `$JAX_COMPILATION_CACHE_DIR`), so a
resumed or restarted run skips most of its compilation.
"""
from __future__ import annotations

import logging

from absl import app, flags
import jax
import ml_collections
from ml_collections import config_flags

from vlpjax import config_lib
from vlpjax import sharding

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Run config file, e.g. configs/uniter.py:base.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and TensorBoard go here.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for multi-process runs outside '
    'auto-detected clusters.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


def set_compilation_cache(config: ml_collections.ConfigDict) -> str | None:
  """Points JAX's persistent compilation cache at `config.compilation_cache_dir`
  and returns it; None (JAX keeps `$JAX_COMPILATION_CACHE_DIR`, which it reads
  itself) when the field is empty. Call before anything is compiled."""
  directory = config.compilation_cache_dir
  if not directory:
    return None
  jax.config.update('jax_compilation_cache_dir', directory)
  logging.info('persistent compilation cache: %s', directory)
  return directory


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config_lib.clean_logging()
  set_compilation_cache(_CONFIG.value)
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
  from vlpjax import train  # pylint: disable=g-import-not-at-top  (after distributed init)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.flags_parser(_CONFIG))
