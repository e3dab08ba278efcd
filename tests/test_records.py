"""Record folders (golf/records.py, golf/reproduce.py) and log parsing (golf/logparse.py).

Two real seed runs of the tiny CPU trainer, made once for the module, become a record folder; the
tests then break it in one way each and expect check to say exactly what broke. Comparisons run on
synthetic logs written in the community grammar; the public-style log below is a synthetic fixture
in the leaderboard's format, with made-up round numbers, not any entry's results.
"""
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from golf import records
from golf.logparse import LogError, embedded_sources, parse_log
from golf.records import (RECORDS, RecordError, check_all, check_folder, new_ablation, new_record, read_packed,
                          record_folders)
from golf.reproduce import knob_table, logs_in, readme_command
from tests.trainer_runs import ROOT, run_trainer

SEEDS = (1, 2)
META = {"author": "Test Author", "github_id": "tester", "blurb": "Two tiny CPU runs.", "technique_summary": "Defaults."}
DATE = "2026-01-02"

# SYNTHETIC fixture in the public leaderboard's log format (code, a rule, versions, nvidia-smi, a rule,
# then the grammar). The numbers are invented round values. The code preamble holds grammar-looking
# lines that the parser must skip.
PUBLIC_LOG = '''"""A trainer whose docstring shows its own output:
final_int8_zlib_roundtrip_exact val_loss:9.99999999 val_bpb:9.99999999
step:5/5 val_loss:9.9999 val_bpb:9.9999 train_time:1ms step_avg:1.00ms
"""
import os
def main():
    pass
''' + "=" * 100 + '''
Running Python 3.12.3
Running PyTorch 2.9.1+cu128
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:18:00.0 Off |                    0 |
|   1  NVIDIA H100 80GB HBM3          On  |   00000000:2A:00.0 Off |                    0 |
''' + "=" * 100 + '''
model_params:1000000
world_size:8 grad_accum_steps:1
seed:42
warmup_step:1/2
step:0/200 val_loss:7.0000 val_bpb:4.0000 train_time:0ms step_avg:0.01ms
step:1/200 train_loss:7.0000 train_time:50ms step_avg:50.00ms
step:100/200 train_loss:3.5000 train_time:5000ms step_avg:50.00ms
step:120/200 val_loss:3.0000 val_bpb:1.5000 train_time:6000ms step_avg:50.00ms
stopping_early: wallclock_cap train_time:6000ms step:120/200
peak memory allocated: 10000 MiB reserved: 10500 MiB
Serialized model: 60000000 bytes
Code size: 50000 bytes
Total submission size: 60050000 bytes
Serialized model int8+zlib: 15000000 bytes (payload:16000000 raw_torch:16100000 payload_ratio:3.90x)
Total submission size int8+zlib: 15050000 bytes
final_int8_zlib_roundtrip val_loss:3.0100 val_bpb:1.5100 eval_time:1500ms
final_int8_zlib_roundtrip_exact val_loss:3.01000000 val_bpb:1.51000000
'''


def synthetic_log(path: Path, seed: int, val_loss: float, stage: str = "int8_zlib_roundtrip") -> Path:
    """The least a log needs for compare: steps, sizes and an _exact stage (SYNTHETIC values)."""
    bpb = val_loss / 2
    path.write_text("\n".join([
        f"seed:{seed}", "step:10/10 train_loss:3.0000 train_time:400ms step_avg:40.00ms",
        f"step:10/10 val_loss:{val_loss:.4f} val_bpb:{bpb:.4f} train_time:401ms step_avg:40.10ms",
        "Serialized model int8+zlib: 15000000 bytes", "Code size: 50000 bytes",
        "Total submission size int8+zlib: 15050000 bytes",
        f"final_{stage} val_loss:{val_loss:.4f} val_bpb:{bpb:.4f} eval_time:1000ms",
        f"final_{stage}_exact val_loss:{val_loss:.8f} val_bpb:{bpb:.8f}", ""]))
    return path


