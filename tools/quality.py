#!/usr/bin/env python3
"""Quality benchmark: llmpack's quantizations beside llama.cpp's, on one checkpoint and one token stream.

    python tools/quality.py MODEL_DIR --out DIR [--text FILE] [--windows 16] [--ctx 512]
                            [--configs q8,q4-rtn,...] [--llamacpp Q8_0,Q4_K_M,...] [--no-imatrix]

For every configuration: file size, bits/weight (8 x file bytes / parameters), size ratio to
the bf16 checkpoint (2 bytes a parameter), mean KL(ref || quantized) over next-token
distributions, top-1 agreement, perplexity ratio, conversion time and the converter's peak RSS.
The reference is the checkpoint itself in float32 (transformers); its logits are computed once
and cached. Every model sees the same token ids (llmpack's tokenizer; llama.cpp gets the ids,
not the text). llmpack files run on llmpack's numpy backend (exact dequantization).

Evaluation text: by default the GNU Coding Standards (Debian package gnu-standards, fetched
with `apt-get download`), real English prose that is not the calibration text (the Python
tutorial). llama.cpp: llama-cpp-python (`pip install llama-cpp-python`) plus the
convert_hf_to_gguf.py of its source distribution (--llamacpp-src, a folder holding the unpacked
sdist or vendor/llama.cpp); F16 GGUF, then llama_model_quantize, with an importance matrix
computed from the same calibration text as llmpack's (mean squared input per column, which is
what llama.cpp's imatrix holds) unless --no-imatrix. Writes DIR/quality.json, DIR/quality.md
and DIR/quality.png (KLD against file size, matplotlib).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

LLMPACK_CONFIGS = {
    "q8": ["--bits", "8"],
    "q4-rtn": ["--bits", "4"],
    "q4-gptq": ["--bits", "4", "--method", "gptq"],
    "q4-gptq-sym": ["--bits", "4", "--method", "gptq", "--symmetric"],  # no zero points: ~18 % faster matmuls
    # groups of 128: 0.6 bits/weight less than groups of 32 in onnxruntime's pre-packed layout (RSS)
    "q4-gptq-sym-g128": ["--bits", "4", "--method", "gptq", "--symmetric", "--group-size", "128"],
    "q4-awq+gptq": ["--bits", "4", "--method", "awq+gptq"],
    "q3-gptq": ["--bits", "3", "--method", "gptq"],
    "q2-gptq": ["--bits", "2", "--method", "gptq"],
    # sparsity (SparseGPT inside GPTQ): ~3.6 bits/weight in the layers, the size of q3-gptq
    "q4-gptq-s50": ["--bits", "4", "--method", "gptq", "--sparsity", "0.5"],
    "q4-gptq-s24": ["--bits", "4", "--method", "gptq", "--sparsity", "2:4"],
    # the same with the (dense) embedding and head at 3 bits: the whole file the size of q3-gptq
    "q4-gptq-s50-eh3": ["--bits", "4", "--method", "gptq", "--sparsity", "0.5", "--keep", "embed=3", "--keep", "head=3"],
    "bpw3.5-gptq": ["--target-bpw", "3.5", "--method", "gptq"],
    "bpw2.5-gptq": ["--target-bpw", "2.5", "--method", "gptq"],
    # sized to sit at or under llama.cpp's files on Qwen 0.5B (see docs/quantization.md)
    "q4-gptq-head8": ["--bits", "4", "--method", "gptq", "--keep", "head=8"],
    "q4-gptq-embed8": ["--bits", "4", "--method", "gptq", "--keep", "embed=8"],
    "bpw6-gptq": ["--target-bpw", "6.0", "--method", "gptq"],
    "bpw6.2-gptq": ["--target-bpw", "6.2", "--method", "gptq"],
    "bpw6.15-gptq": ["--target-bpw", "6.15", "--method", "gptq"],  # just under Q4_K_M's size on Qwen 0.5B
    "bpw5-gptq": ["--target-bpw", "5.0", "--method", "gptq"],
    "bpw4-gptq": ["--target-bpw", "4.0", "--method", "gptq"],
}
# Structural steps (issue 8), alone (f16 storage: the step's own damage) and composed with q4 GPTQ.
for _f in ("0.1", "0.2", "0.3"):
    LLMPACK_CONFIGS[f"slice{_f}"] = ["--slice", _f]
    LLMPACK_CONFIGS[f"slice{_f}-q4-gptq"] = ["--slice", _f, "--bits", "4", "--method", "gptq"]
for _f in ("0.1", "0.25", "0.5"):
    LLMPACK_CONFIGS[f"mlp{_f}"] = ["--prune-mlp", _f]
    LLMPACK_CONFIGS[f"mlp{_f}-q4-gptq"] = ["--prune-mlp", _f, "--bits", "4", "--method", "gptq"]
for _n in ("2", "4", "6"):
    LLMPACK_CONFIGS[f"drop{_n}"] = ["--drop-layers", _n]
    LLMPACK_CONFIGS[f"drop{_n}-q4-gptq"] = ["--drop-layers", _n, "--bits", "4", "--method", "gptq"]
# The size planner (issue 11) at llama.cpp's file sizes on this model (docs/plan.md); --keep-vocab so
# that both read the same tokens (a trimmed vocabulary is compared in bits per byte instead).
for _name, _bytes in (("Q2_K", 415_200_000), ("Q3_K_M", 432_000_000), ("Q4_K_M", 491_400_000),
                      ("Q8_0", 675_700_000)):
    LLMPACK_CONFIGS[f"plan-{_name}-size"] = ["--target-size", str(_bytes), "--method", "gptq", "--keep-vocab"]
# The 3-bit goal's size (issue 9: a file of at most 300 MB), planned rather than uniform.
LLMPACK_CONFIGS["plan-300MB"] = ["--target-size", "300000000", "--method", "gptq", "--keep-vocab"]
# ... and the 2-bit goal's (a body of at most 230 MB)
LLMPACK_CONFIGS["plan-230MB"] = ["--target-size", "230000000", "--method", "gptq", "--keep-vocab"]
# Healing (issue 9): trained against the original on the calibration text (docs/healing.md).
LLMPACK_CONFIGS["q2-gptq-heal16k"] = ["--bits", "2", "--method", "gptq", "--heal", "--heal-tokens", "16384"]
LLMPACK_CONFIGS["q3-gptq-heal16k"] = ["--bits", "3", "--method", "gptq", "--heal", "--heal-tokens", "16384"]
for _k in (8, 16):
    LLMPACK_CONFIGS[f"mlp0.25-q4-gptq-heal{_k}k"] = ["--prune-mlp", "0.25", "--bits", "4", "--method", "gptq", "--heal",
                                                   "--heal-tokens", str(_k * 1024)]
LLAMACPP_TYPES = ("Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K")
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


# -- helpers --------------------------------------------------------------------------------
def run_measured(cmd, env=None) -> tuple[float, int, str]:
    """Run a command; return (seconds, peak RSS bytes of the process, combined output tail)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak = [0]

    def watch():
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.5)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    out = proc.communicate()[0].decode(errors="replace")
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-3000:]}")
    return time.time() - t0, peak[0], out[-2000:]


