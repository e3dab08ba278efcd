"""One GPU's share of the public evaluation, built from the local val shard, for timing TTT at the
public scale on one GPU (`bench/quant_eval_h100.sh share`).

The public run scores 50,000 val documents on 8 GPUs, about 6,250 a GPU. The local val shard has
1,621 documents. This writes a dataset whose val stream holds --docs of them: passes over the shard,
each a seeded permutation, cut at --docs documents. The byte sidecar, when the source has one, is cut
the same way. The train shards are linked, not copied. The document lengths, and so the work, follow
the local shard. The scores count each repeated document again, so they are not a val_bpb to report.

  python bench/val_share.py --data /tmp/bench/datasets/bench_sp8192 --out /tmp/bench/datasets/bench_sp8192_share
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.shards import BOS_ID, load_stream, shard_paths, split_documents, write_shard  # noqa: E402

PUBLIC_SHARE_DOCS = 50_000 // 8


def share_order(n_docs: int, docs: int, seed: int) -> np.ndarray:
    """Indices of `docs` documents out of n_docs: whole seeded permutations, the last one cut."""
    rng = np.random.default_rng(seed)
    passes = [rng.permutation(n_docs) for _ in range(math.ceil(docs / n_docs))]
    return np.concatenate(passes)[:docs]


def build_share(data: Path, out: Path, docs: int = PUBLIC_SHARE_DOCS, seed: int = 0) -> dict:
    """Writes out/fineweb_val_000000.bin (and out/fineweb_val_bytes_000000.bin when data has a byte
    sidecar) and links data's train shards into out. Returns counts for the log line."""
    if docs < 1:
        raise ValueError(f"--docs must be at least 1, got {docs}")
    val_pattern, bytes_pattern = str(data / "fineweb_val_[0-9]*.bin"), str(data / "fineweb_val_bytes_*.bin")
    tokens = load_stream(val_pattern)
    if len(tokens) == 0 or tokens[0] != BOS_ID:
        raise ValueError(f"{val_pattern}: a val stream must start with BOS ({BOS_ID}), one per document")
    token_docs = split_documents(tokens)
    order = share_order(len(token_docs), docs, seed)
    out.mkdir(parents=True, exist_ok=True)
    share = np.concatenate([token_docs[i] for i in order])
    write_shard(out / "fineweb_val_000000.bin", share)
    has_sidecar = bool(list(data.glob("fineweb_val_bytes_*.bin")))
    if has_sidecar:
        sidecar = load_stream(bytes_pattern)
        if len(sidecar) != len(tokens):
            raise ValueError(f"{bytes_pattern}: {len(sidecar)} byte counts for {len(tokens)} val tokens")
        sidecar_docs = np.split(sidecar, np.cumsum([len(d) for d in token_docs])[:-1])
        write_shard(out / "fineweb_val_bytes_000000.bin", np.concatenate([sidecar_docs[i] for i in order]))
    for train in shard_paths(str(data / "fineweb_train_*.bin")):
        link = out / Path(train).name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(Path(train).resolve(), link)
    return {"docs": docs, "source_docs": len(token_docs), "tokens": len(share), "sidecar": has_sidecar}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="dataset folder with fineweb_val_*.bin and train shards")
    p.add_argument("--out", type=Path, required=True, help="folder for the share's dataset")
    p.add_argument("--docs", type=int, default=PUBLIC_SHARE_DOCS, help="documents in the share (default: 50,000 / 8)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    r = build_share(a.data, a.out, a.docs, a.seed)
    print(f"val_share docs:{r['docs']} from:{r['source_docs']} tokens:{r['tokens']} sidecar:{int(r['sidecar'])} "
          f"out:{a.out}")


if __name__ == "__main__":
    main()
