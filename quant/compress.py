"""Byte-stream compression for the artifact, with a self-describing header so decompress needs no
arguments.

Header, little-endian: magic b"GCZ2", method id (uint8, index into METHODS), shuffle width (uint8,
0 = not shuffled), raw length (uint64, checked after decoding), chunk count (uint32), then each
chunk's compressed length (uint32). The raw bytes are cut into CHUNK_BYTES pieces compressed
independently on a thread pool (brotli, lzma and zlib release the GIL): brotli-11 runs at a fraction
of a MB/s per core, so a 30 MB model takes minutes on one core. Chunks depend on the length only, so
the bytes (and the artifact size) are the same on every machine; splitting 4 MB of int6 codes in two
changed brotli's output by 15 bytes. Compressor framing is kept
minimal because every byte counts against the 16,000,000-byte cap: lzma is written as a raw LZMA2
stream (the .xz container would add about 60 bytes of headers and a CRC that the header's length
check and the tensor container's sha256 make redundant).

Byte shuffle (as in blosc): for W-byte elements, all byte 0s come first, then all byte 1s, ... . For
fp16/bf16 weights this puts the sign/exponent bytes, which are few-valued, in one run and the noisy
mantissa bytes in another, so the compressor models each separately (1M fp16 weights: brotli
1855 -> 1785 KB; bf16: 1514 -> 1414 KB). compress() can shuffle the whole
buffer by one width; a buffer mixing element sizes (e.g. a tensor container) should instead be
shuffled per tensor with shuffle(chunk, itemsize), concatenated, and compressed with shuffle_width=0;
the reader unshuffles each chunk after decompress. Trailing bytes that do not fill an element are
kept in place at the end.
"""
from __future__ import annotations

import lzma
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MAGIC = b"GCZ2"
_HEADER = struct.Struct("<4sBBQI")
_LENGTH = struct.Struct("<I")
CHUNK_BYTES = 4 << 20
# The header stores a method's index: append new methods, never reorder.
METHODS = ("none", "zlib", "lzma", "brotli")
MAX_SHUFFLE_WIDTH = 255
ZLIB_LEVEL = 9
LZMA_PRESET = 9 | lzma.PRESET_EXTREME
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": LZMA_PRESET}]
BROTLI_QUALITY, BROTLI_LGWIN = 11, 24


def _brotli():
    """The brotli module, imported on first use so the other methods work where it is missing."""
    try:
        import brotli
    except ImportError as e:
        raise ImportError("compression method 'brotli' needs the brotli package (pip install brotli==1.2.1), "
                          "which is not installed in this environment") from e
    return brotli


def _check_width(width: int, who: str, allow_zero: bool) -> None:
    lo = 0 if allow_zero else 1
    if isinstance(width, bool) or not isinstance(width, int) or not lo <= width <= MAX_SHUFFLE_WIDTH:
        raise ValueError(f"{who}: shuffle width must be an int in {lo}..{MAX_SHUFFLE_WIDTH}, got {width!r}")


def shuffle(data: bytes, width: int) -> bytes:
    """Groups byte k of every `width`-byte element together, k = 0..width-1 (see module docstring)."""
    _check_width(width, "shuffle", allow_zero=False)
    buf = np.frombuffer(data, dtype=np.uint8)
    whole = len(buf) // width * width
    return buf[:whole].reshape(-1, width).T.tobytes() + buf[whole:].tobytes()


def unshuffle(data: bytes, width: int) -> bytes:
    """Inverse of shuffle(data, width)."""
    _check_width(width, "unshuffle", allow_zero=False)
    buf = np.frombuffer(data, dtype=np.uint8)
    whole = len(buf) // width * width
    return buf[:whole].reshape(width, -1).T.tobytes() + buf[whole:].tobytes()


def _encode(method: str, raw: bytes) -> bytes:
    if method == "none":
        return raw
    if method == "zlib":
        return zlib.compress(raw, ZLIB_LEVEL)
    if method == "lzma":
        return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return _brotli().compress(raw, quality=BROTLI_QUALITY, lgwin=BROTLI_LGWIN)


def _decode(method: str, body: bytes) -> bytes:
    """Decoded body; a decoder's own error on corrupt input becomes ValueError."""
    if method == "none":
        return body
    if method == "zlib":
        decode, error = zlib.decompress, zlib.error
    elif method == "lzma":
        decode, error = (lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)), lzma.LZMAError
    else:
        brotli = _brotli()
        decode, error = brotli.decompress, brotli.error
    try:
        return decode(body)
    except error as e:
        raise ValueError(f"decompress: corrupt {method} stream ({e})") from e


def compress(data: bytes, method: str, shuffle_width: int = 0) -> bytes:
    """Header + `data` (optionally byte-shuffled by `shuffle_width`) compressed with `method`, one of
    METHODS: "brotli" (quality 11, lgwin 24), "lzma" (preset 9 | extreme), "zlib" (level 9), "none"."""
    if method not in METHODS:
        raise ValueError(f"compress: method must be one of {METHODS}, got {method!r}")
    _check_width(shuffle_width, "compress", allow_zero=True)
    raw = bytes(data)
    src = shuffle(raw, shuffle_width) if shuffle_width > 1 else raw
    pieces = [src[i : i + CHUNK_BYTES] for i in range(0, len(src), CHUNK_BYTES)] or [b""]
    with ThreadPoolExecutor(min(len(pieces), os.cpu_count() or 1)) as pool:
        bodies = list(pool.map(lambda piece: _encode(method, piece), pieces))
    lengths = b"".join(_LENGTH.pack(len(b)) for b in bodies)
    return _HEADER.pack(MAGIC, METHODS.index(method), shuffle_width, len(raw), len(bodies)) + lengths + b"".join(bodies)


def decompress(blob: bytes) -> bytes:
    """Inverse of compress. Raises ValueError on a damaged or foreign blob."""
    blob = bytes(blob)
    if len(blob) < _HEADER.size:
        raise ValueError(f"decompress: {len(blob)} bytes is shorter than the {_HEADER.size}-byte header (truncated?)")
    magic, method_id, width, raw_len, n_chunks = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise ValueError(f"decompress: bad magic {magic!r}, expected {MAGIC!r} (not a compress() blob)")
    if method_id >= len(METHODS):
        raise ValueError(f"decompress: unknown method id {method_id}, known ids 0..{len(METHODS) - 1} {METHODS}")
    method = METHODS[method_id]
    start = _HEADER.size + n_chunks * _LENGTH.size
    if n_chunks == 0 or len(blob) < start:
        raise ValueError(f"decompress: header says {n_chunks} chunks but the blob has {len(blob)} bytes (truncated?)")
    lengths = [_LENGTH.unpack_from(blob, _HEADER.size + i * _LENGTH.size)[0] for i in range(n_chunks)]
    if start + sum(lengths) != len(blob):
        raise ValueError(f"decompress: chunks total {start + sum(lengths)} bytes, the blob has {len(blob)} (truncated?)")
    offsets = [start + sum(lengths[:i]) for i in range(n_chunks)]
    with ThreadPoolExecutor(min(n_chunks, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(lambda i: _decode(method, blob[offsets[i] : offsets[i] + lengths[i]]), range(n_chunks)))
    raw = b"".join(parts)
    if len(raw) != raw_len:
        raise ValueError(f"decompress: {method} stream decoded to {len(raw)} bytes, header says {raw_len}")
    return unshuffle(raw, width) if width > 1 else raw
