"""Re-quantizing a saved checkpoint reproduces the training run's own export, and takes other knobs."""
import os
import re

import pytest

from golf.config import KnobError
from quant.requantize import parse_variant, requantize, requantize_variants
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


def test_variants_in_one_process_equal_separate_runs(trained, monkeypatch, capsys):
    """--variant: each export and score equals a separate requantize with the same knobs; the
    pre-quant score is computed once and shared."""
    env_for(monkeypatch)
    single = {"gptq": requantize(str(trained / "t_model.pre.bin"), str(trained / "one_gptq.bin"), score=True)}
    env_for(monkeypatch, QUANT_METHOD="rtn", EMBED_BITS="4", LQER_ENABLED="0", COMPRESSOR="lzma")
    single["rtn4"] = requantize(str(trained / "t_model.pre.bin"), str(trained / "one_rtn4.bin"), score=True)
    for k in ("QUANT_METHOD", "EMBED_BITS", "LQER_ENABLED", "COMPRESSOR"):
        monkeypatch.delenv(k)
    capsys.readouterr()
    variants = [("gptq", {}), ("rtn4", {"QUANT_METHOD": "rtn", "EMBED_BITS": "4", "LQER_ENABLED": "0", "COMPRESSOR": "lzma"})]
    many = requantize_variants(str(trained / "t_model.pre.bin"), variants, str(trained / "variants"), score=True)
    out = capsys.readouterr().out
    assert out.count("final_prequant_exact") == 1
    for name, r in many.items():
        assert (trained / "variants" / f"{name}.bin").read_bytes() == (trained / f"one_{name}.bin").read_bytes()
        assert (trained / "variants" / f"{name}.json").is_file()
        assert r["label"] == single[name]["label"] and r["bytes"] == single[name]["bytes"]
        assert r["stages"] == single[name]["stages"]
        assert r["quant_gap_bpb"] == single[name]["quant_gap_bpb"]
        assert re.search(rf"^variant {name}\s+{re.escape(r['label'])} total_bytes:{r['bytes']['total']} quant_gap:", out, re.M)
    assert re.search(r"^rtn4: final_quant_roundtrip_exact ", out, re.M)


def test_variant_errors_come_before_any_export(trained, monkeypatch):
    env_for(monkeypatch)
    with pytest.raises(ValueError, match="expected NAME:KNOB=VALUE"):
        parse_variant("rtn:QUANT_METHOD")
    with pytest.raises(ValueError, match="expected NAME:KNOB=VALUE"):
        parse_variant("just_a_name")
    assert parse_variant("plain:") == ("plain", {})
    with pytest.raises(KnobError, match="LQER_RANK"):  # a misspelled knob names the closest one
        requantize_variants(str(trained / "t_model.pre.bin"), [("a", {}), ("b", {"LQER_RANKK": "2"})],
                            str(trained / "bad"))
    assert not (trained / "bad" / "a.bin").exists()
    with pytest.raises(ValueError, match="names must differ"):
        requantize_variants(str(trained / "t_model.pre.bin"), [("a", {}), ("a", {})])


def test_cli_variant_errors_are_one_line(trained):
    from quant.__main__ import main
    ckpt = str(trained / "t_model.pre.bin")
    with pytest.raises(SystemExit, match="expected NAME:KNOB=VALUE"):
        main(["requantize", ckpt, "--variant", "rtn:QUANT_METHOD"])
    with pytest.raises(SystemExit, match="--stages scores one export"):
        main(["requantize", ckpt, "--stages", "--variant", "a:"])
