"""quant/: int-b bit packing (intk), LQER low-rank residual correction (lqer), and the
self-describing compressed byte stream with byte shuffle (compress)."""
from __future__ import annotations

import sys

import pytest
import torch

from quant.compress import MAGIC, METHODS, compress, decompress, shuffle, unshuffle
from quant.intk import decode_intk, encode_intk, pack_bits, packed_nbytes, qmax, unpack_bits
from quant.lqer import A_BITS, B_BITS, _ternary_scale, dequantize_lqer, lqer_factors, quantize_lqer


def _codes(bits: int, n: int, seed: int = 0) -> torch.Tensor:
    m = qmax(bits)
    return torch.randint(-m, m + 1, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


# ---------------------------------------------------------------- intk

@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, 4099])
def test_pack_bits_round_trip_bit_exact(bits, n):
    q = _codes(bits, n, seed=bits * 10_000 + n)
    if n:  # make sure both range ends are exercised
        q[0], q[-1] = -qmax(bits), qmax(bits)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1 and packed.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), q)


def test_pack_bits_layout_is_little_endian_offset_codes():
    # int4: -7 -> code 0 (low nibble of byte 0), 7 -> code 14 (high nibble), 0 -> code 7.
    assert pack_bits(torch.tensor([-7, 7, 0], dtype=torch.int8), 4).tolist() == [0xE0, 0x07]
    # int3: codes 0..6 across a byte boundary: 3 codes of value 6 = 0b110 -> bits 110 110 110.
    assert pack_bits(torch.tensor([3, 3, 3], dtype=torch.int8), 3).tolist() == [0b10110110, 0b1]
    # int2 {-1, 0, 1} -> codes {0, 1, 2}, four per byte.
    assert pack_bits(torch.tensor([1, 0, -1, 1], dtype=torch.int8), 2).tolist() == [0b10000110]


def test_pack_bits_accepts_any_shape_in_c_order():
    q = _codes(5, 60).reshape(3, 4, 5)
    assert torch.equal(unpack_bits(pack_bits(q, 5), 5, 60).reshape(3, 4, 5), q)
    assert torch.equal(pack_bits(q.transpose(0, 2), 5), pack_bits(q.transpose(0, 2).contiguous(), 5))


@pytest.mark.parametrize("bits,bad", [(2, 2), (2, -2), (4, -8), (6, 32), (8, -128)])
def test_pack_bits_rejects_out_of_range(bits, bad):
    q = torch.tensor([0, bad, 1], dtype=torch.int8)
    with pytest.raises(ValueError, match=rf"int{bits} codes must lie in \[{-qmax(bits)}, {qmax(bits)}\]"):
        pack_bits(q, bits)
    with pytest.raises(ValueError, match="must lie in"):
        encode_intk(q, bits, "int8")


def test_pack_bits_rejects_bad_arguments():
    with pytest.raises(TypeError, match="expected an int8"):
        pack_bits(torch.zeros(4, dtype=torch.int16), 4)
    for bits in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits must be an int in 2..8"):
            pack_bits(torch.zeros(4, dtype=torch.int8), bits)
    with pytest.raises(TypeError, match="expected a uint8"):
        unpack_bits(torch.zeros(3, dtype=torch.int8), 4, 6)


def test_unpack_bits_rejects_wrong_length_and_invalid_codes():
    packed = pack_bits(_codes(6, 10), 6)
    with pytest.raises(ValueError, match="10 int6 codes take 8 packed bytes, got 7"):
        unpack_bits(packed[:-1], 6, 10)
    with pytest.raises(ValueError, match="numel must be a non-negative int"):
        unpack_bits(packed, 6, -1)
    # int2 code 3 (0b11) has no value: data packed with another width or damaged.
    with pytest.raises(ValueError, match="found code 3, valid int2 codes are 0..2"):
        unpack_bits(torch.tensor([0xFF], dtype=torch.uint8), 2, 4)


@pytest.mark.parametrize("layout", ["int8", "packed"])
@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_encode_decode_layouts_round_trip(layout, bits):
    q = _codes(bits, 333, seed=bits)
    data = encode_intk(q, bits, layout)
    assert data.dtype == torch.uint8
    assert data.numel() == (333 if layout == "int8" else packed_nbytes(333, bits))
    assert torch.equal(decode_intk(data, bits, 333, layout), q)


def test_encode_decode_layout_errors():
    q = _codes(6, 10)
    with pytest.raises(ValueError, match="layout must be one of"):
        encode_intk(q, 6, "nibbles")
    with pytest.raises(ValueError, match="stores 11 codes in 11 bytes, got 10"):
        decode_intk(encode_intk(q, 6, "int8"), 6, 11, "int8")
    with pytest.raises(ValueError, match=r"int4 codes must lie in \[-7, 7\]"):
        decode_intk(torch.tensor([0x08], dtype=torch.uint8), 4, 1, "int8")


