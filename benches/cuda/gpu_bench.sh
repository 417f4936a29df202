#!/usr/bin/env bash
# Benchmark qwen-run on an NVIDIA GPU against llama.cpp, on a Qwen2.5-7B-class model.
#
# Meant for a GPU machine (no GPU is needed to build, see build_cuda.sh). Steps:
#  1. builds qwen-run with --features cuda for this GPU's compute capability (benches/cuda/build_cuda.sh;
#     skipped when QWEN_RUN_BIN is set);
#  2. takes MODEL.gguf if given, else writes the synthetic Qwen2.5-7B-Instruct Q5_K_M
#     (`cargo run --release --example synth-gguf`: real layout, random weights, 5.4 GB; needs
#     `python3 models/fetch.py 0.5b` for the tokenizer, which it runs);
#  3. runs `qwen-run bench -m MODEL -p 512 -n 128 --device cuda`;
#  4. if llama-bench is found ($LLAMA_BENCH, or on PATH), runs `llama-bench -m MODEL -p 512 -n 128
#     -ngl 99` on the same file. It must be a CUDA build of llama.cpp (cmake -DGGML_CUDA=ON); the CPU
#     build from benches/install_llama_cpp.sh ignores -ngl and would measure the CPU.
#     With BUILD_LLAMA=1 and no LLAMA_BENCH, it builds one with benches/cuda/build_llama_cuda.sh
#     (needs nvcc + cmake; 141 .cu files for this GPU only, minutes on 16 cores), started in the
#     background at the beginning so that it overlaps steps 1-3; the source is LLAMA_CPP_SRC /
#     LLAMA_CPP_SRC_TARBALL, else .device/llama-src.tar.xz if present (made beforehand with
#     `build_llama_cuda.sh --pack .device/llama-src.tar.xz`, for machines without internet), else
#     the PyPI sdist. Its log goes to $OUT_DIR/llama-build.log; a failed build only skips step 4.
# Results (logs, nvidia-smi, the two tables) go to $OUT_DIR (default bench-results/cuda-DATE).
#
# Usage: bash benches/cuda/gpu_bench.sh [MODEL.gguf]
# Env:   QWEN_RUN_BIN (a CUDA qwen-run already built), CUDA_COMPUTE_CAP (default: from nvidia-smi),
#        LLAMA_BENCH, BUILD_LLAMA (1: build a CUDA llama-bench if none), PP (512), TG (128), REPS (5),
#        SYNTH (synthetic model path, default
#        /tmp/qwen2.5-7b-instruct-q5_k_m-synthetic.gguf; kept for reuse), OUT_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "${ROOT}"
PP="${PP:-512}"
TG="${TG:-128}"
REPS="${REPS:-5}"
SYNTH="${SYNTH:-/tmp/qwen2.5-7b-instruct-q5_k_m-synthetic.gguf}"
OUT_DIR="${OUT_DIR:-bench-results/cuda-$(date -u +%Y%m%dT%H%M%SZ)}"

log() { echo "gpu_bench.sh: $*" >&2; }
die() { echo "gpu_bench.sh: error: $*" >&2; exit 1; }

command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU and driver"
nvidia-smi >/dev/null || die "nvidia-smi fails: no usable GPU/driver"
mkdir -p "${OUT_DIR}"
nvidia-smi > "${OUT_DIR}/nvidia-smi.txt"
GPU="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n1)"
log "GPU: ${GPU}"

CAP="${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '.[:space:]')}"

# 0. A CUDA llama-bench, built in the background while steps 1-3 run (BUILD_LLAMA=1).
LB="${LLAMA_BENCH:-$(command -v llama-bench || true)}"
LLAMA_BUILD_PID=""
if [[ -z "${LB}" && "${BUILD_LLAMA:-0}" == 1 ]]; then
  if [[ -z "${LLAMA_CPP_SRC:-}" && -z "${LLAMA_CPP_SRC_TARBALL:-}" && -f .device/llama-src.tar.xz ]]; then
    export LLAMA_CPP_SRC_TARBALL="${ROOT}/.device/llama-src.tar.xz"
  fi
  log "building a CUDA llama-bench for sm_${CAP} in the background (log: ${OUT_DIR}/llama-build.log)"
  bash benches/cuda/build_llama_cuda.sh "${CAP}" >"${OUT_DIR}/llama-build.out" 2>"${OUT_DIR}/llama-build.log" &
  LLAMA_BUILD_PID=$!
