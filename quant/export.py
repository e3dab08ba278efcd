"""The record export (SPEC.md section 5, Quantization and Packing): a state dict -> one compressed,
pickle-free blob, and back.

Every tensor gets a class (tensor_class) that decides how it is stored:
  attn, mlp, embed, matrix   int-b codes (matrix_bits; embed_bits for the tied embedding) with one
                             fp16 scale per row, k * row std / qmax (SD-clip, k per class; a wider
                             clip is a coarser grid and fewer bytes). With a Hessian the codes come
                             from GPTQ or round-to-nearest, whichever has the lower output error
                             (GPTQ can lose where the clip saturates many entries); without one, RTN.
                             Tensors with more than 2 dims ([E, out, in] experts) are quantized as E
                             matrices. The top_k 2-D matrices by error get a rank-r LQER correction.
  gate                       small 2-D gate matrices: int8 per row, absmax scale (a dozen values per
                             row have no outliers worth clipping, and the gates are sensitive).
  small                      other float tensors: fp16 (bf16 stays bf16; fp32 if out of fp16 range).
  raw                        non-float tensors, as they are.

The container (quant/serialize.py) holds uint8 arrays (raw tensors keep their dtype): codes one byte
per value for int6/int7 (brotli models bytes; see quant/intk.py), dense bit packing for int2/int4,
every fp16 array byte-shuffled (quant/compress.py). pack() writes the arrays grouped by role
(ROLE_ORDER): under lzma/zlib that beats tensor by tensor, under brotli it is a wash (measured in
ROLE_ORDER's comment). unpack() rebuilds from the JSON meta and raw bytes only.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from quant.artifact import ARTIFACT_CAP, ArtifactTooLarge
from quant.compress import METHODS, compress, decompress, shuffle, unshuffle
from quant.gptq import dequantize, gptq_quantize, quant_error, rtn_quantize
from quant.intk import decode_intk, encode_intk
from quant.lqer import dequantize_lqer, quantize_lqer
from quant.serialize import deserialize, serialize

FORMAT = "golf-export/1"
CLASSES = ("attn", "mlp", "embed", "matrix", "gate", "small", "raw")
QUANTIZED = ("attn", "mlp", "embed", "matrix")
_ATTN = re.compile(r"blocks\.\d+\.attn\.(c_q|c_k|c_v|proj)\.weight")
_MLP = re.compile(r"blocks\.\d+\.mlp\.(fc|proj)\.weight")
_EMBED = "tok_emb.weight"
_LAYER = re.compile(r"blocks\.(\d+)\.")
# Array roles in the order pack() writes them. Measured on two 150-step CPU models (logs/cpu_20261123_
# 204407 and _200453: 855K params, every matrix over 1024 values quantized, 884 KB serialized, codes
# 96% of it), role order vs tensor by tensor: brotli 393,119 vs 393,448 and 395,201 vs 394,427 bytes
# (a wash: +-0.2%), lzma 404,858 vs 424,842 and 405,729 vs 425,126 (-4.7%), zlib 452,105 vs
# 458,107 and 452,664 vs 458,863 (-1.3%). Other variants under brotli (state order within a role,
# embedding first, scales/small first, scales next to their class's codes, all scales as one
# shuffled array) moved it by at most 0.15%.
ROLE_ORDER = ("codes:attn", "codes:mlp", "codes:embed", "codes:matrix", "codes:gate", "scales", "lqer", "small", "raw")
ORDERS = ("role", "tensor")
_SEP = "|"  # array name = tensor name + _SEP + part; parameter names never contain it
_FIT_CLIP_FACTOR = 1.04


class ArtifactDamaged(ValueError):
    """A blob that does not decode to an intact export (bad header, stream, checksum or meta)."""


@dataclass(frozen=True)
class QuantSettings:
    matrix_bits: int = 6
    embed_bits: int = 7
    attn_clip_sigmas: float = 13.0
    mlp_clip_sigmas: float = 11.5
    embed_clip_sigmas: float = 14.0
    matrix_clip_sigmas: float = 12.85
    gate_bits: int = 8
    small_numel: int = 65_536  # tensors with at most this many values are stored as floats (gates excepted)
    lqer_enabled: bool = True
    lqer_rank: int = 4
    lqer_top_k: int = 3
    lqer_group: int = 64
    compressor: str = "brotli"
    gptq: bool = True  # False: round-to-nearest only, the floor GPTQ has to beat
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    # False: clip = k * row std as in the public records, so the clips set the artifact size. True:
    # also cap it at the row's max |w| (quant/gptq.py's default). On the 150-step CPU model every row's
    # max is 2.8-5 std, so with the cap every k above 5 is inert: brotli 600,200 vs 390,946 bytes
    # (mean relative error 4.3% vs 17.7%), and widening the clips cannot shrink anything.
    clip_cap_at_row_max: bool = False

    def __post_init__(self) -> None:
        for f in ("matrix_bits", "embed_bits", "gate_bits"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
                raise ValueError(f"QuantSettings.{f}={v!r}: expected an int in 2..8")
        for f in ("attn_clip_sigmas", "mlp_clip_sigmas", "embed_clip_sigmas", "matrix_clip_sigmas", "damp"):
            if not getattr(self, f) > 0:
                raise ValueError(f"QuantSettings.{f}={getattr(self, f)!r}: expected > 0")
        for f, lo in (("small_numel", 0), ("lqer_rank", 1), ("lqer_top_k", 0), ("lqer_group", 1), ("block_size", 1)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"QuantSettings.{f}={v!r}: expected an int >= {lo}")
        if self.compressor not in METHODS:
            raise ValueError(f"QuantSettings.compressor={self.compressor!r}: expected one of {METHODS}")

    def bits(self, cls: str) -> int:
        return {"embed": self.embed_bits, "gate": self.gate_bits}.get(cls, self.matrix_bits)

    def clip(self, cls: str) -> float:
        return getattr(self, f"{cls}_clip_sigmas")

    def wider_clips(self, factor: float) -> "QuantSettings":
        """A copy with every SD-clip multiplied by factor (a wider clip is a coarser grid: fewer bytes)."""
        return dataclasses.replace(self, **{f"{c}_clip_sigmas": self.clip(c) * factor for c in QUANTIZED})


@dataclass
class QuantizedModel:
    """What pack() stores plus what the log reports.

    arrays: array name -> CPU tensor (uint8, or the raw tensor's own dtype); roles: array name -> role
    (ROLE_ORDER); meta: the JSON that rebuilds every tensor from the arrays (stored in the blob);
    report: tensor name -> facts for logs and tests (not stored); lqer: LQER tensors, largest error first."""
    arrays: dict[str, torch.Tensor]
    roles: dict[str, str]
    meta: dict[str, Any]
    report: dict[str, dict[str, Any]]
    lqer: list[str]


def tensor_class(name: str, t: torch.Tensor, small_numel: int = QuantSettings.small_numel) -> str:
    """One of CLASSES (see the module docstring). A matrix needs >= 2 dims, >= 2 columns (the SD-clip
    needs a row std) and more than small_numel values; the names only pick its bits and clip."""
    if not t.is_floating_point():
        return "raw"
    big = t.dim() >= 2 and t.shape[-1] >= 2 and t.numel() > small_numel
    if not big:
        return "gate" if t.dim() == 2 and "gate" in name and t.numel() > 0 else "small"
    if _ATTN.fullmatch(name):
        return "attn"
    if _MLP.fullmatch(name):
        return "mlp"
    return "embed" if name == _EMBED else "matrix"


# ----------------------------------------------------------------------------- byte helpers
_STORE = {"float16": ("<f2", torch.float16), "bfloat16": ("<i2", torch.bfloat16), "float32": ("<f4", torch.float32)}


def _shuffled(t: torch.Tensor) -> torch.Tensor:
    """Float tensor -> uint8 bytes, byte-shuffled by its element size (exponent bytes together)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    arr = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    return torch.from_numpy(np.frombuffer(shuffle(raw, t.element_size()), dtype=np.uint8).copy())


def _unshuffled(data: torch.Tensor, store: str) -> torch.Tensor:
    """Inverse of _shuffled: 1-D tensor of the `store` dtype."""
    if store not in _STORE or data.dtype != torch.uint8:
        raise ValueError(f"expected uint8 bytes of a {tuple(_STORE)} array, got {data.dtype} as {store!r}")
    np_dtype, torch_dtype = _STORE[store]
    width = np.dtype(np_dtype).itemsize
    if data.numel() % width:
        raise ValueError(f"{data.numel()} bytes is not a whole number of {store} values")
    arr = np.frombuffer(unshuffle(data.numpy().tobytes(), width), dtype=np_dtype)
    t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    return t.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else t


def _layout(bits: int) -> str:
    # quant/intk.py: one byte per value compresses best for int3/5/6/7 under brotli, packing for int2/4
    return "packed" if bits in (2, 4) else "int8"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _absmax_rows(W: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int-b codes and fp16 per-row scales max|w| / qmax (the gates' quantizer: no clipping)."""
    qmax = 2 ** (bits - 1) - 1
    scale = (W.abs().amax(dim=-1) / qmax).clamp_min(2.0 ** -24).to(torch.float16)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("a row's max |w| is beyond fp16's range")
    # rounding with the fp16 scale the decoder sees; its rounding down can push |w| / scale past qmax
    return torch.round(W / scale.float()[:, None]).clamp_(-qmax, qmax).to(torch.int8), scale


# ----------------------------------------------------------------------------- quantization
@dataclass
class _Matrix:
    """A tensor to quantize as B matrices [B, rows, cols] (B = 1 for 2-D; the experts of a 3-D one)."""
    cls: str
    W: torch.Tensor  # float32 [B, rows, cols]
    H: torch.Tensor | None  # float32 [B, cols, cols]


def _flat_hessian(name: str, H: torch.Tensor, W: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """H as [B, cols, cols] for W [B, rows, cols]: one [cols, cols] for the whole tensor, or one per
    matrix ([*leading dims, cols, cols])."""
    B, _, cols = W.shape
    if not isinstance(H, torch.Tensor) or H.shape[-2:] != (cols, cols) or H.shape[:-2] not in ((), tuple(shape[:-2])):
        got = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(f"quantize_state: Hessian of {name!r} has shape {got}, expected [{cols}, {cols}]"
                         + (f" or {list(shape[:-2]) + [cols, cols]}" if len(shape) > 2 else "")
                         + f" for the weight of shape {list(shape)}")
    H = H.detach().to(W.device, torch.float32)
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"quantize_state: Hessian of {name!r} has NaN or inf values")
    return H.reshape(-1, cols, cols).expand(B, cols, cols)


def _errors(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None) -> dict[str, float]:
    """quant_error (H-weighted, summed over the matrices) when H exists, the squared Frobenius error,
    the relative error ||W - W_hat|| / ||W||, and `score`, the one LQER ranks by."""
    fro2 = float((W - W_hat).square().sum())
    norm2 = float(W.square().sum())
    out = {"fro_error": fro2, "rel_error": math.sqrt(fro2 / norm2) if norm2 > 0 else 0.0}
    if H is not None:
        out["quant_error"] = float(quant_error(W, W_hat, H).sum())
    out["score"] = out.get("quant_error", fro2)
    return out


def _quantize_group(names: list[str], mats: dict[str, _Matrix], qs: QuantSettings):
    """Codes, scales and method per tensor of one (class, shape) group, in one batched GPTQ call.
    Returns {name: (q [B, rows, cols], scale [B, rows], method, gptq_error, rtn_error)}."""
    cls = mats[names[0]].cls
    bits, clip = qs.bits(cls), qs.clip(cls)
    sizes = [mats[n].W.shape[0] for n in names]
    W = torch.cat([mats[n].W for n in names])
    q_rtn, s_rtn = rtn_quantize(W, bits, clip, cap_at_max=qs.clip_cap_at_row_max)
    if mats[names[0]].H is None:
        return {n: (q, s, "rtn", None, None) for n, q, s in zip(names, q_rtn.split(sizes), s_rtn.split(sizes))}
    H = torch.cat([mats[n].H for n in names])
    e_rtn = quant_error(W, dequantize(q_rtn, s_rtn), H)
    if qs.gptq:
        try:
            q_g, s_g = gptq_quantize(W, H, bits, clip, damp=qs.damp, block_size=qs.block_size,
                                     act_order=qs.act_order, cap_at_max=qs.clip_cap_at_row_max)
        except ValueError as e:
            raise ValueError(f"quantize_state: GPTQ failed for {names}: {e}") from e
        e_g = quant_error(W, dequantize(q_g, s_g), H)
    out = {}
    for i, n in enumerate(names):
        sl = slice(sum(sizes[:i]), sum(sizes[: i + 1]))
        rtn_err = float(e_rtn[sl].sum())
        if not qs.gptq:
            out[n] = (q_rtn[sl], s_rtn[sl], "rtn", None, rtn_err)
            continue
        gptq_err = float(e_g[sl].sum())
        # per tensor the lower output error wins; a tie keeps RTN, the simpler of the two
        q, s, method = (q_g[sl], s_g[sl], "gptq") if gptq_err < rtn_err else (q_rtn[sl], s_rtn[sl], "rtn")
        out[n] = (q, s, method, gptq_err, rtn_err)
    return out


def quantize_state(state: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor] | None = None,
                   qs: QuantSettings = QuantSettings()) -> QuantizedModel:
    """Quantizes a state dict (see the module docstring). hessians: weight name -> E[x x^T] of its
    inputs ([cols, cols], or [E, cols, cols] per expert), e.g. HessianCollector.hessians()."""
    hessians = dict(hessians or {})
    unknown = sorted(set(hessians) - set(state))
    if unknown:
        raise ValueError(f"quantize_state: Hessians given for {unknown}, which are not in the state dict")
    qm = QuantizedModel(arrays={}, roles={}, meta={"format": FORMAT, "tensors": {}}, report={}, lqer=[])
    entries = qm.meta["tensors"]

    def put(name: str, part: str, role: str, value: torch.Tensor) -> None:
        key = f"{name}{_SEP}{part}"
        if key in qm.arrays:
            raise ValueError(f"quantize_state: array {key!r} of tensor {name!r} collides with another tensor's")
        qm.arrays[key], qm.roles[key] = value.detach().cpu().contiguous(), role

    mats: dict[str, _Matrix] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"quantize_state: {name!r} is a {type(t).__name__}, expected a torch.Tensor")
        if _SEP in name:
            raise ValueError(f"quantize_state: tensor name {name!r} contains {_SEP!r}, which array names use")
        t = t.detach()
        cls = tensor_class(name, t, qs.small_numel)
        entries[name] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}  # kind etc. filled in below
        qm.report[name] = {"class": cls, "shape": list(t.shape)}
        if cls in QUANTIZED or cls == "gate":
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"quantize_state: tensor {name!r} ({cls}) has NaN or inf values")
        if cls in QUANTIZED:
            W = t.float().reshape(-1, *t.shape[-2:])
            H = _flat_hessian(name, hessians[name], W, tuple(t.shape)) if name in hessians else None
            mats[name] = _Matrix(cls, W, H)
        elif cls == "gate":
            bits = qs.gate_bits
            try:
                q, s = _absmax_rows(t.float(), bits)
            except ValueError as e:
                raise ValueError(f"quantize_state: gate {name!r}: {e}") from None
            put(name, "q", "codes:gate", encode_intk(q.cpu(), bits, _layout(bits)))
            put(name, "s", "scales", _shuffled(s))
            entries[name].update(kind="q", bits=bits, layout=_layout(bits))
            qm.report[name].update(bits=bits, clip=None, method="absmax", **_errors(t.float(), dequantize(q, s), None))
        elif cls == "small":
            store = "bfloat16" if t.dtype == torch.bfloat16 else "float16"
            if store == "float16" and bool((torch.isinf(t.half()) & torch.isfinite(t)).any()):
                store = "float32"  # beyond fp16's range: keep it exact rather than turn it into inf
            put(name, "f", "small", _shuffled(t.to(_STORE[store][1])))
            entries[name].update(kind="float", store=store)
            qm.report[name].update(bits=8 * _STORE[store][1].itemsize, method=store)
        else:
            put(name, "r", "raw", t)
            entries[name].update(kind="raw")
            qm.report[name].update(method="raw")

    # one batched call per (class, matrix shape, has Hessian): e.g. every layer's c_q together
    groups: dict[tuple, list[str]] = {}
    for name, m in mats.items():
        groups.setdefault((m.cls, tuple(m.W.shape[-2:]), m.H is not None), []).append(name)
    W_hat: dict[str, torch.Tensor] = {}
    for names in groups.values():
        for name, (q, s, method, gptq_err, rtn_err) in _quantize_group(names, mats, qs).items():
            m, bits = mats[name], qs.bits(mats[name].cls)
            W_hat[name] = dequantize(q, s)
            put(name, "q", f"codes:{m.cls}", encode_intk(q.cpu(), bits, _layout(bits)))
            put(name, "s", "scales", _shuffled(s))
            entries[name].update(kind="q", bits=bits, layout=_layout(bits))
            qm.report[name].update(bits=bits, clip=qs.clip(m.cls), method=method, gptq_error=gptq_err,
                                   rtn_error=rtn_err, lqer=False, **_errors(m.W, W_hat[name], m.H))

    if qs.lqer_enabled and qs.lqer_top_k > 0:
        _add_lqer(qm, mats, W_hat, qs, put)
    for name in qm.report:
        qm.report[name]["bytes"] = sum(a.numel() * a.element_size() for k, a in qm.arrays.items()
                                       if k.rsplit(_SEP, 1)[0] == name)
    return qm


