#!/usr/bin/env python3
"""Write a synthetic transformers checkpoint of a real architecture's shape (random bf16 weights).

Enough to measure conversion memory and time, and runtime speed, honestly at 7-8B scale without
downloading one: the tensor names and shapes are those transformers itself builds for the config
(read off a model instantiated on the `meta` device, so nothing is allocated), the weights are
random at a realistic scale (matrices and embeddings normal with std 0.02, norm weights 1 + 0.02 N
— Gemma stores them offset by one, so 0.02 N —, biases 0.02 N), and the tokenizer is a real one
borrowed from a small model folder. Random weights say nothing about quality: never evaluate one.

    python tools/synth_checkpoint.py --preset llama3-8b --out /tmp/synth/llama8b
    python tools/synth_checkpoint.py --preset qwen2.5-7b --layers 8 --out /tmp/synth/qwen7b-8l
    python tools/synth_checkpoint.py --family gpt2 --tiny --out /tmp/synth/gpt2-tiny

Streaming: each tensor is generated in chunks of rows straight into its shard file (safetensors
layout written by hand: 8-byte header length, JSON header, raw little-endian data), so memory
stays at one chunk whatever the model size (0.74 GB peak RSS, mostly torch/transformers). bf16
comes from numpy float32 normals by keeping the high 16 bits (a truncation; the distribution is
what matters here). Measured on this shared 2-core machine: 8.55 B weights (17 GB) in 143 CPU-s
(83 user, 60 system: the writes), 6 minutes wall at load average 16.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

# family -> (transformers config class, tiny kwargs). Tiny sizes are deliberately odd (MLP 72).
FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=72, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=72, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, sliding_window=12)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=72, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "gemma3_text": ("Gemma3TextConfig", dict(hidden_size=64, intermediate_size=72, num_hidden_layers=7,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                             sliding_window=10)),
    "phi": ("PhiConfig", dict(hidden_size=64, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=72, num_hidden_layers=3, num_attention_heads=4,
                              word_embed_proj_dim=64)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_inner=72, n_layer=3, n_head=4, n_positions=160)),
}
# The MLP width's name where it is not intermediate_size; the depth/width names are mapped by
# transformers' own attribute_map (GPT-2: n_layer, n_embd).
INTERMEDIATE_KEY = {"opt": "ffn_dim", "gpt2": "n_inner"}

PRESETS = {
    # Llama-3.1-8B's config.json (RoPE llama3 scaling, 128k context).
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                bos_token_id=128000, eos_token_id=128001,
                                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192})),
    # Qwen2.5-7B(-Instruct)'s config.json (QKV biases are the family's).
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                 bos_token_id=151643, eos_token_id=151645,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Qwen2.5-1.5B: the real model the 287 s RTN figure was measured on.
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                   bos_token_id=151643, eos_token_id=151645,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
DEFAULT_TOKENIZER = Path("/work/models/qwen05-offgrid")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json")
CHUNK = 1 << 25  # elements generated at once (128 MB of float32)


def build_config(family: str, kwargs: dict):
    import transformers

    return getattr(transformers, FAMILIES[family][0])(**kwargs, dtype="bfloat16")


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor save_pretrained would write, in the model's order."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    # save_pretrained of a model records its class; llama.cpp's convert_hf_to_gguf.py needs it
    config.architectures = [type(model).__name__]
    sd = model.state_dict()
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    specs = []
    for name, t in sd.items():
        if tied and name == "lm_head.weight":
            continue
        specs.append((name, tuple(t.shape)))
    return specs


def init_of(family: str, name: str, shape) -> tuple[float, float]:
    """(mean, std) of a tensor's random values."""
    if len(shape) == 1 and name.endswith("weight"):  # norm weights (LayerNorm / RMSNorm)
        return (0.0 if family == "gemma3_text" else 1.0), 0.02
    return 0.0, 0.02


