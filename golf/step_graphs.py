"""Repeated pieces of work replayed as CUDA graphs.

A TTT pass (forward and backward through 17 layers with the LoRA adapters) launches on the order of a
thousand kernels. On an H100 a step of two rows took 99 ms against about 200 ms for 64 rows, which
points at the host's launching rather than the GPU when few documents are left in the slots
(bench/ttt_probe.py --profile tells the two apart). A CUDA graph launches a captured piece's kernels
at once. Pieces are keyed by what a graph fixes (shapes, flags): a key seen `after` times is captured
and every later piece with that key copies its inputs into the graph's static tensors and replays it.
On the benchmark set's val documents TTT's passes take about 80 distinct shapes, and with 64 graphs
kept about 87% of passes would replay (bench/ttt_schedule.py counts it). At most `capacity` graphs are
kept, least recently used dropped first; they share one memory pool, since they never run at once.

The capture stream is first used for a real run of a piece, which sets up what libraries keep per
stream (cuBLAS workspaces) outside any capture; later pieces run for real on the main stream before
being recorded. Recording launches nothing, so a captured piece's effects happen once.

The contract of a piece `fn(*inputs) -> list of tensors`: it reads per-call data only from `inputs`
(its Python runs once, at capture), never waits for the GPU, and leaves its effects in tensors that
outlive it. A replay's outputs are the graph's own tensors, which the next replay of any graph may
overwrite: use them first. On CPU the "graph" re-runs the captured Python on the static tensors: no
speed-up, but the same contract, so tests on CPU catch a piece that reads anything but its inputs.
"""
from __future__ import annotations

import time
import warnings
from collections import Counter, OrderedDict
from typing import Callable, Hashable, Sequence

import torch

Piece = Callable[..., list[torch.Tensor]]


class StepGraphs:
    def __init__(self, device: torch.device, capacity: int, after: int = 2):
        if capacity < 1 or after < 1:
            raise ValueError(f"StepGraphs: capacity {capacity} and after {after} must be >= 1")
        self.device, self.capacity, self.after = device, capacity, after
        self.cuda = device.type == "cuda"
        # key -> (static inputs, replay: launches the graph and returns its outputs)
        self.graphs: OrderedDict[Hashable, tuple[list[torch.Tensor], Callable[[], list[torch.Tensor]]]] = OrderedDict()
        self.seen: Counter = Counter()
        self.failed: str | None = None  # why capturing stopped, if it did
        self.captures = self.replays = 0
        self.capture_seconds = 0.0  # releasing the cache and recording
        if self.cuda:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(device)
            self.stream_used = False

    def __call__(self, key: Hashable, fn: Piece, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] += 1
            if self.failed is not None or self.seen[key] < self.after:
                return fn(*inputs)
            return self._capture(key, fn, inputs)
        self.graphs.move_to_end(key)
        static, replay = entry
        for dst, src in zip(static, inputs, strict=True):
            dst.copy_(src)
        self.replays += 1
        return replay()

    def _capture(self, key: Hashable, fn: Piece, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Runs the piece for real, then records it."""
        static = [t.clone() for t in inputs]
        if not self.cuda:
            self._keep(key, static, lambda: fn(*static))
            return fn(*static)
        main = torch.cuda.current_stream(self.device)
        if self.stream_used:
            out = fn(*static)
        else:
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                out = fn(*static)
            main.wait_stream(self.stream)
            self.stream_used = True
        # no work in flight while recording: the allocator must not query events of other streams
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        # the graphs' pool cannot take memory the allocator caches for other work, and nothing can be
        # freed while recording: without this, varying pass shapes left ~70 GB cached on an H100 and the
        # third capture ran out of memory (docs/BENCHMARKS.md)
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(self.stream):
                graph.capture_begin(pool=self.pool)
                try:
                    captured = fn(*static)
                finally:
                    graph.capture_end()
        except Exception as e:  # a piece the graph cannot hold: every later piece runs directly
            self.failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            warnings.warn(f"CUDA graph capture failed, work runs without graphs from now on: {self.failed}")
            return out
        self.capture_seconds += time.perf_counter() - t0

        def replay() -> list[torch.Tensor]:
            graph.replay()
            return captured
        self._keep(key, static, replay)
        return out

    def _keep(self, key: Hashable, static: list[torch.Tensor], replay: Callable[[], list[torch.Tensor]]) -> None:
        if len(self.graphs) >= self.capacity:
            self.graphs.popitem(last=False)
        self.graphs[key] = (static, replay)
        self.captures += 1

    def summary(self) -> dict:
        return {"graphs": len(self.graphs), "captures": self.captures, "replays": self.replays,
                "capture_seconds": self.capture_seconds, "failed": self.failed}

    def stats(self) -> str:
        return (f"graphs:{len(self.graphs)} captures:{self.captures} replays:{self.replays} "
                f"capture_seconds:{self.capture_seconds:.2f}" + (f" failed:{self.failed}" if self.failed else ""))
