#!/usr/bin/env python3
"""Load test of `qwen-run serve` on 127.0.0.1: aggregate decode throughput of N concurrent
streaming clients against a single stream, time-to-first-token percentiles, and a check that every
request completes exactly once.

    python3 benches/load_test.py --model "$(python3 models/fetch.py 0.5b)" --streams 1,4,8 --parallel 8

For each stream count S it starts one server (`--parallel P`, threads -t), sends S streaming chat
requests at once (each `--tokens` tokens, greedy, a different prompt each), and reports the total
generated tokens divided by the wall time from the first request to the last token, the median and
p90 time to first token, and the speed-up over S=1. Python stdlib only.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = ["rivers", "bread", "the moon", "trains", "gardens", "chess", "rain", "bridges",
          "owls", "copper", "islands", "clocks", "salt", "kites", "glass", "maps"]


def start_server(binary, model, parallel, threads, queue):
    p = subprocess.Popen([binary, "serve", "-m", model, "--port", "0", "--parallel", str(parallel),
                          "-t", str(threads), "--queue-size", str(queue), "--no-prompt-cache"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if line.startswith("listening on "):
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            host, port = line.split("//")[1].strip().split(":")
            return p, host, int(port)
    p.kill()
    sys.exit("load_test.py: the server did not start")


def one_stream(host, port, i, tokens, out):
    body = json.dumps({"messages": [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}],
                       "max_tokens": tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.time()
    c = http.client.HTTPConnection(host, port, timeout=600)
    c.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    r = c.getresponse()
    ttft, done, completion = None, 0, None
    if r.status != 200:
        out[i] = {"status": r.status, "error": r.read().decode()[:200]}
        return
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done += 1
            continue
        chunk = json.loads(data)
        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and ttft is None:
            ttft = time.time() - t0
        if chunk.get("usage"):
            completion = chunk["usage"]["completion_tokens"]
    out[i] = {"status": 200, "ttft": ttft, "end": time.time(), "tokens": completion, "done": done}


def run(binary, model, streams, parallel, threads, tokens):
    server, host, port = start_server(binary, model, parallel, threads, queue=max(64, streams))
    try:
        warm = [None]
        one_stream(host, port, 0, 4, warm)  # load pages, first forward
        out = [None] * streams
        t0 = time.time()
        ts = [threading.Thread(target=one_stream, args=(host, port, i, tokens, out)) for i in range(streams)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        bad = [o for o in out if o is None or o["status"] != 200 or o["done"] != 1 or not o["tokens"]]
        if bad:
            sys.exit(f"load_test.py: {len(bad)} of {streams} requests failed or did not end exactly once: {bad[:2]}")
        total = sum(o["tokens"] for o in out)
        wall = max(o["end"] for o in out) - t0
        ttfts = sorted(o["ttft"] for o in out)
        p90 = ttfts[min(len(ttfts) - 1, int(round(0.9 * (len(ttfts) - 1))))]
        return total, wall, statistics.median(ttfts), p90
    finally:
        server.kill()
        server.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "qwen-run"))
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    if not os.access(a.bin, os.X_OK):
        sys.exit(f"load_test.py: no qwen-run at {a.bin} (cargo build --release)")
    print(f"| streams | --parallel | tokens | wall (s) | aggregate tok/s | vs 1 stream | TTFT p50 (ms) | TTFT p90 (ms) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = None
    for s in [int(x) for x in a.streams.split(",")]:
        total, wall, p50, p90 = run(a.bin, a.model, s, a.parallel, a.threads, a.tokens)
        rate = total / wall
        base = base or rate
        print(f"| {s} | {a.parallel} | {total} | {wall:.2f} | {rate:.1f} | {rate / base:.2f}x | {p50 * 1e3:.0f} | {p90 * 1e3:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
