"""GPU check and benchmark of kernels/: each Triton kernel against its torch.compile'd PyTorch
reference at the record shapes (one rank's micro-batch: 98,304 tokens = 48 x 2048, vocab 8192,
dim 512, MLP hidden 2048, bf16).

  python bench/kernels_bench.py                       # record shapes
  python bench/kernels_bench.py --tokens 65536 --vocab 1024 --hidden 1024   # e.g. the naive baseline

First a correctness check at full size (kernel and compiled bf16 reference, both against an fp32
reference: the kernel's error may be at most 3x the reference's own, floor 1e-2 relative to the
largest value), then forward, backward and forward+backward times (CUDA events, median), the peak
memory a call allocates beyond its inputs, and achieved throughput against ceilings measured in the
same run: a large bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s, read + write). Bytes and
FLOPs are the ideal ones (each logit read once per pass, 2*M*N*K per matmul). Exits non-zero when a
check fails. Autotuning happens in the warm-up; the chosen configs are printed.

  python bench/kernels_bench.py --smoke   # CPU self-test of this script: tiny shapes, Triton interpreter
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--smoke" in sys.argv:  # must precede the kernels' import (Triton picks interpreter/compiler then)
    os.environ["TRITON_INTERPRET"] = "1"
from kernels import softcap_ce  # noqa: E402
import kernels.leaky_mlp  # noqa: E402  (the module: its autotuned kernel's chosen config)
from kernels.leaky_mlp import leaky_mlp, leaky_mlp_reference, leaky_relu_sq_linear, leaky_relu_sq_linear_reference  # noqa: E402
from kernels.softcap_ce import softcap_cross_entropy, softcap_cross_entropy_reference  # noqa: E402

DEV = "cuda"
failures: list[str] = []
rows: list[tuple] = []


COMPILE = {"fullgraph": True}


def compile_(fn):
    return torch.compile(fn, **COMPILE)


def empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float(), ref.float()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def timed(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over iters calls, after warmup calls."""
    for _ in range(warmup):
        fn()
    if DEV == "cpu":  # --smoke
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn) -> float:
    """Memory fn() allocates at its peak beyond what was allocated before it, in MiB."""
    if DEV == "cpu":
        fn()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def ceilings(warmup: int, iters: int) -> tuple[float, float]:
    n = 8192 if DEV == "cuda" else 256
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, warmup, iters)
    tflops = 2 * n ** 3 / ms / 1e9
    src = torch.empty(2**30 if DEV == "cuda" else 2**24, device=DEV, dtype=torch.uint8)  # 1 GiB
    dst = torch.empty_like(src)
    ms_copy = timed(lambda: dst.copy_(src), warmup, iters)
    gbs = 2 * src.numel() / ms_copy / 1e6
    src_gib = src.numel() / 2**30
    del a, b, src, dst
    empty_cache()
    print(f"ceilings: bf16 matmul {n}^3 {tflops:.0f} TFLOP/s; device copy {src_gib:g} GiB {gbs:.0f} GB/s (read + write)")
    return tflops, gbs


