#!/usr/bin/env bash
# Build qwen-run with `--features mkl` (Intel MKL behind Candle's f32/f16 matmuls) offline.
#
# intel-mkl-src looks for MKL through $MKLROOT before it would download anything, and Intel's PyPI
# wheels (mkl-static, mkl-include, intel-openmp, pinned below) give a tree it accepts: lib/*.a,
# include/, and libiomp5.so for the OpenMP runtime the static MKL calls. They are installed into a
# venv under ${QWEN_RUN_TOOLS:-~/.cache/qwen-run/tools}/mkl-2026.2.0 (1.3 GB), and the binary gets
# an rpath to its lib/ for libiomp5.so.
#
# What MKL changes: only Candle's float matmuls, i.e. the tensor pass's attention (f16 or q8_0 KV
# caches on the CPU). The quantized weight matmuls are qwen-run's own kernels, and with f32 caches
# (the default) the CPU pass runs no Candle matmul at all. See the README ("MKL").
#
# Usage: bash benches/build_mkl.sh
# Env:   CARGO_TARGET_DIR (default target/mkl), QWEN_RUN_TOOLS, PYTHON (default python3).
# Output: the binary path on stdout (last line); progress on stderr. About 8 minutes on 2 cores.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${QWEN_RUN_TOOLS:-${HOME}/.cache/qwen-run/tools}"
MKL_VERSION="2026.2.0"
VENV="${TOOLS}/mkl-${MKL_VERSION}"
PYTHON="${PYTHON:-python3}"

log() { echo "build_mkl.sh: $*" >&2; }

if [[ ! -e "${VENV}/lib/libmkl_core.a" || ! -e "${VENV}/lib/libiomp5.so" || ! -d "${VENV}/include" ]]; then
  log "installing MKL ${MKL_VERSION} from PyPI into ${VENV}"
  "${PYTHON}" -m venv "${VENV}"
  "${VENV}/bin/pip" install --quiet "mkl-static==${MKL_VERSION}" "mkl-include==${MKL_VERSION}" \
    "intel-openmp==${MKL_VERSION}" >&2
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${ROOT}/target/mkl}"
export MKLROOT="${VENV}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=${VENV}/lib -C link-arg=-Wl,-rpath,${VENV}/lib"
log "cargo build --release --features mkl (MKLROOT=${MKLROOT})"
(cd "${ROOT}" && cargo build --release --features mkl --bin qwen-run >&2)
echo "${CARGO_TARGET_DIR}/release/qwen-run"
