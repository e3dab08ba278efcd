"""Fused softcapped cross-entropy: loss_i = lse(z_i) - z_i[t_i], z = c * tanh(logits / c) (c = 0: z = logits).

  loss = softcap_cross_entropy(logits, targets, softcap=30.0, reduction="mean")   # [N, V] -> scalar

Forward: one streaming pass per row over the vocabulary in Triton (softcap, log-sum-exp, target
logit); it writes the fp32 loss and lse per row and saves only lse (plus the logits, which the
backward reads again). With a cap, |z| <= c, so exp(z - c) never overflows and the log-sum-exp needs no
running maximum; without one it keeps a running maximum. Backward: one pass per row that recomputes
z from the logits and writes d loss/d logits = (softmax(z) - onehot(t)) * (1 - tanh^2) * grad_out
once, in the logits' dtype. Feeding bf16 logits straight in (no .float() copy) is the intended use:
the math is fp32 in registers.

Both passes are torch.library custom ops with fake (meta) implementations and autograd, so
torch.compile(fullgraph=True) keeps them as opaque calls. Targets must lie in [0, V): the kernel does
not check (an out-of-range target reads outside the row); the reference path (F.cross_entropy)
does. softcap_cross_entropy_reference() is the plain PyTorch math; kernels/__init__.py has the
switch (GOLF_KERNELS) that selects it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import interpreting, use_triton

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # pragma: no cover - Triton is a requirement; references still work without it
    HAVE_TRITON = False

_INTERPRET = interpreting()  # fixed at import, like Triton's own choice of interpreter or compiler
_FIXED_MAX_CAP = 40.0  # caps up to this use exp(z - cap) without a running maximum


def softcap_cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0,
                                    reduction: str = "mean") -> torch.Tensor:
    """The trainer's math: fp32 logits, c * tanh(z / c) when c > 0, F.cross_entropy (which validates
    the target range: an error on CPU, a device assert on CUDA)."""
    z = logits.float()
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, targets, reduction=reduction)


# ----------------------------------------------------------------------------- Triton kernels
if HAVE_TRITON:
    if _INTERPRET:  # autotuning in the interpreter is slow and pointless: one small block
        _CONFIGS = [triton.Config({"BLOCK_V": 256}, num_warps=4)]
    else:  # a few widths for H100; V (1024-8192) is the key, rows are independent
        _CONFIGS = [triton.Config({"BLOCK_V": bv}, num_warps=w)
                    for bv in (1024, 2048, 4096) for w in (4, 8)]

    def _prune(configs, named_args, **kwargs):
        # blocks wider than the (power-of-two-rounded) row only waste lanes
        v = triton.next_power_of_2(named_args["V"])
        kept = [c for c in configs if c.kwargs["BLOCK_V"] <= max(v, 1024)]
        return kept or configs[:1]

    @triton.jit
    def _tanh(x):
        # no tl.tanh: tanh|x| = (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1], so nothing overflows and
        # it saturates to 1; near 0 it loses ~1e-7 absolute (1 - e), i.e. ~3e-6 on z at c = 30
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

    @triton.autotune(configs=_CONFIGS, key=["V", "HAS_CAP", "FIXED_MAX"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _ce_fwd_kernel(logits_ptr, stride_row, targets_ptr, loss_ptr, lse_ptr, V, cap, inv_cap,
                       HAS_CAP: tl.constexpr, FIXED_MAX: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        if FIXED_MAX:
            # capped, cap <= _FIXED_MAX_CAP: z <= cap, so sum exp(z - cap) cannot overflow, nor underflow
            # to 0 (z - cap >= -2 cap >= -80 and exp(-80) ~ 1.8e-35 is a normal fp32)
            acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                c = start + cols
                mask = c < V
                x = tl.load(base + c, mask=mask, other=0.0).to(tl.float32)
                z = cap * _tanh(x * inv_cap)
                acc += tl.where(mask, tl.exp(z - cap), 0.0)
            lse = cap + tl.log(tl.sum(acc, axis=0))
        else:
            # running maximum (a scalar per chunk) and per-lane sums rescaled when it grows
            m = -float("inf")
            acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in range(0, V, BLOCK_V):
                c = start + cols
                mask = c < V
                x = tl.load(base + c, mask=mask, other=0.0).to(tl.float32)
                if HAS_CAP:
                    x = cap * _tanh(x * inv_cap)
                z = tl.where(mask, x, -float("inf"))
                m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every chunk has a valid column
                acc = acc * tl.exp(m - m_new) + tl.exp(z - m_new)  # masked lanes add exp(-inf) = 0
                m = m_new
            lse = m + tl.log(tl.sum(acc, axis=0))
        t = tl.load(targets_ptr + row)
        zt = tl.load(base + t).to(tl.float32)
        if HAS_CAP:
            zt = cap * _tanh(zt * inv_cap)
        tl.store(loss_ptr + row, lse - zt)
        tl.store(lse_ptr + row, lse)

    @triton.autotune(configs=_CONFIGS, key=["V", "HAS_CAP"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _ce_bwd_kernel(grad_ptr, stride_grad, logits_ptr, stride_row, targets_ptr, lse_ptr, dlogits_ptr,
                       stride_drow, V, cap, inv_cap, HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        dbase = dlogits_ptr + row * stride_drow
        g = tl.load(grad_ptr + row * stride_grad).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        t = tl.load(targets_ptr + row)
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            mask = c < V
            x = tl.load(base + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                th = _tanh(x * inv_cap)
                p = tl.exp(cap * th - lse)
                d = (p - tl.where(c == t, 1.0, 0.0)) * (1.0 - th * th)
            else:
                p = tl.exp(x - lse)
                d = p - tl.where(c == t, 1.0, 0.0)
            tl.store(dbase + c, (d * g).to(dlogits_ptr.dtype.element_ty), mask=mask)


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"softcap_cross_entropy: need logits [N, V] and targets [N], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"softcap_cross_entropy: logits must be fp32/bf16/fp16, got {logits.dtype}")
    if targets.dtype != torch.int64:
        raise TypeError(f"softcap_cross_entropy: targets must be int64, got {targets.dtype}")


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("golf::softcap_ce_fwd", mutates_args=())
def _ce_fwd(logits: torch.Tensor, targets: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [N] fp32, lse [N] fp32)."""
    logits, targets = _row_major(logits), targets.contiguous()
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        cap = float(softcap)
        _ce_fwd_kernel[(n,)](logits, logits.stride(0), targets, loss, lse, v, cap, 1.0 / cap if cap > 0 else 0.0,
                             HAS_CAP=cap > 0, FIXED_MAX=0 < cap <= _FIXED_MAX_CAP)
    return loss, lse


