"""Studies (golf/study.py) and their reports (golf/report.py): parsing, the runner on a stand-in
trainer that takes milliseconds, reports from made-up rows, and the CPU demo study for real."""
import dataclasses
import json
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from data.shards import load_shard, write_shard
from golf import study as st
from golf.report import write_report
from tests.trainer_runs import SAMPLE

ROOT = Path(__file__).resolve().parents[1]

# A stand-in trainer: the knob table the study checks names against, and a run that writes a summary
# shaped like train_gpt.py's (or crashes when told to).
FAKE_TRAINER = '''
import json, os, sys
sys.path.insert(0, os.getcwd())  # runs start in the repository root
from golf.config import Knob, parse_knobs
KNOBS = (Knob("SEED", int, 1, ""), Knob("RUN_ID", str, "", ""), Knob("LOG_DIR", str, "logs", ""),
         Knob("MATRIX_LR", float, 0.02, ""), Knob("NUM_LAYERS", int, 2, ""), Knob("CRASH", bool, False, ""),
         Knob("EMBED_BITS", int, 7, ""), Knob("TOKENIZER_PATH", str, "tok.model", ""),
         Knob("DATA_PATH", str, "data", ""), Knob("MAX_WALLCLOCK_SECONDS", float, 600.0, ""),
         Knob("TTT_ENABLED", bool, False, ""), Knob("EVAL_STRIDE", int, 0, ""), Knob("EVAL_SEQ_LEN", int, 0, ""),
         Knob("TRAIN_SEQ_LEN", int, 64, ""))
if __name__ == "__main__":
    cfg = parse_knobs(KNOBS)
    if cfg.crash:
        sys.exit("boom: told to crash")
    bpb = 1.5 - cfg.matrix_lr + 0.001 * cfg.seed % 7
    summary = {"config": cfg.as_dict(), "device": "cpu", "world_size": 1, "steps": 10, "step_avg_ms": 5.0,
               "git": {"commit": "abc", "dirty": False}, "peak_memory": {"cpu_max_rss_mib": 100},
               "val_history": [{"step": 10, "train_time_ms": 50.0, "val_loss": bpb * 2, "val_bpb": bpb}],
               "stages": {"prequant": {"val_loss": bpb * 2, "val_bpb": bpb}},
               "bytes": {"total": 1000, "over_cap": False}, "env_seen": os.environ.get("NUM_LAYERS")}
    with open(os.path.join(cfg.log_dir, cfg.run_id + ".json"), "w") as f:
        json.dump(summary, f)
'''


def write_study(tmp: Path, body: str, trainer: Path | None = None) -> Path:
    head = f'trainer = "{trainer}"\n' if trainer else ""
    path = tmp / "s.toml"
    path.write_text(head + textwrap.dedent(body))
    return path


@pytest.fixture
def fake(tmp_path) -> Path:
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return path


# ----------------------------------------------------------------------------- parsing
def test_variants_stack_and_sweeps_expand(tmp_path, fake):
    s = st.load_study(write_study(tmp_path, """
        name = "t"
        seeds = [1, 2]
        budget = 30
        [baseline]
        NUM_LAYERS = 3
        [variants.a]
        MATRIX_LR = 0.04
        expected = -0.01
        [variants.b]
        NUM_LAYERS = 4
        [variants.ab]
        stack = ["a", "b"]
        NUM_LAYERS = 5
        [variants.q]
        post = true
        EMBED_BITS = 5
        [grid.g]
        MATRIX_LR = [0.01, 0.03]
        NUM_LAYERS = [2, 4]
        [random.r]
        samples = 4
        seed = 3
        MATRIX_LR = {log_uniform = [0.001, 0.1]}
        NUM_LAYERS = {uniform = [1, 6]}
        """, fake))
    by_name = {v.name: v for v in s.variants}
    assert s.seeds == (1, 2) and s.baseline == {"NUM_LAYERS": "3", "MAX_WALLCLOCK_SECONDS": "30"}
    assert by_name["a"].env == {"MATRIX_LR": "0.04"} and by_name["a"].expected == -0.01
    assert by_name["ab"].env == {"MATRIX_LR": "0.04", "NUM_LAYERS": "5"}  # its own value wins over the stack's
    assert by_name["q"].post and by_name["q"].env == {"EMBED_BITS": "5"}
    grid = [v for v in s.variants if v.sweep == "g"]
    assert [v.name for v in grid] == ["g[MATRIX_LR=0.01,NUM_LAYERS=2]", "g[MATRIX_LR=0.01,NUM_LAYERS=4]",
                                      "g[MATRIX_LR=0.03,NUM_LAYERS=2]", "g[MATRIX_LR=0.03,NUM_LAYERS=4]"]
    assert grid[1].knobs == {"MATRIX_LR": 0.01, "NUM_LAYERS": 4}
    drawn = [v for v in s.variants if v.sweep == "r"]
    assert 1 <= len(drawn) <= 4
    assert all(0.001 <= v.knobs["MATRIX_LR"] <= 0.1 and v.knobs["NUM_LAYERS"] in range(1, 7) for v in drawn)
    again = st.load_study(tmp_path / "s.toml")
    assert [v.name for v in again.variants] == [v.name for v in s.variants]  # draws are seeded