def eval_text(args) -> Path:
    if args.text:
        return Path(args.text)
    cache = Path(args.out) / "evaltext"
    txt = cache / "standards.txt"
    if not txt.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", "gnu-standards"], cwd=cache, check=True, capture_output=True)
        deb = next(cache.glob("gnu-standards_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "x")], check=True)
        gz = cache / "x/usr/share/doc/gnu-standards/standards.text.gz"
        txt.write_text(gzip.decompress(gz.read_bytes()).decode("utf-8"))
    return txt


def n_params(model_dir) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="np") as h:
            for k in h.keys():
                total += int(np.prod(h.get_slice(k).get_shape()))
    return total


class Reference:
    """float32 transformers logits of every window, computed once, cached as a memmap."""

    def __init__(self, model_dir, windows, out: Path):
        self.path = out / "reference_logits.f32"
        meta = out / "reference_logits.json"
        key = {"model": str(Path(model_dir).resolve()), "windows": [w.tolist() for w in windows]}
        if not (meta.is_file() and json.loads(meta.read_text()) == key and self.path.is_file()):
            import torch
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
            V = model.config.vocab_size
            mm = np.lib.format.open_memmap(self.path, "w+", np.float32, (len(windows), len(windows[0]), V))
            for i, w in enumerate(windows):
                with torch.no_grad():
                    mm[i] = model(torch.as_tensor(w[None])).logits[0].float().numpy()
                print(f"reference: window {i + 1}/{len(windows)}", file=sys.stderr, flush=True)
            mm.flush()
            del mm, model
            meta.write_text(json.dumps(key))
        self.logits = np.load(self.path, mmap_mode="r")


def score(ref: Reference, windows, logits_fn) -> dict:
    from llmpack.runtime.quality import Accumulator

    acc = Accumulator()
    for i, w in enumerate(windows):
        acc.add(np.asarray(ref.logits[i]), logits_fn(w), w)
    return acc.report()


# -- llmpack --------------------------------------------------------------------------------
def bench_llmpack(name, extra, args, ref, windows, base) -> dict:
    from llmpack.runtime import load

    out = Path(args.out) / f"{name}.llmpack"
    side = out.with_suffix(".convert.json")
    if not (out.is_file() and side.is_file()):  # a finished conversion is reused (resumable benchmark)
        cmd = [sys.executable, "-m", "llmpack", "convert", str(args.model), "-o", str(out), "-q",
               "--calib-samples", str(args.calib_samples)] + extra
        if "--target-bpw" in extra or "--target-size" in extra:  # every target shares one sensitivity measurement
            cmd += ["--sensitivity", str(Path(args.out) / "sensitivity.json")]
        secs, rss, _ = run_measured(cmd)
        side.write_text(json.dumps({"seconds": secs, "peak_rss": rss, "cmd": cmd}))
    conv = json.loads(side.read_text())
    secs, rss = conv["seconds"], conv["peak_rss"]
    model = load(out, backend="numpy")
    r = score(ref, windows, model.logits)
    opts = model.header["provenance"]["options"]
    r.update(base(out), name=f"llmpack {name}", tool="llmpack", convert_s=round(secs, 1), peak_rss=rss,
             weight_bpw=opts.get("bits_per_weight"))
    model.pack.close()
    return r


# -- llama.cpp ------------------------------------------------------------------------------
def llamacpp_src(args) -> Path:
    root = Path(args.llamacpp_src)
    for cand in [root, root / "vendor/llama.cpp", *root.glob("*/vendor/llama.cpp"), *root.glob("*/*/vendor/llama.cpp")]:
        if (cand / "convert_hf_to_gguf.py").is_file():
            return cand
    raise SystemExit(f"no convert_hf_to_gguf.py under {root}; pass --llamacpp-src (the unpacked llama-cpp-python sdist)")


def imatrix_stats(args) -> dict:
    """GGUF tensor name -> mean squared input per column on llmpack's calibration samples."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmpack.converter.checkpoint import Checkpoint
    from llmpack.converter.quantize import calib
    from llmpack.converter.tokenizer_files import collect
    from llmpack.runtime.tokenizer import Tokenizer

    sec, _, blob = collect(Checkpoint(args.model))
    ids = calib.samples(Tokenizer(sec, blob), calib.default_text(), args.calib_samples, 512, 0)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    sums, hooks = {}, []
    for mname, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if mname == "lm_head":
            gg = "output.weight"
        else:
            parts = mname.split(".")  # model.layers.N.self_attn.q_proj
            key = ".".join(parts[3:])
            if parts[:2] != ["model", "layers"] or key not in GGUF_NAMES:
                continue
            gg = f"blk.{parts[2]}.{GGUF_NAMES[key]}.weight"

        def hook(m, inp, out, gg=gg):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            s = sums.setdefault(gg, [0.0, 0])
            s[0] = s[0] + (x * x).sum(0)
            s[1] += x.shape[0]
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(torch.as_tensor(row[None]))
    return {k: (v[0] / v[1]).float().numpy() for k, v in sums.items()}


# -- onnxruntime-genai ----------------------------------------------------------------------
def bench_genai(folder, args, ref, windows, base) -> dict:
    """An onnxruntime-genai model folder (its builder's output for the same checkpoint), run with
    bare onnxruntime on the same ids: one full-sequence call per window, empty past."""
    import onnxruntime as ort

    folder = Path(folder)
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]
    dec = cfg["decoder"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / dec["filename"]), so, providers=["CPUExecutionProvider"])
    names = {i.name: i for i in sess.get_inputs()}
    hk, hd = dec["num_key_value_heads"], dec["head_size"]

    def logits(ids):
        T = len(ids)
        feed = {"input_ids": np.asarray(ids, np.int64)[None], "attention_mask": np.ones((1, T), np.int64)}
        if "position_ids" in names:
            feed["position_ids"] = np.arange(T, dtype=np.int64)[None]
        for n in names:
            if n.startswith("past_key_values."):
                feed[n] = np.zeros((1, hk, 0, hd), np.float32)
        return sess.run(["logits"], feed)[0][0]

    r = score(ref, windows, logits)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".data"))
    r.update(base(folder, size), name=f"onnxruntime-genai {folder.name}", tool="onnxruntime-genai", convert_s=None,
             peak_rss=None, weight_bpw=None)
    return r


def bench_llamacpp(qtype, args, ref, windows, base, f16_gguf, f16_secs, imatrix) -> dict:
    out = Path(args.out) / f"{qtype}.gguf"
    script = (
        "import ctypes, sys, json, numpy as np, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{qtype}\n"
        "keep = []\n"
        f"im = {json.dumps(str(imatrix) if imatrix else None)}\n"
        "if im:\n"
        "    data = np.load(im)\n"
        "    arr = (llama_cpp.llama_model_imatrix_data * (len(data.files) + 1))()\n"
        "    for i, k in enumerate(data.files):\n"
        "        v = np.ascontiguousarray(data[k], np.float32); keep.append(v)\n"
        "        arr[i].name = k.encode(); arr[i].size = v.size\n"
        "        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))\n"
        "    p.imatrix = ctypes.cast(arr, type(p.imatrix))\n"
        "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))\n"
        "sys.exit(rc)\n")
    secs, rss, _ = run_measured([sys.executable, "-c", script, str(f16_gguf), str(out)])
    from llama_cpp import Llama

    llm = Llama(model_path=str(out), n_ctx=len(windows[0]), n_batch=len(windows[0]), logits_all=True,
                verbose=False, n_threads=os.cpu_count())

    def logits(w):
        llm.reset()
        llm.eval(w.tolist())
        return np.array(llm.scores[:len(w)], np.float32)
    r = score(ref, windows, logits)
    r.update(base(out), name=f"llama.cpp {qtype}" + (" imatrix" if imatrix else ""), tool="llama.cpp",
             convert_s=round(secs + f16_secs, 1), peak_rss=rss, weight_bpw=None)
    llm.close()
    return r


# -- report ---------------------------------------------------------------------------------
def _gb(n):
    return "n/a" if not n else f"{n / 2**30:.2f}"


def _secs(s):
    return "n/a" if s is None or s != s else f"{s:.0f}"


def table(rows) -> str:
    head = ("| model | file MB | bits/weight | size / bf16 | KLD | top-1 % | PPL ratio | convert s | peak RSS GB |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = [f"| {r['name']} | {r['file_bytes'] / 1e6:.1f} | {r['bpw']:.2f} | {r['size_ratio']:.3f} | "
             f"{r['kld']:.4f} | {100 * r['top1']:.2f} | {r['ppl_ratio']:.4f} | {_secs(r['convert_s'])} | "
             f"{_gb(r['peak_rss'])} |" for r in sorted(rows, key=lambda r: r["file_bytes"])]
    return head + "\n".join(lines) + "\n"


STRUCTURAL = ("slice", "mlp", "drop", "-s24", "-s50")  # configuration names of structural steps (issue 8)


def _category(r) -> str:
    if r["tool"] != "llmpack":
        return r["tool"]
    name = r["name"]
    if "heal" in name:
        return "llmpack healed"
    if name.startswith("llmpack plan-"):
        return "llmpack --target-size"
    if any(k in name for k in STRUCTURAL):
        return "llmpack structure" + (" + q4" if "q4" in name else " (f16)")
    return "llmpack quantization"


def plot(rows, path, title="Qwen2.5-Coder-0.5B-Instruct (off-grid)"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    # markers only: a line between measured points would suggest sizes nobody measured
    for cat, style in (("llmpack quantization", "o"), ("llmpack --target-size", "D"), ("llmpack structure + q4", "v"), ("llmpack structure (f16)", "<"),
                       ("llmpack healed", "*"), ("llama.cpp", "s"), ("onnxruntime-genai", "^")):
        pts = sorted((r["file_bytes"] / 1e6, r["kld"], r["name"]) for r in rows if _category(r) == cat)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=cat)
        for x, y, n in pts:
            ax.annotate(n.split(" ", 1)[1], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL(ref || quantized), nats")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(f"{title}: quality vs size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="transformers checkpoint folder (use the off-grid form, see README)")
    p.add_argument("--out", required=True, help="work/output folder")
    p.add_argument("--text", help="evaluation text (default: GNU Coding Standards via apt-get download)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--configs", default=",".join(LLMPACK_CONFIGS), help="llmpack configurations to run")
    p.add_argument("--llamacpp", default=",".join(LLAMACPP_TYPES), help="llama.cpp types ('' for none)")
    p.add_argument("--llamacpp-src", default="/tmp/llamacpp_src", help="unpacked llama-cpp-python sdist")
    p.add_argument("--no-imatrix", action="store_true", help="quantize llama.cpp without an importance matrix")
    p.add_argument("--genai", action="append", default=[], metavar="DIR",
                   help="also score an onnxruntime-genai model folder built from the same checkpoint "
                        "(python -m onnxruntime_genai.models.builder -i MODEL -o DIR -p int4 -e cpu)")
    p.add_argument("--title", default="Qwen2.5-Coder-0.5B-Instruct (off-grid)", help="the plot's model name")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration windows of 512 tokens (both tools)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from llmpack.converter.checkpoint import Checkpoint
    from llmpack.converter.tokenizer_files import collect
    from llmpack.runtime.quality import token_windows
    from llmpack.runtime.tokenizer import Tokenizer

    text = eval_text(args).read_text()
    sec, _, blob = collect(Checkpoint(args.model))
    windows = token_windows(Tokenizer(sec, blob), text, args.windows, args.ctx)
    if len(windows) < args.windows:
        raise SystemExit(f"text gives only {len(windows)} windows of {args.ctx} tokens")
    ref = Reference(args.model, windows, out)
    params = n_params(args.model)

    def base(path, size=None):
        """Size columns for a file (or `size` bytes: a model spread over several files)."""
        size = Path(path).stat().st_size if size is None else size
        return {"file_bytes": size, "bpw": 8 * size / params, "size_ratio": size / (2 * params)}

    results_path = out / "quality.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {r["name"] for r in rows}

    def save():
        results_path.write_text(json.dumps(rows, indent=1))
        (out / "quality.md").write_text(table(rows))
        try:
            plot(rows, out / "quality.png", args.title)
        except ImportError:
            print("matplotlib not installed: no plot", file=sys.stderr)

    for name in [c for c in args.configs.split(",") if c]:
        if f"llmpack {name}" in done:
            continue
        rows.append(bench_llmpack(name, LLMPACK_CONFIGS[name], args, ref, windows, base))
        save()
        print(table(rows[-1:]), flush=True)
    for folder in args.genai:
        if f"onnxruntime-genai {Path(folder).name}" in done:
            continue
        rows.append(bench_genai(folder, args, ref, windows, base))
        save()
        print(table(rows[-1:]), flush=True)
    qtypes = [q for q in args.llamacpp.split(",") if q]
    if qtypes:
        src = llamacpp_src(args)
        f16 = out / "f16.gguf"
        f16_side = out / "f16.convert.json"
        if not (f16.is_file() and f16_side.is_file()):
            env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
            secs, _, _ = run_measured([sys.executable, str(src / "convert_hf_to_gguf.py"), str(args.model),
                                       "--outtype", "f16", "--outfile", str(f16)], env=env)
            f16_side.write_text(json.dumps({"seconds": secs}))
        f16_secs = json.loads(f16_side.read_text())["seconds"]  # every type's time includes HF -> F16
        imatrix = None
        if not args.no_imatrix:
            imatrix = out / "imatrix.npz"
            if not imatrix.is_file():
                np.savez(imatrix, **imatrix_stats(args))
        for q in qtypes:
            name = f"llama.cpp {q}" + (" imatrix" if imatrix else "")
            if name in done:
                continue
            rows.append(bench_llamacpp(q, args, ref, windows, base, f16, f16_secs, imatrix))
            save()
            print(table(rows[-1:]), flush=True)
    save()
    print(table(rows))


if __name__ == "__main__":
    main()
