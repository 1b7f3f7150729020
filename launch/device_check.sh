#!/usr/bin/env bash
# The device check on a machine with one accelerator: environment, test files that
# exercise it, measured matmul peaks, `bench train` (~1B decoder and LLaVA-shaped VLM, bf16)
# and `bench sample` (decode at batch 1 and 8) against transformers on the same GPU, and fp32
# parity -- about five minutes, one JSON file per section written as each finishes
# (insightv_jax/device_check/ says what each holds).
#
#   launch/device_check.sh [--out DIR] [--cpu] [--budget S] [--sections env,peak,...]
#                          [--set model.decoder.attention=cudnn] [--tests tests/test_x.py]
#
# Output: --out, else $OUT when set, else ./device_check_out; the console log beside the
# JSON as device_check.log. No install step: the project runs from this checkout
# (PYTHONPATH) on an image that has jax (with its CUDA plugin), flax, optax,
# orbax-checkpoint, transformers, torch and pytest -- grain, tensorflow-datasets and
# tensorboardX are not needed. Exit status 0 when every section passed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
DIR=${OUT:-$PWD/device_check_out}
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do  # the log goes where the JSON goes
  case "${ARGS[i]}" in
    --out) DIR=${ARGS[i + 1]:-$DIR};; --out=*) DIR=${ARGS[i]#--out=};;
  esac
done
mkdir -p "$DIR" || { echo "error: cannot create the output folder $DIR" >&2; exit 2; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2
"$PY" -m insightv_jax.device_check --out "$DIR" "$@" 2>&1 | tee "$DIR/device_check.log"
exit "${PIPESTATUS[0]}"