def _add_lqer(qm: QuantizedModel, mats: dict[str, _Matrix], W_hat: dict[str, torch.Tensor],
              qs: QuantSettings, put: Callable) -> None:
    """Rank-r corrections for the top_k 2-D matrices by error (H-weighted where a Hessian exists).
    A correction that does not lower its tensor's error (the int2/int4 factors are coarse) is skipped
    and the next tensor in the ranking is tried."""
    r = qs.lqer_rank
    candidates = [n for n, m in mats.items() if len(qm.meta["tensors"][n]["shape"]) == 2 and min(m.W.shape[-2:]) >= r]
    candidates.sort(key=lambda n: -qm.report[n]["score"])
    for name in candidates:
        if len(qm.lqer) == qs.lqer_top_k:
            break
        m, before = mats[name], qm.report[name]
        W, W0 = m.W[0], W_hat[name][0]
        parts = quantize_lqer(W - W0, r, qs.lqer_group)
        after = _errors(m.W, (W0 + dequantize_lqer(parts).to(W0.device))[None], m.H)
        if not after["score"] < before["score"]:
            continue
        put(name, "la", "lqer", encode_intk(parts["a_q"], 2, "packed"))
        put(name, "lb", "lqer", encode_intk(parts["b_q"], 4, "packed"))
        put(name, "ls", "lqer", _shuffled(torch.cat([parts["a_scale"].reshape(1), parts["b_scale"].reshape(-1)])))
        qm.meta["tensors"][name]["lqer"] = {"rank": r, "group": qs.lqer_group}
        before.update(lqer=True, before_lqer={k: before[k] for k in after}, **after)
        qm.lqer.append(name)


