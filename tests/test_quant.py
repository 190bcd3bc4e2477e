"""Storage types q8/q4/q3/q2: packing, the documented dequantization formula, files. No torch."""
import numpy as np
import pytest

from llmpack.formats import Pack, quant
from llmpack.formats.spec import STORAGE_TYPES, part_layout, quantized_nbytes
from llmpack.formats.writer import PackWriter

BITS = (8, 4, 3, 2)
SHAPES = [(1, 8), (3, 45), (5, 64), (2, 200), (7, 33)]  # K off the group grid, tiny N


def _read_bits(buf: np.ndarray, index: int, bits: int) -> int:
    """Independent reader of the spec's bit stream: code `index` at bits [index*b, index*b+b)."""
    v = 0
    for j in range(bits):
        pos = index * bits + j
        v |= ((int(buf[pos // 8]) >> (pos % 8)) & 1) << j
    return v


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("length", [1, 2, 3, 5, 7, 8, 9, 16, 31, 33])
def test_pack_unpack_roundtrip(bits, length):
    rng = np.random.default_rng(bits * 100 + length)
    codes = rng.integers(0, 1 << bits, (4, length))
    packed = quant.pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (4, -(-length * bits // 8))
    assert np.array_equal(quant.unpack_codes(packed, bits, length), codes)
    for r in range(4):
        assert [_read_bits(packed[r], i, bits) for i in range(length)] == list(codes[r])


def test_matmulnbits_layout_for_2_4_8():
    # onnxruntime MatMulNBits: element i of a byte sits at bits [i*b, (i+1)*b).
    c = np.array([[1, 2, 3, 0, 3, 1, 0, 2]])
    assert quant.pack_codes(c, 2).tolist() == [[1 | 2 << 2 | 3 << 4 | 0 << 6, 3 | 1 << 2 | 0 << 4 | 2 << 6]]
    c4 = np.array([[0xA, 0x3, 0xF, 0x0]])
    assert quant.pack_codes(c4, 4).tolist() == [[0x3A, 0x0F]]
    assert quant.pack_codes(np.array([[7, 200]]), 8).tolist() == [[7, 200]]


def test_q3_is_dense():
    assert quant.pack_codes(np.zeros((1, 32)), 3).shape == (1, 12)
    assert quantized_nbytes("q3", (10, 64), 32, False) == 10 * 64 * 3 // 8 + 10 * 2 * 2
    assert STORAGE_TYPES["q3"].bits == 3 and STORAGE_TYPES["q3"].quantized


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group", [16, 32])
def test_dequantize_is_the_documented_formula(bits, symmetric, shape, group):
    n, k = shape
    w = np.random.default_rng(k).standard_normal(shape).astype(np.float32)
    parts = quant.quantize_rtn(w, bits, group, symmetric)
    layout = part_layout(f"q{bits}", shape, group, not symmetric)
    assert {p: (a.dtype.str.replace("|", ""), a.shape) for p, a in parts.items()} == \
        {p: (np.dtype(d).str.replace("|", ""), s) for p, (d, s) in layout.items()}
    G = -(-k // group)
    expect = np.empty(shape, np.float32)
    for r in range(n):
        for j in range(k):
            g = j // group
            stream = parts["data"][r, g]
            code = _read_bits(stream, j % group, bits)
            zero = (1 << (bits - 1)) if symmetric else _read_bits(parts["zeros"][r], g, bits)
            expect[r, j] = (code - zero) * np.float32(parts["scales"][r, g])
        for g in range(G):  # padding past K holds the zero point (value 0)
            for j in range(k - g * group if (g + 1) * group > k else group, group):
                zero = (1 << (bits - 1)) if symmetric else _read_bits(parts["zeros"][r], g, bits)
                assert _read_bits(parts["data"][r, g], j, bits) == zero
    got = quant.dequantize(parts, shape, bits, group)
    assert np.array_equal(got, expect)
    # and the quantization is sane: error well under the weights' scale
    rel = np.sqrt(((got - w) ** 2).mean() / (w ** 2).mean())
    assert rel < {8: 0.01, 4: 0.15, 3: 0.3, 2: 0.65}[bits]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_file_roundtrip_every_type(tmp_path, bits, symmetric):
    rng = np.random.default_rng(bits)
    tensors = {f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(SHAPES)}
    parts = {n: quant.quantize_rtn(w, bits, 16, symmetric) for n, w in tensors.items()}
    with PackWriter(tmp_path / "m.llmpack") as wr:
        for n, w in tensors.items():
            wr.add(n, f"q{bits}", w.shape, parts[n], group_size=16)
        wr.finish({"model": {}, "tokenizer": {}})
    pack = Pack(tmp_path / "m.llmpack")
    for n, w in tensors.items():
        stored = pack.parts(n)
        assert set(stored) == set(parts[n])
        for p in stored:
            assert np.array_equal(stored[p], parts[n][p])
        full = pack.array(n)
        assert np.array_equal(full, quant.dequantize(parts[n], w.shape, bits, 16))
        rows = np.array([w.shape[0] - 1, 0, w.shape[0] - 1])
        assert np.array_equal(pack.array(n, rows=rows), full[rows])  # embedding gather
    pack.close()


@pytest.mark.parametrize("symmetric", [True, False])
def test_q3_widens_to_q4_exactly(symmetric):
    w = np.random.default_rng(3).standard_normal((6, 70)).astype(np.float32)
    p3 = quant.quantize_rtn(w, 3, 32, symmetric)
    p4 = quant.widen_q3_to_q4(p3)
    assert set(p4) == set(p3)
    assert p4["data"].shape == part_layout("q4", (6, 70), 32, not symmetric)["data"][1]
    assert np.array_equal(quant.dequantize(p4, (6, 70), 4, 32), quant.dequantize(p3, (6, 70), 3, 32))


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_clip_search_beats_min_max(bits):
    w = np.random.default_rng(0).standard_t(3, (64, 256)).astype(np.float32)  # heavy tails
    err = {}
    for search in (False, True):
        d = quant.dequantize(quant.quantize_rtn(w, bits, 32, False, search=search), w.shape, bits, 32)
        err[search] = ((d - w) ** 2).sum()
    assert err[True] < err[False]


def test_importance_weighting_moves_error_off_important_columns():
    w = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    imp = np.ones(64, np.float32)
    imp[:8] = 100.0
    plain = quant.dequantize(quant.quantize_rtn(w, 3, 32, False), w.shape, 3, 32) - w
    weighted = quant.dequantize(quant.quantize_rtn(w, 3, 32, False, importance=imp), w.shape, 3, 32) - w
    assert (weighted[:, :8] ** 2).sum() < (plain[:, :8] ** 2).sum()
