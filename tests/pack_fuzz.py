"""A seeded mutator over tiny packs and the judge of each mutated file (tests/test_fuzz.py runs a
fixed count in the suite; tools/fuzz.py runs a long campaign and prints the counts).

Mutations:
- flip:     1-3 random bits anywhere in the file (prefix, tensor data, padding, header)
- truncate: cut the file at a random length
- json:     one edit of one random node of the JSON header (type change, deletion, huge /
            negative number, nested junk, renamed key, tweaked number or string), with the header
            length and CRC32 recomputed, so what is tested is the schema, not the checksum

Judgement (outcomes; the first four are allowed):
- "refused":  FormatError at load (a clean one-line error)
- "same":     loads and computes exactly the original logits (flip/truncate must end here or refused)
- "changed":  a json edit loaded and ran with other logits (a valid-but-different value)
- "template": a json edit loaded but the chat template refused to render (a one-line LlmpackError)
- "wrong":    a flip/truncate loaded and computed other logits (the checksums missed it)
- "crash":    any other exception
- "hang":     a case ran past its time bound
- "memory":   the process's peak RSS grew past the bound
"""
from __future__ import annotations

import copy
import json
import random
import resource
import signal
import struct
import zlib
from pathlib import Path

import numpy as np

from llmpack.formats.errors import FormatError, LlmpackError

IDS = [1, 5, 9, 17, 33, 65]
MESSAGES = [{"role": "user", "content": "hello world"}]
JUNK = [None, True, False, 0, -1, 1, 7, 2 ** 31, 2 ** 64, -2 ** 63, 10 ** 400, 1.5, -0.0, 1e308, float("nan"),
        float("inf"), "", "x", "f32", "layers.0.attn.q.weight", [], [0], [[[]]], [1, [2, [3]]], {}, {"a": {"b": [1]}},
        {"kind": "hf_json"}]
ALLOWED = {"flip": ("refused", "same"), "truncate": ("refused", "same"),
           "json": ("refused", "same", "changed", "template")}


class Hang(BaseException):
    """Raised by the per-case alarm (a BaseException: code under test may catch Exception)."""


def _alarm(signum, frame):
    raise Hang()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def header_span(raw: bytes) -> tuple[int, int]:
    _, _, hoff, hlen = struct.unpack_from("<IIQQ", raw, 8)
    return hoff, hlen


def with_header_blob(raw: bytes, blob: bytes) -> bytes:
    hoff, _ = header_span(raw)
    out = bytearray(raw[:hoff] + blob)
    struct.pack_into("<QI", out, 24, len(blob), zlib.crc32(blob))
    return bytes(out)


