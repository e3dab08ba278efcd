"""Triton kernels (kernels/) against their PyTorch references: forward values and gradients.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes are small: a few dozen rows, ragged against the interpreter's blocks (CE: 256 columns;
matmul: 32 x 32 x 32). fp32 is compared tightly, bf16 loosely (the interpreter also truncates fp32 -> bf16
instead of rounding to nearest, doubling the rounding error). use_kernel=True forces the kernel
(the default path runs the kernels on CUDA tensors only). torch.compile(fullgraph=True) is checked
with the aot_eager backend (Dynamo + AOTAutograd + the fake registrations, no C++ build) and
torch.library.opcheck tests schema, fake tensors and autograd registration. bench/kernels_bench.py
covers bf16 at the record shapes, Inductor and timings on a GPU.
"""
import pytest
import torch

import kernels
from kernels.leaky_mlp import leaky_mlp, leaky_mlp_reference, leaky_relu_sq_linear, leaky_relu_sq_linear_reference
from kernels.segment_mm import segment_mm, segment_mm_reference
from kernels.softcap_ce import softcap_cross_entropy, softcap_cross_entropy_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def _close(a, b, rtol, what):
    """max |a - b| <= rtol * max(|b|, 1): one scale per tensor, not elementwise."""
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1.0)
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


# ----------------------------------------------------------------------------- softcapped cross-entropy
def _ce_case(n, v, seed, scale=8.0, dtype=torch.float32):
    g = _gen(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[0], targets[-1] = 0, v - 1  # first and last column
    return logits.to(DEVICE), targets.to(DEVICE)


def _ce_run(fn, logits, targets, softcap, reduction, grad_seed=3):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, softcap, reduction)
    if reduction == "none":
        w = torch.randn(loss.shape, generator=_gen(grad_seed)).to(loss.device)
        (loss * w).sum().backward()
    else:
        loss.backward()
    return loss.detach(), x.grad


def _kernel_ce(x, t, c, r):
    return softcap_cross_entropy(x, t, c, r, use_kernel=True)


@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("n,v", [(37, 1000), (16, 1024), (3, 200)])
def test_ce_matches_reference_fp32(n, v, softcap):
    logits, targets = _ce_case(n, v, seed=n + v)
    for reduction in ("none", "mean"):
        got, got_grad = _ce_run(_kernel_ce, logits, targets, softcap, reduction)
        ref, ref_grad = _ce_run(softcap_cross_entropy_reference, logits, targets, softcap, reduction)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        _close(got, ref, 2e-6, f"loss {reduction}")
        _close(got_grad, ref_grad, 2e-6, f"grad {reduction}")


@pytest.mark.parametrize("softcap", [0.0, 30.0, 60.0])
def test_ce_extreme_logits(softcap):
    # saturating tanh (|logit| >> cap); without a cap (and with caps above 40, which take the same
    # path) the running maximum must grow across chunks (increasing rows) and hold (decreasing rows);
    # huge magnitudes must not overflow
    n, v = 6, 700
    ramp = torch.linspace(-1.0, 1.0, v)
    logits = torch.stack([ramp * 1e4, -ramp * 1e4, ramp * 80, -ramp * 80,
                          torch.full((v,), 5e3), torch.zeros(v)]).to(DEVICE)
    targets = torch.tensor([v - 1, 0, 350, 699, 3, 10], device=DEVICE)
    got, got_grad = _ce_run(_kernel_ce, logits, targets, softcap, "none")
    ref, ref_grad = _ce_run(softcap_cross_entropy_reference, logits, targets, softcap, "none")
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    _close(got, ref, 2e-6, "loss")
    _close(got_grad, ref_grad, 2e-6, "grad")


@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_ce_bf16_logits(softcap):
    # bf16 in, fp32 loss out, bf16 gradient; the reference upcasts the same bf16 values
    logits, targets = _ce_case(24, 1000, seed=5, dtype=torch.bfloat16)
    got, got_grad = _ce_run(_kernel_ce, logits, targets, softcap, "none")
    ref, ref_grad = _ce_run(softcap_cross_entropy_reference, logits, targets, softcap, "none")
    assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
    _close(got, ref, 1e-5, "loss")
    _close(got_grad, ref_grad, 1e-2, "grad")  # one bf16 rounding (the interpreter truncates: 2x the error)


