"""Score-first test-time training (SPEC.md sections 5-6): LoRA per document, and phased global SGD.

Legality by construction: a chunk of a document is scored (its losses enter the meter) before any
optimizer step uses it, adapters start fresh for every batch of documents, and the global SGD pass
only ever trains on documents that are already scored. Each document is its own row: its context is
its own prefix (up to `seq_len` tokens), never another document.

Documents. Document i covers inputs tokens[start_i:end_i] and targets tokens[start_i+1:end_i+1], with
end_i the next BOS (whose prediction ends document i) or the end of the stream, so the documents'
targets are exactly the stream's targets, each once: TTT scores the same tokens as plain evaluation.

Order. Phase boundaries (document counts) split the stream's documents in stream order; inside a
phase documents are sorted by length, longest first (stable by position), and cut into batches of
`batch_docs`; ranks take batches from a shared counter, so the order depends on positions and lengths
only, never on the text. After each phase every rank joins a global SGD pass over all documents
scored so far, which updates the base model for the next phase.

Adapters. Batched LoRA (one adapter per document of the batch, A [B, in, r] random, B [B, r, out]
zero) on chosen projections, added by forward hooks, so the forward is the model's own forward: at
zero adapters the TTT logits equal the plain logits bit for bit. Adam is elementwise and the loss is a
sum of per-document means, so documents of one batch never influence each other.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from golf.attention import doc_boundaries
from golf.bpb import BpbMeter
from golf.dist import all_reduce_
from golf.evaluate import rank_range

BOS_ID = 1
# LoRA target name -> attribute path inside a block; "head" is the tied LM head (GPT.logits' head_delta)
BLOCK_TARGETS = {"q": "attn.c_q", "k": "attn.c_k", "v": "attn.c_v", "o": "attn.proj", "fc": "mlp.fc", "proj": "mlp.proj"}
TARGETS = tuple(BLOCK_TARGETS) + ("head",)
_CALLS = 0
_COPIES = 0


@dataclass(frozen=True)
class TTTSettings:
    chunk: int = 48
    seq_len: int = 2048
    batch_docs: int = 64
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
    global_grad_clip: float = 1.0
    pad_multiple: int = 64  # windows are right-padded to a multiple of this (few distinct shapes)
    micro_tokens: int = 32768  # most window tokens per forward/backward; larger batches accumulate
    seed: int = 0
    compile: bool = False  # LoRA scoring runs the layers through torch.compile'd regions (dynamic shapes)

    def __post_init__(self):
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"TTT_LORA_TARGETS: unknown {unknown}; choose from {','.join(TARGETS)}")
        if self.chunk <= 0 or self.seq_len < self.chunk:
            raise ValueError(f"TTT_CHUNK_SIZE={self.chunk} must be in 1..TTT_EVAL_SEQ_LEN={self.seq_len}")
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


def plan(docs: np.ndarray, s: TTTSettings) -> list[list[np.ndarray]]:
    """Phases, each a list of batches of document indices, in scoring order. A phase holds the next
    documents of the stream (as the public phase boundaries count them); inside it, documents run
    longest first, so a batch holds similar lengths and the long ones do not end up alone at the tail."""
    lengths = docs[:, 1] - docs[:, 0]
    phases, lo = [], 0
    for hi in [e for e in s.phase_ends if e < len(docs)] + [len(docs)]:
        idx = np.arange(lo, hi)
        part = idx[np.lexsort((idx, -lengths[lo:hi]))]
        phases.append([part[i : i + s.batch_docs] for i in range(0, len(part), s.batch_docs)])
        lo = hi
    return phases


class BatchedLoRA(nn.Module):
    """delta(x) = (x @ A) @ B * alpha / r with one (A, B) per row of the batch."""

    def __init__(self, batch: int, d_in: int, d_out: int, rank: int, alpha: float, device):
        super().__init__()
        self.A = nn.Parameter(torch.empty(batch, d_in, rank, device=device))
        self.B = nn.Parameter(torch.empty(batch, rank, d_out, device=device))
        self.scale = alpha / rank
        self.active = True  # off during the global pass, which trains the base model alone
        self.rows: torch.Tensor | None = None  # the batch rows still scoring (finished documents drop out)

    def reset(self, generator: torch.Generator) -> None:
        bound = 1 / math.sqrt(self.A.shape[1])
        with torch.no_grad():
            self.A.copy_(torch.rand(self.A.shape, generator=generator) * 2 * bound - bound)
            self.B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = (self.A, self.B) if self.rows is None else (self.A[self.rows], self.B[self.rows])
        return (x @ A.to(x.dtype)) @ B.to(x.dtype) * self.scale


class Adapters:
    """LoRA adapters hooked into a GPT's projections for batches of `batch` documents."""

    def __init__(self, model: nn.Module, s: TTTSettings, batch: int, device):
        self.s, self.loras, self.hooks, self.head = s, [], [], None
        for block in model.blocks:
            for t in s.targets:
                if t == "head":
                    continue
                module = block.get_submodule(BLOCK_TARGETS[t])
                lora = BatchedLoRA(batch, module.in_features, module.out_features, s.lora_rank, s.lora_alpha, device)
                self.hooks.append(module.register_forward_hook(_add_delta(lora)))
                self.loras.append(lora)
        if "head" in s.targets:
            V, D = model.tok_emb.weight.shape
            self.head = BatchedLoRA(batch, D, V, s.lora_rank, s.lora_alpha, device)
            self.loras.append(self.head)

    def parameters(self) -> list[nn.Parameter]:
        return [p for lora in self.loras for p in lora.parameters()]

    def reset(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for lora in self.loras:
            lora.reset(g)

    def select(self, rows: torch.Tensor | None) -> None:
        for lora in self.loras:
            lora.rows = rows

    def enable(self, on: bool) -> None:
        for lora in self.loras:
            lora.active = on

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


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


def _nats(model, x: torch.Tensor, y: torch.Tensor, head_delta, autocast, first: int = 0) -> torch.Tensor:
    """Per-token nats of positions first.. of each row (the LM head runs on those positions only)."""
    with autocast:
        # every row is one document (no BOS after position 0), so plain causal attention is exact and
        # runs on shape-agnostic kernels: TTT windows change shape every chunk, and a compiled
        # FlexAttention would recompile per shape
        h = model.hidden(x, docs=doc_boundaries(x, BOS_ID, isolate=False))[:, first:]
        logits = model.head(h, head_delta=head_delta)
    y = y[:, first:]
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
    """Next batch index of a phase, shared by all ranks (dynamic spreading), or local."""

    def __init__(self, key: str):
        self.key, self.next = key, 0
        dist = torch.distributed
        self.store = dist.distributed_c10d._get_default_store() if dist.is_available() and dist.is_initialized() else None

    def take(self) -> int:
        if self.store is None:
            self.next += 1
            return self.next - 1
        return self.store.add(self.key, 1) - 1


def score_batch(model, adapters: Adapters | None, tokens, docs, byte_counts, s: TTTSettings, meter: BpbMeter,
                device, autocast, token_nats=None) -> int:
    """Scores a batch of documents chunk by chunk; after each chunk (but the last) the adapters take
    one step on the chunk just scored. Returns the number of scored tokens."""
    n_max = int((docs[:, 1] - docs[:, 0]).max())
    opt = None
    if adapters is not None:
        opt = torch.optim.AdamW(adapters.parameters(), lr=s.lr, betas=(s.beta1, s.beta2), weight_decay=s.weight_decay,
                                fused=device.type == "cuda")
    scored_tokens = 0
    n_chunks = -(-n_max // s.chunk)
    for c in range(n_chunks):
        lo, hi = c * s.chunk, min((c + 1) * s.chunk, n_max)
        w0 = max(0, hi - s.seq_len)
        width = min(s.seq_len, -(-(hi - w0) // s.pad_multiple) * s.pad_multiple)
        active = np.flatnonzero(docs[:, 1] - docs[:, 0] > lo)  # documents with targets in this chunk
        train = adapters is not None and c < n_chunks - 1
        if train:
            opt.zero_grad(set_to_none=True)
        # rows are independent (own adapter, own loss term), so splitting them into passes that
        # accumulate gradients is exact and bounds activation memory
        per_pass = max(1, s.micro_tokens // width)
        first = lo - w0  # the chunk is the window's tail: logits for its positions only
        for g0 in range(0, len(active), per_pass):
            rows = active[g0 : g0 + per_pass]
            # compiled, a lone row would get graphs of its own (Dynamo specialises sizes of 1): it
            # runs with a masked copy of itself instead, which adds nothing to loss or gradients
            lone = len(rows) == 1 and model.regions is not None
            if lone:
                rows = np.repeat(rows, 2)
            if adapters is not None:
                adapters.select(_to_device(rows, device))
            x, y, valid, idx = _rows(tokens, docs[rows], w0, hi, width)
            if lone:
                valid[1:] = False
            scored, idx = valid[:, first:], idx[:, first:]
            xt, yt, mask = _to_device(x, device), _to_device(y, device), _to_device(scored, device)
            # compiled regions: always with grad (the last chunk just skips its backward), so no
            # separate no-grad graphs are compiled for it
            with torch.set_grad_enabled(train or (adapters is not None and model.regions is not None)):
                nats = _nats(model, xt, yt, adapters.head if adapters is not None else None, autocast, first)
            meter.update(nats, _to_device(byte_counts[idx + 1], device), mask)
            scored_tokens += int(scored.sum())
            if token_nats is not None:
                token_nats[idx[scored]] = nats.detach()[mask].double().cpu().numpy()
            if train:
                ((nats * mask).sum(1) / mask.sum(1).clamp_min(1)).sum().backward()
        if train:
            opt.step()
    return scored_tokens


def warm_up(model, adapters: Adapters, s: TTTSettings, device, autocast) -> float:
    """Compiles the regions before the first real batch, so their compile time is reported apart from
    scoring: random tokens, up to three documents of two chunks and a bit (3 rows, then 2; adapter steps
    and a last chunk), with throwaway scores. The adapters are reset before every real batch anyway.
    Returns the seconds taken."""
    t0 = time.perf_counter()
    n = 2 * s.chunk + 5
    vocab = model.tok_emb.weight.shape[0]
    tokens = np.random.default_rng(0).integers(2, vocab, 3 * n + 1)
    tokens[[0, n, 2 * n, 3 * n]] = BOS_ID
    docs = np.array([[0, n], [n, 2 * n], [2 * n, 3 * n - s.chunk]][: s.batch_docs], dtype=np.int64)
    score_batch(model, adapters, tokens, docs, np.ones(len(tokens), dtype=np.int64), s, BpbMeter(device),
                device, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def global_pass(model, tokens, docs, s: TTTSettings, device, autocast) -> None:
    """SGD over the given (already scored) documents, each cut into pieces of up to seq_len targets;
    the global batch is split over ranks and gradients are summed, so every rank keeps the same model."""
    pieces = [(a, min(a + s.seq_len, e)) for a, e in docs.tolist() for a in range(a, e, s.seq_len)]
    params = [p for p in model.parameters() if p.is_floating_point()]
    opt = torch.optim.SGD(params, lr=s.global_lr, momentum=s.global_momentum)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for p in params:
        p.requires_grad_(True)
    for _ in range(s.global_epochs):
        for b0 in range(0, len(pieces), s.global_batch_seqs):
            batch = pieces[b0 : b0 + s.global_batch_seqs]
            mine = np.array(batch[slice(*rank_range(len(batch), rank, world))], dtype=np.int64).reshape(-1, 2)
            opt.zero_grad(set_to_none=False)
            count = torch.zeros((), device=device, dtype=torch.float64)
            width = int((mine[:, 1] - mine[:, 0]).max()) if len(mine) else 1
            per_pass = max(1, s.micro_tokens // width)
            for g0 in range(0, len(mine), per_pass):
                x, y, valid, _ = _rows(tokens, mine[g0 : g0 + per_pass], 0, s.seq_len, width)
                mask = _to_device(valid, device)
                nats = _nats(model, _to_device(x, device), _to_device(y, device), None, autocast)
                (nats * mask).sum().backward()
                count += mask.sum()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                all_reduce_(p.grad)
            all_reduce_(count)
            for p in params:
                p.grad.div_(count.clamp_min(1).to(p.grad.dtype))
            if s.global_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, s.global_grad_clip)
            opt.step()
    opt.zero_grad(set_to_none=True)
    for p in params:
        p.requires_grad_(False)


def evaluate_ttt(model, tokens: np.ndarray, byte_counts: np.ndarray, s: TTTSettings, device,
                 autocast=None, lora: bool = True, token_nats: np.ndarray | None = None,
                 log: Callable[[str], None] | None = None, backend: str = "inductor") -> dict:
    """Score-first TTT over the whole stream. `lora=False` scores without adapters (phases still run).
    The model's weights are restored afterwards. Returns val_loss, val_bpb, tokens, seconds (all of
    it, the compile warmup of `s.compile` included), compile_seconds (that warmup), docs, phase_ends;
    `backend` is torch.compile's, for tests."""
    global _CALLS
    _CALLS += 1
    call = _CALLS  # store keys unique per call; every rank calls in the same order
    autocast = autocast or torch.autocast(device_type=device.type, enabled=False)
    t0 = time.perf_counter()
    docs = split_documents(tokens)
    phases = plan(docs, s)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()  # evaluation runs the looped layer order
    for p, _ in flags:
        p.requires_grad_(False)
    meter, scored = BpbMeter(device), 0
    adapters = Adapters(model, s, s.batch_docs, device) if lora else None
    compile_seconds = 0.0
    try:
        if s.compile and adapters is not None:  # after the hooks exist: the regions trace them
            model.regions, w0 = compiled_regions(backend), time.perf_counter()
            try:
                compile_seconds = warm_up(model, adapters, s, device, autocast)
                if log:
                    log(f"ttt_compile_warmup:{compile_seconds:.1f}s")
            except torch._dynamo.exc.TorchDynamoException as e:
                # a model piece the compiler cannot take (a research knob's code path): score eagerly
                # rather than lose the evaluation after a whole training run; the log says so
                model.regions, compile_seconds = None, time.perf_counter() - w0
                if log:
                    log(f"ttt_compile_failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}; TTT runs eager")
        done = []
        for k, batches in enumerate(phases):
            counter = _Counter(f"ttt_{call}_phase_{k}")
            while (i := counter.take()) < len(batches):
                if adapters is not None:  # a phase's last batch may be short: it uses the first rows
                    adapters.reset(s.seed * 1_000_003 + k * 65_537 + i)
                scored += score_batch(model, adapters, tokens, docs[batches[i]], byte_counts, s, meter, device,
                                      autocast, token_nats)
                if log and i % 8 == 0:  # the longest documents come first: early batches are the slow ones
                    log(f"ttt_progress phase:{k + 1}/{len(phases)} batch:{i + 1}/{len(batches)} "
                        f"tokens:{scored} elapsed:{time.perf_counter() - t0:.1f}s")
            done.extend(b for batch in batches for b in batch)
            if k < len(phases) - 1:
                if adapters is not None:
                    adapters.enable(False)
                # eager: the pass is one forward/backward per scored token, a small part of TTT's time,
                # and compiled it would need its own graphs (trainable base weights, adapters off)
                regions, model.regions = model.regions, None
                global_pass(model, tokens, docs[np.sort(np.array(done))], s, device, autocast)
                model.regions = regions
                if adapters is not None:
                    adapters.enable(True)
                if log:
                    log(f"ttt_phase:{k + 1}/{len(phases)} docs_scored:{len(done)} global_sgd_done "
                        f"elapsed:{time.perf_counter() - t0:.1f}s")
    finally:
        model.regions = None
        if adapters is not None:
            adapters.remove()
        model.load_state_dict(saved)
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    meter.all_reduce()
    loss, bpb = meter.result()
    return {"val_loss": loss, "val_bpb": bpb, "tokens": meter.tokens, "seconds": time.perf_counter() - t0,
            "compile_seconds": compile_seconds, "docs": len(docs), "phase_ends": list(s.phase_ends)}
