"""The challenge's shard format (SPEC.md section 2): 256 little-endian int32 header words
(magic 20240520, version 1, token count, zeros), then that many little-endian uint16 values.

Token shards and byte sidecars share the format. Reads are memory-mapped and validated, so a
corrupt or truncated file fails with its path and what was expected, never with garbage tokens.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
BOS_ID = 1


class ShardError(ValueError):
    """A shard file that does not match the challenge format."""


def read_header(path: str | os.PathLike) -> int:
    """Validates the header and file size of `path`; returns its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: magic {int(header[0])}, expected {MAGIC} (not a shard file?)")
    if header[1] != VERSION:
        raise ShardError(f"{path}: version {int(header[1])}, expected {VERSION}")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        raise ShardError(
            f"{path}: header says {n} tokens, so the file must be {expected} bytes, but it is {size}"
            + (" (truncated)" if size < expected else "")
        )
    return n


def load_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-maps a validated shard as a read-only uint16 array."""
    n = read_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def write_shard(path: str | os.PathLike, values: np.ndarray) -> None:
    """Writes `values` (ints in [0, 65535]) as a shard, atomically (temp file + rename)."""
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"{path}: shard values must be 1-D, got shape {values.shape}")
    if values.size and (values.min() < 0 or values.max() > 0xFFFF):
        raise ValueError(f"{path}: values must fit uint16, got range [{values.min()}, {values.max()}]")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, values.size
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(values.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)


def shard_paths(pattern: str) -> list[str]:
    """Sorted files matching a glob pattern; an error naming the pattern if there are none."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no shard files match {pattern}")
    return paths


def load_stream(pattern: str) -> np.ndarray:
    """All shards matching `pattern`, concatenated in name order (copied into memory)."""
    shards = [load_shard(p) for p in shard_paths(pattern)]
    return shards[0].copy() if len(shards) == 1 else np.concatenate(shards)


def split_documents(tokens: np.ndarray, bos_id: int = BOS_ID) -> list[np.ndarray]:
    """Splits a stream at BOS tokens; each document keeps its leading BOS."""
    starts = np.flatnonzero(tokens == bos_id)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    return np.split(tokens, starts[1:])
