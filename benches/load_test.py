#!/usr/bin/env python3
"""Load test of `qwen-run serve` on 127.0.0.1: aggregate decode throughput of N concurrent
streaming clients against a single stream, time-to-first-token percentiles, a check that every
request completes exactly once, and a check that overflow is refused with 429.

    python3 benches/load_test.py --model "$(python3 models/fetch.py 0.5b)" --streams 1,8,16 --parallel 8

For each stream count S it starts one server (`--parallel P`, threads -t), sends S streaming chat
requests at once (each `--tokens` tokens, greedy, a different prompt each), and reports the total
generated tokens divided by the wall time from the first request to the last token, the median and
p90 time to first token, and the speed-up over S=1. Every request must end exactly once (one
[DONE]), and the server's own count of generations must equal the number of requests.

Then the overflow check: a server with --parallel P and --queue-size Q gets P + Q + `--overflow`
requests at once; each must be answered 200 (and complete once) or 429 with Retry-After, at least
one must be 429, and the server must have generated exactly the 200s. Python stdlib only.
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
        out[i] = {"status": r.status, "retry_after": r.getheader("retry-after"),
                  "error": r.read().decode()[:200]}
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


def generations(host, port):
    c = http.client.HTTPConnection(host, port, timeout=60)
    c.request("GET", "/metrics")
    for line in c.getresponse().read().decode().splitlines():
        if line.startswith("qwen_run_generations_total "):
            return int(float(line.split()[1]))
    sys.exit("load_test.py: no qwen_run_generations_total in /metrics")


def fire(host, port, n, tokens):
    out = [None] * n
    ts = [threading.Thread(target=one_stream, args=(host, port, i, tokens, out)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out


def overflow(binary, model, parallel, threads, tokens, queue, extra):
    server, host, port = start_server(binary, model, parallel, threads, queue)
    try:
        n = parallel + queue + extra
        out = fire(host, port, n, tokens)
        ok = [o for o in out if o and o["status"] == 200]
        refused = [o for o in out if o and o["status"] == 429]
        if len(ok) + len(refused) != n:
            sys.exit(f"load_test.py: overflow: answers other than 200/429: {[o for o in out if o not in ok + refused][:2]}")
        if not refused:
            sys.exit(f"load_test.py: overflow: {n} requests on {parallel} slots + {queue} queue places, and none got 429")
        if any(o["retry_after"] is None for o in refused):
            sys.exit("load_test.py: overflow: a 429 without Retry-After")
        if any(o["done"] != 1 or not o["tokens"] for o in ok):
            sys.exit("load_test.py: overflow: an accepted request did not end exactly once")
        if generations(host, port) != len(ok):
            sys.exit(f"load_test.py: overflow: {len(ok)} requests accepted but {generations(host, port)} generated")
        return n, len(ok), len(refused)
    finally:
        server.kill()
        server.wait()


def run(binary, model, streams, parallel, threads, tokens):
    server, host, port = start_server(binary, model, parallel, threads, queue=max(64, streams))
    try:
        warm = [None]
        one_stream(host, port, 0, 4, warm)  # load pages, first forward
        t0 = time.time()
        out = fire(host, port, streams, tokens)
        bad = [o for o in out if o is None or o["status"] != 200 or o["done"] != 1 or not o["tokens"]]
        if bad:
            sys.exit(f"load_test.py: {len(bad)} of {streams} requests failed or did not end exactly once: {bad[:2]}")
        if generations(host, port) != streams + 1:  # + the warm-up
            sys.exit(f"load_test.py: {streams} requests, but the server generated {generations(host, port) - 1}")
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
    ap.add_argument("--streams", default="1,8,16")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--queue", type=int, default=2, help="--queue-size of the overflow check")
    ap.add_argument("--overflow", type=int, default=4,
                    help="requests beyond the slots and the queue in the overflow check (0: skip it)")
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
    print("\nEvery request above ended exactly once, and the server generated each once.")
    if a.overflow > 0:
        n, ok, refused = overflow(a.bin, a.model, a.parallel, a.threads, 16, a.queue, a.overflow)
        print(f"Overflow: {n} requests at once on --parallel {a.parallel} --queue-size {a.queue}: "
              f"{ok} answered (each once), {refused} refused with 429 + Retry-After.")


if __name__ == "__main__":
    main()
