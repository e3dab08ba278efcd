"""Re-quantizing a saved checkpoint reproduces the training run's own export, and takes other knobs."""
import os

import pytest

from quant.requantize import requantize
from tests.trainer_runs import TINY, run_trainer, summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    # 128 wide: the tied embedding (1024 x 128) is large enough to be GPTQ-quantized
    run_trainer(tmp, ITERATIONS="6", VAL_LOSS_EVERY="0", MODEL_DIM="128", GPTQ_CALIBRATION_BATCHES="2")
    return tmp


def env_for(monkeypatch, **knobs):
    for k in [k for k in os.environ if k.isupper() and k in TINY]:
        monkeypatch.delenv(k)
    for k in ("DATA_PATH", "TOKENIZER_PATH", "VAL_BATCH_TOKENS"):
        monkeypatch.setenv(k, TINY[k])
    for k, v in knobs.items():
        monkeypatch.setenv(k, v)


def test_requantize_reproduces_the_runs_export(trained, monkeypatch):
    env_for(monkeypatch)
    s = summary(trained)
    r = requantize(str(trained / "t_model.pre.bin"), str(trained / "again.bin"), score=True)
    assert (trained / "again.bin").read_bytes() == (trained / "t_model.gptq.bin").read_bytes()
    assert r["bytes"]["total"] == s["bytes"]["total"]
    assert r["stages"]["prequant"]["val_bpb"] == s["stages"]["prequant"]["val_bpb"]
    assert r["stages"]["quant_roundtrip"]["val_bpb"] == s["stages"]["quant_roundtrip"]["val_bpb"]


def test_requantize_with_other_knobs(trained, monkeypatch):
    env_for(monkeypatch, QUANT_METHOD="rtn", EMBED_BITS="4", LQER_ENABLED="0", COMPRESSOR="lzma")
    r = requantize(str(trained / "t_model.pre.bin"), str(trained / "rtn4.bin"), score=True)
    assert r["label"] == "int6/int4 rtn+lzma"
    assert r["bytes"]["model"] < summary(trained)["bytes"]["model"]
    assert r["quant_gap_bpb"] > 0


def test_requantize_refuses_a_model_shape_from_the_environment(trained, monkeypatch):
    env_for(monkeypatch, MODEL_DIM="256")
    with pytest.raises(ValueError, match="MODEL_DIM"):
        requantize(str(trained / "t_model.pre.bin"))


def test_requantize_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="pre.bin"):
        requantize(str(tmp_path / "nope_model.pre.bin"))
