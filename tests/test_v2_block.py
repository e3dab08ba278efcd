"""Research trainer, block knobs: biases, dropout, weight tying, shape knobs, ARCH_FAMILY presets, and
the refusal of bad or inert knob values."""
import pytest
import torch
import torch.nn.functional as F

import train_gpt_v2 as v2
from golf.config import KnobError, help_text, parse_knobs
from tests.test_record_stack import tokens
from tests.v2_models import SMALL_V2, build, cfg_of, n_params

pytestmark = pytest.mark.usefixtures("one_thread")
PROJECTIONS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")


def test_bias_adds_a_zero_bias_to_every_block_projection():
    plain, biased = build(randomise=False), build(randomise=False, BIAS=1)
    # per block: q 64 + k 32 + v 32 + out 64 + fc 256 + proj 64
    assert n_params(biased) - n_params(plain) == 4 * (64 + 32 + 32 + 64 + 256 + 64)
    names = {n for n, _ in biased.named_parameters() if n.endswith(".bias")}
    assert names == {f"blocks.{i}.{p}.bias" for i in range(4) for p in PROJECTIONS}
    assert all(v2.param_kind(n, None) == "scalar" for n in names)
    a, b = build(), build(BIAS=1)  # same seed: equal weights where both have them
    b.load_state_dict(a.state_dict(), strict=False)
    with torch.no_grad():
        for n, p in b.named_parameters():
            if n.endswith(".bias"):
                p.zero_()
    idx = tokens()
    assert torch.equal(a.logits(idx), b.logits(idx))  # zero biases change nothing
    fc = b.blocks[0].mlp.fc
    with torch.no_grad():
        fc.bias.normal_()
    x = torch.randn(3, 64)
    torch.testing.assert_close(fc(x), x @ fc.weight.t() + fc.bias)
    assert not torch.allclose(b.logits(idx), a.logits(idx))


def test_dropout_acts_in_training_only():
    a, b = build(), build(DROPOUT=0.5)
    assert n_params(a) == n_params(b)
    idx = tokens()
    a.eval(), b.eval()
    assert torch.equal(a.logits(idx), b.logits(idx))
    b.train()
    emb = b.tok_emb(idx)
    torch.manual_seed(3)
    dropped = b.embed(idx)
    kept = dropped != 0
    assert 0.35 < kept.float().mean() < 0.65  # half the entries, the rest scaled by 1 / (1 - p)
    torch.testing.assert_close(dropped[kept], 2 * emb[kept])
    torch.manual_seed(4)
    assert not torch.allclose(b.logits(idx), a.logits(idx))
    assert all(blk.drop.p == 0.5 for blk in b.blocks)  # and on every branch output


def test_untied_head_is_a_separate_zero_initialised_embedding():
    tied, untied = build(randomise=False), build(randomise=False, TIE_EMBEDDINGS=0)
    assert n_params(untied) - n_params(tied) == 64 * 64  # vocab x dim
    assert untied.output_weight() is untied.lm_head.weight and tied.output_weight() is tied.tok_emb.weight
    assert torch.equal(untied.logits(tokens()), torch.zeros(2, 40, 64))
    assert v2.param_kind("lm_head.weight", untied.lm_head.weight) == "embed"
    m = build(TIE_EMBEDDINGS=0)
    with torch.no_grad():
        m.tok_emb.weight.mul_(2)  # the embedding no longer is the head
    x = m.hidden(tokens())
    torch.testing.assert_close(m.head(x), 30 * torch.tanh(x @ m.lm_head.weight.t() / 30))


