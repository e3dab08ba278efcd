"""Documents in and out: `.jsonl` / `.jsonl.xz` files of `{"text": ...}` lines, and token shards
decoded back to text one document per BOS.
"""
from __future__ import annotations

import gzip
import json
import lzma
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .shards import BOS_ID, load_shard, split_documents

JSONL_SUFFIXES = (".jsonl", ".jsonl.xz", ".jsonl.gz")


def _open_text(path: Path, mode: str):
    """Opens plain, .xz or .gz text by suffix (UTF-8)."""
    if path.name.endswith(".xz"):
        return lzma.open(path, mode + "t", encoding="utf-8")
    if path.name.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read_jsonl(path: str | os.PathLike) -> Iterator[str]:
    """The "text" of every non-blank line of a .jsonl(.xz/.gz) file."""
    path = Path(path)
    with _open_text(path, "r") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a \"text\" string ({e!r})") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: \"text\" must be a string, got {type(text).__name__}")
            yield text


def decode_tokens(tokens: np.ndarray, sp, batch_tokens: int = 1 << 20) -> list[str]:
    """Decodes a token stream per document (split at BOS; the BOS itself carries no text). With a
    CaseOps tokenizer the documents' original text comes back (caseops.decode of the pieces' text).

    Works in batches: a whole 1e8-token shard as Python int lists would take gigabytes."""
    from .tokenizer import is_caseops_processor
    texts = _decode_tokens(tokens, sp, batch_tokens)
    if is_caseops_processor(sp):
        from . import caseops
        texts = [caseops.decode(t) for t in texts]
    return texts


def _decode_tokens(tokens: np.ndarray, sp, batch_tokens: int) -> list[str]:
    tokens = np.asarray(tokens)
    docs = split_documents(tokens) if tokens.size else []
    texts: list[str] = []
    batch: list[list[int]] = []
    size = 0
    for d in tqdm(docs, desc="decode", unit=" docs", mininterval=1.0, disable=len(docs) < 10_000):
        batch.append((d[1:] if d.size and d[0] == BOS_ID else d).tolist())
        size += d.size
        if size >= batch_tokens:
            texts += sp.decode(batch)
            batch, size = [], 0
    if batch:
        texts += sp.decode(batch)
    return texts


def read_bin(path: str | os.PathLike, sp) -> list[str]:
    """The documents of a token shard, decoded with the tokenizer `sp` that wrote it."""
    return list(decode_shards([path], sp))


def read_documents(path: str | os.PathLike, bin_sp=None) -> list[str]:
    """Documents of one input: a .jsonl(.xz/.gz) file or a .bin shard (needs `bin_sp` to decode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.name.endswith(".bin"):
        if bin_sp is None:
            raise ValueError(f"{path}: a .bin input needs the tokenizer that wrote it (--bin-tokenizer)")
        return read_bin(path, bin_sp)
    if path.name.endswith(JSONL_SUFFIXES):
        return list(tqdm(read_jsonl(path), desc=f"read {path.name}", unit=" docs", mininterval=1.0))
    raise ValueError(f"input {path}: expected a .jsonl, .jsonl.xz, .jsonl.gz or .bin file")


def write_jsonl(path: str | os.PathLike, texts: Iterable[str]) -> int:
    """Writes `{"text": ...}` lines (compressed for a .xz/.gz name); returns the document count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with _open_text(path, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            n += 1
    return n


def decode_shards(paths, sp) -> Iterator[str]:
    """Documents of consecutive shards; a document cut by a shard boundary is rejoined."""
    carry = np.zeros(0, dtype=np.uint16)
    for path in paths:
        if "_bytes_" in Path(path).name:  # fineweb_val_* globs also match the sidecars
            raise ValueError(f"{path} is a byte sidecar, not a token shard; leave it out of the inputs")
        tokens = np.asarray(load_shard(path))
        if tokens.size and int(tokens.max()) >= sp.get_piece_size():
            raise ValueError(f"{path}: token id {int(tokens.max())} is outside the tokenizer's "
                             f"vocabulary of {sp.get_piece_size()} (wrong tokenizer?)")
        tokens = np.concatenate([carry, tokens])
        bos = np.flatnonzero(tokens == BOS_ID)
        cut = int(bos[-1]) if bos.size else 0  # the last document may continue in the next shard
        yield from decode_tokens(tokens[:cut], sp)
        carry = tokens[cut:]
    yield from decode_tokens(carry, sp)
