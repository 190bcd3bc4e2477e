"""The container format: writer/reader round trips of every storage type, the documented
dequantization formula (re-implemented here independently), alignment, zero-copy views
and atomic writing."""
import json
import math
import mmap
import os
import struct
import zlib

import numpy as np
import pytest

from llmpack.formats import Pack
from llmpack.formats.spec import ALIGN, FORMAT_VERSION, MAGIC, PREFIX_SIZE, STORAGE_TYPES, part_layout
from llmpack.formats.writer import PackWriter

HEADER = {"model": {"family": "test"}, "tokenizer": {"kind": "hf_json", "blob": "tok"}, "config": {"note": "ünïcödé"}}
PLAIN_SHAPES = [(3, 5, 7), (1,), (37,), (1, 1), (2, 1, 3), (0,), ()]
# (N, K, group): K not a multiple of the group, N = 1, K < group, K == group.
QUANT_SHAPES = [(5, 37, 16), (1, 37, 32), (3, 100, 64), (1, 7, 16), (2, 64, 32), (4, 300, 128)]


def _write(path, tensors, header=HEADER):
    """tensors: list of (name, type, shape, parts, group_size); adds the tokenizer blob "tok"."""
    with PackWriter(path) as w:
        for name, kind, shape, parts, g in tensors:
            w.add(name, kind, shape, parts, group_size=g)
        w.add_blob("tok", b"{}")
        w.finish(header)
    return path


# Dense quantized types; the sparse ones (q{b}s24, q{b}m) need a valid index/mask: tests/test_sparse.py.
DENSE_QUANT = [k for k, st in STORAGE_TYPES.items() if st.quantized and not st.sparse]


def _plain_data(kind, shape, rng):
    st = STORAGE_TYPES[kind]
    n = math.prod(shape)
    if kind == "u8":
        return rng.integers(0, 256, n, dtype=np.uint8).reshape(shape)
    if kind == "i32":
        return rng.integers(-2**31, 2**31 - 1, n, dtype=np.int64).astype("<i4").reshape(shape)
    if kind == "bf16":
        return rng.integers(0, 2**16, n, dtype=np.int64).astype("<u2").reshape(shape)
    return rng.standard_normal(n).astype(st.numpy).reshape(shape)


