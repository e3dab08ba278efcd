"""FlexAttention kernel options at the trainer's shape, timed on CUDA (issues 5 and 6).

Inductor picks one block configuration per GPU and head dim for FlexAttention's forward and backward
(no autotuning outside max-autotune). This times a grid of `kernel_options` on the record stack's
attention call as training makes it: rows of 2048 tokens cut from the train stream (the loader's
rows, their real document boundaries), 8 query heads over 4 KV heads of dim 64, bf16, the
document-isolated causal block mask of golf/attention.py. Each option set is checked against
torch's default configuration (output and all three gradients) before it is timed.

  python bench/flex_tune.py --shard /tmp/bench/datasets/bench_sp8192/fineweb_train_000000.bin
  python bench/flex_tune.py --rows 48 --json flex_tune.json     # synthetic documents (mean 900)

Prints, per option set: forward ms, forward+backward ms, TFLOP/s over the mask's unmasked pairs
(4*D flops per pair forward, 2.5x that backward), and the largest error against the default.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golf.attention import BOS_ID, TUNED_FLEX, doc_boundaries  # noqa: E402

# (name, kernel_options); fwd_/bwd_ prefixes reach one pass only. None: torch's own choice.
GRID: list[tuple[str, dict | None]] = [("default", None)]
for m, n, st, w in [(128, 64, 3, 4), (128, 64, 3, 8), (128, 128, 3, 8), (128, 128, 2, 8), (64, 64, 3, 4),
                    (64, 128, 3, 4), (128, 64, 4, 4), (128, 32, 3, 4)]:
    GRID.append((f"fwd {m}x{n} s{st} w{w}", {"fwd_BLOCK_M": m, "fwd_BLOCK_N": n, "fwd_num_stages": st,
                                             "fwd_num_warps": w}))
# backward: BLOCK_N1 % BLOCK_M1 == 0 and BLOCK_M2 % BLOCK_N2 == 0 (Inductor's constraint); the pairs
# below are symmetric (M1, N1, M2, N2) = (m, n, n, m); each also carries the H100 table's forward
TUNED = TUNED_FLEX[((9, 0), 64)]
TUNED_FWD = {k: v for k, v in TUNED.items() if k.startswith("fwd_")}
GRID.append(("tuned fwd", dict(TUNED_FWD)))
GRID.append(("tuned", dict(TUNED)))
for m, n, st, w in [(64, 128, 3, 8), (64, 128, 2, 8), (64, 128, 3, 4), (32, 64, 3, 4), (32, 64, 4, 4), (32, 64, 2, 4),
                    (32, 128, 3, 4), (64, 64, 3, 8), (64, 64, 2, 4), (32, 32, 3, 4), (16, 64, 3, 4)]:
    GRID.append((f"bwd {m}x{n} s{st} w{w}", {**TUNED_FWD, "bwd_BLOCK_M1": m, "bwd_BLOCK_N1": n, "bwd_BLOCK_M2": n,
                                             "bwd_BLOCK_N2": m, "bwd_num_stages": st, "bwd_num_warps": w}))
GRID.append(("bwd no WRITE_DQ", {**TUNED_FWD, "WRITE_DQ": False}))
GRID.append(("tma", {"USE_TMA": True}))


def batch_ids(args) -> torch.Tensor:
    """[rows, seq] token ids: the first rows of the train stream, or synthetic documents."""
    n = args.rows * args.seq
    if args.shard:
        from data.shards import load_shard
        tokens = load_shard(args.shard)[:n]
        if len(tokens) < n:
            raise SystemExit(f"{args.shard}: {len(tokens)} tokens, need {n} for {args.rows} rows of {args.seq}")
        ids = torch.from_numpy(tokens.astype(np.int64))
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(2, 1024, (n,), generator=g)
        ids[torch.rand(n, generator=g) < 1 / args.mean_doc] = BOS_ID
    return ids.view(args.rows, args.seq)


def unmasked_pairs(ids: torch.Tensor) -> int:
    """Query-key pairs the document-causal mask keeps: sum over segments of L(L+1)/2."""
    starts = ids == BOS_ID
    starts[:, 0] = True
    total = 0
    for row in starts.cpu().numpy():
        edges = np.append(np.flatnonzero(row), len(row))
        lengths = np.diff(edges)
        total += int((lengths * (lengths + 1) // 2).sum())
    return total


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shard", help="a train shard; default: synthetic documents")
    p.add_argument("--rows", type=int, default=48, help="rows per micro-batch (48: one rank's share)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mean-doc", type=int, default=900, help="synthetic documents' mean length")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--only", default="", help="run the grid entries whose names start with one of these "
                   "comma-separated prefixes, e.g. 'bwd,tuned' (the default entry always runs)")
    p.add_argument("--json", help="write the table here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("flex_tune needs CUDA (FlexAttention's kernels are what it times)")
    from torch.nn.attention.flex_attention import flex_attention
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.recompile_limit = 256
    dev = torch.device("cuda")
    ids = batch_ids(args).to(dev)
    info = doc_boundaries(ids)
    pairs = unmasked_pairs(ids) * 8  # heads
    H, Hkv, D = 8, 4, 64
    g = torch.Generator(device=dev).manual_seed(0)

    def make(shape):  # [B, T, h, D] then transposed, as attend() hands them over
        return torch.randn(shape, generator=g, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()

    q, k, v = make((args.rows, args.seq, H, D)), make((args.rows, args.seq, Hkv, D)), make((args.rows, args.seq, Hkv, D))
    w = torch.randn(args.rows, H, args.seq, D, generator=g, device=dev, dtype=torch.bfloat16)
    print(f"flex_tune device:{torch.cuda.get_device_name()} torch:{torch.__version__} rows:{args.rows} seq:{args.seq} "
          f"docs:{int((ids == BOS_ID).sum())} density:{pairs / (8 * args.rows * args.seq * (args.seq + 1) / 2):.3f} "
          f"source:{args.shard or 'synthetic'}", flush=True)
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    reference, rows = None, []
    for name, options in GRID:
        if wanted and name != "default" and not any(name.startswith(w) for w in wanted):
            continue
        fn = torch.compile(lambda q, k, v, o=options: flex_attention(q, k, v, block_mask=info.mask, enable_gqa=True,
                                                                      kernel_options=o), dynamic=False)
        t0 = time.perf_counter()
        try:
            out = fn(q, k, v)
            out.backward(w)
            torch.cuda.synchronize()
        except Exception as e:  # a configuration the template rejects (shared memory, block sizes)
            print(f"flex_tune {name:24s} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
            rows.append({"name": name, "options": options, "error": str(e).splitlines()[0][:300]})
            q.grad = k.grad = v.grad = None
            continue
        compile_s = time.perf_counter() - t0
        got = [out.detach().float()] + [t.grad.float() for t in (q, k, v)]
        q.grad = k.grad = v.grad = None
        if reference is None:
            reference = got
        err = max((a - b).abs().max().item() for a, b in zip(got, reference))
        fwd = timed(lambda: fn(q, k, v), args.iters)

        def both():
            fn(q, k, v).backward(w)
        total = timed(both, args.iters)
        q.grad = k.grad = v.grad = None
        flops = 4 * D * pairs
        row = {"name": name, "options": options, "fwd_ms": fwd, "fwd_bwd_ms": total, "bwd_ms": total - fwd,
               "fwd_tflops": flops / fwd / 1e9, "fwd_bwd_tflops": 3.5 * flops / total / 1e9,
               "max_err_vs_default": err, "compile_s": compile_s}
        rows.append(row)
        print(f"flex_tune {name:24s} fwd {fwd:7.3f} ms  fwd+bwd {total:7.3f} ms  bwd {total - fwd:7.3f} ms  "
              f"{row['fwd_tflops']:6.1f} / {row['fwd_bwd_tflops']:6.1f} TFLOP/s  err {err:.2e}  compile {compile_s:.1f}s",
              flush=True)
    ok = [r for r in rows if "error" not in r]
    if ok:
        best_f = min(ok, key=lambda r: r["fwd_ms"])
        best_t = min(ok, key=lambda r: r["fwd_bwd_ms"])
        print(f"flex_tune best forward: {best_f['name']} {best_f['fwd_ms']:.3f} ms; best forward+backward: "
              f"{best_t['name']} {best_t['fwd_bwd_ms']:.3f} ms (default {ok[0]['fwd_ms']:.3f} / {ok[0]['fwd_bwd_ms']:.3f})")
        print(f"flex_tune best as FLEX_KERNEL_OPTIONS: "
              f"{','.join(f'{k}={v}' for k, v in (best_t['options'] or {}).items()) or 'torch'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "seq": args.seq, "source": args.shard, "table": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
