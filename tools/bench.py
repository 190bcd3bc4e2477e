#!/usr/bin/env python3
"""Speed and memory benchmark: llmpack's engines beside llama.cpp, onnxruntime-genai and
transformers on CPU, in one run.

Every engine runs in a fresh subprocess (so peak RSS is its own), engines alternate round by
round (so drift in machine speed hits all of them alike), all use the same thread count, and
every figure is also printed as a ratio against the transformers baseline of the same run (or,
with --no-transformers for models too big for it, against the first engine given).

    # once: build the peers' files (GGUF Q8_0, onnxruntime-genai int4) and llmpack's packs
    python tools/bench.py prepare --hf /tmp/models/qwen05 --out /tmp/bench
    # on an idle machine: prints the command line `prepare` wrote, e.g.
    python tools/bench.py --hf /tmp/models/qwen05 \\
        --pack q4=/tmp/bench/q4.llmpack:onnxruntime --pack q8=/tmp/bench/q8.llmpack:onnxruntime \\
        --pack f16=/tmp/bench/f16.llmpack:onnxruntime --pack q8=/tmp/bench/q8.llmpack:numpy \\
        --gguf Q4_K_M=/tmp/bench/q4_k_m.gguf --gguf Q8_0=/tmp/bench/q8_0.gguf \\
        --genai int4=/tmp/bench/genai-int4

Per engine: file size, load seconds (constructor, i.e. to a model ready for its first token),
prefill tok/s (a --prompt-tokens prompt), decode tok/s (--new-tokens greedy tokens with the
KV cache), peak RSS (MB), bytes read per decoded token (weights the token's matmuls stream,
a tied embedding once, an untied input embedding not at all, plus the average KV cache), and
that as a share of the machine's read bandwidth (a streaming numpy read of a 1 GiB array on
--threads threads, measured in the same run): % of the bandwidth roofline.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# -- workers: each prints one JSON line {load_s, prefill_tps, decode_tps, rss_mb} ---------------


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

    options = json.loads(os.environ.get("LLMPACK_BENCH_OPTIONS") or "{}")  # --pack ...:BACKEND,key=value
    t0 = time.perf_counter()
    model = load(path, backend=backend, threads=options.pop("threads", threads), verify=False, **options)
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


def _worker_llmpack_ort(path, ids, new_tokens, threads):
    return _worker_llmpack(path, ids, new_tokens, threads, backend="onnxruntime")


def _worker_llama_cpp(path, ids, new_tokens, threads):
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=len(ids) + new_tokens + 16, n_batch=len(ids), n_ubatch=len(ids),
                n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    gen = llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
    t0 = time.perf_counter()
    next(gen)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        next(gen)
    decode_s = time.perf_counter() - t0
    return load_s, prefill_s, decode_s


def _worker_genai(path, ids, new_tokens, threads):
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    config = og.Config(path)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t0
    params = og.GeneratorParams(model)
    # min_length: no early stop on an end-of-sequence token (every engine decodes new_tokens)
    params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)  # runs the prompt
    gen.generate_next_token()  # picks the first token from the prompt's logits
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        gen.generate_next_token()
    decode_s = time.perf_counter() - t0
    assert len(gen.get_sequence(0)) == len(ids) + new_tokens
    return load_s, prefill_s, decode_s


WORKERS = {"transformers": _worker_transformers, "llmpack-numpy": _worker_llmpack,
           "llmpack-onnxruntime": _worker_llmpack_ort, "llama.cpp": _worker_llama_cpp,
           "onnxruntime-genai": _worker_genai}


def worker_main(kind, path, ids_file, new_tokens, threads):
    ids = json.load(open(ids_file))
    load_s, prefill_s, decode_s = WORKERS[kind](path, ids, new_tokens, threads)
    rss_mb = peak_rss_mb()
    print(json.dumps({"load_s": load_s, "prefill_tps": len(ids) / prefill_s,
                      "decode_tps": (new_tokens - 1) / decode_s, "rss_mb": rss_mb}))


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, which exec
    replaces; ru_maxrss would carry over the driver's (fork keeps it, Linux keeps it past exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- bytes per decoded token ------------------------------------------------------------------------


def _safetensors_params(folder) -> dict[str, int]:
    """tensor name -> element count, from the safetensors headers (no weights read)."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            for name, t in json.loads(fh.read(n)).items():
                if name != "__metadata__":
                    count = 1
                    for d in t["shape"]:
                        count *= d
                    out[name] = count
    return out


