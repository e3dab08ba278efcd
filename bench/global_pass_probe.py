"""Phased TTT's global SGD pass alone (golf.ttt.GlobalPass), timed and profiled: no checkpoint, no
LoRA scoring, no compile. The model is train_gpt.py's at the knobs in the environment, randomly
initialised (the pass's speed does not depend on the weights), frozen as evaluate_ttt freezes it; the
documents are the first ones of a val stream, as the phase boundaries take them.

  python bench/global_pass_probe.py --val .carry/shared_data/fineweb/sp1024/fineweb_val_000000.bin \
      [--graphs 64] [--world 8]

TTT_LAYOUT (rows or packed) and GLOBAL_TTT_MICRO_BATCH_TOKENS come from the environment. --graphs
replays repeated micro-batch shapes as CUDA graphs, as evaluate_ttt does with TTT_CUDA_GRAPHS.
--world N runs rank 0's share of every step of an N-rank pass (its pieces of each global batch,
nothing all-reduced): one GPU's work in an N-GPU evaluation.

For each round (cold: the process's first passes; warm: the same again, where graphs are captured;
replay: once more) one line per boundary:
`global_pass round:R docs:N pieces:P tokens:T seconds:S`, then a profile of one warm pass over the
last boundary's documents (kernel time against wall time, kernel launches, the largest kernels and
host operators; golf/profile.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402
from data.shards import load_stream  # noqa: E402
from golf import ttt  # noqa: E402
from golf.config import parse_knobs  # noqa: E402
from golf.profile import profile_lines, profile_steps  # noqa: E402
from golf.step_graphs import StepGraphs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", required=True, help="val stream (a shard glob)")
    ap.add_argument("--ends", default="27,54,81", help="cumulative document counts, one global pass each")
    ap.add_argument("--graphs", type=int, default=0, help="CUDA graphs kept (0: none)")
    ap.add_argument("--world", type=int, default=1, help="time rank 0's share of a pass over this many ranks")
    a = ap.parse_args()
    if a.world > 1:  # rank 0 of a.world, alone: its share of each batch, all-reduces of one process (no-ops)
        ttt.rank_and_world = lambda: (0, a.world)
    cfg = parse_knobs(tg.KNOBS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    torch.manual_seed(cfg.seed)
    model = tg.GPT(cfg).to(device)
    tokens = load_stream(a.val).astype(np.int64)
    docs = ttt.split_documents(tokens)
    s = tg.ttt_settings(cfg, len(docs), device)
    ends = [int(e) for e in a.ends.split(",")]
    graphs = StepGraphs(device, a.graphs) if a.graphs > 0 else None

    with ttt._frozen(model):
        run = ttt.GlobalPass(model, s, device, autocast, graphs)

        def one(n: int) -> None:
            run(tokens, docs[:n])
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        print(f"global_pass layout:{'packed' if ttt.packs(s, model, device) else 'rows'} world:{a.world} "
              f"graphs:{a.graphs} micro_tokens:{s.global_micro_tokens}", flush=True)
        for name in ("cold", "warm", "replay"):
            for n in ends:
                t = time.perf_counter()
                one(n)
                lengths = docs[:n, 1] - docs[:n, 0]
                pieces = int((-(-lengths // s.seq_len)).sum())
                print(f"global_pass round:{name} docs:{n} pieces:{pieces} tokens:{int(lengths.sum())} "
                      f"seconds:{time.perf_counter() - t:.3f}", flush=True)
        if graphs is not None:
            print(f"global_pass cuda_graphs {graphs.stats()}", flush=True)
        for line in profile_lines(profile_steps(lambda: one(ends[-1]), 1, device), f"global_pass_{ends[-1]}", top=20):
            print(line, flush=True)


if __name__ == "__main__":
    main()
