#!/usr/bin/env bash
# Multi-node GPU training with SLURM: one JAX process per node (all its GPUs), started
# by srun. Process 0's host is the jax.distributed coordinator; each process reads
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
# (insightv_jax.parallel.initialize_distributed).
#
# Run it from this project's checkout on the filesystem every node shares: the first run
# makes the virtualenv there and installs the checkout with jax's CUDA wheels (the
# `cuda13` extra, or `cuda12` with --cuda 12, matching the nodes' driver).
#
#   launch/slurm_gpu.sh --nodes 2 --gpus-per-node 8 --partition gpu \
#       --config configs/train/reasoning-sft-llava-next-llama3-8b-h100.yaml [--dry-run] [-- k=v ...]
# Set mesh.fsdp to nodes × GPUs per node (e.g. `-- mesh.fsdp=16` for 2 nodes).
set -euo pipefail
NODES=1 GPUS=8 PARTITION="" TIME=48:00:00 PORT=12355 DRY=0 VENV=.venv CUDA=13
CONFIG=configs/train/reasoning-sft-llava-next-llama3-8b-h100.yaml OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES=$2; shift 2;; --gpus-per-node) GPUS=$2; shift 2;;
    --partition) PARTITION=$2; shift 2;; --time) TIME=$2; shift 2;; --port) PORT=$2; shift 2;;
    --venv) VENV=$2; shift 2;; --config) CONFIG=$2; shift 2;; --cuda) CUDA=$2; shift 2;;
    --dry-run) DRY=1; shift;; --) shift; OVERRIDES=("$@"); break;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
if [[ $CUDA != 12 && $CUDA != 13 ]]; then
  echo "error: --cuda $CUDA: jax ships CUDA wheels for 12 and 13" >&2; exit 2
fi
if [[ ! -f pyproject.toml || ! -d insightv_jax ]]; then
  echo "error: run this from the insightv-jax checkout on the shared filesystem" >&2; exit 2
fi
run() { if [[ $DRY == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
if [[ ! -x $VENV/bin/insightv || $DRY == 1 ]]; then  # the nodes share this virtualenv
  run python3 -m venv "$VENV"
  run "$VENV/bin/pip" install -q -e ".[cuda$CUDA]"
fi
PART=(); [[ -n $PARTITION ]] && PART=(--partition "$PARTITION")
# Inside the allocation: the first node is the coordinator; SLURM_PROCID is the process id.
INNER="export JAX_COORDINATOR_ADDRESS=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n1):$PORT; \
export JAX_NUM_PROCESSES=\$SLURM_NTASKS JAX_PROCESS_ID=\$SLURM_PROCID; \
exec $VENV/bin/insightv sft --config $CONFIG ${OVERRIDES[*]:-}"
CMD=(srun --nodes "$NODES" --ntasks-per-node 1 --gpus-per-node "$GPUS" "${PART[@]}"
     --time "$TIME" --kill-on-bad-exit=1 --signal=TERM@120 bash -c "$INNER")
run "${CMD[@]}"