def weight_bytes_per_token(kind, path, hf) -> int | None:
    """Bytes of weights one decoded token streams through its matmuls (None if unknown)."""
    try:
        if kind.startswith("llmpack"):
            from llmpack.formats.reader import Pack

            pack = Pack(path, verify=False)
            tied = pack.header["model"]["tied_head"]
            skip = {"pos_embed.weight"} | (set() if tied else {"embed.weight"})
            return sum(n for t in pack.header["tensors"] if t["type"] != "u8" and t["name"] not in skip
                       and not t["name"].startswith("rope.") for _, n, _ in t["parts"].values())
        if kind == "llama.cpp":
            from gguf import GGUFReader

            tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
            if "output.weight" in tensors:
                tensors.pop("token_embd.weight", None)
            return sum(tensors.values())
        if kind == "onnxruntime-genai":
            import onnx

            model = onnx.load(os.path.join(path, "model.onnx"), load_external_data=False)
            sizes = {t.name: int({e.key: e.value for e in t.external_data}.get("length", 0)) or len(t.raw_data)
                     for t in model.graph.initializer}
            gathered = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
            used_elsewhere = {i for n in model.graph.node if n.op_type not in ("Gather", "GatherBlockQuantized")
                              for i in n.input}
            return sum(v for k, v in sizes.items() if k not in gathered or k in used_elsewhere)
        if kind == "transformers":
            params = _safetensors_params(path)
            cfg = json.load(open(os.path.join(path, "config.json")))
            if not cfg.get("tie_word_embeddings", False):
                params = {k: v for k, v in params.items() if "embed_tokens" not in k}
            return 4 * sum(params.values())  # loaded as float32
    except Exception as e:  # noqa: BLE001 - a missing reader only loses this column
        print(f"note: bytes/token of {kind} {path}: {e.__class__.__name__}: {e}", file=sys.stderr)
    return None


def kv_bytes_per_token(hf, prompt_tokens, new_tokens, bytes_per_value) -> int:
    """K and V of the average context during decoding, read once per token."""
    cfg = json.load(open(os.path.join(hf, "config.json")))
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    avg = prompt_tokens + new_tokens / 2
    return int(2 * cfg["num_hidden_layers"] * kv * hd * avg * bytes_per_value)


KV_BYTES = {"llama.cpp": 2}  # f16 cache; the others keep f32


def file_bytes(kind, path) -> int:
    p = Path(path)
    if kind == "transformers":
        return sum(f.stat().st_size for f in p.glob("*.safetensors"))
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.name.startswith("model.onnx"))
    return p.stat().st_size


