"""Scoring of a validation stream: every target token exactly once, bytes by the exact rule.

The stream of N tokens has N-1 targets, cut into sequences of `seq_len` targets; the last one is
padded and its padding masked, so nothing is dropped. Sequences are split into contiguous ranges per
rank and the float64 sums are all-reduced, so the result does not depend on the number of ranks.
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


@torch.no_grad()
def evaluate_stream(
    loss_fn: LossFn,
    tokens: np.ndarray,
    seq_len: int,
    batch_seqs: int,
    counter: ByteCounter | None,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    sidecar: np.ndarray | None = None,
) -> tuple[float, float]:
    """Returns (val_loss nats/token, val_bpb). Bytes come from `sidecar` (bytes per token, aligned
    with `tokens`) when given, else from `counter`'s lookup tables."""
    if sidecar is None and counter is None:
        raise ValueError("evaluate_stream needs a ByteCounter or a byte sidecar")
    if sidecar is not None and len(sidecar) != len(tokens):
        raise ValueError(f"byte sidecar has {len(sidecar)} entries for {len(tokens)} tokens")
    n_targets = len(tokens) - 1
    if n_targets < seq_len:
        raise ValueError(f"validation stream has {len(tokens)} tokens, shorter than one sequence of {seq_len}")
    n_seqs = -(-n_targets // seq_len)
    first, last = rank_range(n_seqs, rank, world)
    meter = BpbMeter(device)
    batch_seqs = max(1, min(batch_seqs, last - first))
    shape = (batch_seqs, seq_len)  # fixed, padded batches: a compiled model sees one shape only
    for s0 in range(first, last, batch_seqs):
        lo, hi = s0 * seq_len, min(min(s0 + batch_seqs, last) * seq_len, n_targets)
        count = hi - lo
        inputs = np.zeros(batch_seqs * seq_len, dtype=np.int64)
        targets = np.zeros_like(inputs)
        inputs[:count] = tokens[lo:hi]
        targets[:count] = tokens[lo + 1 : hi + 1]
        mask = torch.zeros(inputs.size, dtype=torch.bool)
        mask[:count] = True
        x = torch.from_numpy(inputs).to(device).view(shape)
        y = torch.from_numpy(targets).to(device).view(shape)
        mask = mask.to(device).view(shape)
        if sidecar is not None:
            nbytes = np.zeros_like(inputs)
            nbytes[:count] = sidecar[lo + 1 : hi + 1]
            b = torch.from_numpy(nbytes).to(device).view(shape)
        else:
            b = counter.token_bytes(x, y)
        nats = loss_fn(x, y).float()
        meter.update(nats[mask], b[mask])
    meter.all_reduce()
    return meter.result()
