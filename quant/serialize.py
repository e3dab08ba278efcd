"""A pickle-free container for named arrays, so loading an artifact can never execute code.

Layout (all integers little-endian):
    magic  b"GOLFTNSR"            8 bytes
    version                       uint32
    header_len, payload_len       uint64, uint64
    sha256(header + payload)      32 bytes
    header                        UTF-8 JSON: {"tensors": [{name, dtype, shape, offset, nbytes}], "meta": {...}}
    payload                       raw little-endian array bytes, one after another
The lengths come before the checksum so a short file is reported as truncated, not as corrupt.
bfloat16 is stored as its raw 16 bits; everything loads back bit for bit as torch tensors.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any, Mapping

import numpy as np
import torch

MAGIC = b"GOLFTNSR"
VERSION = 1
_PREFIX = struct.Struct("<8sIQQ32s")

# dtype name -> (little-endian storage dtype, torch dtype). bfloat16 has no numpy dtype: its bits
# travel as int16 and are reinterpreted on load.
DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "float32": ("<f4", torch.float32),
    "float16": ("<f2", torch.float16),
    "bfloat16": ("<i2", torch.bfloat16),
    "int8": ("i1", torch.int8),
    "uint8": ("u1", torch.uint8),
    "int16": ("<i2", torch.int16),
    "int32": ("<i4", torch.int32),
    "int64": ("<i8", torch.int64),
    "bool": ("?", torch.bool),
}
_TORCH_NAMES = {td: name for name, (_, td) in DTYPES.items()}
_NUMPY_NAMES = {np.dtype(sd).newbyteorder("="): name for name, (sd, _) in DTYPES.items() if name != "bfloat16"}


class SerializeError(ValueError):
    """A blob that is not a valid, intact tensor container."""


def _to_storage(name: str, value) -> tuple[str, np.ndarray]:
    """(dtype name, little-endian numpy array) for a tensor or array."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        dname = _TORCH_NAMES.get(t.dtype)
        if dname is None:
            raise TypeError(f"serialize: tensor {name!r} has dtype {t.dtype}; supported: {sorted(DTYPES)}")
        arr = t.view(torch.int16).numpy() if dname == "bfloat16" else t.numpy()
    elif isinstance(value, np.ndarray):
        arr = value
        dname = _NUMPY_NAMES.get(arr.dtype.newbyteorder("="))
        if dname is None:
            raise TypeError(f"serialize: array {name!r} has dtype {arr.dtype}; supported: {sorted(DTYPES)}")
    else:
        raise TypeError(f"serialize: {name!r} is a {type(value).__name__}, expected a torch.Tensor or numpy array")
    return dname, arr.astype(DTYPES[dname][0], copy=False)  # tobytes() writes C order


def serialize(tensors: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> bytes:
    """Packs named tensors/arrays plus a JSON-able `meta` dict into bytes (see module docstring)."""
    entries, chunks, offset = [], [], 0
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"serialize: tensor names must be non-empty strings, got {name!r}")
        dname, arr = _to_storage(name, value)
        raw = arr.tobytes()
        entries.append({"name": name, "dtype": dname, "shape": list(arr.shape), "offset": offset, "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    try:
        header = json.dumps({"tensors": entries, "meta": dict(meta or {})}, separators=(",", ":")).encode("utf-8")
    except TypeError as e:
        raise TypeError(f"serialize: meta must hold only JSON values (dict, list, str, number, bool, None): {e}") from e
    payload = b"".join(chunks)
    digest = hashlib.sha256(header + payload).digest()
    return _PREFIX.pack(MAGIC, VERSION, len(header), len(payload), digest) + header + payload


def deserialize(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of serialize: (name -> tensor, meta). Raises SerializeError on any damage."""
    blob = memoryview(blob).cast("B")
    if len(blob) < _PREFIX.size:
        raise SerializeError(f"deserialize: {len(blob)} bytes is shorter than the {_PREFIX.size}-byte prefix (truncated?)")
    magic, version, hlen, plen, digest = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise SerializeError(f"deserialize: bad magic {bytes(magic)!r}, expected {MAGIC!r} (not a tensor container)")
    if version != VERSION:
        raise SerializeError(f"deserialize: format version {version}, this code reads version {VERSION}")
    expected = _PREFIX.size + hlen + plen
    if len(blob) != expected:
        what = "truncated" if len(blob) < expected else "has trailing bytes"
        raise SerializeError(f"deserialize: blob {what}: header says {expected} bytes, got {len(blob)}")
    body = blob[_PREFIX.size:]
    if hashlib.sha256(body).digest() != digest:
        raise SerializeError("deserialize: sha256 checksum mismatch (corrupted header or payload)")
    header = json.loads(bytes(body[:hlen]).decode("utf-8"))
    payload = body[hlen:]
    out: dict[str, torch.Tensor] = {}
    for e in header["tensors"]:
        out[e["name"]] = _from_storage(e, payload)
    return out, header["meta"]


def _from_storage(e: Mapping[str, Any], payload: memoryview) -> torch.Tensor:
    name, dname, shape, off, nbytes = e["name"], e["dtype"], tuple(e["shape"]), e["offset"], e["nbytes"]
    if dname not in DTYPES:
        raise SerializeError(f"deserialize: tensor {name!r} has unknown dtype {dname!r}")
    sdtype, tdtype = DTYPES[dname]
    count = math.prod(shape)
    if count * np.dtype(sdtype).itemsize != nbytes or off < 0 or off + nbytes > len(payload):
        raise SerializeError(f"deserialize: tensor {name!r} entry (shape {shape}, offset {off}, {nbytes} bytes) "
                             f"does not fit its dtype or the {len(payload)}-byte payload")
    if count == 0:  # frombuffer rejects empty reads at the end of a buffer
        arr = np.empty(shape, dtype=sdtype)
    else:
        arr = np.frombuffer(payload, dtype=sdtype, count=count, offset=off).reshape(shape)
    # Copy into native byte order: torch needs writable native arrays.
    t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    return t.view(torch.bfloat16) if dname == "bfloat16" else t