# ---------------------------------------------------------------- lqer

def _low_rank_residual(rows: int, cols: int, rank: int = 4, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """A residual with a few dominant directions (decaying singular values) plus white noise."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(rows, rank, generator=g)).Q
    V = torch.linalg.qr(torch.randn(cols, rank, generator=g)).Q
    sv = torch.logspace(0, -0.6, rank)
    return U @ torch.diag(sv) @ V.T + noise * torch.randn(rows, cols, generator=g) / (rows * cols) ** 0.25


def test_lqer_factors_are_the_balanced_truncated_svd():
    E = _low_rank_residual(48, 80, seed=1)
    A, B = lqer_factors(E, 3)
    assert A.shape == (48, 3) and B.shape == (3, 80) and A.dtype == B.dtype == torch.float32
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    torch.testing.assert_close(A @ B, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(A.norm(dim=0), B.norm(dim=1))  # each factor carries sqrt(S)
    torch.testing.assert_close(A.norm(dim=0).square(), S[:3])


def test_ternary_scale_is_optimal():
    a = torch.randn(500, generator=torch.Generator().manual_seed(2))

    def err(s: float) -> float:
        return float((a - s * torch.round(a / s).clamp(-1, 1)).square().sum())

    s = _ternary_scale(a)
    grid = torch.linspace(0.05, 3.0, 600).tolist()
    assert err(s) <= min(err(c) for c in grid) + 1e-9


@pytest.mark.parametrize("cols", [128, 100, 37])  # whole groups, a ragged last group, a single short group
def test_quantize_lqer_reduces_residual(cols):
    E = _low_rank_residual(96, cols, seed=cols)
    parts = quantize_lqer(E, rank=4)
    groups = -(-cols // 64)
    assert parts["a_q"].shape == (96, 4) and parts["a_q"].dtype == torch.int8
    assert set(parts["a_q"].unique().tolist()) <= {-1, 0, 1}
    assert parts["a_scale"].shape == () and parts["a_scale"].dtype == torch.float16
    assert parts["b_q"].shape == (4, cols) and parts["b_q"].dtype == torch.int8
    assert int(parts["b_q"].abs().max()) <= 7
    assert parts["b_scale"].shape == (4, groups) and parts["b_scale"].dtype == torch.float16
    assert parts["shape"] == [96, cols] and parts["rank"] == 4 and parts["group"] == 64
    corr = dequantize_lqer(parts)
    assert corr.shape == E.shape and corr.dtype == torch.float32
    # int2 A alone costs a lot against the exact rank-4 fit, but the correction must still remove
    # a clear share of the residual.
    assert (E - corr).norm() < 0.7 * E.norm()


def test_lqer_codes_round_trip_through_pack_bits():
    E = _low_rank_residual(70, 130, seed=3)
    parts = quantize_lqer(E, rank=4)
    rows, cols = parts["shape"]
    packed_a = pack_bits(parts["a_q"], A_BITS)
    packed_b = pack_bits(parts["b_q"], B_BITS)
    assert packed_a.numel() == packed_nbytes(rows * 4, 2) and packed_b.numel() == packed_nbytes(4 * cols, 4)
    restored = dict(parts,
                    a_q=unpack_bits(packed_a, A_BITS, rows * 4).reshape(rows, 4),
                    b_q=unpack_bits(packed_b, B_BITS, 4 * cols).reshape(4, cols))
    assert torch.equal(restored["a_q"], parts["a_q"]) and torch.equal(restored["b_q"], parts["b_q"])
    assert torch.equal(dequantize_lqer(restored), dequantize_lqer(parts))


def test_lqer_zero_residual_gives_zero_correction():
    parts = quantize_lqer(torch.zeros(8, 70), rank=2)
    assert torch.count_nonzero(dequantize_lqer(parts)) == 0


def test_lqer_rejects_bad_inputs():
    with pytest.raises(ValueError, match="expected a 2-D float residual"):
        lqer_factors(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="expected a 2-D float residual"):
        lqer_factors(torch.zeros(4, 4, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match=r"rank must be an int in 1..4 \(min of E's shape \(4, 9\)\), got 5"):
        lqer_factors(torch.zeros(4, 9), 5)
    with pytest.raises(ValueError, match="rank must be"):
        quantize_lqer(torch.zeros(4, 9), 0)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_lqer(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="group must be a positive int"):
        quantize_lqer(torch.zeros(4, 9), 1, group=0)
    with pytest.raises(ValueError, match="exceeds the fp16 range"):
        quantize_lqer(torch.full((4, 4), 1e12), 1)


def test_dequantize_lqer_rejects_inconsistent_parts():
    parts = quantize_lqer(_low_rank_residual(16, 70, seed=4), rank=2)
    with pytest.raises(ValueError, match="expected keys a_q, a_scale, b_q, b_scale"):
        dequantize_lqer({k: v for k, v in parts.items() if k != "b_scale"})
    with pytest.raises(ValueError, match=r"b_scale should be torch.float16 \(2, 2\), got torch.float16 \(2, 1\)"):
        dequantize_lqer(dict(parts, b_scale=parts["b_scale"][:, :1]))
    with pytest.raises(ValueError, match=r"a_q should be torch.int8 \(16, 2\)"):
        dequantize_lqer(dict(parts, a_q=parts["a_q"].float()))


# ---------------------------------------------------------------- compress

def _payload(n: int, seed: int = 0) -> bytes:
    """Compressible but not trivial bytes: fp16 values of a Gaussian, truncated to n bytes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n // 2 + 1, generator=g).half().view(torch.uint8).numpy().tobytes()[:n]


def test_shuffle_groups_bytes_by_position_and_keeps_tail():
    assert shuffle(bytes([1, 2, 3, 4, 5, 6, 7]), 2) == bytes([1, 3, 5, 2, 4, 6, 7])
    assert shuffle(bytes(range(8)), 4) == bytes([0, 4, 1, 5, 2, 6, 3, 7])
    assert shuffle(b"abc", 4) == b"abc" and shuffle(b"", 2) == b""


@pytest.mark.parametrize("width", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 5, 1001, 4096])
def test_shuffle_round_trip(width, n):
    data = _payload(n, seed=n)
    assert unshuffle(shuffle(data, width), width) == data


