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

The pool is reserved whole, `pool_fraction` of the device's memory in one block, before the first
capture. Graphs' temporaries are then carved from one segment and merge back when freed. Grown capture
by capture instead, each wider pass found every freed block too small and added segments of its own:
on an H100, six captures of growing width reserved 41 GB for graphs that kept 64 MB, and the next
ordinary pass ran out of memory. A capture that outgrows the reservation (or runs out of memory) is
not kept: the pool is released and reserved afresh (the other graphs are recaptured as their keys come
back), and that key runs uncaptured from then on. On a device with less than 70 GiB nothing is
captured: ordinary passes of the default TTT settings alone peak near 30 GB.

Every piece runs for real on the capture stream just before it is recorded (recording launches
nothing, so its effects happen once): what libraries allocate per stream on first use (cuBLAS keeps a
64 MB workspace) then comes from ordinary memory, not from the pool, where it would pin the pool's
reservation for good.

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
POOL_SLACK = 2**29  # bytes a pool may grow beyond its reservation: the small blocks of graphs' outputs
MIN_DEVICE_BYTES = 70 * 2**30  # below this, the reservation would leave too little for ordinary passes


class StepGraphs:
    def __init__(self, device: torch.device, capacity: int, after: int = 2,
                 log: Callable[[str], None] | None = None, pool_fraction: float = 0.35):
        if capacity < 1 or after < 1:
            raise ValueError(f"StepGraphs: capacity {capacity} and after {after} must be >= 1")
        self.device, self.capacity, self.after = device, capacity, after
        self.cuda = device.type == "cuda"
        # key -> (static inputs, replay: launches the graph and returns its outputs)
        self.graphs: OrderedDict[Hashable, tuple[list[torch.Tensor], Callable[[], list[torch.Tensor]]]] = OrderedDict()
        self.seen: Counter = Counter()
        self.too_big: set[Hashable] = set()  # keys whose capture outgrew the pool: never captured again
        self.failed: str | None = None  # why capturing stopped, if it did
        self.captures = self.replays = self.pool_resets = 0
        self.capture_seconds = 0.0  # reserving the pool and recording
        self.log = log  # a line per capture: its key, seconds and memory
        if self.cuda:
            total = torch.cuda.get_device_properties(device).total_memory
            self.pool_bytes = int(pool_fraction * total)
            if total < MIN_DEVICE_BYTES:  # TTT's ordinary passes alone peak near 30 GB on an H100
                self.failed = f"{total / 2**30:.0f} GiB of device memory, graphs need {MIN_DEVICE_BYTES / 2**30:.0f}"
            self.pool = self.reservation = None  # both made at the first capture
            self.grown = 0  # bytes the pool took beyond its reservation
            self.stream = torch.cuda.Stream(device)

    def __call__(self, key: Hashable, fn: Piece, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] += 1
            if self.failed is not None or self.seen[key] < self.after or key in self.too_big:
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
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            out = fn(*static)
        main.wait_stream(self.stream)
        # no work in flight while recording: the allocator must not query events of other streams
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        if self.reservation is None:
            try:
                self._reserve()
            except torch.OutOfMemoryError:  # no room for graphs at all: every later piece runs directly
                self.pool = self.reservation = None
                self.failed = f"no room for the graphs' pool of {self.pool_bytes >> 20} MiB"
                torch.cuda.empty_cache()
                return out
        graph = torch.cuda.CUDAGraph()
        try:
            before = torch.cuda.memory_reserved(self.device)
            with torch.cuda.stream(self.stream):
                graph.capture_begin(pool=self.pool)
                try:
                    captured = fn(*static)
                finally:
                    graph.capture_end()
        except torch.OutOfMemoryError:
            del graph
            self._drop_pool(key)
            return out
        except Exception as e:  # a piece the graph cannot hold: every later piece runs directly
            self.failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            warnings.warn(f"CUDA graph capture failed, work runs without graphs from now on: {self.failed}")
            return out
        seconds = time.perf_counter() - t0
        self.capture_seconds += seconds
        reserved = torch.cuda.memory_reserved(self.device)
        self.grown += reserved - before  # nothing is freed while recording
        if self.log is not None:
            self.log(f"graph_capture key:{key} seconds:{seconds:.3f} pool_grown:{self.grown >> 20}MiB "
                     f"reserved:{reserved >> 20}MiB "
                     f"allocated:{torch.cuda.memory_allocated(self.device) >> 20}MiB")
        if self.grown > POOL_SLACK:
            del graph, captured
            self._drop_pool(key)
            return out

        def replay() -> list[torch.Tensor]:
            graph.replay()
            return captured
        self._keep(key, static, replay)
        return out

    def _reserve(self) -> None:
        """A new pool holding one free block of `pool_bytes`, kept alive by an empty graph that
        allocated and freed it (a pool lives while a graph captured into it does). The allocator's
        cache is emptied first: a pool cannot take memory cached for other work."""
        torch.cuda.empty_cache()
        self.pool, self.reservation, self.grown = torch.cuda.graph_pool_handle(), torch.cuda.CUDAGraph(), 0
        with torch.cuda.stream(self.stream), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*empty")  # the graph has no work, by design
            self.reservation.capture_begin(pool=self.pool)
            try:
                torch.empty(self.pool_bytes, dtype=torch.uint8, device=self.device)
            finally:
                self.reservation.capture_end()

    def _drop_pool(self, key: Hashable) -> None:
        """`key` does not fit the pool: every graph goes, with the pool; the key is never captured again."""
        self.too_big.add(key)
        self.graphs.clear()
        self.pool = self.reservation = None
        self.pool_resets += 1
        torch.cuda.empty_cache()

    def _keep(self, key: Hashable, static: list[torch.Tensor], replay: Callable[[], list[torch.Tensor]]) -> None:
        if len(self.graphs) >= self.capacity:
            self.graphs.popitem(last=False)
        self.graphs[key] = (static, replay)
        self.captures += 1

    def summary(self) -> dict:
        return {"graphs": len(self.graphs), "captures": self.captures, "replays": self.replays,
                "capture_seconds": self.capture_seconds, "pool_resets": self.pool_resets,
                "uncaptured_keys": len(self.too_big), "failed": self.failed}

    def stats(self) -> str:
        return (f"graphs:{len(self.graphs)} captures:{self.captures} replays:{self.replays} "
                f"capture_seconds:{self.capture_seconds:.2f}"
                + (f" pool_resets:{self.pool_resets} uncaptured_keys:{len(self.too_big)}" if self.pool_resets else "")
                + (f" failed:{self.failed}" if self.failed else ""))
