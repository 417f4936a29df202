#!/usr/bin/env python3
"""qwen-run against llama.cpp on the same GGUF file, same thread count, alternating in one run.

Prints one llama-bench style table with both engines and a ratio column (qwen-run / llama.cpp)
for pp512, tg128, time to first token and load time, then fidelity (top-1 agreement and KL over a
fixed text of 500+ tokens, greedy continuations of the reference prompts) and the roofline.

    python3 benches/compare.py                 # the 0.5B test model, 2 threads
    python3 benches/compare.py --model 1.5b -r 3 --rounds 2
    python3 benches/compare.py --model path/to/any.gguf --no-fidelity
    python3 benches/compare.py --model 1.5b-iq4_xs -r 2   # made by llama-quantize once

llama.cpp is the pinned b11434 build from benches/install_llama_cpp.sh (installed on first use).
Speeds are the mean of every sample of every round; the machine is shared and noisy, so the
ratio of two engines measured back to back is the figure to read.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIDELITY_TEXT = os.path.join(ROOT, "benches", "data", "fidelity.txt")
GREEDY_REF = {"qwen2.5-coder-0.5b-instruct-q4_k_m": os.path.join(ROOT, "tests", "data", "qwen2.5-coder-0.5b-q4_k_m.json")}


def log(msg):
    print("compare: " + msg, file=sys.stderr, flush=True)


def run(cmd, **kw):
    out, err, _ = run_with_peak_rss(cmd, **kw)
    return out, err


def run_with_peak_rss(cmd, **kw):
    """Runs cmd (exits on failure): its stdout, stderr and peak resident memory in MiB (Linux
    reports ru_maxrss in KiB; wait4 gives this child's alone)."""
    log(" ".join(cmd))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **kw)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        sys.exit("compare: error: %s failed (exit %d):\n%s" % (cmd[0], p.returncode, stderr[-3000:]))
    return stdout, stderr, usage.ru_maxrss / 1024.0


# Quant types llama-quantize makes from a test model without an importance matrix, for
# `--model 1.5b-iq4_xs` and the like. (The IQ1/IQ2/IQ3 types need one, which the pinned build
# cannot make.) IQ4_XS keeps a Q4_K token embedding: the 1.5B's embedding rows do not take it.
REQUANT_TYPES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_1", "q5_0", "q5_1", "q5_k_s",
                 "q5_k_m", "q6_k", "q8_0", "iq4_nl", "iq4_xs"]
REQUANT_EXTRA = {"iq4_xs": ["--token-embedding-type", "q4_k"], "iq4_nl": ["--token-embedding-type", "q4_k"]}


def resolve_model(m, llama_bin=None):
    """A GGUF path, a test model name (0.5b, 1.5b: models/fetch.py), or a test model made into
    another quant type by llama.cpp's llama-quantize (`1.5b-iq4_xs`), made once and kept beside
    the test models (minutes each on 2 cores)."""
    if os.path.isfile(m):
        return os.path.abspath(m)
    base, _, quant = m.partition("-")
    if quant and base in ("0.5b", "1.5b"):
        if quant.lower() not in REQUANT_TYPES:
            sys.exit(f"compare: --model {m}: no such quant type made here; one of {', '.join(REQUANT_TYPES)} "
                     "after 0.5b- or 1.5b-, or a GGUF file")
        source = resolve_model(base)
        target = source.replace("-q4_k_m.gguf", f"-{quant.lower()}.gguf")
        if not os.path.isfile(target):
            quantize = os.path.join(llama_bin_dir(llama_bin), "llama-quantize")
            log(f"making {target} with llama-quantize (once; minutes)")
            run([quantize, "--allow-requantize", *REQUANT_EXTRA.get(quant.lower(), []), source,
                 target + ".part", quant.upper(), "2"])
            os.replace(target + ".part", target)
        return target
    out, _ = run([sys.executable, os.path.join(ROOT, "models", "fetch.py"), m])
    return out.strip()


def qwen_run_binary(path):
    if path:
        return path
    run(["cargo", "build", "--release", "--quiet", "--bin", "qwen-run"], cwd=ROOT)
    return os.path.join(ROOT, "target", "release", "qwen-run")


