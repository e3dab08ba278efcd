"""Parallel document encoding: BOS + tokens per document, no EOS.

Encoding runs in a process pool over chunks of documents; `imap` keeps the chunks in input order, so
the output does not depend on the number of workers.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator, Sequence

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from .shards import BOS_ID

_worker_sp: spm.SentencePieceProcessor | None = None


def _init_worker(model: bytes) -> None:
    global _worker_sp
    _worker_sp = spm.SentencePieceProcessor(model_proto=model)


def _encode_chunk(texts: list[str]) -> np.ndarray:
    """BOS + ids for each text, concatenated as uint16 (compact to send back to the parent)."""
    ids = _worker_sp.encode(texts, num_threads=1)
    out = np.empty(sum(len(x) for x in ids) + len(ids), dtype=np.uint16)
    pos = 0
    for x in ids:
        out[pos] = BOS_ID
        out[pos + 1:pos + 1 + len(x)] = x
        pos += 1 + len(x)
    return out


def _chunks(texts: Sequence[str], chunk_chars: int) -> Iterator[list[str]]:
    """Consecutive runs of documents of about `chunk_chars` characters (balanced work per task)."""
    chunk, size = [], 0
    for t in texts:
        chunk.append(t)
        size += len(t)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode_documents(texts: Sequence[str], model: bytes, *, workers: int | None = None,
                     chunk_chars: int = 1 << 20, desc: str = "encode") -> Iterator[np.ndarray]:
    """Yields, in document order, uint16 arrays of BOS + tokens for consecutive runs of documents."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    if sp.get_piece_size() > 1 << 16:
        raise ValueError(f"tokenizer has {sp.get_piece_size()} pieces; shards store uint16, so at most 65536")
    chunks = list(_chunks(texts, chunk_chars))
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    pool = None
    if workers <= 1:
        _init_worker(model)
        results = map(_encode_chunk, chunks)
    else:
        # fork starts workers in milliseconds; it happens before the progress bar starts its thread
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(model,))
        results = pool.imap(_encode_chunk, chunks)
    bar = tqdm(total=sum(len(t) for t in texts), desc=desc, unit="char", unit_scale=True, mininterval=1.0)
    try:
        for chunk, arr in zip(chunks, results):
            bar.update(sum(len(t) for t in chunk))
            yield arr
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
