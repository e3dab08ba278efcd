"""Signed int-b codes (b = 2..8) as bytes: dense bit packing, or one byte per value.

Symmetric int-b quantizers produce q in [-(2^(b-1)-1), 2^(b-1)-1]; the most negative two's-complement
code is unused so the grid is symmetric around 0 (int2 -> {-1, 0, 1}, int4 -> [-7, 7], int6 -> [-31, 31]).

Packed layout: each value is offset by 2^(b-1)-1 to an unsigned code in [0, 2^b - 2], and the codes
form a little-endian bit stream: value i occupies bits i*b .. i*b+b-1, bit 0 being the least
significant bit of byte 0. n values take ceil(n*b/8) bytes; unused high bits of the last byte are 0.

Which layout is smaller depends on the compressor that follows, not on the raw size. Brotli/lzma/zlib
model byte symbols, so codes that straddle byte boundaries look like noise to them. Measured on 1M int6
codes of Student-t weights with per-row SD-clip scales (k = 12.85, code std 2.4, order-0 entropy
434 KB): brotli stores the one-byte-per-value layout in 438 KB and the dense 6-bit stream in 497 KB
(lzma 457 vs 529 KB, zlib 504 vs 597 KB). For bit widths that divide 8 (int2, int4) the codes stay
byte-aligned when packed, and packing ties under brotli (int4: 376 vs 380 KB, int2: 206 vs 207 KB) and
wins under lzma/zlib. So: "int8" layout for int3/5/6/7, "packed" for int2/int4. Both are exposed via
`layout` in encode_intk/decode_intk so an exporter can also measure per tensor group.
"""
from __future__ import annotations

import numpy as np
import torch

MIN_BITS, MAX_BITS = 2, 8
LAYOUTS = ("int8", "packed")


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def qmax(bits: int) -> int:
    """Largest magnitude of a symmetric int-`bits` code."""
    _check_bits(bits)
    return 2 ** (bits - 1) - 1


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that pack_bits writes for `numel` values."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def _codes_as_numpy(q: torch.Tensor, bits: int, who: str) -> np.ndarray:
    """Flat int8 numpy view of `q`, after checking dtype and the symmetric int-`bits` range."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"{who}: expected an int8 torch.Tensor of int{bits} codes, got {got}")
    flat = q.detach().cpu().reshape(-1).numpy()
    m = qmax(bits)
    if flat.size and (int(flat.min()) < -m or int(flat.max()) > m):
        raise ValueError(f"{who}: int{bits} codes must lie in [{-m}, {m}], got min {int(flat.min())}, "
                         f"max {int(flat.max())}")
    return flat


def _bytes_as_numpy(data: torch.Tensor, who: str) -> np.ndarray:
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        got = data.dtype if isinstance(data, torch.Tensor) else type(data).__name__
        raise TypeError(f"{who}: expected a uint8 torch.Tensor, got {got}")
    return data.detach().cpu().reshape(-1).numpy()


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Dense little-endian bit packing of int8 codes in the symmetric int-`bits` range (any shape,
    read in C order) -> 1-D uint8 tensor of packed_nbytes(q.numel(), bits) bytes."""
    _check_bits(bits)
    flat = _codes_as_numpy(q, bits, "pack_bits")
    n = flat.size
    groups = -(-n // 8)
    # 8 codes of `bits` bits fill exactly `bits` bytes, so each group of 8 is assembled in one
    # uint64 (8 * 8 = 64 bits is enough) and its low `bits` bytes are kept. Padding codes are 0, so
    # the stream's unused tail bits are 0 and truncating to packed_nbytes drops only padding.
    codes = np.zeros(groups * 8, dtype=np.uint8)
    codes[:n] = flat.astype(np.int16) + qmax(bits)
    codes = codes.reshape(groups, 8)
    word = np.zeros(groups, dtype=np.uint64)
    for lane in range(8):  # loops over the 8 positions within a group, each vectorised over all groups
        word |= codes[:, lane].astype(np.uint64) << np.uint64(lane * bits)
    out = word.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :bits].reshape(-1)
    return torch.from_numpy(out[:packed_nbytes(n, bits)].copy())


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_bits: 1-D int8 tensor of `numel` codes (reshape to the original shape)."""
    _check_bits(bits)
    data = _bytes_as_numpy(packed, "unpack_bits")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"unpack_bits: numel must be a non-negative int, got {numel!r}")
    expected = packed_nbytes(numel, bits)
    if data.size != expected:
        raise ValueError(f"unpack_bits: {numel} int{bits} codes take {expected} packed bytes, got {data.size}")
    groups = -(-numel // 8)
    stream = np.zeros(groups * bits, dtype=np.uint8)
    stream[:data.size] = data
    words = np.zeros((groups, 8), dtype=np.uint8)
    words[:, :bits] = stream.reshape(groups, bits)
    word = words.view("<u8").reshape(groups)
    mask = np.uint64((1 << bits) - 1)
    codes = np.empty((groups, 8), dtype=np.uint8)
    for lane in range(8):
        codes[:, lane] = (word >> np.uint64(lane * bits)) & mask
    codes = codes.reshape(-1)[:numel]
    m = qmax(bits)
    if numel and int(codes.max()) > 2 * m:
        # Only 2^b - 1 of the 2^b codes are valid; the all-ones code means corrupt data or wrong bits.
        raise ValueError(f"unpack_bits: found code {int(codes.max())}, valid int{bits} codes are 0..{2 * m} "
                         f"(corrupt data or wrong bits)")
    return torch.from_numpy((codes.astype(np.int16) - m).astype(np.int8))


def encode_intk(q: torch.Tensor, bits: int, layout: str) -> torch.Tensor:
    """int-`bits` codes -> 1-D uint8 bytes in `layout`: "int8" (one two's-complement byte per value,
    best before brotli/lzma for peaked weight codes) or "packed" (pack_bits)."""
    _check_layout(layout)
    if layout == "packed":
        return pack_bits(q, bits)
    _check_bits(bits)
    return torch.from_numpy(_codes_as_numpy(q, bits, "encode_intk").view(np.uint8).copy())


def decode_intk(data: torch.Tensor, bits: int, numel: int, layout: str) -> torch.Tensor:
    """Inverse of encode_intk: 1-D int8 tensor of `numel` codes, range-checked."""
    _check_layout(layout)
    if layout == "packed":
        return unpack_bits(data, bits, numel)
    _check_bits(bits)
    raw = _bytes_as_numpy(data, "decode_intk")
    if raw.size != numel:
        raise ValueError(f"decode_intk: layout 'int8' stores {numel} codes in {numel} bytes, got {raw.size}")
    q = torch.from_numpy(raw.view(np.int8).copy())
    _codes_as_numpy(q, bits, "decode_intk")
    return q
