"""The benchmark set for GPU comparisons (shared/data/README.md, SPEC.md section 9).

Train: every document of the FineWeb SP1024 train shard (decoded), the FineWeb documents file and
the debmix train file, shuffled together with a fixed seed into one shard per tokenizer. Val: the
FineWeb val shard, copied as-is for SP1024, decoded and re-encoded (with its byte sidecar) otherwise.
The counts are checked against the recipe so a wrong or partial source folder cannot go unnoticed.

CaseOps variant (`caseops=True`): the same documents in their CaseOps form (data/caseops.py) in
`bench_sp<V>_caseops/`, val always re-encoded with its byte sidecar. Its tokenizer
(`tokenizers/fineweb_<V>_caseops.model`) is the one given, else the one already in `<out>/tokenizers/`,
else trained here on the benchmark train documents (official trainer settings, seeded sampling).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from .build import build, prepare_dataset_dir, tokenizer_filename
from .shards import BOS_ID, load_shard
from .tokenizer import load as load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 1337  # fixed: every machine builds the same permutation
EXPECTED_DOCS = 33_817
EXPECTED_TOKENS = {1024: 69.9e6, 8192: 49.7e6}
# CaseOps train tokens with the tokenizer trained here (seeded: the same on every machine; measured
# 67,902,420 and 47,206,223); not checked for a tokenizer given with `tokenizer`.
EXPECTED_TOKENS_CASEOPS = {1024: 67.9e6, 8192: 47.2e6}
TOLERANCE = 0.02


def default_sources() -> Path:
    """../shared/data beside the checkout, else the carried copy under .carry/shared_data."""
    for candidate in (REPO_ROOT.parent / "shared" / "data", REPO_ROOT / ".carry" / "shared_data"):
        if (candidate / "fineweb").is_dir():
            return candidate
    return REPO_ROOT.parent / "shared" / "data"


def source_files(src: Path, vocab: int, caseops: bool = False) -> dict[str, Path]:
    files = {
        "train_shard": src / "fineweb" / "sp1024" / "fineweb_train_000000.bin",
        "fineweb_docs": src / "fineweb" / "docs" / "fineweb_docs.jsonl.xz",
        "debmix": src / "debmix" / "train.jsonl.xz",
        "val_shard": src / "fineweb" / "sp1024" / "fineweb_val_000000.bin",
        "sp1024": src / "fineweb" / "tokenizers" / "fineweb_1024_bpe.model",
    }
    if not caseops:  # CaseOps tokenizers are not among the sources
        files["tokenizer"] = src / "fineweb" / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"benchmark sources missing under {src} (--sources): {', '.join(missing)}")
    return files


def check_counts(documents: int, tokens: int | None, vocab: int, caseops: bool = False) -> None:
    """Documents always; train tokens unless `tokens` is None (a CaseOps tokenizer from elsewhere)."""
    expected = (EXPECTED_TOKENS_CASEOPS if caseops else EXPECTED_TOKENS)[vocab]
    if documents != EXPECTED_DOCS:
        raise RuntimeError(f"benchmark train set has {documents:,} documents, expected {EXPECTED_DOCS:,}")
    if tokens is None:
        return
    if abs(tokens - expected) > TOLERANCE * expected:
        raise RuntimeError(f"benchmark train set has {tokens:,} tokens, expected {expected / 1e6:.1f}M "
                           f"within {TOLERANCE:.0%}")


def build_benchmark(vocab: int, sources: str | Path | None = None, out: str | Path = ".",
                    workers: int | None = None, overwrite: bool = False, caseops: bool = False,
                    tokenizer: str | Path | None = None, log=print) -> dict:
    """Builds `<out>/datasets/bench_sp<vocab>[_caseops]/` (always from scratch) and copies the
    tokenizer to `<out>/tokenizers/`; `overwrite` allows replacing a different tokenizer file there.
    `tokenizer`: the CaseOps tokenizer to use (CaseOps only; see the module docstring)."""
    if vocab not in EXPECTED_TOKENS:
        raise ValueError(f"--vocab must be one of {sorted(EXPECTED_TOKENS)}, got {vocab}")
    if tokenizer and not caseops:
        raise ValueError("--tokenizer is for --caseops (the other sets use the shared tokenizers)")
    start = time.time()
    src = Path(sources) if sources else default_sources()
    files = source_files(src, vocab, caseops)
    reencode_val = caseops or vocab != 1024
    name = f"bench_sp{vocab}" + ("_caseops" if caseops else "")
    given_tokenizer = tokenizer is not None
    if caseops:
        existing = Path(out) / "tokenizers" / tokenizer_filename(vocab, caseops=True)
        tokenizer = tokenizer or (existing if existing.is_file() else None)
        how = dict(tokenizer=str(tokenizer)) if tokenizer else dict(vocab_size=vocab, tokenizer_seed=SEED)
        pieces = load_tokenizer(tokenizer).get_piece_size() if tokenizer else vocab
        if pieces != vocab:
            raise ValueError(f"CaseOps tokenizer {tokenizer} has {pieces} pieces, not --vocab {vocab}")
    else:
        how = dict(tokenizer=str(files["tokenizer"]))
    # Always rebuilt from scratch; a different tokenizer file in <out>/tokenizers/ needs `overwrite`.
    prepare_dataset_dir(Path(out) / "datasets" / name, overwrite=True)
    result = build(
        [files["train_shard"], files["fineweb_docs"], files["debmix"]], out,
        bin_tokenizer=str(files["sp1024"]),
        val_file=str(files["val_shard"]) if reencode_val else None, byte_sidecar=reencode_val,
        seed=SEED, workers=workers, dataset_name=name,
        overwrite=overwrite, caseops=caseops, log=log, **how,
    )
    if not reencode_val:
        dest = result.dataset_dir / "fineweb_val_000000.bin"
        shutil.copyfile(files["val_shard"], dest)
        val = load_shard(dest)
        result.val.paths, result.val.tokens = [dest], int(val.size)
        result.val.documents = int((val == BOS_ID).sum())
    try:
        check_counts(result.train.documents, None if given_tokenizer else result.train.tokens, vocab, caseops)
    except RuntimeError:
        prepare_dataset_dir(result.dataset_dir, overwrite=True)  # never leave a wrong set to be used
        raise
    summary = {
        "vocab": vocab, "caseops": caseops, "tokenizer": str(result.tokenizer_path), "sources": str(src),
        "dataset_dir": str(result.dataset_dir),
        "train_documents": result.train.documents, "train_tokens": result.train.tokens,
        "train_shards": len(result.train.paths), "val_documents": result.val.documents,
        "val_tokens": result.val.tokens, "val_sidecars": len(result.val.sidecars),
        "seconds": round(time.time() - start, 1),
    }
    log(f"benchmark set sp{vocab}{' caseops' if caseops else ''}: {summary['train_documents']:,} train "
        f"documents, {summary['train_tokens']:,} train tokens; {summary['val_documents']:,} val documents, "
        f"{summary['val_tokens']:,} val tokens; {summary['seconds']} s -> {result.dataset_dir}")
    return summary