@pytest.mark.parametrize("body,message", [
    ("[variants.a]\nMATRX_LR = 0.1", "fake_trainer.py; did you mean MATRIX_LR?"),
    ("[baseline]\nmatrix_lr = 0.1", "did you mean MATRIX_LR?"),
    ("[variants.a]\nexpcted = 0.1", "did you mean expected?"),
    ("seds = [1]", "did you mean seeds?"),
    ("[variants.a]\nSEED = 3", "SEED is set by the runner"),
    ("[variants.a]\nNUM_LAYERS = \"many\"", "NUM_LAYERS='many': expected int"),
    ("[variants.a]\npost = true\nMATRIX_LR = 0.1", "post = true takes quantization and evaluation knobs only"),
    ("[variants.a]\nstack = [\"b\"]\n[variants.b]\nstack = [\"a\"]", "stack cycle"),
    ("[variants.a]\nstack = [\"c\"]", "'c', which is not a [variants.*] entry"),
    ("[variants.a]\npost = true\nstack = [\"b\"]\n[variants.b]\nEMBED_BITS = 4", "can stack only post variants"),
    ("[variants.baseline]\nMATRIX_LR = 0.1", "is taken"),
    ("[variants.a]\nTOKENIZER_PATH = \"x.model\"", "sets TOKENIZER_PATH but not DATA_PATH"),
    ("[grid.g]\nMATRIX_LR = 0.1", "a grid knob takes a non-empty list"),
    ("[random.r]\nMATRIX_LR = [0.1]", "samples = N"),
    ("[stats]\nstage = \"best\"", "stage = 'best'"),
    ("budget = 10\n[baseline]\nMAX_WALLCLOCK_SECONDS = 5", "keep one"),
])
def test_mistakes_are_named(tmp_path, fake, body, message):
    with pytest.raises(st.StudyError) as e:
        st.load_study(write_study(tmp_path, body, fake))
    assert message in str(e.value) and "s.toml" in str(e.value)


def test_the_real_trainers_knobs_are_checked(tmp_path):
    with pytest.raises(st.StudyError, match="NUM_LAYRES is not a knob of train_gpt.py; did you mean NUM_LAYERS"):
        st.load_study(write_study(tmp_path, "[variants.a]\nNUM_LAYRES = 3"))
    with pytest.raises(st.StudyError, match="MLP_ACTIVATION"):  # train_gpt_v2.py's knob: post would drop it
        st.load_study(write_study(tmp_path, 'trainer = "train_gpt_v2.py"\n[baseline]\nMLP_ACTIVATION = "gelu"\n'
                                            "[variants.q]\npost = true\nEMBED_BITS = 5"))


