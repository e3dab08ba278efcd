"""The embedded offline sample (data/sample/, committed, at most 2 MB): the official SP1024 tokenizer
and the heads of the official SP1024 train and val shards, cut at document boundaries.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .shards import BOS_ID, load_shard, write_shard

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
MAX_BYTES = 2_000_000  # decimal, like the artifact limit


def head_documents(tokens: np.ndarray, budget: int) -> np.ndarray:
    """The longest prefix of whole documents with at most `budget` tokens (at least one document)."""
    starts = np.flatnonzero(tokens == BOS_ID)
    if starts.size == 0 or starts[0] != 0:
        raise ValueError("shard does not start at a BOS token, so it cannot be cut at documents")
    ends = np.append(starts[1:], tokens.size)  # end of each document
    fitting = ends[ends <= budget]
    end = int(fitting[-1]) if fitting.size else int(ends[0])
    return np.asarray(tokens[:end])


def make_sample(sources: Path, out: Path = SAMPLE_DIR, train_tokens: int = 600_000,
                val_tokens: int = 100_000, log=print) -> int:
    """Writes the sample; returns its total size in bytes (fails above MAX_BYTES)."""
    src_tok = sources / "fineweb" / "tokenizers" / "fineweb_1024_bpe.model"
    shard_dir = out / "datasets" / "fineweb10B_sp1024"
    tok_dir = out / "tokenizers"
    shard_dir.mkdir(parents=True, exist_ok=True)
    tok_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src_tok, tok_dir / src_tok.name)
    for split, budget in (("train", train_tokens), ("val", val_tokens)):
        tokens = load_shard(sources / "fineweb" / "sp1024" / f"fineweb_{split}_000000.bin")
        head = head_documents(tokens, budget)
        write_shard(shard_dir / f"fineweb_{split}_000000.bin", head)
        log(f"{split}: {int((head == BOS_ID).sum()):,} documents, {head.size:,} tokens")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"sample at {out}: {total:,} bytes in all (limit {MAX_BYTES:,})")
    if total > MAX_BYTES:
        raise RuntimeError(f"sample {out} is {total:,} bytes, over the {MAX_BYTES:,}-byte limit; "
                           "lower --train-tokens / --val-tokens")
    return total
