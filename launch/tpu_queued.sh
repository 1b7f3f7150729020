#!/usr/bin/env bash
# Spot / queued-resources variant: request a TPU slice through the queue, wait until it is
# ACTIVE, then set up and train exactly like tpu_vm.sh (--no-create). Preemption sends
# SIGTERM: the trainer writes a checkpoint and exits; rerunning this script resumes.
#
#   launch/tpu_queued.sh --name iv-sft --zone us-east5-a --type v5p-128 --spot --repo URL \
#       --config configs/train/summary-sft-llava-next-llama3-8b.yaml [--dry-run] [-- k=v ...]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
NAME=insightv-sft ZONE=us-east5-a TYPE=v5p-128 VERSION=v2-alpha-tpuv5 PROJECT="" SPOT=0 DRY=0
REPO="" PASS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME=$2; shift 2;; --zone) ZONE=$2; shift 2;; --type) TYPE=$2; shift 2;;
    --version) VERSION=$2; shift 2;; --project) PROJECT=$2; shift 2;;
    --repo) REPO=$2; shift 2;;
    --spot) SPOT=1; shift;; --dry-run) DRY=1; shift;;
    *) PASS+=("$1"); shift;;
  esac
done
# checked before anything is queued: tpu_vm.sh needs it once the slice is ACTIVE
if [[ -z $REPO ]]; then
  echo "error: --repo URL is required (the git repository every worker clones this project from)" >&2
  exit 2
fi
run() { if [[ $DRY == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
PROJ=(); [[ -n $PROJECT ]] && PROJ=(--project "$PROJECT")
KIND=(); [[ $SPOT == 1 ]] && KIND=(--spot)

run gcloud compute tpus queued-resources create "$NAME-qr" --node-id "$NAME" --zone "$ZONE" \
    "${PROJ[@]}" --accelerator-type "$TYPE" --runtime-version "$VERSION" "${KIND[@]}"
if [[ $DRY == 1 ]]; then
  echo "# poll until ACTIVE:"
  run gcloud compute tpus queued-resources describe "$NAME-qr" --zone "$ZONE" "${PROJ[@]}" \
      --format='value(state.state)'
else
  until [[ $(gcloud compute tpus queued-resources describe "$NAME-qr" --zone "$ZONE" "${PROJ[@]}" \
            --format='value(state.state)') == ACTIVE ]]; do sleep 60; done
fi
DRYFLAG=(); [[ $DRY == 1 ]] && DRYFLAG=(--dry-run)
run_args=(--name "$NAME" --zone "$ZONE" --type "$TYPE" --version "$VERSION" --repo "$REPO" --no-create
          "${DRYFLAG[@]}")
[[ -n $PROJECT ]] && run_args+=(--project "$PROJECT")
"$HERE/tpu_vm.sh" "${run_args[@]}" "${PASS[@]}"
