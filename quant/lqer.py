"""LQER: a low-rank correction A_hat @ B_hat of a quantized matrix's residual E = W - W_hat
(SPEC.md section 5), added back to W_hat by the decoder.

The factors come from a truncated SVD with the singular values split evenly (A = U sqrt(S),
B = sqrt(S) V^T), so neither factor carries all the dynamic range. They compete for the same 16 MB as
the weights, so they are stored coarsely:
  - A [rows, rank]: int2 codes {-1, 0, 1} with ONE fp16 scale for the whole matrix;
  - B [rank, cols]: int4 codes [-7, 7] with an fp16 absmax scale per (row of B, group of `group`
    columns); a ragged last group is zero-padded for the scale computation only.
Codes are int8 tensors; store them with quant.intk.pack_bits(codes, A_BITS / B_BITS).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from quant.intk import qmax

A_BITS, B_BITS = 2, 4
GROUP = 64
# Smallest positive fp16 (subnormal): a scale below it would round to 0 and lose the codes.
_MIN_SCALE = 2.0 ** -24


def _check_residual(E: torch.Tensor, rank: int) -> torch.Tensor:
    if not isinstance(E, torch.Tensor) or E.dim() != 2 or not E.is_floating_point():
        what = f"{E.dtype} tensor of shape {tuple(E.shape)}" if isinstance(E, torch.Tensor) else type(E).__name__
        raise ValueError(f"lqer: expected a 2-D float residual E = W - W_hat, got a {what}")
    if not bool(torch.isfinite(E).all()):
        raise ValueError("lqer: residual has NaN or inf values")
    limit = min(E.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"lqer: rank must be an int in 1..{limit} (min of E's shape {tuple(E.shape)}), got {rank!r}")
    return E.detach().float().cpu()


def lqer_factors(E: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rows, rank], B [rank, cols]), float32, with A @ B the best rank-`rank` approximation of E
    and the singular values split evenly (column norms of A equal row norms of B)."""
    E = _check_residual(E, rank)
    # Exact SVD rather than svd_lowrank: it is deterministic (svd_lowrank draws from the global RNG)
    # and LQER is applied to only a few matrices (8192 x 512 takes about 3 s on 2 CPU cores).
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def _ternary_scale(a: torch.Tensor) -> float:
    """The scale s minimising ||a - s * t||^2 over s and ternary codes t in {-1, 0, 1}.

    For a support of k nonzero codes the k largest |a| are best (any other support has a smaller
    sum of |a| for the same count), and given that support the best s is their mean |a|, leaving an
    error of sum(a^2) - (sum of the top k |a|)^2 / k. So the exact optimum needs one sort and the
    k maximising prefix_sum(k)^2 / k, with no candidate grid to tune."""
    mags = a.abs().flatten().double().sort(descending=True).values
    prefix = mags.cumsum(0)
    counts = torch.arange(1, mags.numel() + 1, dtype=torch.float64)
    best = int(torch.argmax(prefix.square() / counts))
    return float(prefix[best] / counts[best])


def _fp16_scale(scale: torch.Tensor, who: str) -> torch.Tensor:
    scale16 = scale.clamp_min(_MIN_SCALE).to(torch.float16)
    if not bool(torch.isfinite(scale16).all()):
        raise ValueError(f"lqer: {who} scale exceeds the fp16 range (residual values too large)")
    return scale16


def _quantize_a(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int2 codes of A and its single fp16 scale (0-dim)."""
    m = qmax(A_BITS)
    scale = _fp16_scale(torch.tensor(_ternary_scale(A)), "A")
    # Rounding with the fp16 scale the decoder will see gives the best codes for that exact scale.
    q = torch.round(A / scale.float()).clamp_(-m, m).to(torch.int8)
    return q, scale


def _quantize_b(B: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 codes of B (same shape) and fp16 absmax scales [rank, ceil(cols / group)]."""
    m = qmax(B_BITS)
    rank, cols = B.shape
    groups = -(-cols // group)
    padded = F.pad(B, (0, groups * group - cols)).reshape(rank, groups, group)
    scale = _fp16_scale(padded.abs().amax(dim=-1) / m, "B")
    q = torch.round(padded / scale.float()[..., None]).clamp_(-m, m).to(torch.int8)
    return q.reshape(rank, groups * group)[:, :cols].contiguous(), scale


def quantize_lqer(E: torch.Tensor, rank: int, group: int = GROUP) -> dict[str, Any]:
    """Quantized rank-`rank` correction of the residual E: {"a_q": int8 [rows, rank] in {-1,0,1},
    "a_scale": fp16 0-dim, "b_q": int8 [rank, cols] in [-7, 7], "b_scale": fp16 [rank, ceil(cols/group)],
    "shape": [rows, cols], "rank": rank, "group": group}."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"quantize_lqer: group must be a positive int, got {group!r}")
    A, B = lqer_factors(E, rank)
    a_q, a_scale = _quantize_a(A)
    b_q, b_scale = _quantize_b(B, group)
    return {"a_q": a_q, "a_scale": a_scale, "b_q": b_q, "b_scale": b_scale,
            "shape": list(E.shape), "rank": rank, "group": group}


def dequantize_lqer(parts: Mapping[str, Any]) -> torch.Tensor:
    """float32 correction A_hat @ B_hat [rows, cols] from quantize_lqer's output."""
    try:
        a_q, a_scale, b_q, b_scale = parts["a_q"], parts["a_scale"], parts["b_q"], parts["b_scale"]
        (rows, cols), rank, group = parts["shape"], parts["rank"], parts["group"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"dequantize_lqer: expected keys a_q, a_scale, b_q, b_scale, shape [rows, cols], "
                         f"rank, group as written by quantize_lqer ({e!r})") from None
    groups = -(-cols // group)
    expected = {"a_q": ((rows, rank), torch.int8), "a_scale": ((), torch.float16),
                "b_q": ((rank, cols), torch.int8), "b_scale": ((rank, groups), torch.float16)}
    for key, (shape, dtype) in expected.items():
        t = parts[key]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"dequantize_lqer: {key} should be {dtype} {shape}, got {got}")
    A_hat = a_q.float() * a_scale.float()
    padded = F.pad(b_q.float(), (0, groups * group - cols)).reshape(rank, groups, group)
    B_hat = (padded * b_scale.float()[..., None]).reshape(rank, groups * group)[:, :cols]
    return A_hat @ B_hat
