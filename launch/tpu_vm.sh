#!/usr/bin/env bash
# Create a TPU VM / pod slice (on-demand), install this repo on every worker (with the
# `tpu` extra: jax[tpu]) and run `insightv sft` on all workers at once. JAX on a TPU pod
# initialises itself (insightv_jax.parallel.initialize_distributed); every worker runs
# the same command. --repo (a git URL the workers can clone) is required.
#
#   launch/tpu_vm.sh --name iv-sft --zone us-east5-a --type v5p-128 --repo URL \
#       --config configs/train/reasoning-sft-llava-next-llama3-8b.yaml [--dry-run] [-- k=v ...]
set -euo pipefail
NAME=insightv-sft ZONE=us-east5-a TYPE=v5p-128 VERSION=v2-alpha-tpuv5 PROJECT=""
CONFIG=configs/train/reasoning-sft-llava-next-llama3-8b.yaml REPO=""
BRANCH=main DRY=0 CREATE=1 DELETE=0 OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME=$2; shift 2;; --zone) ZONE=$2; shift 2;; --type) TYPE=$2; shift 2;;
    --version) VERSION=$2; shift 2;; --project) PROJECT=$2; shift 2;;
    --config) CONFIG=$2; shift 2;; --repo) REPO=$2; shift 2;; --branch) BRANCH=$2; shift 2;;
    --no-create) CREATE=0; shift;; --delete-after) DELETE=1; shift;;
    --dry-run) DRY=1; shift;; --) shift; OVERRIDES=("$@"); break;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
if [[ -z $REPO ]]; then
  echo "error: --repo URL is required (the git repository every worker clones this project from)" >&2
  exit 2
fi
run() { if [[ $DRY == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
PROJ=(); [[ -n $PROJECT ]] && PROJ=(--project "$PROJECT")

if [[ $CREATE == 1 ]]; then
  run gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" "${PROJ[@]}" \
      --accelerator-type "$TYPE" --version "$VERSION"
fi
SETUP="set -e; if [ ! -d insightv-jax ]; then git clone -b $BRANCH $REPO insightv-jax; fi; \
cd insightv-jax && git pull --ff-only && python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
.venv/bin/pip install -q -e '.[tpu]'"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" "${PROJ[@]}" --worker=all --command "$SETUP"
TRAIN="cd insightv-jax && .venv/bin/insightv sft --config $CONFIG ${OVERRIDES[*]:-}"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" "${PROJ[@]}" --worker=all --command "$TRAIN"
if [[ $DELETE == 1 ]]; then
  run gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" "${PROJ[@]}" --quiet
fi