def cli(*argv: str) -> int:
    return records.main([str(a) for a in argv])


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A LOG_DIR with seed<N>.txt and seed<N>.json of finished tiny CPU runs (two at a time)."""
    root = tmp_path_factory.mktemp("runs")

    def one(seed: int) -> Path:
        run_trainer(root / f"run{seed}", SEED=str(seed), ITERATIONS="4", VAL_LOSS_EVERY="0", QUANT_METHOD="rtn")
        return root / f"run{seed}"

    with ThreadPoolExecutor(2) as pool:
        dirs = list(pool.map(one, SEEDS))
    log_dir = root / "logs"
    log_dir.mkdir()
    for seed, d in zip(SEEDS, dirs):
        for ext in (".txt", ".json"):
            shutil.copyfile(d / f"t{ext}", log_dir / f"seed{seed}{ext}")
    return log_dir


@pytest.fixture(scope="module")
def record(runs, tmp_path_factory) -> Path:
    return new_record(runs, "Tiny_Test", date=DATE, meta=META, records_dir=tmp_path_factory.mktemp("records"))


def copy_record(folder: Path, records_dir: Path, name: str | None = None) -> Path:
    dest = records_dir / folder.parent.name / (name or folder.name)
    shutil.copytree(folder, dest)
    return dest


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- parsing
def test_parse_our_log(runs):
    log = parse_log(runs / "seed1.txt")
    assert log.seed == 1 and log.steps == log.total_steps == 4 and log.run_id == "t" and log.world_size == 1
    assert log.score_stage == "quant_roundtrip" and set(log.stages) == {"prequant", "quant_roundtrip"}
    assert log.artifact_bytes == log.code_bytes + log.model_bytes
    summary = json.loads((runs / "seed1.json").read_text())  # the run's own summary agrees with its log
    assert log.val_loss == pytest.approx(summary["stages"]["quant_roundtrip"]["val_loss"], abs=1e-8)
    assert (log.code_bytes, log.model_bytes) == (summary["bytes"]["code"], summary["bytes"]["model"])
    assert log.step_avg_ms == pytest.approx(summary["step_avg_ms"], abs=0.01)
    assert log.settings["SEED"] == ("1", "env") and log.hardware == "1xcpu"
    assert next(iter(embedded_sources(runs / "seed1.txt"))) == "train_gpt.py"


def test_parse_public_style_log(tmp_path):
    path = tmp_path / "train_seed7.log"
    path.write_text(PUBLIC_LOG)
    log = parse_log(path)
    assert log.seed == 42  # the log's own seed line wins over the file name
    assert log.score_stage == "int8_zlib_roundtrip" and list(log.stages) == ["int8_zlib_roundtrip"]
    assert (log.val_loss, log.val_bpb, log.score.eval_time_s) == (3.01, 1.51, 1.5)
    assert (log.steps, log.total_steps, log.train_time_ms, log.step_avg_ms) == (120, 200, 6000.0, 50.0)
    assert (log.code_bytes, log.model_bytes, log.artifact_bytes) == (50000, 15000000, 15050000)
    assert log.stopped_early and log.peak_memory_mib == 10000 and log.torch_version == "2.9.1+cu128"
    assert log.hardware == "8xNVIDIA H100 80GB HBM3"


def test_parse_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.log"
    empty.write_text("hello\n")
    with pytest.raises(LogError, match=r"empty\.log: no `step:N/M"):
        parse_log(empty)
    crashed = tmp_path / "crashed.log"
    crashed.write_text("step:1/10 train_loss:7.0000 train_time:50ms step_avg:50.00ms\n"
                       "final_prequant_exact val_loss:6.00000000 val_bpb:3.00000000\n")
    with pytest.raises(LogError, match=r"crashed\.log: no `final_<stage>_exact .*did not finish scoring"):
        parse_log(crashed)
    with pytest.raises(LogError, match=r"crashed\.log: no stage 'ttt'; the log scores prequant"):
        parse_log(crashed, "ttt")
    with pytest.raises(LogError, match=r"crashed\.log: the log lacks a seed .*; a `Code size: N bytes` line$"):
        parse_log(crashed, "prequant").need("seed", "code_bytes")


# ----------------------------------------------------------------------------- new and check
def test_new_record_checks(record, runs):
    assert check_folder(record) == []
    assert record.name == f"{DATE}_Tiny_Test" and record.parent.name == "track_10min_16mb"
    sub = json.loads((record / "submission.json").read_text())
    assert sub["seeds"] == list(SEEDS) and sub["val_bpb_std"] > 0 and sub["score_stage"] == "quant_roundtrip"
    logs = [parse_log(runs / f"seed{s}.txt") for s in SEEDS]
    assert sub["val_loss"] == pytest.approx(sum(log.val_loss for log in logs) / 2, abs=1e-8)
    assert sub["bytes_code"] == logs[0].code_bytes == (record / "train_gpt.py").stat().st_size
    assert sub["env"]["ITERATIONS"] == "4" and "SEED" not in sub["env"] and "RUN_ID" not in sub["env"]
    key, files = read_packed((record / "train_gpt.py").read_bytes())  # decoded, never run
    assert key == "train_gpt.py" and "golf/dist.py" in files
    assert (record / "requirements.txt").read_text() == (ROOT / "requirements.txt").read_text()
    for seed in SEEDS:
        assert (record / f"train_seed{seed}.log").is_file() and (record / f"train_seed{seed}.json").is_file()
    readme = (record / "README.md").read_text()
    assert "| 1 | " in readme and "SEED=$SEED" in readme and "ITERATIONS=4" in readme


def test_new_refuses_what_a_record_cannot_be(runs, tmp_path):
    new_record(runs, "X", date=DATE, records_dir=tmp_path)
    with pytest.raises(RecordError, match="already exists"):
        new_record(runs, "X", date=DATE, records_dir=tmp_path)
    with pytest.raises(RecordError, match="no finished runs"):
        new_record(tmp_path, "Y", records_dir=tmp_path)
    same = tmp_path / "same"
    same.mkdir()
    for name in ("a", "b"):  # one run twice
        shutil.copyfile(runs / "seed1.txt", same / f"{name}.txt")
        shutil.copyfile(runs / "seed1.json", same / f"{name}.json")
    with pytest.raises(RecordError, match="repeat a seed"):
        new_record(same, "Z", records_dir=tmp_path)


def test_tampered_numbers_fail_with_the_numbers(record, tmp_path):
    folder = copy_record(record, tmp_path)
    sub = json.loads((folder / "submission.json").read_text())
    sub["val_bpb"] += 0.001
    sub["seed_results"]["2"]["steps"] = 5
    sub["env"]["ITERATIONS"] = "5"
    (folder / "submission.json").write_text(json.dumps(sub))
    problems = check_folder(folder)
    wrong_mean = r"submission.json val_bpb is [\d.]+ but the logs give [\d.]+ \(seeds 1, 2\)"
    assert any(re.match(wrong_mean, p) for p in problems)
    assert "seed_results[2].steps is 5 but train_seed2.log gives 4" in problems
    assert ("submission.json env differs from the settings the logs took from the environment: "
            "ITERATIONS ('5' vs '4')") in problems
    assert len(problems) == 3, problems


def test_schema_problems_are_named(record, tmp_path):
    folder = copy_record(record, tmp_path)
    sub = json.loads((folder / "submission.json").read_text())
    del sub["hardware"]
    sub.update(seeds="1,2", blurb="TODO: later")
    (folder / "submission.json").write_text(json.dumps(sub))
    problems = check_folder(folder)
    assert "submission.json lacks 'hardware' (a non-empty string)" in problems
    assert "submission.json seeds is '1,2'; expected a non-empty list of distinct non-negative ints" in problems
    assert "submission.json blurb is still the TODO placeholder" in problems


def test_missing_trainer_or_log_fails(record, tmp_path):
    folder = copy_record(record, tmp_path)
    (folder / "train_gpt.py").unlink()
    (folder / "train_seed2.log").unlink()
    missing_trainer = "train_gpt.py is missing: a record ships the trainer that produced its logs"
    assert check_folder(folder) == ["train_seed2.log is missing (seed 2 is listed in seeds)", missing_trainer]
    shutil.copyfile(record / "train_seed2.log", folder / "train_seed2.log")
    assert check_folder(folder) == [missing_trainer]


def test_unpacked_or_altered_trainer_fails(record, tmp_path):
    folder = copy_record(record, tmp_path)
    shutil.copyfile(ROOT / "train_gpt.py", folder / "train_gpt.py")
    assert "imports project modules (data, data.shards" in check_folder(folder)[0]
    (folder / "train_gpt.py").write_bytes((record / "train_gpt.py").read_bytes() + b"print('extra')\n")
    assert check_folder(folder) == ["train_gpt.py does not decode or pack: not a packed trainer: expected "
                                    "D=\"<blob>\" followed by quant/pack.py's bootstrap"]


def test_artifact_over_the_cap_fails(record, tmp_path):
    folder = copy_record(record, tmp_path)
    log = folder / "train_seed1.log"
    text = log.read_text()
    code = parse_log(log).code_bytes
    model = 16_000_000 - code + 1
    text = re.sub(r"^(Serialized model[^:\n]*): \d+ bytes", rf"\1: {model} bytes", text, flags=re.M)
    text = re.sub(r"^(Total submission size[^:\n]*): \d+ bytes", rf"\1: {code + model} bytes", text, flags=re.M)
    log.write_text(text)
    problems = check_folder(folder)
    assert (f"train_seed1.log: artifact is 16000001 bytes (code {code} + model {model}), "
            "1 bytes over the 16000000-byte cap") in problems
    edit_json(folder / "submission.json", bytes_total=16_000_001)
    assert "bytes_total 16000001 is over the 16000000-byte cap by 1" in check_folder(folder)


def test_check_command_and_the_repository_gate(record, tmp_path, capsys):
    assert cli("--records-dir", tmp_path, "check") == 0  # zero folders pass
    good = copy_record(record, tmp_path)
    assert cli("--records-dir", tmp_path, "check") == 0
    broken = tmp_path / "track_10min_16mb" / f"{DATE}_Broken"
    broken.mkdir()
    assert cli("--records-dir", tmp_path, "check") == 1
    out = capsys.readouterr().out
    assert f"ok   {good}" in out and f"FAIL {broken}\n     submission.json is missing" in out
    assert cli("check", good) == 0


def test_every_record_folder_in_the_repository_checks():
    """The CI gate: each records/*/*/ folder must prove its submission.json (none is also fine)."""
    failures = {folder: problems for folder, problems in check_all(record_folders(RECORDS)).items() if problems}
    assert not failures, "\n".join(f"{f}: {'; '.join(p)}" for f, p in failures.items())


def test_baseline_comparison_is_recorded_and_checked(record, runs, tmp_path):
    base = copy_record(record, tmp_path)
    folder = new_record(runs, "Same_Again", date=DATE, meta=META, baseline=base, records_dir=tmp_path)
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["baseline"] == f"track_10min_16mb/{base.name}"
    assert sub["delta_vs_baseline_val_loss"] == 0 and sub["p_value"] == 1.0  # the same runs: no difference
    assert check_folder(folder) == []
    edit_json(folder / "submission.json", p_value=0.001)
    assert check_folder(folder) == [f"submission.json p_value is 0.001 but the logs give 1.0 against {sub['baseline']}"]


# ----------------------------------------------------------------------------- leaderboard
def test_leaderboard_ranks_and_marks(record, tmp_path, capsys):
    copy_record(record, tmp_path)
    sub = json.loads((record / "submission.json").read_text())
    for name, shift in (("Lower", -0.5), ("Higher", 0.5)):  # numbers the logs do not back: they fail check
        edit_json(copy_record(record, tmp_path, f"{DATE}_{name}") / "submission.json", val_bpb=sub["val_bpb"] + shift)
    assert cli("--records-dir", tmp_path, "leaderboard") == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| \d", line)]
    assert [row.split(" | ")[6] for row in rows] == [f"{DATE}_Lower", record.name, f"{DATE}_Higher"]
    assert [row.rsplit(" | ", 1)[1] for row in rows] == ["FAILS CHECK (1) |", "ok |", "FAILS CHECK (1) |"]
    assert rows[1].startswith(f"| 2 | {sub['val_bpb']:.8f} | {sub['val_bpb_std']:.8f} | 2 | ")


# ----------------------------------------------------------------------------- compare
def test_compare_applies_the_record_bar(tmp_path, capsys):
    best, better, noisy = (tmp_path / n for n in ("best", "better", "noisy"))
    for d, losses in ((best, (2.400, 2.401, 2.402)), (better, (2.390, 2.391, 2.392)), (noisy, (2.398, 2.401, 2.404))):
        d.mkdir()
        for seed, loss in zip((1, 2, 3), losses):
            synthetic_log(d / f"train_seed{seed}.log", seed, loss)
    assert cli("compare", best, better) == 0
    out = capsys.readouterr().out
    assert "delta (B" in out and "-0.01000000" in out and "verdict: better" in out and "B meets the record bar" in out
    assert cli("compare", best, noisy, "--paired") == 0
    out = capsys.readouterr().out
    assert "verdict: inside noise" in out and "(paired)" in out and "B does not meet the record bar" in out
    assert [log.seed for log in logs_in(best)] == [1, 2, 3]


# ----------------------------------------------------------------------------- reproduce
def test_reproduce_dry_run_prints_the_recorded_settings(record, tmp_path, capsys):
    assert cli("reproduce", record, "--dry-run", "--out", tmp_path) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "train_gpt.py" in line]
    assert len(lines) == 2
    for seed, line in zip(SEEDS, lines):
        assert f"SEED={seed} RUN_ID=reproduce_seed{seed} LOG_DIR={tmp_path}" in line and "ITERATIONS=4" in line
        assert line.endswith(str(record / "train_gpt.py"))


def test_reproduce_reruns_the_packed_trainer(record, tmp_path, capsys):
    """The folder's own packed trainer, run outside the repository's sources, gives the recorded seed's
    numbers (CPU runs with one thread are deterministic)."""
    assert cli("reproduce", record, "--seeds", "1", "--out", tmp_path, "--set", "OMP_NUM_THREADS=1") == 0
    out = capsys.readouterr().out
    new, old = parse_log(tmp_path / "reproduce_seed1.txt"), parse_log(record / "train_seed1.log")
    assert {k: (s.val_loss, s.val_bpb) for k, s in new.stages.items()} == \
        {k: (s.val_loss, s.val_bpb) for k, s in old.stages.items()}
    assert new.code_bytes == old.code_bytes
    assert "too few recorded seeds" not in out and "verdict: inside noise" in out


def test_reproduce_public_style_folder_maps_knobs(tmp_path, capsys):
    folder = tmp_path / "track_10min_16mb" / "2026-03-17_Synthetic_Public"
    folder.mkdir(parents=True)
    (folder / "train_seed42.log").write_text(PUBLIC_LOG)
    (folder / "submission.json").write_text(json.dumps({"name": "Synthetic", "val_loss": 3.01, "val_bpb": 1.51}))
    (folder / "README.md").write_text("Synthetic fixture.\n\n```bash\nOMP_NUM_THREADS=1 \\\nRUN_ID=x \\\n"
                                      "NUM_LAYERS=9 \\\nTIE_EMBEDDINGS=1 \\\nWARMDOWN_ITERS=1200 \\\n"
                                      "torchrun --standalone --nproc_per_node=8 /somewhere/train_gpt.py\n```\n")
    assert readme_command(folder / "README.md") == (
        {"OMP_NUM_THREADS": "1", "RUN_ID": "x", "NUM_LAYERS": "9", "TIE_EMBEDDINGS": "1", "WARMDOWN_ITERS": "1200"}, 8)
    assert cli("reproduce", folder, "--dry-run", "--out", tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "unknown: TIE_EMBEDDINGS=1 is not a knob of train_gpt.py" in out
    assert "note: WARMDOWN_ITERS=1200: alias of WARMDOWN_FRAC" in out and "note: RUN_ID=x: set per seed" in out
    command = next(line for line in out.splitlines() if "--nproc_per_node=8" in line)
    assert "NUM_LAYERS=9" in command and "SEED=42" in command and "TIE_EMBEDDINGS" not in command
    assert command.endswith(str(ROOT / "train_gpt.py"))
    assert cli("reproduce", folder, "--out", tmp_path / "out") == 1  # refused before running anything
    assert "refusing to run: 1 unknown setting" in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_knob_table_is_read_without_running():
    knobs, aliases = knob_table([(ROOT / "train_gpt.py").read_text()])
    assert {"NUM_LAYERS", "SEED", "TTT_ENABLED"} <= knobs and aliases["GATE_WINDOW"] == "GATE_WIDTH"


# ----------------------------------------------------------------------------- ablation export
def test_ablation_folder(tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    (study / "report.md").write_text("# Study\n")
    (study / "results.jsonl").write_text('{"variant": "a", "status": "ok"}\n{"variant": "b", "status": "crash"}\n')
    (study / "loss.png").write_bytes(b"\x89PNG\r\n")
    records_dir = tmp_path / "records"
    assert cli("--records-dir", records_dir, "ablation", study, "--name", "Study_X", "--date", DATE,
               "--author", "A", "--github-id", "g", "--blurb", "What we asked.") == 0
    folder = records_dir / "track_non_record_16mb" / f"{DATE}_Study_X"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "loss.png", "report.md", "results.jsonl", "submission.json"]
    assert "2 runs (1 crash, 1 ok)" in (folder / "README.md").read_text()
    assert check_folder(folder) == []
    capsys.readouterr()
    cli("--records-dir", records_dir, "leaderboard")
    assert f"{DATE}_Study_X: 2 runs, ok" in capsys.readouterr().out
    edit_json(folder / "submission.json", runs=3)
    assert check_folder(folder) == ["submission.json runs is 3 but results.jsonl has 2 rows"]
    with pytest.raises(RecordError, match="no report.md"):
        new_ablation(tmp_path, "Nothing", records_dir=records_dir)
