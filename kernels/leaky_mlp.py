"""Fused linear + LeakyReLU(slope)^2, the MLP's first half, and the whole MLP around it.

  y = leaky_relu_sq_linear(x, w, slope=0.5)          # x [..., K], w [N, K] -> y [..., N]
  out = leaky_mlp(x, w_fc, w_proj, slope=0.5)        # = leaky_relu_sq_linear(x, w_fc) @ w_proj.T

Forward: a Triton matmul (fp32 accumulation) whose epilogue rounds the pre-activation h = x @ w.T to
the input dtype, writes it (saved for the backward), and writes y = leaky_relu(h)^2 from it, so the
activation never makes a separate round trip through memory. Backward of leaky_relu_sq_linear: one
fused Triton pass dh = grad_y * 2 * h * (1 if h > 0 else slope^2) (= grad_y * 2 lrelu(h) lrelu'(h)),
then dx = dh @ w and dw = dh.T @ x with torch (cuBLAS). leaky_mlp owns the projection too, so its
backward gets dh from the same Triton matmul with another epilogue: (grad_out @ w_proj) times the
activation's derivative at the saved h, never writing grad_y; the other three matmuls are cuBLAS's.
slope is a runtime argument (0 = ReLU^2).

Memory: the ops save x, the weights and h, and leaky_mlp saves y for its projection's weight
gradient (as the plain projection would), so h and y are both kept per layer, where Inductor on the
reference may keep only h and recompute y in the backward (one extra M x N bf16 tensor per MLP;
bench/kernels_bench.py shows the isolated peak).

Shapes: any M, N, K (masked edges; K need not be a multiple of the block); x, w any strides; M*N,
M*K and N*K below 2^31 (int32 offsets), checked. Weights are cast to x's dtype (the trainer keeps
fp32 masters); under autocast everything goes to the autocast dtype, as F.linear would.

Every pass is a torch.library custom op with a fake implementation (and the forwards with autograd),
so torch.compile(fullgraph=True) keeps them as opaque calls. The *_reference() functions are the plain
PyTorch math; kernels/__init__.py has the switch (GOLF_KERNELS) that selects them.
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
_INT32_MAX = 2**31 - 1


def leaky_relu_sq_linear_reference(x: torch.Tensor, w: torch.Tensor, slope: float = 0.5) -> torch.Tensor:
    """The trainer's math (MLP.forward's first half)."""
    return F.leaky_relu(F.linear(x, w.to(x.dtype)), slope).square()


def leaky_mlp_reference(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, slope: float = 0.5) -> torch.Tensor:
    """The trainer's MLP.forward without its kernel."""
    return F.linear(leaky_relu_sq_linear_reference(x, w_fc, slope), w_proj.to(x.dtype))


