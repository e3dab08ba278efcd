"""Exact bits per byte (SPEC.md section 3), implemented once for every evaluation path.

Bytes of a target token y after a previous token x: the UTF-8 length of y's piece without a
leading "▁", plus 1 for that "▁" unless x is a control token (so a document's first word, which
follows BOS, gets no space byte); byte-fallback tokens count 1; control and unknown tokens count 0.
Summed over a document this equals the UTF-8 size of the decoded text, which the tests check on
the real validation documents.

With a text transform (CaseOps) the tokenizer's pieces no longer spell the original text, so the
bytes come from a per-token sidecar shard instead (`load_byte_sidecar`).

val_bpb = (sum nats / ln 2) / (sum bytes): sums are kept in float64 and all-reduced as sums, never
as per-rank means (ranks score different numbers of tokens and bytes).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from data.shards import load_stream

SPACE_MARK = "\u2581"  # SentencePiece's "▁" for a preceding space


class ByteCounter:
    """Lookup tables for per-token byte counts of one SentencePiece tokenizer."""

    def __init__(self, base_bytes, has_leading_space, is_control):
        self.base_bytes = torch.as_tensor(base_bytes, dtype=torch.int32)
        self.has_leading_space = torch.as_tensor(has_leading_space, dtype=torch.bool)
        self.is_control = torch.as_tensor(is_control, dtype=torch.bool)
        sizes = {t.shape for t in (self.base_bytes, self.has_leading_space, self.is_control)}
        if len(sizes) != 1 or self.base_bytes.dim() != 1:
            raise ValueError(f"ByteCounter: the three lookup tables must be 1-D of one length, got {sizes}")
        # Copies per device, so token_bytes on a new device moves the tables only once.
        self._by_device = {self.base_bytes.device: (self.base_bytes, self.has_leading_space, self.is_control)}

    @property
    def vocab_size(self) -> int:
        return self.base_bytes.numel()

    @classmethod
    def from_tokenizer(cls, path, vocab_size: int | None = None) -> "ByteCounter":
        """Builds the tables from a SentencePiece model file; `vocab_size` (the model's embedding
        rows) must match the tokenizer's, since a mismatch means the wrong tokenizer."""
        import sentencepiece as spm

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ByteCounter.from_tokenizer: tokenizer file {path} does not exist")
        sp = spm.SentencePieceProcessor(model_file=path)
        n = int(sp.vocab_size())
        if vocab_size is not None and int(vocab_size) != n:
            raise ValueError(
                f"ByteCounter.from_tokenizer: {path} has {n} pieces but vocab_size={vocab_size} was given"
            )
        base = np.zeros(n, dtype=np.int32)
        space = np.zeros(n, dtype=np.bool_)
        control = np.zeros(n, dtype=np.bool_)
        for v in range(n):
            # Unused pieces never occur in encoded text; treating them like control keeps them at 0.
            if sp.is_control(v) or sp.is_unknown(v) or sp.is_unused(v):
                control[v] = True
            elif sp.is_byte(v):
                base[v] = 1
            else:
                piece = sp.id_to_piece(v)
                if piece.startswith(SPACE_MARK):
                    space[v] = True
                    piece = piece[1:]
                base[v] = len(piece.encode("utf-8"))
        return cls(base, space, control)

    def to(self, device) -> "ByteCounter":
        """A counter whose tables live on `device`."""
        device = torch.device(device)
        return ByteCounter(*self._tables(device))

    def _tables(self, device: torch.device):
        tables = self._by_device.get(device)
        if tables is None:
            tables = tuple(t.to(device) for t in (self.base_bytes, self.has_leading_space, self.is_control))
            self._by_device[device] = tables
        return tables

    def token_bytes(self, prev_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Bytes of each target given its previous token: int32, same shape, on the inputs' device."""
        if prev_ids.shape != target_ids.shape:
            raise ValueError(
                f"token_bytes: prev_ids shape {tuple(prev_ids.shape)} != target_ids shape {tuple(target_ids.shape)}"
            )
        base, space, control = self._tables(target_ids.device)
        # int64 indices: uint16/int32 token tensors are not valid index types everywhere.
        prev = prev_ids.to(device=target_ids.device, dtype=torch.long)
        tgt = target_ids.long()
        return base[tgt] + (space[tgt] & ~control[prev]).to(torch.int32)

    def stream_bytes(self, tokens: np.ndarray) -> np.ndarray:
        """Bytes of every token of a stream as the target of the token before it (the first
        token is treated as following a BOS): the content of a byte sidecar, as uint16."""
        tokens = np.asarray(tokens)
        t = torch.from_numpy(tokens.astype(np.int64))
        prev = torch.cat([torch.ones(1, dtype=torch.int64), t[:-1]]) if t.numel() else t
        return self.to("cpu").token_bytes(prev, t).numpy().astype(np.uint16)


def load_byte_sidecar(pattern: str, expected_tokens: int | None = None) -> np.ndarray:
    """Per-token byte counts (uint16) from sidecar shards matching `pattern`, concatenated in name
    order so entry i is the byte count of token i of the matching token stream (a BOS has 0).
    Missing files or corrupt headers raise; `expected_tokens` checks alignment with the tokens."""
    try:
        counts = load_stream(pattern)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"load_byte_sidecar: no byte sidecar files match {pattern}") from e
    if expected_tokens is not None and counts.size != expected_tokens:
        raise ValueError(
            f"load_byte_sidecar: sidecar {pattern} has {counts.size} entries, "
            f"but the token stream has {expected_tokens} tokens (they must align one to one)"
        )
    return counts


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class BpbMeter:
    """Sums of nats, bytes and scored tokens in float64 on one device.

    all_reduce() sums the local totals across ranks into a separate global copy, so calling it twice
    never double-counts; an update after it makes the reported totals local again until the next
    all_reduce().
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self._local = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, bytes, tokens
        self._global: torch.Tensor | None = None

    def update(self, nats: torch.Tensor, nbytes: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Adds per-token losses (nats) and the byte counts of the same scored tokens; with `mask`
        (same shape), only the positions where it is true count. The mask form never waits for the
        device, where selecting by it (nats[mask]) would."""
        if nats.numel() != nbytes.numel() or (mask is not None and mask.shape != nats.shape):
            raise ValueError(
                f"BpbMeter.update: nats has {nats.numel()} elements, nbytes {nbytes.numel()}"
                + (f", mask shape {tuple(mask.shape)} vs nats {tuple(nats.shape)}" if mask is not None else "")
                + "; they must describe the same scored tokens"
            )
        self._global = None
        nats = nats.detach().to(device=self.device, dtype=torch.float64)
        nbytes = nbytes.detach().to(device=self.device, dtype=torch.float64).reshape(nats.shape)
        if mask is None:
            self._local[:2] += torch.stack([nats.sum(), nbytes.sum()])
            self._local[2] += nats.numel()
        else:
            mask = mask.to(self.device)
            self._local += torch.stack([torch.where(mask, nats, 0).sum(), torch.where(mask, nbytes, 0).sum(),
                                        mask.sum().to(torch.float64)])

    def all_reduce(self) -> None:
        """Sums totals across ranks (a no-op when torch.distributed is not initialised)."""
        totals = self._local.clone()
        if _dist_ready():
            torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM)
        self._global = totals

    def _totals(self) -> torch.Tensor:
        return self._local if self._global is None else self._global

    @property
    def nats(self) -> float:
        return float(self._totals()[0])

    @property
    def bytes(self) -> float:
        return float(self._totals()[1])

    @property
    def tokens(self) -> int:
        return int(self._totals()[2])

    def result(self) -> tuple[float, float]:
        """(val_loss in nats per token, val_bpb)."""
        nats, nbytes, tokens = self._totals().tolist()
        if tokens <= 0 or nbytes <= 0:
            raise ValueError(f"BpbMeter.result: nothing scored yet (tokens={tokens:.0f}, bytes={nbytes:.0f})")
        return nats / tokens, nats / math.log(2) / nbytes
