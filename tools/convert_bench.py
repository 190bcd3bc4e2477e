#!/usr/bin/env python3
"""Conversion time and memory: llmpack beside llama.cpp on one checkpoint, in one run.

    python tools/convert_bench.py --hf /tmp/q7 --out /tmp/cb            # RTN q4 and llama.cpp Q4_K_M
    python tools/convert_bench.py --hf /tmp/q7 --out /tmp/cb --gptq     # and GPTQ q4 (47 min at 7B)

Every step runs in a fresh subprocess, measured with os.wait4: wall seconds, CPU seconds
(user + system) and peak resident set (the child's ru_maxrss, what `/usr/bin/time -v` prints).

- llmpack RTN q4: `llmpack convert HF -o OUT/rtn-q4.llmpack --bits 4` (zero points, group 32)
- llmpack GPTQ q4 (--gptq): the same with `--method gptq` (16 x 512 calibration tokens)
- llama.cpp: `convert_hf_to_gguf.py HF --outtype bf16` (from the installed llama-cpp-python's
  source distribution, like bench.py prepare), then `llama_model_quantize(..., Q4_K_M)` with
  --threads threads; the bf16 GGUF is removed after quantizing unless --keep-bf16.

The steps run one after another (a conversion takes minutes: alternating them buys nothing)
and the machine's load average is printed before each, so a busy machine shows. Seconds per
billion weights are of the checkpoint's weights (every tensor it holds).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (tools/bench.py: the llama.cpp sources and the machine note)

Q4_K_M = 15  # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_K_M


def timed(cmd, env=None) -> dict:
    """Run cmd to completion; its wall and CPU seconds and peak RSS (GB)."""
    print("+", " ".join(map(str, cmd)), f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], env=env)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed (exit {os.waitstatus_to_exitcode(status)}): {' '.join(map(str, cmd))}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_gb": ru.ru_maxrss * 1024 / 1e9}


def checkpoint_weights(hf: Path) -> int:
    """Elements of every tensor in the checkpoint's safetensors files (their headers only)."""
    total = 0
    for f in sorted(hf.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def quantize_worker(src: str, dst: str, threads: int):
    """Subprocess body: llama.cpp's quantizer on one GGUF (what llama-quantize runs)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = Q4_K_M
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize returned {rc}")


def steps(args, out: Path):
    """(label, [(part label, command, env)], output file) in run order."""
    hf = Path(args.hf)
    llmpack = [sys.executable, "-m", "llmpack", "convert", hf, "--quiet", "-o"]
    yield "llmpack RTN q4", [("convert", llmpack + [out / "rtn-q4.llmpack", "--bits", "4"], None)], \
        out / "rtn-q4.llmpack"
    if args.gptq:
        yield "llmpack GPTQ q4", [("convert", llmpack + [out / "gptq-q4.llmpack", "--bits", "4", "--method", "gptq"],
                                   None)], out / "gptq-q4.llmpack"
    root = bench.llama_cpp_sources(out / "llama.cpp-src")
    bf16, q4 = out / "bf16.gguf", out / "q4_k_m.gguf"
    env = dict(os.environ, PYTHONPATH=str(root / "gguf-py"))
    yield "llama.cpp Q4_K_M", [
        ("convert_hf_to_gguf bf16", [sys.executable, root / "convert_hf_to_gguf.py", hf, "--outtype", "bf16",
                                     "--outfile", bf16], env),
        ("quantize Q4_K_M", [sys.executable, Path(__file__).resolve(), "--quantize-worker", bf16, q4,
                             str(args.threads)], None)], q4


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--quantize-worker":
        quantize_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="transformers checkpoint folder (e.g. tools/synth_checkpoint.py's)")
    ap.add_argument("--out", required=True, help="folder for the files (needs the bf16 size again, plus outputs)")
    ap.add_argument("--gptq", action="store_true", help="also time llmpack's GPTQ q4 (~24x the CPU of RTN)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp's quantizer threads")
    ap.add_argument("--keep-bf16", action="store_true", help="keep llama.cpp's intermediate bf16 GGUF")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = checkpoint_weights(Path(args.hf))
    note = bench.machine_note(args.threads)
    print(f"machine: {note}\ncheckpoint: {args.hf}, {weights / 1e9:.2f} B weights", flush=True)
    rows = {}
    for label, parts, output in steps(args, out):
        measured = [(part, timed(cmd, env)) for part, cmd, env in parts]
        rows[label] = {"parts": dict(measured), "file_gb": output.stat().st_size / 1e9,
                       "wall_s": sum(m["wall_s"] for _, m in measured), "cpu_s": sum(m["cpu_s"] for _, m in measured),
                       "peak_gb": max(m["peak_gb"] for _, m in measured)}
        print(f"{label}: {json.dumps({k: v for k, v in rows[label].items() if k != 'parts'})}", flush=True)
    if not args.keep_bf16 and (out / "bf16.gguf").exists():
        (out / "bf16.gguf").unlink()
    print(f"\n{weights / 1e9:.2f} B weights; {note}")
    print("| converter | step | file GB | wall s | CPU s | CPU s per B weights | peak RSS GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        for part, m in r["parts"].items():
            print(f"| {label} | {part} | | {m['wall_s']:.0f} | {m['cpu_s']:.0f} | {m['cpu_s'] / weights * 1e9:.1f} "
                  f"| {m['peak_gb']:.2f} |")
        print(f"| **{label}** | total | {r['file_gb']:.2f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} "
              f"| {r['cpu_s'] / weights * 1e9:.1f} | {r['peak_gb']:.2f} |")
    if args.json:
        json.dump({"machine": note, "weights": weights, "rows": rows}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