def random_bf16(rng, n: int, mean: float, std: float) -> np.ndarray:
    """n bf16 values (as uint16 bits) ~ N(mean, std): float32 normals, high half kept."""
    x = rng.standard_normal(n, dtype=np.float32)
    x *= np.float32(std)
    if mean:
        x += np.float32(mean)
    return (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def write_shard(path: Path, specs, family: str, rng, progress=None):
    """One safetensors file holding `specs`' tensors, written chunk by chunk."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for name, shape in specs:
            mean, std = init_of(family, name, shape)
            left = int(np.prod(shape))
            while left:
                n = min(left, CHUNK)
                fh.write(random_bf16(rng, n, mean, std).tobytes())
                left -= n
            if progress:
                progress(name)
    tmp.replace(path)


def copy_tokenizer(src: Path, out: Path) -> int:
    """Copy the tokenizer files; returns the tokenizer's vocabulary size (0 if unknown)."""
    copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise SystemExit(f"synth_checkpoint: {src} holds no tokenizer.json; pass --tokenizer-from a model folder")
    for f in copied:
        shutil.copy2(src / f, out / f)
    if "tokenizer.json" in copied:
        tj = json.loads((src / "tokenizer.json").read_text())
        ids = list(tj.get("model", {}).get("vocab", {}).values()) + [t["id"] for t in tj.get("added_tokens", [])]
        return max(ids) + 1 if ids else 0
    return 0


def synthesize(out: Path, family: str, kwargs: dict, tokenizer_from: Path | None = None,
               shard_gb: float = 4.0, seed: int = 0, quiet: bool = False) -> Path:
    """Write the checkpoint folder; returns it. The vocabulary grows to cover the tokenizer."""
    from transformers import GenerationConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_vocab = copy_tokenizer(tokenizer_from, out) if tokenizer_from is not None else _tiny_tokenizer(out)
    vocab = kwargs.get("vocab_size") or build_config(family, kwargs).vocab_size
    if tok_vocab > vocab:
        grown = -(-tok_vocab // 64) * 64
        if not quiet:
            print(f"synth_checkpoint: vocabulary {vocab} grown to {grown} to cover the borrowed tokenizer's "
                  f"{tok_vocab} ids", file=sys.stderr)
        vocab = grown
    kwargs = dict(kwargs, vocab_size=vocab)
    if family == "opt":  # OPT's learned positions: 2 extra rows, defaults to 2048
        kwargs.setdefault("max_position_embeddings", 160 if kwargs.get("hidden_size", 0) <= 256 else 2048)
    config = build_config(family, kwargs)
    specs = tensor_specs(config)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)

    limit = int(shard_gb * 1e9)
    shards, cur, size = [], [], 0
    for name, shape in specs:
        nbytes = int(np.prod(shape)) * 2
        if cur and size + nbytes > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    shards.append(cur)
    rng = np.random.default_rng(seed)
    total = sum(int(np.prod(s)) for _, s in specs)
    done = [0]
    t0 = time.time()
    sizes = dict(specs)

    def progress(name):
        done[0] += int(np.prod(sizes[name]))
        if not quiet:
            el = time.time() - t0
            eta = el / done[0] * (total - done[0])
            print(f"\rsynth_checkpoint: {done[0] / 1e9:.2f}/{total / 1e9:.2f} B params "
                  f"[{el:.0f}s elapsed, ETA {eta:.0f}s] {name[:60]:60s}", end="", file=sys.stderr, flush=True)

    weight_map = {}
    for i, part in enumerate(shards):
        fname = (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                 else "model.safetensors")
        write_shard(out / fname, part, family, rng, progress)
        weight_map.update({name: fname for name, _ in part})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if not quiet:
        print(f"\nsynth_checkpoint: wrote {out} ({total / 1e9:.2f} B params, {len(shards)} shard(s)) "
              f"in {time.time() - t0:.0f}s", file=sys.stderr)
    return out


def _tiny_tokenizer(out: Path) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_models import tiny_tokenizer

    tiny_tokenizer(out)
    return 0  # its 290 ids fit every tiny vocabulary (300)


def resolve(args) -> tuple[str, dict]:
    if args.preset:
        family, kwargs = PRESETS[args.preset]
        kwargs = dict(kwargs)
    elif args.family:
        family = args.family
        kwargs = dict(FAMILIES[family][1], vocab_size=300, bos_token_id=0, eos_token_id=1) if args.tiny else {}
        if not args.tiny and not args.config:
            raise SystemExit("synth_checkpoint: --family needs --tiny or --config FILE (or use --preset)")
        if family != "gpt2" and args.tiny:
            kwargs["max_position_embeddings"] = 160
    else:
        family, kwargs = None, {}
    if args.config:
        cfg = json.loads(Path(args.config).read_text())
        family = args.family or cfg.get("model_type", family)
        if family not in FAMILIES:
            raise SystemExit(f"synth_checkpoint: model_type {family!r} not one of {', '.join(FAMILIES)}")
        kwargs = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version",
                                                              "model_type", "dtype", "torch_dtype")}
    names = {"layers": "num_hidden_layers", "hidden": "hidden_size"}
    if family == "gpt2":
        names = {"layers": "n_layer", "hidden": "n_embd"}
    if args.layers:
        kwargs[names["layers"]] = args.layers
        kwargs.pop("layer_types", None)
        kwargs.pop("max_window_layers", None)
    if args.hidden:
        kwargs[names["hidden"]] = args.hidden
        if family == "opt":
            kwargs["word_embed_proj_dim"] = args.hidden
    if args.intermediate:
        kwargs[INTERMEDIATE_KEY.get(family, "intermediate_size")] = args.intermediate
    if args.vocab:
        kwargs["vocab_size"] = args.vocab
    return family, kwargs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS))
    src.add_argument("--family", choices=sorted(FAMILIES))
    ap.add_argument("--tiny", action="store_true", help="with --family: a tiny model (tests)")
    ap.add_argument("--config", help="a config.json to copy the shape from (model_type picks the family)")
    ap.add_argument("--layers", type=int, help="override the number of layers")
    ap.add_argument("--hidden", type=int, help="override the hidden size (heads must still divide it)")
    ap.add_argument("--intermediate", type=int, help="override the MLP width")
    ap.add_argument("--vocab", type=int, help="override the vocabulary size")
    ap.add_argument("--tokenizer-from", type=Path,
                    help=f"borrow tokenizer files from this folder (default: {DEFAULT_TOKENIZER} if present, "
                         f"else the tests' tiny tokenizer)")
    ap.add_argument("--shard-gb", type=float, default=4.0, help="shard size in GB (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if not (args.preset or args.family or args.config):
        ap.error("give --preset, --family F --tiny, or --config FILE")
    if args.config and args.preset:
        ap.error("give --config alone (or with --family), not with --preset")
    family, kwargs = resolve(args)
    tok = args.tokenizer_from
    if tok is None and not args.tiny and (DEFAULT_TOKENIZER / "tokenizer.json").is_file():
        tok = DEFAULT_TOKENIZER
    synthesize(args.out, family, kwargs, tok, args.shard_gb, args.seed, args.quiet)


if __name__ == "__main__":
    main()