def _paths(node, path=()):
    """Every node of a JSON tree as a path of keys / indices (the root excluded)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,)
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield path + (i,)
            yield from _paths(v, path + (i,))


def model_owned(path) -> bool:
    """Nodes whose edits the model description (formats/blocks.py) must catch: the `model` section,
    tensor names, and whole tensor entries (deleting one drops a tensor). The reader's schema and
    directory checks own the rest."""
    return path[0] == "model" or (path[0] == "tensors" and (len(path) == 2 or (len(path) == 3
                                                                               and path[2] == "name")))


def _get(node, path):
    for key in path:
        node = node[key]
    return node


def edit_json(header: dict, rng: random.Random, paths: list) -> tuple[dict, str]:
    """One random edit of one random node; returns (new header, description)."""
    h = copy.deepcopy(header)
    path = rng.choice(paths)
    parent, key = _get(h, path[:-1]), path[-1]
    value = parent[key]
    op = rng.choice(["junk", "junk", "delete", "huge", "negative", "nested", "rename", "tweak"])
    if op == "delete":
        del parent[key]
    elif op == "rename" and isinstance(parent, dict):
        new = list(key) if key else ["x"]
        i = rng.randrange(len(new))
        new[i] = chr((ord(new[i]) + rng.randrange(1, 26)) % 0x7F or 0x41)
        parent["".join(new)] = parent.pop(key)
    elif op == "huge":
        parent[key] = rng.choice([2 ** 40, 2 ** 63, 2 ** 64 + 1, 10 ** 30]) * (value if isinstance(value, int)
                                                                               and value else 1)
    elif op == "negative":
        parent[key] = -value if isinstance(value, (int, float)) and not isinstance(value, bool) and value else -1
    elif op == "nested":
        parent[key] = rng.choice([[value], {"x": value}, [[value, value]]])
    elif op == "tweak" and isinstance(value, str) and value:
        chars = list(value)
        i = rng.randrange(len(chars))
        chars[i] = chr((ord(chars[i]) + 1) % 0x10FFFF) if chars[i] != "\ud7ff" else "a"
        parent[key] = "".join(chars)
    elif op == "tweak" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = value + rng.choice([1, -1]) if isinstance(value, int) else value * 1.5
    else:
        op = "junk"
        parent[key] = rng.choice(JUNK)
    return h, f"json {op} {'.'.join(map(str, path))}"


class Fuzzer:
    """Mutates packs and judges each case. `backends` maps backend name -> every how many cases it
    runs (numpy: every case; onnxruntime: a subset, it builds a graph per load)."""

    def __init__(self, packs: dict[str, Path], workdir: Path, seed: int = 0, seconds_per_case: float = 20.0,
                 memory_mb: float = 1024.0, ort_every: int = 0, scope: str | None = None,
                 kinds=("flip", "flip", "truncate", "json", "json", "json")):
        """scope of the json edits: None (every node), "format" (all but the model description's
        part, see model_owned) or "model" (only that part)."""
        from llmpack.runtime.model import load

        self.load = load
        self.workdir = Path(workdir)
        self.rng = random.Random(seed)
        self.seconds = seconds_per_case
        self.ort_every = ort_every
        self.kinds = kinds
        self.packs = {}
        for name, path in packs.items():
            raw = Path(path).read_bytes()
            hoff, hlen = header_span(raw)
            header = json.loads(raw[hoff:hoff + hlen])
            ref = {"numpy": self._run(path, "numpy")}
            if ort_every:
                ref["onnxruntime"] = self._run(path, "onnxruntime")
            paths = [p for p in _paths(header) if scope is None or (scope == "model") == model_owned(p)]
            self.packs[name] = {"raw": raw, "header": header, "paths": paths, "ref": ref}
        self.memory_limit = _peak_rss_mb() + memory_mb
        self.count = 0

    def _run(self, path, backend):
        model = self.load(path, backend=backend, threads=1)
        try:
            logits = model.logits(IDS)
            list(model.generate_ids(IDS[:3], max_new_tokens=3, temperature=0))
            model.tokenizer.decode(model.tokenizer.encode("hello world"))
            try:
                model.chat_ids(MESSAGES)
            except FormatError:
                raise
            except LlmpackError:
                return logits, "template"
            return logits, None
        finally:
            model.pack.close()

    def mutate(self, name: str) -> tuple[str, bytes, str]:
        p, rng = self.packs[name], self.rng
        raw = p["raw"]
        kind = rng.choice(self.kinds)
        if kind == "flip":
            b = bytearray(raw)
            where = []
            for _ in range(rng.randint(1, 3)):
                # half of the flips land in the prefix or the header, where the structure is
                pos = rng.randrange(len(b)) if rng.random() < 0.5 else rng.choice(
                    [rng.randrange(64), header_span(raw)[0] + rng.randrange(header_span(raw)[1])])
                b[pos] ^= 1 << rng.randrange(8)
                where.append(pos)
            return kind, bytes(b), f"flip bytes {where}"
        if kind == "truncate":
            n = rng.randrange(len(raw))
            return kind, raw[:n], f"truncate to {n}"
        header, what = edit_json(p["header"], rng, p["paths"])
        try:
            blob = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
        except ValueError:  # 10**400 as a float etc.: not JSON we can write; a junk edit instead
            blob = json.dumps(dict(header, generation=[])).encode()
        return kind, with_header_blob(raw, blob), what

    def case(self, name: str, backend: str | None = None) -> tuple[str, str, str]:
        """Run one mutated case; returns (kind, outcome, description)."""
        self.count += 1
        backend = backend or ("onnxruntime" if self.ort_every and self.count % self.ort_every == 0 else "numpy")
        kind, data, what = self.mutate(name)
        path = self.workdir / f"fuzz-{name}.llmpack"
        path.write_bytes(data)
        what = f"{name}/{backend}: {what}"
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        try:
            logits, template = self._run(path, backend)
            ref = self.packs[name]["ref"][backend][0]
            same = logits.shape == ref.shape and np.array_equal(logits, ref, equal_nan=True)
            if template and kind == "json":
                outcome = "template"
            elif same:
                outcome = "same"
            else:
                outcome = "changed" if kind == "json" else "wrong"
        except FormatError:
            outcome = "refused"
        except Hang:
            outcome = "hang"
        except Exception as e:  # noqa: BLE001 - the point of the fuzzer
            outcome = "crash"
            what += f" -> {e.__class__.__name__}: {' '.join(str(e).split())[:200]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        if outcome not in ("hang", "crash") and _peak_rss_mb() > self.memory_limit:
            outcome = "memory"
        return kind, outcome, what


def allowed(kind: str, outcome: str) -> bool:
    return outcome in ALLOWED[kind]
