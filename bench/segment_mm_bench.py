"""GPU check and benchmark of kernels/segment_mm.py: TTT's LoRA products (x @ A[g] @ B[g], forward and
backward) through the Triton kernels against torch._grouped_mm, at the shapes of TTT's packed passes.

  python bench/segment_mm_bench.py             # on the GPU
  python bench/segment_mm_bench.py --smoke     # CPU self-test of this script (Triton interpreter, tiny)

Each case is one pass: T packed rows over G LoRA rows with the windows given (a long document's
chain: one window of 2,048 rows and G = 2; full passes: 64 rows), for each LoRA of the record model's
blocks (k 512->256, o 512->512, fc 512->2048, proj 2048->512; rank 96). Both paths are checked
against an fp32 matmul per window (relative error of y, dx, dA, dB), then timed as TTT runs them:
replayed from a CUDA graph holding 20 forward+backward calls, so launch latency inside a graph is
what counts, as in TTT's replayed steps (the six products of a forward and backward, called
directly: autograd's engine does not take part in a capture here). Prints microseconds per
forward+backward per LoRA and the kernel launches it makes (profiled once).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--smoke" in sys.argv:  # must precede the kernels' import (Triton picks interpreter/compiler then)
    os.environ["TRITON_INTERPRET"] = "1"
from kernels.segment_mm import _reference_tn, segment_mm, segment_mm_reference  # noqa: E402

BIG = 2**31 - 1  # the ops' small_groups argument: the Triton kernels for every G

LORAS = {"k": (512, 256), "o": (512, 512), "fc": (512, 2048), "proj": (2048, 512)}
CASES = [  # label, T, G, window lengths (the rest of T is padding in the last window's row)
    ("chain 1x2048", 2048, 2, [2048]),
    ("chain 1x1024", 1024, 2, [1000]),
    ("tail 2x2048", 4096, 2, [2048, 2000]),
    ("tail 5 of 64", 12288, 64, [2048] * 5),
    ("full 32x2048", 65536, 64, [2048] * 32),
]


def lora_call(x, A, B, ends, kernel: bool):
    return segment_mm(segment_mm(x, A, ends, use_kernel=kernel), B, ends, use_kernel=kernel)


def lora_products(x, A, B, ends, dy, kernel: bool):
    """The six products of one LoRA's forward and backward, as autograd runs them (kernels/segment_mm.py's
    _backward), without autograd: a CUDA graph of them holds only the products' own kernels."""
    mm = (lambda a, w: torch.ops.golf.segment_mm(a, w, ends, BIG)) if kernel else (lambda a, w: segment_mm_reference(a, w, ends))
    tn = (lambda a, d: torch.ops.golf.segment_mm_tn(a, d, ends, BIG)) if kernel else (lambda a, d: _reference_tn(a, d, ends))
    mid = mm(x, A)
    y = mm(mid, B)
    dmid = mm(dy, B.transpose(1, 2))
    return y, tn(mid, dy), tn(x, dmid), mm(dmid, A.transpose(1, 2))


def per_window_reference(x, A, B, bounds):
    return torch.cat([(x[s:e].float() @ A[i].float()).to(x.dtype).float() @ B[i].float()
                      for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))])


def graph_us(fn, reps: int, dev: str) -> float:
    """Microseconds per fn() replayed `reps` times from one CUDA graph (median of 5 replays)."""
    if dev != "cuda":
        import time
        t = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / reps)
    return sorted(times)[2]


def launches(fn, dev: str) -> int:
    if dev != "cuda":
        return 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--reps", type=int, default=20, help="calls per CUDA graph")
    a = ap.parse_args()
    dev, dtype, r = ("cpu", torch.float32, 8) if a.smoke else ("cuda", torch.bfloat16, 96)
    loras = {"k": (16, 8)} if a.smoke else LORAS
    cases = [("chain", 48, 2, [48]), ("tail", 96, 2, [48, 40])] if a.smoke else CASES
    g = torch.Generator(device=dev).manual_seed(0)
    failures = 0
    print(f"device:{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'} torch:{torch.__version__} rank:{r}")
    for label, T, G, lens in cases:
        bounds = [0] + torch.tensor(lens).cumsum(0).tolist()
        ends = torch.full((G,), T, dtype=torch.int32, device=dev)
        ends[: len(lens) - 1] = torch.tensor(bounds[1:-1], dtype=torch.int32)
        bounds[-1] = T  # the padding belongs to the last window's row
        for name, (d_in, d_out) in loras.items():
            x = torch.randn(T, d_in, device=dev, generator=g).to(dtype).requires_grad_()
            A = (torch.randn(G, d_in, r, device=dev, generator=g) / d_in ** 0.5).to(dtype).requires_grad_()
            B = (torch.randn(G, r, d_out, device=dev, generator=g) / r ** 0.5).to(dtype).requires_grad_()
            dy = torch.randn(T, d_out, device=dev, generator=g).to(dtype)
            ref = per_window_reference(x, A, B, bounds)
            want = [ref.detach(), *torch.autograd.grad(ref, (x, A, B), dy.float())]
            want[2], want[3] = want[2][: len(lens)], want[3][: len(lens)]
            line = f"{label:14s} T:{T:6d} G:{G:3d} {name:5s}"
            for kernel in (False, True):
                out = lora_call(x, A, B, ends, kernel)
                got = [out.detach(), *torch.autograd.grad(out, (x, A, B), dy)]
                got[2], got[3] = got[2][: len(lens)], got[3][: len(lens)]
                errs = [((u.float() - v).abs().max() / v.abs().max().clamp_min(1e-30)).item() for u, v in zip(got, want)]
                ok = max(errs) < (1e-4 if a.smoke else 0.03)
                failures += not ok

                def step(kernel=kernel, x=x.detach(), A=A.detach(), B=B.detach()):
                    lora_products(x, A, B, ends, dy, kernel)
                us = graph_us(step, a.reps, dev)
                line += (f" | {'triton ' if kernel else 'grouped'} {us:7.1f} us {launches(step, dev):3d} launches"
                         f" err {max(errs):.2g}{'' if ok else ' FAIL'}")
            print(line, flush=True)
    print(f"segment_mm_bench {'ok' if not failures else f'{failures} FAILED'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
