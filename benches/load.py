#!/usr/bin/env python3
"""One-shot process time: `qwen-run -m MODEL -p hi -n 1` against llama.cpp's `llama-simple -m
MODEL -n 1 hi`, whole processes alternating, warm page cache; medians, with qwen-run's reported
load. Give --baseline with another qwen-run binary to compare two builds in the same run.

    python3 benches/load.py --model 0.5b
    python3 benches/load.py --model 1.5b --rounds 9 --baseline /tmp/qwen-run-old
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import llama_bin_dir, qwen_run_binary, resolve_model  # noqa: E402


def reported_load_ms(stderr):
    """qwen-run's report -> its load in ms (older builds printed seconds)."""
    m = re.search(r"\] load ([\d.]+) (ms|s) ", stderr)
    if not m:
        return None
    return float(m.group(1)) * (1 if m.group(2) == "ms" else 1000)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a GGUF file, or 0.5b / 1.5b (models/fetch.py)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--qwen-run", help="the qwen-run binary (default: build target/release)")
    ap.add_argument("--baseline", help="another qwen-run binary, run alternating with the first")
    ap.add_argument("--llama-bin", help="llama.cpp's bin directory (default: benches/install_llama_cpp.sh)")
    ap.add_argument("--no-llama", action="store_true")
    args = ap.parse_args()
    model = resolve_model(args.model)
    engines = [("qwen-run", qwen_run_binary(args.qwen_run))]
    if args.baseline:
        engines.append(("baseline", args.baseline))
    if not args.no_llama:
        engines.append(("llama-simple", os.path.join(llama_bin_dir(args.llama_bin), "llama-simple")))
    walls = {name: [] for name, _ in engines}
    loads = {name: [] for name, _ in engines}
    for _ in range(args.rounds):
        for name, binary in engines:
            if name == "llama-simple":
                cmd = [binary, "-m", model, "-n", "1", "hi"]
            else:
                cmd = [binary, "-m", model, "-p", "hi", "-n", "1", "-t", str(args.threads)]
            start = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            walls[name].append((time.perf_counter() - start) * 1000)
            if p.returncode != 0:
                sys.exit(f"load: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
            load = reported_load_ms(p.stderr)
            if load is not None:
                loads[name].append(load)
    print(f"{os.path.basename(model)}, {args.rounds} alternating rounds, medians (min)")
    print("| engine | whole process (ms) | reported load (ms) |")
    print("| --- | ---: | ---: |")
    for name, _ in engines:
        w = walls[name]
        load = f"{statistics.median(loads[name]):.0f} ({min(loads[name]):.0f})" if loads[name] else ""
        print(f"| {name} | {statistics.median(w):.0f} ({min(w):.0f}) | {load} |")


if __name__ == "__main__":
    main()
