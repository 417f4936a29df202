#!/usr/bin/env python3
"""Speculative decoding, measured: qwen-run's plain decode against its prompt lookup (n-gram
drafts), and llama.cpp's `llama-lookup` on the same prompts, same file and threads, greedy.

Each case of benches/data/speculative.json is rendered once with the model's chat template
(`qwen-run template`), then every engine runs the same prompt text, alternating, for --rounds.
"grounded" cases copy from their input (edit a function, fix a bug, quote a text, a tool call,
extract fields); "free" cases are open-ended chat, where drafts are rarely kept and speculation
must not cost anything. For each case: decode tok/s of each (median of the rounds), the speed-up
of qwen-run's lookup over its plain decode, the share of drafted tokens kept, tokens per step, and
whether the lookup's text is identical to plain decoding's (it must be).

    python3 benches/speculative.py --model 1.5b
    python3 benches/speculative.py --model 0.5b --rounds 3 --cases tool-call,story
    python3 benches/speculative.py --model 1.5b --no-llama   # qwen-run only
    python3 benches/speculative.py --model 1.5b --draft 0.5b --no-llama   # and a draft model

With --draft, qwen-run also runs with that draft model (`-md`, `--spec-type draft-simple`: the
draft model alone, adaptive unless --draft-args says otherwise), reported beside the lookup: its
speed-up over plain decoding, the share of its drafted tokens kept, and whether its text is
identical to plain decoding's (it must be).

llama.cpp is the pinned b11434 build from benches/install_llama_cpp.sh; `llama-lookup` drafts from
an n-gram cache of the context with `--spec-draft-n-max` tokens (default here 8).
"""
import argparse
import json
import os
import re
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import ROOT, llama_bin_dir, log, qwen_run_binary, resolve_model, run  # noqa: E402

CASES = os.path.join(ROOT, "benches", "data", "speculative.json")


# ---- parsing (tested by tests/compare_script.rs on canned output) ----

def parse_qwen_report(stderr):
    """qwen-run's end-of-run report -> decode tok/s, generated tokens, drafted, kept."""
    m = re.search(r"generated (\d+) tokens \| decode ([\d.]+) tok/s", stderr)
    if not m:
        sys.exit("speculative: no report in qwen-run's output:\n" + stderr[-2000:])
    d = re.search(r"drafted (\d+) kept (\d+)", stderr)
    return {
        "tok_s": float(m.group(2)),
        "generated": int(m.group(1)),
        "drafted": int(d.group(1)) if d else 0,
        "kept": int(d.group(2)) if d else 0,
    }


