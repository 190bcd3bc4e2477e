#!/usr/bin/env python3
"""Speed and memory benchmark: llmpack engines beside transformers on CPU, in one run.

Every engine runs in a fresh subprocess (so peak RSS is its own), engines alternate round by
round (so drift in machine speed hits all of them alike), and every figure is also printed
as a ratio against the transformers baseline measured in the same run.

    python tools/bench.py --hf /tmp/models/qwen05 --pack f32=qwen05-f32.llmpack --pack f16=qwen05-f16.llmpack

Per engine: load seconds, prefill tok/s (a --prompt-tokens prompt), decode tok/s (--new-tokens
greedy tokens with the KV cache), peak RSS (MB). Check the machine is idle first (it says).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

# -- workers: each prints one JSON line {load_s, prefill_tps, decode_tps} ----------------------


def _worker_transformers(path, ids, new_tokens, threads):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(x, use_cache=True)
        tok = out.logits[0, -1].argmax()
        prefill_s = time.perf_counter() - t0
        past = out.past_key_values
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(tok.view(1, 1), past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[0, -1].argmax()
        decode_s = time.perf_counter() - t0
    return load_s, prefill_s, decode_s


def _worker_llmpack(path, ids, new_tokens, threads, backend="numpy"):
    from llmpack.runtime import load

    t0 = time.perf_counter()
    model = load(path, backend=backend) if backend != "numpy" else load(path)
    load_s = time.perf_counter() - t0
    gen = model.generate_ids(ids, max_new_tokens=new_tokens, temperature=0, stop=False)
    t0 = time.perf_counter()
    next(gen)  # first token = prefill
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = sum(1 for _ in gen)
    decode_s = time.perf_counter() - t0
    assert n == new_tokens - 1
    return load_s, prefill_s, decode_s


WORKERS = {"transformers": _worker_transformers, "llmpack-numpy": _worker_llmpack}


def worker_main(kind, path, ids_file, new_tokens, threads):
    ids = json.load(open(ids_file))
    load_s, prefill_s, decode_s = WORKERS[kind](path, ids, new_tokens, threads)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"load_s": load_s, "prefill_tps": len(ids) / prefill_s,
                      "decode_tps": (new_tokens - 1) / decode_s, "rss_mb": rss_mb}))


# -- driver --------------------------------------------------------------------------------------


def machine_note(threads) -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load1 = os.getloadavg()[0]
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.python_version()}, "
            f"{threads} threads, load average {load1:.2f} at start")


def prompt_ids(pack_or_dir, n) -> list[int]:
    """n token ids of real English text, tokenized by the model's own tokenizer."""
    text = open(os.path.join(os.path.dirname(__file__), "bench_prompt.txt")).read()
    if str(pack_or_dir).endswith(".llmpack"):
        from llmpack.formats.reader import Pack
        from llmpack.runtime.tokenizer import Tokenizer

        pack = Pack(pack_or_dir, verify=False)
        tok = Tokenizer(pack.header["tokenizer"], pack.blob(pack.header["tokenizer"]["blob"]))
        ids = tok.encode(text)
    else:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(pack_or_dir)(text).input_ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def run_engine(kind, path, ids_file, new_tokens, threads) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", kind, path, ids_file, str(new_tokens), str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{kind} on {path} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, path, ids_file, new_tokens, threads = sys.argv[2:7]
        worker_main(kind, path, ids_file, int(new_tokens), int(threads))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="transformers checkpoint folder (the baseline)")
    ap.add_argument("--pack", action="append", default=[], metavar="LABEL=FILE[:BACKEND]",
                    help="an llmpack file to measure (repeatable)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    engines = [("transformers fp32", "transformers", args.hf)]
    for spec in args.pack:
        label, _, rest = spec.partition("=")
        path, _, backend = rest.partition(":")
        kind = f"llmpack-{backend or 'numpy'}"
        if kind not in WORKERS:
            raise SystemExit(f"unknown backend in {spec}; known: {', '.join(WORKERS)}")
        engines.append((f"llmpack {label}", kind, path))

    print(f"machine: {machine_note(args.threads)}")
    if os.getloadavg()[0] > 0.5:
        print("warning: the machine is not idle (load average > 0.5); figures will be skewed")
    ids = prompt_ids(args.hf, args.prompt_tokens)
    ids_file = f"/tmp/llmpack_bench_ids_{os.getpid()}.json"
    json.dump(ids, open(ids_file, "w"))

    results = {label: [] for label, _, _ in engines}
    for r in range(args.rounds):
        for label, kind, path in engines:  # alternate engines within each round
            res = run_engine(kind, path, ids_file, args.new_tokens, args.threads)
            results[label].append(res)
            print(f"round {r + 1} {label}: {json.dumps({k: round(v, 2) for k, v in res.items()})}", flush=True)
    os.unlink(ids_file)

    best = {label: {"load_s": min(x["load_s"] for x in rs), "prefill_tps": max(x["prefill_tps"] for x in rs),
                    "decode_tps": max(x["decode_tps"] for x in rs), "rss_mb": max(x["rss_mb"] for x in rs)}
            for label, rs in results.items()}
    base = best["transformers fp32"]
    print(f"\nbest of {args.rounds} rounds; {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens; "
          f"ratios vs transformers fp32 in the same run")
    print("| engine | load s | prefill tok/s | decode tok/s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for label, b in best.items():
        print(f"| {label} | {b['load_s']:.2f} ({b['load_s'] / base['load_s']:.2f}x) "
              f"| {b['prefill_tps']:.1f} ({b['prefill_tps'] / base['prefill_tps']:.2f}x) "
              f"| {b['decode_tps']:.1f} ({b['decode_tps'] / base['decode_tps']:.2f}x) "
              f"| {b['rss_mb']:.0f} ({b['rss_mb'] / base['rss_mb']:.2f}x) |")
    if args.json:
        json.dump({"machine": machine_note(args.threads), "rounds": results, "best": best}, open(args.json, "w"),
                  indent=1)


if __name__ == "__main__":
    main()