def test_ce_strided_and_batched_inputs():
    # rows of a wider buffer (row stride > V) and [B, T, V] logits with [B, T] targets
    wide, targets = _ce_case(2 * 9, 1100, seed=11)
    logits = wide[:, :1024].reshape(2, 9, 1024)
    targets = targets.clamp(max=1023).reshape(2, 9)
    got, got_grad = _ce_run(_kernel_ce, logits, targets, 30.0, "none")
    ref, ref_grad = _ce_run(softcap_cross_entropy_reference, logits.reshape(18, 1024), targets.reshape(18),
                            30.0, "none")
    assert got.shape == (2, 9)
    _close(got.reshape(18), ref, 2e-6, "loss")
    _close(got_grad.reshape(18, 1024), ref_grad, 2e-6, "grad")


def test_ce_validation():
    logits, targets = _ce_case(4, 64, seed=1)
    with pytest.raises(ValueError, match="reduction"):
        softcap_cross_entropy(logits, targets, 30.0, "sum")
    with pytest.raises(ValueError, match="targets"):
        softcap_cross_entropy(logits, targets[:3], 30.0, use_kernel=True)
    bad = targets.clone()
    bad[1] = 64
    if DEVICE == "cpu":  # the reference validates the target range (on CUDA: a device assert)
        with pytest.raises(IndexError):
            softcap_cross_entropy(logits, bad, 30.0, use_kernel=False)


# ----------------------------------------------------------------------------- linear + LeakyReLU^2
def _mlp_case(m, k, n, seed, dtype=torch.float32):
    g = _gen(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    return x.to(DEVICE), w.to(DEVICE)


def _mlp_run(fn, x, w, slope, grad_seed=4):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, slope)
    gy = torch.randn(y.shape, generator=_gen(grad_seed)).to(y.device, y.dtype)
    (y * gy).float().sum().backward()
    return y.detach(), x.grad, w.grad


def _kernel_mlp(x, w, s):
    return leaky_relu_sq_linear(x, w, s, use_kernel=True)


@pytest.mark.parametrize("slope", [0.0, 0.5])
@pytest.mark.parametrize("m,k,n", [(100, 70, 90), (64, 64, 64), (33, 48, 17), (5, 200, 40)])
def test_mlp_matches_reference_fp32(m, k, n, slope):
    # K = 70, 200 are not multiples of the 32-wide K block; M, N ragged against 32 as well
    x, w = _mlp_case(m, k, n, seed=m + k + n)
    got = _mlp_run(_kernel_mlp, x, w, slope)
    ref = _mlp_run(leaky_relu_sq_linear_reference, x, w, slope)
    for a, b, what in zip(got, ref, ("y", "dx", "dw")):
        assert a.shape == b.shape and a.dtype == b.dtype
        _close(a, b, 1e-5, what)


@pytest.mark.parametrize("slope", [0.0, 0.5])
def test_mlp_bf16(slope):
    # the reference in bf16 rounds after the matmul, the activation and the square; the kernel
    # rounds h, then y once from fp32; gradients go through bf16 dh and bf16 cuBLAS/CPU matmuls
    x, w = _mlp_case(70, 64, 96, seed=9, dtype=torch.bfloat16)
    got = _mlp_run(_kernel_mlp, x, w, slope)
    ref = _mlp_run(leaky_relu_sq_linear_reference, x, w, slope)
    exact = _mlp_run(leaky_relu_sq_linear_reference, x.float(), w.float(), slope)
    for a, b, e, what in zip(got, ref, exact, ("y", "dx", "dw")):
        assert a.dtype == torch.bfloat16
        _close(a, b, 2e-2, what)
        _close(a, e, 2e-2, what + " vs fp32")


