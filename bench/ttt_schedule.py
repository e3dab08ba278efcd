"""TTT's schedule on a val stream, on the host alone (no model, no GPU): how many continuous-batching
steps golf.ttt.score_docs takes, how many passes (forward + backward) they run and of which shapes,
and how much of that work a TTT_CUDA_GRAPHS cache of N graphs would replay (a pass shape, or the
adapters' AdamW step, is captured at its second sighting; later ones replay). The device work is
replaced by a stand-in that returns zero nats; the slot bookkeeping, pass planning and graph keys are
the real ones. TTT_* and PHASED_TTT_* come from the environment (TTT_LAYOUT=auto counts as on a GPU:
packed).

  python bench/ttt_schedule.py --val '/tmp/bench/datasets/bench_sp8192/fineweb_val_[0-9]*.bin'
  # the SP8192 benchmark val set from the SP1024 shard, without building it (same document lengths):
  python bench/ttt_schedule.py --val ../shared/data/fineweb/sp1024/fineweb_val_000000.bin \\
      --retokenize ../shared/data/fineweb/tokenizers/fineweb_1024_bpe.model ../shared/data/fineweb/tokenizers/fineweb_8192_bpe.model

One line per graph capacity: `ttt_schedule phase_ends:[...] graphs:N steps:S passes:P shapes:K
rows_per_pass:R two_row_passes:T captures:C replays:Q passes_replayed:F` (Q counts AdamW steps too;
F is the fraction of passes replayed).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402
from data.shards import load_stream  # noqa: E402
from golf import ttt  # noqa: E402
from golf.bpb import BpbMeter  # noqa: E402
from golf.config import parse_knobs  # noqa: E402
from golf.step_graphs import StepGraphs  # noqa: E402

CPU = torch.device("cpu")


def retokenized_lengths(tokens: np.ndarray, src_model: str, dst_model: str) -> list[int]:
    """Each document's length in the other tokenizer (BOS included): decode, then encode again."""
    import sentencepiece as spm
    src, dst = spm.SentencePieceProcessor(model_file=src_model), spm.SentencePieceProcessor(model_file=dst_model)
    return [1 + len(dst.encode(src.decode(tokens[a + 1 : e].tolist()))) for a, e in ttt.split_documents(tokens).tolist()]


class _Counting(StepGraphs):
    """Counts replays of passes apart from those of the adapters' step."""

    def __call__(self, key, fn, inputs):
        if key in self.graphs and key[0] == "pass":
            self.pass_replays += 1
        return super().__call__(key, fn, inputs)


class _Model:
    regions = object()  # as with TTT_COMPILE: lone rows run with a masked copy
    packable = True


class _Adapters:
    def reset(self, slots) -> None:
        pass

    def slot_rows(self, slots) -> torch.Tensor:
        return torch.zeros(max(2, 1 << (len(slots) - 1).bit_length()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", required=True, help="val stream (a shard glob)")
    ap.add_argument("--retokenize", nargs=2, metavar=("FROM_MODEL", "TO_MODEL"),
                    help="document lengths in another tokenizer (random tokens of those lengths are scheduled)")
    ap.add_argument("--graphs", default="16,64", help="graph capacities to count replays for")
    a = ap.parse_args()
    cfg = parse_knobs(tg.KNOBS)
    tokens = load_stream(a.val).astype(np.int64)
    if a.retokenize:
        rng = np.random.default_rng(0)
        parts = [np.concatenate(([ttt.BOS_ID], rng.integers(2, 1 << 15, n - 1))) for n in retokenized_lengths(tokens, *a.retokenize)]
        tokens = np.concatenate(parts + [[ttt.BOS_ID]]).astype(np.int64)
    docs = ttt.split_documents(tokens)
    lengths = docs[:, 1] - docs[:, 0]
    print(f"ttt_schedule docs:{len(docs)} tokens:{len(tokens)} longest:{lengths.max()}", flush=True)

    def stand_in(model, adapters, autocast, backward, seq_len, slots, x, y, *rest):  # a pass's outputs, no work
        shapes.append(tuple(x.shape))
        return [torch.zeros(y.shape)]
    ttt._pass, ttt._adapter_step = stand_in, lambda adapters, rows: adamw.append(1) or []
    s = tg.ttt_settings(cfg, len(docs), CPU)
    if s.layout == "auto":  # the GPU's choice
        s = dataclasses.replace(s, layout="packed")
    for capacity in [int(c) for c in a.graphs.split(",")]:
        graphs, shapes, adamw, steps = _Counting(CPU, capacity), [], [], [0]
        graphs.pass_replays = 0
        for order in ttt.plan(docs, s):
            ttt.score_docs(_Model(), _Adapters(), tokens, docs[order], np.ones(len(tokens), np.int64), s,
                           BpbMeter(CPU), CPU, None, on_step=lambda n, *_: steps.__setitem__(0, steps[0] + 1),
                           graphs=graphs)
        rows = [r for r, _ in shapes]
        print(f"ttt_schedule phase_ends:{list(s.phase_ends)} graphs:{capacity} steps:{steps[0]} passes:{len(shapes)} "
              f"shapes:{len(set(shapes))} rows_per_pass:{np.mean(rows):.1f} two_row_passes:{rows.count(2)} "
              f"captures:{graphs.captures} replays:{graphs.replays} "
              f"passes_replayed:{graphs.pass_replays / max(len(shapes), 1):.3f}", flush=True)


if __name__ == "__main__":
    main()
