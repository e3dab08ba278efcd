"""Low-bit per-row weight quantization: round-to-nearest and full-Hessian GPTQ (SPEC.md section 5).

Both store q (int8 holding values in [-qmax, qmax], qmax = 2**(bits-1) - 1) and one fp16 scale per
row; the decoder computes W_hat = q * scale. Scales come from SD-clip: clip = clip_sigmas * row std,
scale = clip / qmax. A few outliers then saturate instead of stretching the grid for the whole row.
By default the clip is capped at the row's max |w| (the finest grid that still covers the row);
cap_at_max=False keeps the plain k * std of the public records, where k is a size knob: trained rows
have max |w| of 3-5 std, so with the cap any k above that has no effect.

GPTQ keeps those scales and picks q column by column, pushing each column's rounding error onto the
not-yet-quantized columns through the inverse Hessian (H = E[x x^T] of the layer's inputs, see
quant/hessian.py), which minimises the output error trace((W - W_hat) H (W - W_hat)^T) greedily.
An optional leading batch dimension quantizes same-shaped matrices (e.g. every layer's c_q) in one
pass, so the per-column loop runs once per shape rather than once per matrix.
"""
from __future__ import annotations

import torch

# Smallest positive fp16 (subnormal): a smaller scale would round to 0 and erase the row.
_MIN_SCALE = 2.0 ** -24
# Times a failed Cholesky is retried, each with 10x the damping of the previous try.
_DAMP_RETRIES = 4


def _qmax(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: expected an int in 2..8 (q is stored as int8)")
    return 2 ** (bits - 1) - 1


def _check_weight(W: torch.Tensor, fn: str) -> None:
    if W.dim() not in (2, 3) or W.shape[-1] < 2:
        raise ValueError(f"{fn}: W has shape {tuple(W.shape)}, expected [rows, cols] or [batch, rows, cols] "
                         f"with cols >= 2 (the row std needs two values)")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{fn}: W of shape {tuple(W.shape)} has NaN or inf values")


@torch.no_grad()
def row_scales(W: torch.Tensor, bits: int, clip_sigmas: float, cap_at_max: bool = True) -> torch.Tensor:
    """fp16 scale per row of W ([..., rows, cols] -> [..., rows]) by SD-clip."""
    qmax = _qmax(bits)
    if not clip_sigmas > 0:
        raise ValueError(f"row_scales: clip_sigmas={clip_sigmas!r}, expected > 0")
    W = W.float()
    clip = clip_sigmas * W.std(dim=-1)
    if cap_at_max:  # clipping above the row's largest |w| would only waste grid points
        clip = torch.minimum(clip, W.abs().amax(dim=-1))
    scale = (clip / qmax).clamp_min(_MIN_SCALE).to(torch.float16)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"row_scales: W of shape {tuple(W.shape)} needs a scale beyond fp16's range "
                         f"(max |w| {W.abs().max().item():.3g})")
    return scale


