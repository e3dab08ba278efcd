"""GPU timing of golf.moe.MoEMLP (dropless, grouped GEMMs) against the dense LeakyReLU(0.5)^2 MLP of
equal active parameters: forward + backward at one rank's record micro-batch (98,304 tokens, dim 512,
bf16 autocast). Default: 8 experts top-2 with expert hidden 2048 vs a dense hidden of 2 x 2048 = 4096.
Target from the issue: dropless MoE <= 1.5x the dense MLP.

  python bench/moe_bench.py                      # eager and torch.compile(fullgraph=True)
  python bench/moe_bench.py --experts 16 --top-k 4 --hidden 1024
  python bench/moe_bench.py --smoke              # CPU self-test of this script: tiny shapes, eager

First a check that the grouped path agrees with the padded fallback (same weights, same routing; bf16
tolerance), then median fwd+bwd times over CUDA events, the capacity-mode (factor 1.25) time for
reference, and the routing's load metrics on the benchmark batch. Exits non-zero when the check fails;
the ratio is reported, not enforced.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golf.moe import MoEMLP, collect_moe_metrics, grouped_mm_available, moe_aux_loss  # noqa: E402


class DenseMLP(nn.Module):
    """train_gpt.py's MLP: fp32 master weights cast to the activation dtype, LeakyReLU(slope)^2."""

    def __init__(self, dim: int, hidden: int, slope: float = 0.5):
        super().__init__()
        self.fc = nn.Parameter(torch.empty(hidden, dim))
        nn.init.orthogonal_(self.fc)
        self.proj = nn.Parameter(torch.randn(dim, hidden) * 0.02)  # non-zero: a realistic backward
        self.slope = slope

    def forward(self, x):
        return F.linear(F.leaky_relu(F.linear(x, self.fc.to(x.dtype)), self.slope).square(), self.proj.to(x.dtype))


def make_moe(args, routing: str, impl: str = "auto") -> MoEMLP:
    torch.manual_seed(0)
    m = MoEMLP(args.dim, args.hidden, args.experts, args.top_k, routing=routing, impl=impl,
               aux_loss_weight=0.01, z_loss_weight=1e-3)
    with torch.no_grad():
        m.experts_out.normal_(std=0.02)
    return m.to(args.device).train()


def step_fn(model: nn.Module, autocast):
    """One forward + backward, the MoE's aux losses included (as the trainer would)."""
    def run(x, g):
        with autocast:
            y = model(x)
        loss = (y.float() * g).sum() + moe_aux_loss(model)
        loss.backward()
    return run


def time_ms(run, x, g, params, warmup: int, iters: int, device: str) -> float:
    for _ in range(warmup):
        run(x, g)
    times = []
    for _ in range(iters):
        for p in params:
            p.grad = None
        x.grad = None
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(x, g)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run(x, g)
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=98_304)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=2048, help="per-expert hidden size")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, eager: checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.dim, args.hidden, args.experts, args.top_k = 256, 32, 64, 4, 2
        args.warmup, args.iters, args.no_compile = 1, 2, True
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.device == "cpu" and not args.smoke:
        print("no CUDA device: use --smoke for the CPU self-test")
        return 2
    dev = args.device
    autocast = torch.autocast(device_type=dev, dtype=torch.bfloat16)
    dense_hidden = args.top_k * args.hidden
    print(f"tokens:{args.tokens} dim:{args.dim} experts:{args.experts} top_k:{args.top_k} "
          f"expert_hidden:{args.hidden} dense_hidden:{dense_hidden} device:{dev} "
          f"torch:{torch.__version__}" + (f" gpu:{torch.cuda.get_device_name()}" if dev == "cuda" else ""))
    probe = torch.zeros(1, args.dim, device=dev, dtype=torch.bfloat16)
    print(f"grouped_mm_available:{grouped_mm_available(probe, args.dim, args.hidden)}")

    # correctness: grouped vs padded dropless on a slice (the padded fallback costs E x, keep it small)
    n_check = min(args.tokens, 4096)
    xc = torch.randn(n_check, args.dim, device=dev, dtype=torch.bfloat16)
    grouped, padded = make_moe(args, "dropless", "grouped"), make_moe(args, "dropless", "padded")
    with autocast:
        yg, yp = grouped(xc).float(), padded(xc).float()
    err = ((yg - yp).norm() / yp.norm().clamp_min(1e-12)).item()
    ok = err < 2e-2
    print(f"check grouped vs padded: rel_err {err:.2e} {'ok' if ok else 'FAIL'}")
    del grouped, padded, xc, yg, yp

    x = torch.randn(args.tokens, args.dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(args.tokens, args.dim, device=dev)
    rows = []
    modes = [("eager", False)] + ([] if args.no_compile else [("compiled", True)])
    for mode, compile_ in modes:
        models = {"dense": DenseMLP(args.dim, dense_hidden).to(dev), "moe_dropless": make_moe(args, "dropless"),
                  "moe_capacity_1.25": make_moe(args, "capacity")}
        models["moe_capacity_1.25"].capacity_factor = 1.25
        for name, model in models.items():
            runner = torch.compile(model, fullgraph=True, dynamic=False) if compile_ else model
            ms = time_ms(step_fn(runner, autocast), x, g, list(model.parameters()), args.warmup, args.iters, dev)
            rows.append((mode, name, ms))
            if name == "moe_dropless":
                m = collect_moe_metrics(model, all_reduce=False)[""]
                print(f"  [{mode}] routing load: gini {m['gini']:.3f} entropy {m['entropy']:.3f} "
                      f"max/mean {m['max_mean_load']:.2f} dead {m['dead_experts']}")
            del runner
        torch._dynamo.reset()
    print(f"{'mode':<9} {'layer':<18} {'fwd+bwd ms':>10} {'vs dense':>9}")
    for mode, name, ms in rows:
        dense = next(d for m_, n, d in rows if m_ == mode and n == "dense")
        print(f"{mode:<9} {name:<18} {ms:>10.3f} {ms / dense:>8.2f}x")
    for mode, _ in modes:
        dense = next(d for m_, n, d in rows if m_ == mode and n == "dense")
        moe = next(d for m_, n, d in rows if m_ == mode and n == "moe_dropless")
        print(f"[{mode}] dropless/dense ratio {moe / dense:.2f}x (target <= 1.5x): "
              f"{'met' if moe / dense <= 1.5 else 'not met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
