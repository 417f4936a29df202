#!/usr/bin/env bash
# The project's test command (README, CI): formatting, lints, then every test, the real-model
# fidelity tests included. Fetches the two real test models first (cached after the first run).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== fetching the real test models (cached after the first run)"
export QWEN_RUN_MODEL_0_5B="$(python3 models/fetch.py 0.5b)"
export QWEN_RUN_MODEL_1_5B="$(python3 models/fetch.py 1.5b)"

echo "== the Python clients (openai, ollama, instructor, langchain-openai, langchain-ollama, llama-index-llms-ollama, selenium) for tests/clients.rs and tests/server.rs (skipped there when missing)"
python3 -m pip install -q -r tests/clients/requirements.txt || echo "note: pip install -r tests/clients/requirements.txt failed; the Python client tests whose package cannot be imported will be skipped"

echo "== chromium and its driver for the chat page's browser test in tests/clients.rs (skipped there when missing)"
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "already installed"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) >/dev/null \
        || echo "note: apt-get install chromium chromium-driver failed; the browser test will be skipped"
else
    echo "note: chromium or chromedriver missing and not root with apt-get; the browser test will be skipped"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings

echo "== cargo test"
# Release mode: the real-model tests run the model, and share the build with clippy's deps.
cargo test --release --workspace

echo "== the kernel levels those tests ran on this CPU"
cargo test --release -q -p qwen-run-kernels --test correctness kernel_levels -- --nocapture 2>&1 | grep "kernel levels"