def _quant_parts(kind, n, k, g, zeros, rng):
    """Random codes / scales / zero points in the spec's part layout."""
    parts = {}
    for pname, (dtype, shape) in part_layout(kind, (n, k), g, zeros).items():
        if pname == "scales":
            parts[pname] = rng.standard_normal(shape).astype(dtype)
        else:
            parts[pname] = rng.integers(0, 256, shape, dtype=np.int64).astype(dtype)
    groups = math.ceil(k / g)
    bits = STORAGE_TYPES[kind].bits
    # The documented sizes: data (N, ceil(K/g), g*bits/8), scales (N, ceil(K/g)), zeros (N, ceil(G*bits/8)).
    assert parts["data"].shape == (n, groups, g * bits // 8) and parts["scales"].shape == (n, groups)
    assert not zeros or parts["zeros"].shape == (n, math.ceil(groups * bits / 8))
    return parts


def _bits_at(buf, index, bits):
    """Element `index` of a uint8 row read as one little-endian bit stream, low bits first (pure
    Python; a code may straddle two bytes, as 3-bit codes do)."""
    bit = index * bits
    word = int(buf[bit // 8]) | (int(buf[bit // 8 + 1]) << 8 if bit // 8 + 1 < len(buf) else 0)
    return (word >> (bit % 8)) & ((1 << bits) - 1)


def _spec_dequant(parts, n, k, g, bits):
    """W[n, k] = (code[n, k] - zero[n, k // g]) * scale[n, k // g], element by element."""
    w = np.zeros((n, k), np.float64)
    for r in range(n):
        for c in range(k):
            code = _bits_at(parts["data"][r, c // g], c % g, bits)  # one bit stream per group
            zero = _bits_at(parts["zeros"][r], c // g, bits) if "zeros" in parts else 2 ** (bits - 1)
            w[r, c] = (code - zero) * float(parts["scales"][r, c // g])
    return w


# -- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [k for k, st in STORAGE_TYPES.items() if not st.quantized])
def test_plain_round_trip(tmp_path, kind):
    rng = np.random.default_rng(0)
    arrays = {f"t{i}": _plain_data(kind, shape, rng) for i, shape in enumerate(PLAIN_SHAPES)}
    _write(tmp_path / "p.llmpack", [(n, kind, a.shape, {"data": a}, None) for n, a in arrays.items()])
    pack = Pack(tmp_path / "p.llmpack")
    assert pack.header["config"] == HEADER["config"] and pack.header["format_version"] == FORMAT_VERSION
    for name, a in arrays.items():
        t = pack.tensors[name]
        assert t["type"] == kind and tuple(t["shape"]) == a.shape
        got = pack.parts(name)
        assert set(got) == {"data"}
        assert got["data"].dtype == np.dtype(STORAGE_TYPES[kind].numpy) and got["data"].shape == a.shape
        assert got["data"].tobytes() == a.tobytes()
        if kind in ("f32", "f16"):
            np.testing.assert_array_equal(pack.array(name), a.astype(np.float32))
            assert pack.array(name).dtype == np.float32
        elif kind == "bf16":  # bf16 bits are the high half of a float32
            want = (a.astype(np.uint32) << 16).view(np.float32)
            np.testing.assert_array_equal(pack.array(name), want)  # NaN payloads compare equal too
        elif kind == "i32":
            np.testing.assert_array_equal(pack.array(name), a)
        else:
            assert pack.blob(name) == a.tobytes()
    pack.close()


@pytest.mark.parametrize("kind", DENSE_QUANT)
@pytest.mark.parametrize("zeros", [False, True], ids=["symmetric", "zero-points"])
def test_quantized_round_trip_and_formula(tmp_path, kind, zeros):
    rng = np.random.default_rng(1)
    bits = STORAGE_TYPES[kind].bits
    stored = {}
    for i, (n, k, g) in enumerate(QUANT_SHAPES):
        stored[f"w{i}"] = (n, k, g, _quant_parts(kind, n, k, g, zeros, rng))
    _write(tmp_path / "q.llmpack", [(name, kind, (n, k), parts, g) for name, (n, k, g, parts) in stored.items()])
    pack = Pack(tmp_path / "q.llmpack")
    for name, (n, k, g, parts) in stored.items():
        t = pack.tensors[name]
        assert t["group_size"] == g and t["shape"] == [n, k]
        got = pack.parts(name)
        assert set(got) == set(parts)
        for pname, a in parts.items():
            assert got[pname].dtype == a.dtype and got[pname].shape == a.shape
            assert got[pname].tobytes() == a.tobytes()
        w = pack.array(name)
        assert w.shape == (n, k) and w.dtype == np.float32
        np.testing.assert_allclose(w, _spec_dequant(parts, n, k, g, bits), rtol=1e-6, atol=0)
        rows = [n - 1, 0]
        np.testing.assert_array_equal(pack.array(name, rows=rows), w[rows])
    pack.close()


@pytest.mark.parametrize("kind", DENSE_QUANT)
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero-points"])
def test_quantize_rtn_output_follows_the_formula(tmp_path, kind, symmetric):
    from llmpack.formats import quant

    bits = STORAGE_TYPES[kind].bits
    rng = np.random.default_rng(2)
    n, k, g = 3, 70, 32
    w = rng.standard_normal((n, k)).astype(np.float32)
    parts = quant.quantize_rtn(w, bits, g, symmetric=symmetric)
    _write(tmp_path / "r.llmpack", [("w", kind, (n, k), parts, g)])
    got = Pack(tmp_path / "r.llmpack").array("w")
    np.testing.assert_allclose(got, _spec_dequant(parts, n, k, g, bits), rtol=1e-6)
    rel = np.linalg.norm(got - w) / np.linalg.norm(w)
    assert rel < 2.0 ** (1 - bits) * 1.5, rel  # roughly one step of a 2**bits grid over the range


def test_bf16_writer_rounds_to_nearest_even(tmp_path):
    torch = pytest.importorskip("torch")
    x = np.concatenate([np.random.default_rng(3).standard_normal(1000).astype(np.float32),
                        np.array([0.0, -0.0, 1.0, 3.4e38, -3.4e38, np.inf, -np.inf, 1e-40], np.float32),
                        # exact ties: round to even in both directions
                        np.array([0x3F808000, 0x3F818000, 0x00008000], np.uint32).view(np.float32)])
    with PackWriter(tmp_path / "b.llmpack") as w:
        w.add_array("x", x, "bf16")
        w.add_array("nan", np.array([np.nan, -np.nan, *np.array([0x7FFFFFFF, 0xFFFFFFFF], np.uint32)
                                     .view(np.float32)], np.float32), "bf16")
        w.add_blob("tok", b"{}")
        w.finish(HEADER)
    pack = Pack(tmp_path / "b.llmpack")
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(pack.array("x"), want)
    assert np.isnan(pack.array("nan")).all()


def test_writer_rejects_bad_parts(tmp_path):
    with pytest.raises(ValueError):
        with PackWriter(tmp_path / "x.llmpack") as w:
            w.add("a", "f32", (2, 3), {"data": np.zeros((3, 2), np.float32)})
    with pytest.raises(ValueError):
        with PackWriter(tmp_path / "x.llmpack") as w:
            w.add("a", "q4", (2, 40), {"data": np.zeros((2, 2, 16), np.uint8)}, group_size=32)  # no scales
    with pytest.raises(ValueError):
        with PackWriter(tmp_path / "x.llmpack") as w:
            w.add_array("a", np.zeros(3), "f32")
            w.add_array("a", np.zeros(3), "f32")
    assert os.listdir(tmp_path) == []


# -- layout ---------------------------------------------------------------------------------------
def _mixed_pack(path):
    rng = np.random.default_rng(4)
    tensors = []
    for i, kind in enumerate(STORAGE_TYPES):
        if STORAGE_TYPES[kind].sparse:
            continue
        if STORAGE_TYPES[kind].quantized:
            tensors.append((f"{kind}", kind, (3, 37), _quant_parts(kind, 3, 37, 16, i % 2 == 1, rng), 16))
        else:
            a = _plain_data(kind, (3, 7) if kind != "u8" else (13,), rng)
            tensors.append((kind, kind, a.shape, {"data": a}, None))
    return _write(path, tensors)


def test_layout_prefix_and_alignment(tmp_path):
    path = _mixed_pack(tmp_path / "m.llmpack")
    raw = path.read_bytes()
    assert raw[:8] == MAGIC
    version, flags, hoff, hlen = struct.unpack_from("<IIQQ", raw, 8)
    assert (version, flags) == (FORMAT_VERSION, 0)
    assert hoff % ALIGN == 0 and hoff + hlen == len(raw)
    assert struct.unpack_from("<I", raw, 32)[0] == zlib.crc32(raw[hoff:])  # the header's CRC32
    assert raw[36:PREFIX_SIZE] == b"\0" * 28
    header = json.loads(raw[hoff:].decode("utf-8"))
    spans = []
    for t in header["tensors"]:
        for pname, (off, n, crc) in t["parts"].items():
            assert off % ALIGN == 0, (t["name"], pname, off)
            assert PREFIX_SIZE <= off and off + n <= hoff
            assert zlib.crc32(raw[off:off + n]) == crc
            spans.append((off, off + n))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert {t["name"] for t in header["tensors"]} == {k for k, st in STORAGE_TYPES.items() if not st.sparse} | {"tok"}


def test_parts_are_zero_copy_views_of_the_mmap(tmp_path):
    pack = Pack(_mixed_pack(tmp_path / "m.llmpack"))
    for name in pack.tensors:
        assert not pack.parts(name)["data"].flags.owndata
        for pname, view in pack.parts(name).items():
            base = view
            while isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            if isinstance(base, memoryview):  # np.frombuffer(mmap) keeps a memoryview of it
                base = base.obj
            assert isinstance(base, mmap.mmap), (name, pname, type(base))
            assert not view.flags.writeable and not view.flags.owndata
    f32 = pack.array("f32")  # f32 is handed out as-is, no copy
    assert not f32.flags.owndata and not f32.flags.writeable
    pack.close()


# -- atomic writing ---------------------------------------------------------------------------------
class Boom(Exception):
    pass


def test_exception_inside_writer_leaves_nothing(tmp_path):
    out = tmp_path / "a.llmpack"
    with pytest.raises(Boom):
        with PackWriter(out) as w:
            w.add_array("x", np.ones((64, 64), np.float32), "f32")
            raise Boom()
    assert os.listdir(tmp_path) == []


def test_full_disk_is_a_one_line_error_and_leaves_nothing(tmp_path):
    import errno

    from llmpack.formats.errors import LlmpackError

    class FullDisk:  # a file object whose disk fills on the first tensor
        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            if len(data) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._fh.write(data)

        def __getattr__(self, name):
            return getattr(self._fh, name)

    out = tmp_path / "a.llmpack"
    with pytest.raises(LlmpackError, match="is full .*free some space or choose another output folder"):
        with PackWriter(out) as w:
            w._fh = FullDisk(w._fh)
            w.add_array("x", np.ones((64, 64), np.float32), "f32")
    assert os.listdir(tmp_path) == []


def test_unwritable_output_folder_is_a_one_line_error():
    from llmpack.formats.errors import LlmpackError

    if not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc (a folder no one may create files in, root included)")
    with pytest.raises(LlmpackError, match="cannot write in /proc .*choose another output folder"):
        with PackWriter("/proc/a.llmpack"):
            pass


def test_exception_in_finish_leaves_nothing(tmp_path):
    out = tmp_path / "a.llmpack"
    with pytest.raises(TypeError):
        with PackWriter(out) as w:
            w.add_array("x", np.ones(3, np.float32), "f32")
            w.finish({"model": {}, "tokenizer": {}, "bad": object()})  # not JSON-serializable
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_old_file(tmp_path):
    out = _mixed_pack(tmp_path / "a.llmpack")
    before = out.read_bytes()
    with pytest.raises(Boom):
        with PackWriter(out) as w:
            w.add_array("x", np.ones(3, np.float32), "f32")
            raise Boom()
    assert out.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.llmpack"]


def test_unfinished_writer_leaves_nothing(tmp_path):
    with PackWriter(tmp_path / "a.llmpack") as w:
        w.add_array("x", np.ones(3, np.float32), "f32")
        # no finish(): there is no header, so there must be no file either
    assert os.listdir(tmp_path) == []


def test_exception_after_finish_keeps_the_finished_file(tmp_path):
    out = tmp_path / "a.llmpack"
    with pytest.raises(Boom):
        with PackWriter(out) as w:
            w.add_array("x", np.ones(3, np.float32), "f32")
            w.add_blob("tok", b"{}")
            w.finish(HEADER)
            raise Boom()
    assert os.listdir(tmp_path) == ["a.llmpack"]
    assert Pack(out).array("x").tolist() == [1.0, 1.0, 1.0]


def test_written_file_is_readable_by_others(tmp_path):
    out = _mixed_pack(tmp_path / "a.llmpack")
    assert out.stat().st_mode & 0o777 == 0o644



# -- versions and the header checksum ------------------------------------------------------------
def _as_version_1(raw: bytes) -> bytes:
    """The same file as a format-1 writer made it: version 1, no header CRC, format_version 1."""
    _, _, hoff, _ = struct.unpack_from("<IIQQ", raw, 8)
    header = json.loads(raw[hoff:])
    blob = json.dumps(dict(header, format_version=1, min_reader="0.1")).encode()
    return (MAGIC + struct.pack("<IIQQ", 1, 0, hoff, len(blob)) + b"\0" * 32 + raw[PREFIX_SIZE:hoff] + blob)


def test_version_1_files_still_read(tmp_path):
    path = _mixed_pack(tmp_path / "m.llmpack")
    old = tmp_path / "v1.llmpack"
    old.write_bytes(_as_version_1(path.read_bytes()))
    new, v1 = Pack(path), Pack(old)
    assert v1.header["format_version"] == 1
    for name in new.tensors:
        for pname, view in new.parts(name).items():
            assert np.array_equal(view, v1.parts(name)[pname])


def test_a_newer_version_names_the_release_that_reads_it(tmp_path):
    from llmpack.formats import FormatError

    raw = bytearray(_mixed_pack(tmp_path / "m.llmpack").read_bytes())
    struct.pack_into("<I", raw, 8, FORMAT_VERSION + 1)
    (tmp_path / "new.llmpack").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=f"format version {FORMAT_VERSION + 1} is newer than this llmpack reads "
                                          f"\\({FORMAT_VERSION}\\); upgrade llmpack"):
        Pack(tmp_path / "new.llmpack")


def test_a_version_1_reader_refuses_a_version_2_file(tmp_path, monkeypatch):
    """An old reader (FORMAT_VERSION 1) sees a version-2 file as too new: new tensor kinds and the
    header CRC cannot be misread by it."""
    from llmpack.formats import FormatError, reader

    path = _mixed_pack(tmp_path / "m.llmpack")
    monkeypatch.setattr(reader, "FORMAT_VERSION", 1)
    with pytest.raises(FormatError, match="format version 2 is newer than this llmpack reads \\(1\\); "
                                          "upgrade llmpack \\(0.2 or later\\)"):
        Pack(path)


def test_header_bit_flips_fail_the_header_checksum(tmp_path):
    """A flip that keeps the JSON valid (a renamed tensor, a changed digit) no longer loads."""
    from llmpack.formats import FormatError

    raw = _mixed_pack(tmp_path / "m.llmpack").read_bytes()
    _, _, hoff, _ = struct.unpack_from("<IIQQ", raw, 8)
    text = raw[hoff:]
    for old, new in [(b'"type":"f32"', b'"type":"f16"'), (b'"family":"test"', b'"family":"tesu"')]:
        assert old in text
        bad = raw[:hoff] + text.replace(old, new, 1)  # same length, still valid JSON
        json.loads(bad[hoff:])
        (tmp_path / "bad.llmpack").write_bytes(bad)
        with pytest.raises(FormatError, match="header fails its checksum"):
            Pack(tmp_path / "bad.llmpack")
    flags = bytearray(raw)
    flags[12] = 1
    (tmp_path / "flags.llmpack").write_bytes(bytes(flags))
    with pytest.raises(FormatError, match="reserved prefix bytes"):
        Pack(tmp_path / "flags.llmpack")


def test_a_folder_is_named_as_a_folder(tmp_path):
    from llmpack.formats import FormatError

    with pytest.raises(FormatError, match="is a folder, not an llmpack file; pass the .llmpack file"):
        Pack(tmp_path)


@pytest.mark.parametrize("shape", [[1] * 70 + [3], [2 ** 20, 2 ** 20, 2 ** 20], [3, 2 ** 41]])
def test_absurd_shapes_are_refused_before_any_allocation(tmp_path, shape):
    from llmpack.formats import FormatError

    raw = _mixed_pack(tmp_path / "m.llmpack").read_bytes()
    _, _, hoff, _ = struct.unpack_from("<IIQQ", raw, 8)
    header = json.loads(raw[hoff:])
    next(t for t in header["tensors"] if t["name"] == "f32")["shape"] = shape
    blob = json.dumps(header).encode()
    bad = bytearray(raw[:hoff] + blob)
    struct.pack_into("<QI", bad, 24, len(blob), zlib.crc32(blob))
    (tmp_path / "bad.llmpack").write_bytes(bytes(bad))
    with pytest.raises(FormatError, match="tensor f32 (has an invalid shape|\\(data\\) holds)"):
        Pack(tmp_path / "bad.llmpack")


# -- killed writers -----------------------------------------------------------------------------------
KILLED_WRITER = r"""
import os, sys
import numpy as np
from llmpack.formats.writer import PackWriter

stage = sys.argv[2]
real_fsync = os.fsync

def stop(*args):  # the parent kills this process (SIGKILL) once it has read the line
    print("stopped", flush=True)
    sys.stdin.read()

if stage == "header":  # the header is on disk and synced; the prefix is not written yet
    os.fsync = lambda fd: (real_fsync(fd), stop())
with PackWriter(sys.argv[1]) as w:
    w.add_array("x", np.ones((64, 64), np.float32), "f32")
    w.add_blob("tok", b"{}")
    if stage == "tensors":
        stop()
    w.finish({"model": {}, "tokenizer": {"kind": "hf_json", "blob": "tok"}})
"""


@pytest.mark.parametrize("stage", ["tensors", "header"])
def test_a_killed_writer_leaves_no_pack_and_the_next_one_cleans_up(tmp_path, stage):
    import signal
    import subprocess
    import sys

    from llmpack.formats import FormatError

    out = tmp_path / "a.llmpack"
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out), stage], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "stopped\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    left = os.listdir(tmp_path)
    assert left == [f".a.llmpack.tmp-{child.pid}.{left[0].rsplit('.', 1)[1]}"], left
    temp = tmp_path / left[0]
    assert temp.read_bytes()[:PREFIX_SIZE] == b"\0" * PREFIX_SIZE  # the header may be there, the magic is not
    with pytest.raises(FormatError, match="not an llmpack file"):
        Pack(temp)
    live = tmp_path / f".a.llmpack.tmp-{os.getpid()}.abcd1234"  # a live writer's temporary stays
    live.write_bytes(b"")
    _write(out, [("x", "f32", (3,), {"data": np.ones(3, np.float32)}, None)])
    assert sorted(os.listdir(tmp_path)) == sorted(["a.llmpack", live.name])