def parse_llama_lookup(stderr):
    """llama-lookup's summary -> decode tok/s, generated tokens, drafted, accepted."""
    m = re.search(r"decoded\s+(\d+) tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", stderr)
    if not m:
        sys.exit("speculative: no summary in llama-lookup's output:\n" + stderr[-2000:])
    d = re.search(r"n_drafted\s*=\s*(\d+)", stderr)
    a = re.search(r"n_accept\s*=\s*(\d+)", stderr)
    return {
        "tok_s": float(m.group(2)),
        "generated": int(m.group(1)),
        "drafted": int(d.group(1)) if d else 0,
        "kept": int(a.group(1)) if a else 0,
    }


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1.5b", help="a GGUF path, or a test model alias for models/fetch.py")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=256, help="most tokens per answer")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the engines")
    ap.add_argument("--cases", help="comma list of case names (default: all)")
    ap.add_argument("--draft-max", type=int, default=8, help="llama-lookup's --spec-draft-n-max")
    ap.add_argument("--qwen-args", default="", help="extra flags for qwen-run's lookup runs")
    ap.add_argument("--draft", help="also run qwen-run with this draft model (a GGUF path or a test model alias)")
    ap.add_argument("--draft-args", default="", help="extra flags for qwen-run's draft-model runs")
    ap.add_argument("--qwen-run", help="qwen-run binary (default: cargo build --release)")
    ap.add_argument("--llama-bin", help="folder with llama-lookup (default: install_llama_cpp.sh)")
    ap.add_argument("--no-llama", action="store_true", help="qwen-run only")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)

    model = resolve_model(args.model)
    qwen = qwen_run_binary(args.qwen_run)
    lookup = None if args.no_llama else os.path.join(llama_bin_dir(args.llama_bin), "llama-lookup")
    cases = json.load(open(CASES))
    if args.cases:
        wanted = args.cases.split(",")
        cases = [c for c in cases if c["name"] in wanted]
    tmp = tempfile.mkdtemp(prefix="qwen-run-spec-")
    for c in cases:
        msgs = os.path.join(tmp, c["name"] + ".json")
        json.dump(c["messages"], open(msgs, "w"))
        text, _ = run([qwen, "template", "-m", model, "--messages", msgs])
        c["prompt_file"] = os.path.join(tmp, c["name"] + ".txt")
        with open(c["prompt_file"], "w") as f:
            f.write(text.rstrip("\n"))

    common = ["-m", model, "-n", str(args.n_gen), "-t", str(args.threads), "--temp", "0"]
    engines = {
        "plain": lambda c: [qwen] + common + ["--no-chat-template", "--no-prompt-cache", "-f", c["prompt_file"],
                                              "--spec-type", "none"],
        "lookup": lambda c: [qwen] + common + ["--no-chat-template", "--no-prompt-cache", "-f", c["prompt_file"],
                                               "--spec-type", "ngram-simple"] + args.qwen_args.split(),
    }
    if args.draft:
        draft = resolve_model(args.draft)
        engines["draft"] = lambda c: [qwen] + common + ["--no-chat-template", "--no-prompt-cache", "-f", c["prompt_file"],
                                                        "-md", draft, "--spec-type", "draft-simple"] + args.draft_args.split()
    if lookup:
        engines["llama-lookup"] = lambda c: [lookup] + common + ["-f", c["prompt_file"], "-c", "4096", "-b", "4096",
                                                                 "--spec-draft-n-max", str(args.draft_max)]
    results = {c["name"]: {e: [] for e in engines} for c in cases}
    texts = {}
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for c in cases:
            for e in order:
                out, err = run(engines[e](c))
                parsed = parse_llama_lookup(err) if e == "llama-lookup" else parse_qwen_report(err)
                results[c["name"]][e].append(parsed)
                if e != "llama-lookup":
                    texts.setdefault((c["name"], e), out)

    head = ["case", "kind", "plain t/s", "lookup t/s", "speed-up", "kept", "tokens/step", "same text"]
    if args.draft:
        head += ["draft t/s", "speed-up", "kept", "tokens/step", "same text"]
    if lookup:
        head += ["llama-lookup t/s", "kept", "lookup / llama-lookup"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * 2 + " ---: |" * (len(head) - 2)]
    speedups = {"grounded": [], "free": []}
    draft_speedups = {"grounded": [], "free": []}
    for c in cases:
        res = results[c["name"]]
        plain = median([x["tok_s"] for x in res["plain"]])
        ours = median([x["tok_s"] for x in res["lookup"]])
        last = res["lookup"][-1]
        kept = "%d/%d" % (last["kept"], last["drafted"])
        per_step = last["generated"] / max(1, last["generated"] - last["kept"])
        same = texts[(c["name"], "plain")] == texts[(c["name"], "lookup")]
        speedups[c["kind"]].append(ours / plain)
        row = [c["name"], c["kind"], "%.2f" % plain, "%.2f" % ours, "%.2fx" % (ours / plain), kept,
               "%.2f" % per_step, "yes" if same else "NO"]
        if args.draft:
            theirs = median([x["tok_s"] for x in res["draft"]])
            d_last = res["draft"][-1]
            d_per_step = d_last["generated"] / max(1, d_last["generated"] - d_last["kept"])
            d_same = texts[(c["name"], "plain")] == texts[(c["name"], "draft")]
            draft_speedups[c["kind"]].append(theirs / plain)
            row += ["%.2f" % theirs, "%.2fx" % (theirs / plain), "%d/%d" % (d_last["kept"], d_last["drafted"]),
                    "%.2f" % d_per_step, "yes" if d_same else "NO"]
        if lookup:
            theirs = median([x["tok_s"] for x in res["llama-lookup"]])
            l_last = res["llama-lookup"][-1]
            row += ["%.2f" % theirs, "%d/%d" % (l_last["kept"], l_last["drafted"]), "%.2fx" % (ours / theirs)]
        lines.append("| " + " | ".join(row) + " |")
    print("model: %s%s, %d threads, %d rounds, greedy, at most %d tokens" % (
        os.path.basename(model), ", draft " + os.path.basename(draft) if args.draft else "",
        args.threads, args.rounds, args.n_gen))
    print("\n".join(lines))
    for kind, xs in speedups.items():
        if xs:
            print("%s: median speed-up of lookup over plain %.2fx (%s)" % (
                kind, median(xs), ", ".join("%.2f" % x for x in xs)))
    for kind, xs in draft_speedups.items():
        if xs:
            print("%s: median speed-up of the draft model over plain %.2fx (%s)" % (
                kind, median(xs), ", ".join("%.2f" % x for x in xs)))
    if args.json:
        json.dump(results, open(args.json, "w"), indent=1)
    if not all(texts[(c["name"], "plain")] == texts[(c["name"], "lookup")] for c in cases):
        sys.exit("speculative: the lookup's text differs from plain decoding's")
    if args.draft and not all(texts[(c["name"], "plain")] == texts[(c["name"], "draft")] for c in cases):
        sys.exit("speculative: the draft model's text differs from plain decoding's")


if __name__ == "__main__":
    main(sys.argv[1:])
