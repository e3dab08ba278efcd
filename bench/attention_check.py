"""CUDA check of golf/attention.py: every available backend against an fp32 reference in bf16, forward
and backward, eager and under torch.compile(fullgraph=True); document isolation; no recompiles when
the document layout changes; then forward+backward timings.

  python bench/attention_check.py                  # trainer-like shapes: 16 x 2048, 8/4 heads, dim 64
  python bench/attention_check.py --rows 48        # the best entry's per-rank micro-batch

Exits non-zero if a check fails. bf16 tolerance: a backend's error against the fp32 reference may
be at most 3x that of SDPA's own bf16 kernel (floor 1e-2), for the output and every gradient.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golf.attention import BOS_ID, attend, available_backends, backend_name, doc_boundaries  # noqa: E402

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)


def make_batch(rows, seq, heads, kv_heads, dim, mean_doc, seed, device):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(2, 1024, (rows, seq), generator=g)
    ids[torch.rand(rows, seq, generator=g) < 1 / mean_doc] = BOS_ID
    q = torch.randn(rows, seq, heads, dim, generator=g)
    k = torch.randn(rows, seq, kv_heads, dim, generator=g)
    v = torch.randn(rows, seq, kv_heads, dim, generator=g)
    return ids.to(device), *(t.to(device) for t in (q, k, v))


def run(fn, ids, q, k, v, dtype):
    """Output and q/k/v gradients of sum(out * w) for a fixed random w; fn(ids, q, k, v) -> out."""
    q, k, v = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
    out = fn(ids, q, k, v)
    w = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(7), device=out.device)
    (out.float() * w).sum().backward()
    return [t.float() for t in (out, q.grad, k.grad, v.grad)]


def eager(isolate, backend):
    return lambda ids, q, k, v: attend(q, k, v, doc_boundaries(ids, isolate=isolate, backend=backend))


def max_err(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def set_error_on_recompile(on: bool) -> None:
    if hasattr(torch._dynamo.config, "error_on_recompile"):
        torch._dynamo.config.error_on_recompile = on


def timed(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / iters


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--mean-doc", type=float, default=700, help="mean document length in tokens")
    p.add_argument("--layers", type=int, default=4, help="layers sharing one DocInfo in the compiled check")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("attention_check: needs CUDA")
        return 2
    dev = torch.device("cuda")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; backends {available_backends(dev)}; "
          f"trainer default: {backend_name(dev)} / {backend_name(dev, isolate=False)}")
    shape = (args.rows, args.seq, args.heads, args.kv_heads, args.dim, args.mean_doc)
    ids, q, k, v = make_batch(*shape, seed=0, device=dev)
    n_docs = int((ids == BOS_ID).sum())
    print(f"batch {args.rows} x {args.seq}, heads {args.heads}/{args.kv_heads} x {args.dim}, {n_docs} BOS tokens")

    backends = available_backends(dev)
    # compiled first, in a process that has run nothing eager yet: as in the trainer
    print(f"\n== torch.compile(fullgraph=True): one DocInfo shared by {args.layers} layers, new layouts reuse the graph")
    for b in backends:
        torch._dynamo.reset()

        def model(ids, q, k, v, backend=b):
            info = doc_boundaries(ids, backend=backend)  # once per forward
            out = q
            for _ in range(args.layers):
                out = attend(out, k, v, info)
            return out

        def eager_model(ids, q, k, v):
            info = doc_boundaries(ids, backend="sdpa")
            out = q
            for _ in range(args.layers):
                out = attend(out, k, v, info)
            return out

        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        try:
            t0 = time.perf_counter()
            got = run(compiled, ids, q, k, v, torch.bfloat16)
            compile_s = time.perf_counter() - t0
            ref = run(eager_model, ids, q, k, v, torch.float32)
            tol = max(3 * max_err(run(eager_model, ids, q, k, v, torch.bfloat16), ref), 1e-2)
            err = max_err(got, ref)
            check(err <= tol, f"{b} compiled ({compile_s:.0f} s to compile): max abs error {err:.2e} (tolerance {tol:.2e})")
            set_error_on_recompile(True)
            for seed in (1, 2):  # other document layouts, same shapes
                batch = make_batch(*shape, seed=seed, device=dev)
                err = max_err(run(compiled, *batch, torch.bfloat16), run(eager_model, *batch, torch.float32))
                check(err <= tol, f"{b} compiled, layout {seed}: no recompile, max abs error {err:.2e}")
        except Exception as e:  # report and go on to the next backend
            check(False, f"{b} compiled: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        finally:
            set_error_on_recompile(False)

    for isolate in (True, False):
        print(f"\n== eager, {'doc-isolated' if isolate else 'plain causal'}: bf16 vs fp32 SDPA reference, fwd + bwd; "
              "a second layout must not recompile the CUDA FlexAttention wrappers")
        other = make_batch(*shape, seed=5, device=dev)
        ref = run(eager(isolate, "sdpa"), ids, q, k, v, torch.float32)
        ref2 = run(eager(isolate, "sdpa"), *other, torch.float32)
        tol = max(3 * max_err(run(eager(isolate, "sdpa"), ids, q, k, v, torch.bfloat16), ref), 1e-2)
        for b in backends:
            try:
                err = max_err(run(eager(isolate, b), ids, q, k, v, torch.bfloat16), ref)
                set_error_on_recompile(True)
                err2 = max_err(run(eager(isolate, b), *other, torch.bfloat16), ref2)
                check(max(err, err2) <= tol, f"{b} eager: max abs error {err:.2e}, second layout {err2:.2e} "
                                             f"(tolerance {tol:.2e})")
            except Exception as e:
                check(False, f"{b} eager: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            finally:
                set_error_on_recompile(False)

    print("\n== isolation: row 0's first whole document unchanged when every other document changes")
    bos = (ids[0] == BOS_ID).nonzero().flatten().tolist() + [args.seq]
    s, e = bos[0], bos[1]
    for b in backends:
        with torch.no_grad():
            qb, kb, vb = (t.bfloat16() for t in (q, k, v))
            base = attend(qb, kb, vb, doc_boundaries(ids, backend=b))[0, s:e]
            ids2, q2, k2, v2 = ids.clone(), qb.clone(), kb.clone(), vb.clone()
            ids2[0, e + 1:: 97] = BOS_ID
            ids2[1:, 5::131] = BOS_ID
            for t in (q2, k2, v2):
                t[0, :s] = torch.randn_like(t[0, :s]) * 5
                t[0, e:] = torch.randn_like(t[0, e:]) * 5
                t[1:] = torch.randn_like(t[1:]) * 5
            out = attend(q2, k2, v2, doc_boundaries(ids2, backend=b))[0, s:e]
            diff = (out.float() - base.float()).abs().max().item()
            check(diff <= 1e-3, f"{b}: document [{s}, {e}) max change {diff:.1e}" + (" (bitwise equal)" if diff == 0 else ""))

    print("\n== timings, bf16 forward + backward of one attention call (ms), boundaries included")
    for isolate in (True, False):
        for b in backends:
            torch._dynamo.reset()

            def step(ids, q, k, v, backend=b, isolate=isolate):
                return attend(q, k, v, doc_boundaries(ids, isolate=isolate, backend=backend))

            step_c = torch.compile(step, fullgraph=True, dynamic=False)
            qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
            try:
                ms = timed(lambda: step_c(ids, qb, kb, vb).sum().backward())
                print(f"  {'isolated' if isolate else 'causal  '} {b:5s} compiled {ms:7.2f}")
            except Exception as e:
                check(False, f"timing {b} isolate={isolate}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    print(f"\n{len(failures)} failure(s)" + "".join(f"\n  {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
