"""Training data: the train shards packed into rows of documents, prepared in a background thread.

Packing policy. The shards, in name order, form one stream of documents (each starts with its BOS
token), repeated endlessly: after the last shard comes the first again. Rows are filled with whole
documents in stream order; a document longer than the space left in a row is split, the part that
fits ends the row and the rest starts the next row. Nothing is dropped, reordered or padded, so row
n (numbered from the start of the stream, over all steps) is exactly the stream window

    tokens[n * seq_len : n * seq_len + seq_len + 1]      inputs = window[:-1], targets = window[1:]

and consecutive rows share one token: a row's last target is the next row's first input. Every
token is therefore an input once and a target once. BOS tokens stay where they are; the attention
(golf/attention.py) finds the documents from them, and treats a row's first token as the start of a
segment, so a document continued from the previous row restarts without its earlier context.

Distribution. Optimizer step s takes the next R = global_tokens / seq_len rows, s*R ... s*R + R - 1.
Micro-step i of rank r takes rows_per_micro = R / (world * accum) consecutive rows starting at
s*R + (i*world + r) * rows_per_micro. Hence every (world, accum) split with the same global_tokens
trains on the same rows per step: 1 rank with accumulation 8 sees exactly what 8 ranks see. Each
rank reads only its own rows, by position, so there is no shared cursor to keep in sync.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from data.shards import load_shard, read_header, shard_paths


class _Failure:
    """What the prefetch thread hands over instead of a batch when it fails."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class PackedLoader:
    """next_batch() -> `accum` pairs (inputs, targets), each [rows_per_micro, seq_len] int64 on
    `device`: this rank's share of the next optimizer step. reset() replays from the first step."""

    def __init__(self, pattern: str, seq_len: int, global_tokens: int, accum: int = 1, rank: int = 0,
                 world: int = 1, device: torch.device | str = "cpu", prefetch: int = 2):
        if seq_len <= 0 or accum <= 0 or world <= 0 or not 0 <= rank < world:
            raise ValueError(f"expected seq_len > 0, accum > 0 and 0 <= rank < world; got seq_len={seq_len}, "
                             f"accum={accum}, rank={rank}, world={world}")
        split = seq_len * world * accum
        if global_tokens <= 0 or global_tokens % split:
            raise ValueError(f"global_tokens={global_tokens} must be a positive multiple of "
                             f"seq_len*world*accum = {seq_len}*{world}*{accum} = {split}")
        self.paths = shard_paths(pattern)
        sizes = np.array([read_header(p) for p in self.paths], dtype=np.int64)
        if sizes.sum() == 0:
            raise ValueError(f"shards matching {pattern} hold no tokens")
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # stream offset of each shard
        self.total = int(self.starts[-1])
        self.seq_len, self.accum, self.rank, self.world = seq_len, accum, rank, world
        self.rows_per_step = global_tokens // seq_len
        self.rows_per_micro = self.rows_per_step // (world * accum)
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"  # pinned host memory makes the copy asynchronous
        self.prefetch = prefetch
        self._open: dict[int, np.ndarray] = {}  # memmaps of the shards in use (the thread's alone)
        self._thread: threading.Thread | None = None
        self._start(0)

    # ------------------------------------------------------------------ reading (prefetch thread)
    def _shard(self, i: int) -> np.ndarray:
        if i not in self._open:
            if len(self._open) >= 2:  # a span touches at most a few shards; drop the oldest
                self._open.pop(next(iter(self._open)))
            self._open[i] = load_shard(self.paths[i])  # validated again: a file changed since start fails here
        return self._open[i]

    def _read(self, pos: int, n: int, out: np.ndarray) -> None:
        """Stream tokens [pos, pos + n) (wrapping around the shards) into `out`."""
        done = 0
        while done < n:
            p = (pos + done) % self.total
            i = int(np.searchsorted(self.starts, p, side="right")) - 1  # skips empty shards
            local = p - int(self.starts[i])
            take = min(n - done, int(self.starts[i + 1]) - p)
            out[done:done + take] = self._shard(i)[local:local + take]
            done += take

    def _host_step(self, step: int) -> list[torch.Tensor]:
        """This rank's micro-batches of `step` as flat host spans of rows_per_micro*seq_len + 1 tokens."""
        spans = []
        n = self.rows_per_micro * self.seq_len + 1
        for i in range(self.accum):
            row = step * self.rows_per_step + (i * self.world + self.rank) * self.rows_per_micro
            buf = torch.empty(n, dtype=torch.int64, pin_memory=self.pin)
            self._read(row * self.seq_len, n, buf.numpy())
            spans.append(buf)
        return spans

    @staticmethod
    def _put(q: queue.Queue, item, stop: threading.Event) -> None:
        while not stop.is_set():  # a timed put, so that close() can stop a thread that is ahead
            try:
                q.put(item, timeout=0.05)
                return
            except queue.Full:
                pass

    def _work(self, q: queue.Queue, stop: threading.Event, step: int) -> None:
        try:
            while not stop.is_set():
                self._put(q, self._host_step(step), stop)
                step += 1
        except BaseException as e:  # handed to the main thread, which raises it in next_batch()
            self._put(q, _Failure(e), stop)

    # ------------------------------------------------------------------ control (main thread)
    def _start(self, step: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)  # a fresh queue: no stale batches
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._work, args=(self._queue, self._stop, step),
                                        name="PackedLoader-prefetch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stops the prefetch thread (next_batch() then needs a reset())."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._open.clear()

    def reset(self) -> None:
        """Back to step 0 (after compile priming): stops the thread, discards what it prepared."""
        self.close()
        self._start(0)

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._failure is not None:
            raise self._failure
        if self._thread is None:
            raise RuntimeError("PackedLoader is closed; call reset() to start again")
        item = self._queue.get()
        if isinstance(item, _Failure):
            self._failure = item.exc
            self._thread.join()
            if hasattr(item.exc, "add_note"):  # its traceback already shows the thread's frames
                item.exc.add_note("(raised in PackedLoader's prefetch thread)")
            raise item.exc
        batches = []
        for span in item:
            t = span.to(self.device, non_blocking=self.pin)
            batches.append((t[:-1].view(-1, self.seq_len), t[1:].view(-1, self.seq_len)))
        return batches
