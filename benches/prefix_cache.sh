#!/usr/bin/env bash
# Prompt-prefix caching benchmark: time to first token (TTFT) of a ~2,000-token system prompt
# (a tool list, benches/data/tools_system_prompt.txt) plus a short question, on the 0.5B model.
#
#   cold        no cache at all (--no-prompt-cache --cache-ram 0)
#   warm-memory the second of two requests in one process (--repeat 2): in-process prefix cache
#   warm-disk   a new process with another question: the persistent prompt cache on disk
#
# Usage: benches/prefix_cache.sh [extra qwen-run flags, e.g. -t 2]
# Env: QWEN_RUN_MODEL_0_5B (default: python3 models/fetch.py 0.5b), QWEN_RUN_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${QWEN_RUN_MODEL_0_5B:-$(python3 models/fetch.py 0.5b)}
BIN=${QWEN_RUN_BIN:-target/release/qwen-run}
[ -x "$BIN" ] || cargo build --release
SYSTEM=$(cat benches/data/tools_system_prompt.txt)
CACHE=$(mktemp -d)
trap 'rm -rf "$CACHE"' EXIT
common=(-m "$MODEL" --system "$SYSTEM" -n 8 --temp 0 "$@")

# The report lines ([qwen-run] ... time to first token X ms ...) of one command, one per request.
reports() { "$BIN" "${common[@]}" "$@" 2>&1 >/dev/null | grep '^\[qwen-run\] load'; }
ttft() { sed -E 's/.*time to first token ([0-9]+) ms.*/\1/'; }
prompt() { sed -E 's/.*\| (prompt [0-9]+ tokens[^|]*) \|.*/\1/'; }

cold_line=$(reports -p "Which tool lists files?" --no-prompt-cache --cache-ram 0)
mem_lines=$(reports -p "Which tool lists files?" --prompt-cache "$CACHE" --repeat 2)
disk_line=$(reports -p "Which tool sends an email?" --prompt-cache "$CACHE")

cold=$(echo "$cold_line" | ttft)
first=$(echo "$mem_lines" | head -1 | ttft)
mem=$(echo "$mem_lines" | tail -1 | ttft)
disk=$(echo "$disk_line" | ttft)
speedup() { awk -v a="$cold" -v b="$1" 'BEGIN { printf "%.1fx", a / (b > 0 ? b : 1) }'; }

echo "model: $(basename "$MODEL"), $(echo "$cold_line" | sed -E 's/.*\| (CPU[^|]*) \| ([0-9]+ threads).*/\1, \2/')"
echo "disk cache: $(du -sh "$CACHE" | cut -f1) in $(ls "$CACHE" | wc -l) file(s)"
echo
echo "| run | prompt | TTFT ms | speedup vs cold |"
echo "|---|---|---:|---:|"
echo "| cold (no cache) | $(echo "$cold_line" | prompt) | $cold | 1.0x |"
echo "| first request, empty caches | $(echo "$mem_lines" | head -1 | prompt) | $first | $(speedup "$first") |"
echo "| warm, in-process (2nd request) | $(echo "$mem_lines" | tail -1 | prompt) | $mem | $(speedup "$mem") |"
echo "| warm, from disk (new process) | $(echo "$disk_line" | prompt) | $disk | $(speedup "$disk") |"
