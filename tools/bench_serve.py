#!/usr/bin/env python3
"""Load benchmark of `llmpack serve` on loopback: requests/s and time to first token under N
concurrent streaming clients.

Starts the server on a free loopback port (a subprocess), sends a warm-up batch, then --requests
streamed chat completions from --clients threads at once (each a short conversation of one user
message, --max-tokens greedy tokens). Reports requests/s, generated tokens/s, and the time to
first token (request sent -> first content event) p50/p95, which includes the wait in the queue:
the server runs one generation at a time, so under N clients TTFT grows with N while requests/s
stays that of one stream. Also the server's RSS after the warm-up and at the end.

    python tools/bench_serve.py model.llmpack --clients 32 --requests 300 --max-tokens 16
"""
from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ["hello", "the quick brown fox", "def main():", "What is the capital of France?", "Write a haiku."]


def start_server(pack: str, backend: str | None):
    args = [sys.executable, "-m", "llmpack", "serve", pack, "--port", "0", "--max-queue", "100000"]
    proc = subprocess.Popen(args + (["--backend", backend] if backend else []), stderr=subprocess.PIPE, text=True)
    match = None
    for line in proc.stderr:  # the line naming the URL
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if match:
            break
    if not match:
        proc.kill()
        sys.exit("bench_serve: the server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    port = int(match.group(1))
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        if proc.poll() is not None:
            sys.exit("bench_serve: the server exited")
        time.sleep(0.1)


def one_request(port: int, i: int, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first content event, seconds in all, content events) of one streamed chat reply."""
    body = {"messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first, pieces = None, 0
    for line in r:
        if line.startswith(b"data: {"):
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                first = first or time.perf_counter()
                pieces += 1
    conn.close()
    end = time.perf_counter()
    return (first or end) - t0, end - t0, pieces


def rss_mb(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def percentile(xs, q):
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pack")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--backend", choices=["onnxruntime", "numpy"], default=None)
    args = p.parse_args()
    proc, port = start_server(args.pack, args.backend)
    try:
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(lambda i: one_request(port, i, args.max_tokens), range(args.clients)))  # warm-up
            rss_warm = rss_mb(proc.pid)
            t0 = time.perf_counter()
            results = list(pool.map(lambda i: one_request(port, i, args.max_tokens), range(args.requests)))
            wall = time.perf_counter() - t0
        ttft = [r[0] for r in results]
        print(json.dumps({
            "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
            "requests_per_s": round(args.requests / wall, 2),
            "content_events_per_s": round(sum(r[2] for r in results) / wall, 1),
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p95_s": round(percentile(ttft, 95), 3),
            "latency_p50_s": round(percentile([r[1] for r in results], 50), 3),
            "rss_after_warmup_mb": round(rss_warm, 1), "rss_end_mb": round(rss_mb(proc.pid), 1),
        }, indent=1))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
