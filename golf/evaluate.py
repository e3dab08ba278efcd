"""Scoring of a validation stream: every target token exactly once, bytes by the exact rule.

The stream of N tokens has N-1 targets (target j is token j+1, predicted from tokens <= j). Windows of
`seq_len` inputs start every `stride` tokens; the first window scores all its targets, each later one
only its last `stride` (the targets the previous window did not reach), so with stride < seq_len every
scored token sees at least seq_len - stride tokens of context (sliding-window evaluation) and with
stride == seq_len this is plain non-overlapping evaluation. The last window is padded and its padding
masked, so nothing is dropped. Windows are split into contiguous ranges per rank and the float64 sums
are all-reduced, so the result does not depend on the number of ranks. Attention never crosses a BOS
when the model isolates documents, so a window's context is the scored token's own document prefix.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

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
) -> tuple[float, float]:
    """Returns (val_loss nats/token, val_bpb). `byte_counts` is target_bytes(...) of `tokens`;
    `stride` 0 means seq_len. `token_nats`, when given (float64, len(tokens) - 1), receives the loss
    of every target this rank scored, for tests that inspect single positions."""
    stride = stride or seq_len
    n_targets = len(tokens) - 1
    n_windows, keep_from = window_plan(n_targets, seq_len, stride)
    first, last = rank_range(n_windows, rank, world)
    meter = BpbMeter(device)
    batch_seqs = max(1, min(batch_seqs, last - first))
    offsets = np.arange(seq_len)
    for w0 in range(first, last, batch_seqs):
        # fixed, padded batches: a compiled model sees one shape only
        wins = np.arange(w0, w0 + batch_seqs)
        starts = wins * stride
        pos = starts[:, None] + offsets[None, :]  # input positions [B, T]
        valid = (wins[:, None] < last) & (pos < n_targets)
        scored = valid & ((offsets[None, :] >= keep_from) | (wins[:, None] == 0))
        safe = np.where(valid, pos, 0)
        x = torch.from_numpy(np.where(valid, tokens[safe], 0).astype(np.int64)).to(device)
        y = torch.from_numpy(np.where(valid, tokens[safe + 1], 0).astype(np.int64)).to(device)
        mask = torch.from_numpy(scored).to(device)
        nats = loss_fn(x, y).float()[mask]
        meter.update(nats, torch.from_numpy(byte_counts[safe[scored] + 1]).to(device))
        if token_nats is not None:
            token_nats[safe[scored]] = nats.double().cpu().numpy()
    meter.all_reduce()
    return meter.result()
