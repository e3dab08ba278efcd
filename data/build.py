"""Builds challenge-format shards from documents (the `build` command).

Inputs are read in the order given; the val split is taken before shuffling (the first `val_docs`
documents, as the official export takes the first 50,000), then the train documents are shuffled
with `seed`. Every document becomes BOS + its tokens.

With `caseops` the documents are encoded in their CaseOps form (data/caseops.py) by a tokenizer that
reserves the case control symbols, names get a `_caseops` suffix, and the val split always gets its
byte sidecar (bytes of the original text per token), since the pieces no longer spell the text.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import tokenizer as tok
from .bytecount import piece_tables, token_bytes
from .docs import read_documents
from .encode import encode_documents, encode_documents_caseops
from .writer import ShardWriter

DEFAULT_SEED = 1337


@dataclass
class Split:
    documents: int = 0
    tokens: int = 0
    paths: list[Path] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)
    changed: int = 0  # CaseOps: documents whose decoded text differs from the normalized input


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


def tokenizer_filename(vocab: int, caseops: bool = False) -> str:
    return f"fineweb_{vocab}_caseops.model" if caseops else f"fineweb_{vocab}_bpe.model"


def dataset_name_for(vocab: int, caseops: bool = False) -> str:
    return f"fineweb10B_sp{vocab}_caseops" if caseops else f"fineweb10B_sp{vocab}"


def check_tokenizer_kind(model: bytes, caseops: bool, name: str = "tokenizer") -> None:
    """A CaseOps tokenizer only with --caseops and the other way round (a mix silently wastes tokens)."""
    if tok.is_caseops_model(model) == caseops:
        return
    if caseops:
        raise ValueError(f"{name} is not a CaseOps tokenizer (no user-defined case control pieces); "
                         "give one made with --caseops")
    raise ValueError(f"{name} is a CaseOps tokenizer; pass --caseops to encode CaseOps text with it")


def write_split(docs: list[str], model: bytes, directory: Path, split: str, *, shard_tokens: int,
                sidecar: bool, workers: int | None, caseops: bool = False) -> Split:
    """Encodes `docs` into fineweb_<split>_%06d.bin (+ fineweb_<split>_bytes_%06d.bin)."""
    writer = ShardWriter(directory, f"fineweb_{split}_%06d.bin", shard_tokens)
    side = ShardWriter(directory, f"fineweb_{split}_bytes_%06d.bin", shard_tokens) if sidecar else None
    changed = 0
    if caseops:
        for arr, counts, n in encode_documents_caseops(docs, model, workers=workers, desc=f"encode {split}"):
            writer.add(arr)
            changed += n
            if side is not None:
                side.add(counts)
    else:
        tables = piece_tables(tok.load(model)) if sidecar else None
        for arr in encode_documents(docs, model, workers=workers, desc=f"encode {split}"):
            writer.add(arr)
            if side is not None:
                side.add(token_bytes(arr, tables))  # each chunk starts at a BOS
    return Split(len(docs), writer.total, writer.close(), side.close() if side else [], changed)


def build(inputs, out, *, vocab_size: int | None = None, tokenizer: str | None = None,
          val_docs: int = 0, val_file: str | None = None, seed: int | None = DEFAULT_SEED,
          shard_tokens: int = 10**8, byte_sidecar: bool = False, bin_tokenizer: str | None = None,
          workers: int | None = None, max_sentences: int = 1_000_000,
          reference: str | os.PathLike = tok.REFERENCE_MODEL, dataset_name: str | None = None,
          overwrite: bool = False, caseops: bool = False, tokenizer_seed: int | None = None,
          log=print) -> BuildResult:
    """Builds shards under `<out>/datasets/<dataset_name or fineweb10B_sp<V>[_caseops]>/`; `seed=None`
    keeps the input order; `tokenizer_seed` fixes the tokenizer trainer's sampling."""
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
        check_tokenizer_kind(model, caseops, str(tokenizer))
    else:
        log(f"training a {vocab_size}-piece BPE {'CaseOps ' if caseops else ''}tokenizer on "
            f"{len(train):,} documents")
        model = tok.train_tokenizer(train, vocab_size, max_sentences=max_sentences, reference=reference,
                                    caseops=caseops, seed=tokenizer_seed)
    vocab = tok.load(model).get_piece_size()
    out = Path(out)
    directory = out / "datasets" / (dataset_name or dataset_name_for(vocab, caseops))
    tokenizer_path = out / "tokenizers" / tokenizer_filename(vocab, caseops)
    prepare_dataset_dir(directory, overwrite)
    save_tokenizer(model, tokenizer_path, overwrite)

    kw = dict(shard_tokens=shard_tokens, workers=workers, caseops=caseops)
    train_split = write_split(train, model, directory, "train", sidecar=False, **kw)
    # CaseOps pieces do not spell the original text: bpb needs the val sidecar.
    val_split = (write_split(val, model, directory, "val", sidecar=byte_sidecar or caseops, **kw)
                 if val else Split())
    changed = train_split.changed + val_split.changed
    if changed:
        log(f"caseops: {changed:,} document(s) decode to other text than their normalized input "
            "(their sidecar counts the decoded text)")
    log(f"train: {train_split.documents:,} documents, {train_split.tokens:,} tokens, "
        f"{len(train_split.paths)} shard(s); val: {val_split.documents:,} documents, "
        f"{val_split.tokens:,} tokens, {len(val_split.paths)} shard(s)"
        + (f" + {len(val_split.sidecars)} byte sidecar(s)" if val_split.sidecars else ""))
    log(f"wrote {directory} and {tokenizer_path}")
    return BuildResult(directory, tokenizer_path, vocab, train_split, val_split)


def train_tokenizer_file(inputs, out, *, vocab_size: int, caseops: bool = False,
                         bin_tokenizer: str | None = None, max_sentences: int = 1_000_000,
                         seed: int | None = None, reference: str | os.PathLike = tok.REFERENCE_MODEL,
                         overwrite: bool = False, log=print) -> Path:
    """Trains a tokenizer on the documents of `inputs` (the `tokenizer` command) and saves it as
    `<out>/tokenizers/fineweb_<V>_bpe.model` (or `fineweb_<V>_caseops.model`)."""
    docs = read_inputs(inputs, tok.load(bin_tokenizer) if bin_tokenizer else None)
    log(f"training a {vocab_size}-piece BPE {'CaseOps ' if caseops else ''}tokenizer on {len(docs):,} documents")
    model = tok.train_tokenizer(docs, vocab_size, max_sentences=max_sentences, reference=reference,
                                caseops=caseops, seed=seed)
    path = Path(out) / "tokenizers" / tokenizer_filename(tok.load(model).get_piece_size(), caseops)
    save_tokenizer(model, path, overwrite)
    log(f"wrote {path}")
    return path
