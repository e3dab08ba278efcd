"""Segment matmuls: each run of rows times its own matrix, the LoRA products of TTT's packed passes.

  y  = segment_mm(x, w, ends)      # x [M, K], w [G, K, N], ends [G] int32 -> y [M, N]: y[i] = x[i] @ w[g(i)]

Group g holds rows ends[g-1]..ends[g] (ends[-1] = M; empty groups allowed), as torch._grouped_mm's
offs. The gradient of w is the transposed form dw[g] = x[rows of g].T @ dy[rows of g].

Why: a long document's chain of TTT steps runs passes of one window (two LoRA rows, the second
empty) of about 2,048 tokens. There each of a step's ~400 grouped GEMMs (cutlass, through
torch._grouped_mm) took about 10 us plus a 1.6 us preparation kernel, 37% of a 12 ms step on an H100,
for products of a few MFLOP. The kernels here do the same work in one launch each: the forward
kernel tiles rows and loops over the (one or two) groups a tile touches; the weight-gradient kernel
also splits the rows (split-K), so a [512, 96] gradient over 2,048 rows keeps hundreds of programs
busy instead of four, and sums the splits in a second small kernel.

For more than `SMALL_GROUPS` groups (TTT's full passes: 64 rows over up to 65,536 tokens) the op calls
torch._grouped_mm, 5-7x faster there than these kernels (bench/segment_mm_bench.py, H100). The choice
is made inside one custom op, so torch.compile sees a single opaque call whatever G is: a branch on G
in traced code would make Dynamo guard on it and compile every region twice (TTT's prime took 189 ->
320 s when a size-1 row count did that).

segment_mm_reference() is what TTT ran before this file existed (torch._grouped_mm where it runs, a
masked matmul per group elsewhere); kernels/__init__.py has the switch (GOLF_KERNELS).
"""
from __future__ import annotations

import torch

from kernels import interpreting, triton_available, use_triton

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # pragma: no cover - Triton is a requirement; the reference works without it
    HAVE_TRITON = False

_INTERPRET = interpreting()  # fixed at import, like Triton's own choice of interpreter or compiler
triton_available()  # settled now: first set inside a traced region, it would be a guard and a recompile
_INT32_MAX = 2**31 - 1
SMALL_GROUPS = 2  # up to this many groups the Triton kernels run; beyond it torch._grouped_mm
SPLIT_ROWS = 32 if _INTERPRET else 256  # rows per program of the weight gradient (split-K), at least


def _grouped_mm_runs(x: torch.Tensor, widths) -> bool:
    """Whether torch._grouped_mm takes x with these row widths: bf16, or float32 on CPU outside
    torch.compile (whose shape rules take bf16 only); rows of a multiple of 16 bytes."""
    kernel_dtype = x.dtype == torch.bfloat16 or (
        x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling())
    return kernel_dtype and all(d * x.element_size() % 16 == 0 for d in widths)