fi

# 1. qwen-run with CUDA.
LIBDIR=""
if [[ -n "${QWEN_RUN_BIN:-}" ]]; then
  BIN="${QWEN_RUN_BIN}"
  LIBDIR="$(bash benches/cuda/build_cuda.sh --print-libdir 2>/dev/null || true)"
else
  log "building qwen-run for sm_${CAP} (about 18 min on 2 cores, a few on a big machine)"
  BIN="$(bash benches/cuda/build_cuda.sh "${CAP}" 2> >(tee "${OUT_DIR}/build.log" >&2) | tail -n1)"
  LIBDIR="$(bash benches/cuda/build_cuda.sh --print-libdir)"
fi
[[ -x "${BIN}" ]] || die "no qwen-run binary at '${BIN}'"
if [[ -n "${LIBDIR}" ]]; then export LD_LIBRARY_PATH="${LIBDIR}${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"; fi

# 2. The model.
MODEL="${1:-}"
if [[ -z "${MODEL}" ]]; then
  MODEL="${SYNTH}"
  if [[ ! -s "${MODEL}" ]]; then
    LIKE="$(python3 models/fetch.py 0.5b)"
    log "writing the synthetic 7B to ${MODEL} (5.4 GB)"
    cargo run --release --example synth-gguf -- --like "${LIKE}" --out "${MODEL}" >/dev/null
  fi
fi
[[ -s "${MODEL}" ]] || die "model file '${MODEL}' not found"
log "model: ${MODEL} ($(du -h "${MODEL}" | cut -f1))"
echo "gpu: ${GPU}; compute capability ${CAP}; model ${MODEL}" > "${OUT_DIR}/summary.md"

# 3. qwen-run.
log "qwen-run bench -p ${PP} -n ${TG} -r ${REPS} --device cuda"
"${BIN}" bench -m "${MODEL}" -p "${PP}" -n "${TG}" -r "${REPS}" --device cuda 2>"${OUT_DIR}/qwen-run.log" \
  | tee "${OUT_DIR}/qwen-run.md"
{ echo; echo "## qwen-run"; cat "${OUT_DIR}/qwen-run.md"; } >> "${OUT_DIR}/summary.md"

# 4. llama.cpp.
if [[ -n "${LLAMA_BUILD_PID}" ]]; then
  log "waiting for the llama-bench build (pid ${LLAMA_BUILD_PID}) ..."
  if wait "${LLAMA_BUILD_PID}"; then
    LB="$(tail -n1 "${OUT_DIR}/llama-build.out")"
    log "llama-bench: ${LB}"
  else
    tail -n 20 "${OUT_DIR}/llama-build.log" >&2
    log "warning: the llama-bench build failed (${OUT_DIR}/llama-build.log); skipping llama.cpp"
  fi
fi
if [[ -n "${LB}" && -x "${LB}" ]]; then
  log "llama-bench -p ${PP} -n ${TG} -r ${REPS} -ngl 99"
  "${LB}" -m "${MODEL}" -p "${PP}" -n "${TG}" -r "${REPS}" -ngl 99 2>"${OUT_DIR}/llama-bench.log" \
    | tee "${OUT_DIR}/llama-bench.md"
  grep -qi "cuda" "${OUT_DIR}/llama-bench.md" "${OUT_DIR}/llama-bench.log" \
    || log "warning: llama-bench does not look like a CUDA build; its numbers are probably CPU numbers"
  { echo; echo "## llama.cpp"; cat "${OUT_DIR}/llama-bench.md"; } >> "${OUT_DIR}/summary.md"
else
  log "no llama-bench (set LLAMA_BENCH to a CUDA build of llama.cpp's llama-bench, or BUILD_LLAMA=1, to compare)"
fi
log "results in ${OUT_DIR}/summary.md"
