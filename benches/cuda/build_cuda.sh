#!/usr/bin/env bash
# Build qwen-run with `--features cuda` on a machine without a CUDA toolkit (and without a GPU).
#
# The toolkit comes from NVIDIA's CUDA 13.0 PyPI wheels (CUDA 12 wheels ship no nvcc/cicc), installed
# into a venv under ${QWEN_RUN_TOOLS:-~/.cache/qwen-run/tools}/cuda-13.0. 13.0, the oldest CUDA 13,
# because candle's kernels are embedded as PTX and JIT-compiled by the driver at run time, and a driver
# rejects PTX newer than itself: 13.0's PTX (ISA 9.0) loads on every CUDA 13 driver (>= 580), 13.4's
# (ISA 9.4) only on drivers from 13.4 on (CUDA_ERROR_UNSUPPORTED_PTX_VERSION otherwise). The wheels give a
# toolkit-shaped tree (site-packages/nvidia/cu13/{bin,include,lib,nvvm}) but lack two things the link
# needs, which this script adds under .../tools/cuda/root:
#   root/lib/lib{cudart,cublas,cublasLt,curand,nvrtc}.so  unversioned links to the wheels' libraries;
#   root/lib/stubs/libcuda.so  a link-time stub of the driver (SONAME libcuda.so.1) defining every
#       driver symbol cudarc's bindings declare, as empty C functions. It is never loaded: at run time
#       the loader looks for libcuda.so.1, i.e. the real driver.
# Then it runs `cargo build --release --features cuda` for ONE GPU architecture (candle-kernels and
# cudarc read CUDA_COMPUTE_CAP, NVCC and CUDA_ROOT).
#
# Usage: bash benches/cuda/build_cuda.sh [COMPUTE_CAP]     # 89 = RTX 4090 / L4 / L40S (default),
#                                                            # 90 = H100 / H200, 80 = A100, 86 = RTX 30xx
# Env:   CARGO_TARGET_DIR (default target/cuda), QWEN_RUN_TOOLS, PYTHON (default python3),
#        CARGO_FLAGS (extra cargo arguments).
# Output: the binary path on stdout (last line); progress on stderr. The binary needs a CUDA 13
#        capable driver (>= 580) and the wheels' libraries at run time:
#        LD_LIBRARY_PATH=$(bash benches/cuda/build_cuda.sh --print-libdir) target/cuda/release/qwen-run ...
# Takes about 18 minutes on 2 cores (most of it nvcc compiling candle's kernels).
set -euo pipefail

CAP=89
PRINT_LIBDIR=0
for a in "$@"; do
  case "$a" in
    --print-libdir) PRINT_LIBDIR=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    [0-9][0-9]|[0-9][0-9][0-9]) CAP="$a" ;;
    *) echo "build_cuda.sh: unknown argument '$a' (expected a compute capability such as 89 or 90)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOOLS="${QWEN_RUN_TOOLS:-${HOME}/.cache/qwen-run/tools}"
CUDA_VERSION="13.0"
CUDA_DIR="${TOOLS}/cuda-${CUDA_VERSION}"
VENV="${CUDA_DIR}/venv"
LINKROOT="${CUDA_DIR}/root"
PYTHON="${PYTHON:-python3}"
CUDA_PKGS=(
  "nvidia-cuda-nvcc==${CUDA_VERSION}.*" "nvidia-cuda-crt==${CUDA_VERSION}.*" "nvidia-nvvm==${CUDA_VERSION}.*"
  "nvidia-cuda-runtime==${CUDA_VERSION}.*" "nvidia-cuda-nvrtc==${CUDA_VERSION}.*" "nvidia-cuda-cccl==${CUDA_VERSION}.*"
  "nvidia-cublas==${CUDA_VERSION}.*" "nvidia-curand==10.4.0.*"
)

log() { echo "build_cuda.sh: $*" >&2; }
die() { echo "build_cuda.sh: error: $*" >&2; exit 1; }

find_cu() { ls -d "${VENV}"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -n1; }

