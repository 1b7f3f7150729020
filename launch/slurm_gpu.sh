#!/usr/bin/env bash
# Multi-node GPU training with SLURM: one JAX process per node (all its GPUs), started
# by srun. Process 0's host is the jax.distributed coordinator; each process reads
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
# (insightv_jax.parallel.initialize_distributed).
#
#   launch/slurm_gpu.sh --nodes 2 --gpus-per-node 8 --partition gpu \
#       --config configs/train/reasoning-sft-llava-next-llama3-8b-h100.yaml [--dry-run] [-- k=v ...]
# Set mesh.fsdp to nodes × GPUs per node (e.g. `-- mesh.fsdp=16` for 2 nodes).
set -euo pipefail
NODES=1 GPUS=8 PARTITION="" TIME=48:00:00 PORT=12355 DRY=0 VENV=.venv
CONFIG=configs/train/reasoning-sft-llava-next-llama3-8b-h100.yaml OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES=$2; shift 2;; --gpus-per-node) GPUS=$2; shift 2;;
    --partition) PARTITION=$2; shift 2;; --time) TIME=$2; shift 2;; --port) PORT=$2; shift 2;;
    --venv) VENV=$2; shift 2;; --config) CONFIG=$2; shift 2;;
    --dry-run) DRY=1; shift;; --) shift; OVERRIDES=("$@"); break;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
PART=(); [[ -n $PARTITION ]] && PART=(--partition "$PARTITION")
# Inside the allocation: the first node is the coordinator; SLURM_PROCID is the process id.
INNER="export JAX_COORDINATOR_ADDRESS=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n1):$PORT; \
export JAX_NUM_PROCESSES=\$SLURM_NTASKS JAX_PROCESS_ID=\$SLURM_PROCID; \
exec $VENV/bin/insightv sft --config $CONFIG ${OVERRIDES[*]:-}"
CMD=(srun --nodes "$NODES" --ntasks-per-node 1 --gpus-per-node "$GPUS" "${PART[@]}"
     --time "$TIME" --kill-on-bad-exit=1 --signal=TERM@120 bash -c "$INNER")
if [[ $DRY == 1 ]]; then printf '%q ' "${CMD[@]}"; echo; else "${CMD[@]}"; fi
