"""Knob parsing: types, defaults, aliases, misspellings, and the trainer's table itself."""
import subprocess
import sys
from pathlib import Path

import pytest

from golf.config import Alias, Knob, KnobError, help_text, parse_knobs

ROOT = Path(__file__).resolve().parents[1]
TABLE = (
    Knob("NUM_LAYERS", int, 9, "blocks"),
    Knob("MATRIX_LR", float, 0.04, "lr"),
    Knob("COMPILE", bool, None, "compile"),
    Knob("DATA_PATH", str, "./d", "data"),
    Knob("WARMDOWN_FRAC", float, 0.1, "frac",
         (Alias("WARMDOWN_ITERS", lambda raw, env: int(raw) / int(env.get("ITERATIONS", "100"))),)),
    Knob("VAL_BATCH_TOKENS", int, 8, "val", (Alias("VAL_BATCH_SIZE"),)),
)


def test_defaults_and_types():
    cfg = parse_knobs(TABLE, {"NUM_LAYERS": "11", "MATRIX_LR": "0.02", "COMPILE": "0", "PATH": "/bin"})
    assert (cfg.num_layers, cfg.matrix_lr, cfg.compile, cfg.data_path) == (11, 0.02, False, "./d")
    assert cfg.sources["NUM_LAYERS"] == "env" and cfg.sources["DATA_PATH"] == "default"
    assert parse_knobs(TABLE, {}).compile is None


def test_misspelled_knob_suggests_the_right_name():
    with pytest.raises(KnobError, match="NUM_LAYRES is not a knob; did you mean NUM_LAYERS"):
        parse_knobs(TABLE, {"NUM_LAYRES": "4"})


def test_wrong_type_names_the_variable():
    with pytest.raises(KnobError, match="NUM_LAYERS='four': expected int"):
        parse_knobs(TABLE, {"NUM_LAYERS": "four"})
    with pytest.raises(KnobError, match="COMPILE='maybe': expected 0/1"):
        parse_knobs(TABLE, {"COMPILE": "maybe"})


def test_aliases_convert_and_conflict():
    cfg = parse_knobs(TABLE, {"WARMDOWN_ITERS": "25", "ITERATIONS": "100", "VAL_BATCH_SIZE": "16"})
    assert cfg.warmdown_frac == 0.25 and cfg.val_batch_tokens == 16
    assert cfg.sources["WARMDOWN_FRAC"] == "alias WARMDOWN_ITERS"
    with pytest.raises(KnobError, match="both WARMDOWN_FRAC and its alias WARMDOWN_ITERS"):
        parse_knobs(TABLE, {"WARMDOWN_ITERS": "25", "WARMDOWN_FRAC": "0.3"})


def test_unrelated_environment_is_ignored():
    parse_knobs(TABLE, {"HOME": "/root", "OMP_NUM_THREADS": "2", "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": "0"})


def test_help_lists_every_knob():
    text = help_text(TABLE, "t")
    for knob in TABLE:
        assert knob.name in text
    assert "alias WARMDOWN_ITERS" in text


def test_trainer_table_and_help():
    import train_gpt

    names = [k.name for k in train_gpt.KNOBS]
    assert len(names) == len(set(names))
    for required in ("DATA_PATH", "TOKENIZER_PATH", "VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS",
                     "NUM_KV_HEADS", "MLP_MULT", "TRAIN_SEQ_LEN", "TRAIN_BATCH_TOKENS", "ITERATIONS",
                     "WARMUP_STEPS", "WARMDOWN_FRAC", "VAL_LOSS_EVERY", "TRAIN_LOG_EVERY",
                     "MAX_WALLCLOCK_SECONDS", "RUN_ID", "SEED", "GRAD_ACCUM_STEPS", "COMPILE"):
        assert required in names
    out = subprocess.run([sys.executable, "train_gpt.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and all(n in out.stdout for n in names)


def test_trainer_rejects_misspelling_before_training(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "NUM_LAYRES": "4", "LOG_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "train_gpt.py"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "did you mean NUM_LAYERS" in out.stderr


@pytest.mark.parametrize("world,accum", [(1, 8), (2, 4), (8, 1), (16, 1), (24, 1)])
def test_any_world_size_keeps_the_global_batch(world, accum):
    """The same 786,432 tokens per step on 1 GPU, 8 GPUs or two 8-GPU nodes, split into rank micro-batches."""
    import train_gpt as tg
    cfg = parse_knobs(tg.KNOBS, {})
    assert tg.grad_accum_steps(cfg, world) == accum
    assert cfg.train_batch_tokens % (world * accum * cfg.train_seq_len) == 0


def test_world_sizes_that_cannot_split_the_batch_are_refused():
    import train_gpt as tg
    with pytest.raises(KnobError, match="does not divide 8"):
        tg.grad_accum_steps(parse_knobs(tg.KNOBS, {}), 3)
    with pytest.raises(KnobError, match="TRAIN_BATCH_TOKENS=786432 must divide"):
        tg.grad_accum_steps(parse_knobs(tg.KNOBS, {}), 10)  # 10 x 2048 does not divide 786,432