# ----------------------------------------------------------------------------- plan and dry run
def test_dry_run_prints_exact_commands(tmp_path, fake, capsys):
    s = st.load_study(write_study(tmp_path, """
        gpus = 2
        seeds = [7]
        [variants.a]
        MATRIX_LR = 0.05
        [variants.q]
        post = true
        EMBED_BITS = 5
        [variants.t]
        post = true
        TTT_ENABLED = true
        """, fake))
    assert st.run_study(s, tmp_path / "out", dry_run=True) == []
    text = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    out = (tmp_path / "out").resolve()
    assert (f"MATRIX_LR=0.05 SEED=7 RUN_ID=a_s7 LOG_DIR={out}/logs {sys.executable} -m torch.distributed.run "
            f"--standalone --nproc_per_node=2 {fake}") in text
    assert f"-m quant requantize {out}/logs/baseline_s7_model.pre.bin -o {out}/logs/q_s7_model.bin --score" in text
    assert "t_s7_model.bin --stages" in text  # TTT on: the post run scores every stage
    lanes = st.lanes_for(s, gpus=["0", "1", "2", "3", "4"])
    assert lanes == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    with pytest.raises(st.StudyError, match="2 GPU\\(s\\) per run but 1 are visible"):
        st.lanes_for(s, gpus=["0"])
    cpu = dataclasses.replace(s, gpus=0)
    assert st.plan(cpu, tmp_path)[0].cmd == (sys.executable, str(fake))


# ----------------------------------------------------------------------------- the runner
def test_runs_skip_done_rows_and_capture_crashes(tmp_path, fake, monkeypatch, capsys):
    monkeypatch.setenv("NUM_LAYERS", "99")  # a knob in the shell must not reach the runs
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    path = write_study(tmp_path, """
        gpus = 0
        seeds = [1, 2]
        [variants.a]
        MATRIX_LR = 0.05
        [variants.bad]
        CRASH = true
        [variants.q]
        post = true
        EMBED_BITS = 5
        """, fake)
    out = tmp_path / "out"
    rows = st.run_study(st.load_study(path), out)
    assert len(rows) == 8
    by = {(r["variant"], r["seed"]): r for r in rows}
    ok = by[("a", 1)]
    assert ok["status"] == "ok" and ok["metrics"]["stages.prequant.val_bpb"] == pytest.approx(1.5 - 0.05 + 0.001 % 7)
    assert ok["env"]["MATRIX_LR"] == "0.05" and ok["config"]["NUM_LAYERS"] == 2 and ok["git"]["commit"] == "abc"
    assert ok["scale"] == "proxy" and ok["kind"] == "train" and ok["hardware"]["device"] == "cpu"
    assert ok["metrics"]["steps"] == 10 and "env_seen" not in ok["metrics"]
    assert json.loads((out / "logs" / "a_s1.json").read_text())["env_seen"] is None
    bad = by[("bad", 2)]
    assert bad["status"] == "crashed" and "boom: told to crash" in bad["error"]
    post = by[("q", 1)]  # the stand-in saved no checkpoint: the post run is a crash row saying so
    assert post["status"] == "crashed" and "no baseline checkpoint" in post["error"] and post["kind"] == "post"
    assert len(st.read_rows(out / "results.jsonl")) == 8

    capsys.readouterr()
    again = st.run_study(st.load_study(path), out)  # ok rows are skipped, crashed ones retried
    assert sorted((r["variant"], r["seed"]) for r in again) == [("bad", 1), ("bad", 2), ("q", 1), ("q", 2)]
    st.run_study(st.load_study(path), out, dry_run=True)
    assert "# a seed 1 (done: skipped)" in capsys.readouterr().out
    path.write_text(path.read_text().replace("0.05", "0.06"))  # changed settings: that variant runs again
    assert [r["variant"] for r in st.run_study(st.load_study(path), out) if r["status"] == "ok"] == ["a", "a"]

    report = write_report(st.read_rows(out / "results.jsonl"), tmp_path / "rep", st.load_study(path))
    text = report.read_text()
    assert "## Crashed runs" in text and "boom: told to crash" in text
    assert "left out" in text  # the 0.05 rows are not the study's any more