@pytest.mark.parametrize("dim,heads,kv_heads,mult", [(64, 4, 2, 4), (64, 4, 4, 4), (64, 8, 2, 2), (96, 4, 1, 3)])
def test_shape_knobs_give_the_block_parameter_count(dim, heads, kv_heads, mult):
    m = build(randomise=False, MODEL_DIM=dim, NUM_HEADS=heads, NUM_KV_HEADS=kv_heads, MLP_MULT=mult, NUM_LAYERS=3,
              LOOP_END=1, PARALLEL_START_LAYER=-1, ROPE_DIMS=dim // heads)
    kv, hidden = kv_heads * dim // heads, int(mult * dim)
    per_block = 2 * dim * dim + 2 * dim * kv + 2 * dim * hidden + heads + heads * 12 + 4 * dim
    assert len(m.blocks) == 3
    assert all(n_params(b) == per_block for b in m.blocks)


def test_arch_families_resolve_to_their_presets():
    gpt2, llama, record = cfg_of(ARCH_FAMILY="gpt2"), cfg_of(ARCH_FAMILY="llama"), cfg_of()
    assert (gpt2.norm_type, gpt2.mlp_activation, gpt2.bias, gpt2.pos_encoding, gpt2.tie_embeddings) == \
        ("layer", "gelu", True, "learned", True)
    assert (llama.norm_type, llama.mlp_activation, llama.bias, llama.pos_encoding, llama.tie_embeddings) == \
        ("rms", "swiglu", False, "rope", False)
    assert llama.rope_dims == 16  # every dim of a 64 / 4 head
    assert gpt2.sources["NORM_TYPE"] == "ARCH_FAMILY=gpt2"
    assert record.as_dict() == parse_knobs(v2.KNOBS, SMALL_V2).as_dict()
    explicit = cfg_of(ARCH_FAMILY="gpt2", NORM_TYPE="rms", BIAS=0)  # explicit knobs win
    assert (explicit.norm_type, explicit.bias, explicit.mlp_activation) == ("rms", False, "gelu")
    assert cfg_of(ARCH_FAMILY="llama", MODEL_DIM=128).rope_dims == 32
    assert v2.resolve(gpt2).as_dict() == gpt2.as_dict()  # idempotent
    m = build(randomise=False, ARCH_FAMILY="gpt2")
    assert hasattr(m, "pos_emb") and m.blocks[0].attn.c_q.bias is not None
    assert m.blocks[0].mlp.act is F.gelu and isinstance(m.blocks[0].attn.rotary, torch.nn.Identity)
    m = build(randomise=False, ARCH_FAMILY="llama")
    assert isinstance(m.blocks[0].mlp, v2.GatedMLP) and hasattr(m, "lm_head") and m.blocks[0].attn.rotary.dims == 16


@pytest.mark.parametrize("env,match", [
    ({"MOE_TOP_K": 2}, "MOE_TOP_K is set but does nothing with MOE_EXPERTS=0"),
    ({"SOM_TEMPERATURE": 0.2, "MOE_EXPERTS": 4}, "SOM_TEMPERATURE .* MOE_ROUTER=learned"),
    ({"MOE_ROUTER_NOISE": 0.1, "MOE_EXPERTS": 4, "MOE_ROUTER": "som"}, "MOE_ROUTER_NOISE .* MOE_ROUTER=som"),
    ({"MOE_CAPACITY_FACTOR": 2, "MOE_EXPERTS": 4}, "MOE_CAPACITY_FACTOR .* MOE_ROUTING=dropless"),
    ({"ROPE_DIMS": 8, "POS_ENCODING": "alibi"}, "ROPE_DIMS .* POS_ENCODING=alibi"),
    ({"ATTN_GATE_TYPE": "channel", "SPARSE_ATTN_GATE_ENABLED": 0}, "ATTN_GATE_TYPE .* SPARSE_ATTN_GATE_ENABLED=0"),
])
def test_knobs_that_would_do_nothing_are_refused(env, match):
    with pytest.raises(KnobError, match=match):
        cfg_of(**env)


@pytest.mark.parametrize("env,match", [
    ({"ARCH_FAMILY": "gpt3"}, "ARCH_FAMILY='gpt3': expected one of record, gpt2, llama"),
    ({"POS_ENCODING": "rotary"}, "POS_ENCODING='rotary': expected one of rope, alibi, learned, none"),
    ({"ATTN_GATE_TYPE": "global"}, "ATTN_GATE_TYPE='global'"),
    ({"MOE_ROUTER": "hash", "MOE_EXPERTS": 4}, "MOE_ROUTER='hash'"),
    ({"MOE_ROUTING": "tokens", "MOE_EXPERTS": 4}, "MOE_ROUTING='tokens'"),
    ({"DROPOUT": 1}, "DROPOUT=1.0: expected a probability"),
    ({"ATTN_WINDOW": -1}, "ATTN_WINDOW=-1: expected >= 0"),
    ({"MOE_EXPERTS": 4, "MOE_LAYERS": "2,9"}, "MOE_LAYERS='2,9': expected .* within 0..3"),
    ({"MOE_EXPERTS": 4, "MOE_LAYERS": "x"}, "MOE_LAYERS='x'"),
    ({"MOE_EXPERTS": 4, "MOE_TOP_K": 5}, "MOE_TOP_K=5: expected 1..MOE_EXPERTS=4"),
    ({"MOE_EXPERTS": 4, "MOE_ROUTING": "capacity", "MOE_CAPACITY_FACTOR": 0}, "MOE_CAPACITY_FACTOR=0"),
    ({"MOE_EXPERTS": 4, "MOE_ROUTER": "som", "SOM_TEMPERATURE": 0}, "SOM_TEMPERATURE=0.0 must be > 0"),
    ({"MOE_EXPERTS": 4, "MOE_ROUTER": "som", "SOM_DECAY_COEF": 2}, "SOM_DECAY_COEF=2.0 must be in"),
    ({"MOE_EXPERTS": 4, "MLP_ACTIVATION": "swiglu"}, "MLP_ACTIVATION=swiglu with MOE_EXPERTS>0"),
    ({"MOE_EXPERTS": 4, "TTT_LORA_TARGETS": "k,fc"}, "TTT_LORA_TARGETS='k,fc': fc and proj"),
    ({"BIAS": 1, "FUSED_MLP": 1}, "BIAS=1 with FUSED_MLP=1"),
])
def test_bad_values_are_refused_naming_the_knob(env, match):
    with pytest.raises(KnobError, match=match):
        build(randomise=False, **env)


def test_moe_drops_the_mlp_ttt_targets_it_lacks():
    cfg = cfg_of(MOE_EXPERTS=4)
    assert cfg.ttt_lora_targets == "k,o,head" and "MOE_EXPERTS" in cfg.sources["TTT_LORA_TARGETS"]
    assert cfg_of().ttt_lora_targets == "k,o,fc,proj,head"


def test_help_lists_every_v2_knob_once():
    text = help_text(v2.KNOBS, "t")
    for knob in v2.V2_KNOBS:
        assert text.count(f"  {knob.name} ") == 1, knob.name
