"""Collects the tokenizer, its special tokens and the chat template from a checkpoint folder.

The runtime must tokenize exactly as `AutoTokenizer.from_pretrained(folder)` does, so transformers
(a converter dependency) is the source of truth here:

* tokenizer.json present (kind "hf_json"): the blob is transformers' *own backend* serialized
  (`tok.backend_tokenizer.to_str()`). transformers 5 rebuilds the pipeline of many classes (Llama,
  Qwen2, Gemma, ...) from the vocab/merges and applies `add_bos_token`/`add_eos_token` from
  tokenizer_config.json, so the raw tokenizer.json can tokenize differently (e.g. a Llama-2
  tokenizer.json prefixes "▁" after every special token; transformers 5 does not).
* only tokenizer.model (kind "sentencepiece"): the blob is the original .model and the runtime
  encodes with the `sentencepiece` library. What transformers layers on top of it is recorded as
  data: its added tokens (split out before encoding), where it puts the "▁" dummy prefix
  (`prepend`: "first" | "always" | "never", or "spm" = sentencepiece's own normalizer and prefix
  for every chunk between added tokens) and its decoder pipeline (a tokenizers decoder as JSON).

If transformers cannot load the tokenizer, the files are used as they are (plain configs).
"""
from __future__ import annotations

import json
import sys

from llmpack.formats.errors import LlmpackError

# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES): all are chat template variables.
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(v):
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _load_hf(folder):
    """transformers' tokenizer for the folder, or None (with a note on stderr) if it cannot load."""
    try:
        import transformers
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        finally:
            hf_logging.set_verbosity(level)
    except Exception as e:  # noqa: BLE001 - any failure means "use the plain files"
        print(f"llmpack convert: note: transformers could not load the tokenizer ({e.__class__.__name__}: "
              f"{str(e)[:200]}); packing the tokenizer files as they are", file=sys.stderr)
        return None
    if getattr(tok, "backend_tokenizer", None) is None:  # not a `tokenizers`-backed class
        print(f"llmpack convert: note: {type(tok).__name__} is not backed by `tokenizers`; packing the "
              f"tokenizer files as they are", file=sys.stderr)
        return None
    return tok


def _chat_template(d, tcfg, hf):
    template = getattr(hf, "chat_template", None) if hf is not None else None
    if template is None:
        template = tcfg.get("chat_template")
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        elif (d / "chat_template.json").is_file():
            template = json.loads((d / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # several named templates: keep the default one (as transformers does)
        template = {t.get("name"): t.get("template") for t in template}
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template


def _clean_up_spaces(hf) -> bool:
    """Whether transformers' decode runs clean_up_tokenization (it skips it for BPE models)."""
    if hf is None or not getattr(hf, "clean_up_tokenization_spaces", False):
        return False
    is_bpe = type(hf.backend_tokenizer.model).__name__ == "BPE"
    return not is_bpe or bool(getattr(hf, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                                      False))


def _flatten(component):
    if component is None:
        return []
    if component.get("type") == "Sequence":
        items = component.get("normalizers") or component.get("pretokenizers") or component.get("decoders") or []
        return [x for c in items for x in _flatten(c)]
    return [component]


def _sentencepiece_style(hf) -> dict:
    """Describe transformers' pipeline around the sentencepiece model as data the runtime replays."""
    backend = json.loads(hf.backend_tokenizer.to_str())
    norms = _flatten(backend.get("normalizer"))
    pres = _flatten(backend.get("pre_tokenizer"))
    space_only = all(n.get("type") == "Replace" and n.get("pattern", {}).get("String") == " "
                     and n.get("content") == "▁" for n in norms)
    metaspace = [p for p in pres if p.get("type") == "Metaspace"]
    if not space_only:
        prepend = "spm"  # transformers follows the model's own normalizer spec
    elif metaspace:
        prepend = metaspace[0].get("prepend_scheme", "always")
    else:
        prepend = "never"
    added = sorted([int(i), str(t.content), bool(t.special)] for i, t in hf.added_tokens_decoder.items())
    return {"prepend": prepend, "decoder": backend.get("decoder"), "added_tokens": added}


def collect(ckpt) -> tuple[dict, str, bytes]:
    """Return (header section, blob name, blob bytes)."""
    d = ckpt.dir
    tcfg = ckpt.json_file("tokenizer_config.json")
    smap = ckpt.json_file("special_tokens_map.json")
    if (d / "tokenizer.json").is_file():
        kind, blob_name, path = "hf_json", "tokenizer/tokenizer.json", d / "tokenizer.json"
    elif (d / "tokenizer.model").is_file():
        kind, blob_name, path = "sentencepiece", "tokenizer/tokenizer.model", d / "tokenizer.model"
    else:
        raise LlmpackError(f"{d}: no tokenizer.json or tokenizer.model; save the tokenizer into the folder "
                           f"(tokenizer.save_pretrained(folder))")
    hf = _load_hf(d)
    if hf is not None:
        special = {k: v for k, v in hf.special_tokens_map.items() if k in SPECIAL_KEYS and v}
        add_bos, add_eos = bool(hf.add_bos_token), bool(hf.add_eos_token)
    else:
        special = {}
        for key in SPECIAL_KEYS:
            text = _token_text(tcfg.get(key)) or _token_text(smap.get(key))
            if text:
                special[key] = text
        # transformers 5 adds BOS/EOS only when tokenizer_config.json asks for it.
        add_bos, add_eos = bool(tcfg.get("add_bos_token", False)), bool(tcfg.get("add_eos_token", False))
    section = {
        "kind": kind,
        "blob": blob_name,
        "special": special,
        "add_bos": add_bos,
        "add_eos": add_eos,
        "clean_up_spaces": _clean_up_spaces(hf),
        "split_special_tokens": bool(getattr(hf, "split_special_tokens", False)),
        "chat_template": _chat_template(d, tcfg, hf),
    }
    if kind == "hf_json":
        blob = hf.backend_tokenizer.to_str().encode("utf-8") if hf is not None else path.read_bytes()
    else:
        blob = path.read_bytes()
        if hf is not None:
            section.update(_sentencepiece_style(hf))
    return section, blob_name, blob
