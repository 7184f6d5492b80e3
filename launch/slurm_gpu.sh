#!/usr/bin/env bash
# Pretrain on GPU nodes under SLURM: one process per GPU; jax.distributed reads
# the SLURM environment, so the same command runs unchanged on every task.
#
# Usage:
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm_gpu.sh \
#       configs/lxmert.py:base /shared/runs/lxmert [--config.field=value ...]
# Install first on the shared filesystem: pip install -e . 'jax[cuda12]'
#SBATCH --job-name=vlpjax
#SBATCH --signal=TERM@120
set -euo pipefail
config=$1 workdir=$2; shift 2
# --signal above gives each task SIGTERM two minutes before the time limit:
# vlpjax saves a checkpoint and exits, and resubmitting resumes.
srun python3 -m vlpjax.main --config="$config" --workdir="$workdir" "$@"