def _row_groups(x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Each row's group (G for rows past the last end)."""
    return torch.searchsorted(ends, torch.arange(x.shape[0], device=x.device, dtype=ends.dtype), right=True)


def segment_mm_reference(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm where it runs (_grouped_mm_runs), else one masked matmul per group (same
    values, G times the work)."""
    if _grouped_mm_runs(x, w.shape[1:]):
        return torch._grouped_mm(x, w, offs=ends)
    group = _row_groups(x, ends)
    out = x.new_zeros(x.shape[0], w.shape[2])
    for g in range(w.shape[0]):
        out = out + (group == g)[:, None].to(x.dtype) * (x @ w[g])
    return out


def _reference_tn(x: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """dw [G, K, N] of segment_mm_reference: torch._grouped_mm's own weight gradient, or per group."""
    if _grouped_mm_runs(x, (x.shape[1], dy.shape[1])):
        return torch._grouped_mm(x.t(), dy, offs=ends)
    group = _row_groups(x, ends)
    return torch.stack([x.t() @ ((group == g)[:, None].to(dy.dtype) * dy) for g in range(len(ends))])


# ----------------------------------------------------------------------------- Triton kernels
if HAVE_TRITON:
    @triton.jit
    def _segment_mm_kernel(x_ptr, w_ptr, ends_ptr, y_ptr, M, N, K, G,
                           stride_xm, stride_xk, stride_wg, stride_wk, stride_wn, stride_ym, stride_yn,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_G: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        gs = tl.arange(0, BLOCK_G)
        ends = tl.load(ends_ptr + gs, mask=gs < G, other=2147483647)
        # a row's group is how many groups end at or before it; rows past the last end get none (zeros)
        row_g = tl.sum((ends[None, :] <= tl.minimum(rm, M - 1)[:, None]).to(tl.int32), axis=1)
        g_lo = tl.min(row_g)
        g_hi = tl.minimum(tl.max(row_g), G - 1)
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(g_lo, g_hi + 1):  # one group for all but the tiles that straddle a boundary
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            a_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
            b_ptrs = w_ptr + g * stride_wg + rk[:, None] * stride_wk + rn[None, :] * stride_wn
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
                b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
                if UPCAST:  # the interpreter gets bf16 arithmetic wrong
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K * stride_xk
                b_ptrs += BLOCK_K * stride_wk
            out = tl.where(row_g[:, None] == g, acc, out)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, out.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _segment_mm_tn_kernel(x_ptr, dy_ptr, ends_ptr, out_ptr, M, K, N, rows_per_split,
                              stride_xm, stride_xk, stride_dm, stride_dn, stride_os, stride_og,
                              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        # program (tile of [K, N], group g, split s): x[rows].T @ dy[rows] over the rows of g in split s
        pid = tl.program_id(0)
        g = tl.program_id(1)
        s = tl.program_id(2)
        tiles_n = tl.cdiv(N, BLOCK_N)
        rk = (pid // tiles_n) * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(ends_ptr + tl.maximum(g - 1, 0))
        start = tl.where(g > 0, start, 0)
        lo = tl.maximum(start, s * rows_per_split)
        hi = tl.minimum(tl.load(ends_ptr + g), tl.minimum((s + 1) * rows_per_split, M))
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(lo, hi, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            inside = rm < hi
            a = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None] * stride_xk,
                        mask=inside[None, :] & (rk[:, None] < K), other=0.0)  # x tile, transposed
            b = tl.load(dy_ptr + rm[:, None] * stride_dm + rn[None, :] * stride_dn,
                        mask=inside[:, None] & (rn[None, :] < N), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        mask = (rk[:, None] < K) & (rn[None, :] < N)
        ptrs = out_ptr + s.to(tl.int64) * stride_os + g.to(tl.int64) * stride_og + rk[:, None] * N + rn[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _sum_splits_kernel(p_ptr, out_ptr, splits, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, splits):
            acc += tl.load(p_ptr + s * numel + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, w_shape: tuple, ends: torch.Tensor, what: str) -> None:
    if x.dim() != 2 or len(w_shape) != 3 or x.shape[1] != w_shape[1]:
        raise ValueError(f"{what}: need x [M, K] and w [G, K, N], got {tuple(x.shape)} and {tuple(w_shape)}")
    if ends.dim() != 1 or ends.shape[0] != w_shape[0] or ends.dtype != torch.int32:
        raise ValueError(f"{what}: ends must be int32 [G={w_shape[0]}], got {ends.dtype} {tuple(ends.shape)}")
    if max(x.numel(), x.shape[0] * w_shape[2], w_shape[0] * w_shape[1] * w_shape[2]) > _INT32_MAX:
        raise ValueError(f"{what}: sizes must stay below 2^31 elements (int32 offsets): x {tuple(x.shape)}, w {tuple(w_shape)}")


def _blocks(n: int) -> int:
    """A column block for width n: 32 for LoRA's rank 96 (three exact tiles), else 64."""
    return 16 if _INTERPRET else (32 if n % 64 else 64)


def _launch_options(x: torch.Tensor) -> dict:
    """The kernels' shared launch arguments: the interpreter's upcast, fp32's exact dot, the warps."""
    return {"UPCAST": _INTERPRET, "PRECISION": "ieee" if x.dtype == torch.float32 else None,
            **({} if _INTERPRET else {"num_warps": 4, "num_stages": 3})}


def _launch_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    (m, k), (g, _, n) = x.shape, w.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if not (m and n):
        return y
    bm, bn, bk = (16, 16, 16) if _INTERPRET else (64, _blocks(n), 64)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _segment_mm_kernel[grid](x, w, ends, y, m, n, k, g, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                             w.stride(2), y.stride(0), y.stride(1), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                             BLOCK_G=max(2, triton.next_power_of_2(g)), **_launch_options(x))
    return y


def _launch_tn(x: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    (m, k), n, g = x.shape, dy.shape[1], ends.shape[0]
    out = torch.empty((g, k, n), dtype=x.dtype, device=x.device)
    if not (k and n and g):
        return out
    bm, bk, bn = (16, 16, 16) if _INTERPRET else (64, 64, _blocks(n))
    rows = max(SPLIT_ROWS, triton.cdiv(max(m, 1), 64))  # at most 64 splits
    splits = max(1, triton.cdiv(m, rows))
    part = out if splits == 1 else torch.empty((splits, g, k, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(k, bk) * triton.cdiv(n, bn), g, splits)
    _segment_mm_tn_kernel[grid](x, dy, ends, part, m, k, n, rows, x.stride(0), x.stride(1), dy.stride(0),
                                dy.stride(1), 0 if splits == 1 else g * k * n, k * n,
                                BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, **_launch_options(x))
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(out.numel(), block),)](part, out, splits, out.numel(), BLOCK=block)
    return out


@torch.library.custom_op("golf::segment_mm", mutates_args=())
def _segment_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, small_groups: int) -> torch.Tensor:
    """y [M, N]: Triton for up to `small_groups` groups, else the reference."""
    _check(x, tuple(w.shape), ends, "segment_mm")
    return _launch_mm(x, w, ends) if w.shape[0] <= small_groups else segment_mm_reference(x, w, ends)


@_segment_mm.register_fake
def _(x, w, ends, small_groups):  # no size checks here: they would become guards of a compiled graph
    return x.new_empty((x.shape[0], w.shape[2]))


@torch.library.custom_op("golf::segment_mm_tn", mutates_args=())
def _segment_mm_tn(x: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor, small_groups: int) -> torch.Tensor:
    """dw [G, K, N] = per group x[rows].T @ dy[rows], in x's dtype."""
    _check(x, (ends.shape[0], x.shape[1], dy.shape[1]), ends, "segment_mm_tn")
    return _launch_tn(x, dy, ends) if ends.shape[0] <= small_groups else _reference_tn(x, dy, ends)


@_segment_mm_tn.register_fake
def _(x, dy, ends, small_groups):
    return x.new_empty((ends.shape[0], x.shape[1], dy.shape[1]))


def _setup(ctx, inputs, output):
    x, w, ends, small_groups = inputs
    ctx.save_for_backward(x, w, ends)
    ctx.small_groups = small_groups


def _backward(ctx, dy):
    x, w, ends = ctx.saved_tensors
    dx = _segment_mm(dy, w.transpose(1, 2), ends, ctx.small_groups) if ctx.needs_input_grad[0] else None
    dw = _segment_mm_tn(x, dy, ends, ctx.small_groups) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None


_segment_mm.register_autograd(_backward, setup_context=_setup)


def segment_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, *, use_kernel: bool | None = None) -> torch.Tensor:
    """x [M, K] @ w[g] [K, N] for the rows of each group g (rows ends[g-1]..ends[g], ends int32 [G],
    non-decreasing, ends[-1] = M) -> [M, N] in x's dtype; differentiable in x and w. use_kernel: None
    = the switch (kernels.enabled(), CUDA tensors only; the Triton kernels for up to SMALL_GROUPS
    groups), True = the Triton kernels for every G (tests: also on CPU under TRITON_INTERPRET=1),
    False = segment_mm_reference."""
    if not use_triton(x, use_kernel, _INTERPRET):  # it also checks that Triton imports
        return segment_mm_reference(x, w, ends)
    if x.dtype != w.dtype:
        raise TypeError(f"segment_mm: x and w dtypes differ ({x.dtype}, {w.dtype})")
    return _segment_mm(x, w, ends, _INT32_MAX if use_kernel else SMALL_GROUPS)