def measure_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Streaming read bandwidth (bytes/s): `threads` threads each reduce a slice of a 1 GiB array
    (numpy releases the GIL in reductions); best of `repeats`."""
    import numpy as np

    a = np.ones(int(gib * 2 ** 30) // 8, np.uint64)  # written once, so every page is resident
    chunks = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.bitwise_or.reduce, chunks))
            best = max(best, a.nbytes / (time.perf_counter() - t0))
    return best


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


def run_engine(kind, path, ids_file, new_tokens, threads, options=None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), LLMPACK_BENCH_OPTIONS=json.dumps(options or {}))
    cmd = [sys.executable, __file__, "--worker", kind, path, ids_file, str(new_tokens), str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{kind} on {path} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _option_value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def engines_from_args(args) -> list[tuple[str, str, str, dict]]:
    """(label, worker kind, path, load options) in run order; transformers first (the baseline)
    unless --no-transformers (then the first engine given is the baseline)."""
    engines = [] if args.no_transformers else [("transformers fp32", "transformers", args.hf, {})]
    for spec in args.pack:
        label, _, rest = spec.partition("=")
        path, _, backend = rest.partition(":")
        backend, *opts = (backend or "onnxruntime").split(",")
        options = {k: _option_value(v) for k, _, v in (o.partition("=") for o in opts)}
        kind = f"llmpack-{backend}"
        if kind not in WORKERS:
            raise SystemExit(f"unknown backend in {spec}; known: numpy, onnxruntime")
        engines.append((f"llmpack {backend} {label}", kind, path, options))
    for spec in args.gguf:
        label, _, path = spec.partition("=")
        engines.append((f"llama.cpp {label}", "llama.cpp", path, {}))
    for spec in args.genai:
        label, _, path = spec.partition("=")
        engines.append((f"onnxruntime-genai {label}", "onnxruntime-genai", path, {}))
    return engines


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, path, ids_file, new_tokens, threads = sys.argv[2:7]
        worker_main(kind, path, ids_file, int(new_tokens), int(threads))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        prepare(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="transformers checkpoint folder (the baseline)")
    ap.add_argument("--pack", action="append", default=[], metavar="LABEL=FILE[:BACKEND[,KEY=VALUE...]]",
                    help="an llmpack file to measure, BACKEND onnxruntime (default) or numpy, then load() options, "
                         "e.g. q4-acc0=q4.llmpack:onnxruntime,accuracy_level=0 (repeatable; labels must differ)")
    ap.add_argument("--gguf", action="append", default=[], metavar="LABEL=FILE",
                    help="a GGUF file to measure with llama.cpp (llama-cpp-python; repeatable)")
    ap.add_argument("--genai", action="append", default=[], metavar="LABEL=DIR",
                    help="an onnxruntime-genai model folder (repeatable)")
    from llmpack.runtime.ort_backend import physical_cores

    ap.add_argument("--threads", type=int, default=physical_cores(), help="for every engine (default: physical cores)")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--no-transformers", action="store_true",
                    help="skip the transformers fp32 baseline (a 7B needs ~34 GB for it); ratios are then "
                         "against the first engine given")
    args = ap.parse_args()

    engines = engines_from_args(args)
    if not engines:
        raise SystemExit("--no-transformers leaves no engine: give --pack, --gguf or --genai")
    note = machine_note(args.threads)
    print(f"machine: {note}")
    if os.getloadavg()[0] > 0.5:
        print("warning: the machine is not idle (load average > 0.5); figures will be skewed")
    bandwidth = measure_bandwidth(args.threads)
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s (numpy, {args.threads} threads, 1 GiB)", flush=True)
    ids = prompt_ids(args.hf, args.prompt_tokens)
    ids_file = f"/tmp/llmpack_bench_ids_{os.getpid()}.json"
    json.dump(ids, open(ids_file, "w"))

    results = {label: [] for label, _, _, _ in engines}
    try:
        for r in range(args.rounds):
            for label, kind, path, options in engines:  # alternate engines within each round
                res = run_engine(kind, path, ids_file, args.new_tokens, args.threads, options)
                results[label].append(res)
                print(f"round {r + 1} {label}: {json.dumps({k: round(v, 2) for k, v in res.items()})}", flush=True)
    finally:
        os.unlink(ids_file)

    best = {label: {"load_s": min(x["load_s"] for x in rs), "prefill_tps": max(x["prefill_tps"] for x in rs),
                    "decode_tps": max(x["decode_tps"] for x in rs), "rss_mb": max(x["rss_mb"] for x in rs)}
            for label, rs in results.items()}
    for label, kind, path, _ in engines:
        b = best[label]
        b["file_mb"] = file_bytes(kind, path) / 1e6
        w = weight_bytes_per_token(kind, path, args.hf)
        if w is not None:
            b["mb_per_token"] = (w + kv_bytes_per_token(args.hf, args.prompt_tokens, args.new_tokens,
                                                        KV_BYTES.get(kind, 4))) / 1e6
            b["roofline_pct"] = 100 * b["decode_tps"] * b["mb_per_token"] * 1e6 / bandwidth
    base_label = engines[0][0]
    base = best[base_label]
    print(f"\nbest of {args.rounds} rounds; {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"{args.threads} threads; ratios vs {base_label} in the same run; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s\n{note}")
    print("| engine | file MB | load s | prefill tok/s | decode tok/s | peak RSS MB | MB read/token | % of roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for label, b in best.items():
        mbt = f"{b['mb_per_token']:.0f}" if "mb_per_token" in b else "?"
        roof = f"{b['roofline_pct']:.0f} %" if "roofline_pct" in b else "?"
        print(f"| {label} | {b['file_mb']:.0f} | {b['load_s']:.2f} ({b['load_s'] / base['load_s']:.2f}x) "
              f"| {b['prefill_tps']:.1f} ({b['prefill_tps'] / base['prefill_tps']:.2f}x) "
              f"| {b['decode_tps']:.1f} ({b['decode_tps'] / base['decode_tps']:.2f}x) "
              f"| {b['rss_mb']:.0f} ({b['rss_mb'] / base['rss_mb']:.2f}x) | {mbt} | {roof} |")
    if args.json:
        json.dump({"machine": note, "bandwidth": bandwidth, "rounds": results, "best": best},
                  open(args.json, "w"), indent=1)


# -- prepare: the peers' files, built from the same checkpoint -----------------------------------------


def _run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def llama_cpp_sources(cache: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py and its gguf-py, from the llama-cpp-python sdist of the
    installed version (the converter must match the runtime that reads its files)."""
    from importlib.metadata import version

    v = version("llama-cpp-python")
    root = cache / f"llama_cpp_python-{v}" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").exists():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={v}", "-d", cache])
        import tarfile

        with tarfile.open(cache / f"llama_cpp_python-{v}.tar.gz") as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and (
                m.name.endswith("convert_hf_to_gguf.py") or "/gguf-py/" in m.name or "/conversion/" in m.name)]
            tar.extractall(cache, members=members, filter="data")
    return root


