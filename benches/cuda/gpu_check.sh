#!/usr/bin/env bash
# Checks the GPU path against the CPU path of the same binary, on the same GGUF: the CPU writes its
# logits at every position of a text (`qwen-run fidelity --write-logits`), then the GPU runs the
# same tokens with full offload (prefill batches and one token at a time), partial offload and an
# f16 KV cache, and each is compared with the CPU (top-1 agreement, mean and max KL).
#
# Use a model with real weights: random weights (synth_gguf.rs) amplify rounding differences
# through their layers, so their KL says little. A GPU machine without internet can get one from
#   python3 models/trim_gguf.py "$(python3 models/fetch.py 0.5b)" real2.gguf 2 16384   # 38 MB
# with the text benches/data/fidelity_small.txt (its token ids are all below 16384).
#
# Usage: bash benches/cuda/gpu_check.sh MODEL.gguf [TEXT]
# Env:   QWEN_RUN_BIN (default target/cuda/release/qwen-run)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODEL="${1:?usage: gpu_check.sh MODEL.gguf [TEXT]}"
TEXT="${2:-${ROOT}/benches/data/fidelity_small.txt}"
BIN="${QWEN_RUN_BIN:-${ROOT}/target/cuda/release/qwen-run}"
[[ -x "${BIN}" ]] || { echo "gpu_check.sh: no qwen-run at ${BIN} (build it with benches/cuda/build_cuda.sh)" >&2; exit 1; }
REF="$(mktemp --suffix=.logits)"
trap 'rm -f "${REF}"' EXIT
"${BIN}" fidelity -m "${MODEL}" --device cpu --text "${TEXT}" --write-logits "${REF}"
echo "| GPU run | positions | top-1 agreement | mean KL | max KL |"
echo "| --- | ---: | ---: | ---: | ---: |"
for v in "-b 512" "-b 1" "-ngl 1" "--cache-type f16 -b 1"; do
  # shellcheck disable=SC2086
  row="$("${BIN}" fidelity -m "${MODEL}" --device cuda ${v} --logits "${REF}" | grep -E '^\| [0-9]')"
  echo "| \`${v}\` ${row}"
done
