#!/usr/bin/env python3
"""Rope scaling against llama.cpp on a long text: top-1 agreement and KL of the next-token
distribution at every position, with the same scaling flags given to both engines.

The text is a deterministic list of a few thousand tokens of records (the same on every machine);
each case runs llama.cpp (benches/llama_logits.c, the flags through llama.cpp's own LLAMA_ARG_*
variables) and `qwen-run fidelity` with the same flags. A small `--yarn-orig-ctx` puts most of the
text beyond the "original" context, so the scaled positions are the ones compared.

    python3 benches/long_context.py --model 0.5b
    python3 benches/long_context.py --model path/to/any.gguf --records 300
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

# (name, qwen-run flags, llama.cpp environment)
CASES = [
    ("unscaled", [], {}),
    ("linear x2", ["--rope-scaling", "linear", "--rope-scale", "2"],
     {"LLAMA_ARG_ROPE_SCALING_TYPE": "linear", "LLAMA_ARG_ROPE_SCALE": "2"}),
    ("yarn x4, orig 1024", ["--rope-scaling", "yarn", "--rope-scale", "4", "--yarn-orig-ctx", "1024"],
     {"LLAMA_ARG_ROPE_SCALING_TYPE": "yarn", "LLAMA_ARG_ROPE_SCALE": "4", "LLAMA_ARG_YARN_ORIG_CTX": "1024"}),
]


def records_text(n):
    """n records of made-up facts, seeded: a long document whose later parts refer to earlier ones."""
    rng = random.Random(2026)
    colors = ["red", "green", "blue", "amber", "violet", "grey", "white", "black"]
    cities = ["Lisbon", "Oslo", "Quito", "Hanoi", "Dakar", "Perth", "Lima", "Riga", "Accra", "Sapporo"]
    lines = ["Inventory of the northern warehouse. Each record gives an item, where it came from, and "
             "notes written by the clerk on duty.\n"]
    for i in range(1, n + 1):
        ref = rng.randint(1, i)
        lines.append("Record %d: a %s crate from %s, %d kilograms, shelf %d-%s. Checked by clerk %d; "
                     "same supplier as record %d.\n"
                     % (i, rng.choice(colors), rng.choice(cities), rng.randint(2, 400), rng.randint(1, 60),
                        "ABCDEF"[rng.randint(0, 5)], rng.randint(1, 12), ref))
    return "".join(lines)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="0.5b", help="a GGUF path, or a test model alias for models/fetch.py")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--records", type=int, default=80, help="records in the text (about 40 tokens each)")
    ap.add_argument("--qwen-run", help="qwen-run binary (default: build it)")
    ap.add_argument("--llama-bin", help="directory of llama.cpp's binaries and libllama (default: install)")
    ap.add_argument("--cases", help="comma list of case numbers to run (1: unscaled, 2: linear, 3: yarn; default all)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    model = compare.resolve_model(args.model)
    qr = compare.qwen_run_binary(args.qwen_run)
    lb = compare.llama_bin_dir(args.llama_bin)
    t = str(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        text = os.path.join(d, "records.txt")
        with open(text, "w") as f:
            f.write(records_text(args.records))
        exe = os.path.join(d, "llama_logits")
        inc = os.path.join(os.path.dirname(lb), "include")
        compare.run(["cc", "-O2", os.path.join(compare.ROOT, "benches", "llama_logits.c"), "-I", inc, "-L", lb,
                     "-lllama", "-Wl,-rpath," + lb, "-o", exe])
        picked = [CASES[int(i) - 1] for i in args.cases.split(",")] if args.cases else CASES
        for name, flags, env in picked:
            ref = os.path.join(d, "ref.bin")
            compare.log("%s: llama.cpp with %s" % (name, env or "no scaling variables"))
            compare.run([exe, model, text, ref, t], env=dict(os.environ, **env))
            cmd = [qr, "fidelity", "-m", model, "-t", t, "--logits", ref, "-o", "json"] + flags
            out, _ = compare.run(cmd)
            rows.append((name, " ".join(flags), json.loads(out)["logits"]))
            os.remove(ref)

    print("rope scaling against llama.cpp on %s, %d positions (a %d-record text), %s threads:\n"
          % (os.path.basename(model), rows[0][2]["positions"], args.records, t))
    print("| case | qwen-run flags | top-1 agreement | mean KL | max KL |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, flags, r in rows:
        print("| %s | `%s` | %.2f%% | %.6f | %.6f |"
              % (name, flags or "-", 100 * r["top1_agreement"], r["mean_kl"], r["max_kl"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "records": args.records,
                       "results": {name: r for name, _, r in rows}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
