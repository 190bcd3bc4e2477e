"""Collects the tokenizer, its special tokens and the chat template from a checkpoint folder."""
from __future__ import annotations

from llmpack.formats.errors import LlmpackError

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(v):
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


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
    special = {}
    for key in SPECIAL_KEYS:
        text = _token_text(tcfg.get(key)) or _token_text(smap.get(key))
        if text:
            special[key] = text
    template = tcfg.get("chat_template")
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text()
    if isinstance(template, list):  # several named templates: keep the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    section = {
        "kind": kind,
        "blob": blob_name,
        "special": special,
        # sentencepiece has no post-processor, so the runtime adds BOS/EOS itself as configured.
        "add_bos": bool(tcfg.get("add_bos_token", kind == "sentencepiece")),
        "add_eos": bool(tcfg.get("add_eos_token", False)),
        "chat_template": template,
    }
    return section, blob_name, path.read_bytes()