def prepare(argv):
    ap = argparse.ArgumentParser(prog="bench.py prepare",
                                 description="build every engine's file from one transformers checkpoint")
    ap.add_argument("--hf", required=True, help="transformers checkpoint folder (tools/get_model.py output)")
    ap.add_argument("--out", required=True, help="folder for the files")
    ap.add_argument("--gguf-q4km", help="the Q4_K_M GGUF (default: tools/get_model.py's cached download)")
    ap.add_argument("--q4-args", default="--bits 4 --method gptq --symmetric",
                    help="llmpack convert options for the q4 pack (default: the best-quality q4 of "
                         "docs/quantization.md, symmetric so onnxruntime's kernel skips zero points)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf = Path(args.hf)
    cmd = [sys.executable, Path(__file__).resolve(), "--hf", hf]

    for label, options in (("q4", args.q4_args.split()), ("q8", ["--bits", "8"]), ("f16", ["--dtype", "f16"])):
        pack = out / f"{label}.llmpack"
        if not pack.exists():
            try:
                _run([sys.executable, "-m", "llmpack", "convert", hf, "-o", pack] + options)
            except subprocess.CalledProcessError:
                print(f"note: no {label} pack (llmpack convert {' '.join(options)} failed)")
                continue
        cmd += ["--pack", f"{label}={pack}:onnxruntime"]
    if (out / "q4.llmpack").exists():
        cmd += ["--pack", f"q4-numpy={out / 'q4.llmpack'}:numpy"]

    q4km = Path(args.gguf_q4km) if args.gguf_q4km else None
    src = hf / "llmpack_source.json"  # tools/get_model.py: the GGUF the checkpoint was made from
    if q4km is None and src.exists():
        info = json.loads(src.read_text())
        cache = Path(os.environ.get("LLMPACK_CACHE") or Path.home() / ".cache" / "llmpack")
        if info.get("gguf_file") and not info.get("options", {}).get("off_grid"):
            q4km = cache / info["name"] / info["gguf_file"]
    if q4km is not None and q4km.exists():
        cmd += ["--gguf", f"Q4_K_M={q4km}"]
    else:
        print("note: no Q4_K_M GGUF found; pass --gguf-q4km")
    q8_0 = out / "q8_0.gguf"
    try:
        if not q8_0.exists():
            root = llama_cpp_sources(out / "llama.cpp-src")
            _run([sys.executable, root / "convert_hf_to_gguf.py", hf, "--outtype", "q8_0", "--outfile", q8_0],
                 env=dict(os.environ, PYTHONPATH=str(root / "gguf-py")))
        cmd += ["--gguf", f"Q8_0={q8_0}"]
    except Exception as e:  # noqa: BLE001
        print(f"note: no Q8_0 GGUF ({e.__class__.__name__}: {e})")

    genai = out / "genai-int4"
    try:
        if not (genai / "genai_config.json").exists():
            with open(out / "genai-build.log", "w") as log:  # the builder logs every tensor
                _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", genai,
                      "-p", "int4", "-e", "cpu", "-c", out / "genai-cache"], stdout=log, stderr=log)
        cmd += ["--genai", f"int4={genai}"]
    except Exception as e:  # noqa: BLE001
        print(f"note: no onnxruntime-genai int4 model ({e.__class__.__name__}: {e})")
    line = " ".join(str(c) for c in cmd)
    (out / "run.sh").write_text("#!/bin/sh\n# run on an idle machine\n" + line + ' "$@"\n')
    q = out / "q4.llmpack" if (out / "q4.llmpack").exists() else out / "q8.llmpack"
    tune = [sys.executable, Path(__file__).resolve(), "--hf", hf, "--pack", f"default={q}"]
    for label, opts in (("acc0", "accuracy_level=0"), ("nofuse", "fuse=false"), ("nospin", "spinning=false"),
                        ("1thread", "threads=1"), ("saved", f"cache_dir={out / 'ort-cache'}")):
        tune += ["--pack", f"{label}={q}:onnxruntime,{opts}"]
    (out / "tune.sh").write_text("#!/bin/sh\n# the onnxruntime backend's options, on an idle machine\n"
                                 + " ".join(str(c) for c in tune) + ' "$@"\n')
    print(f"\nready; on an idle machine run:\n  sh {out / 'run.sh'}\n  sh {out / 'tune.sh'}  (backend options)")


if __name__ == "__main__":
    main()
