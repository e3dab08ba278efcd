"""The trainer for real on CPU: learning, rank equivalence, failure handling, bad input."""
import re
import sys
import time

import numpy as np
import pytest
import torch

from quant.serialize import deserialize
from tests.trainer_runs import ROOT, clean_env, run_trainer, summary, train_losses


def test_tiny_model_learns_and_logs(tmp_path):
    run_trainer(tmp_path, ITERATIONS="60", VAL_LOSS_EVERY="60", MATRIX_LR="0.05")
    s = summary(tmp_path)
    first, last = s["val_history"][0], s["val_history"][-1]
    assert first["step"] == 0 and last["step"] == 60
    assert last["val_loss"] < first["val_loss"] - 1.0, (first, last)
    q = s["stages"]["quant_roundtrip"]
    assert abs(q["val_bpb"] - last["val_bpb"]) < 0.05  # the quantized round trip costs little
    log = (tmp_path / "t.txt").read_text()
    assert log.startswith("==== source: train_gpt.py")
    for module in ("golf/config.py", "golf/dist.py", "golf/bpb.py", "data/shards.py", "quant/export.py"):
        assert f"==== source: {module}" in log
    for pattern in (r"^git_commit:", r"^versions: .*torch=", r"^NUM_LAYERS=2 \(env\)$",
                    r"^step:60/60 val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$",
                    r"^step:1/60 train_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$",
                    r"^peak memory", r"^Serialized model", r"^Code size", r"^Total submission size",
                    r"^final_quant_roundtrip_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$"):
        assert re.search(pattern, log, re.M), pattern
    assert s["model_params"] > 0 and s["bytes"]["total"] == s["bytes"]["code"] + s["bytes"]["model"]


def _weights(tmp):
    tensors, _ = deserialize((tmp / "t_model.pre.bin").read_bytes())
    return tensors


def test_two_gloo_ranks_equal_one_rank_with_accumulation(tmp_path):
    # Clipping off: its norm is summed in a different order across ranks, an ulp that AdamW then
    # amplifies on rare embedding rows (tests/test_optim.py checks clipping across ranks to 1e-5).
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(ITERATIONS="4", VAL_LOSS_EVERY="0", TRAIN_BATCH_TOKENS="2048", GRAD_CLIP_NORM="0")
    run_trainer(one, GRAD_ACCUM_STEPS="2", **common)
    run_trainer(two, nproc=2, GRAD_ACCUM_STEPS="1", **common)
    assert summary(two)["world_size"] == 2 and summary(one)["grad_accum_steps"] == 2
    assert train_losses(one) == train_losses(two) and len(train_losses(one)) == 4
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        assert torch.equal(w1[name], w2[name]), name


def test_failing_rank_ends_every_rank(tmp_path):
    import subprocess

    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "tests/fixtures/fail_on_rank.py"], cwd=ROOT, env=clean_env(), capture_output=True,
                         text=True, timeout=180)
    assert out.returncode != 0
    assert time.time() - t0 < 90
    assert "[rank 1] run failed" in out.stderr and "planted failure on rank 1" in out.stderr


def test_tokenizer_vocab_mismatch_is_a_clear_error(tmp_path):
    out = run_trainer(tmp_path, check=False, VOCAB_SIZE="2048", ITERATIONS="1")
    assert out.returncode != 0
    assert "fineweb_1024_bpe.model" in out.stderr and "2048" in out.stderr and "1024" in out.stderr


def test_short_validation_stream_is_a_clear_error(tmp_path):
    out = run_trainer(tmp_path, check=False, TRAIN_SEQ_LEN="1048576", TRAIN_BATCH_TOKENS="1048576", ITERATIONS="1")
    assert out.returncode != 0 and "shorter than TRAIN_SEQ_LEN=1048576" in out.stderr


def test_misspelt_flex_kernel_option_is_a_clear_error(tmp_path):
    out = run_trainer(tmp_path, check=False, FLEX_KERNEL_OPTIONS="fwd_BLOCKM=64", ITERATIONS="1")
    assert out.returncode != 0 and "FLEX_KERNEL_OPTIONS: 'fwd_BLOCKM=64' is not name=value" in out.stderr


def test_bad_ttt_setting_fails_before_training(tmp_path):
    out = run_trainer(tmp_path, check=False, TTT_ENABLED="1", TTT_LAYOUT="padded", ITERATIONS="1")
    assert out.returncode != 0 and "TTT_LAYOUT='padded': expected one of auto, packed, rows" in out.stderr
    assert "step:" not in out.stdout + out.stderr  # refused before the first step


def test_research_trainer_runs_the_same_stack(tmp_path):
    run_trainer(tmp_path, script="train_gpt_v2.py", ITERATIONS="2", VAL_LOSS_EVERY="0")
    assert summary(tmp_path)["steps"] == 2
    assert summary(tmp_path)["flex_kernel_options"] is None  # CPU: SDPA, no FlexAttention options


def test_byte_sidecar_is_used_and_agrees_with_tokenizer_bytes(tmp_path):
    import shutil

    from data.shards import load_shard, write_shard
    from golf.bpb import ByteCounter
    from tests.trainer_runs import SAMPLE, TINY

    data = tmp_path / "data"
    shutil.copytree(TINY["DATA_PATH"], data)
    val = load_shard(data / "fineweb_val_000000.bin")
    counter = ByteCounter.from_tokenizer(SAMPLE / "tokenizers" / "fineweb_1024_bpe.model")
    write_shard(data / "fineweb_val_bytes_000000.bin", counter.stream_bytes(np.asarray(val)))
    run_trainer(tmp_path / "side", ITERATIONS="0", DATA_PATH=str(data))
    run_trainer(tmp_path / "lut", ITERATIONS="0")
    assert "val_bytes: byte sidecar" in (tmp_path / "side" / "t.txt").read_text()
    assert summary(tmp_path / "side")["stages"]["prequant"]["val_bpb"] == pytest.approx(
        summary(tmp_path / "lut")["stages"]["prequant"]["val_bpb"], rel=1e-12)


def test_caseops_tokenizer_without_byte_sidecar_is_refused(tmp_path):
    import shutil

    from tests.trainer_runs import SAMPLE

    tok = tmp_path / "fineweb_1024_caseops.model"
    shutil.copy(SAMPLE / "tokenizers" / "fineweb_1024_bpe.model", tok)
    out = run_trainer(tmp_path, check=False, ITERATIONS="1", TOKENIZER_PATH=str(tok))
    assert out.returncode != 0 and "needs the val byte sidecar" in out.stderr
