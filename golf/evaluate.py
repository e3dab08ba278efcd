"""Scoring of a validation stream: every target token exactly once, bytes by the exact rule.

The stream of N tokens has N-1 targets (target j is token j+1, predicted from tokens <= j). Windows of
`seq_len` inputs start every `stride` tokens; the first window scores all its targets, each later one
only its last `stride` (the targets the previous window did not reach), so with stride < seq_len every
scored token sees at least seq_len - stride tokens of context (sliding-window evaluation) and with
stride == seq_len this is plain non-overlapping evaluation. The last window is padded and its padding
masked, so nothing is dropped. Windows are split into contiguous ranges per rank and the float64 sums
are all-reduced, so the result does not depend on the number of ranks. Attention never crosses a BOS
when the model isolates documents, so a window's context is the scored token's own document prefix.

layout="docs" (plain evaluation only) scores each document from its own start instead, as the public
scripts' in-training evaluation does: a document is cut every seq_len tokens from its first token,
and the pieces are packed into rows without being split (a piece that does not begin with a BOS
opens a row, whose start is a segment start). Fixed rows of the flat stream would cut about one
document per row, and the tokens after such a cut lose their context.
"""
from __future__ import annotations

import bisect
from typing import Callable

import numpy as np
import torch

from data.shards import BOS_ID
from golf.bpb import BpbMeter, ByteCounter

# loss_fn(inputs [B, T], targets [B, T]) -> per-token nats [B, T]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous share [start, end) of n items for `rank`."""
    return n * rank // world, n * (rank + 1) // world


def target_bytes(tokens: np.ndarray, counter: ByteCounter | None, sidecar: np.ndarray | None) -> np.ndarray:
    """Bytes of every token of the stream as a target (entry j: token j given token j-1), int64.
    The sidecar, when there is one, is the ground truth (CaseOps text); else the tokenizer's tables."""
    if sidecar is not None:
        if len(sidecar) != len(tokens):
            raise ValueError(f"byte sidecar has {len(sidecar)} entries for {len(tokens)} tokens")
        return np.asarray(sidecar, dtype=np.int64)
    if counter is None:
        raise ValueError("scoring needs a ByteCounter or a byte sidecar")
    return counter.stream_bytes(tokens).astype(np.int64)


def window_plan(n_targets: int, seq_len: int, stride: int) -> tuple[int, int]:
    """(number of windows, first scored offset inside every window but the first)."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"EVAL_STRIDE={stride} must be in 1..EVAL_SEQ_LEN={seq_len}")
    if n_targets < seq_len:
        raise ValueError(f"validation stream has {n_targets + 1} tokens, shorter than one window of {seq_len}")
    return 1 + -(-(n_targets - seq_len) // stride), seq_len - stride


def document_pieces(tokens: np.ndarray, seq_len: int, bos_id: int) -> np.ndarray:
    """[P, 2] int64 (first input position, length) of every piece: documents begin at each BOS (and at
    position 0) and are cut every seq_len inputs from their start. The pieces cover the input
    positions 0..N-2 (those with a target) exactly once, in stream order."""
    n = len(tokens) - 1
    starts = np.flatnonzero(np.asarray(tokens[:n]) == bos_id)
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate(([0], starts))
    ends = np.append(starts[1:], n)
    per_doc = -(-(ends - starts) // seq_len)
    doc = np.repeat(np.arange(len(starts)), per_doc)
    k = np.arange(per_doc.sum()) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)  # piece number in its doc
    first = starts[doc] + k * seq_len
    return np.stack([first, np.minimum(seq_len, ends[doc] - first)], 1).astype(np.int64)


def pack_pieces(pieces: np.ndarray, opens_row: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, offset) of every piece and the number of rows of length seq_len. Pieces flagged in
    `opens_row` start rows of their own; the rest go best-fit, longest first, into the free tails."""
    row = np.empty(len(pieces), np.int64)
    off = np.empty(len(pieces), np.int64)
    used: list[int] = []
    for i in np.flatnonzero(opens_row):
        row[i], off[i] = len(used), 0
        used.append(int(pieces[i, 1]))
    free = sorted((seq_len - u, r) for r, u in enumerate(used) if u < seq_len)  # (free tokens, row)
    rest = np.flatnonzero(~opens_row)
    for i in rest[np.argsort(-pieces[rest, 1], kind="stable")]:
        length = int(pieces[i, 1])
        j = bisect.bisect_left(free, (length, -1))  # the tightest tail that fits
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = seq_len, len(used)
            used.append(0)
        row[i], off[i] = r, used[r]
        used[r] += length
        if room > length:
            bisect.insort(free, (room - length, r))
    return row, off, len(used)


