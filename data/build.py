"""Builds challenge-format shards from documents (the `build` command).

Inputs are read in the order given; the val split is taken before shuffling (the first `val_docs`
documents, as the official export takes the first 50,000), then the train documents are shuffled
with `seed`. Every document becomes BOS + its tokens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import tokenizer as tok
from .bytecount import piece_tables, token_bytes
from .docs import read_documents
from .encode import encode_documents
from .writer import ShardWriter

DEFAULT_SEED = 1337


@dataclass
class Split:
    documents: int = 0
    tokens: int = 0
    paths: list[Path] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)


@dataclass
class BuildResult:
    dataset_dir: Path
    tokenizer_path: Path
    vocab_size: int
    train: Split
    val: Split


def read_inputs(paths, bin_sp=None) -> list[str]:
    docs: list[str] = []
    for p in paths:
        docs += read_documents(p, bin_sp)
    return docs


def shuffled(docs: list[str], seed: int) -> list[str]:
    """A seeded permutation (numpy's PCG64: the same on every machine and numpy 2.x)."""
    order = np.random.default_rng(seed).permutation(len(docs))
    return [docs[i] for i in order]


def prepare_dataset_dir(directory: Path, overwrite: bool) -> None:
    """Refuses to mix new shards with old ones (a leftover shard would be globbed into training)."""
    old = sorted(directory.glob("fineweb_*.bin")) if directory.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(f"{directory} already holds {len(old)} shard(s) (e.g. {old[0].name}); "
                              "pass --overwrite to replace them")
    for p in old:
        p.unlink()
    directory.mkdir(parents=True, exist_ok=True)


def save_tokenizer(model: bytes, path: Path, overwrite: bool) -> None:
    if path.is_file() and path.read_bytes() == model:
        return
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists with a different tokenizer; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model)
    os.replace(tmp, path)


def write_split(docs: list[str], model: bytes, directory: Path, split: str, *, shard_tokens: int,
                sidecar: bool, workers: int | None) -> Split:
    """Encodes `docs` into fineweb_<split>_%06d.bin (+ fineweb_<split>_bytes_%06d.bin)."""
    writer = ShardWriter(directory, f"fineweb_{split}_%06d.bin", shard_tokens)
    side = ShardWriter(directory, f"fineweb_{split}_bytes_%06d.bin", shard_tokens) if sidecar else None
    tables = piece_tables(tok.load(model)) if sidecar else None
    for arr in encode_documents(docs, model, workers=workers, desc=f"encode {split}"):
        writer.add(arr)
        if side is not None:
            side.add(token_bytes(arr, tables))  # each chunk starts at a BOS
    return Split(len(docs), writer.total, writer.close(), side.close() if side else [])


def build(inputs, out, *, vocab_size: int | None = None, tokenizer: str | None = None,
          val_docs: int = 0, val_file: str | None = None, seed: int | None = DEFAULT_SEED,
          shard_tokens: int = 10**8, byte_sidecar: bool = False, bin_tokenizer: str | None = None,
          workers: int | None = None, max_sentences: int = 1_000_000,
          reference: str | os.PathLike = tok.REFERENCE_MODEL, dataset_name: str | None = None,
          overwrite: bool = False, log=print) -> BuildResult:
    """Builds shards under `<out>/datasets/<dataset_name or fineweb10B_sp<V>>/`; `seed=None` keeps
    the input order."""
    if (vocab_size is None) == (tokenizer is None):
        raise ValueError("give exactly one of --vocab-size (train a tokenizer) or --tokenizer (reuse one)")
    if val_docs and val_file:
        raise ValueError("give at most one of --val-docs and --val")
    bin_model = bin_tokenizer or tokenizer
    bin_sp = tok.load(bin_model) if bin_model else None

    docs = read_inputs(inputs, bin_sp)
    if val_docs > len(docs):
        raise ValueError(f"--val-docs {val_docs} is more than the {len(docs)} input documents")
    val = read_inputs([val_file], bin_sp) if val_file else docs[:val_docs]
    train = docs[val_docs:] if not val_file else docs
    if seed is not None:
        train = shuffled(train, seed)
    log(f"documents: {len(train):,} train, {len(val):,} val")

    if tokenizer:
        tok.read_model(tokenizer)
        model = Path(tokenizer).read_bytes()
    else:
        log(f"training a {vocab_size}-piece BPE tokenizer on {len(train):,} documents")
        model = tok.train_tokenizer(train, vocab_size, max_sentences=max_sentences, reference=reference)
    vocab = tok.load(model).get_piece_size()
    out = Path(out)
    directory = out / "datasets" / (dataset_name or f"fineweb10B_sp{vocab}")
    tokenizer_path = out / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    prepare_dataset_dir(directory, overwrite)
    save_tokenizer(model, tokenizer_path, overwrite)

    kw = dict(shard_tokens=shard_tokens, workers=workers)
    train_split = write_split(train, model, directory, "train", sidecar=False, **kw)
    val_split = write_split(val, model, directory, "val", sidecar=byte_sidecar, **kw) if val else Split()
    log(f"train: {train_split.documents:,} documents, {train_split.tokens:,} tokens, "
        f"{len(train_split.paths)} shard(s); val: {val_split.documents:,} documents, "
        f"{val_split.tokens:,} tokens, {len(val_split.paths)} shard(s)"
        + (f" + {len(val_split.sidecars)} byte sidecar(s)" if val_split.sidecars else ""))
    log(f"wrote {directory} and {tokenizer_path}")
    return BuildResult(directory, tokenizer_path, vocab, train_split, val_split)
