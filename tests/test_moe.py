"""golf/moe.py on CPU: top-k routing against a per-token reference loop (forward and gradients) for the
grouped, padded and capacity paths; capacity drops and their priority; aux losses; router noise; the
identity start; usage metrics; parameter counts; torch.compile(fullgraph=True)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from golf.moe import (MoEMLP, collect_moe_metrics, expert_metrics, grouped_mm_available, moe_aux_loss,
                      param_counts)

DIM, HIDDEN, E = 16, 24, 4


def _layer(seed=0, **kw) -> MoEMLP:
    torch.manual_seed(seed)
    m = MoEMLP(DIM, HIDDEN, kw.pop("num_experts", E), kw.pop("top_k", 2), **kw)
    with torch.no_grad():  # non-zero outputs and a decisive router, so routing differs between tokens
        m.experts_out.normal_(std=0.2)
        m.router.normal_(std=0.5)
    return m


def _reference(m: MoEMLP, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """Per token and choice, in the layer's priority order (all first choices, then all second choices,
    each in token order); an assignment past `capacity` slots of its expert contributes nothing."""
    gates, top_e, _, _ = m.route(x)
    used = [0] * m.num_experts
    rows = [[] for _ in range(x.size(0))]
    for j in range(m.top_k):
        for t in range(x.size(0)):
            e = int(top_e[t, j])
            if capacity is not None and used[e] >= capacity:
                continue
            used[e] += 1
            h = m.act(m.experts_in[e] @ x[t])
            rows[t].append(gates[t, j] * (m.experts_out[e] @ h))
    return torch.stack([torch.stack(r).sum(0) if r else torch.zeros(m.dim) for r in rows])


def _grads(m: MoEMLP, x: torch.Tensor, fn) -> list[torch.Tensor]:
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    w = torch.linspace(-1, 1, x.numel()).view_as(x)  # a fixed, non-uniform upstream gradient
    (fn(m, x) * w).sum().backward()
    return [x.grad, m.router.grad, m.experts_in.grad, m.experts_out.grad]


@pytest.mark.parametrize("routing,impl,top_k", [
    ("dropless", "grouped", 2), ("dropless", "padded", 2), ("capacity", "auto", 2),
    ("dropless", "grouped", 1), ("dropless", "grouped", 3), ("capacity", "auto", 1)])
def test_matches_reference(routing, impl, top_k):
    m = _layer(routing=routing, impl=impl, top_k=top_k, capacity_factor=float(E))  # factor E: never drops
    m.eval()  # no usage bookkeeping needed here
    x = torch.randn(37, DIM)
    torch.testing.assert_close(m(x), _reference(m, x), atol=1e-5, rtol=1e-5)
    got = _grads(m, x, lambda m, x: m(x))
    ref = _grads(m, x, _reference)
    for name, g, r in zip(("x", "router", "experts_in", "experts_out"), got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=lambda s: f"{name}: {s}")


def test_grouped_path_is_taken_in_eager_cpu():
    x = torch.randn(4, DIM)
    assert grouped_mm_available(x, DIM, HIDDEN)
    m = _layer(routing="dropless")
    m.train()
    m(x)
    assert m.usage_stats[E].item() == 0  # dropless never drops


def test_capacity_drops_by_priority_and_reports_them():
    m = _layer(routing="capacity", capacity_factor=0.5)
    m.train()
    x = torch.randn(40, DIM)
    C = math.ceil(0.5 * 40 * 2 / E)
    assert m.capacity(40) == C == 10
    y = m(x)
    torch.testing.assert_close(y, _reference(m, x, capacity=C), atol=1e-5, rtol=1e-5)
    counts = m.usage_stats[:E]
    expected_drops = (counts - C).clamp_min(0).sum()
    assert expected_drops > 0
    assert m.usage_stats[E] == expected_drops
    metrics = collect_moe_metrics(m)[""]
    assert metrics["dropped_frac"] == pytest.approx(float(expected_drops) / 80)
    assert sum(metrics["tokens_per_expert"]) == 80  # counts are routed assignments, before drops


def test_uniform_router_gives_unit_balance_loss_and_log_e_squared_z_loss():
    # Switch normalisation: E * sum_e f_e * P_e with P_e = 1/E is sum_e f_e = 1, whatever the (tied) choices
    m = MoEMLP(DIM, HIDDEN, E, 2, aux_loss_weight=0.3, z_loss_weight=0.1, router_init_std=0.0)
    m.train()
    m(torch.randn(10, DIM))
    assert m.aux_loss.item() == pytest.approx(0.3 * 1.0 + 0.1 * math.log(E) ** 2, rel=1e-6)
    u = m.pop_usage()
    assert u["balance_loss_sum"].item() == pytest.approx(1.0) and u["z_loss_sum"].item() == pytest.approx(math.log(E) ** 2)


def test_aux_loss_values_on_a_skewed_router():
    m = _layer(aux_loss_weight=1.0, z_loss_weight=0.0)
    m.train()
    x = torch.randn(50, DIM)
    m(x)
    logits = x @ m.router.T
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1).indices.flatten()
    f = torch.bincount(top, minlength=E).float() / top.numel()
    balance = E * (f * probs.mean(0)).sum()
    assert m.aux_loss.item() == pytest.approx(balance.item(), rel=1e-5)
    assert balance.item() > 1.0  # a skewed router pays more than a uniform one
    m.z_loss_weight = 1.0
    m.pop_aux_loss()
    m(x)
    z = torch.logsumexp(logits, -1).square().mean()
    assert m.aux_loss.item() == pytest.approx((balance + z).item(), rel=1e-5)


def test_aux_losses_of_repeated_calls_are_summed_and_popped():
    m = _layer(aux_loss_weight=1.0, z_loss_weight=0.5)
    m.train()
    x1, x2 = torch.randn(8, DIM), torch.randn(8, DIM)
    m(x1)
    a1 = m.aux_loss
    m(x2)  # a looped layer: called twice in one forward
    total = moe_aux_loss(nn.Sequential(m))
    assert total.item() == pytest.approx((a1 + m.aux_loss).item())
    assert moe_aux_loss(m).item() == 0.0 and m.aux_losses == []
    m.eval()
    m(x1)  # evaluation adds neither aux losses nor usage
    assert m.aux_losses == [] and m.usage_stats[-1].item() == 2
    assert moe_aux_loss(nn.Linear(2, 2)) == 0.0


def test_router_noise_only_in_training():
    m = _layer(router_noise=1.0)
    x = torch.randn(64, DIM)
    quiet = _layer(router_noise=0.0)  # same seed: same weights
    m.eval(), quiet.eval()
    torch.testing.assert_close(m(x), quiet(x))
    torch.testing.assert_close(m(x), m(x))
    m.train(), quiet.train()
    torch.testing.assert_close(quiet(x), quiet(x))  # no noise: training forward equals evaluation
    torch.testing.assert_close(quiet(x), m.eval()(x))
    m.train()
    assert not torch.allclose(m(x), m(x))  # noisy gates (and some choices) differ between calls


def test_zero_init_output_is_identity_block_and_still_learns():
    torch.manual_seed(0)
    m = MoEMLP(DIM, HIDDEN, E, 2)
    x = torch.randn(2, 5, DIM, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape and torch.count_nonzero(y) == 0
    y.sum().backward()
    assert m.experts_out.grad.abs().sum() > 0  # the zero projection gets gradient at once


@pytest.mark.parametrize("top_k", [1, 2])
def test_task_gradient_reaches_router_through_gates(top_k):
    m = _layer(top_k=top_k, aux_loss_weight=0.0, z_loss_weight=0.0)
    m.train()
    m(torch.randn(20, DIM)).square().sum().backward()
    assert m.router.grad is not None and m.router.grad.abs().sum() > 0
    assert m.renormalize == (top_k > 1)  # top-1 keeps the raw probability, else its gate would be 1


def test_expert_metrics_on_known_distributions():
    uniform = expert_metrics(torch.full((8,), 5))
    assert uniform["gini"] == pytest.approx(0.0, abs=1e-12) and uniform["entropy"] == pytest.approx(1.0)
    assert uniform["dead_experts"] == 0 and uniform["max_mean_load"] == pytest.approx(1.0)
    assert uniform["used_frac"] == 1.0
    assert uniform["tokens_per_expert"] == [5] * 8
    one = expert_metrics(torch.tensor([0, 0, 12, 0]))
    assert one["gini"] == pytest.approx(3 / 4) and one["entropy"] == pytest.approx(0.0, abs=1e-12)
    assert one["dead_experts"] == 3 and one["max_mean_load"] == pytest.approx(4.0)
    assert one["used_frac"] == 0.25
    half = expert_metrics(torch.tensor([1, 1, 0, 0]))
    assert half["gini"] == pytest.approx(0.5) and half["entropy"] == pytest.approx(0.5)
    empty = expert_metrics(torch.zeros(3))
    assert empty["dead_experts"] == 3 and empty["gini"] == 0.0 and empty["entropy"] == 0.0


def test_collect_metrics_sums_calls_resets_and_handles_mixed_layers():
    model = nn.ModuleDict({"a": _layer(num_experts=4), "b": _layer(num_experts=6, top_k=3)})
    model.train()
    x = torch.randn(10, DIM)
    for _ in range(3):
        model["a"](x), model["b"](x)
    moe_aux_loss(model)
    out = collect_moe_metrics(model)  # single process: the all-reduce is a no-op
    assert set(out) == {"a", "b"}
    assert sum(out["a"]["tokens_per_expert"]) == 3 * 10 * 2 and len(out["a"]["tokens_per_expert"]) == 4
    assert sum(out["b"]["tokens_per_expert"]) == 3 * 10 * 3 and len(out["b"]["tokens_per_expert"]) == 6
    assert out["a"]["balance_loss"] > 0 and out["b"]["z_loss"] > 0
    assert all(torch.count_nonzero(m.usage_stats) == 0 for m in model.values())
    u = model["a"].pop_usage()
    assert u["calls"].item() == 0


def test_param_counts():
    model = nn.Sequential(nn.Linear(DIM, DIM, bias=False), MoEMLP(DIM, HIDDEN, 8, 2))
    total, active = param_counts(model)
    experts = 2 * 8 * DIM * HIDDEN
    assert total == DIM * DIM + 8 * DIM + experts
    assert active == DIM * DIM + 8 * DIM + experts * 2 // 8
    assert param_counts(nn.Linear(3, 2)) == (8, 8)


def test_expert_weights_are_named_stacks():
    names = dict(MoEMLP(DIM, HIDDEN, E, 2).named_parameters())
    assert names["experts_in"].shape == (E, HIDDEN, DIM) and names["experts_out"].shape == (E, DIM, HIDDEN)
    assert names["router"].shape == (E, DIM)
    assert "usage_stats" not in MoEMLP(DIM, HIDDEN, E, 2).state_dict()  # stays out of the artifact


class _Looped(nn.Module):
    """One MoE layer called twice per forward (depth recurrence), aux loss popped outside the graph."""

    def __init__(self, **kw):
        super().__init__()
        self.moe = _layer(**kw)

    def forward(self, x):
        return self.moe(x + self.moe(x)).square().mean()


@pytest.mark.parametrize("routing", ["capacity", "dropless"])
def test_compiles_fullgraph(routing):
    # aot_eager: dynamo's full-graph capture plus AOT autograd (functionalised buffer updates, the
    # backward graph) without Inductor's C++ codegen, which takes ~40 s per graph on a 2-core CPU
    torch._dynamo.reset()
    eager = _Looped(routing=routing, capacity_factor=1.0, aux_loss_weight=0.1, z_loss_weight=0.01)
    compiled_mod = _Looped(routing=routing, capacity_factor=1.0, aux_loss_weight=0.1, z_loss_weight=0.01)
    compiled_mod.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_mod, fullgraph=True, dynamic=False, backend="aot_eager")
    x = torch.randn(2, 12, DIM)
    results = []
    for model, mod in ((eager, eager), (compiled, compiled_mod)):
        mod.train()
        loss = model(x)
        aux = moe_aux_loss(mod)
        (loss + aux).backward()
        results.append((loss, aux, mod.moe.router.grad, mod.moe.experts_in.grad, mod.moe.pop_usage()))
    (l0, a0, r0, w0, u0), (l1, a1, r1, w1, u1) = results
    torch.testing.assert_close(l1, l0)
    torch.testing.assert_close(a1, a0)
    torch.testing.assert_close(r1, r0)
    torch.testing.assert_close(w1, w0)
    assert u1["calls"].item() == 2 and torch.equal(u1["counts"], u0["counts"])
    if routing == "capacity":
        assert u1["dropped"].item() == u0["dropped"].item()


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(DIM, HIDDEN, 4, 5)
    with pytest.raises(ValueError, match="routing"):
        MoEMLP(DIM, HIDDEN, 4, 2, routing="tokens")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEMLP(DIM, HIDDEN, 4, 2, routing="capacity", capacity_factor=0)
    with pytest.raises(ValueError, match=">= 0"):
        MoEMLP(DIM, HIDDEN, 4, 2, router_noise=-1)


def test_autocast_casts_fp32_input_so_the_grouped_path_runs(monkeypatch):
    # the block's RMS norm returns fp32 under autocast; the layer must still reach the bf16 grouped GEMM
    m = _layer(routing="dropless")
    monkeypatch.setattr(MoEMLP, "_padded", lambda *a: pytest.fail("took the padded fallback"))
    x = torch.randn(2, 8, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    torch.testing.assert_close(y.float(), m(x), atol=0.05, rtol=0.05)


def test_grouped_path_survives_an_fp32_activation(monkeypatch):
    # CUDA autocast runs the square of LeakyReLU^2 in fp32 and _grouped_mm casts nothing: the layer
    # must hand bf16 to the second GEMM (CPU autocast keeps bf16, so fp32 is forced here)
    m = _layer(routing="dropless")
    monkeypatch.setattr(MoEMLP, "act", lambda self, h: F.leaky_relu(h.float(), self.slope).square())
    x = torch.randn(2, 8, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