def test_shuffle_per_tensor_chunks():
    # A buffer mixing element sizes is shuffled chunk by chunk, each with its own itemsize.
    f16, i32 = _payload(200, seed=1), _payload(404, seed=2)
    blob = decompress(compress(shuffle(f16, 2) + shuffle(i32, 4), "zlib"))
    assert unshuffle(blob[:200], 2) == f16 and unshuffle(blob[200:], 4) == i32


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("width", [0, 1, 2, 4])
@pytest.mark.parametrize("n", [0, 1, 3, 1001])
def test_compress_round_trip(method, width, n):
    data = _payload(n, seed=n + width)
    blob = compress(data, method, shuffle_width=width)
    assert blob.startswith(MAGIC)
    assert decompress(blob) == data


def test_compress_accepts_bytes_like():
    data = _payload(100)
    assert decompress(compress(bytearray(data), "lzma", 2)) == data
    assert decompress(memoryview(compress(memoryview(data), "zlib"))) == data


def test_compress_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"method must be one of \('none', 'zlib', 'lzma', 'brotli'\), got 'zstd'"):
        compress(b"x", "zstd")
    for width in (-1, 256, 2.0):
        with pytest.raises(ValueError, match="shuffle width must be an int in 0..255"):
            compress(b"x", "zlib", width)
    with pytest.raises(ValueError, match="shuffle width must be an int in 1..255"):
        shuffle(b"x", 0)


def test_decompress_rejects_damaged_blobs():
    blob = compress(_payload(300), "zlib", 2)
    head = 18 + 4  # header + one chunk length
    with pytest.raises(ValueError, match="shorter than the 18-byte header"):
        decompress(blob[:10])
    with pytest.raises(ValueError, match="bad magic"):
        decompress(b"XXXX" + blob[4:])
    with pytest.raises(ValueError, match="unknown method id 9"):
        decompress(blob[:4] + bytes([9]) + blob[5:])
    with pytest.raises(ValueError, match="corrupt zlib stream"):
        decompress(blob[:head] + b"\x00" * (len(blob) - head))
    plain = compress(_payload(300), "zlib")
    with pytest.raises(ValueError, match="decoded to 300 bytes, header says 301"):
        decompress(plain[:6] + (301).to_bytes(8, "little") + plain[14:])
    for method in ("lzma", "brotli", "none"):
        with pytest.raises(ValueError, match="truncated"):
            decompress(compress(_payload(300), method)[:-1])
    for method in ("lzma", "brotli"):
        good = compress(_payload(300), method)
        with pytest.raises(ValueError, match=f"corrupt {method} stream"):
            decompress(good[:head] + bytes(b ^ 0x5A for b in good[head:]))


def test_large_inputs_are_compressed_in_independent_chunks(monkeypatch):
    import quant.compress as qc

    monkeypatch.setattr(qc, "CHUNK_BYTES", 1000)
    data = _payload(3500)
    for method in ("zlib", "brotli"):
        blob = compress(data, method, 2)
        assert int.from_bytes(blob[14:18], "little") == 4  # ceil(3500 / 1000) chunks
        assert decompress(blob) == data
        assert compress(data, method, 2) == blob  # deterministic


def test_brotli_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "brotli", None)  # makes `import brotli` raise ImportError
    with pytest.raises(ImportError, match=r"needs the brotli package \(pip install brotli==1.2.1\)"):
        compress(b"abc", "brotli")
    assert decompress(compress(b"abc", "lzma")) == b"abc"  # the other methods are unaffected