def outputs_and_grads(fn, grad: torch.Tensor, *inputs: torch.Tensor) -> tuple:
    """fn(*inputs) and the gradients of its inputs for the output gradient `grad`, all detached."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad.to(out.dtype)))


def check_kernels(name, whats, exact_fn, ref_c, kernel_fns, inputs, grad, floor=1e-2) -> None:
    """Each (label, fn) of kernel_fns against exact_fn on float32 copies of the inputs: its output and
    input gradients (named `whats`) may be off by at most 3x the compiled reference's own error, or
    `floor` relative to the largest value."""
    exact = outputs_and_grads(exact_fn, grad, *(t.float() for t in inputs))
    ref = outputs_and_grads(ref_c, grad, *inputs)
    for label, fn in kernel_fns:
        for what, a, r, e in zip(whats, outputs_and_grads(fn, grad, *inputs), ref, exact):
            err, ref_err = rel_err(a, e), rel_err(r, e)
            check(err <= max(3 * ref_err, floor), f"{name} {label} {what}: rel err {err:.2e} (compiled reference {ref_err:.2e})")


def fwd_bwd_variants(name, variants, inputs, extra, grad_out, warmup, iters, work_fwd, work_bwd, unit, ceiling):
    """variants: [(label, fn(*inputs, *extra) -> out)]; times the forward and forward + backward (grads
    of inputs); appends table rows. work_*: bytes or FLOPs of the ideal forward / backward; unit
    'GB/s' or 'TFLOP/s'."""
    scale = 1e6 if unit == "GB/s" else 1e9
    for label, fn in variants:
        def fwd():
            return fn(*inputs, *extra)

        def fwd_bwd():
            out = fn(*inputs, *extra)
            return torch.autograd.grad(out, inputs, grad_out)

        t_f = timed(fwd, warmup, iters)
        t_fb = timed(fwd_bwd, warmup, iters)
        mem = peak_mib(fwd_bwd)
        rate = (work_fwd + work_bwd) / t_fb / scale
        rows.append((name, label, t_f, t_fb - t_f, t_fb, f"{rate:.0f} {unit}", f"{100 * rate / ceiling:.0f}%", f"{mem:.0f}"))


def bench_ce(args, gbs):
    n, v, cap = args.tokens, args.vocab, args.softcap
    print(f"\nsoftcapped cross-entropy: logits [{n}, {v}] bf16, softcap {cap}")
    g = torch.Generator(device=DEV).manual_seed(0)
    logits = (torch.randn(n, v, device=DEV, generator=g) * 4).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,), device=DEV, generator=g)
    ref_c = compile_(lambda z, t: softcap_cross_entropy_reference(z, t, cap, "mean"))
    ker = lambda z, t: softcap_cross_entropy(z, t, cap, "mean", use_kernel=True)  # noqa: E731
    ker_c = compile_(ker)

    # correctness: loss and grad against fp32 math on the same bf16 logits
    def loss_grad(fn, z):
        z = z.detach().requires_grad_()
        loss = fn(z, targets)
        return loss.detach(), torch.autograd.grad(loss, z)[0]

    exact = loss_grad(lambda z, t: softcap_cross_entropy_reference(z, t, cap, "mean"), logits.float())  # fp32 leaf
    for label, fn in (("kernel", ker), ("kernel compiled", ker_c)):
        got = loss_grad(fn, logits)
        ref = loss_grad(ref_c, logits)
        for what, a, r, e in zip(("loss", "grad"), got, ref, exact):
            err, ref_err = rel_err(a, e), rel_err(r, e)
            check(err <= max(3 * ref_err, 1e-2 if what == "grad" else 1e-5),
                  f"CE {label} {what}: rel err {err:.2e} (compiled reference {ref_err:.2e})")
    none = softcap_cross_entropy(logits.detach(), targets, cap, "none", use_kernel=True)
    check(rel_err(none, softcap_cross_entropy_reference(logits.detach(), targets, cap, "none")) < 1e-5,
          "CE reduction none per-row losses")

    bytes_elem = n * v * logits.element_size()
    fwd_bytes, bwd_bytes = bytes_elem + 16 * n, 2 * bytes_elem + 16 * n  # read; read + write grad
    variants = [("triton", ker), ("triton, compiled", ker_c), ("reference, compiled", ref_c)]
    fwd_bwd_variants("softcap CE", variants, (logits,), (targets,), None, args.warmup, args.iters, fwd_bytes, bwd_bytes,
                     "GB/s", gbs)
    # the forward and backward kernels alone, for their own bandwidth
    loss, lse = torch.ops.golf.softcap_ce_fwd(logits.detach(), targets, cap)
    grad = torch.full_like(loss, 1.0 / n)
    t_f = timed(lambda: torch.ops.golf.softcap_ce_fwd(logits.detach(), targets, cap), args.warmup, args.iters)
    t_b = timed(lambda: torch.ops.golf.softcap_ce_bwd(grad, logits.detach(), targets, lse, cap), args.warmup, args.iters)
    rows.append(("softcap CE", "fwd kernel alone", t_f, None, None, f"{fwd_bytes / t_f / 1e6:.0f} GB/s",
                 f"{100 * fwd_bytes / t_f / 1e6 / gbs:.0f}%", ""))
    rows.append(("softcap CE", "bwd kernel alone", None, t_b, None, f"{bwd_bytes / t_b / 1e6:.0f} GB/s",
                 f"{100 * bwd_bytes / t_b / 1e6 / gbs:.0f}%", ""))
    for k in (softcap_ce._ce_fwd_kernel, softcap_ce._ce_bwd_kernel):
        print(f"  {k.fn.__name__} best config: {getattr(k, 'best_config', None)}")


def bench_mlp(args, tflops, gbs):
    m, k, n, slope = args.tokens, args.dim, args.hidden, args.slope
    print(f"\nlinear + LeakyReLU({slope})^2: x [{m}, {k}] @ w [{n}, {k}].T, bf16")
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(m, k, device=DEV, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(n, k, device=DEV, generator=g) / k ** 0.5).to(torch.bfloat16).requires_grad_()
    gy = torch.randn(m, n, device=DEV, generator=g).to(torch.bfloat16)
    ref_c = compile_(lambda x, w: leaky_relu_sq_linear_reference(x, w, slope))
    ker = lambda x, w: leaky_relu_sq_linear(x, w, slope, use_kernel=True)  # noqa: E731
    ker_c = compile_(ker)

    check_kernels("MLP", ("y", "dx", "dw"), lambda x, w: leaky_relu_sq_linear_reference(x, w, slope), ref_c,
                  (("kernel", ker), ("kernel compiled", ker_c)), (x, w), gy)

    flops_fwd, flops_bwd = 2 * m * n * k, 4 * m * n * k
    variants = [("triton", ker), ("triton, compiled", ker_c), ("reference, compiled", ref_c)]
    fwd_bwd_variants("lin+lrelu^2", variants, (x, w), (), gy, args.warmup, args.iters, flops_fwd, flops_bwd,
                     "TFLOP/s", tflops)
    xd, wd = x.detach(), w.detach()
    t_mm = timed(lambda: xd @ wd.t(), args.warmup, args.iters)
    rows.append(("lin+lrelu^2", "cuBLAS x @ w.T alone", t_mm, None, None, f"{flops_fwd / t_mm / 1e9:.0f} TFLOP/s",
                 f"{100 * flops_fwd / t_mm / 1e9 / tflops:.0f}%", ""))
    t_k = timed(lambda: torch.ops.golf.leaky_relu_sq_linear_fwd(xd, wd, slope), args.warmup, args.iters)
    rows.append(("lin+lrelu^2", "fwd kernel alone", t_k, None, None, f"{flops_fwd / t_k / 1e9:.0f} TFLOP/s",
                 f"{100 * flops_fwd / t_k / 1e9 / tflops:.0f}%", ""))
    _, h = torch.ops.golf.leaky_relu_sq_linear_fwd(xd, wd, slope)
    t_b = timed(lambda: torch.ops.golf.leaky_relu_sq_backward(gy, h, slope), args.warmup, args.iters)
    bwd_bytes = 3 * m * n * h.element_size()
    rows.append(("lin+lrelu^2", "bwd dh kernel alone", None, t_b, None, f"{bwd_bytes / t_b / 1e6:.0f} GB/s",
                 f"{100 * bwd_bytes / t_b / 1e6 / gbs:.0f}%", ""))
    print(f"  _lrsq_mm_kernel best config: {getattr(kernels.leaky_mlp._lrsq_mm_kernel, 'best_config', None)}")


def bench_whole_mlp(args, tflops):
    """leaky_mlp (FUSED_MLP=1's op: the activation in the fc matmul's epilogue, the backward's dh in
    the epilogue of grad_out @ w_proj) against the compiled reference MLP, forward + backward."""
    m, k, n, slope = args.tokens, args.dim, args.hidden, args.slope
    print(f"\nwhole MLP: x [{m}, {k}] -> {n} -> {k}, LeakyReLU({slope})^2, bf16")
    g = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(m, k, device=DEV, generator=g).to(torch.bfloat16).requires_grad_()
    w1 = (torch.randn(n, k, device=DEV, generator=g) / k ** 0.5).to(torch.bfloat16).requires_grad_()
    w2 = (torch.randn(k, n, device=DEV, generator=g) / n ** 0.5).to(torch.bfloat16).requires_grad_()
    go = torch.randn(m, k, device=DEV, generator=g).to(torch.bfloat16)
    ref_c = compile_(lambda x, w1, w2: leaky_mlp_reference(x, w1, w2, slope))
    ker = lambda x, w1, w2: leaky_mlp(x, w1, w2, slope, use_kernel=True)  # noqa: E731
    ker_c = compile_(ker)

    check_kernels("whole MLP", ("out", "dx", "dw_fc", "dw_proj"), lambda *t: leaky_mlp_reference(*t, slope), ref_c,
                  (("kernel", ker), ("kernel compiled", ker_c)), (x, w1, w2), go,
                  floor=1e-2 if DEV == "cuda" else 2e-2)  # the interpreter's bf16 stores round coarser (y: 9e-3 vs 4e-3)
    variants = [("triton", ker), ("triton, compiled", ker_c), ("reference, compiled", ref_c)]
    fwd_bwd_variants("whole MLP", variants, (x, w1, w2), (), go, args.warmup, args.iters, 4 * m * n * k, 8 * m * n * k,
                     "TFLOP/s", tflops)
    _, h, _ = torch.ops.golf.leaky_mlp_fwd(x.detach(), w1.detach(), w2.detach(), slope)
    w2d = w2.detach()
    t_d = timed(lambda: torch.ops.golf.leaky_relu_sq_derivative_mm(go, w2d, h, slope), args.warmup, args.iters)
    t_mm = timed(lambda: go @ w2d, args.warmup, args.iters)
    for label, t in (("dh kernel alone (grad_out @ w_proj, derivative epilogue)", t_d), ("cuBLAS grad_out @ w_proj alone", t_mm)):
        rows.append(("whole MLP", label, None, t, None, f"{2 * m * n * k / t / 1e9:.0f} TFLOP/s",
                     f"{100 * 2 * m * n * k / t / 1e9 / tflops:.0f}%", ""))


def print_table() -> None:
    head = ("kernel", "variant", "fwd ms", "bwd ms", "fwd+bwd ms", "achieved", "of ceiling", "peak MiB")
    fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    table = [head] + [tuple(fmt(v) for v in r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print()
    for i, r in enumerate(table):
        print("  ".join(c.ljust(wd) if j < 2 else c.rjust(wd) for j, (c, wd) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * wd for wd in widths))
    print("\nbwd ms of the full rows = (fwd+bwd) - fwd; 'achieved' of the full rows is over fwd+bwd "
          "(CE: ideal bytes, 3 logit passes; MLP: 6*M*N*K FLOPs; whole MLP: 12*M*N*K).")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=48 * 2048, help="rows per micro-batch (default 98,304)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--softcap", type=float, default=30.0)
    p.add_argument("--slope", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--only", choices=("ce", "mlp", "whole_mlp"), default=None)
    p.add_argument("--smoke", action="store_true", help="CPU self-test: tiny shapes, Triton interpreter, "
                   "aot_eager compile; checks the script, not the kernels' speed")
    args = p.parse_args()
    global DEV
    if args.smoke:
        DEV = "cpu"
        args.tokens, args.vocab, args.dim, args.hidden, args.warmup, args.iters = 64, 300, 40, 72, 1, 2
        COMPILE["backend"] = "aot_eager"
    elif not torch.cuda.is_available():
        print("kernels_bench.py needs a CUDA GPU (or --smoke for a CPU self-test)")
        return 2
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter is for CPU tests")
        return 2
    name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (smoke test)"
    print(f"{name}; torch {torch.__version__}; triton {__import__('triton').__version__}")
    tflops, gbs = ceilings(args.warmup, args.iters)
    if args.only in (None, "ce"):
        bench_ce(args, gbs)
        empty_cache()
    if args.only in (None, "mlp"):
        bench_mlp(args, tflops, gbs)
        empty_cache()
    if args.only in (None, "whole_mlp"):
        bench_whole_mlp(args, tflops)
    print_table()
    if failures:
        print(f"\n{len(failures)} check(s) failed: " + "; ".join(failures))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
