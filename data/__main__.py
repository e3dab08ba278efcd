"""Command line: `python -m data {download,build,tokenizer,decode,benchmark-set,sample} ...`.

Imports happen inside the commands so that `download` on an offline machine fails fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _count(text: str) -> int:
    """Token counts like 1e8 or 100000000."""
    value = float(text)
    if value != int(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text}")
    return int(value)


def cmd_download(a) -> None:
    from .download import download
    download(a.variant, a.out, a.train_shards, revision=a.revision, probe_timeout=a.probe_timeout)


def cmd_build(a) -> None:
    from .build import build
    build(a.inputs, a.out, vocab_size=a.vocab_size, tokenizer=a.tokenizer, val_docs=a.val_docs,
          val_file=a.val, seed=None if a.no_shuffle else a.seed, shard_tokens=a.shard_tokens,
          byte_sidecar=a.byte_sidecar, bin_tokenizer=a.bin_tokenizer, workers=a.workers,
          max_sentences=a.tokenizer_sentences, dataset_name=a.name, overwrite=a.overwrite,
          caseops=a.caseops, **({"reference": a.reference_tokenizer} if a.reference_tokenizer else {}))


def cmd_tokenizer(a) -> None:
    from .build import train_tokenizer_file
    train_tokenizer_file(a.inputs, a.out, vocab_size=a.vocab_size, caseops=a.caseops,
                         bin_tokenizer=a.bin_tokenizer, max_sentences=a.tokenizer_sentences, seed=a.seed,
                         overwrite=a.overwrite)


def cmd_byte_tokenizer(a) -> None:
    from .bytelevel import VOCAB_SIZE, write_byte_level_tokenizer
    print(f"wrote {write_byte_level_tokenizer(a.out, a.overwrite)} (vocab {VOCAB_SIZE}: 4 specials + 256 bytes)")


def cmd_decode(a) -> None:
    from . import tokenizer as tok
    from .docs import decode_shards, write_jsonl
    n = write_jsonl(a.out, decode_shards(a.shards, tok.load(a.tokenizer)))
    print(f"wrote {n:,} documents to {a.out}")


def cmd_benchmark(a) -> None:
    from .benchmark import build_benchmark
    build_benchmark(a.vocab, a.sources, a.out, workers=a.workers, overwrite=a.overwrite, caseops=a.caseops,
                    tokenizer=a.tokenizer)


def cmd_sample(a) -> None:
    from .benchmark import default_sources
    from .sample import SAMPLE_DIR, make_sample
    make_sample(Path(a.sources) if a.sources else default_sources(), Path(a.out) if a.out else SAMPLE_DIR,
                a.train_tokens, a.val_tokens)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Challenge data: download the official shards, build shards from documents (plain or "
                    "CaseOps), train tokenizers, decode shards, build the GPU benchmark set, recreate the "
                    "embedded sample.",
        epilog="examples:\n"
               "  python -m data download sp1024 --train-shards 10\n"
               "  python -m data build docs.jsonl.xz --vocab-size 4096 --val-docs 50000 --out .\n"
               "  python -m data build docs.jsonl.xz --caseops --vocab-size 8192 --val-docs 50000 --out .\n"
               "  python -m data tokenizer docs.jsonl.xz --caseops --vocab-size 8192 --out .\n"
               "  python -m data decode datasets/fineweb10B_sp1024/fineweb_val_000000.bin "
               "--tokenizer tokenizers/fineweb_1024_bpe.model --out val.jsonl\n"
               "  python -m data benchmark-set --vocab 8192 --sources .carry/shared_data\n"
               "  python -m data benchmark-set --vocab 8192 --caseops\n"
               "  python -m data sample")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("download", help="fetch the challenge shards + tokenizer from the Hugging Face hub")
    d.add_argument("variant", nargs="?", default="sp1024",
                   choices=["sp1024", "sp4096", "sp8192", "caseops-sp8192"])
    d.add_argument("--train-shards", type=int, default=None, help="fetch only the first N train shards (val: all)")
    d.add_argument("--out", default=".", help="folder that gets datasets/ and tokenizers/ (default: .)")
    d.add_argument("--revision", default="main", help="hub branch, tag or commit")
    d.add_argument("--probe-timeout", type=float, default=1.2, help="seconds to wait for the hub to answer")
    d.set_defaults(func=cmd_download)

    b = sub.add_parser("build", help="build shards (and a tokenizer) from documents")
    b.add_argument("inputs", nargs="+", help=".jsonl / .jsonl.xz files of {\"text\": ...} lines, or .bin shards")
    t = b.add_mutually_exclusive_group(required=True)
    t.add_argument("--vocab-size", type=int, help="train a SentencePiece BPE tokenizer of this size")
    t.add_argument("--tokenizer", help="reuse this SentencePiece .model")
    b.add_argument("--out", default=".", help="folder that gets datasets/ and tokenizers/ (default: .)")
    b.add_argument("--val-docs", type=int, default=0, help="the first N input documents form the val split")
    b.add_argument("--val", help="val documents from this file instead (.jsonl(.xz) or .bin)")
    b.add_argument("--seed", type=int, default=1337, help="train shuffle seed (default 1337)")
    b.add_argument("--no-shuffle", action="store_true", help="keep the train documents in input order")
    b.add_argument("--shard-tokens", type=_count, default=10**8, help="tokens per shard (default 1e8)")
    b.add_argument("--byte-sidecar", action="store_true", help="also write fineweb_val_bytes_%%06d.bin")
    b.add_argument("--bin-tokenizer", help="tokenizer that decodes .bin inputs (default: --tokenizer)")
    b.add_argument("--workers", type=int, help="encoding processes (default: all cores)")
    b.add_argument("--tokenizer-sentences", type=_count, default=1_000_000,
                   help="lines sampled to train the tokenizer (default 1e6)")
    b.add_argument("--reference-tokenizer", help="model whose trainer settings are copied (default: official SP1024)")
    b.add_argument("--name", help="dataset folder name (default fineweb10B_sp<V>)")
    b.add_argument("--overwrite", action="store_true", help="replace existing shards / tokenizer")
    b.add_argument("--caseops", action="store_true",
                   help="encode the CaseOps form of the text (data/caseops.py) with a CaseOps tokenizer; names "
                        "get _caseops (fineweb10B_sp<V>_caseops, fineweb_<V>_caseops.model); val always gets "
                        "its byte sidecar")
    b.set_defaults(func=cmd_build)

    k = sub.add_parser("tokenizer", help="train a tokenizer (official settings) on documents")
    k.add_argument("inputs", nargs="+", help=".jsonl / .jsonl.xz files of {\"text\": ...} lines, or .bin shards")
    k.add_argument("--vocab-size", type=int, required=True)
    k.add_argument("--caseops", action="store_true",
                   help="train on the CaseOps form with its control symbols reserved -> fineweb_<V>_caseops.model")
    k.add_argument("--out", default=".", help="folder that gets tokenizers/ (default: .)")
    k.add_argument("--bin-tokenizer", help="tokenizer that decodes .bin inputs")
    k.add_argument("--tokenizer-sentences", type=_count, default=1_000_000,
                   help="lines sampled to train the tokenizer (default 1e6)")
    k.add_argument("--seed", type=int, help="fix the trainer's line sampling")
    k.add_argument("--overwrite", action="store_true", help="replace a different tokenizer file")
    k.set_defaults(func=cmd_tokenizer)

    y = sub.add_parser("byte-tokenizer", help="write the byte-level tokenizer (every UTF-8 byte a token, vocab 260)")
    y.add_argument("--out", default=".", help="folder that gets tokenizers/ (default: .)")
    y.add_argument("--overwrite", action="store_true", help="replace a different file of that name")
    y.set_defaults(func=cmd_byte_tokenizer)

    c = sub.add_parser("decode", help="shards + tokenizer -> .jsonl of {\"text\": ...} documents "
                                      "(original text for CaseOps shards)")
    c.add_argument("shards", nargs="+", help="shard files, in stream order")
    c.add_argument("--tokenizer", required=True, help="the SentencePiece .model that wrote them")
    c.add_argument("--out", required=True, help="output .jsonl (or .jsonl.xz / .jsonl.gz)")
    c.set_defaults(func=cmd_decode)

    m = sub.add_parser("benchmark-set", help="build the GPU benchmark set (shared/data/README.md)")
    m.add_argument("--vocab", type=int, required=True, choices=[1024, 8192])
    m.add_argument("--sources", help="copy of shared/data (default: ../shared/data, else .carry/shared_data)")
    m.add_argument("--out", default=".", help="gets datasets/bench_sp<V>/ and tokenizers/ (default: .)")
    m.add_argument("--workers", type=int, help="encoding processes (default: all cores)")
    m.add_argument("--overwrite", action="store_true", help="replace a different tokenizer file in <out>/tokenizers/")
    m.add_argument("--caseops", action="store_true",
                   help="CaseOps variant -> datasets/bench_sp<V>_caseops/ (val with byte sidecar)")
    m.add_argument("--tokenizer", help="CaseOps tokenizer to use (default: <out>/tokenizers/fineweb_<V>_caseops.model "
                                       "if present, else one is trained on the benchmark train documents)")
    m.set_defaults(func=cmd_benchmark)

    s = sub.add_parser("sample", help="recreate the embedded sample in data/sample/")
    s.add_argument("--sources", help="copy of shared/data (default: ../shared/data)")
    s.add_argument("--out", help="sample folder (default: data/sample)")
    s.add_argument("--train-tokens", type=_count, default=600_000)
    s.add_argument("--val-tokens", type=_count, default=100_000)
    s.set_defaults(func=cmd_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .shards import ShardError
    try:
        args.func(args)
    except (ShardError, FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        # Expected failures (bad input, offline hub, wrong counts): one line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