def lqer_bytes(qm: QuantizedModel) -> int:
    """An upper bound on what dropping all of qm's LQER corrections saves: their arrays uncompressed,
    plus 512 bytes each for their array headers and meta entries."""
    raw = sum(qm.arrays[f"{name}{_SEP}{p}"].numel() for name in qm.lqer for p in ("la", "lb", "ls"))
    return raw + 512 * len(qm.lqer)


def drop_last_lqer(qm: QuantizedModel) -> QuantizedModel:
    """A copy of qm without its lowest-ranked LQER correction (no re-quantization needed)."""
    if not qm.lqer:
        raise ValueError("drop_last_lqer: the model has no LQER corrections")
    name = qm.lqer[-1]
    keys = {f"{name}{_SEP}{p}" for p in ("la", "lb", "ls")}
    tensors = dict(qm.meta["tensors"])
    tensors[name] = {k: v for k, v in tensors[name].items() if k != "lqer"}
    report = dict(qm.report)
    entry = {k: v for k, v in report[name].items() if k != "before_lqer"}
    entry.update(report[name]["before_lqer"], lqer=False)
    entry["bytes"] -= sum(qm.arrays[k].numel() for k in keys)
    report[name] = entry
    return QuantizedModel(arrays={k: v for k, v in qm.arrays.items() if k not in keys},
                          roles={k: v for k, v in qm.roles.items() if k not in keys},
                          meta={**qm.meta, "tensors": tensors}, report=report, lqer=qm.lqer[:-1])


