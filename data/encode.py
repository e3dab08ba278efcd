"""Parallel document encoding: BOS + tokens per document, no EOS.

Encoding runs in a process pool over chunks of documents; `imap` keeps the chunks in input order, so
the output does not depend on the number of workers. `encode_documents_caseops` encodes the CaseOps
form of the documents and also returns each token's byte count in the original text (the sidecar).
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
_worker_tables = None  # piece byte tables of _worker_sp (CaseOps encoding only)


def _init_worker(model: bytes, caseops: bool = False) -> None:
    global _worker_sp, _worker_tables
    _worker_sp = spm.SentencePieceProcessor(model_proto=model)
    if caseops:
        from .bytecount import piece_tables
        _worker_tables = piece_tables(_worker_sp)


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


def _encode_chunk_caseops(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """(BOS + ids per text, original-text bytes per token, documents whose decoded text differs from
    the normalized input), for the CaseOps form of each text.

    A document's original text is what its tokens decode to (tokenizer decode, then caseops.decode);
    the sidecar spreads its UTF-8 bytes over the tokens, so each document's counts sum to exactly
    that length: the bytes of the decoded CaseOps text per token (the SPEC section 3 rule: BOS 0, no
    space byte for the first token) are weighted by caseops.byte_weights (markers 0, case-restored
    letters their original length)."""
    from . import caseops
    from .bytecount import token_bytes
    from .tokenizer import normalized_text
    sp = _worker_sp
    norm = [normalized_text(sp, t) for t in texts]
    enc = [caseops.encode(t) for t in norm]
    ids = sp.encode(enc, num_threads=1)
    decoded = sp.decode(ids)
    total = sum(len(x) for x in ids) + len(ids)
    tokens = np.empty(total, dtype=np.uint16)
    counts = np.empty(total, dtype=np.uint16)
    pos, changed = 0, 0
    for x, e, d in zip(ids, enc, decoded):
        doc = np.empty(len(x) + 1, dtype=np.int64)
        doc[0] = BOS_ID
        doc[1:] = x
        piece_bytes = token_bytes(doc, _worker_tables).astype(np.int64)
        weights = caseops.byte_weights(d)
        if int(piece_bytes.sum()) != weights.size:
            raise RuntimeError(f"tokenizer pieces give {int(piece_bytes.sum())} bytes but the decoded "
                               f"document has {weights.size} (unexpected tokenizer decode rule)")
        cum = np.concatenate([[0], np.cumsum(weights)])
        ends = np.cumsum(piece_bytes)
        doc_counts = cum[ends] - cum[ends - piece_bytes]
        if doc_counts.size and int(doc_counts.max()) > 0xFFFF:
            raise RuntimeError("a token accounts for more than 65535 bytes; the sidecar stores uint16")
        tokens[pos:pos + doc.size] = doc
        counts[pos:pos + doc.size] = doc_counts
        pos += doc.size
        changed += d != e
    return tokens, counts, changed


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


def _run(texts: Sequence[str], model: bytes, fn, *, workers: int | None, chunk_chars: int, desc: str,
         caseops: bool = False) -> Iterator:
    """`fn` over consecutive chunks of `texts` in worker processes (each holding the tokenizer),
    results in input order."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    if sp.get_piece_size() > 1 << 16:
        raise ValueError(f"tokenizer has {sp.get_piece_size()} pieces; shards store uint16, so at most 65536")
    chunks = list(_chunks(texts, chunk_chars))
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    pool = None
    if workers <= 1:
        _init_worker(model, caseops)
        results = map(fn, chunks)
    else:
        # fork starts workers in milliseconds; it happens before the progress bar starts its thread
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(model, caseops))
        results = pool.imap(fn, chunks)
    bar = tqdm(total=sum(len(t) for t in texts), desc=desc, unit="char", unit_scale=True, mininterval=1.0)
    try:
        for chunk, result in zip(chunks, results):
            bar.update(sum(len(t) for t in chunk))
            yield result
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()


def encode_documents(texts: Sequence[str], model: bytes, *, workers: int | None = None,
                     chunk_chars: int = 1 << 20, desc: str = "encode") -> Iterator[np.ndarray]:
    """Yields, in document order, uint16 arrays of BOS + tokens for consecutive runs of documents."""
    yield from _run(texts, model, _encode_chunk, workers=workers, chunk_chars=chunk_chars, desc=desc)


def encode_documents_caseops(texts: Sequence[str], model: bytes, *, workers: int | None = None,
                             chunk_chars: int = 1 << 20, desc: str = "encode"
                             ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Like `encode_documents` for a CaseOps tokenizer: yields (BOS + tokens, original-text bytes per
    token, number of documents whose decoded text differs from the normalized input) per chunk."""
    from . import caseops
    caseops.prepare()  # build the case tables once, before the workers fork
    yield from _run(texts, model, _encode_chunk_caseops, workers=workers, chunk_chars=chunk_chars,
                    desc=desc, caseops=True)
