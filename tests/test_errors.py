"""Bad input through the real CLI (a subprocess): exit code != 0, one line on stderr naming the
problem, never a traceback, never an output file. Plus in-process checks that any malformed
header raises FormatError (not TypeError/KeyError/...)."""
import json
import shutil
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from llmpack.formats import FORMAT_VERSION, FormatError, Pack
from tiny_models import make_tiny


# -- helpers -----------------------------------------------------------------------------------
def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "llmpack", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*"))


def assert_clean_failure(result, *words):
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Traceback" not in out, out
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"want one line on stderr, got:\n{result.stderr}"
    line = lines[0].lower()
    for word in words:
        assert word.lower() in line, f"{word!r} not in {lines[0]!r}"
    return lines[0]


def prefix(raw):
    return struct.unpack_from("<IIQQ", raw, 8)  # version, flags, header offset, header length


def header_of(raw):
    _, _, hoff, hlen = prefix(raw)
    return json.loads(raw[hoff:hoff + hlen])


def with_blob(raw, blob: bytes):
    """Same data region, new header bytes, and the prefix's header length and CRC32 fixed up (so
    what is tested is the header's content, not its checksum)."""
    _, _, hoff, _ = prefix(raw)
    out = bytearray(raw[:hoff] + blob)
    struct.pack_into("<QI", out, 24, len(blob), zlib.crc32(blob))
    return bytes(out)


def with_header(raw, header):
    return with_blob(raw, json.dumps(header).encode())


def mutate_header(raw, fn):
    h = header_of(raw)
    fn(h)
    return with_header(raw, h)


