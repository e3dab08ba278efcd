"""The naive baseline's export: int8 per-row weights + zlib (SPEC.md section 5).

Per float tensor of a state dict:
  - numel > 65,536 and 2-D: int8 per row, symmetric. clip = the 99.99984th percentile of |w| in the
    row, scale = clip / 127 stored as fp16, q = round(clamp(w, -clip, clip) / scale).
  - numel > 65,536 and not 2-D: the same with one scale for the whole tensor.
  - numel <= 65,536: fp16, except names containing a `keep_fp32` marker ("scale", "gain", "mix",
    "skip" by default): these control scalars are few bytes but sensitive, so they stay fp32.
Non-float tensors are stored as they are. dequantize() restores original dtypes and shapes.
"""
from __future__ import annotations

import zlib
from typing import Any, Iterable, Mapping

import torch

from quant.serialize import deserialize, serialize

FORMAT = "int8_row_zlib/1"
KEEP_FP32 = ("scale", "gain", "mix", "skip")
MAX_SMALL_NUMEL = 65_536
CLIP_PERCENTILE = 99.99984
# Smallest positive fp16 (subnormal): a scale below it would round to 0 and erase the row.
_MIN_SCALE = 2.0 ** -24


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"int8 artifact: unknown original dtype {name!r} in meta")
    return dtype


def _row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile (0..1) with linear interpolation, like torch.quantile but without its
    input-size limit; kthvalue avoids sorting whole rows."""
    n = x.shape[1]
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = x.kthvalue(lo + 1, dim=1).values
    v_hi = x.kthvalue(hi + 1, dim=1).values if hi != lo else v_lo
    return v_lo + (pos - lo) * (v_hi - v_lo)


def quantize_rows(w: torch.Tensor, clip_percentile: float = CLIP_PERCENTILE) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values (same shape as the 2-D `w`) and fp16 per-row scales."""
    w = w.float()
    clip = _row_quantile(w.abs(), clip_percentile / 100.0)
    scale = (clip / 127.0).clamp_min(_MIN_SCALE).to(torch.float16)
    # Quantize with the fp16-rounded scale the decoder will use; rounding the scale down can push
    # |w|/scale just past 127, hence the final clamp.
    clipped = torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None])
    q = torch.round(clipped / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_state_dict(
    sd: Mapping[str, torch.Tensor],
    keep_fp32: Iterable[str] = KEEP_FP32,
    max_small_numel: int = MAX_SMALL_NUMEL,
    clip_percentile: float = CLIP_PERCENTILE,
) -> dict[str, Any]:
    """{"arrays": name -> tensor to store, "meta": JSON description}; the input is not modified."""
    keep_fp32 = tuple(keep_fp32)
    arrays: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []

    def put(key: str, value: torch.Tensor) -> None:
        if key in arrays or (key != name and key in sd):
            raise ValueError(f"quantize_state_dict: stored key {key!r} collides with another tensor's name")
        arrays[key] = value.detach().cpu().contiguous()

    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"quantize_state_dict: {name!r} is a {type(t).__name__}, expected a torch.Tensor")
        t = t.detach()
        entry = {"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        if not t.is_floating_point():
            entry["kind"] = "raw"
            put(name, t)
        elif not bool(torch.isfinite(t).all()):
            raise ValueError(f"quantize_state_dict: tensor {name!r} has NaN or inf values; refusing to export")
        elif t.numel() <= max_small_numel:
            keep = any(marker in name for marker in keep_fp32)
            entry["kind"] = "fp32" if keep else "fp16"
            put(name, t.float() if keep else t.half())
        else:
            rows = t if t.dim() == 2 else t.reshape(1, -1)
            q, scale = quantize_rows(rows, clip_percentile)
            entry["kind"] = "int8_row" if t.dim() == 2 else "int8_tensor"
            put(name + "#q", q.reshape(t.shape))
            put(name + "#scale", scale)
        entries.append(entry)
    meta = {
        "format": FORMAT,
        "clip_percentile": clip_percentile,
        "max_small_numel": max_small_numel,
        "keep_fp32": list(keep_fp32),
        "tensors": entries,
    }
    return {"arrays": arrays, "meta": meta}


def dequantize(quantized: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """State dict (original names, order, dtypes, shapes) from quantize_state_dict's output."""
    arrays, meta = quantized["arrays"], quantized["meta"]
    if meta.get("format") != FORMAT:
        raise ValueError(f"dequantize: meta format {meta.get('format')!r}, expected {FORMAT!r}")
    out: dict[str, torch.Tensor] = {}
    for e in meta["tensors"]:
        name, kind, shape, dtype = e["name"], e["kind"], tuple(e["shape"]), _dtype_from_name(e["dtype"])
        try:
            if kind in ("raw", "fp16", "fp32"):
                t = arrays[name]
            elif kind in ("int8_row", "int8_tensor"):
                q, scale = arrays[name + "#q"], arrays[name + "#scale"]
                rows = q.reshape(scale.numel(), -1).float()
                t = rows * scale.float()[:, None]
            else:
                raise ValueError(f"dequantize: tensor {name!r} has unknown kind {kind!r}")
        except KeyError as e_missing:
            raise ValueError(f"dequantize: arrays for tensor {name!r} (kind {kind}) missing: {e_missing}") from None
        out[name] = t.to(dtype).reshape(shape)
    return out


def pack_int8(sd: Mapping[str, torch.Tensor], **options) -> bytes:
    """The artifact's model bytes: quantize, serialize (no pickle), zlib level 9."""
    q = quantize_state_dict(sd, **options)
    return zlib.compress(serialize(q["arrays"], q["meta"]), 9)


def unpack_int8(blob: bytes) -> dict[str, torch.Tensor]:
    """Inverse of pack_int8: the dequantized state dict."""
    try:
        raw = zlib.decompress(blob)
    except zlib.error as e:
        raise ValueError(f"unpack_int8: model bytes are not a valid zlib stream ({e})") from e
    arrays, meta = deserialize(raw)
    return dequantize({"arrays": arrays, "meta": meta})
