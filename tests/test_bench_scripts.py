"""The device benchmark scripts, run small on CPU: device time is scarce, so a script must not break
there first. Shell scripts are checked for syntax; bench/ttt_probe.py runs its CPU self-test."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.trainer_runs import ROOT, TINY, clean_env


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.sh")))
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], check=True)


def test_ttt_probe_graphs_ab_and_profile():
    """--graphs 0,2: the same documents scored without and with step graphs give the same bpb, and the
    long document's chain is captured and replayed; --profile prints a phase's ms/step and its table;
    --cold-docs prints the cold first documents' largest functions."""
    env = {k: v for k, v in clean_env(TTT_EVAL_SEQ_LEN="256").items() if k not in TINY}  # the probe's own smoke model
    out = subprocess.run([sys.executable, "bench/ttt_probe.py", "--smoke", "--graphs", "0,2", "--profile", "1000x1",
                          "--cold-docs", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    done = re.findall(r"^ttt_probe done .* cuda_graphs:(\d+) .* bpb:([0-9.]+)(.*)$", out.stdout, re.M)
    assert [g for g, _, _ in done] == ["0", "2"] and done[0][1] == done[1][1], done
    captures, replays = map(int, re.search(r"captures:(\d+) replays:(\d+)", done[1][2]).groups())
    assert captures >= 1 and replays >= 5
    assert re.search(r"^cold_profile docs:2 tokens:\d+ wall:[0-9.]+s", out.stdout, re.M)
    assert re.search(r"^cold_profile cumulative .*score_docs", out.stdout, re.M)
    for g in (0, 2):
        assert re.search(rf"^profile_phase docs:1x1000 cuda_graphs:{g} last_layer_queries:1 kernels:1 steps:21 .* ms_per_step:[0-9.]+",
                         out.stdout, re.M)
        assert re.search(rf"^profile ttt_1x1000_g{g}_q1_k1: wall [0-9.]+ ms/step", out.stdout, re.M)


def test_ttt_schedule_counts_steps_and_replays():
    """Host-only schedule of the sample val stream: one line per graph capacity, with the default
    phases' boundaries, and replays where a document's chain outlasts the others."""
    out = subprocess.run([sys.executable, "bench/ttt_schedule.py", "--val",
                          str(ROOT / "data/sample/datasets/fineweb10B_sp1024/fineweb_val_*.bin"), "--graphs", "4"],
                         cwd=ROOT, env=clean_env(TTT_BATCH_DOCS="8"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"^ttt_schedule phase_ends:\[.*\] graphs:4 steps:(\d+) passes:\d+ shapes:\d+ rows_per_pass:[0-9.]+ "
                  r"two_row_passes:\d+ captures:(\d+) replays:(\d+) passes_replayed:[0-9.]+$", out.stdout, re.M)
    assert m, out.stdout
    steps, captures, replays = map(int, m.groups())
    assert steps > 0 and replays > 0 and captures >= 1


@pytest.mark.parametrize("layout,extra", [("rows", []), ("packed", ["--graphs", "4", "--world", "2"])])
def test_global_pass_probe_times_each_round_and_profiles(layout, extra):
    """bench/global_pass_probe.py on the sample val stream, tiny model: a line per round and boundary,
    then the profile of one pass; packed, with graphs, as one rank of two (steps of 4 pieces, so their
    shapes repeat and replay)."""
    out = subprocess.run([sys.executable, "bench/global_pass_probe.py", "--val",
                          str(ROOT / "data/sample/datasets/fineweb10B_sp1024/fineweb_val_*.bin"), "--ends", "2,3", *extra],
                         cwd=ROOT, env=clean_env(TTT_EVAL_SEQ_LEN="64", TTT_LAYOUT=layout, TTT_PACK_BUCKET="128",
                                                 GLOBAL_TTT_BATCH_SEQS="4"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(rf"^global_pass layout:{layout} world:{2 if extra else 1} ", out.stdout, re.M), out.stdout
    rounds = re.findall(r"^global_pass round:(\w+) docs:(\d+) pieces:\d+ tokens:\d+ seconds:[0-9.]+$", out.stdout, re.M)
    assert rounds == [(r, n) for r in ("cold", "warm", "replay") for n in ("2", "3")], out.stdout
    if extra:
        replays = re.search(r"^global_pass cuda_graphs graphs:\d+ captures:(\d+) replays:(\d+)", out.stdout, re.M)
        assert replays and int(replays.group(2)) > 0, out.stdout
    assert re.search(r"^profile global_pass_3: wall [0-9.]+ ms/step", out.stdout, re.M)


def test_val_share_repeats_whole_documents_with_their_bytes(tmp_path):
    """bench/val_share.py: every document of the source appears once per pass (before the cut), each
    starts at BOS with its own tokens, and the byte sidecar follows the same documents."""
    from data.shards import BOS_ID, load_shard, write_shard
    sys.path.insert(0, str(ROOT / "bench"))
    from val_share import build_share

    src = tmp_path / "src"
    src.mkdir()
    docs = [np.array([BOS_ID] + [10 + d] * (d + 2)) for d in range(5)]
    write_shard(src / "fineweb_val_000000.bin", np.concatenate(docs))
    write_shard(src / "fineweb_val_bytes_000000.bin", np.concatenate([np.r_[0, [d + 1] * (d + 2)] for d in range(5)]))
    write_shard(src / "fineweb_train_000000.bin", np.arange(2, 40))
    r = build_share(src, tmp_path / "share", docs=12, seed=3)
    assert r == {"docs": 12, "source_docs": 5, "tokens": r["tokens"], "sidecar": True}
    tokens, counts = load_shard(tmp_path / "share/fineweb_val_000000.bin"), load_shard(tmp_path / "share/fineweb_val_bytes_000000.bin")
    pieces = np.split(tokens, np.flatnonzero(tokens == BOS_ID)[1:])
    ids = [int(p[1]) - 10 for p in pieces]
    assert len(pieces) == 12 and r["tokens"] == len(tokens) == len(counts)
    assert sorted(ids[:5]) == sorted(ids[5:10]) == list(range(5))
    assert all(np.array_equal(p, docs[d]) for p, d in zip(pieces, ids))
    assert np.array_equal(counts, np.concatenate([np.r_[0, [d + 1] * (d + 2)] for d in ids]))
    assert (tmp_path / "share/fineweb_train_000000.bin").resolve() == (src / "fineweb_train_000000.bin").resolve()
    write_shard(src / "fineweb_val_000000.bin", np.r_[5, np.concatenate(docs)])
    with pytest.raises(ValueError, match="must start with BOS"):
        build_share(src, tmp_path / "bad", docs=3)


def test_step_ab_reads_each_variants_phases_and_stops_its_run(tmp_path):
    """bench/step_ab.sh on a stand-in trainer: per-variant settings reach the run, a variant may train
    another checkout (a folder), the ms/step per phase come from the looping and stopping lines, and
    the run is stopped at the training's end instead of sleeping through its evaluation."""
    bench = tmp_path / "bench" / "datasets" / "bench_sp8192"
    bench.mkdir(parents=True)
    (bench / "fineweb_train_000000.bin").touch()
    other = tmp_path / "other"
    other.mkdir()
    (other / "bench").symlink_to(ROOT / "bench")
    fake = tmp_path / "fake_python"
    fake.write_text("#!/bin/bash\necho compile_warmup_steps:20 compile_time:91.4s\n"
                    "echo looping_enabled step:240 train_time:23100ms virtual_layers:17\n"
                    "echo settings FOO=$FOO in $PWD\n"
                    "echo stopping_early: wallclock_cap train_time:55000ms step:462/20000\nsleep 120\n")
    fake.chmod(0o755)
    env = {**clean_env(), "PY": str(fake), "BENCH": str(tmp_path / "bench"), "OUT": str(tmp_path / "out"),
           "VARIANTS": f"a;b@{other}:FOO=1"}
    out = subprocess.run(["bash", "bench/step_ab.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all("unlooped   96.25 ms/step (240 steps)  looped  143.69 ms/step (222 steps)  compile 91.4s"
                                   in line for line in lines), lines
    assert lines[1].endswith("FOO=1")
    assert f"settings FOO=1 in {other}" in (tmp_path / "out" / "ab_b.console").read_text()
    assert "FOO= in" in (tmp_path / "out" / "ab_a.console").read_text()
