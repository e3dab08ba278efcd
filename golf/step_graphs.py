"""Repeated steps replayed as CUDA graphs.

A TTT step (each pass's forward and backward through 17 layers, then the adapters' AdamW) launches
on the order of a thousand kernels. On an H100 a step of two rows took 99 ms against about 200 ms for
64 rows, which points at the host's launching rather than the GPU when few documents are left in the
slots (bench/ttt_probe.py --profile tells the two apart). A CUDA graph launches a captured step's
kernels at once. Steps are keyed by their shapes: a key that comes `after` steps in a row is
captured (a long document's chain of steps, or full slots of long documents, repeat one key for
hundreds of steps; keys that change every step or two would cost captures that never replay). The
capture follows one real run of that step on the capture stream (its first use sets up library
state, such as cuBLAS workspaces, that a capture must not see), and each later step with the key
copies its inputs into the graph's static tensors and replays it. At most `capacity` graphs are
kept, least recently used dropped first; they share one memory pool, since they never run at once.

The contract of a captured step `fn(*inputs) -> list of tensors`: it reads per-step data only from
`inputs` (its Python runs once, at capture), never waits for the GPU, and leaves its effects in
tensors that outlive it. A replay's outputs are the graph's own tensors: use them before the next
step. On CPU the "graph" re-runs the captured Python on the static tensors: no speed-up, but the same
contract, so tests on CPU catch a step that reads anything but its inputs.
"""
from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch

Step = Callable[..., list[torch.Tensor]]


class StepGraphs:
    def __init__(self, device: torch.device, capacity: int, after: int = 3):
        if capacity < 1 or after < 1:
            raise ValueError(f"StepGraphs: capacity {capacity} and after {after} must be >= 1")
        self.device, self.capacity, self.after = device, capacity, after
        self.cuda = device.type == "cuda"
        # key -> (static inputs, replay: launches the graph and returns its outputs)
        self.graphs: OrderedDict[Hashable, tuple[list[torch.Tensor], Callable[[], list[torch.Tensor]]]] = OrderedDict()
        self.last, self.streak = None, 0  # the previous step's key and how many steps in a row had it
        self.failed: str | None = None  # why capturing stopped, if it did
        self.captures = self.replays = 0
        self.capture_seconds = 0.0  # recording only (each capture also synchronises and frees cached memory)
        if self.cuda:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(device)

    def __call__(self, key: Hashable, fn: Step, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.streak = self.streak + 1 if key == self.last else 1
        self.last = key
        entry = self.graphs.get(key)
        if entry is None:
            if self.failed is not None or self.streak < self.after:
                return fn(*inputs)
            return self._capture(key, fn, inputs)
        self.graphs.move_to_end(key)
        static, replay = entry
        for dst, src in zip(static, inputs, strict=True):
            dst.copy_(src)
        self.replays += 1
        return replay()

    def _capture(self, key: Hashable, fn: Step, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Runs this step for real on the capture stream, then records it: recording launches nothing,
        so the step's effects happen once."""
        static = [t.clone() for t in inputs]
        if not self.cuda:
            self._keep(key, static, lambda: fn(*static))
            return fn(*static)
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            out = fn(*static)
        main.wait_stream(self.stream)
        graph, t0 = torch.cuda.CUDAGraph(), time.perf_counter()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                captured = fn(*static)
            self.capture_seconds += time.perf_counter() - t0
        except Exception as e:  # a step the graph cannot hold: every later step runs directly
            self.failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
            warnings.warn(f"CUDA graph capture failed, steps run without graphs from now on: {self.failed}")
            return out

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
                f"capture_seconds:{self.capture_seconds:.2f}"
                + (f" failed:{self.failed}" if self.failed else ""))