def tensor(h, name):
    return next(t for t in h["tensors"] if t["name"] == name)


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny llama checkpoint and its f32 pack, built once."""
    from llmpack.converter import convert

    root = tmp_path_factory.mktemp("errors")
    make_tiny("llama", root / "ckpt", num_hidden_layers=2)
    convert(root / "ckpt", root / "good.llmpack", dtype="f32", quiet=True)
    return root


def good_raw(work):
    return (work / "good.llmpack").read_bytes()


# -- the CLI cases ---------------------------------------------------------------------------------
# Each case prepares its inputs in an empty folder, then runs one command there. All cases run
# concurrently in one module fixture (a convert subprocess spends seconds importing transformers).
class Case:
    def __init__(self, args, words, setup=None, ok=False):
        self.args, self.words, self.setup, self.ok = args, words, setup, ok


def copy_ckpt(work, d):
    shutil.copytree(work / "ckpt", d / "ckpt")
    return d / "ckpt"


def setup_no_config(work, d):
    (d / "ckpt").mkdir()


def setup_unknown_model_type(work, d):
    ckpt = copy_ckpt(work, d)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(config, model_type="mamba_xyz")))


def setup_unmapped_tensor(work, d):
    from safetensors.numpy import load_file, save_file

    ckpt = copy_ckpt(work, d)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.mlp.router.weight"] = np.zeros((4, 64), np.float32)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def setup_missing_tokenizer(work, d):
    (copy_ckpt(work, d) / "tokenizer.json").unlink()


def setup_only_bin(work, d):
    (d / "ckpt").mkdir()
    shutil.copy(work / "ckpt" / "config.json", d / "ckpt")
    (d / "ckpt" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a pickle")


def setup_config_list(work, d):
    (copy_ckpt(work, d) / "config.json").write_text("[1, 2]")


def setup_config_binary(work, d):
    (copy_ckpt(work, d) / "config.json").write_bytes(b"\xff\xfe\x00garbage")


def setup_bad_index(work, d):
    ckpt = copy_ckpt(work, d)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))


def pack_setup(damage):
    """Setup writing bad.llmpack = damage(raw bytes of the good pack)."""
    def setup(work, d):
        (d / "bad.llmpack").write_bytes(damage(good_raw(work)))
    return setup


def flip_in_tensor(raw):
    raw = bytearray(raw)
    off, n, _ = tensor(header_of(raw), "layers.1.mlp.down.weight")["parts"]["data"]
    raw[off + n // 2] ^= 0x40
    return bytes(raw)


def future_version(raw):
    raw = bytearray(raw)
    struct.pack_into("<I", raw, 8, FORMAT_VERSION + 1)
    return bytes(raw)


def offset_past_end(raw):
    _, _, hoff, _ = prefix(raw)
    return mutate_header(raw, lambda h: tensor(h, "final_norm.weight")["parts"]["data"].__setitem__(0, hoff + 64000))


def overlapping(raw):
    def fn(h):
        q = tensor(h, "layers.0.attn.q.weight")["parts"]["data"]
        tensor(h, "layers.0.attn.k.weight")["parts"]["data"][0] = q[0] + 64
    return mutate_header(raw, fn)


CONVERT = ["convert", "ckpt", "-o", "out.llmpack"]
BAD = "bad.llmpack"
GEN = ["-p", "hi", "-n", "2"]
CASES = {
    # convert: bad checkpoint folders
    "convert-missing-folder": Case(["convert", "no_such_dir", "-o", "out.llmpack"], ("no_such_dir", "no such folder")),
    "convert-no-config": Case(CONVERT, ("ckpt", "config.json"), setup_no_config),
    "convert-unknown-model-type": Case(CONVERT, ("model_type", "mamba_xyz"), setup_unknown_model_type),
    "convert-unmapped-tensor": Case(CONVERT, ("model.layers.0.mlp.router.weight", "not mapped"),
                                    setup_unmapped_tensor),
    "convert-missing-tokenizer": Case(CONVERT, ("tokenizer",), setup_missing_tokenizer),
    "convert-only-pytorch-bin": Case(CONVERT, ("pytorch_model.bin", "safetensors"), setup_only_bin),
    "convert-config-not-an-object": Case(CONVERT, ("config.json", "not a json object"), setup_config_list),
    "convert-config-not-utf8": Case(CONVERT, ("config.json", "invalid json"), setup_config_binary),
    "convert-bad-shard-index": Case(CONVERT, ("model.safetensors.index.json", "weight_map"), setup_bad_index),
    # damaged packs
    "truncated-inspect": Case(["inspect", BAD], ("truncated",), pack_setup(lambda r: r[:-100])),
    "truncated-generate": Case(["generate", BAD, *GEN], ("truncated",), pack_setup(lambda r: r[:-100])),
    "truncated-half": Case(["inspect", BAD], ("truncated",), pack_setup(lambda r: r[: len(r) // 2])),
    "truncated-in-prefix": Case(["inspect", BAD], ("truncated",), pack_setup(lambda r: r[:40])),
    "empty-file": Case(["generate", BAD, *GEN], ("truncated",), pack_setup(lambda r: b"")),
    # verification is on by default at load, and on request in inspect
    "flipped-byte-generate": Case(["generate", BAD, *GEN], ("layers.1.mlp.down.weight", "checksum"),
                                  pack_setup(flip_in_tensor)),
    "flipped-byte-inspect-verify": Case(["inspect", BAD, "--verify"], ("layers.1.mlp.down.weight", "checksum"),
                                        pack_setup(flip_in_tensor)),
    "flipped-byte-inspect": Case(["inspect", BAD], (), pack_setup(flip_in_tensor), ok=True),  # header only
    "wrong-magic-inspect": Case(["inspect", BAD], ("not an llmpack file",),
                                pack_setup(lambda r: b"GGUF\x03\x00\x00\x00" + r[8:])),
    "wrong-magic-generate": Case(["generate", BAD, *GEN], ("not an llmpack file",),
                                 pack_setup(lambda r: b"GGUF\x03\x00\x00\x00" + r[8:])),
    "future-version-inspect": Case(["inspect", BAD], (f"version {FORMAT_VERSION + 1}", "newer", "upgrade"),
                                 pack_setup(future_version)),
    "future-version-generate": Case(["generate", BAD, *GEN], (f"version {FORMAT_VERSION + 1}", "upgrade"),
                                   pack_setup(future_version)),
    "offset-past-end-inspect": Case(["inspect", BAD], ("final_norm.weight", "outside"), pack_setup(offset_past_end)),
    "offset-past-end-generate": Case(["generate", BAD, *GEN], ("final_norm.weight", "outside"),
                                     pack_setup(offset_past_end)),
    "overlap-inspect": Case(["inspect", BAD], ("overlap",), pack_setup(overlapping)),
    "overlap-generate-no-verify": Case(["generate", BAD, *GEN, "--no-verify"], ("overlap",), pack_setup(overlapping)),
    "unknown-storage-type-inspect": Case(["inspect", BAD], ("embed.weight", "unknown storage type", "q9"),
                                         pack_setup(lambda r: mutate_header(
                                             r, lambda h: tensor(h, "embed.weight").update(type="q9")))),
    "unknown-storage-type-generate": Case(["generate", BAD, *GEN], ("unknown storage type",),
                                          pack_setup(lambda r: mutate_header(
                                              r, lambda h: tensor(h, "embed.weight").update(type="q9")))),
    "parts-not-a-dict": Case(["inspect", BAD], ("embed.weight", "corrupt"), pack_setup(lambda r: mutate_header(
        r, lambda h: tensor(h, "embed.weight").update(parts=[1, 2])))),
    "offset-a-string": Case(["generate", BAD, *GEN], ("embed.weight", "corrupt"), pack_setup(lambda r: mutate_header(
        r, lambda h: tensor(h, "embed.weight")["parts"]["data"].__setitem__(0, "64")))),
    "tensors-not-a-list": Case(["generate", BAD, *GEN], ("tensors", "corrupt"), pack_setup(lambda r: mutate_header(
        r, lambda h: h.update(tensors={"a": 1})))),
    "folder-instead-of-pack": Case(["inspect", "dir.llmpack"], ("dir.llmpack",),
                                   lambda work, d: (d / "dir.llmpack").mkdir()),
    # generate: bad arguments
    "generate-nonexistent-file": Case(["generate", "missing.llmpack", "-p", "hello"], ("missing.llmpack", "no such file")),
    "generate-negative-temperature": Case(["generate", "{work}/good.llmpack", "-p", "hello", "--temperature", "-1"],
                                          ("temperature",)),
    # controls: the undamaged pack works
    "good-generate": Case(["generate", "{work}/good.llmpack", "-p", "hello", "-n", "4"], (), ok=True),
    "good-inspect-verify": Case(["inspect", "{work}/good.llmpack", "--verify"], (), ok=True),
}


@pytest.fixture(scope="module")
def cli_results(work, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    jobs = {}
    for name, c in CASES.items():
        d = root / name
        d.mkdir()
        if c.setup:
            c.setup(work, d)
        jobs[name] = (d, [a.replace("{work}", str(work)) for a in c.args], listing(d))
    # convert cases first: they are the slow ones
    order = sorted(jobs, key=lambda n: not n.startswith("convert-"))
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {n: pool.submit(run_cli, *jobs[n][1], cwd=jobs[n][0]) for n in order}
        return {n: (futures[n].result(), jobs[n][2], listing(jobs[n][0])) for n in CASES}


@pytest.mark.parametrize("name", CASES)
def test_cli(cli_results, name):
    result, before, after = cli_results[name]
    c = CASES[name]
    if c.ok:
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stdout + result.stderr
        if c.args[0] == "generate":
            assert result.stdout.startswith("hello")
        elif "--verify" in c.args:
            assert "checksums OK" in result.stdout
        return
    assert_clean_failure(result, *c.words)
    assert after == before, "a failed command left files behind"


def test_convert_output_folder_missing(work, tmp_path):
    """In process (the CLI prints every LlmpackError the same way): nothing is written."""
    from llmpack.converter import convert
    from llmpack.formats import LlmpackError

    with pytest.raises(LlmpackError, match="nowhere.*does not exist"):
        convert(work / "ckpt", tmp_path / "nowhere" / "out.llmpack", dtype="f32", quiet=True)
    assert listing(tmp_path) == []


# -- any malformed header is a FormatError (in process) -----------------------------------------------
def _set(key, value):
    return lambda h: h.__setitem__(key, value)


MALFORMED = {
    "header is a list": lambda raw: with_header(raw, [1, 2, 3]),
    "header is a number": lambda raw: with_header(raw, 7),
    "tensors is a dict": lambda raw: mutate_header(raw, _set("tensors", {"x": 1})),
    "tensors holds numbers": lambda raw: mutate_header(raw, _set("tensors", [1, 2])),
    "model is a string": lambda raw: mutate_header(raw, _set("model", "llama")),
    "tokenizer is a list": lambda raw: mutate_header(raw, _set("tokenizer", [])),
    "tokenizer blob missing": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].update(blob="nope")),
    "tokenizer blob not bytes": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].update(blob="embed.weight")),
    "tokenizer blob a number": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].update(blob=3)),
    "tokenizer kind a number": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].update(kind=1)),
    "format_version a string": lambda raw: mutate_header(raw, _set("format_version", "1")),
    "format_version true": lambda raw: mutate_header(raw, _set("format_version", True)),
    "no format_version": lambda raw: mutate_header(raw, lambda h: h.pop("format_version")),
    "no tensors": lambda raw: mutate_header(raw, lambda h: h.pop("tensors")),
    "parts a list": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").update(parts=[[64, 4, 0]])),
    "parts null": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").update(parts=None)),
    "no parts": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").pop("parts")),
    "part a dict": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight")["parts"].update(
        data={"offset": 64})),
    "part too short": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight")["parts"].update(
        data=[64, 4])),
    "offset a string": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight")["parts"]["data"].__setitem__(
        0, "64")),
    "offset a float": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight")["parts"]["data"].__setitem__(
        0, 64.0)),
    "offset negative": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight")["parts"]["data"].__setitem__(
        0, -64)),
    "nbytes huge": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight")["parts"]["data"].__setitem__(
        1, 10 ** 30)),
    "crc a string": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight")["parts"]["data"].__setitem__(
        2, "abc")),
    "extra part": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight")["parts"].update(
        scales=[64, 4, 0])),
    "shape a string": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").update(shape="300x64")),
    "shape of strings": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").update(shape=["300", 64])),
    "shape negative": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").update(shape=[-300, -64])),
    "shape huge": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").update(shape=[2 ** 62, 2 ** 62])),
    "type a list": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").update(type=["f32"])),
    "type missing": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").pop("type")),
    "name a number": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").update(name=5)),
    "duplicate name": lambda raw: mutate_header(raw, lambda h: tensor(h, "final_norm.weight").update(
        name="embed.weight")),
    "quantized without group": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").update(type="q8")),
    "group size a string": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").update(
        type="q8", group_size="32")),
    "header not utf-8": lambda raw: with_blob(raw, b"\xff\xfe"),
    "header deeply nested": lambda raw: with_blob(raw, b"[" * 100000 + b"]" * 100000),
    "header checksum wrong": lambda raw: raw[:32] + bytes([raw[32] ^ 1]) + raw[33:],
    "unknown top-level field": lambda raw: mutate_header(raw, _set("modle", {})),
    "no min_reader": lambda raw: mutate_header(raw, lambda h: h.pop("min_reader")),
    "min_reader a number": lambda raw: mutate_header(raw, _set("min_reader", 0.2)),
    "config a list": lambda raw: mutate_header(raw, _set("config", [])),
    "generation a string": lambda raw: mutate_header(raw, _set("generation", "greedy")),
    "generation a list": lambda raw: mutate_header(raw, _set("generation", [1])),
    "eos_token_id nested": lambda raw: mutate_header(raw, lambda h: h["generation"].update(eos_token_id=[[1, 2]])),
    "eos_token_id a string": lambda raw: mutate_header(raw, lambda h: h["generation"].update(eos_token_id="</s>")),
    "eos_token_id a float": lambda raw: mutate_header(raw, lambda h: h["generation"].update(eos_token_id=2.0)),
    "eos_token_id huge": lambda raw: mutate_header(raw, lambda h: h["generation"].update(eos_token_id=10 ** 30)),
    "temperature NaN": lambda raw: mutate_header(raw, lambda h: h["generation"].update(temperature=float("nan"))),
    "temperature a string": lambda raw: mutate_header(raw, lambda h: h["generation"].update(temperature="0.7")),
    "do_sample a number": lambda raw: mutate_header(raw, lambda h: h["generation"].update(do_sample=1)),
    "top_k huge": lambda raw: mutate_header(raw, lambda h: h["generation"].update(top_k=10 ** 400)),
    "provenance a string": lambda raw: mutate_header(raw, _set("provenance", "me")),
    "provenance source a list": lambda raw: mutate_header(raw, lambda h: h["provenance"].update(source=[])),
    "quality an object": lambda raw: mutate_header(raw, _set("quality", {})),
    "quality holds numbers": lambda raw: mutate_header(raw, _set("quality", [1])),
    "tokenizer kind missing": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].pop("kind")),
    "tokenizer blob key missing": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].pop("blob")),
    "tokenizer kind unknown": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].update(kind="bpe")),
    "tokenizer unknown field": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].update(blobb="x")),
    "special a list": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].update(special=["<s>"])),
    "special a string": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].update(special="<s>")),
    "special token a number": lambda raw: mutate_header(raw, lambda h: h["tokenizer"]["special"].update(
        eos_token=2)),
    "special token an object": lambda raw: mutate_header(raw, lambda h: h["tokenizer"]["special"].update(
        bos_token={"content": "<s>"})),
    "add_bos a string": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].update(add_bos="yes")),
    "chat_template a number": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].update(chat_template=5)),
    "chat_template a list": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].update(chat_template=["x"])),
    "added_tokens junk": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].update(added_tokens=[[1, 2]])),
    "decoder a string": lambda raw: mutate_header(raw, lambda h: h["tokenizer"].update(decoder="bytes")),
    "shape padded with 70 ones": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").update(
        shape=[1] * 70 + tensor(h, "embed.weight")["shape"])),
    "shape of a terabyte": lambda raw: mutate_header(raw, lambda h: tensor(h, "embed.weight").update(
        shape=[2 ** 20, 2 ** 18])),
    "header length huge": lambda raw: raw[:24] + struct.pack("<Q", 2 ** 63) + raw[32:],
    "header offset inside the prefix": lambda raw: raw[:16] + struct.pack("<Q", 8) + raw[24:],
}


# The field each schema error must name (formats/schema.py).
NAMED = {"header checksum wrong": "header fails its checksum", "unknown top-level field": "modle",
         "no min_reader": "min_reader", "min_reader a number": "min_reader", "config a list": "config",
         "generation a string": "generation", "eos_token_id nested": "generation.eos_token_id[0]",
         "eos_token_id a string": "generation.eos_token_id", "eos_token_id huge": "generation.eos_token_id",
         "temperature NaN": "generation.temperature", "do_sample a number": "generation.do_sample",
         "top_k huge": "generation.top_k", "provenance source a list": "provenance.source",
         "quality holds numbers": "quality[0]", "tokenizer kind missing": "tokenizer.kind",
         "tokenizer blob key missing": "tokenizer.blob", "tokenizer kind unknown": "tokenizer.kind",
         "tokenizer unknown field": "tokenizer.blobb", "special a list": "tokenizer.special",
         "special token a number": "tokenizer.special.eos_token", "add_bos a string": "tokenizer.add_bos",
         "chat_template a number": "tokenizer.chat_template", "added_tokens junk": "tokenizer.added_tokens[0]",
         "shape padded with 70 ones": "embed.weight", "shape of a terabyte": "embed.weight"}


@pytest.mark.parametrize("what", MALFORMED)
def test_malformed_header_is_a_format_error(work, tmp_path, what):
    path = tmp_path / "bad.llmpack"
    path.write_bytes(MALFORMED[what](good_raw(work)))
    with pytest.raises(FormatError) as info:
        Pack(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert NAMED.get(what, "") in str(info.value)
    assert "malformed header" not in str(info.value)  # a schema error, not the catch-all for a raw exception


def test_random_damage_never_escapes_as_another_exception(work, tmp_path):
    """Fuzz the prefix and the header: every outcome is a loaded pack or a FormatError."""
    raw = good_raw(work)
    _, _, hoff, hlen = prefix(raw)
    rng = np.random.default_rng(0)
    path = tmp_path / "fuzz.llmpack"
    outcomes = {"ok": 0, "FormatError": 0}
    for i in range(300):
        b = bytearray(raw)
        kind = i % 3
        if kind == 0:  # flip bytes in the header JSON
            for _ in range(rng.integers(1, 4)):
                b[hoff + rng.integers(0, hlen)] = rng.integers(0, 256)
        elif kind == 1:  # flip a byte of the prefix
            b[rng.integers(0, 32)] ^= 1 << rng.integers(0, 8)
        else:  # cut the file anywhere
            b = b[: rng.integers(0, len(b))]
        path.write_bytes(bytes(b))
        try:
            Pack(path, verify=True).close()
            outcomes["ok"] += 1
        except FormatError:
            outcomes["FormatError"] += 1
    assert outcomes["FormatError"] > 200, outcomes


JUNK = [None, "x", -1, 7, 10 ** 12, 1.5, float("nan"), True, [1, 2]]


def test_malformed_model_description_is_a_format_error(work, tmp_path):
    """Checksums do not cover the header: any junk in the model description must fail at load
    with a FormatError (or, if it happens to be harmless, run) — never another exception."""
    from llmpack.formats import LlmpackError
    from llmpack.runtime.numpy_backend import NumpyBackend

    raw = good_raw(work)
    model = header_of(raw)["model"]
    targets = [(k,) for k in model] + [("layers", 0, k) for k in model["layers"][0]] + [("layers", 1)]
    path = tmp_path / "m.llmpack"
    rejected = 0
    for target in targets:
        for junk in JUNK:
            def put(h, target=target, junk=junk):
                obj = h["model"]
                for key in target[:-1]:
                    obj = obj[key]
                obj[target[-1]] = junk
            path.write_bytes(mutate_header(raw, put))
            try:
                backend = NumpyBackend(Pack(path, verify=False))  # only the header changed
                cache = backend.new_cache()
                backend.forward([1, 2, 3], cache)
                backend.forward([4], cache, last_only=True)
            except LlmpackError:
                rejected += 1
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"model{list(target)} = {junk!r}: {e.__class__.__name__}: {e}")
    assert rejected > len(targets) * len(JUNK) // 2


def test_pack_on_a_folder_and_a_missing_file(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        Pack(tmp_path / "nope.llmpack")
    with pytest.raises(FormatError):
        Pack(tmp_path)