@_ce_fwd.register_fake
def _(logits, targets, softcap):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("golf::softcap_ce_bwd", mutates_args=())
def _ce_bwd(grad_loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
            softcap: float) -> torch.Tensor:
    """d loss / d logits [N, V] in the logits' dtype (contiguous)."""
    logits, targets, lse = _row_major(logits), targets.contiguous(), lse.contiguous()
    n, v = logits.shape
    dlogits = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    if n:
        cap = float(softcap)
        # grad_loss may be an expanded scalar (the mean's backward): stride 0 is fine
        _ce_bwd_kernel[(n,)](grad_loss, grad_loss.stride(0), logits, logits.stride(0), targets, lse, dlogits,
                             dlogits.stride(0), v, cap, 1.0 / cap if cap > 0 else 0.0, HAS_CAP=cap > 0)
    return dlogits


@_ce_bwd.register_fake
def _(grad_loss, logits, targets, lse, softcap):
    return logits.new_empty(logits.shape)


def _ce_setup(ctx, inputs, output):
    logits, targets, softcap = inputs
    _, lse = output
    ctx.save_for_backward(logits, targets, lse)
    ctx.softcap = softcap
    ctx.mark_non_differentiable(lse)


def _ce_backward(ctx, grad_loss, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None
    return _ce_bwd(grad_loss, logits, targets, lse, ctx.softcap), None, None


_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


def softcap_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0,
                          reduction: str = "mean", *, use_kernel: bool | None = None) -> torch.Tensor:
    """Cross-entropy of c * tanh(logits / c) (softcap c; 0 = no cap) against targets, fp32.

    logits [..., V] fp32/bf16/fp16 (last dim contiguous preferred), targets [...] int64 in [0, V).
    reduction "none" -> loss shaped like targets; "mean" -> scalar. use_kernel: None = the switch
    (kernels.enabled(), CUDA tensors only), True/False forces the Triton/reference path (True on CPU
    needs TRITON_INTERPRET=1).
    """
    if reduction not in ("none", "mean"):
        raise ValueError(f"softcap_cross_entropy: reduction must be 'none' or 'mean', got {reduction!r}")
    shape = targets.shape
    logits2, targets2 = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    _check(logits2, targets2)
    if not (HAVE_TRITON and use_triton(logits, use_kernel, _INTERPRET)):
        loss = softcap_cross_entropy_reference(logits2, targets2, softcap, reduction)
        return loss if reduction == "mean" else loss.view(shape)
    loss, _ = _ce_fwd(logits2, targets2, float(softcap))
    return loss.mean() if reduction == "mean" else loss.view(shape)