def test_mlp_batched_strided_mixed_dtype():
    # x [B, T, K] from a transposed buffer (non-unit K stride); fp32 master w with bf16 x
    g = _gen(21)
    xt = torch.randn(40, 2, 19, generator=g).to(DEVICE)
    x = xt.permute(1, 2, 0)  # [2, 19, 40], K stride 38
    w = (torch.randn(50, 40, generator=g) / 40 ** 0.5).to(DEVICE)
    got = _mlp_run(_kernel_mlp, x, w, 0.5)
    ref = _mlp_run(leaky_relu_sq_linear_reference, x, w, 0.5)
    assert got[0].shape == (2, 19, 50)
    for a, b, what in zip(got, ref, ("y", "dx", "dw")):
        _close(a, b, 1e-5, what)
    xb = x.to(torch.bfloat16)
    y = leaky_relu_sq_linear(xb, w, 0.5, use_kernel=True)
    assert y.dtype == torch.bfloat16
    _close(y, leaky_relu_sq_linear_reference(xb, w, 0.5), 2e-2, "y bf16 x, fp32 w")


def test_mlp_autocast():
    # under autocast the kernel path computes in the autocast dtype, as F.linear would
    x, w = _mlp_case(40, 32, 48, seed=2)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = leaky_relu_sq_linear(x, w, 0.5, use_kernel=True)
        r = leaky_relu_sq_linear_reference(x, w, 0.5)
    assert y.dtype == r.dtype == torch.bfloat16
    _close(y, r, 2e-2, "y")


def test_mlp_validation():
    x, w = _mlp_case(8, 16, 8, seed=0)
    with pytest.raises(ValueError, match="need x"):
        leaky_relu_sq_linear(x, w[:, :15], 0.5, use_kernel=True)


def _whole_mlp_run(fn, x, w1, w2, slope):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    out = fn(*leaves, slope)
    g = torch.randn(out.shape, generator=_gen(5)).to(out.device, out.dtype)
    (out * g).float().sum().backward()
    return (out.detach(), *(t.grad for t in leaves))


def _kernel_whole_mlp(x, w1, w2, s):
    return leaky_mlp(x, w1, w2, s, use_kernel=True)


@pytest.mark.parametrize("slope", [0.0, 0.5])
@pytest.mark.parametrize("m,k,n,d", [(100, 70, 90, 40), (33, 48, 17, 64), (5, 64, 200, 3)])
def test_whole_mlp_matches_reference_fp32(m, k, n, d, slope):
    # the backward's dh comes from the matmul grad_out @ w_proj with the derivative in its epilogue:
    # ragged M, N and a K (= D) that is not a multiple of the block test its masks
    x, w1 = _mlp_case(m, k, n, seed=m + n)
    w2 = (torch.randn(d, n, generator=_gen(d)) / n ** 0.5).to(DEVICE)
    got = _whole_mlp_run(_kernel_whole_mlp, x, w1, w2, slope)
    ref = _whole_mlp_run(leaky_mlp_reference, x, w1, w2, slope)
    for a, b, what in zip(got, ref, ("out", "dx", "dw_fc", "dw_proj")):
        assert a.shape == b.shape and a.dtype == b.dtype
        _close(a, b, 1e-5, what)


def test_whole_mlp_bf16_batched_autocast():
    # x [B, T, K], fp32 master weights, autocast to bf16: as the trainer calls it
    x, w1 = _mlp_case(2 * 35, 64, 96, seed=11)
    x = x.view(2, 35, 64)
    w2 = (torch.randn(48, 96, generator=_gen(12)) / 96 ** 0.5).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = _whole_mlp_run(_kernel_whole_mlp, x, w1, w2, 0.5)
        ref = _whole_mlp_run(leaky_mlp_reference, x, w1, w2, 0.5)
    exact = _whole_mlp_run(leaky_mlp_reference, x.double(), w1.double(), w2.double(), 0.5)
    assert got[0].shape == (2, 35, 48) and got[0].dtype == ref[0].dtype == torch.bfloat16
    for a, b, e, what in zip(got, ref, exact, ("out", "dx", "dw_fc", "dw_proj")):
        _close(a, b, 3e-2, what)
        _close(a, e.to(a.dtype), 3e-2, what + " vs float64")


