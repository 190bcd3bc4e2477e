"""The one schema of the JSON header's sections, checked by the reader before any backend sees them.

Covered here: the top-level keys, `min_reader`, `tokenizer`, `generation`, `provenance`,
`quality`, `recipe` and `config`. The tensor directory is checked by reader._check_directory (it needs
the file's layout), the `model` section and the tensor names it expects by the model
description (the reader's `_check_model` hook). Every violation is one FormatError naming the
field, e.g. "header field tokenizer.special.eos_token is a JSON number, expected a string or
null". The runtime can then index these sections without guarding every access: before this
schema ~195 malformed headers surfaced as AttributeError / KeyError / TypeError.

Sections copied from the source checkpoint (`config`, most of `generation`) keep their HF fields
as they are: only the fields llmpack acts on are typed; the rest must merely be JSON.
"""
from __future__ import annotations

import math

from .errors import FormatError

REQUIRED = ("format_version", "min_reader", "model", "tokenizer", "tensors")
OPTIONAL = ("config", "generation", "provenance", "quality", "recipe")

TOKENIZER_KINDS = ("hf_json", "sentencepiece")
SENTENCEPIECE_PREPEND = ("first", "always", "never", "spm")
TOKENIZER_BOOLS = ("add_bos", "add_eos", "clean_up_spaces", "split_special_tokens")
TOKENIZER_KEYS = ("kind", "blob", "special", "chat_template", "prepend", "decoder", "added_tokens") + TOKENIZER_BOOLS
MAX_TOKEN_ID = (1 << 31) - 1  # token ids are int32 in both backends
MAX_TOP_K = (1 << 31) - 1


def check_header(header: dict, path) -> None:
    """Raise FormatError naming the first field of `header` that breaks the schema."""
    missing = [k for k in REQUIRED if k not in header]
    if missing:
        raise FormatError(f"{path}: header lacks required field '{missing[0]}'; the file is corrupt")
    unknown = sorted(k for k in header if k not in REQUIRED + OPTIONAL)
    if unknown:
        raise FormatError(f"{path}: header has unknown field '{unknown[0]}'; the file is corrupt or was "
                          f"written by another program")
    f = _Fields(path)
    f.typed("min_reader", header["min_reader"], str)
    f.typed("model", header["model"], dict)
    f.typed("tensors", header["tensors"], list)
    f.typed("config", header.get("config", {}), dict)
    check_tokenizer_section(header["tokenizer"], path)
    check_generation_section(header.get("generation", {}), path)
    _check_provenance(f, header.get("provenance", {}))
    for key in ("quality", "recipe"):  # measured reports; the converter's steps, in order
        items = header.get(key, [])
        f.typed(key, items, list)
        for i, q in enumerate(items):
            f.typed(f"{key}[{i}]", q, dict)


def check_tokenizer_section(tok, path):
    """The `tokenizer` section (also run by the converter before it writes anything)."""
    f = _Fields(path)
    f.typed("tokenizer", tok, dict)
    if not tok:  # a format-only file (tests, tools): no tokenizer; the runtime refuses to load it
        return
    unknown = sorted(k for k in tok if k not in TOKENIZER_KEYS)
    if unknown:
        f.fail(f"tokenizer.{unknown[0]}", "is not a field of the tokenizer section")
    for key in ("kind", "blob"):
        if key not in tok:
            f.fail(f"tokenizer.{key}", "is missing")
    f.one_of("tokenizer.kind", tok["kind"], TOKENIZER_KINDS)
    f.typed("tokenizer.blob", tok["blob"], str)
    special = tok.get("special", {})
    f.typed("tokenizer.special", special, dict)
    for name, text in special.items():
        f.typed(f"tokenizer.special.{name}", text, (str, type(None)))
    for key in TOKENIZER_BOOLS:
        if key in tok:
            f.typed(f"tokenizer.{key}", tok[key], bool)
    f.typed("tokenizer.chat_template", tok.get("chat_template"), (str, type(None)))
    if "prepend" in tok:
        f.one_of("tokenizer.prepend", tok["prepend"], SENTENCEPIECE_PREPEND)
    f.typed("tokenizer.decoder", tok.get("decoder"), (dict, type(None)))
    added = tok.get("added_tokens")
    f.typed("tokenizer.added_tokens", added, (list, type(None)))
    for i, entry in enumerate(added or []):
        name = f"tokenizer.added_tokens[{i}]"
        if not (isinstance(entry, list) and len(entry) == 3):
            f.fail(name, "is not a [token id, text, special] triple")
        f.integer(name + "[0]", entry[0], 0, MAX_TOKEN_ID)
        f.typed(name + "[1]", entry[1], str)
        f.typed(name + "[2]", entry[2], bool)


