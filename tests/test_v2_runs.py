"""The research trainer for real on CPU with experts: the log and the JSON summary carry the expert
metrics and parameter counts, and two gloo ranks train an MoE model exactly like one rank that
accumulates both micro-batches."""
import re

import torch

from quant.serialize import deserialize
from tests.trainer_runs import run_trainer, summary, train_losses

MOE = dict(MOE_EXPERTS="4", MOE_TOP_K="2", ITERATIONS="3", VAL_LOSS_EVERY="0", TRAIN_BATCH_TOKENS="2048",
           GRAD_CLIP_NORM="0")  # clipping off: as tests/test_train.py's rank test, for bit-exact weights
LAYERS = ["blocks.0.mlp", "blocks.1.mlp"]


def expert_report(tmp):
    s = summary(tmp)
    assert [r["step"] for r in s["model_reports"]] == [s["steps"]]
    return s, s["model_reports"][-1]["experts"]


def test_moe_run_reports_experts_and_two_ranks_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_trainer(one, script="train_gpt_v2.py", GRAD_ACCUM_STEPS="2", **MOE)
    run_trainer(two, nproc=2, script="train_gpt_v2.py", GRAD_ACCUM_STEPS="1", **MOE)
    s, layers = expert_report(one)
    assert sorted(layers) == LAYERS
    for m in layers.values():
        assert sum(m["tokens_per_expert"]) == 3 * 2048 * 2  # steps x tokens x top_k
        assert {"gini", "entropy", "dead_experts", "dropped_frac", "balance_loss", "z_loss"} <= m.keys()
    info = s["model_info"]
    assert info["params_total"] == s["model_params"] > info["params_active"]
    log = (one / "t.txt").read_text()
    assert re.search(r"^model_info params_total:\d+ params_active:\d+$", log, re.M)
    assert re.search(r"^experts step:3 layer:blocks\.1\.mlp gini:\S+ entropy:\S+ dead:\d+ used_frac:[\d.]+ .*tokens:[\d,]+$", log, re.M)
    assert re.search(r"^TTT_LORA_TARGETS='k,o,head' \(MOE_EXPERTS>0", log, re.M)
    # two ranks: same losses, same weights, and the usage summed over ranks is the one-rank usage
    assert train_losses(one) == train_losses(two) and len(train_losses(one)) == 3
    assert expert_report(two)[1] == layers
    w1 = deserialize((one / "t_model.pre.bin").read_bytes())[0]
    w2 = deserialize((two / "t_model.pre.bin").read_bytes())[0]
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)


def test_som_run_reports_usage_and_keeps_frozen_experts_out_of_the_checkpoint(tmp_path):
    run_trainer(tmp_path, script="train_gpt_v2.py", MOE_EXPERTS="8", MOE_TOP_K="2", MOE_ROUTER="som",
                SOM_KEY_DIM="16", ITERATIONS="3", VAL_LOSS_EVERY="0")
    s, layers = expert_report(tmp_path)
    assert sorted(layers) == LAYERS
    for m in layers.values():
        assert len(m["tokens_per_expert"]) == 8 and sum(m["tokens_per_expert"]) == 3 * 1024 * 2
    info = s["model_info"]
    assert info["params_frozen"] == 2 * 2 * 8 * 64 * 256  # layers x (w1, w2) x experts x dim x hidden
    assert info["params_trainable"] == s["model_params"] and info["params_gradient_free"] == 2 * 8 * 16
    weights = deserialize((tmp_path / "t_model.pre.bin").read_bytes())[0]
    assert "blocks.0.mlp.keys" in weights and not any(k.endswith((".w1", ".w2")) for k in weights)
    assert s["bytes"]["model"] < info["params_frozen"]  # the artifact cannot hold them