def test_only_and_seeds_restrict_a_call(tmp_path, fake, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    path = write_study(tmp_path, """
        gpus = 0
        seeds = [1, 2]
        [variants.a]
        MATRIX_LR = 0.05
        [variants.b]
        MATRIX_LR = 0.06
        """, fake)
    out = tmp_path / "out"
    rows = st.run_study(st.load_study(path), out, only={"baseline", "b"}, seeds={2})
    assert sorted((r["variant"], r["seed"]) for r in rows) == [("b", 2), ("baseline", 2)]
    rest = st.run_study(st.load_study(path), out)  # a later call does what is left
    assert sorted((r["variant"], r["seed"]) for r in rest) == [("a", 1), ("a", 2), ("b", 1), ("baseline", 1)]
    with pytest.raises(st.StudyError, match="did you mean b"):
        st.run_study(st.load_study(path), out, only={"bb"})
    with pytest.raises(st.StudyError, match="not one of the study's seeds"):
        st.run_study(st.load_study(path), out, seeds={3})


def test_wandb_is_optional(monkeypatch, capsys):
    row = {"run_id": "a_s1", "study": "t", "kind": "train", "variant": "a", "seed": 1, "scale": "proxy",
           "env": {"MATRIX_LR": "0.05"}, "metrics": {"steps": 10}, "status": "ok"}
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    st.log_to_wandb(row)  # not asked for: nothing happens
    monkeypatch.setenv("WANDB_PROJECT", "golf")
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    st.log_to_wandb(row)
    assert "wandb is not installed" in capsys.readouterr().out
    logged = {}

    class FakeRun:
        summary = {}

        def log(self, metrics):
            logged.update(metrics)

        def finish(self):
            logged["finished"] = True

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: logged.update(kw) or FakeRun()))
    st.log_to_wandb(row)
    assert logged["project"] == "golf" and logged["steps"] == 10 and logged["finished"]


# ----------------------------------------------------------------------------- reports
def _row(variant, seed, bpb, tokenizer="t1", seq=64, mem=100.0, sweep=None, knobs=None, status="ok", **extra):
    metrics = {"stages.prequant.val_bpb": bpb - 0.01, "stages.prequant.val_loss": 2 * (bpb - 0.01),
               "stages.quant_roundtrip.val_bpb": bpb, "stages.quant_roundtrip.val_loss": 2 * bpb,
               "stages.in_training.val_loss": 2 * bpb, "train_loss": 2 * bpb - 0.1, "steps": 100,
               "step_avg_ms": 50.0, "peak_memory.allocated_mib": mem, "bytes.total": 15_000_000}
    return {"study": "r", "variant": variant, "seed": seed, "run_id": f"{variant}_s{seed}", "kind": "train",
            "status": status, "env": {}, "trainer": "train_gpt.py", "git": {"commit": "abc"}, "scale": "proxy",
            "hardware": {"device": "cuda", "gpu": "H100", "world_size": 1}, "error": "Traceback\nValueError: x",
            "tokenizer": {"path": tokenizer, "vocab": 1024, "sha256": tokenizer}, "metrics": metrics,
            "config": {"TRAIN_SEQ_LEN": seq, "MAX_WALLCLOCK_SECONDS": 180.0}, "sweep": sweep, "knobs": knobs or {},
            "val_history": [{"train_time_ms": 0.0, "val_bpb": 4.0}, {"train_time_ms": 9e3, "val_bpb": bpb}],
            "stats": {"alpha": 0.01, "min_effect": 0.005, "min_effect_bpb": 0.005, "stage": "final"}, **extra}


