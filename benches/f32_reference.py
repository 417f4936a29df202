#!/usr/bin/env python3
"""How far each engine's quantized inference is from the exact computation on the same weights.

Both qwen-run and llama.cpp quantize activations to 8 bits; comparing them with each other says
how alike they are, not which is closer to the truth. This script judges both against the same
weights dequantized to F32 and run in f32, KV cache included, by llama.cpp (`llama-quantize
--allow-requantize X.gguf X-f32.gguf F32`, made once and cached beside the model; each engine
itself runs with its default KV cache: f16 for llama.cpp, f32 for qwen-run): next-token distributions at every
position of benches/data/fidelity.txt, top-1 agreement and KL(F32 || engine), for llama.cpp on
the quantized file and for qwen-run on it at every kernel level this CPU runs (QWEN_RUN_KERNELS).

    python3 benches/f32_reference.py --model 0.5b
    python3 benches/f32_reference.py --model 1.5b -t 2

Needs numpy (pip-installed on first use) and the pinned llama.cpp with llama-quantize
(benches/install_llama_cpp.sh). The F32 file is 4 bytes per weight (2.5 GB for the 0.5B, 7.1 GB
for the 1.5B).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (the helpers that fetch models and build the tools)

LEVELS = ["avx512", "avxvnni", "avx2", "scalar"]


def numpy():
    try:
        import numpy as np
    except ImportError:
        compare.run([sys.executable, "-m", "pip", "install", "-q", "numpy"])
        import numpy as np
    return np


def read_logits(path):
    """A llama_logits file: (token ids, [n, vocab] float32 logits), memory-mapped."""
    np = numpy()
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:8] != b"QRLOGIT1":
        sys.exit("f32_reference: %s is not a logits file" % path)
    n, vocab = np.frombuffer(head[8:], dtype="<u4")
    tokens = np.memmap(path, dtype="<u4", mode="r", offset=16, shape=(n,))
    logits = np.memmap(path, dtype="<f4", mode="r", offset=16 + 4 * n, shape=(n, vocab))
    return tokens, logits


def compare_files(ref_path, other_path):
    """Top-1 agreement and KL(ref || other) per position, as `qwen-run fidelity` computes them."""
    np = numpy()
    rt, ref = read_logits(ref_path)
    ot, other = read_logits(other_path)
    if not np.array_equal(rt, ot):
        sys.exit("f32_reference: the two logits files hold different token sequences")

    def log_softmax(x):
        x = x.astype(np.float64)
        m = x.max(axis=1, keepdims=True)
        return x - (np.log(np.exp(x - m).sum(axis=1, keepdims=True)) + m)

    agree, kls = 0, []
    for i in range(0, len(rt), 64):
        lp, lq = log_softmax(ref[i:i + 64]), log_softmax(other[i:i + 64])
        kls.extend((np.exp(lp) * (lp - lq)).sum(axis=1).tolist())
        agree += int((lp.argmax(axis=1) == lq.argmax(axis=1)).sum())
    return {"positions": len(rt), "top1_agreement": agree / len(rt),
            "mean_kl": sum(kls) / len(kls), "max_kl": max(kls)}


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="0.5b", help="a GGUF path, or a test model alias for models/fetch.py")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--qwen-run", help="qwen-run binary (default: cargo build --release)")
    ap.add_argument("--llama-bin", help="folder with llama-quantize etc. (default: install_llama_cpp.sh)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    model = compare.resolve_model(args.model)
    qr = compare.qwen_run_binary(args.qwen_run)
    lb = compare.llama_bin_dir(args.llama_bin)
    quantize = os.path.join(lb, "llama-quantize")
    if not os.access(quantize, os.X_OK):
        sys.exit("f32_reference: %s is missing: rerun benches/install_llama_cpp.sh --force" % quantize)
    t = str(args.threads)
    f32 = os.path.splitext(model)[0] + "-f32.gguf"
    if not os.path.isfile(f32):
        compare.run([quantize, "--allow-requantize", model, f32 + ".tmp", "F32", t])
        os.replace(f32 + ".tmp", f32)

    rows = []
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "llama_logits")
        inc = os.path.join(os.path.dirname(lb), "include")
        compare.run(["cc", "-O2", os.path.join(compare.ROOT, "benches", "llama_logits.c"), "-I", inc, "-L", lb,
                     "-lllama", "-Wl,-rpath," + lb, "-o", exe])
        ref = os.path.join(d, "f32.bin")
        compare.run([exe, f32, compare.FIDELITY_TEXT, ref, t, "f32"])
        theirs = os.path.join(d, "llama.bin")
        compare.run([exe, model, compare.FIDELITY_TEXT, theirs, t])
        rows.append(("llama.cpp b%s" % os.path.basename(os.path.dirname(lb)).split("-b")[-1],
                     compare_files(ref, theirs)))
        for level in LEVELS:
            env = dict(os.environ, QWEN_RUN_KERNELS=level)
            cmd = [qr, "fidelity", "-m", model, "-t", t, "--logits", ref, "-o", "json"]
            compare.log(" ".join(cmd) + " (QWEN_RUN_KERNELS=%s)" % level)
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0 and "this CPU lacks" in p.stderr:
                continue
            if p.returncode != 0:
                sys.exit("f32_reference: qwen-run fidelity failed:\n" + p.stderr[-3000:])
            rows.append(("qwen-run, %s kernels" % level, json.loads(p.stdout)["logits"]))

    n = rows[0][1]["positions"]
    print("against %s run in f32 (KV cache too) by llama.cpp, %d positions of benches/data/fidelity.txt:\n"
          % (os.path.basename(f32), n))
    print("| engine | top-1 agreement | mean KL | max KL |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in rows:
        print("| %s | %.2f%% | %.6f | %.6f |" % (name, 100 * r["top1_agreement"], r["mean_kl"], r["max_kl"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "f32": f32, "results": dict(rows)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
