"""Where a training step's time goes: torch.profiler over a few real steps, reduced to a kernel table
and category shares (matmul, attention, fused Triton, communication, ...), for the kernels issue's
"profile first" rule. The trainer calls it with PROFILE_STEPS > 0 after its compile priming."""
from __future__ import annotations

import re
import time
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# first match wins; kernel names of cuBLAS/CUTLASS, FlexAttention/SDPA, Inductor/Triton, NCCL, copies
CATEGORIES = (
    ("communication", re.compile(r"nccl|all_reduce|reduce_scatter|all_gather|c10d", re.I)),
    ("attention", re.compile(r"flex|attention|fmha|flash|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|cublas|sm90_|sm80_|nvjet|\bmm\b|aten::mm|aten::addmm|aten::bmm|matmul", re.I)),
    ("triton", re.compile(r"^triton_|_kernel$", re.I)),
    ("memory", re.compile(r"memcpy|memset|copy|aten::to\b|aten::cat\b", re.I)),
)
LAUNCH = re.compile(r"^(cudaLaunchKernel|cuLaunchKernel|cudaLaunchKernelExC|cuLaunchKernelEx|cudaLaunchCooperativeKernel)$")


def category(name: str) -> str:
    return next((cat for cat, pattern in CATEGORIES if pattern.search(name)), "other")


def kernel_rows(events, cuda: bool, steps: int) -> list[tuple[str, float, int]]:
    """(name, ms per step, calls per step) per distinct name. On CUDA only the kernels themselves
    count: an operator such as aten::mm carries the device time of the kernels it launched, and the
    profiler may list one kernel under several entries (e.g. forward and backward threads)."""
    acc: dict[str, list[float]] = {}
    for e in events:
        if cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.self_device_time_total
        else:
            if e.key.startswith("ProfilerStep"):
                continue
            us = e.self_cpu_time_total
        if us > 0:
            row = acc.setdefault(e.key, [0.0, 0])
            row[0] += us
            row[1] += e.count
    return [(name, us / 1000 / steps, count // steps) for name, (us, count) in acc.items()]


def host_rows(events, steps: int) -> tuple[int, list[tuple[str, float, int]]]:
    """Kernel launches per step (CUDA runtime/driver launch calls), and (name, self CPU ms per step,
    calls per step) of every host-side operator: where a launch-bound step spends its CPU time."""
    launches, acc = 0, {}
    for e in events:
        if e.device_type == DeviceType.CUDA or e.key.startswith("ProfilerStep"):
            continue
        if LAUNCH.search(e.key):
            launches += e.count
        row = acc.setdefault(e.key, [0.0, 0])
        row[0] += e.self_cpu_time_total
        row[1] += e.count
    return launches // steps, [(name, us / 1000 / steps, count // steps) for name, (us, count) in acc.items()]


def profile_steps(step: Callable[[], object], steps: int, device: torch.device) -> dict:
    """Runs `step` `steps` times under the profiler (after one unprofiled call, so no first-call work
    is counted). Times are device (GPU kernel) time on CUDA and self CPU time elsewhere, in ms per step.
    Returns {"per_step_ms", "categories": {name: ms}, "kernels": [{"name", "ms", "share", "calls",
    "category"}] (every kernel, largest first: the summary keeps the whole table), "wall_ms" (per
    step, under the profiler, which slows the host side), "launches" (per step), "host": on CUDA, the 10 largest host operators by self CPU time, like kernels}.
    Kernel time well below wall time means the GPU waits on the host (launches, Python)."""
    cuda = device.type == "cuda"
    step()
    if cuda:
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t0) * 1000 / steps
    events = prof.key_averages()
    rows = kernel_rows(events, cuda, steps)
    total = sum(ms for _, ms, _ in rows) or 1e-12
    cats: dict[str, float] = {}
    for name, ms, _ in rows:
        cats[category(name)] = cats.get(category(name), 0.0) + ms
    rows.sort(key=lambda r: -r[1])
    launches, host = host_rows(events, steps)
    host.sort(key=lambda r: -r[1])
    return {"per_step_ms": total, "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "kernels": [{"name": n, "ms": ms, "share": ms / total, "calls": c, "category": category(n)}
                        for n, ms, c in rows],
            "wall_ms": wall, "launches": launches,
            "host": [{"name": n, "ms": ms, "calls": c} for n, ms, c in host[:10]] if cuda else []}


def profile_lines(result: dict, label: str, top: int = 25) -> list[str]:
    """Log lines: per-step total, category shares, wall time and launches, then the `top` largest
    kernels and the host operators."""
    total = result["per_step_ms"]
    lines = [f"profile {label}: {total:.2f} ms/step of kernel time; " +
             " ".join(f"{c}:{ms:.2f}ms({ms / total:.0%})" for c, ms in result["categories"].items()),
             f"profile {label}: wall {result['wall_ms']:.2f} ms/step under the profiler, "
             f"{result['launches']} kernel launches/step"]
    for k in result["kernels"][:top]:
        lines.append(f"profile {label}   {k['ms']:8.3f} ms {k['share']:6.1%} x{k['calls']:<4d} {k['category']:<13s} "
                     f"{k['name'][:110]}")
    for h in result["host"]:
        lines.append(f"profile {label}   host {h['ms']:8.3f} ms x{h['calls']:<5d} {h['name'][:110]}")
    return lines
