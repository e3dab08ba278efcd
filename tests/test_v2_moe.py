"""Research trainer, mixture of experts: layers and widths, aux losses in the training loss, Muon on
expert stacks, usage reports, SOM key updates (and across ranks), frozen experts kept out of the
artifact, torch.compile."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import train_gpt as tg
import train_gpt_v2 as v2
from golf.moe import MoEMLP
from golf.optim import build_optimizer
from golf.som_router import SOMMoE
from quant import export
from quant.serialize import deserialize, serialize
from tests.gloo_ranks import free_port, gloo_group
from tests.test_optim import _hp
from tests.test_record_stack import tokens
from tests.v2_models import build, cfg_of, n_params

pytestmark = pytest.mark.usefixtures("one_thread")
SOM = dict(MOE_EXPERTS=4, MOE_TOP_K=2, MOE_ROUTER="som", SOM_KEY_DIM=8)


def train_forward(m, idx=None):
    m.train()
    idx = tokens(bos_at=((0, 17),)) if idx is None else idx
    loss = m(idx, torch.roll(idx, -1, 1))
    loss.backward()
    return loss


def test_moe_layers_widths_and_parameter_counts():
    dense = build(randomise=False)
    m = build(randomise=False, MOE_EXPERTS=4, MOE_LAYERS="1,3", MOE_EXPERT_MULT=1)
    assert [isinstance(b.mlp, MoEMLP) for b in m.blocks] == [False, True, False, True]
    moe = m.blocks[1].mlp
    assert (moe.num_experts, moe.top_k, moe.hidden, moe.routing) == (4, 2, 64, "dropless")
    # each MoE layer: 4 experts of 64 -> 64 -> 64 and a router, instead of the dense 64 -> 256 -> 64
    assert n_params(m) - n_params(dense) == 2 * (4 * 2 * 64 * 64 + 4 * 64 - 2 * 64 * 256)
    info = m.describe()
    assert info["params_total"] == n_params(m)
    assert info["params_total"] - info["params_active"] == 2 * 2 * 2 * 64 * 64  # half of each layer's experts
    assert build(randomise=False, MOE_EXPERTS=4).blocks[0].mlp.hidden == 256  # default: MLP_MULT wide
    assert build(randomise=False).describe() == {}


@pytest.mark.parametrize("act,slope,fn", [("leaky_relu2", 0.5, None), ("relu2", 0.0, None), ("gelu", 0.5, F.gelu)])
def test_experts_use_the_blocks_activation(act, slope, fn):
    moe = build(randomise=False, MOE_EXPERTS=4, MLP_ACTIVATION=act).blocks[0].mlp
    assert moe.activation is fn and (fn is not None or moe.slope == slope)


def test_aux_losses_add_gradient_but_not_value_to_the_training_loss():
    a, b = build(MOE_EXPERTS=4, MOE_AUX_LOSS_WEIGHT=0), build(MOE_EXPERTS=4, MOE_AUX_LOSS_WEIGHT=0.5, MOE_Z_LOSS_WEIGHT=0.1)
    idx = tokens()
    la, lb = train_forward(a, idx), train_forward(b, idx)
    assert all(not m.aux_losses for m in b.moe)  # popped inside the forward that made them
    ce = F.cross_entropy(b.logits(idx).flatten(0, 1), torch.roll(idx, -1, 1).flatten())
    v2.v2_experts.pop_aux_loss(b.moe)
    assert la.item() == lb.item() and lb.item() == pytest.approx(ce.item(), rel=1e-5)
    assert not torch.allclose(a.blocks[0].mlp.router.grad, b.blocks[0].mlp.router.grad)
    # and the difference is exactly the aux losses' gradient
    aux = build(MOE_EXPERTS=4, MOE_AUX_LOSS_WEIGHT=0.5, MOE_Z_LOSS_WEIGHT=0.1)
    aux.train()
    aux.logits(idx)
    sum(m.pop_aux_loss() for m in aux.moe).backward()
    torch.testing.assert_close(b.blocks[2].mlp.router.grad - a.blocks[2].mlp.router.grad,
                               aux.blocks[2].mlp.router.grad, atol=1e-6, rtol=1e-4)


def test_muon_updates_each_expert_like_a_separate_matrix():
    g = torch.Generator().manual_seed(0)
    stack = nn.Parameter(0.1 * torch.randn(3, 16, 32, generator=g))
    single = {f"m{i}": nn.Parameter(stack.detach()[i].clone()) for i in range(3)}
    other = torch.randn(16, 32, generator=g)  # a 2-D matrix of the same shape shares the stack's group
    a = build_optimizer({"stack": stack, "w": nn.Parameter(other.clone())}, lambda n, p: "matrix", _hp())
    b = build_optimizer({**single, "w": nn.Parameter(other.clone())}, lambda n, p: "matrix", _hp())
    for step in range(3):
        grads = torch.randn(3, 16, 32, generator=g)
        stack.grad = grads.clone()
        for i, p in enumerate(single.values()):
            p.grad = grads[i].clone()
        a.step(1.0, 0.95)
        b.step(1.0, 0.95)
    for i, p in enumerate(single.values()):
        assert torch.equal(stack.detach()[i], p.detach())
    assert "muon[4x16x32]" in a.describe() and "muon[4x16x32]" in b.describe()
    with pytest.raises(ValueError, match="Muon needs 2-D"):
        build_optimizer({"x": nn.Parameter(torch.zeros(2, 2, 2, 2))}, lambda n, p: "matrix", _hp())


def test_model_parameters_are_grouped_for_the_optimizer():
    m = build(randomise=False, MOE_EXPERTS=4, MOE_LAYERS="0")
    kinds = {n: v2.param_kind(n, p) for n, p in m.named_parameters()}
    assert kinds["blocks.0.mlp.experts_in"] == kinds["blocks.0.mlp.experts_out"] == "matrix"
    assert kinds["blocks.0.mlp.router"] == "scalar"
    opt = build_optimizer(dict(m.named_parameters()), v2.param_kind, m.cfg)
    assert "7x256x64 7x64x256" in opt.describe()  # layer 0's 4 experts share the 3 dense layers' groups
    som = build(randomise=False, SOM_QUERY="mlp", **SOM)
    kinds = {n: v2.param_kind(n, p) for n, p in som.named_parameters()}
    assert kinds["blocks.0.mlp.query.0.weight"] == kinds["blocks.0.mlp.query.2.weight"] == "matrix"
    assert kinds["blocks.0.mlp.gain"] == "scalar"


@pytest.mark.parametrize("router", ["learned", "som"])
def test_usage_report_counts_training_assignments_and_resets(router):
    m = build(MOE_EXPERTS=4, **({"MOE_ROUTER": "som", "SOM_KEY_DIM": 8} if router == "som" else {}))
    train_forward(m)
    m.eval()
    m.logits(tokens())  # evaluation is not counted
    lines = []
    rep = m.report(7, lines.append)["experts"]
    assert sorted(rep) == [f"blocks.{i}.mlp" for i in range(4)]
    for layer in rep.values():
        assert sum(layer["tokens_per_expert"]) == 2 * 40 * 2  # tokens x top_k
        assert 0 <= layer["gini"] < 0.75 and 0 < layer["entropy"] <= 1 and layer["dead_experts"] >= 0
        assert ("balance_loss" in layer) == (router == "learned")
    assert len(lines) == 4 and lines[0].startswith("experts step:7 layer:blocks.0.mlp gini:")
    assert m.report(8, lines.append) == {} and len(lines) == 4  # nothing since the last report


def test_loading_weights_clears_usage():
    m = build(**SOM)
    train_forward(m)
    m.load_state_dict(m.state_dict())  # what the trainer does after compile priming
    assert m.report(0, lambda line: None) == {}
    assert all(b.mlp._saved is None for b in m.blocks)


def test_som_keys_move_after_each_optimizer_step_only():
    m = build(SOM_ATTRACTION_LR=0.5, SOM_DECAY=0, **SOM)
    keys = [b.mlp.keys.clone() for b in m.blocks]
    m.after_step()  # nothing saved yet
    assert all(torch.equal(b.mlp.keys, k) for b, k in zip(m.blocks, keys))
    train_forward(m)
    m.after_step()
    assert all(not torch.equal(b.mlp.keys, k) for b, k in zip(m.blocks, keys))
    assert all(b.mlp.num_updates == 1 for b in m.blocks)


def test_som_frozen_experts_stay_out_of_the_artifact_and_regenerate_on_load():
    m = build(**SOM)
    frozen = sum(b.mlp.w1.numel() + b.mlp.w2.numel() for b in m.blocks)
    assert m.describe()["params_frozen"] == frozen
    state = {k: v.detach().float() for k, v in m.state_dict().items()}
    assert not any(k.endswith((".w1", ".w2")) for k in state) and "blocks.0.mlp.keys" in state
    pre = deserialize(serialize(state))[0]  # the pre.bin checkpoint holds the same tensors
    assert pre.keys() == state.keys()
    cfg = cfg_of(QUANT_METHOD="rtn", FIT_BUDGET=0, **SOM)
    blob, _, _ = tg.quantize_and_pack(cfg, state, None, 0, lambda line: None)
    loaded = export.unpack(blob)
    assert loaded.keys() == state.keys()
    assert len(blob) < frozen  # far below even one byte per frozen value
    # a model built elsewhere (other torch seed) regenerates the experts from SOM_SEED + layer
    a, b = build(seed=5, randomise=False, **SOM), build(seed=9, randomise=False, **SOM)
    assert all(torch.equal(x.mlp.w1, y.mlp.w1) for x, y in zip(a.blocks, b.blocks))
    assert not torch.equal(a.blocks[0].mlp.w1, a.blocks[1].mlp.w1)  # each layer its own seed
    for model in (a, b, m):
        model.load_state_dict(loaded)
        model.eval()
    idx = tokens()
    assert torch.equal(a.logits(idx), b.logits(idx)) and torch.equal(a.logits(idx), m.logits(idx))


@pytest.mark.parametrize("env", [dict(MOE_EXPERTS=4, MOE_ROUTING="capacity", MOE_Z_LOSS_WEIGHT=0.01),
                                 dict(MOE_EXPERTS=4), SOM], ids=["capacity", "dropless", "som"])
def test_compiled_model_matches_eager(env):
    # aot_eager: dynamo's full graph and AOT autograd without Inductor's slow CPU codegen
    torch._dynamo.reset()
    shape = dict(NUM_LAYERS=2, LOOP_START=0, LOOP_END=0, PARALLEL_START_LAYER=-1, XSA_LAST_N=2)
    eager, module = build(**env, **shape), build(**env, **shape)
    compiled = torch.compile(module, fullgraph=True, dynamic=False, backend="aot_eager")
    idx = tokens(bos_at=((0, 17),))
    results = []
    for model, mod in ((eager, eager), (compiled, module)):
        loss = model(idx, torch.roll(idx, -1, 1), docs=mod.doc_info(idx))
        loss.backward()
        mod.after_step()
        results.append((loss.detach(), {n: p.grad for n, p in mod.named_parameters()},
                        [b.mlp.keys.clone() for b in mod.blocks if isinstance(b.mlp, SOMMoE)],
                        mod.report(0, lambda line: None)))
    (l0, g0, k0, r0), (l1, g1, k1, r1) = results
    torch.testing.assert_close(l1, l0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5)
    for a, b in zip(k0, k1):
        torch.testing.assert_close(a, b)
    assert r0 == r1


# ----------------------------------------------------------------------------- SOM keys over ranks
def _som_rank_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    with gloo_group(rank, 2, port):
        m = _som_layer()
        q, idx = _saved_tokens()
        m._saved = (q[rank * 16:(rank + 1) * 16], idx[rank * 16:(rank + 1) * 16])
        m.update_keys()
        torch.save(m.keys, f"{out_dir}/rank{rank}.pt")


def _som_layer() -> SOMMoE:
    s = v2.v2_experts.som_settings(cfg_of(**SOM, SOM_CO_PULL=1, SOM_DECAY_WARMUP=0))
    return SOMMoE(64, s, seed=3)


def _saved_tokens():
    g = torch.Generator().manual_seed(2)
    return F.normalize(torch.randn(32, 8, generator=g), dim=-1), torch.randint(0, 4, (32, 2), generator=g)


def test_som_key_updates_over_two_ranks_equal_one_process_with_all_tokens(tmp_path):
    """Every rule on (attraction, co-pull, decay): each rank saw half the tokens; both end with the keys
    one process gets from all of them, so the ranks' keys never drift apart."""
    mp.spawn(_som_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    m = _som_layer()
    m._saved = _saved_tokens()
    before = m.keys.clone()
    m.update_keys()
    assert not torch.equal(m.keys, before)
    for r in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{r}.pt"), m.keys)