def test_whole_mlp_validation():
    x, w1 = _mlp_case(8, 16, 24, seed=0)
    with pytest.raises(ValueError, match="need w_proj"):
        leaky_mlp(x, w1, torch.randn(12, 23, device=DEVICE), 0.5, use_kernel=True)


def test_trainer_mlp_fused_path_trains_like_the_reference(monkeypatch):
    """FUSED_MLP=1: MLP.forward in training hands its two weights to the kernel (forced here: on CPU
    the switch picks the reference) and trains as the plain MLP does."""
    import train_gpt as tg
    monkeypatch.setattr(tg, "leaky_mlp", lambda *a: leaky_mlp(*a, use_kernel=True))
    torch.manual_seed(0)
    mlp = tg.MLP(32, 2.0, 0.5, fused=True).to(DEVICE)
    torch.nn.init.normal_(mlp.proj.weight, std=0.1)  # the zero init would hide the backward's dh
    x = torch.randn(3, 7, 32, device=DEVICE)
    results = []
    for fused in (True, False):
        mlp.fused = fused
        mlp.zero_grad()
        out = mlp(x)
        out.square().sum().backward()
        results.append((out.detach(), mlp.fc.weight.grad.clone(), mlp.proj.weight.grad.clone()))
    for a, b, what in zip(*results, ("out", "dw_fc", "dw_proj")):
        _close(a, b, 1e-5, what)


# ----------------------------------------------------------------------------- segment matmul (LoRA rows)
def _per_group(x, w, ends):
    """float64, one matmul per group's rows; rows past the last end are zero."""
    bounds = [0] + ends.tolist()
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64, device=x.device)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        out[a:b] = x[a:b].double() @ w[i].double()
    return out


