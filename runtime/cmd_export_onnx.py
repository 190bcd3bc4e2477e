"""llmpack export-onnx FILE -o DIR — write the model as ONNX for onnxruntime / onnxruntime-genai.

DIR receives model.onnx (the same decoder graph the onnxruntime backend runs), model.onnx.data
(the weights, in the pack's own storage types: q4 stays 4-bit), genai_config.json in
onnxruntime-genai's schema, and the tokenizer files and chat template.

Graph inputs: input_ids, attention_mask, position_ids (int64, batch 1) and
past_key_values.N.key/value (1, kv_heads, past_len, head_dim); outputs: logits (1, seq, vocab)
and present.N.key/value. GroupQueryAttention writes the cache in place when past and present
share one buffer of capacity length (genai's past_present_share_buffer).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from llmpack.formats.errors import LlmpackError
from llmpack.formats.reader import Pack

DATA_ALIGN = 4096  # page-aligned external data: onnxruntime can map it instead of reading it

EXAMPLE = """examples:
  llmpack export-onnx qwen05-q4.llmpack -o qwen05-onnx
  python -c "import onnxruntime_genai as og; m = og.Model('qwen05-onnx'); ..."
"""

GENAI_TYPES = {"llama", "mistral", "qwen2", "gemma3_text"}  # others run as genai's generic "decoder"


def export_onnx(path, out_dir, accuracy_level: int | None = None, verify: bool = True) -> dict:
    """Export; returns {"files": [...], "bytes": n}. Raises LlmpackError on a bad file or folder."""
    from .onnx_graph import build_decoder
    from .ort_backend import DEFAULT_ACCURACY_LEVEL

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LlmpackError(f"output {out} exists and is not a folder")
    pack = Pack(path, verify=verify)
    acc = DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    graph = build_decoder(pack, accuracy_level=acc, genai_io=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        umask = os.umask(0o022)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the export folder's mode
    except OSError as e:
        raise LlmpackError(f"cannot write in {out.parent} ({e.strerror}); choose another output folder") from None
    try:
        files = _write_export(pack, graph, tmp)
        _move_into_place(tmp, out, files)
    except OSError as e:
        raise LlmpackError(f"cannot write the export to {out} ({e.strerror}); nothing was left half-written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"files": files, "bytes": sum((out / f).stat().st_size for f in files)}


def _write_export(pack, graph, folder: Path) -> list[str]:
    layout, offset = {}, 0
    for name, (arr, _elem) in graph.weights.items():
        offset = -(-offset // DATA_ALIGN) * DATA_ALIGN
        layout[name] = (offset, arr.nbytes)
        offset += arr.nbytes
    data_name = "model.onnx.data"
    with open(folder / data_name, "wb") as fh:
        for name, (arr, _elem) in graph.weights.items():
            fh.write(b"\0" * (layout[name][0] - fh.tell()))
            fh.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
    model = graph.model(lambda name, arr: {"location": data_name, "offset": layout[name][0],
                                           "length": layout[name][1]})
    (folder / "model.onnx").write_bytes(model)
    files = ["model.onnx", data_name, "genai_config.json"]
    (folder / "genai_config.json").write_text(json.dumps(genai_config(pack, graph), indent=2) + "\n")
    return files + write_tokenizer(pack, folder)


def _move_into_place(tmp: Path, out: Path, files: list[str]) -> None:
    """A new or empty folder: one atomic rename of the finished folder. An existing one: file by
    file, model.onnx last, so a reader never sees a graph whose weights are not there yet."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        return
    for f in sorted(files, key=lambda f: f == "model.onnx"):
        os.replace(tmp / f, out / f)


def _stop_ids(pack) -> tuple[list[int], int | None]:
    """(eos ids, bos id) exactly as llmpack's own generation stops."""
    from .model import Model

    class _NoBackend:  # Model only needs the context length to be built
        context_length = pack.header["model"]["context_length"]

    m = Model(pack, _NoBackend())
    vocab = pack.tensors["embed.weight"]["shape"][0]
    eos = sorted(i for i in m.stop_ids if isinstance(i, int) and 0 <= i < vocab)  # genai rejects ids >= vocab
    bos = m.tokenizer.bos_id
    return eos, bos if bos is not None and 0 <= bos < vocab else None


def genai_config(pack, graph) -> dict:
    m = pack.header["model"]
    gen = pack.header.get("generation", {})
    cfg = pack.header.get("config", {})
    eos, bos = _stop_ids(pack)
    first = graph.layers[0]
    uniform = all((ly.n_heads, ly.n_kv) == (first.n_heads, first.n_kv) for ly in graph.layers)
    hidden = pack.tensors["embed.weight"]["shape"][1]
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx",
        "head_size": m["head_dim"],
        "hidden_size": hidden,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": first.n_heads,
        "num_hidden_layers": len(graph.layers),
        "num_key_value_heads": first.n_kv,
    }
    if not uniform:
        # genai sizes every layer's cache alike; per-layer head counts run with bare onnxruntime only.
        decoder["llmpack_note"] = "layers differ in head counts; onnxruntime-genai assumes uniform layers"
    pad = cfg.get("pad_token_id")
    return {
        "model": {
            "bos_token_id": bos if bos is not None else cfg.get("bos_token_id"),
            "context_length": m["context_length"],
            "decoder": decoder,
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad if isinstance(pad, int) else (eos[0] if eos else 0),
            "type": m["family"] if m["family"] in GENAI_TYPES else "decoder",
            "vocab_size": graph.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(gen.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": m["context_length"],
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": float(gen.get("repetition_penalty") or 1.0),
            "temperature": float(gen.get("temperature") or 1.0),
            "top_k": int(gen.get("top_k") or 50),
            "top_p": float(gen.get("top_p") or 1.0),
        },
    }


def write_tokenizer(pack, out: Path) -> list[str]:
    """tokenizer.json (or tokenizer.model), tokenizer_config.json and chat_template.jinja."""
    tok = pack.header["tokenizer"]
    blob = pack.blob(tok["blob"])
    files = []
    if tok["kind"] == "hf_json":
        (out / "tokenizer.json").write_bytes(blob)
        files.append("tokenizer.json")
        tclass = "PreTrainedTokenizerFast"
    else:
        (out / "tokenizer.model").write_bytes(blob)
        files.append("tokenizer.model")
        tclass = "LlamaTokenizer"
    tcfg = {"tokenizer_class": tclass, "model_max_length": pack.header["model"]["context_length"],
            "add_bos_token": bool(tok.get("add_bos")), "add_eos_token": bool(tok.get("add_eos"))}
    tcfg.update({k: v for k, v in (tok.get("special") or {}).items() if isinstance(v, str)})
    if tok.get("chat_template"):
        tcfg["chat_template"] = tok["chat_template"]
        (out / "chat_template.jinja").write_text(tok["chat_template"], encoding="utf-8")
        files.append("chat_template.jinja")
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    files.append("tokenizer_config.json")
    return files


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="llmpack export-onnx", description=__doc__.split("—")[1].split("\n")[0].strip(),
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help=".llmpack file")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=None,
                   help="MatMulNBits accuracy_level of quantized linears (4 = int8 activations, the default; "
                        "0 = exact float activations)")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    args = p.parse_args(argv)
    res = export_onnx(args.file, args.output, args.accuracy_level, verify=not args.no_verify)
    print(f"wrote {args.output}: {', '.join(res['files'])} ({res['bytes'] / 1e6:.1f} MB)")
    return 0
