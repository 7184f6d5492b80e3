#!/usr/bin/env bash
# Pretrain on GPU nodes under SLURM: one process per node (all its GPUs), the
# same command on every node; jax.distributed reads the SLURM environment.
#
# Submit (from a login node; vlpjax and jax[cuda12] installed on the shared
# filesystem, e.g. `pip install -e . 'jax[cuda12]'`, and PYTHON naming that
# interpreter if it is not the python3 on PATH):
#   launch/slurm_gpu.sh [--dry-run] [--nodes=N] [--gpus-per-node=G] [--time=T]
#       [--signal-lead=SECONDS] [--partition=P] [--account=A] [--qos=Q]
#       [--job-name=NAME] [--sbatch-arg=ARG ...] CONFIG WORKDIR [FLAG ...]
# (defaults: 1 node, 8 GPUs, 24:00:00, 300 s, vlpjax); e.g.
#   launch/slurm_gpu.sh --nodes=2 --time=12:00:00 configs/lxmert.py:base /shared/runs/lxmert \
#       --config.model.dtype=bfloat16 --config.mesh.shape='(-1,4,1)'
#
# That runs `sbatch --nodes=2 --ntasks-per-node=1 --exclusive --requeue
# --signal=B:USR1@300 ... launch/slurm_gpu.sh CONFIG WORKDIR FLAG...`; in the job
# (SLURM_JOB_ID set) this script runs, once, `srun ... python3 -m vlpjax.main
# --config=CONFIG --workdir=WORKDIR FLAG...` on every node. --dry-run prints the
# command instead of running it (in a job: the environment and the srun line).
#
# Resume: SLURM sends USR1 to this script --signal-lead seconds before --time
# runs out; it sends SIGTERM to the training processes, which save a checkpoint
# at the same step and exit, and then requeues the job (`scontrol requeue`),
# which reruns it and resumes from that checkpoint. A preemption or node failure
# requeues the job too (--requeue; a preemption's SIGTERM also saves first); the
# rerun resumes from the newest checkpoint in WORKDIR.
#SBATCH --job-name=vlpjax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

usage() { sed -n '2,26p' "$0" >&2; exit 2; }

# XLA flags from the JAX GPU performance tips
# (https://docs.jax.dev/en/latest/gpu_performance_tips.html); XLA_FLAGS from the
# environment come after, so they win.
XLA_GPU_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_triton_gemm_any=true"

dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi

# Prints an argv as one shell-quoted line.
print_command() { printf '%q ' "$@" | sed 's/ $//'; echo; }

submit() {
  local nodes=1 gpus=8 time=24:00:00 lead=300 job_name=vlpjax
  local -a extra=()
  while [[ $# -gt 0 && $1 == --* ]]; do
    case $1 in
      --dry-run) dry_run=1 ;;
      --nodes=*) nodes=${1#*=} ;;
      --gpus-per-node=*) gpus=${1#*=} ;;
      --time=*) time=${1#*=} ;;
      --signal-lead=*) lead=${1#*=} ;;
      --job-name=*) job_name=${1#*=} ;;
      --partition=*|--account=*|--qos=*|--constraint=*) extra+=("$1") ;;
      --sbatch-arg=*) extra+=("${1#*=}") ;;
      --help|-h) usage ;;
      *) echo "slurm_gpu.sh: unknown option $1" >&2; usage ;;
    esac
    shift
  done
  [[ $# -ge 2 ]] || usage
  local -a command=(sbatch "--job-name=$job_name" "--nodes=$nodes" --ntasks-per-node=1
                    "--gpus-per-node=$gpus" --exclusive --requeue "--time=$time"
                    "--signal=B:USR1@$lead" --open-mode=append --output=%x-%j.out
                    ${extra[@]+"${extra[@]}"} "$0" "$@")
  if [[ $dry_run == 1 ]]; then print_command "${command[@]}"; else exec "${command[@]}"; fi
}

in_job() {
  [[ $# -ge 2 ]] || usage
  local config=$1 workdir=$2; shift 2
  local nodes=${SLURM_JOB_NUM_NODES:-1}
  local gpus=${SLURM_GPUS_ON_NODE:-}
  if [[ -z $gpus ]]; then gpus=$(nvidia-smi -L | wc -l); fi
  # One process drives all GPUs of its node: without this, jax.distributed's
  # SLURM detection would give each process only GPU SLURM_LOCALID.
  JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
  export JAX_LOCAL_DEVICE_IDS
  export XLA_FLAGS="$XLA_GPU_FLAGS${XLA_FLAGS:+ $XLA_FLAGS}"
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${workdir%/}/jax_cache}
  if [[ $nodes == 1 ]]; then
    # The guide's NCCL settings for single-host runs (not useful across hosts yet).
    export NCCL_LL128_BUFFSIZE=${NCCL_LL128_BUFFSIZE:--2}
    export NCCL_LL_BUFFSIZE=${NCCL_LL_BUFFSIZE:--2}
    export NCCL_PROTO=${NCCL_PROTO:-SIMPLE,LL,LL128}
  fi
  # srun does not inherit --cpus-per-task (SLURM >= 22.05): give the one task
  # all the node's CPUs, for the input pipeline.
  local -a command=(srun "--nodes=$nodes" --ntasks-per-node=1
                    "--cpus-per-task=${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1
                    "${PYTHON:-python3}" -m vlpjax.main "--config=$config" "--workdir=$workdir" "$@")
  if [[ $dry_run == 1 ]]; then
    local name
    for name in JAX_LOCAL_DEVICE_IDS XLA_FLAGS JAX_COMPILATION_CACHE_DIR NCCL_LL128_BUFFSIZE \
                NCCL_LL_BUFFSIZE NCCL_PROTO TFDS_DATA_DIR; do
      if [[ -n ${!name:-} ]]; then printf 'export %s=%q\n' "$name" "${!name}"; fi
    done
    print_command "${command[@]}"
    return 0
  fi

  echo "vlpjax: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $nodes node(s) x $gpus GPU(s)"
  time_up=0
  # Time is nearly up: the training processes save at one step and exit, then requeue.
  trap 'time_up=1; echo "vlpjax: time limit near, saving"; scancel --signal=TERM "$SLURM_JOB_ID" || true' USR1
  # A preemption or scancel: the processes get SIGTERM too; wait for their save.
  trap 'echo "vlpjax: SIGTERM, waiting for the save"' TERM
  "${command[@]}" &
  local pid=$! status
  while :; do
    wait "$pid" && status=0 || status=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  if [[ $time_up == 1 && $status == 0 ]]; then
    echo "vlpjax: saved; requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}

if [[ -n ${SLURM_JOB_ID:-} ]]; then in_job "$@"; else submit "$@"; fi