def _segment_case(m, k, n, ends, seed, dtype=torch.float32):
    g = _gen(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE).requires_grad_()
    w = torch.randn(len(ends), k, n, generator=g).to(dtype).to(DEVICE).requires_grad_()
    return x, w, torch.tensor(ends, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("use_kernel", [False, True])
@pytest.mark.parametrize("m,k,n,ends", [
    (37, 24, 20, [10, 37]),                # two windows, a tile across the boundary
    (37, 24, 20, [37, 37]),                # a chain step: one window, the second row empty
    (150, 16, 24, [0, 40, 40, 117, 150]),  # empty groups first and in the middle; weight gradient in splits
    (20, 8, 3, [5, 12, 20]),               # widths that are no multiple of 16 bytes (masked reference)
])
def test_segment_mm_is_a_matmul_per_group(use_kernel, m, k, n, ends):
    """The reference (torch._grouped_mm, or a masked matmul per group) and the Triton kernels, which
    use_kernel=True runs for every G: values and gradients of x and w against one float64 matmul per
    group."""
    x, w, e = _segment_case(m, k, n, ends, seed=m + n)
    out = segment_mm(x, w, e, use_kernel=use_kernel)
    ref = _per_group(x, w, e)
    _close(out, ref, 1e-5, "y")
    gy = torch.randn(out.shape, generator=_gen(1), dtype=torch.float64).to(DEVICE)
    gx, gw = torch.autograd.grad((out.double() * gy).sum(), (x, w))
    rx, rw = torch.autograd.grad((ref * gy).sum(), (x, w))
    _close(gx, rx, 1e-5, "dx")
    _close(gw, rw, 1e-5, "dw")


def test_segment_mm_bf16_and_float64_reference():
    """bf16 through both paths (the kernel upcasts loads under the interpreter); float64 takes the
    reference's masked path exactly."""
    x, w, e = _segment_case(40, 32, 16, [25, 40], seed=5, dtype=torch.bfloat16)
    exact = _per_group(x, w, e)
    for use in (False, True):
        y = segment_mm(x, w, e, use_kernel=use)
        assert y.dtype == torch.bfloat16
        _close(y, exact, 2e-2, f"bf16 use_kernel={use}")
    x, w, e = _segment_case(30, 8, 8, [0, 30], seed=6, dtype=torch.float64)
    torch.testing.assert_close(segment_mm_reference(x, w, e), _per_group(x, w, e), rtol=1e-12, atol=1e-12)


def test_segment_mm_dispatch_by_groups(monkeypatch):
    """The op takes the Triton kernels up to SMALL_GROUPS groups and the reference beyond, inside one
    custom op (no branch a compiled region would guard on)."""
    import kernels.segment_mm as sm
    ran = []
    for name in ("_launch_mm", "segment_mm_reference"):
        monkeypatch.setattr(sm, name, lambda x, w, e, name=name: ran.append(name) or x.new_zeros(x.shape[0], w.shape[2]))
    x, w2, e2 = _segment_case(8, 16, 8, [3, 8], seed=0)
    _, w3, e3 = _segment_case(8, 16, 8, [3, 5, 8], seed=0)
    with torch.no_grad():
        torch.ops.golf.segment_mm(x, w2, e2, sm.SMALL_GROUPS)
        torch.ops.golf.segment_mm(x, w3, e3, 2)
    assert ran == ["_launch_mm", "segment_mm_reference"]


def test_segment_mm_compiles_once_for_any_groups():
    """Compiled with dynamic shapes, one graph serves every row and group count (the dispatch on G
    happens inside the op), and its values match eager."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda x, w, e: segment_mm(x, w, e, use_kernel=True).square().sum(), backend=counter,
                       dynamic=True, fullgraph=True)
    for m, ends in ((20, [7, 20]), (33, [5, 9, 20, 33]), (12, [12, 12])):
        x, w, e = _segment_case(m, 16, 8, ends, seed=m)
        _close(fn(x, w, e), _per_group(x, w, e).square().sum(), 1e-5, f"compiled m={m}")
    assert counter.frame_count == 1


def test_segment_mm_validation():
    x, w, e = _segment_case(10, 8, 8, [4, 10], seed=0)
    with pytest.raises(ValueError, match="int32"):
        segment_mm(x, w, e.long(), use_kernel=True)
    with pytest.raises(ValueError, match="need x"):
        segment_mm(x, w[:, :4], e, use_kernel=True)
    with pytest.raises(TypeError, match="dtypes differ"):
        segment_mm(x, w.double(), e, use_kernel=True)


# ----------------------------------------------------------------------------- switch, compile, registrations
def test_switch_selects_reference(monkeypatch):
    import kernels.leaky_mlp as lm
    import kernels.softcap_ce as ce

    def boom(*a, **k):
        raise AssertionError("kernel ran")

    monkeypatch.setattr(ce, "_ce_fwd", boom)
    monkeypatch.setattr(lm, "_lrsq_fwd", boom)
    logits, targets = _ce_case(4, 64, seed=1)
    x, w = _mlp_case(8, 16, 8, seed=0)
    try:
        kernels.set_enabled(False)  # the switch off: references even on CUDA
        assert not kernels.enabled()
        softcap_cross_entropy(logits, targets, 30.0)
        leaky_relu_sq_linear(x, w, 0.5)
        monkeypatch.setenv("GOLF_KERNELS", "0")
        kernels.set_enabled(None)  # re-read the environment
        assert not kernels.enabled()
        monkeypatch.setenv("GOLF_KERNELS", "1")
        kernels.set_enabled(None)
        assert kernels.enabled()
        softcap_cross_entropy(logits, targets, 30.0, use_kernel=False)
        leaky_relu_sq_linear(x, w, 0.5, use_kernel=False)
        if DEVICE == "cpu":  # switch on, CPU tensors: the default path is the reference
            softcap_cross_entropy(logits, targets, 30.0)
            leaky_relu_sq_linear(x, w, 0.5)
        with pytest.raises(AssertionError, match="kernel ran"):
            softcap_cross_entropy(logits, targets, 30.0, use_kernel=True)
    finally:
        kernels.set_enabled(None)


def test_opcheck_registrations():
    # schema, fake (meta) implementation, autograd registration, AOT dispatch with dynamic shapes
    logits, targets = _ce_case(5, 300, seed=3)
    lse = torch.logsumexp(logits, dim=-1)
    for cap in (0.0, 30.0):
        torch.library.opcheck(torch.ops.golf.softcap_ce_fwd.default, (logits.requires_grad_(), targets, cap))
        torch.library.opcheck(torch.ops.golf.softcap_ce_bwd.default,
                              (torch.rand(5, device=DEVICE), logits.detach(), targets, lse, cap))
    x, w = _mlp_case(20, 40, 24, seed=4)
    torch.library.opcheck(torch.ops.golf.leaky_relu_sq_linear_fwd.default,
                          (x.requires_grad_(), w.requires_grad_(), 0.5))
    torch.library.opcheck(torch.ops.golf.leaky_relu_sq_backward.default,
                          (torch.randn(20, 24, device=DEVICE), torch.randn(20, 24, device=DEVICE), 0.5))
    w2 = torch.randn(12, 24, device=DEVICE)
    torch.library.opcheck(torch.ops.golf.leaky_mlp_fwd.default, (x, w, w2.requires_grad_(), 0.5))
    torch.library.opcheck(torch.ops.golf.leaky_relu_sq_derivative_mm.default,
                          (torch.randn(20, 12, device=DEVICE), w2.detach(), torch.randn(20, 24, device=DEVICE), 0.5))
    x, w, e = _segment_case(40, 16, 24, [15, 40], seed=2)
    torch.library.opcheck(torch.ops.golf.segment_mm.default, (x, w, e, 2))
    torch.library.opcheck(torch.ops.golf.segment_mm_tn.default, (x.detach(), torch.randn(40, 24, device=DEVICE), e, 2))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        logits = torch.empty(98304, 8192, dtype=torch.bfloat16, device=DEVICE)
        targets = torch.empty(98304, dtype=torch.int64, device=DEVICE)
        loss, lse = torch.ops.golf.softcap_ce_fwd(logits, targets, 30.0)
        assert loss.shape == lse.shape == (98304,) and loss.dtype == torch.float32
        d = torch.ops.golf.softcap_ce_bwd(loss, logits, targets, lse, 30.0)
        assert d.shape == logits.shape and d.dtype == torch.bfloat16
        x = torch.empty(98304, 512, dtype=torch.bfloat16, device=DEVICE)
        w = torch.empty(2048, 512, dtype=torch.bfloat16, device=DEVICE)
        y, h = torch.ops.golf.leaky_relu_sq_linear_fwd(x, w, 0.5)
        assert y.shape == h.shape == (98304, 2048) and y.dtype == torch.bfloat16
        w2 = torch.empty(512, 2048, dtype=torch.bfloat16, device=DEVICE)
        out, h, y = torch.ops.golf.leaky_mlp_fwd(x, w, w2, 0.5)
        assert out.shape == (98304, 512) and y.shape == h.shape == (98304, 2048)
        dh = torch.ops.golf.leaky_relu_sq_derivative_mm(out, w2, h, 0.5)
        assert dh.shape == h.shape and dh.dtype == torch.bfloat16


def test_compile_fullgraph():
    # a toy head: MLP half -> projection -> softcapped CE, compiled as one graph with both ops opaque
    torch._dynamo.reset()
    x, w1 = _mlp_case(48, 32, 64, seed=7)
    w2 = (torch.randn(100, 64, generator=_gen(8)) / 8).to(DEVICE)
    targets = torch.randint(0, 100, (48,), generator=_gen(9)).to(DEVICE)

    def head(x, w1, w2, use):
        h = leaky_relu_sq_linear(x, w1, 0.5, use_kernel=use)
        return softcap_cross_entropy(h @ w2.t(), targets, 30.0, "mean", use_kernel=use)

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"  # Inductor on CPU needs a C++ build: slow
    compiled = torch.compile(head, fullgraph=True, backend=backend)
    results = []
    for fn, use in ((compiled, True), (head, False)):
        params = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
        loss = fn(*params, use)
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in params])
    for a, b, what in zip(*results, ("loss", "dx", "dw1", "dw2")):
        _close(a, b, 1e-5, what)