# ----------------------------------------------------------------------------- decoding
def _rebuild_one(name: str, e: Mapping[str, Any], arrays: Mapping[str, torch.Tensor]) -> torch.Tensor:
    shape, dtype, kind = tuple(e["shape"]), _dtype_from_name(e["dtype"]), e["kind"]
    get = lambda part: arrays[f"{name}{_SEP}{part}"]
    if kind == "raw":
        t = get("r")
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"stored as {t.dtype} {tuple(t.shape)}, meta says {dtype} {shape}")
        return t
    if kind == "float":
        return _unshuffled(get("f"), e["store"]).reshape(shape).to(dtype)
    if kind != "q":
        raise ValueError(f"unknown kind {kind!r}")
    cols = shape[-1]
    q = decode_intk(get("q"), e["bits"], math.prod(shape), e["layout"]).reshape(-1, cols)
    W = dequantize(q, _unshuffled(get("s"), "float16"))
    if "lqer" in e:
        rank, group = e["lqer"]["rank"], e["lqer"]["group"]
        rows, groups = shape[0], -(-cols // group)
        scales = _unshuffled(get("ls"), "float16")
        if scales.numel() != 1 + rank * groups:
            raise ValueError(f"LQER scales: {scales.numel()} values, expected {1 + rank * groups}")
        W = W + dequantize_lqer({
            "a_q": decode_intk(get("la"), 2, rows * rank, "packed").reshape(rows, rank), "a_scale": scales[0],
            "b_q": decode_intk(get("lb"), 4, rank * cols, "packed").reshape(rank, cols),
            "b_scale": scales[1:].reshape(rank, groups), "shape": [rows, cols], "rank": rank, "group": group})
    return W.reshape(shape).to(dtype)


def _rebuild(arrays: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT or not isinstance(meta.get("tensors"), Mapping):
        raise ArtifactDamaged(f"unpack: meta is not a {FORMAT!r} export")
    out = {}
    for name, e in meta["tensors"].items():
        try:
            out[name] = _rebuild_one(name, e, arrays)
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactDamaged(f"unpack: tensor {name!r} cannot be rebuilt: {err!r}") from err
    return out


def dequantize_model(qm: QuantizedModel) -> dict[str, torch.Tensor]:
    """The state dict unpack(pack(qm)) returns, computed from qm in memory."""
    return _rebuild(qm.arrays, qm.meta)


# ----------------------------------------------------------------------------- packing
def ordered_arrays(qm: QuantizedModel, order: str = "role") -> dict[str, torch.Tensor]:
    """qm's arrays in the order pack() writes them: "role" (ROLE_ORDER; within a role, one kind of
    tensor across layers, then the next: every c_q, then every c_k, ...) or "tensor" (each tensor's
    arrays together, in state-dict order)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    rank = {name: i for i, name in enumerate(qm.meta["tensors"])}

    def key(k: str) -> tuple:
        name = k.rsplit(_SEP, 1)[0]
        if order == "tensor":
            return (rank[name],)
        layer = _LAYER.search(name)  # blocks.0.attn.c_q, blocks.1.attn.c_q, ... then blocks.*.attn.c_k
        return (ROLE_ORDER.index(qm.roles[k]), _LAYER.sub("blocks.*.", name), int(layer[1]) if layer else 0, rank[name])

    return {k: qm.arrays[k] for k in sorted(qm.arrays, key=key)}  # stable: a tensor's parts keep their order


def pack(qm: QuantizedModel, compressor: str = "brotli", order: str = "role") -> bytes:
    """The model half of the artifact: serialize (pickle-free, sha256) + compress."""
    return compress(serialize(ordered_arrays(qm, order), qm.meta), compressor)


def unpack(blob: bytes) -> dict[str, torch.Tensor]:
    """Dequantized state dict (original names, order, dtypes, shapes, LQER applied) from pack()'s
    bytes. Reads JSON and raw arrays only; raises ArtifactDamaged on any damage."""
    try:
        arrays, meta = deserialize(decompress(blob))
    except ValueError as e:  # compress header/stream/length, or the container's sha256
        raise ArtifactDamaged(f"unpack: damaged or foreign artifact: {e}") from e
    return _rebuild(arrays, meta)


# ----------------------------------------------------------------------------- budget
def fit_to_budget(state: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor] | None,
                  qs: QuantSettings, code_bytes: int, cap: int = ARTIFACT_CAP, log: Callable[[str], Any] = print,
                  max_steps: int = 40) -> tuple[bytes, QuantSettings, list[dict], QuantizedModel, bytes]:
    """Quantize and pack; while code + model bytes exceed cap, first drop LQER corrections one at a
    time (lowest-ranked first; no re-quantization) if together they are at least the overshoot, then
    widen every SD-clip by 1.04x per step (coarser grid, fewer bytes; re-quantizes). Returns (blob, settings used, steps, the packed
    QuantizedModel, the first blob: the unfitted export, whose score gives the fitter's cost); raises
    ArtifactTooLarge, saying by how many bytes, if it does not fit after max_steps changes."""
    qm = quantize_state(state, hessians, qs)
    blob = first = pack(qm, qs.compressor)
    steps: list[dict] = []
    clip_scale = 1.0

    def record(change: str) -> None:
        total = code_bytes + len(blob)
        steps.append({"step": len(steps), "change": change, "model_bytes": len(blob), "total_bytes": total,
                      "over_by": max(total - cap, 0), "lqer_top_k": qs.lqer_top_k, "clip_scale": clip_scale})
        log(f"export_fit step:{len(steps) - 1} {change} model:{len(blob)} total:{total} cap:{cap} "
            + (f"over:{total - cap}" if total > cap else "fits"))

    record("initial")
    # decided once: drop corrections only if all of them could close the initial overshoot
    may_drop = lqer_bytes(qm) >= code_bytes + len(blob) - cap
    while code_bytes + len(blob) > cap:
        if len(steps) > max_steps:
            over = code_bytes + len(blob) - cap
            raise ArtifactTooLarge(f"fit_to_budget: still {over} bytes over the {cap}-byte cap after {max_steps} "
                                   f"steps (code {code_bytes} + model {len(blob)} bytes; clips at "
                                   f"{clip_scale:.3f}x, LQER top_k {qs.lqer_top_k})")
        if qm.lqer and may_drop:
            dropped = qm.lqer[-1]
            qm = drop_last_lqer(qm)
            qs = dataclasses.replace(qs, lqer_top_k=len(qm.lqer))
            change = f"drop_lqer:{dropped} lqer_top_k:{qs.lqer_top_k}"
        else:
            # the corrections left stay (qs must say how many): when even all of them are fewer bytes
            # than the overshoot, dropping them would cost their accuracy and still need wider clips
            qs = dataclasses.replace(qs.wider_clips(_FIT_CLIP_FACTOR), lqer_top_k=len(qm.lqer))
            clip_scale *= _FIT_CLIP_FACTOR
            qm = quantize_state(state, hessians, qs)
            change = f"clips_x{clip_scale:.4f}"
        blob = pack(qm, qs.compressor)
        record(change)
    return blob, qs, steps, qm, first


# ----------------------------------------------------------------------------- report
def describe(qm: QuantizedModel) -> list[str]:
    """Log lines: per class the tensors, bits, clip, bytes before compression and GPTQ/RTN wins; then
    the LQER tensors with their error before and after."""
    lines = []
    for cls in CLASSES:
        rows = [r for r in qm.report.values() if r["class"] == cls]
        if not rows:
            continue
        nbytes = sum(r["bytes"] for r in rows)
        line = f"export class:{cls} tensors:{len(rows)} bytes:{nbytes}"
        if cls in QUANTIZED:
            wins = sum(r["method"] == "gptq" for r in rows)
            err = sum(r["rel_error"] for r in rows) / len(rows)
            line += (f" bits:{rows[0]['bits']} clip:{rows[0]['clip']:.3f} gptq:{wins} rtn:{len(rows) - wins}"
                     f" mean_rel_error:{err:.4g}")
        elif cls == "gate":
            line += f" bits:{rows[0]['bits']} absmax"
        elif cls == "small":
            stores = sorted({r["method"] for r in rows})
            line += f" as:{','.join(stores)}"
        lines.append(line)
    for name in qm.lqer:
        r = qm.report[name]
        lines.append(f"export lqer:{name} rank:{qm.meta['tensors'][name]['lqer']['rank']} "
                     f"score:{r['before_lqer']['score']:.4g}->{r['score']:.4g}")
    return lines
