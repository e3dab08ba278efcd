"""Score-first test-time training (SPEC.md sections 5-6): LoRA per document, and phased global SGD.

Legality by construction: a chunk of a document is scored (its losses enter the meter) before any
optimizer step uses it, adapters start fresh for every batch of documents, and the global SGD pass
only ever trains on documents that are already scored. Each document is its own sequence: its context
is its own prefix (up to `seq_len` tokens), never another document, whether its window has a row of
its own or shares a packed row with other windows (attention, rotary positions, the smear and the
adapters all restart at every window; see _packed_passes).

Documents. Document i covers inputs tokens[start_i:end_i] and targets tokens[start_i+1:end_i+1], with
end_i the next BOS (whose prediction ends document i) or the end of the stream, so the documents'
targets are exactly the stream's targets, each once: TTT scores the same tokens as plain evaluation.

Order. Phase boundaries (document counts) split the stream's documents in stream order; inside a
phase documents are taken longest first (stable by position). Scoring is continuous batching:
`batch_docs` slots each hold one document, every step scores the current chunk of every slot, and a
slot whose document is done takes the next one at once, so long documents never leave the GPU with a
handful of rows. Ranks take documents from a shared counter, so which rank scores a document depends
on timing, but its score does not. After each phase every rank joins a global SGD pass over all
documents scored so far, which updates the base model for the next phase.

Adapters. Batched LoRA (one adapter per slot, A [S, in, r] random, B [S, r, out] zero) on chosen
projections, added by forward hooks, so the forward is the model's own forward: at zero adapters the
TTT logits equal the plain logits bit for bit. Every document starts from the same adapter values and
has its own AdamW step count; AdamW is elementwise and the loss is a sum of per-document means, so a
document's scores do not depend on the other documents scored beside it.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from golf.attention import doc_boundaries, packed_doc_info
from golf.bpb import BpbMeter
from golf.dist import all_reduce_, rank_and_world
from golf.evaluate import rank_range
from golf.step_graphs import StepGraphs
from kernels.segment_mm import segment_mm

BOS_ID = 1
# the adapters' leaves are strided views of flat buffers and their gradients the same views of another
# on purpose (BatchedLoRA.bind): autograd's layout advice for such leaves does not apply
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
# LoRA target name -> attribute path inside a block; "head" is the tied LM head (GPT.logits' head_delta)
BLOCK_TARGETS = {"q": "attn.c_q", "k": "attn.c_k", "v": "attn.c_v", "o": "attn.proj", "fc": "mlp.fc", "proj": "mlp.proj"}
TARGETS = tuple(BLOCK_TARGETS) + ("head",)
QUERY_SIDE = ("q", "o", "fc", "proj")  # a pruned last layer runs these at its query rows only (k, v at every row)
LAYOUTS = ("auto", "packed", "rows")
_CALLS = 0
_COPIES = 0


@dataclass(frozen=True)
class TTTSettings:
    chunk: int = 48
    seq_len: int = 2048
    batch_docs: int = 64  # slots: documents scored at once, one adapter each
    lora_rank: int = 96
    lora_alpha: float = 96.0
    targets: tuple[str, ...] = ("k", "o", "fc", "proj", "head")
    lr: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.999
    weight_decay: float = 0.5
    phase_ends: tuple[int, ...] = ()  # cumulative document counts after which a global pass runs
    global_lr: float = 1e-3
    global_momentum: float = 0.9
    global_epochs: int = 1
    global_batch_seqs: int = 32
    global_micro_tokens: int = 32768  # most tokens per forward/backward of the global pass (exact: accumulated)
    global_grad_clip: float = 1.0
    pad_multiple: int = 64  # rows layout: windows are right-padded to a multiple of this (few distinct shapes)
    micro_tokens: int = 65536  # most window tokens per forward/backward; a step's rows split into passes
    seed: int = 0
    compile: bool = False  # LoRA scoring runs the layers through torch.compile'd regions (dynamic shapes)
    graphs: int = 0  # most pass shapes kept as CUDA graphs (golf/step_graphs.py); 0: none
    layout: str = "auto"  # packed | rows | auto (packed on CUDA for models that allow it); see score_docs
    pack_bucket: int = 4096  # packed passes are [1, T] with T a multiple of this (few shapes)
    last_layer_queries: bool = True  # packed passes run the model's last layer at the scored rows only (_pack)

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"TTT_LORA_TARGETS: unknown {unknown}; choose from {','.join(TARGETS)}")
        if self.chunk <= 0 or self.seq_len < self.chunk:
            raise ValueError(f"TTT_CHUNK_SIZE={self.chunk} must be in 1..TTT_EVAL_SEQ_LEN={self.seq_len}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"TTT_LAYOUT={self.layout!r}: expected one of {', '.join(LAYOUTS)}")
        if self.pack_bucket <= 0 or self.pack_bucket % self.pad_multiple:
            raise ValueError(f"TTT_PACK_BUCKET={self.pack_bucket} must be a positive multiple of the pad multiple {self.pad_multiple}")
        if list(self.phase_ends) != sorted(set(self.phase_ends)) or any(p <= 0 for p in self.phase_ends):
            raise ValueError(f"phase boundaries {self.phase_ends} must be increasing positive document counts")


def phase_ends(prefix: float, phases: int, n_docs: int) -> tuple[int, ...]:
    """Document counts after which the global passes run: `phases` even steps up to `prefix`
    documents (a count >= 1, or a fraction of the val set's documents below 1), e.g. 2500 over 3
    phases gives 833, 1666, 2500. Counts are capped at the number of documents."""
    if phases <= 0 or prefix <= 0:
        return ()
    total = prefix * n_docs if prefix < 1 else prefix
    ends = sorted({min(n_docs, max(1, int(total * k / phases))) for k in range(1, phases + 1)})
    return tuple(ends)


def split_documents(tokens: np.ndarray) -> np.ndarray:
    """[n, 2] (start, end) per document: inputs tokens[start:end], targets tokens[start+1:end+1]."""
    n = len(tokens)
    starts = np.flatnonzero(np.asarray(tokens[: n - 1]) == BOS_ID)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate(([0], starts))
    ends = np.append(starts[1:], n - 1)
    return np.stack((starts, ends), axis=1).astype(np.int64)


def plan(docs: np.ndarray, s: TTTSettings, world: int = 1) -> list[np.ndarray]:
    """Phases, each the indices of its documents in the order they are taken. A phase holds the next
    documents of the stream (as the public phase boundaries count them); inside it, documents are
    taken longest first, so the long ones start early instead of ending up alone at the tail, and
    dealt over `world` ranks (deal)."""
    lengths = docs[:, 1] - docs[:, 0]
    phases, lo = [], 0
    for hi in [e for e in s.phase_ends if e < len(docs)] + [len(docs)]:
        idx = np.arange(lo, hi)
        longest_first = idx[np.lexsort((idx, -lengths[lo:hi]))]
        phases.append(longest_first[deal(hi - lo, world, s.batch_docs)])
        lo = hi
    return phases


def deal(n: int, world: int, slots: int) -> np.ndarray:
    """The take order of a phase's n documents (positions in longest-first order) over `world` ranks
    of `slots` slots. Each rank's first take is a run of ceil(n / world) positions at most (_Counter),
    and the first world * slots positions hold every world-th document in turn, so the ranks' first
    takes share the longest documents: taken in plain order, the first rank's 64 would be the
    phase's 64 longest (on the local val shard's lengths, 2.7x a rank's share of an 833-document
    phase's tokens) and every rank would wait for it at the global pass. One rank: plain order."""
    first = min(n, world * slots)
    head = [np.arange(b, first, world) for b in range(world)]
    return np.concatenate(head + [np.arange(first, n)]).astype(np.int64)


class BatchedLoRA(nn.Module):
    """delta(x) = (x @ A) @ B * alpha / r with one (A, B) per slot: A [S, in, r] and B [S, r, out] view
    columns `at`.. of each slot's row of the flat [S, N] buffers of `Adapters` (gA, gB its
    gradients), which reset, select and step them. A pass runs on leaves `bind` views from a [K, N]
    buffer of its rows (the slots' own rows in place, or a gathered copy), whose gradients accumulate
    into the same views of a [K, N] gradient buffer: every pass's leaves have the same strides, so the
    compiled regions take one graph for both kinds (Dynamo guards on strides)."""

    def __init__(self, at: int, d_in: int, r: int, d_out: int, P: torch.Tensor, G: torch.Tensor, scale: float,
                 query_side: bool = False):
        super().__init__()
        self.at, self.dims = at, (d_in, r, d_out)
        self.A, self.B = self.views(P)
        self.gA, self.gB = self.views(G)
        self.scale = scale
        self.active = True  # off during the global pass, which trains the base model alone
        self.a: torch.Tensor | None = None  # the current pass's rows of A and B
        self.b: torch.Tensor | None = None
        self.ends: torch.Tensor | None = None  # packed passes: where each row's tokens end (kernels/segment_mm.py)
        self.query_side = query_side  # runs at a pruned last layer's query rows (Adapters.select binds their ends)

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This adapter's A [K, in, r] and B [K, r, out] inside the rows of a [K, N] buffer."""
        (d_in, r, d_out), k, mid = self.dims, buf.shape[0], self.at + self.dims[0] * self.dims[1]
        return buf[:, self.at : mid].view(k, d_in, r), buf[:, mid : mid + r * d_out].view(k, r, d_out)

    def bind(self, src: torch.Tensor | None, grads: torch.Tensor | None, ends: torch.Tensor | None) -> None:
        """The next pass's rows: leaves viewing src [K, N] (None: A and B, untrained), trained if `grads`
        [K, N] is given: their .grad are its views, and autograd adds into an existing .grad in place."""
        self.ends, self.a, self.b = ends, None, None
        if src is not None:
            self.a, self.b = (v.detach().requires_grad_(grads is not None) for v in self.views(src))
            if grads is not None:
                self.a.grad, self.b.grad = self.views(grads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = (self.A, self.B) if self.a is None else (self.a, self.b)
        if self.ends is None:  # x [rows, W, in]: one adapter per row
            return (x @ A.to(x.dtype)) @ B.to(x.dtype) * self.scale
        # packed [1, T, in]: one adapter per row's run of tokens. Autocast does not cover grouped
        # matmuls, so its dtype is applied here (the normed inputs arrive in float32)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        delta = segment_mm(segment_mm(flat, A.to(dtype), self.ends), B.to(dtype), self.ends)
        return (delta * self.scale).view(*x.shape[:-1], -1)


class Adapters:
    """LoRA adapters hooked into a GPT's projections, one per slot (a document being scored), with
    their AdamW state. All of them live in flat [slots, N] buffers (parameters, gradients, moments,
    per-slot step counts), so a slot that takes a new document resets one row and the optimizer step
    is a few elementwise passes however many adapters there are. Every document starts from the same
    values (A uniform in +-1/sqrt(in) from `s.seed`, B zero) whatever slot it lands in, so its scores
    do not depend on which documents share its passes."""

    def __init__(self, model: nn.Module, s: TTTSettings, slots: int, device, backend: str | None = None):
        self.s, self.loras, self.hooks, self.head = s, [], [], None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # gathered rows and their gradients
        r = s.lora_rank
        query_block = _query_block(model)
        targets = [(block.get_submodule(BLOCK_TARGETS[t]), block.get_submodule(BLOCK_TARGETS[t]).in_features,
                    block.get_submodule(BLOCK_TARGETS[t]).out_features, b == query_block and t in QUERY_SIDE)
                   for b, block in enumerate(model.blocks) for t in s.targets if t != "head"]
        if "head" in s.targets:
            V, D = model.tok_emb.weight.shape
            targets.append((None, D, V, False))
        n = sum(r * (d_in + d_out) for _, d_in, d_out, _ in targets)
        self.P = torch.zeros(slots, n, device=device)
        self.G = torch.zeros_like(self.P)
        self.M = torch.zeros_like(self.P) if s.beta1 > 0 else None  # beta1 = 0: the moment is the gradient
        self.V = torch.zeros_like(self.P)
        self.t = torch.zeros(slots, device=device)  # AdamW steps of each slot's document
        init, g, off = torch.zeros(n), torch.Generator().manual_seed(s.seed), 0
        for module, d_in, d_out, query_side in targets:
            bound = 1 / math.sqrt(d_in)
            init[off : off + d_in * r] = torch.rand(d_in * r, generator=g) * 2 * bound - bound
            lora = BatchedLoRA(off, d_in, r, d_out, self.P, self.G, s.lora_alpha / r, query_side)
            off += r * (d_in + d_out)
            self.loras.append(lora)
            if module is None:
                self.head = lora
            else:
                self.hooks.append(module.register_forward_hook(_add_delta(lora)))
        self.init = init.to(device)
        self.compiled = backend is not None
        self.row_adamw, self.masked_adamw = (
            torch.compile(f, dynamic=True, fullgraph=True, backend=backend) if backend else f
            for f in (_row_adamw, _masked_adamw))
        self.reset()

    def reset(self, slots: np.ndarray | None = None) -> None:
        """Fresh adapters and optimizer state for the given slots (all by default)."""
        rows = slice(None) if slots is None else _to_device(np.asarray(slots, dtype=np.int64), self.P.device)
        with torch.no_grad():
            for buf in (self.G, self.M, self.V):
                if buf is not None:
                    buf[rows] = 0
            self.P[rows] = self.init
            self.t[rows] = 0

    def slot_rows(self, slots: np.ndarray) -> torch.Tensor:
        """The given slots as int64 indices on the adapters' device, what `step` takes: padded to a
        power of two (at least 2: Dynamo specialises sizes of 1) by repeating the first, so AdamW
        steps take few shapes and one graph (a repeated slot is stepped once: every copy writes the
        same update from the same old values)."""
        k = max(2, 1 << (len(slots) - 1).bit_length())
        rows = np.concatenate((slots, np.full(k - len(slots), slots[0]))).astype(np.int64)
        return _to_device(rows, self.P.device)

    def step(self, rows: torch.Tensor) -> None:
        """One AdamW step (torch.optim.AdamW's arithmetic, step counts per slot) for the slots in
        `rows` (see slot_rows); the other slots keep their values and state. Gradients are zeroed for
        the next chunk (the other slots have none: rows that do not train add zero gradients, and a
        slot's next document starts from reset)."""
        s = self.s
        slots, n = self.P.shape
        # more than half the slots: one masked in-place pass over every row moves less memory than
        # gathering the rows and scattering them back (H100, 64 slots: 3.6 ms against 2 kernels, 7.7 ms)
        masked = 2 * rows.shape[0] > slots
        cols = n if self.compiled else max(1, 2**24 // (slots if masked else rows.shape[0]))  # eager: bounded temporaries
        with torch.no_grad():
            if masked:
                on = torch.zeros(slots, 1, dtype=torch.bool, device=rows.device).index_fill_(0, rows, True)
                t = self.t[:, None] + on
            else:
                t = self.t[rows] + 1
            for c in range(0, n, cols):
                part = slice(c, c + cols)
                args = (self.P[:, part], self.G[:, part], None if self.M is None else self.M[:, part], self.V[:, part])
                if masked:
                    self.masked_adamw(*args, t, on, s.lr, s.beta1, s.beta2, s.weight_decay)
                else:
                    self.row_adamw(*args, t[:, None], rows, s.lr, s.beta1, s.beta2, s.weight_decay)
            if masked:
                self.t.copy_(t[:, 0])
            else:
                self.t.index_copy_(0, rows, t)

    def select(self, rows: torch.Tensor | None, grad: bool = False, ends: torch.Tensor | None = None,
               every_slot: bool = False, query_ends: torch.Tensor | None = None) -> None:
        """The slots of the next pass's rows, trained if `grad`: `rows` (gathered copies; their
        gradients reach G through store_grads), None (every slot in order, untrained), or
        `every_slot` (row g is slot g: P's rows in place, gradients straight into G). `ends`: the pass
        is packed and row i's tokens end at ends[i] (the head's rows are never packed);
        `query_ends`: the same over the query rows, for the adapters that run at those only."""
        self.pending = None
        if every_slot:
            src, grads = self.P, self.G if grad else None
        elif rows is None:
            src = grads = None
        else:
            src = self.P[rows]
            grads = torch.zeros_like(src) if grad else None
            self.pending = (rows, grads) if grad else None
        for lora in self.loras:
            lora.bind(src, grads, None if lora is self.head else query_ends if lora.query_side and query_ends is not None
                      else ends)

    def store_grads(self) -> None:
        """After a pass's backward: gathered rows' gradients into G at their slots (a slot listed twice
        adds both, as autograd would)."""
        if self.pending is not None:
            rows, grads = self.pending
            with torch.no_grad():
                self.G.index_add_(0, rows, grads)
            self.pending = None

    def enable(self, on: bool) -> None:
        for lora in self.loras:
            lora.active = on

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _row_adamw(P, G, M, V, t, rows, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float = 1e-8):
    """AdamW (decoupled weight decay, bias-corrected moments) on rows `rows` of P, each with its step
    count t [K, 1] (this step's); in place, G's rows zeroed. M None: beta1 is 0 and the first moment
    is G. Compiled, the gathers, the update and the scatters are one kernel over the K rows."""
    g = G[rows]
    m = g if M is None else torch.lerp(M[rows], g, 1 - beta1)
    v = V[rows] * beta2 + g * g * (1 - beta2)
    bc1 = 1 - torch.pow(beta1, t)
    bc2 = 1 - torch.pow(beta2, t)
    P.index_copy_(0, rows, P[rows] * (1 - lr * weight_decay) - (lr / bc1) * m / (v.sqrt() / bc2.sqrt() + eps))
    V.index_copy_(0, rows, v)
    if M is not None:
        M.index_copy_(0, rows, m)
    G.index_fill_(0, rows, 0)


def _masked_adamw(P, G, M, V, t, on, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float = 1e-8):
    """_row_adamw's step on the rows of P where `on` [S, 1] is set, in place over all rows; t [S, 1]:
    the rows' step counts, this step's where `on`. Every row of G is zeroed: rows not stepped hold no
    gradient (they did not train this chunk). Compiled, one kernel reads and writes each buffer once."""
    m = G if M is None else torch.lerp(M, G, 1 - beta1)
    v = V * beta2 + G * G * (1 - beta2)
    t = t.clamp_min(1)  # rows never stepped have t = 0: their (discarded) update must not divide by 0
    bc1 = 1 - torch.pow(beta1, t)
    bc2 = 1 - torch.pow(beta2, t)
    P.copy_(torch.where(on, P * (1 - lr * weight_decay) - (lr / bc1) * m / (v.sqrt() / bc2.sqrt() + eps), P))
    V.copy_(torch.where(on, v, V))
    if M is not None:
        M.copy_(torch.where(on, m, M))
    G.zero_()


def _add_delta(lora: BatchedLoRA):
    def hook(module, args, out):
        return out + lora(args[0]) if lora.active else out
    return hook


def _region_call(fn, *args):
    return fn(*args)


def compiled_regions(backend: str = "inductor") -> Callable:
    """A compiled `fn(*args)` for the model's `regions` hook (train_gpt.GPT.hidden runs its input, every
    layer and its output through it), with shapes dynamic: TTT windows change rows and width every
    chunk. Each call returns a fresh copy of the function (its own code object, so its own graph
    cache): graphs traced with one evaluation's LoRA hooks are never reused by another evaluation
    or by training (Dynamo does not guard on hooks)."""
    global _COPIES
    _COPIES += 1
    code = _region_call.__code__.replace(co_name=f"ttt_region_{_COPIES}")
    fn = type(_region_call)(code, _region_call.__globals__, code.co_name)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)

    def static(a):
        """Slices of parameters (skip weights, lane lambdas; a few numbers each) as static copies: a
        dynamic (2, 2) lambda, or its parameter as the view's base, would be unified with a batch of
        2 rows and specialise the graph to it."""
        if isinstance(a, torch.Tensor) and isinstance(a._base, nn.Parameter):
            a = a.clone()
            torch._dynamo.mark_static(a)
        return a

    def run(*args):
        # no duck sizing: a first window of 64 rows x 64 positions would tie rows to width in every
        # graph, and the next width would compile the whole set again (measured: 222 s, then 138 s)
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return compiled(*map(static, args))

    return run


def _nats(model, x: torch.Tensor, y: torch.Tensor, head_delta, autocast, at: torch.Tensor | None = None,
          packed: tuple | None = None) -> torch.Tensor:
    """Per-token nats of every position of each row, or of positions `at` [rows, k] (y then [rows, k]):
    the LM head runs on those positions only. `packed` (golf.attention.packed_doc_info's arguments):
    x is one packed row [1, T] of several windows and `at` indexes into it."""
    with autocast:
        if packed is None:
            # every row is one document (no BOS after position 0), so plain causal attention is exact and
            # runs on shape-agnostic kernels: TTT windows change shape every chunk, and a compiled
            # FlexAttention would recompile per shape
            h = model.hidden(x, docs=doc_boundaries(x, BOS_ID, isolate=False))
            if at is not None:
                h = h.gather(1, at[..., None].expand(-1, -1, h.shape[-1]))
        else:
            h = model.hidden(x, docs=packed_doc_info(*packed))
            if at is not None:
                h = h[0].index_select(0, at.flatten()).view(*at.shape, -1)
        logits = model.head(h, head_delta=head_delta)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)


def _to_device(a: np.ndarray, device) -> torch.Tensor:
    """A host array on `device` without waiting for it: a copy from pageable memory synchronises the
    stream first (every pass would stall the GPU queue), one from pinned memory does not."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _rows(tokens: np.ndarray, docs: np.ndarray, lo: int, hi: int, width: int):
    """Inputs/targets [B, width] of positions lo..hi (doc-relative, hi exclusive) of each document,
    zero-padded; `valid` marks positions inside the document."""
    pos = lo + np.arange(width)[None, :]
    n = (docs[:, 1] - docs[:, 0])[:, None]
    valid = (pos < n) & (pos < hi)
    idx = np.where(valid, docs[:, :1] + pos, 0)
    x = np.where(valid, tokens[idx], 0).astype(np.int64)
    y = np.where(valid, tokens[idx + 1], 0).astype(np.int64)
    return x, y, valid, idx


class _Counter:
    """Hands out the positions 0..total-1 of a phase's documents in order, shared by all ranks (dynamic
    spreading: a rank takes the next documents whenever its slots free up), or local. A take is at
    most ceil(total / ranks) positions, so a phase smaller than the ranks' slots is spread over them."""

    def __init__(self, total: int, key: str | None = None):
        self.key, self.total, self.next = key, total, 0
        dist = torch.distributed
        shared = key is not None and dist.is_available() and dist.is_initialized()
        self.store = dist.distributed_c10d._get_default_store() if shared else None
        self.cap = -(-total // dist.get_world_size()) if shared else total

    def take(self, k: int) -> np.ndarray:
        k = min(k, max(self.cap, 1))
        if self.store is None:
            self.next += k
            end = self.next
        else:
            end = self.store.add(self.key, k)
        return np.arange(end - k, min(end, self.total), dtype=np.int64)


def _pass(model, adapters: Adapters | None, autocast, backward: bool, seq_len: int,
          slots, x, y, at, mask, weight, *packed) -> list[torch.Tensor]:
    """The device work of one pass (its tensors as score_docs builds them): the nats of the scored
    positions and, with `backward`, the backward of the training rows' mean losses into the adapters'
    gradients. `packed` (segment ids, cu_seqlens, positions, starts, LoRA row ends, and with query
    rows their positions, cu_seqlens and LoRA row ends; see _pack) when x is a packed row. Reads
    nothing but its arguments and never waits for the GPU, so a CUDA graph can replay it
    (golf/step_graphs.py)."""
    # compiled regions: always with grad (a pass without training skips its backward), so no
    # separate no-grad graphs are compiled for it
    grad = backward or (adapters is not None and model.regions is not None)
    if adapters is not None:  # a packed pass of every slot has them in slot order (_pack)
        adapters.select(slots, grad, packed[4] if packed else None,
                        every_slot=bool(packed) and slots.shape[0] == adapters.P.shape[0],
                        query_ends=packed[7] if len(packed) > 5 else None)
    with torch.set_grad_enabled(grad):
        nats = _nats(model, x, y, adapters.head if adapters is not None else None, autocast, at,
                     (packed[0], packed[1], seq_len, *packed[2:4], *packed[5:7]) if packed else None)
    if backward:  # each training row's mean over its chunk; rows without a next chunk weigh 0
        ((nats * mask).sum(1) / mask.sum(1).clamp_min(1) * weight).sum().backward()
        adapters.store_grads()
    if adapters is not None:
        adapters.select(None)  # the pass's copies are not kept alive
    return [nats.detach()]


def _adapter_step(adapters: Adapters, rows: torch.Tensor) -> list[torch.Tensor]:
    """The adapters' AdamW step as a replayable step (golf/step_graphs.py): no outputs."""
    adapters.step(rows)
    return []


def last_layer_queries(s: TTTSettings, model, device) -> bool:
    """Whether packed passes run the model's last layer at the scored rows only (_pack): packed, asked
    for, and a model whose last layer runs once (GPT.query_block)."""
    return s.last_layer_queries and packs(s, model, device) and _query_block(model) is not None


def _query_block(model) -> int | None:
    """The block a forward with query rows runs at those rows only (GPT.query_block; None: none)."""
    return model.query_block() if hasattr(model, "query_block") else None


def packs(s: TTTSettings, model, device) -> bool:
    """Whether TTT packs its windows (s.layout resolved for `model` on `device`): "auto" packs on CUDA
    for models that allow it (GPT.packable), the varlen kernels' home; rows everywhere else."""
    allowed = getattr(model, "packable", False)
    if s.layout == "packed" and not allowed:
        raise ValueError(f"TTT_LAYOUT=packed: {type(model).__name__} does not support packed sequences; use rows or auto")
    return s.layout == "packed" or (s.layout == "auto" and allowed and torch.device(device).type == "cuda")


@dataclass
class _Rows:
    """One continuous-batching step's rows (host arrays, one entry per active slot)."""
    slots: np.ndarray   # slot of each row
    base: np.ndarray    # stream position of the row's window's first token
    span: np.ndarray    # window tokens: the document's last seq_len tokens up to the chunk's end
    offset: np.ndarray  # the chunk's first position in the window
    train: np.ndarray   # bool: the document has a next chunk, so this one trains its adapter

    def width(self, s: TTTSettings) -> np.ndarray:
        """Window length padded to the pad multiple (at most seq_len): few distinct shapes."""
        return np.minimum(s.seq_len, -(-self.span // s.pad_multiple) * s.pad_multiple)

    def chunk(self, s: TTTSettings, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the window [k, chunk], scored [k, chunk]) of rows `sel`'s chunks."""
        at = self.offset[sel][:, None] + np.arange(s.chunk)[None, :]
        scored = at < self.span[sel][:, None]
        return np.where(scored, at, 0), scored


def _row_passes(tokens: np.ndarray, rows: _Rows, s: TTTSettings, lone_copies: bool):
    """The rows layout: each window its own row, padded to the widest of its pass; a pass takes rows
    widest first up to s.micro_tokens window tokens. Yields (arrays for _pass, stream positions [k,
    chunk] of the scored inputs)."""
    width = rows.width(s)
    order = np.argsort(-width, kind="stable")
    g = 0
    while g < len(order):
        W = int(width[order[g]])
        sel = order[g : g + max(1, s.micro_tokens // W)]  # rows are independent: passes are exact
        g += len(sel)
        # compiled, a lone row would get graphs of its own (Dynamo specialises sizes of 1): it runs
        # with a masked copy of itself instead, which adds nothing to loss or gradients
        lone = len(sel) == 1 and lone_copies
        if lone:
            sel = np.repeat(sel, 2)
        base = rows.base[sel][:, None]
        pos = np.arange(W)[None, :]
        inside = pos < rows.span[sel][:, None]
        x = np.where(inside, tokens[np.where(inside, base + pos, 0)], 0).astype(np.int64)
        at, scored = rows.chunk(s, sel)
        if lone:
            scored[1:] = False
        idx = base + at  # input positions; their targets are idx + 1
        y = np.where(scored, tokens[idx + 1], 0).astype(np.int64)
        yield [rows.slots[sel], x, y, at, scored, rows.train[sel].astype(np.float32)], idx


def _packed_passes(tokens: np.ndarray, rows: _Rows, s: TTTSettings, queries: bool = False):
    """The packed layout: the windows laid end to end in one row per pass, widest first, up to
    s.micro_tokens window tokens a pass (a wider window alone); the row is padded to a multiple of
    s.pack_bucket (of a quarter of it when shorter), so passes take few shapes, and no work goes to
    padding windows to a multiple or rows out to the widest window. Attention stays inside each
    window (varlen), each window's rotary positions start at 0, and each window trains its own slot's
    adapter (kernels/segment_mm.py). `queries`: the last layer runs at the scored rows only (_pack)."""
    width = rows.span
    for sel in _fill(np.argsort(-width, kind="stable"), width, s.micro_tokens):
        yield _pack(tokens, rows, sel, width[sel], s, queries)


def _fill(order: np.ndarray, width: np.ndarray, most: int) -> list[np.ndarray]:
    """Indices `order` cut into consecutive runs of at most `most` total width (a wider one alone)."""
    groups, used = [[]], 0
    for i in order:
        if groups[-1] and used + width[i] > most:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += width[i]
    return [np.array(g, dtype=np.int64) for g in groups if g]


def _pack(tokens: np.ndarray, rows: _Rows, sel: np.ndarray, width: np.ndarray, s: TTTSettings, queries: bool = False):
    """One packed pass of rows `sel`: x [1, T]; the chunk arrays as in the rows layout but with G rows
    (the unused ones unscored, weight 0) and `at` indexing into the packed row; then segment ids
    [1, T], cu_seqlens (fixed length for a G), positions [1, T], sequence starts [1, T] and the LoRA
    rows' ends [G] (the layout: _segments; its trailing padding belongs to the last window's LoRA row).
    G is every slot, with row g slot g's (windows laid out in slot order): the pass reads and trains
    the adapters in place (Adapters.select's every_slot), with no gathered copies of the rows nor
    scatters of their gradients. A pass of one or two windows carries 2 rows instead, gathered: a
    lone long document's chain of steps would otherwise move all slots' adapters each step (at 64
    rows, about 13 ms of its 24 ms steps on an H100). Not one row for one window: Dynamo specialises
    sizes of 1, and those graphs (plain matmuls for the LoRA products) took the H100 prime from 189 to
    320 s and the warm-up from 24 to 47 s. Full passes gained nothing measurable from fewer rows, and
    each G is a graph key of its own (G up to a power of two: 50 graphs in a phased run, against 28).
    With `queries`, three arrays follow: the query rows (golf.attention.Queries: positions [Q] and
    cu_seqlens) and their LoRA row ends [G], and `at` indexes the query rows instead of the packed
    row. The model's last layer then runs at those rows only (its keys and values at every row):
    every window's scored tokens, which end it, and as many more rows before them, or from the
    padding, as make Q = min(G * chunk, T), a size fixed by the graph key."""
    n = len(sel)
    G = 2 if n <= 2 else max(2, s.batch_docs)
    every = G == s.batch_docs
    if every:
        order = np.argsort(rows.slots[sel], kind="stable")
        sel, width = sel[order], width[order]
    row = rows.slots[sel] if every else np.arange(n)  # each window's LoRA row
    first, T, win, pos, seg, cu = _segments(width, s, G)
    used = int(first[-1])
    inside = pos[:used] < rows.span[sel][win]
    x = np.zeros(T, dtype=np.int64)
    x[:used] = np.where(inside, tokens[np.where(inside, rows.base[sel][win] + pos[:used], 0)], 0)
    ends = first[np.searchsorted(row, np.arange(G), side="right")].astype(np.int32)
    ends[row[-1] :] = T
    at_w, scored_w = rows.chunk(s, sel)
    at, idx = np.zeros((G, s.chunk), dtype=np.int64), np.zeros((G, s.chunk), dtype=np.int64)
    scored = np.zeros((G, s.chunk), dtype=bool)
    scored[row], extra = scored_w, []
    if queries:
        sc = scored_w.sum(1)  # each window's scored tokens: its last ones (packed windows are not padded)
        q_index, q_cu = _query_rows(cu, sc, min(G * s.chunk, T))
        q_ends = q_cu[np.searchsorted(row, np.arange(G), side="right")]
        q_ends[row[-1] :] = q_cu[-1]
        at[row] = np.where(scored_w, (q_cu[1 : n + 1] - sc)[:, None] + np.arange(s.chunk), 0)
        extra = [q_index, q_cu, q_ends]
    else:
        at[row] = np.where(scored_w, first[:n, None] + at_w, 0)
    idx[row] = rows.base[sel][:, None] + at_w  # input positions; their targets are idx + 1
    y = np.where(scored, tokens[idx + 1], 0).astype(np.int64)
    slots, weight = np.arange(G) if every else np.zeros(G, dtype=np.int64), np.zeros(G, dtype=np.float32)
    if not every:
        slots[:n] = rows.slots[sel]
    weight[row] = rows.train[sel]
    arrays = [slots, x[None], y, at, scored, weight, seg[None], cu, pos[None], (pos == 0)[None], ends] + extra
    return arrays, idx


def _query_rows(cu: np.ndarray, need: np.ndarray, Q: int) -> tuple[np.ndarray, np.ndarray]:
    """Q query rows over the segments of cu_seqlens `cu`, each segment's rows its last tokens: the first
    len(need) segments (the windows) at least need[j]; the rest from the other segments (padding)
    first, then from the windows' earlier tokens. Returns their positions [Q] (int64) and cu_seqlens
    (int32, as long as cu). Q must be at least need.sum() and at most cu[-1]."""
    length = np.diff(cu).astype(np.int64)
    rows = np.zeros(len(length), dtype=np.int64)
    rows[: len(need)] = need
    spare = length - rows
    order = np.concatenate((np.arange(len(need), len(length)), np.arange(len(need))))
    left = Q - int(rows.sum())
    before = np.cumsum(spare[order]) - spare[order]  # spare rows of the segments earlier in `order`
    rows[order] += np.clip(left - before, 0, spare[order])
    q_cu = np.concatenate(([0], np.cumsum(rows))).astype(np.int32)
    index = np.repeat(cu[1:].astype(np.int64) - q_cu[1:], rows) + np.arange(Q)
    return index, q_cu


def _segments(width: np.ndarray, s: TTTSettings, most: int):
    """The layout of a packed row of sequences of `width` tokens (at most `most` of them) end to end:
    first (sequence j holds positions first[j]..first[j + 1]), T, win (each used position's
    sequence), positions from 0 in each sequence, segment ids and cu_seqlens (int32, of a fixed
    length for a given `most`, ending in empty segments). T is a multiple of pack_bucket, or when
    smaller of a quarter of it: the last steps of a phase (a long document's window alone) compute
    less padding. The padding after the last sequence forms segments of at most seq_len tokens (the
    varlen kernels' longest)."""
    n = len(width)
    first = np.concatenate(([0], np.cumsum(width)))
    used = int(first[-1])
    step = s.pack_bucket if used > s.pack_bucket else max(s.pad_multiple, s.pack_bucket // 4)
    T = -(-used // step) * step
    tail = np.arange(T - used)
    win = np.repeat(np.arange(n), width)
    pos = np.concatenate((np.arange(used) - first[win], tail % s.seq_len))
    seg = np.concatenate((win, n + tail // s.seq_len)).astype(np.int32)
    bounds = np.concatenate((first, np.arange(used + s.seq_len, T, s.seq_len), [T]))
    cu = np.full(most + 2 + -(-s.pack_bucket // s.seq_len), T, dtype=np.int32)
    cu[: len(bounds)] = bounds
    return first, T, win, pos, seg, cu


def score_docs(model, adapters: Adapters | None, tokens, docs, byte_counts, s: TTTSettings, meter: BpbMeter,
               device, autocast, token_nats=None, take: Callable[[int], np.ndarray] | None = None,
               on_step: Callable[[int, int, int], None] | None = None, graphs: StepGraphs | None = None) -> int:
    """Scores documents chunk by chunk in `s.batch_docs` slots (continuous batching): every step scores
    the current chunk of each slot's document, then the documents with chunks left take one adapter
    step on the chunk just scored; a slot whose document is done takes the next one (`take(k)`: up to
    k next positions into `docs`, none once they are all taken; default: all of `docs` in order) with
    fresh adapters. A step's rows run in passes of at most `s.micro_tokens` window tokens, packed
    end to end or one padded row each (`packs`; _packed_passes, _row_passes); rows never interact, so
    passes are exact either way. `on_step(steps, documents taken, tokens scored)` after each step.
    `graphs` (for one model and `adapters`) replays passes of repeated shapes, and the adapters'
    AdamW step, as CUDA graphs. Wide passes gain too, though their kernels alone would keep the GPU
    busy: with graphs only up to 8192 tokens, a phased run's last 1,540 documents took 63.1 s
    against 57.1 s (H100).
    Returns the number of scored tokens."""
    take = take or _Counter(len(docs)).take
    lengths = docs[:, 1] - docs[:, 0]
    slot_doc = np.full(s.batch_docs, -1, dtype=np.int64)
    slot_chunk = np.zeros(s.batch_docs, dtype=np.int64)
    scored_tokens, taken, steps, more = 0, 0, 0, True
    packed, queries = packs(s, model, device), last_layer_queries(s, model, device)
    while True:
        free = np.flatnonzero(slot_doc < 0)
        if more and len(free):
            new = take(len(free))
            more = len(new) > 0  # a take may hold fewer than asked (_Counter's cap) with more to come
            slot_doc[free[: len(new)]], slot_chunk[free[: len(new)]] = new, 0
            taken += len(new)
            if adapters is not None and len(new):
                adapters.reset(free[: len(new)])
        active = np.flatnonzero(slot_doc >= 0)
        if not len(active):
            return scored_tokens
        d = slot_doc[active]
        n = lengths[d]
        lo = slot_chunk[active] * s.chunk
        hi = np.minimum(lo + s.chunk, n)
        w0 = np.maximum(0, hi - s.seq_len)
        rows = _Rows(active, docs[d, 0] + w0, hi - w0, lo - w0,
                     (hi < n) if adapters is not None else np.zeros(len(active), dtype=bool))
        passes = (_packed_passes(tokens, rows, s, queries) if packed else
                  _row_passes(tokens, rows, s, model.regions is not None))
        for arrays, idx in passes:
            scored = arrays[4]
            inputs = [_to_device(a, device) for a in arrays]
            backward = bool(arrays[5].any())
            work = functools.partial(_pass, model, adapters, autocast, backward, s.seq_len)
            # a graph of a pass fixes its shapes and whether it trains; the rest is data
            key = ("pass", arrays[1].shape, len(arrays[0]), backward)
            [nats] = graphs(key, work, inputs) if graphs is not None else work(*inputs)
            meter.update(nats, _to_device(byte_counts[idx + 1], device), inputs[4])
            scored_tokens += int(scored.sum())
            if token_nats is not None:
                token_nats[idx[scored]] = nats[inputs[4]].double().cpu().numpy()
        train = rows.train
        if train.any():
            work, step_rows = functools.partial(_adapter_step, adapters), adapters.slot_rows(active[train])
            graphs(("adamw", step_rows.shape[0]), work, [step_rows]) if graphs is not None else work(step_rows)
        slot_chunk[active] += 1
        slot_doc[active[hi >= n]] = -1
        steps += 1
        if on_step is not None:
            on_step(steps, taken, scored_tokens)


def warm_up(model, adapters: Adapters, s: TTTSettings, device, autocast) -> float:
    """Compiles the regions before the first real document, so their compile time is reported apart
    from scoring: random tokens, two documents of four chunks and one of two, with throwaway scores:
    steps of 3 rows that train, then 2 rows that train (a packed pass of two LoRA rows with a backward:
    the first launches of kernels/segment_mm.py's backward kernels, whose Triton JIT took 3.7 s of a
    phased run's first phase when this warm-up had no such step), then 2 rows of last chunks. Then an
    AdamW step of every slot (the masked step's graph); the slots are reset afterwards. Returns the
    seconds taken."""
    t0 = time.perf_counter()
    n = 3 * s.chunk + 5
    vocab = model.tok_emb.weight.shape[0]
    tokens = np.random.default_rng(0).integers(2, vocab, 3 * n + 1)
    tokens[[0, n, 2 * n, 3 * n]] = BOS_ID
    docs = np.array([[0, n], [n, 2 * n], [2 * n, 3 * n - 2 * s.chunk]], dtype=np.int64)
    score_docs(model, adapters, tokens, docs, np.ones(len(tokens), dtype=np.int64), s, BpbMeter(device),
               device, autocast)
    adapters.step(adapters.slot_rows(np.arange(adapters.P.shape[0])))
    adapters.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _phase_global_pass(model, adapters: Adapters | None, run: GlobalPass, tokens, docs) -> None:
    """A GlobalPass between TTT's batches: adapters off and the model eager meanwhile (compiled it
    would need graphs of its own: trainable base weights, adapters off); its repeated micro-batch
    shapes of up to GLOBAL_GRAPH_TOKENS replay as CUDA graphs."""
    regions, model.regions = model.regions, None
    if adapters is not None:
        adapters.enable(False)
    try:
        run(tokens, docs)
    finally:
        model.regions = regions
        if adapters is not None:
            adapters.enable(True)


@contextlib.contextmanager
def _frozen(model):
    """The model in evaluation mode (the looped layer order) with no trainable parameters; afterwards
    its modes and requires_grad flags as they were, and no compiled regions."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        model.regions = None
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _compile(model, adapters: Adapters, s: TTTSettings, device, autocast, backend: str, log) -> float:
    """Puts compiled regions on `model` and compiles them (warm_up); returns the seconds taken. A model
    piece the compiler cannot take (a research knob's code path) leaves the model eager instead: better
    than losing the evaluation after a whole training run; the log says so."""
    model.regions, w0 = compiled_regions(backend), time.perf_counter()
    try:
        return warm_up(model, adapters, s, device, autocast)
    except torch._dynamo.exc.TorchDynamoException as e:
        model.regions = None
        adapters.row_adamw, adapters.masked_adamw, adapters.compiled = _row_adamw, _masked_adamw, False
        if log:
            log(f"ttt_compile_failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}; TTT runs eager")
        return time.perf_counter() - w0


def prime(model, s: TTTSettings, device, autocast=None, log: Callable[[str], None] | None = None,
          backend: str = "inductor") -> float:
    """Compiles TTT's regions once with throwaway adapters, so that a later evaluate_ttt of the same
    model finds the compiler's caches (Inductor's graphs and kernels) warm and its own warm-up is
    shorter: the trainer runs this before its training clock starts (TTT_PRIME). The model is left as
    it was (weights, modes, no hooks or regions). Returns the seconds taken."""
    autocast = autocast or torch.autocast(device_type=device.type, enabled=False)
    with _frozen(model):
        adapters = Adapters(model, s, s.batch_docs, device, backend)
        try:
            return _compile(model, adapters, s, device, autocast, backend, log)
        finally:
            adapters.remove()


# packed global-pass micro-batches up to this many tokens replay as CUDA graphs; wider ones keep the GPU
# busy eager (H100, one rank, 81 documents: 585 ms of kernels in 650 ms eager), so capturing them
# would cost more than it saves in a local run's few passes
GLOBAL_GRAPH_TOKENS = 8192


class GlobalPass:
    """Phased TTT's global SGD pass (one per evaluation): SGD over the given, already scored, documents,
    each cut into pieces of up to seq_len targets; the global batch is split over ranks and gradients
    are summed, so every rank keeps the same model. Packed (`packs`), a rank's pieces of a step run
    end to end in rows of up to s.global_micro_tokens tokens (each piece its own sequence from position
    0, as the rows layout's padded row each), and `graphs` replays those of repeated shapes up to
    GLOBAL_GRAPH_TOKENS as CUDA graphs: a rank's share of a step on 8 GPUs is about 4 pieces, which
    eager are launch-bound (H100, rank 0's share of an 8-rank pass over 81 documents: 16,329 launches,
    116 ms of kernels in 552 ms under the profiler; replayed: 92 launches, 126 ms). Every parameter's
    gradient is a view of one flat buffer per dtype that lives as long as this object, so a step
    all-reduces, scales and zeroes a buffer or two, and a graph's backward keeps adding into the same
    memory in every later pass."""

    _instances = 0

    def __init__(self, model, s: TTTSettings, device, autocast, graphs: StepGraphs | None = None):
        GlobalPass._instances += 1
        self.key = GlobalPass._instances  # graph keys of one pass object: their gradient buffers are its own
        self.model, self.s, self.device, self.autocast, self.graphs = model, s, device, autocast, graphs
        self.params = [p for p in model.parameters() if p.is_floating_point()]
        groups: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self.params:
            groups.setdefault(p.dtype, []).append(p)
        self.flats, self.views = [], []
        for ps in groups.values():
            flat = torch.zeros(sum(p.numel() for p in ps), dtype=ps[0].dtype, device=ps[0].device)
            offsets = np.cumsum([0] + [p.numel() for p in ps])
            self.flats.append(flat)
            self.views += [(p, flat[a:b].view(p.shape)) for p, a, b in zip(ps, offsets[:-1], offsets[1:])]

    def __call__(self, tokens: np.ndarray, docs: np.ndarray) -> None:
        s, device = self.s, self.device
        pieces = [(a, min(a + s.seq_len, e)) for a, e in docs.tolist() for a in range(a, e, s.seq_len)]
        opt = torch.optim.SGD(self.params, lr=s.global_lr, momentum=s.global_momentum)
        rank, world = rank_and_world()
        packed = packs(s, self.model, device)
        work = functools.partial(_global_micro, self.model, self.autocast, s.seq_len)
        for p, view in self.views:
            p.requires_grad_(True)
            p.grad = view
        try:
            for _ in range(s.global_epochs):
                for b0 in range(0, len(pieces), s.global_batch_seqs):
                    batch = pieces[b0 : b0 + s.global_batch_seqs]
                    mine = np.array(batch[slice(*rank_range(len(batch), rank, world))], dtype=np.int64).reshape(-1, 2)
                    for flat in self.flats:
                        flat.zero_()
                    count = torch.zeros((), device=device, dtype=torch.float64)
                    for arrays in (self._packed_batches if packed else self._row_batches)(tokens, mine):
                        inputs = [_to_device(a, device) for a in arrays]
                        key = ("global", self.key, arrays[0].shape)
                        graphed = self.graphs is not None and packed and arrays[0].shape[1] <= GLOBAL_GRAPH_TOKENS
                        [n] = self.graphs(key, work, inputs) if graphed else work(*inputs)
                        count += n
                    all_reduce_(count)
                    for flat in self.flats:
                        all_reduce_(flat)
                        flat.div_(count.clamp_min(1).to(flat.dtype))
                    if s.global_grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(self.params, s.global_grad_clip)
                    opt.step()
        finally:
            for p in self.params:
                p.grad = None
                p.requires_grad_(False)

    def _row_batches(self, tokens: np.ndarray, mine: np.ndarray):
        """One zero-padded row per piece, up to s.global_micro_tokens tokens a pass: (x, y, valid)."""
        width = int((mine[:, 1] - mine[:, 0]).max()) if len(mine) else 1
        per_pass = max(1, self.s.global_micro_tokens // width)
        for g0 in range(0, len(mine), per_pass):
            x, y, valid, _ = _rows(tokens, mine[g0 : g0 + per_pass], 0, self.s.seq_len, width)
            yield x, y, valid

    def _packed_batches(self, tokens: np.ndarray, mine: np.ndarray):
        """The pieces end to end, up to s.global_micro_tokens tokens a pass: (x, y, valid) [1, T], then
        packed_doc_info's segment ids, cu_seqlens, positions and starts (`_segments`)."""
        s = self.s
        width = mine[:, 1] - mine[:, 0]
        for sel in _fill(np.arange(len(mine)), width, s.global_micro_tokens):
            first, T, win, pos, seg, cu = _segments(width[sel], s, s.global_batch_seqs)
            used = int(first[-1])
            idx = mine[sel, 0][win] + pos[:used]
            x, y, valid = np.zeros(T, np.int64), np.zeros(T, np.int64), np.zeros(T, bool)
            x[:used], y[:used], valid[:used] = tokens[idx], tokens[idx + 1], True
            yield x[None], y[None], valid[None], seg[None], cu, pos[None], (pos == 0)[None]


def _global_micro(model, autocast, seq_len: int, x, y, valid, *packed) -> list[torch.Tensor]:
    """One forward/backward of the global pass, its summed loss's gradients added into the parameters'
    .grad; returns the number of targets. Reads nothing but its arguments: replayable (StepGraphs)."""
    nats = _nats(model, x, y, None, autocast, None, (packed[0], packed[1], seq_len, packed[2], packed[3]) if packed else None)
    (nats * valid).sum().backward()
    return [valid.sum()]


def evaluate_ttt(model, tokens: np.ndarray, byte_counts: np.ndarray, s: TTTSettings, device,
                 autocast=None, lora: bool = True, token_nats: np.ndarray | None = None,
                 log: Callable[[str], None] | None = None, backend: str = "inductor") -> dict:
    """Score-first TTT over the whole stream. `lora=False` scores without adapters (phases still run).
    The model's weights are restored afterwards. Returns val_loss, val_bpb, tokens, seconds (all of
    it, the compile warmup of `s.compile` included), compile_seconds (that warmup), docs, phase_ends,
    phases (per phase: its docs on all ranks, this rank's scored tokens, scoring_s, global_s: its
    global pass, None for the last), cuda_graphs (StepGraphs.summary() with `s.graphs`, else None),
    layout (packed or rows); `backend` is torch.compile's, for tests."""
    global _CALLS
    _CALLS += 1
    call = _CALLS  # store keys unique per call; every rank calls in the same order
    autocast = autocast or torch.autocast(device_type=device.type, enabled=False)
    t0 = time.perf_counter()
    docs = split_documents(tokens)
    phases = plan(docs, s, rank_and_world()[1])
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with _frozen(model):
        meter, scored = BpbMeter(device), 0
        # compiled, the adapters' optimizer step is one fused kernel over static shapes
        adapters = Adapters(model, s, s.batch_docs, device, backend if s.compile else None) if lora else None
        compile_seconds = 0.0
        try:
            if s.compile and adapters is not None:  # after the hooks exist: the regions trace them
                compile_seconds = _compile(model, adapters, s, device, autocast, backend, log)
                if log and model.regions is not None:
                    log(f"ttt_compile_warmup:{compile_seconds:.1f}s")
            # after the warm-up: its steps would be captured with throwaway shapes
            graphs = StepGraphs(device, s.graphs) if s.graphs > 0 and adapters is not None else None
            global_sgd = GlobalPass(model, s, device, autocast, graphs) if len(phases) > 1 else None
            done, timings = [], []
            for k, order in enumerate(phases):
                counter, last = _Counter(len(order), f"ttt_{call}_phase_{k}"), [time.perf_counter()]
                p0, before = last[0], scored

                def progress(steps, taken, tokens_done, k=k, n=len(order)):
                    if log and time.perf_counter() - last[0] >= 30:
                        last[0] = time.perf_counter()
                        log(f"ttt_progress phase:{k + 1}/{len(phases)} steps:{steps} docs_taken:{taken}/{n} "
                            f"tokens:{scored + tokens_done} elapsed:{last[0] - t0:.1f}s")

                scored += score_docs(model, adapters, tokens, docs[order], byte_counts, s, meter, device, autocast,
                                     token_nats, counter.take, progress, graphs)
                if device.type == "cuda":  # the phases' seconds are the GPU's too
                    torch.cuda.synchronize(device)
                done.extend(order.tolist())
                timings.append({"docs": len(order), "tokens": scored - before, "scoring_s": time.perf_counter() - p0,
                                "global_s": None})
                if k < len(phases) - 1:
                    g0 = time.perf_counter()
                    _phase_global_pass(model, adapters, global_sgd, tokens, docs[np.sort(np.array(done))])
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    timings[-1]["global_s"] = time.perf_counter() - g0
                    if log:
                        log(f"ttt_phase:{k + 1}/{len(phases)} docs_scored:{len(done)} "
                            f"scoring_seconds:{timings[-1]['scoring_s']:.1f} "
                            f"global_sgd_seconds:{timings[-1]['global_s']:.1f} elapsed:{time.perf_counter() - t0:.1f}s")
            if log and graphs is not None:
                log(f"ttt_cuda_graphs {graphs.stats()}")
        finally:
            if adapters is not None:
                adapters.remove()
            model.load_state_dict(saved)
    meter.all_reduce()
    loss, bpb = meter.result()
    return {"val_loss": loss, "val_bpb": bpb, "tokens": meter.tokens, "seconds": time.perf_counter() - t0,
            "layout": "packed" if packs(s, model, device) else "rows",
            "compile_seconds": compile_seconds, "docs": len(docs), "phase_ends": list(s.phase_ends),
            "phases": timings, "cuda_graphs": graphs.summary() if graphs is not None else None}