def test_report_statistics_and_plots(tmp_path):
    seeds, noise = (1337, 42, 2024), (0.0004, -0.0003, 0.0001)
    rows = [_row("baseline", s, 1.2000 + n) for s, n in zip(seeds, noise)]
    rows += [_row("better", s, 1.1900 + n * 1.1, expected=-0.01) for s, n in zip(seeds, noise)]
    rows += [_row("noise", s, 1.2001 - n, expected=-0.002, note="hoped") for s, n in zip(seeds, noise)]
    rows += [_row("sp4096", s, 1.1800 + n, tokenizer="t2") for s, n in zip(seeds[:2], noise)]
    for lr in (0.01, 0.03):
        for seq in (64, 128):
            name = f"g[MATRIX_LR={lr},TRAIN_SEQ_LEN={seq}]"
            rows += [_row(name, s, 1.2 - lr + seq * 1e-5 + n, seq=seq, mem=seq * 2.0, sweep="g",
                          knobs={"MATRIX_LR": lr, "TRAIN_SEQ_LEN": seq}) for s, n in zip(seeds, noise)]
    rows.append(_row("broken", 1, 0.0, status="crashed"))
    text = write_report(rows, tmp_path).read_text()
    table = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if "| proxy vs proxy |" in line}
    assert "**better**" in table["better"] and "paired" in table["better"]
    assert "**inside noise**" in table["noise"]
    assert "val_bpb (bpb)" in table["sp4096"] and "Welch" in table["sp4096"]  # other tokenizer: bpb, unpaired seeds
    assert "val_loss (nats)" in table["better"]
    assert "compared on val_bpb, never val_loss" in text
    assert "| noise | hoped | -0.0020 |" in text  # negative results carry the expected effect
    assert "15,000,000 ± 0 (pass, max 15,000,000)" in text
    assert "ValueError: x" in text
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert {"val_bpb_vs_time.png", "final_bpb.png", "sweep_g_MATRIX_LR.png", "sweep_g_TRAIN_SEQ_LEN.png",
            "heatmap_g.png", "memory_vs_seq_len.png"} <= pngs
    assert all(f"]({p})" in text for p in pngs)
    assert "g: val_bpb against MATRIX_LR (Spearman rho -0.87" in text


def test_command_line(tmp_path, fake, capsys):
    from golf.__main__ import main

    rows = tmp_path / "rows.jsonl"
    for r in [_row("baseline", s, 1.2 + s * 1e-4) for s in (1, 2)] + [_row("a", s, 1.1 + s * 1e-4) for s in (1, 2)]:
        st.append_row(rows, r)
    assert main(["study", "report", str(rows)]) == 0
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "final_bpb.png").is_file()
    assert main(["study", "run", str(write_study(tmp_path, "[variants.a]\nMATRX_LR = 1", fake))]) == 2
    assert "did you mean MATRIX_LR?" in capsys.readouterr().err
    never = write_study(tmp_path, 'name = "study_never_run"', fake)
    assert main(["study", "report", str(never)]) == 2
    assert "no results at" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the demo, for real
def test_demo_study_runs_on_cpu_and_reports(tmp_path, monkeypatch):
    """studies/demo_cpu.toml end to end: 9 training runs, 3 post-training re-scorings, the report.
    The val shard is cut to 8192 tokens so that twelve runs fit in about a minute on two cores."""
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    source = SAMPLE / "datasets" / "fineweb10B_sp1024"
    (data / "fineweb_train_000000.bin").symlink_to(source / "fineweb_train_000000.bin")
    write_shard(data / "fineweb_val_000000.bin", np.asarray(load_shard(source / "fineweb_val_000000.bin")[:8192]))
    demo = st.load_study(ROOT / "studies" / "demo_cpu.toml")
    demo = dataclasses.replace(demo, baseline={**demo.baseline, "DATA_PATH": str(data)})
    rows = st.run_study(demo, tmp_path / "out", jobs=2)
    assert [r["status"] for r in rows] == ["ok"] * 12, [r["error"] for r in rows if r["error"]]
    post = [r for r in rows if r["variant"] == "embed_int5"]
    base = {r["seed"]: r for r in rows if r["variant"] == "baseline"}
    for r in post:  # same trained weights, fewer embedding bits: smaller, and a larger quantization gap
        b = base[r["seed"]]["metrics"]
        assert r["metrics"]["stages.prequant.val_bpb"] == pytest.approx(b["stages.prequant.val_bpb"], abs=1e-6)
        assert r["metrics"]["bytes.total"] < b["bytes.total"]
        assert r["metrics"]["stages.quant_roundtrip.val_bpb"] > b["stages.quant_roundtrip.val_bpb"]
    report = write_report(st.read_rows(tmp_path / "out" / "results.jsonl"), tmp_path / "report", demo)
    text = report.read_text()
    assert "## Against the baseline" in text and "## Negative results" in text
    assert (tmp_path / "report" / "val_bpb_vs_time.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "final_bpb.png").is_file()