def llama_bin_dir(path):
    if path:
        return path
    out, _ = run(["bash", os.path.join(ROOT, "benches", "install_llama_cpp.sh")])
    return os.path.dirname(out.strip())


# ---- parsing (tested by tests/compare_script.rs on canned output) ----

def parse_qwen_run(text):
    """qwen-run bench -o json -> {test: [t/s samples]}, extras."""
    j = json.loads(text)
    return {r["test"]: r["samples_ts"] for r in j["rows"]}, j["extras"]


def parse_llama_bench(text):
    """llama-bench -o json -> {test: [t/s samples]}, plus model info."""
    rows = json.loads(text)
    tests = {}
    for r in rows:
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            name = "pp%d" % r["n_prompt"]
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            name = "tg%d" % r["n_gen"]
        else:
            name = "pp%d+tg%d" % (r["n_prompt"], r["n_gen"])
        tests[name] = r["samples_ts"]
    return tests, rows[0] if rows else {}


def parse_llama_load_ms(stderr):
    """Model load time from llama.cpp's perf report ('load time = 123.45 ms')."""
    m = re.search(r"load time\s*=\s*([\d.]+)\s*ms", stderr)
    return float(m.group(1)) if m else None


def mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(rows):
    """rows: (metric, qwen-run value str, llama.cpp value str, ratio str) -> markdown."""
    head = ["metric", "qwen-run", "llama.cpp", "ratio (qwen-run / llama.cpp)"]
    lines = ["| " + " | ".join(head) + " |", "| --- | ---: | ---: | ---: |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def speed_row(name, ours, theirs):
    (a, sa), (b, sb) = mean_sd(ours), mean_sd(theirs)
    return ("%s (t/s)" % name, "%.2f ± %.2f" % (a, sa), "%.2f ± %.2f" % (b, sb), "%.2fx" % (a / b))


def time_row(name, ours, theirs):
    """Times: lower is better, so the ratio shows llama.cpp / qwen-run as a speed-up."""
    if ours is None or theirs is None:
        return (name, "%s" % ours, "%s" % theirs, "n/a")
    return (name, "%.1f" % ours, "%.1f" % theirs, "%.2fx faster" % (theirs / ours) if ours <= theirs
            else "%.2fx slower" % (ours / theirs))


def memory_row(name, ours, theirs):
    return (name, "%.0f" % ours, "%.0f" % theirs, "%.2fx" % (ours / theirs))


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="0.5b", help="a GGUF path, or a test model alias for models/fetch.py")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3, help="samples per engine per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two engines")
    ap.add_argument("--qwen-run", help="qwen-run binary (default: cargo build --release)")
    ap.add_argument("--llama-bin", help="folder with llama-bench etc. (default: install_llama_cpp.sh)")
    ap.add_argument("--no-fidelity", action="store_true")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)

    model = resolve_model(args.model, args.llama_bin)
    name = os.path.basename(model)[:-5] if model.endswith(".gguf") else os.path.basename(model)
    qr = qwen_run_binary(args.qwen_run)
    lb = llama_bin_dir(args.llama_bin)
    t = str(args.threads)
    pp, tg = "pp%d" % args.n_prompt, "tg%d" % args.n_gen

    ours = {pp: [], tg: []}
    theirs = {pp: [], tg: []}
    extras = []
    llama_rss = 0.0
    for rnd in range(args.rounds):
        order = ["qwen-run", "llama.cpp"] if rnd % 2 == 0 else ["llama.cpp", "qwen-run"]
        for engine in order:
            if engine == "qwen-run":
                out, _ = run([qr, "bench", "-m", model, "-t", t, "-p", str(args.n_prompt), "-n",
                              str(args.n_gen), "-r", str(args.repetitions), "-o", "json"])
                tests, ex = parse_qwen_run(out)
                extras.append(ex)
                for k in ours:
                    ours[k] += tests[k]
            else:
                out, _, rss = run_with_peak_rss([os.path.join(lb, "llama-bench"), "-m", model, "-t", t, "-p",
                                              str(args.n_prompt), "-n", str(args.n_gen), "-r",
                                              str(args.repetitions), "-o", "json"])
                llama_rss = max(llama_rss, rss)
                tests, info = parse_llama_bench(out)
                for k in theirs:
                    theirs[k] += tests[k]

    # Time to first token for the same short chat prompt: llama.cpp's is its prompt-processing
    # time for that many tokens (best sample), ours is measured end to end by qwen-run bench.
    n_short = extras[0]["ttft_prompt_tokens"]
    out, _ = run([os.path.join(lb, "llama-bench"), "-m", model, "-t", t, "-p", str(n_short), "-n", "0",
                  "-r", str(max(3, args.repetitions)), "-o", "json"])
    short, _ = parse_llama_bench(out)
    llama_ttft = 1000.0 * n_short / max(short["pp%d" % n_short])
    our_ttft = min(e["ttft_ms"] for e in extras)
    # Load time: both from a warm page cache.
    _, err = run([os.path.join(lb, "llama-completion"), "-m", model, "-t", t, "-p", "Hi", "-n", "1",
                  "-no-cnv", "--no-warmup"], stdin=subprocess.DEVNULL)
    llama_load = parse_llama_load_ms(err)
    our_load = min(e["load_s"] for e in extras) * 1000.0

    rows = [speed_row(pp, ours[pp], theirs[pp]), speed_row(tg, ours[tg], theirs[tg]),
            time_row("time to first token, %d-token chat prompt (ms)" % n_short, our_ttft, llama_ttft),
            time_row("model load, warm page cache (ms)", our_load, llama_load),
            memory_row("peak RSS over the %s and %s runs (MiB)" % (pp, tg),
                       max(e["peak_rss_mib"] for e in extras), llama_rss)]
    print("## qwen-run vs llama.cpp b11434: %s, %s threads, %d rounds x %d repetitions\n"
          % (name, t, args.rounds, args.repetitions))
    print(table(rows))
    # The roofline of each qwen-run process: its own probe, taken right after its decode test.
    # On a shared machine the bandwidth left to us drifts from minute to minute (probes here
    # ranged 23-31 GB/s), so decode is set against the probe of the same run, not of another.
    bytes_per_token = extras[-1]["decode_bytes_per_token"]
    bws = [e["read_bandwidth_gbs"] for e in extras]
    per_run = [e["roofline_pct"] for e in extras]
    roof = statistics.mean(bws) * 1e9 / bytes_per_token
    print("\nroofline: %.1f MB of weights per token; qwen-run decode at %.0f%% of its run's measured "
          "read bandwidth (runs: %s; probes %s GB/s); llama.cpp %.1f t/s = %.0f%% of the mean probe "
          "(%.1f t/s)"
          % (bytes_per_token / 1e6, statistics.median(per_run), ", ".join("%.0f%%" % p for p in per_run),
             ", ".join("%.1f" % b for b in bws), statistics.mean(theirs[tg]),
             100 * statistics.mean(theirs[tg]) / roof, roof))

    fidelity = None
    if not args.no_fidelity:
        with tempfile.TemporaryDirectory() as d:
            exe = os.path.join(d, "llama_logits")
            inc = os.path.join(os.path.dirname(lb), "include")
            run(["cc", "-O2", os.path.join(ROOT, "benches", "llama_logits.c"), "-I", inc, "-L", lb, "-lllama",
                 "-Wl,-rpath," + lb, "-o", exe])
            ref = os.path.join(d, "logits.bin")
            run([exe, model, FIDELITY_TEXT, ref, t])
            cmd = [qr, "fidelity", "-m", model, "-t", t, "--logits", ref, "-o", "json"]
            if name in GREEDY_REF:
                cmd += ["--greedy", GREEDY_REF[name]]
            out, _ = run(cmd)
            fidelity = json.loads(out)
        lf = fidelity["logits"]
        print("\nfidelity over %d positions of benches/data/fidelity.txt: top-1 agreement %.2f%%, "
              "mean KL %.6f, max KL %.6f" % (lf["positions"], 100 * lf["top1_agreement"], lf["mean_kl"], lf["max_kl"]))
        for g in fidelity["greedy"]:
            print("greedy, %s: %d/%d tokens equal to llama.cpp" % (json.dumps(g["prompt"]), g["matched"], g["of"]))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "threads": args.threads, "qwen_run": ours, "llama_cpp": theirs,
                       "qwen_run_extras": extras, "llama_ttft_ms": llama_ttft, "llama_load_ms": llama_load,
                       "llama_peak_rss_mib": llama_rss,
                       "fidelity": fidelity}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
