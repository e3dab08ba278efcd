"""The research trainer: defaults are the record stack bit for bit; each knob does what it says."""
import pytest
import torch

import train_gpt as tg
import train_gpt_v2 as v2
from golf.config import KnobError, parse_knobs
from tests.test_record_stack import SMALL, tokens


def build(module, seed=0, **overrides):
    cfg = parse_knobs(module.KNOBS, {**SMALL, **{k: str(v) for k, v in overrides.items()}})
    torch.manual_seed(seed)
    model = (v2.GPTv2 if module is v2 else tg.GPT)(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("looping", [False, True])
def test_defaults_give_the_record_models_logits_bit_for_bit(looping):
    idx = tokens(bos_at=((0, 17),))
    a, b = build(tg), build(v2)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    for m in (a, b):
        m.looping = looping
    assert torch.equal(a.logits(idx), b.logits(idx))
    y = torch.roll(idx, -1, 1)
    assert torch.equal(a(y, idx), b(y, idx))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_swiglu_is_parameter_matched_within_one_percent():
    dense = n_params(build(v2).blocks[0].mlp)
    gated = build(v2, MLP_ACTIVATION="swiglu").blocks[0].mlp
    assert isinstance(gated, v2.GatedMLP)
    assert abs(n_params(gated) / dense - 1) < 0.01
    cfg = {"MODEL_DIM": 512, "MLP_MULT": 4}  # the record's shape too
    assert abs(3 * 512 * v2.swiglu_hidden(512, 4) / (2 * 512 * 2048) - 1) < 0.01, cfg


@pytest.mark.parametrize("act,fn", [("relu2", lambda h: torch.relu(h) ** 2),
                                     ("gelu", torch.nn.functional.gelu)])
def test_activation_switch(act, fn):
    m = build(v2, MLP_ACTIVATION=act).blocks[0].mlp
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(m(x), torch.nn.functional.linear(fn(m.fc(x)), m.proj.weight))
    assert not torch.allclose(m(x), build(v2).blocks[0].mlp(x))


def test_layer_norm_switch_centres_and_scales():
    model = build(v2, NORM_TYPE="layer")
    x = torch.randn(3, 7, 64) * 5 + 2
    y = model.blocks[1].norm(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(3, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(3, 7), atol=1e-3, rtol=0)
    assert model.norm is model.blocks[0].norm
    idx = tokens()
    assert not torch.allclose(model.logits(idx), build(v2).logits(idx))


@pytest.mark.parametrize("knob,value", [("MLP_ACTIVATION", "swish"), ("NORM_TYPE", "batch")])
def test_unknown_choices_are_refused(knob, value):
    with pytest.raises(KnobError, match=knob):
        build(v2, **{knob: value})


def test_swiglu_gate_is_a_muon_matrix():
    model = build(v2, MLP_ACTIVATION="swiglu")
    kinds = {n: v2.param_kind(n, p) for n, p in model.named_parameters()}
    assert kinds["blocks.0.mlp.gate.weight"] == kinds["blocks.0.mlp.fc.weight"] == "matrix"