# 1. The toolkit wheels.
CU="$(find_cu || true)"
if [[ -z "${CU}" || ! -x "${CU}/bin/nvcc" || ! -e "${CU}/lib/libcublas.so.13" || ! -d "${CU}/nvvm/bin" ]]; then
  [[ ${PRINT_LIBDIR} == 1 ]] && die "the CUDA wheels are not installed yet; run this script without --print-libdir first"
  log "installing the CUDA ${CUDA_VERSION} wheels into ${VENV} (about 1.5 GB)"
  mkdir -p "${CUDA_DIR}"
  [[ -x "${VENV}/bin/pip" ]] || "${PYTHON}" -m venv "${VENV}" || die "cannot create a venv with ${PYTHON}"
  "${VENV}/bin/pip" install --quiet --disable-pip-version-check "${CUDA_PKGS[@]}" || die "pip install of the CUDA wheels failed"
  CU="$(find_cu)"
  [[ -x "${CU}/bin/nvcc" ]] || die "no nvcc in ${CU}/bin after installing the wheels"
fi
if [[ ${PRINT_LIBDIR} == 1 ]]; then echo "${CU}/lib"; exit 0; fi
NVCC_VERSION="$("${CU}/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
log "nvcc ${NVCC_VERSION} at ${CU}/bin/nvcc"

# 2. Unversioned library links, for the linker.
mkdir -p "${LINKROOT}/lib/stubs"
for lib in cudart cublas cublasLt curand nvrtc; do
  real="$(ls "${CU}/lib/lib${lib}.so."* 2>/dev/null | grep -E "lib${lib}\.so\.[0-9]+$" | head -n1 || true)"
  [[ -n "${real}" ]] || die "lib${lib}.so.N not found in ${CU}/lib"
  ln -sfn "${real}" "${LINKROOT}/lib/lib${lib}.so"
  ln -sfn "${real}" "${LINKROOT}/lib/$(basename "${real}")"
done

# 3. The link-time driver stub, from the symbols cudarc's driver bindings declare.
cd "${ROOT}"
CUDARC_VERSION="$(awk '/^name = "cudarc"$/ {getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock)"
[[ -n "${CUDARC_VERSION}" ]] || die "cudarc is not in Cargo.lock"
CARGO_HOME_DIR="${CARGO_HOME:-${HOME}/.cargo}"
CUDARC_SRC="$(ls -d "${CARGO_HOME_DIR}"/registry/src/*/cudarc-"${CUDARC_VERSION}" 2>/dev/null | head -n1 || true)"
if [[ -z "${CUDARC_SRC}" ]]; then
  log "fetching crates (cudarc ${CUDARC_VERSION} sources)"
  cargo fetch >&2
  CUDARC_SRC="$(ls -d "${CARGO_HOME_DIR}"/registry/src/*/cudarc-"${CUDARC_VERSION}" | head -n1)"
fi
STUB_C="${LINKROOT}/lib/stubs/libcuda_stub.c"
{
  echo "/* Link-time stub of the CUDA driver API, generated by qwen-run's build_cuda.sh from"
  echo "   ${CUDARC_SRC}/src/driver/sys/mod.rs. Never loaded at run time. */"
  grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "${CUDARC_SRC}/src/driver/sys/mod.rs" \
    | sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
    | while read -r sym; do echo "int ${sym}(void) { return 999; }"; done
} > "${STUB_C}.tmp"
mv "${STUB_C}.tmp" "${STUB_C}"
NSYM="$(grep -c '^int cu' "${STUB_C}")"
[[ "${NSYM}" -gt 100 ]] || die "found only ${NSYM} driver symbols in cudarc ${CUDARC_VERSION}; its bindings moved?"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "${LINKROOT}/lib/stubs/libcuda.so" "${STUB_C}" \
  || die "cannot compile the libcuda stub (needs a C compiler, cc)"
log "libcuda.so stub with ${NSYM} driver symbols (cudarc ${CUDARC_VERSION})"

# 4. The build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
export PATH="${CU}/bin:${PATH}"
export NVCC="${CU}/bin/nvcc"
export CUDA_ROOT="${LINKROOT}"
export CUDA_COMPUTE_CAP="${CAP}"
log "cargo build --release --features cuda (sm_${CAP}) into ${CARGO_TARGET_DIR}; ~18 min on 2 cores"
t0=$(date +%s)
# shellcheck disable=SC2086
cargo build --release --features cuda ${CARGO_FLAGS:-} >&2
t1=$(date +%s)
BIN="${CARGO_TARGET_DIR}/release/qwen-run"
[[ -x "${BIN}" ]] || die "the build finished but ${BIN} is missing"
log "built ${BIN} in $((t1 - t0)) s ($(du -h "${BIN}" | cut -f1)); run it with LD_LIBRARY_PATH=${CU}/lib"
echo "${BIN}"
