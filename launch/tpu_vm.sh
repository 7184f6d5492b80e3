#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM slice (one host or a pod): installs vlpjax on every
# worker and starts the same command on all of them; jax.distributed finds its
# peers from the TPU metadata, and each process reads its own data shard.
#
# Usage:
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [--config.field=value ...]
# Example:
#   launch/tpu_vm.sh vlp-v5e us-west4-a v5litepod-16 configs/uniter.py:base \
#       gs://my-bucket/uniter --config.data.data_dir=gs://my-bucket/tfds
#
# WORKDIR should be a gs:// path so checkpoints outlive a preempted VM; rerunning
# the same command after preemption resumes from the latest checkpoint there.
# The code shipped is this checkout's HEAD (git archive). Set CREATE=1 to
# create the VM (spot) first.
set -euo pipefail
if [[ $# -lt 5 ]]; then sed -n '2,16p' "$0"; exit 2; fi
name=$1 zone=$2 accelerator=$3 config=$4 workdir=$5; shift 5
archive=$(mktemp --suffix=.tar.gz)
git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
if [[ ${CREATE:-0} == 1 ]]; then
  gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
    --accelerator-type="$accelerator" --version=tpu-ubuntu2204-base --spot
fi
gcloud compute tpus tpu-vm scp "$archive" "$name:vlpjax.tar.gz" --zone="$zone" --worker=all
remote="set -e
pip install -q 'jax[tpu]' 2>&1 | tail -1
rm -rf vlpjax && mkdir vlpjax && tar -xzf vlpjax.tar.gz -C vlpjax
cd vlpjax && pip install -q -e .
python3 -m vlpjax.main --config=$config --workdir=$workdir $*"
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote"