def check_generation_section(gen, path):
    """generation_config.json as converted: the fields the runtime uses are typed and ranged (the
    others, e.g. pad_token_id, which some checkpoints set to -1, are the source's business)."""
    f = _Fields(path)
    f.typed("generation", gen, dict)
    eos = gen.get("eos_token_id")  # a negative id (seen in old configs) never matches: harmless
    if isinstance(eos, list):
        for i, x in enumerate(eos):
            f.integer(f"generation.eos_token_id[{i}]", x, -MAX_TOKEN_ID - 1, MAX_TOKEN_ID)
    elif eos is not None:
        f.integer("generation.eos_token_id", eos, -MAX_TOKEN_ID - 1, MAX_TOKEN_ID)
    if "do_sample" in gen:
        f.typed("generation.do_sample", gen["do_sample"], bool)
    if gen.get("temperature") is not None:
        f.number("generation.temperature", gen["temperature"], 0.0, 1e6)
    if gen.get("top_p") is not None:
        f.number("generation.top_p", gen["top_p"], 0.0, 1.0)
    if gen.get("top_k") is not None:
        f.integer("generation.top_k", gen["top_k"], 0, MAX_TOP_K)
    if gen.get("repetition_penalty") is not None:
        f.number("generation.repetition_penalty", gen["repetition_penalty"], 0.0, 1e6)
    for key in ("max_length", "max_new_tokens"):
        if gen.get(key) is not None:
            f.integer(f"generation.{key}", gen[key], 0, 1 << 40)


def _check_provenance(f: "_Fields", prov):
    f.typed("provenance", prov, dict)
    if "converter" in prov:
        f.typed("provenance.converter", prov["converter"], str)
    source = prov.get("source", {})
    f.typed("provenance.source", source, dict)
    for name, digest in source.items():
        f.typed(f"provenance.source.{name}", digest, str)
    dtypes = prov.get("source_dtypes", [])
    f.typed("provenance.source_dtypes", dtypes, list)
    for i, d in enumerate(dtypes):
        f.typed(f"provenance.source_dtypes[{i}]", d, str)
    f.typed("provenance.options", prov.get("options", {}), dict)
    if "seconds" in prov:
        f.number("provenance.seconds", prov["seconds"], 0.0, 1e9)
    if "allocation" in prov:
        f.typed("provenance.allocation", prov["allocation"], dict)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null",
          int: "an integer", float: "a number"}


def _json_type(x) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null", int: "number",
            float: "number"}.get(type(x), type(x).__name__)


class _Fields:
    """Typed checks that name the field and the file in their FormatError."""

    def __init__(self, path):
        self.path = path

    def fail(self, field: str, problem: str):
        raise FormatError(f"{self.path}: header field {field} {problem}; the file is corrupt")

    def typed(self, field, value, kinds):
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            want = " or ".join(_NAMES[k] for k in kinds)
            self.fail(field, f"is a JSON {_json_type(value)}, expected {want}")

    def one_of(self, field, value, choices):
        if not (isinstance(value, str) and value in choices):
            self.fail(field, f"is {_short(value)}, expected one of {', '.join(choices)}")

    def integer(self, field, value, lo, hi):
        if not is_int(value):
            self.fail(field, f"is a JSON {_json_type(value)}, expected an integer")
        if not lo <= value <= hi:
            self.fail(field, f"is {_short(value)}, outside [{lo}, {hi}]")

    def number(self, field, value, lo, hi):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(field, f"is a JSON {_json_type(value)}, expected a number")
        if not ((isinstance(value, int) or math.isfinite(value)) and lo <= value <= hi):
            self.fail(field, f"is {_short(value)}, expected a finite number in [{lo:g}, {hi:g}]")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