def _round(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Nearest grid point of w for the (fp16-rounded, as float32) scale; the clamp is the clip."""
    return torch.round(w / scale).clamp_(-qmax, qmax)


@torch.no_grad()
def rtn_quantize(W: torch.Tensor, bits: int, clip_sigmas: float,
                 cap_at_max: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (q int8 shaped like W, fp16 scale [..., rows])."""
    _check_weight(W, "rtn_quantize")
    scale = row_scales(W, bits, clip_sigmas, cap_at_max)
    # quantize with the fp16 value the decoder multiplies by, not the fp32 one it was rounded from
    q = _round(W.float(), scale.float()[..., None], _qmax(bits))
    return q.to(torch.int8), scale


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    """U with U^T U = (H + lambda I)^-1 per batch element, lambda = damp * mean(diag H).

    A batch element whose factorisation fails (H nearly singular in fp32) is retried with 10x its
    damping while the others keep theirs, so each gets exactly the result it would get on its own."""
    B, n, _ = H.shape
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    diag_mean = H.diagonal(dim1=-2, dim2=-1).mean(-1)
    frac = torch.full_like(diag_mean, damp)
    for attempt in range(_DAMP_RETRIES + 1):
        if attempt:
            frac = torch.where(failed, 10 * frac, frac)
        L, info = torch.linalg.cholesky_ex(H + (frac * diag_mean)[:, None, None] * eye)
        U, info_inv = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        failed = (info != 0) | (info_inv != 0) | ~torch.isfinite(U).all(dim=-1).all(dim=-1)
        if not bool(failed.any()):
            return U
    raise ValueError(f"gptq_quantize: Cholesky of the damped Hessian [{n}, {n}] failed for batch elements "
                     f"{failed.nonzero().flatten().tolist()} of {B} even at damping "
                     f"{frac[failed].max().item():.3g} x mean(diag H)")


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, clip_sigmas: float, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = True,
                  cap_at_max: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ with SD-clip scales: (q int8 shaped like W, fp16 scale [..., rows]).

    W: [rows, cols] or [B, rows, cols]; H: the inputs' [cols, cols] second moment, or [B, cols, cols]
    for a batched W (a single [cols, cols] is shared by the whole batch)."""
    _check_weight(W, "gptq_quantize")
    qmax = _qmax(bits)
    if not damp > 0:
        raise ValueError(f"gptq_quantize: damp={damp!r}, expected > 0 (a calibration Hessian can be singular)")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq_quantize: block_size={block_size!r}, expected a positive int")
    cols = W.shape[-1]
    if H.shape[-2:] != (cols, cols) or H.dim() > W.dim() or (H.dim() == 3 and H.shape[0] != W.shape[0]):
        raise ValueError(f"gptq_quantize: H has shape {tuple(H.shape)}, expected [{cols}, {cols}]"
                         + (f" or [{W.shape[0]}, {cols}, {cols}]" if W.dim() == 3 else "")
                         + f" for W of shape {tuple(W.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError(f"gptq_quantize: H of shape {tuple(H.shape)} (for W {tuple(W.shape)}) has NaN or inf values")

    scale = row_scales(W, bits, clip_sigmas, cap_at_max)
    batched = W.dim() == 3
    Wb = W.to(torch.float32, copy=True).reshape(-1, *W.shape[-2:])  # [B, rows, cols], worked on in place
    B, rows, _ = Wb.shape
    Hb = H.to(Wb.device, torch.float32).expand(B, cols, cols).clone()
    s = scale.float().reshape(B, rows)

    # dead inputs (never nonzero in calibration): any weight works for them, so store 0 and give H a
    # unit diagonal there to keep it invertible
    diag = Hb.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    Wb.masked_fill_(dead[:, None, :], 0.0)

    if act_order:  # high-energy columns first, while the most columns remain to absorb their error
        perm = torch.argsort(diag, dim=-1, descending=True)
        Wb = Wb.gather(-1, perm[:, None, :].expand(B, rows, cols))
        Hb = Hb.gather(-2, perm[:, :, None].expand(B, cols, cols)).gather(-1, perm[:, None, :].expand(B, cols, cols))

    U = _upper_cholesky_of_inverse(Hb, damp)
    Q = torch.empty_like(Wb)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = Wb[:, :, i1:i2], U[:, i1:i2, i1:i2]
        err = torch.empty_like(W1)
        for i in range(i2 - i1):
            w = W1[:, :, i]
            q = _round(w, s, qmax)
            Q[:, :, i1 + i] = q
            err[:, :, i] = (w - q * s) / U1[:, i, i][:, None]
            # within the block: update the remaining columns right away (they are quantized next)
            W1[:, :, i:] -= err[:, :, i, None] * U1[:, None, i, i:]
        # lazy update: the columns after the block take the whole block's error in one matmul
        Wb[:, :, i2:] -= torch.bmm(err, U[:, i1:i2, i2:])

    if act_order:
        Q = Q.gather(-1, torch.argsort(perm, dim=-1)[:, None, :].expand(B, rows, cols))
    Q = Q.to(torch.int8)
    return (Q, scale) if batched else (Q[0], scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 W_hat = q * scale per row ([..., rows, cols] with scale [..., rows])."""
    if q.shape[:-1] != scale.shape:
        raise ValueError(f"dequantize: q has shape {tuple(q.shape)}, scale {tuple(scale.shape)}; "
                         f"expected scale of shape {tuple(q.shape[:-1])}")
    return q.float() * scale.float()[..., None]


def quant_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Proxy output error trace((W - W_hat) H (W - W_hat)^T): scalar, or [B] for batched W.

    With H = E[x x^T] this is the summed squared output error per token, the quantity GPTQ minimises
    and the one used to rank tensors by how much quantization hurts them."""
    if W.shape != W_hat.shape or H.shape[-2:] != (W.shape[-1], W.shape[-1]):
        raise ValueError(f"quant_error: W {tuple(W.shape)}, W_hat {tuple(W_hat.shape)}, H {tuple(H.shape)}; "
                         f"expected W_hat like W and H [..., {W.shape[-1]}, {W.shape[-1]}]")
    D = (W.float() - W_hat.float())
    return ((D @ H.float()) * D).sum(dim=(-2, -1))