def _document_batches(tokens: np.ndarray, seq_len: int, batch_seqs: int, bos_id: int, rank: int, world: int):
    """Input positions [batch_seqs, seq_len] (-1: padding) of this rank's rows, batch by batch."""
    pieces = document_pieces(tokens, seq_len, bos_id)
    row, off, n_rows = pack_pieces(pieces, np.asarray(tokens)[pieces[:, 0]] != bos_id, seq_len)
    order = np.lexsort((off, row))
    pieces, row, off = pieces[order], row[order], off[order]
    row_ptr = np.searchsorted(row, np.arange(n_rows + 1))
    first, last = rank_range(n_rows, rank, world)
    batch_seqs = max(1, min(batch_seqs, last - first))
    for r0 in range(first, last, batch_seqs):
        sel = slice(row_ptr[r0], row_ptr[min(r0 + batch_seqs, last)])
        start, length = pieces[sel, 0], pieces[sel, 1]
        which = np.repeat(np.arange(len(length)), length)
        within = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
        pos = np.full((batch_seqs, seq_len), -1, np.int64)
        pos[row[sel][which] - r0, off[sel][which] + within] = start[which] + within
        yield pos


def _stream_batches(n_targets: int, seq_len: int, stride: int, batch_seqs: int, rank: int, world: int):
    """(input positions [B, T] with -1 for padding, scored mask) of this rank's windows, batch by batch."""
    n_windows, keep_from = window_plan(n_targets, seq_len, stride)
    first, last = rank_range(n_windows, rank, world)
    batch_seqs = max(1, min(batch_seqs, last - first))
    offsets = np.arange(seq_len)
    for w0 in range(first, last, batch_seqs):
        wins = np.arange(w0, w0 + batch_seqs)
        pos = wins[:, None] * stride + offsets[None, :]
        valid = (wins[:, None] < last) & (pos < n_targets)
        scored = valid & ((offsets[None, :] >= keep_from) | (wins[:, None] == 0))
        yield np.where(valid, pos, -1), scored


@torch.no_grad()
def evaluate_stream(
    loss_fn: LossFn,
    tokens: np.ndarray,
    seq_len: int,
    batch_seqs: int,
    byte_counts: np.ndarray,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    stride: int = 0,
    token_nats: np.ndarray | None = None,
    layout: str = "stream",
    bos_id: int = BOS_ID,
) -> tuple[float, float]:
    """Returns (val_loss nats/token, val_bpb). `byte_counts` is target_bytes(...) of `tokens`;
    `stride` 0 means seq_len. layout "docs" (stride 0 only) scores every document from its own start
    (module docstring); "stream" scores fixed windows of the flat stream. `token_nats`, when given
    (float64, len(tokens) - 1), receives the loss of every target this rank scored, for tests that
    inspect single positions."""
    if layout not in ("stream", "docs"):
        raise ValueError(f"evaluation layout {layout!r}: expected 'stream' or 'docs'")
    if layout == "docs" and stride not in (0, seq_len):
        raise ValueError(f"layout 'docs' is plain evaluation; EVAL_STRIDE={stride} needs layout 'stream'")
    n_targets = len(tokens) - 1
    if layout == "docs":
        batches = ((pos, pos >= 0) for pos in _document_batches(tokens, seq_len, batch_seqs, bos_id, rank, world))
    else:
        batches = _stream_batches(n_targets, seq_len, stride or seq_len, batch_seqs, rank, world)
    meter = BpbMeter(device)
    for pos, scored in batches:
        # fixed, padded batches: a compiled model sees one shape only
        safe = np.where(pos >= 0, pos, 0)
        x = torch.from_numpy(np.where(pos >= 0, tokens[safe], 0).astype(np.int64)).to(device)
        y = torch.from_numpy(np.where(pos >= 0, tokens[safe + 1], 0).astype(np.int64)).to(device)
        mask = torch.from_numpy(scored).to(device)
        nats = loss_fn(x, y).float()[mask]
        meter.update(nats, torch.from_numpy(byte_counts[safe[scored] + 1]).to(device))
        if token_nats is not None:
            token_nats[safe[scored]] = nats.double().cpu().numpy()
    meter.all_reduce()
    return meter.result()
