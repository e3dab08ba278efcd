"""LoRA TTT speed probe (issue 8): golf.ttt.score_docs over the documents of one phase, eager or through
TTT_COMPILE's regions, with Dynamo's graph count and compile time. No data, no checkpoint: the model is
train_gpt.py's at the knobs in the environment, randomly initialised (TTT's speed does not depend on
the weights), and the documents are random tokens of the given lengths, or a real val stream (--val):
its document lengths are what decide TTT's time; --replicate K scores K copies of it, a val set K times
larger with the same length mix (the full 50,000-document set has about 30x this shard's). It scores
the first phase of golf.ttt.plan (PHASED_TTT_* from the environment: at the defaults, 833 of the
benchmark set's 1,621 documents; PHASED_TTT_NUM_PHASES=0 for all) and runs no global pass.

  python bench/ttt_probe.py --compile 1 --lengths 2600x64,900x64,300x64     # on the GPU
  python bench/ttt_probe.py --compile 1 --val '/tmp/bench/datasets/bench_sp8192/fineweb_val_[0-9]*.bin'
  TORCH_LOGS=recompiles python bench/ttt_probe.py --compile 1 --trace       # why each graph compiled
  python bench/ttt_probe.py --smoke                                          # CPU self-test, tiny model

Compiled, first `compile_warmup:S` (golf.ttt.warm_up). Every --every seconds a line `progress steps:N
docs:D/T tokens:N seconds:S tokens_per_s:R graphs:G taken_tokens:N` (the rate since the previous
line; taken_tokens: the tokens of the documents started so far), then `ttt_probe done ...` with the
totals (new_triton_kernels: kernels JIT-compiled during the run, the warm-up's misses); with --trace,
one line per forward (window width, rows, seconds since the previous one, graphs so far).
--graphs 0,64 scores everything once without CUDA graphs and once with up to 64 (an A/B in one
process; the bpb must agree); --queries 0,1 likewise without and with the last layer at the scored
rows only (TTT_LAST_LAYER_QUERIES); --kernels 0,1 likewise with the kernels switch off and on
(GOLF_KERNELS: the LoRA products of passes with two LoRA rows through torch._grouped_mm or
kernels/segment_mm.py). With --profile LENxDOCS,..., for each entry one phase of DOCS documents LEN
tokens long (1 document: the chain of 2-row steps of a long document; the slots' count: full steps),
its wall time per step unprofiled (a second run: the first captures graphs), then under the profiler
the kernel time against the wall time per step, kernel launches per step, and the largest kernels
and host operators (golf/profile.py).
--cold-docs N first scores the first N documents once under Python's profiler, before anything else
has run them: what a run pays on first sightings of shapes (the cold first run on an H100 was ~8 s
slower than a warm one) shows as the largest functions by cumulative and by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
import train_gpt as tg  # noqa: E402
from data.shards import load_stream  # noqa: E402
from golf import ttt  # noqa: E402
from golf.bpb import BpbMeter  # noqa: E402
from golf.config import parse_knobs  # noqa: E402
from golf.profile import profile_lines, profile_steps  # noqa: E402
from golf.step_graphs import StepGraphs  # noqa: E402

SMOKE = {"NUM_LAYERS": "3", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "VOCAB_SIZE": "256",
         "LOOP_START": "1", "LOOP_END": "1", "XSA_LAST_N": "1", "PARALLEL_START_LAYER": "2", "ROPE_DIMS": "8",
         "TTT_LORA_RANK": "4", "TTT_BATCH_DOCS": "4"}


def synthetic(lengths: list[int], vocab: int, seed: int) -> np.ndarray:
    """A stream of documents of the given lengths: BOS then random tokens (ids >= 2), one BOS at the end."""
    rng = np.random.default_rng(seed)
    parts = [np.concatenate(([ttt.BOS_ID], rng.integers(2, vocab, n - 1))) for n in lengths]
    return np.concatenate(parts + [[ttt.BOS_ID]]).astype(np.int64)


def parse_lengths(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        n, _, count = part.partition("x")
        out += [int(n)] * int(count or 1)
    return out


def triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache: a count that grows by one per kernel JIT-compiled for the first
    time on this machine (Inductor's at compile time; kernels/*.py's at their first launch)."""
    d = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    return len(list(d.iterdir())) if d.is_dir() else 0


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def cold_profile(model, adapters, tokens, docs, byte_counts, s, device, autocast, step_graphs) -> None:
    """Scores `docs` once under cProfile; prints the wall time and the largest functions."""
    prof, t = cProfile.Profile(), time.perf_counter()
    prof.enable()
    n = ttt.score_docs(model, adapters, tokens, docs, byte_counts, s, BpbMeter(device), device, autocast,
                       graphs=step_graphs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    print(f"cold_profile docs:{len(docs)} tokens:{n} wall:{time.perf_counter() - t:.1f}s (under cProfile)", flush=True)
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(30)
        for line in out.getvalue().splitlines():
            if line.strip():
                print(f"cold_profile {key} {line}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", type=int, default=0, help="1: TTT_COMPILE's regions; 0: eager")
    ap.add_argument("--lengths", default="2600x64,900x64,300x64", help="document lengths, LENxCOUNT,...")
    ap.add_argument("--val", default="", help="score this val stream (a shard glob) instead of synthetic documents")
    ap.add_argument("--replicate", type=int, default=1, help="score this many copies of the documents")
    ap.add_argument("--micro-tokens", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="score the documents once per value of TTT_MICRO_BATCH_TOKENS, in one process")
    ap.add_argument("--graphs", type=lambda v: [int(x) for x in v.split(",")], default=[0],
                    help="score once per value of TTT_CUDA_GRAPHS (0: none), e.g. 0,64: an A/B in one process")
    ap.add_argument("--queries", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="score once per value of TTT_LAST_LAYER_QUERIES (default: the environment's), e.g. 0,1")
    ap.add_argument("--kernels", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="score once per value of the kernels switch (GOLF_KERNELS; default: the environment's), "
                         "e.g. 0,1: the LoRA products through torch._grouped_mm, then kernels/segment_mm.py")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between progress lines")
    ap.add_argument("--trace", action="store_true", help="one line per forward")
    ap.add_argument("--profile", default="", help="then profile phases of LENxDOCS documents, e.g. 4096x1,2048x64")
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (aot_eager backend)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend of the regions")
    ap.add_argument("--cold-docs", type=int, default=0,
                    help="first score this many documents once under cProfile (cold: first sightings of shapes)")
    ap.add_argument("--no-cudnn-sdpa", action="store_true",
                    help="attention without cuDNN's SDPA kernels (PyTorch's flash kernels instead), set before compiling")
    a = ap.parse_args()
    if a.smoke:
        os.environ.update({k: v for k, v in SMOKE.items() if k not in os.environ})
        a.lengths, a.backend = "2600x1,300x4,100x3", "aot_eager"
    if a.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    cfg = parse_knobs(tg.KNOBS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg).to(device)
    tokens = load_stream(a.val).astype(np.int64) if a.val else synthetic(parse_lengths(a.lengths), cfg.vocab_size, cfg.seed)
    if a.replicate > 1:  # copies of the whole stream; its last BOS starts the next copy
        tokens = np.concatenate([tokens[:-1]] * a.replicate + [tokens[-1:]])
    byte_counts = np.ones(len(tokens), dtype=np.int64)
    docs = ttt.split_documents(tokens)
    s = tg.ttt_settings(cfg, len(docs), device)
    order = ttt.plan(docs, s)[0]
    lengths = docs[order, 1] - docs[order, 0]
    window_tokens = sum(int(np.minimum(np.arange(s.chunk, n + s.chunk, s.chunk).clip(max=n), s.seq_len).sum())
                        for n in lengths.tolist())  # unpadded window tokens of every chunk
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = ttt.Adapters(model, s, s.batch_docs, device, a.backend if a.compile else None)
    t0 = time.perf_counter()
    switch = a.kernels or [int(kernels.enabled())]
    if a.compile:  # each switch setting traces its own graphs (Dynamo guards on it): all compiled here
        model.regions = ttt.compiled_regions(a.backend)
        for k in switch:
            kernels.set_enabled(bool(k))
            print(f"compile_warmup:{ttt.warm_up(model, adapters, s, device, autocast):.1f}s kernels:{k} "
                  f"graphs:{graphs()}", flush=True)
    nats = ttt._nats  # the untraced forward, for the profile
    if a.trace:
        last = [time.perf_counter()]

        def traced(model_, x, *args, **kw):
            out = nats(model_, x, *args, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            print(f"  forward width:{x.shape[1]} rows:{x.shape[0]} seconds:{now - last[0]:.3f} graphs:{graphs()}", flush=True)
            last[0] = now
            return out
        ttt._nats = traced
    print(f"ttt_probe device:{device} compile:{a.compile} docs:{len(order)} of {len(docs)} tokens:{int(lengths.sum())} "
          f"window_tokens:{window_tokens} longest:{lengths.max()} chunk:{s.chunk} seq_len:{s.seq_len} "
          f"slots:{s.batch_docs} rank:{s.lora_rank} "
          f"params:{sum(p.numel() for p in model.parameters())}", flush=True)
    taken_lengths = np.concatenate(([0], np.cumsum(lengths)))
    if a.cold_docs:
        cold_profile(model, adapters, tokens, docs[order[: a.cold_docs]], byte_counts, s, device, autocast,
                     StepGraphs(device, a.graphs[0]) if a.graphs[0] else None)
    queries = a.queries or [int(s.last_layer_queries)]
    runs = [(micro, g, q, k) for micro in a.micro_tokens or [s.micro_tokens] for g in a.graphs for q in queries
            for k in switch]
    for micro, graph_cap, q, k in runs:  # shapes are dynamic: no new compiled graphs per setting
        s = dataclasses.replace(s, micro_tokens=micro, last_layer_queries=bool(q))
        kernels.set_enabled(bool(k))
        step_graphs = StepGraphs(device, graph_cap, log=print) if graph_cap else None
        meter, mark = BpbMeter(device), [time.perf_counter(), 0]  # time and tokens at the last line
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def progress(steps, taken, tokens_done):
            now = time.perf_counter()
            if now - mark[0] >= a.every:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    now = time.perf_counter()
                print(f"progress steps:{steps} docs:{taken}/{len(order)} tokens:{tokens_done} "
                      f"seconds:{now - start:.1f} tokens_per_s:{(tokens_done - mark[1]) / (now - mark[0]):.0f} "
                      f"graphs:{graphs()} taken_tokens:{taken_lengths[taken]}", flush=True)
                mark[:] = [now, tokens_done]

        start, jit = time.perf_counter(), triton_cache_entries()
        mark[0] = start
        total = ttt.score_docs(model, adapters, tokens, docs[order], byte_counts, s, meter, device, autocast,
                               on_step=progress, graphs=step_graphs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        scoring = time.perf_counter() - start
        peak = (f" peak_memory:{torch.cuda.max_memory_allocated() // 2**20}MiB"  # reserved: graphs' pools, cache
                f" peak_reserved:{torch.cuda.max_memory_reserved() // 2**20}MiB" if device.type == "cuda" else "")
        print(f"ttt_probe done micro_tokens:{micro} cuda_graphs:{graph_cap} last_layer_queries:{q} kernels:{k} "
              f"tokens:{total} "
              f"scoring:{scoring:.1f}s "
              f"tokens_per_s:{total / scoring:.0f} window_tokens_per_s:{window_tokens / scoring:.0f} "
              f"wall:{time.perf_counter() - t0:.1f}s graphs:{graphs()} new_triton_kernels:{triton_cache_entries() - jit} "
              f"bpb:{meter.result()[1]:.6f}{peak}"
              + (f" step_graphs {step_graphs.stats()}" if step_graphs else ""), flush=True)
    ttt._nats = nats
    for spec, graph_cap, q, k in [(p, g, q, k) for p in filter(None, a.profile.split(",")) for g in a.graphs
                                  for q in queries for k in switch]:
        s = dataclasses.replace(s, last_layer_queries=bool(q))
        kernels.set_enabled(bool(k))
        step_graphs = StepGraphs(device, graph_cap) if graph_cap else None
        length, _, count = spec.partition("x")
        ptokens = synthetic([int(length)] * int(count or s.batch_docs), cfg.vocab_size, cfg.seed + 1)
        pdocs, steps = ttt.split_documents(ptokens), [0]

        def phase():
            ttt.score_docs(model, adapters, ptokens, pdocs, np.ones(len(ptokens), dtype=np.int64), s,
                           BpbMeter(device), device, autocast, on_step=lambda n, *_: steps.__setitem__(0, n),
                           graphs=step_graphs)
        walls = []
        for _ in range(2):  # the first run captures the graphs
            t = time.perf_counter()
            phase()
            if device.type == "cuda":
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - t)
        print(f"profile_phase docs:{len(pdocs)}x{length} cuda_graphs:{graph_cap} last_layer_queries:{q} kernels:{k} "
              f"steps:{steps[0]} wall:{walls[0]:.3f}s then {walls[1]:.3f}s "
              f"ms_per_step:{1000 * walls[1] / steps[0]:.2f} (unprofiled, the second run; the profile is of a third)",
              flush=True)
        for line in profile_lines(profile_steps(phase, 1, device),
                                  f"ttt_{len(pdocs)}x{length}_g{graph_cap}_q{q}_k{k}", top=30):
            print(line, flush=True)
    if a.compile:
        print(torch._dynamo.utils.compile_times(repr="str"), flush=True)
    adapters.remove()


if __name__ == "__main__":
    main()