# ----------------------------------------------------------------------------- Triton kernels
if HAVE_TRITON:
    if _INTERPRET:  # one small config: autotuning in the interpreter is slow and pointless
        _MM_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    else:  # a small H100 set; the record shape is M = 98,304 tokens, K = 512, N = 2048
        _MM_CONFIGS = [
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        ]

    @triton.autotune(configs=_MM_CONFIGS, key=["M", "N", "K", "DERIVATIVE"])
    @triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
    @triton.jit
    def _lrsq_mm_kernel(x_ptr, w_ptr, h_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                        stride_hm, stride_hn, stride_ym, stride_yn, slope,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr, DERIVATIVE: tl.constexpr):
        """acc = x @ w.T, then the forward epilogue (h = acc and y = lrelu(h)^2 written) or, with
        DERIVATIVE, the backward one (h read, y = acc * 2 lrelu(h) lrelu'(h) written: dh)."""
        # grouped launch order: GROUP_M row-blocks share each column-block of w while it is in L2
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_pid_n
        first_m = (pid // per_group) * GROUP_M
        group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_size
        pid_n = (pid % per_group) // group_size

        # edge rows/cols wrap around (their results are masked at the store): loads need no M/N masks
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
        b_ptrs = w_ptr + rk[:, None] * stride_wk + rn[None, :] * stride_wn  # w.T tile [BLOCK_K, BLOCK_N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=rk[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=rk[:, None] < k_left, other=0.0)
            if UPCAST:  # the interpreter gets bf16 arithmetic wrong
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_xk
            b_ptrs += BLOCK_K * stride_wk

        cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (cm[:, None] < M) & (cn[None, :] < N)
        h_ptrs = h_ptr + cm[:, None] * stride_hm + cn[None, :] * stride_hn
        if DERIVATIVE:
            hf = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
            y = acc * 2.0 * hf * tl.where(hf > 0, 1.0, slope * slope)
        else:  # h rounded to the output dtype (what the backward will read), y from that h
            h = acc.to(h_ptr.dtype.element_ty)
            tl.store(h_ptrs, h, mask=mask)
            hf = h.to(tl.float32)
            act = tl.where(hf > 0, hf, hf * slope)
            y = act * act
        tl.store(y_ptr + cm[:, None] * stride_ym + cn[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _lrsq_bwd_kernel(g_ptr, h_ptr, dh_ptr, numel, slope_sq, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dh = 2.0 * g * h * tl.where(h > 0, 1.0, slope_sq)
        tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)


def _check_sizes(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"leaky_relu_sq_linear: need x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(f"leaky_relu_sq_linear: x and w dtypes differ ({x.dtype}, {w.dtype})")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"leaky_relu_sq_linear: dtype must be fp32/bf16/fp16, got {x.dtype}")
    (m, k), n = x.shape, w.shape[0]
    if max(m * n, m * k, n * k) > _INT32_MAX:
        raise ValueError(f"leaky_relu_sq_linear: M*N, M*K and N*K must stay below 2^31 (M={m}, N={n}, K={k})")


@torch.library.custom_op("golf::leaky_relu_sq_linear_fwd", mutates_args=())
def _lrsq_fwd(x: torch.Tensor, w: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h), both [M, N] in x's dtype, contiguous."""
    _check_sizes(x, w)
    (m, k), n = x.shape, w.shape[0]
    h = torch.empty((m, n), dtype=x.dtype, device=x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        if k == 0:
            h.zero_()
            y.zero_()
            return y, h
        _launch_mm(x, w, h, y, slope, derivative=False)
    return y, h


def _launch_mm(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, out: torch.Tensor, slope: float,
               derivative: bool) -> None:
    """_lrsq_mm_kernel on x [M, K] and w [N, K] (any strides) into h and out [M, N]."""
    (m, k), n = x.shape, w.shape[0]
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _lrsq_mm_kernel[grid](x, w, h, out, m, n, k, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                          h.stride(0), h.stride(1), out.stride(0), out.stride(1), float(slope),
                          UPCAST=_INTERPRET, PRECISION="ieee" if x.dtype == torch.float32 else None,
                          DERIVATIVE=derivative)


@_lrsq_fwd.register_fake
def _(x, w, slope):
    _check_sizes(x, w)
    shape = (x.shape[0], w.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("golf::leaky_relu_sq_backward", mutates_args=())
def _lrsq_bwd(grad_y: torch.Tensor, h: torch.Tensor, slope: float) -> torch.Tensor:
    """dh = grad_y * 2 lrelu(h) lrelu'(h), in h's dtype."""
    grad_y, h = grad_y.contiguous(), h.contiguous()
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    numel = h.numel()
    if numel:
        block = 1024 if _INTERPRET else 4096
        _lrsq_bwd_kernel[(triton.cdiv(numel, block),)](grad_y, h, dh, numel, float(slope) ** 2,
                                                       BLOCK=block, num_warps=8)
    return dh


@_lrsq_bwd.register_fake
def _(grad_y, h, slope):
    return h.new_empty(h.shape)


def _lrsq_setup(ctx, inputs, output):
    x, w, slope = inputs
    _, h = output
    ctx.save_for_backward(x, w, h)
    ctx.slope = slope
    ctx.mark_non_differentiable(h)


def _lrsq_backward(ctx, grad_y, grad_h):
    x, w, h = ctx.saved_tensors
    if grad_y is None:
        return None, None, None
    dh = _lrsq_bwd(grad_y, h, ctx.slope)
    dx = dh @ w if ctx.needs_input_grad[0] else None
    dw = dh.t() @ x if ctx.needs_input_grad[1] else None
    return dx, dw, None


_lrsq_fwd.register_autograd(_lrsq_backward, setup_context=_lrsq_setup)


@torch.library.custom_op("golf::leaky_relu_sq_derivative_mm", mutates_args=())
def _lrsq_derivative_mm(grad_out: torch.Tensor, w_proj: torch.Tensor, h: torch.Tensor, slope: float) -> torch.Tensor:
    """dh = (grad_out @ w_proj) * 2 lrelu(h) lrelu'(h): grad_out [M, D], w_proj [D, N], h [M, N]."""
    _check_sizes(grad_out, w_proj.t())
    if h.shape != (grad_out.shape[0], w_proj.shape[1]):
        raise ValueError(f"leaky_mlp backward: h {tuple(h.shape)} does not match grad_out {tuple(grad_out.shape)} "
                         f"@ w_proj {tuple(w_proj.shape)}")
    dh = torch.empty(h.shape, dtype=grad_out.dtype, device=grad_out.device)
    if dh.numel():
        if grad_out.shape[1] == 0:
            return dh.zero_()
        _launch_mm(grad_out, w_proj.t(), h, dh, slope, derivative=True)
    return dh


@_lrsq_derivative_mm.register_fake
def _(grad_out, w_proj, h, slope):
    return grad_out.new_empty((grad_out.shape[0], w_proj.shape[1]))


@torch.library.custom_op("golf::leaky_mlp_fwd", mutates_args=())
def _mlp_fwd(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, slope: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, h, y): out = y @ w_proj.T [M, D]; h, y [M, N] as golf::leaky_relu_sq_linear_fwd's."""
    if w_proj.dim() != 2 or w_proj.shape[1] != w_fc.shape[0] or w_proj.dtype != x.dtype:
        raise ValueError(f"leaky_mlp: need w_proj [D, {w_fc.shape[0]}] in {x.dtype} for w_fc {tuple(w_fc.shape)}, "
                         f"got {tuple(w_proj.shape)} in {w_proj.dtype}")
    y, h = _lrsq_fwd(x, w_fc, slope)
    return y @ w_proj.t(), h, y


@_mlp_fwd.register_fake
def _(x, w_fc, w_proj, slope):
    hidden = (x.shape[0], w_fc.shape[0])
    return x.new_empty((x.shape[0], w_proj.shape[0])), x.new_empty(hidden), x.new_empty(hidden)


def _mlp_setup(ctx, inputs, output):
    x, w_fc, w_proj, slope = inputs
    _, h, y = output
    ctx.save_for_backward(x, w_fc, w_proj, h, y)
    ctx.slope = slope
    ctx.mark_non_differentiable(h, y)


def _mlp_backward(ctx, grad_out, grad_h, grad_y):
    x, w_fc, w_proj, h, y = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    dw_proj = grad_out.t() @ y if ctx.needs_input_grad[2] else None
    dh = _lrsq_derivative_mm(grad_out, w_proj, h, ctx.slope)
    dx = dh @ w_fc if ctx.needs_input_grad[0] else None
    dw_fc = dh.t() @ x if ctx.needs_input_grad[1] else None
    return dx, dw_fc, dw_proj, None


_mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def leaky_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, slope: float = 0.5, *,
              use_kernel: bool | None = None) -> torch.Tensor:
    """leaky_relu(x @ w_fc.T, slope)^2 @ w_proj.T for x [..., K], w_fc [N, K], w_proj [D, N] -> [..., D]
    in x's dtype (the autocast dtype under autocast). use_kernel as leaky_relu_sq_linear's."""
    if not (HAVE_TRITON and use_triton(x, use_kernel, _INTERPRET)):
        return leaky_mlp_reference(x, w_fc, w_proj, slope)
    rows, (w_fc, w_proj) = _kernel_inputs(x, w_fc, w_proj)
    out, _, _ = _mlp_fwd(rows, w_fc, w_proj, float(slope))
    return out.view(*x.shape[:-1], w_proj.shape[0])


def _kernel_inputs(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x as rows [M, K] and the weights, all in the dtype F.linear would compute in (the autocast
    dtype under autocast, else x's)."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return x.to(dtype).reshape(-1, x.shape[-1]), [w.to(dtype) for w in weights]


def leaky_relu_sq_linear(x: torch.Tensor, w: torch.Tensor, slope: float = 0.5, *,
                         use_kernel: bool | None = None) -> torch.Tensor:
    """leaky_relu(x @ w.T, slope)^2 for x [..., K], w [N, K] -> [..., N] in x's dtype (the autocast
    dtype under autocast). use_kernel: None = the switch (kernels.enabled(), CUDA tensors only),
    True/False forces the Triton/reference path (True on CPU needs TRITON_INTERPRET=1)."""
    if not (HAVE_TRITON and use_triton(x, use_kernel, _INTERPRET)):
        return leaky_relu_sq_linear_reference(x, w, slope)
    rows, (w,) = _kernel_inputs(x, w)
    y, _ = _lrsq_fwd(rows, w, float(slope))
    return y.view(*x.shape[:-1], w.shape[0])
