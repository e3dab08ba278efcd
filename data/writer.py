"""Streams token arrays into numbered shards of a fixed size (the last one shorter), like the
official export: the stream is cut every `shard_tokens` tokens, documents may straddle two shards.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .shards import write_shard


class ShardWriter:
    def __init__(self, directory: str | os.PathLike, pattern: str, shard_tokens: int = 10**8):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.directory = Path(directory)
        self.pattern = pattern  # e.g. "fineweb_train_%06d.bin"
        self.shard_tokens = shard_tokens
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.paths: list[Path] = []
        self.total = 0

    def add(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=np.uint16)
        self.total += tokens.size
        while tokens.size:
            take = min(tokens.size, self.shard_tokens - self.buffered)
            self.parts.append(tokens[:take])
            self.buffered += take
            tokens = tokens[take:]
            if self.buffered == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        path = self.directory / (self.pattern % len(self.paths))
        self.directory.mkdir(parents=True, exist_ok=True)
        write_shard(path, np.concatenate(self.parts) if self.parts else np.zeros(0, np.uint16))
        self.paths.append(path)
        self.parts, self.buffered = [], 0

    def close(self) -> list[Path]:
        """Writes the partial last shard; returns every shard written."""
        if self.buffered:
            self._flush()
        return self.paths
