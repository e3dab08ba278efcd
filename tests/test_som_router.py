"""Self-organizing MoE router (golf/som_router.py) on CPU: frozen experts, routing, key rules, training."""
import math

import pytest
import torch
import torch.nn.functional as F

from golf.som_router import (SOMMoE, SOMSettings, param_report, update_all_keys,
                             usage_metrics, usage_report)

DIM = 32
ALL_OFF = dict(attraction=False, co_pull=False, decay=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def small(**kw) -> SOMSettings:
    base = dict(num_experts=8, top_k=2, expert_hidden=16, key_dim=8, seed=7, **ALL_OFF)
    return SOMSettings(**{**base, **kw})


def make(seed_torch=0, **kw) -> SOMMoE:
    torch.manual_seed(seed_torch)  # the query network's init; experts and keys come from settings.seed
    m = SOMMoE(DIM, small(**kw))
    with torch.no_grad():
        m.gain.fill_(0.7)
    return m


def tokens(n=64, seed=1) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


def train_forward(m: SOMMoE, x=None):
    m.train()
    with torch.no_grad():
        m(tokens() if x is None else x)
    return m._saved


def inject(m: SOMMoE, idx, q=None):
    """Stand in for a training forward: the queries and choices update_keys reads."""
    idx = torch.tensor(idx)
    if q is None:
        q = F.normalize(torch.ones(idx.shape[0], m.settings.key_dim), dim=-1)
    m._saved = (q, idx)


def angle(a, b):
    return torch.arccos((F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).clamp(-1, 1))


# ---------------------------------------------------------------- frozen experts and state dict
@pytest.mark.parametrize("init", ["normal", "orthogonal", "uniform"])
def test_experts_regenerate_from_seed_and_are_not_stored(init):
    a, b = make(0, expert_init=init), make(5, expert_init=init)
    assert torch.equal(a.w1, b.w1) and torch.equal(a.w2, b.w2)
    other = SOMMoE(DIM, small(expert_init=init), seed=8)
    assert not torch.equal(a.w1, other.w1)
    sd = a.state_dict()
    assert "w1" not in sd and "w2" not in sd and "usage_ema" not in sd and "usage_counts" not in sd
    assert {"keys", "gain", "query.weight"} <= set(sd)
    # every init gives weights of variance about 1 / fan_in
    assert a.w1.var().item() == pytest.approx(1 / DIM, rel=0.15)
    assert a.w2.var().item() == pytest.approx(1 / a.hidden, rel=0.15)


def test_orthogonal_experts_are_orthogonal():
    m = make(expert_init="orthogonal")  # w1 [E, 32, 16]: orthonormal columns
    gram = m.w1.transpose(-2, -1) @ m.w1
    assert torch.allclose(gram, torch.eye(16).expand_as(gram), atol=1e-5)


@pytest.mark.parametrize("query", ["linear", "mlp"])
def test_loaded_state_dict_gives_identical_outputs(query):
    a = make(0, query=query, attraction=True, attraction_lr=0.5)
    train_forward(a)
    a.update_keys()  # keys differ from their initial values now
    b = make(3, query=query)  # other query init, same seed: same experts
    assert not torch.equal(a.keys, b.keys)
    b.load_state_dict(a.state_dict())
    x = tokens(seed=2)
    for mode in (True, False):
        a.train(mode), b.train(mode)
        assert torch.equal(a(x), b(x))


# ---------------------------------------------------------------- routing and expert compute
def naive(m: SOMMoE, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per token: cosine with every key, the top k by sorting, softmax, experts run one by one."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        q = F.normalize(m.query(x[t]), dim=0)
        cos = torch.stack([q @ F.normalize(key, dim=0) for key in m.keys])
        chosen = sorted(range(len(cos)), key=lambda e: -cos[e].item())[:m.settings.top_k]
        w = torch.softmax(cos[chosen] / temperature, dim=0)
        for wj, e in zip(w, chosen):
            h = F.leaky_relu(x[t] @ m.w1[e], 0.5).square()
            out[t] += wj * (h @ m.w2[e])
    return m.gain * out


@pytest.mark.parametrize("compute", ["dense", "grouped"])
def test_routing_and_output_match_naive_reference(compute):
    if compute == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    m = make(compute=compute, top_k=3)
    x = tokens(40)
    idx, w, q = m.route(x)
    cos = F.normalize(m.query(x), dim=-1) @ m.keys.t()
    ref = cos.argsort(dim=-1, descending=True)[:, :3]
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)
    assert torch.allclose(w.sum(-1), torch.ones(40))
    for mode, temp in ((True, 0.1), (False, 0.05)):
        m.train(mode)
        with torch.no_grad():
            assert torch.allclose(m(x), naive(m, x, temp), atol=1e-4, rtol=1e-4)


def test_eval_temperature_is_sharper():
    m = make(top_k=4)
    x = tokens(100)
    m.train()
    _, w_train, _ = m.route(x)
    m.eval()
    _, w_eval, _ = m.route(x)
    assert (w_eval.max(-1).values >= w_train.max(-1).values - 1e-6).all()
    assert w_eval.max(-1).values.mean() > w_train.max(-1).values.mean() + 0.01


def test_leading_dims_and_bf16():
    m = make()
    x = tokens(24).view(2, 12, DIM)
    assert m(x).shape == (2, 12, DIM)
    assert m(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm missing")
def test_grouped_and_dense_agree_under_bf16_autocast():
    dense, grouped = make(compute="dense"), make(compute="grouped")
    x = tokens(48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = dense(x), grouped(x)
    assert a.dtype == b.dtype == torch.bfloat16
    assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)



@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm missing")
def test_grouped_survives_an_fp32_activation(monkeypatch):
    # CUDA autocast runs the square in fp32 (CPU autocast does not): the second GEMM must get bf16
    grouped = make(compute="grouped")
    monkeypatch.setattr(grouped, "_act", lambda h: torch.nn.functional.leaky_relu(h.float(), 0.5).square())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert grouped(tokens(48)).dtype == torch.bfloat16

@pytest.mark.parametrize("query", ["linear", "mlp"])
def test_gradients_reach_query_network_only(query):
    m = make(query=query)
    x = tokens().requires_grad_()
    m.train()
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0  # the residual stream upstream still trains
    for name in ("w1", "w2", "keys"):
        buf = getattr(m, name)
        assert not buf.requires_grad and buf.grad is None
    assert all(n == "gain" or n.startswith("query.") for n, _ in m.named_parameters())


def test_gain_starts_at_zero():
    m = SOMMoE(DIM, small())
    assert torch.equal(m(tokens()), torch.zeros(64, DIM))


# ---------------------------------------------------------------- key update rules
def test_all_rules_off_keys_bit_identical():
    m = make()
    before = m.keys.clone()
    for _ in range(3):
        train_forward(m)
        m.update_keys()
    assert torch.equal(m.keys, before)


def test_update_without_training_forward_is_a_no_op():
    m = make(attraction=True)
    before = m.keys.clone()
    m.update_keys()
    m.eval()
    m(tokens())  # eval forwards save nothing
    m.update_keys()
    assert torch.equal(m.keys, before) and m.num_updates == 0


def _mean_queries(q, idx, E):
    chose = torch.zeros(q.shape[0], E).scatter_(1, idx, 1.0)
    return chose.t() @ q / chose.sum(0).clamp_min(1)[:, None], chose.sum(0)


def test_attraction_moves_keys_toward_their_mean_query():
    m = make(attraction=True, attraction_lr=0.3, inertia=0.0)
    before = m.keys.clone()
    q, idx = train_forward(m)
    mean_q, count = _mean_queries(q, idx, 8)
    m.update_keys()
    used = count > 0
    assert used.sum() >= 2
    assert (angle(m.keys[used], mean_q[used]) < angle(before[used], mean_q[used]) - 1e-4).all()
    expect = F.normalize(before + 0.3 * (mean_q - before), dim=-1)
    assert torch.allclose(m.keys[used], expect[used], atol=1e-6)
    assert torch.equal(m.keys[~used], before[~used])
    # keys nobody chose stay put
    inject(m, [[0, 1]] * 4)
    before = m.keys.clone()
    m.update_keys()
    assert torch.equal(m.keys[2:], before[2:]) and not torch.equal(m.keys[:2], before[:2])


def test_inertia_shrinks_the_step_of_heavily_used_keys():
    moved = {}
    for inertia in (0.0, 4.0):
        m = make(attraction=True, attraction_lr=0.3, inertia=inertia)
        m.usage_ema.copy_(torch.linspace(0.0, 3.0, 8))  # experts 0..7 from unused to heavily used
        before = m.keys.clone()
        q, idx = train_forward(m)
        mean_q, count = _mean_queries(q, idx, 8)
        ema = 0.99 * m.usage_ema + 0.01 * count * 8 / (q.shape[0] * 2)  # the rule uses the updated EMA
        m.update_keys()
        step = 0.3 / (1 + inertia * ema)
        expect = F.normalize(before + step[:, None] * (mean_q - before), dim=-1)
        assert torch.allclose(m.keys[count > 0], expect[count > 0], atol=1e-6)
        moved[inertia] = angle(m.keys, before)
    used = count > 0
    assert (moved[4.0][used] < moved[0.0][used]).all()
    # the damping grows with usage: along the usage ramp, the damped step shrinks relative to the free one
    ratio = moved[4.0][used] / moved[0.0][used]
    assert ratio[-1] < ratio[0]


def test_co_pull_draws_co_selected_keys_together():
    m = make(co_pull=True, co_pull_coef=0.2)
    before = m.keys.clone()
    inject(m, [[0, 1]] * 5 + [[2, 3]] * 3)  # 0 and 1 only ever go together, and 2 with 3
    m.update_keys()
    for a, b in ((0, 1), (2, 3)):
        assert angle(m.keys[a], m.keys[b]) < angle(before[a], before[b]) - 0.05
    assert torch.equal(m.keys[4:], before[4:])
    # exact rule on real choices: each key moves toward the mean of its partners' keys, one term per
    # (token, partner)
    m = make(co_pull=True, co_pull_coef=0.2, top_k=3)
    before = m.keys.clone()
    q, idx = train_forward(m)
    m.update_keys()
    chose = torch.zeros(q.shape[0], 8).scatter_(1, idx, 1.0)
    together = chose.t() @ chose
    together.fill_diagonal_(0)
    count = chose.sum(0)
    partner = together @ before / (2 * count).clamp_min(1)[:, None]
    expect = torch.where((count > 0)[:, None], F.normalize(before + 0.2 * (partner - before), dim=-1), before)
    assert torch.allclose(m.keys, expect, atol=1e-6)


def test_decay_only_after_warmup_and_only_under_used_keys():
    m = make(decay=True, decay_percentile=40, decay_warmup=3, decay_coef=0.5, usage_decay=0.5)
    before = m.keys.clone()
    for _ in range(3):  # warmup: experts 2..7 fall out of use, but nothing decays yet
        inject(m, [[0, 1]] * 32)
        m.update_keys()
        assert torch.equal(m.keys, before)
    assert (m.usage_ema[2:] < 0.2).all()
    inject(m, [[0, 1]] * 32)  # every saved query is the same direction u
    m.update_keys()
    assert torch.equal(m.keys[:2], before[:2])
    u = F.normalize(torch.ones(8), dim=0)
    assert (angle(m.keys[2:], u) < angle(before[2:], u) - 0.05).all()  # tied dead experts all decay
    assert torch.allclose(m.keys[2:], F.normalize(before[2:] + 0.5 * (u - before[2:]), dim=-1), atol=1e-6)


def test_decay_follows_the_percentile_and_spares_even_usage():
    m = make(decay=True, decay_percentile=40, decay_warmup=0, usage_decay=0.999)
    m.usage_ema.copy_(torch.linspace(0, 2, 8))  # 0, 0.29, 0.57, 0.86, ...; 40th percentile 0.8
    before = m.keys.clone()
    inject(m, [[0, 1]] * 8)
    m.update_keys()
    assert ((m.keys != before).any(-1)).tolist() == [True] * 3 + [False] * 5
    # evenly used experts: no key is below a uniform share, none decays
    m = make(decay=True, decay_percentile=40, decay_warmup=0)
    before = m.keys.clone()
    inject(m, [[e, (e + 1) % 8] for e in range(8)])
    m.update_keys()
    assert torch.equal(m.keys, before)


def test_keys_stay_unit_norm_with_every_rule_on():
    m = make(attraction=True, attraction_lr=0.5, co_pull=True, co_pull_coef=0.3, decay=True, decay_warmup=0,
             decay_percentile=50, decay_coef=0.5, max_saved=16)
    before = m.keys.clone()
    for seed in range(10):
        train_forward(m, tokens(64, seed))
        assert m._saved[0].shape[0] <= 16  # subsampled
        m.update_keys()
        assert torch.allclose(m.keys.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert not torch.equal(m.keys, before)


# ---------------------------------------------------------------- usage, metrics, reports
def test_usage_histogram_counts_training_choices_and_resets():
    m = make(top_k=3)
    train_forward(m, tokens(50))
    m.eval()
    m(tokens(30))  # eval forwards do not count
    counts = m.usage_histogram()
    assert counts.sum() == 150 and counts.dtype == torch.int64
    assert m.usage_histogram().sum() == 0
    train_forward(m, tokens(10))
    rep = usage_report(torch.nn.Sequential(m))
    assert set(rep["0"]) == {"gini", "entropy", "entropy_frac", "used_frac", "histogram"}
    assert sum(rep["0"]["histogram"]) == 30


def test_gini_and_entropy_values():
    even, one = torch.ones(4), torch.tensor([0.0, 0.0, 0.0, 4.0])
    e, o, z = usage_metrics(even), usage_metrics(one), usage_metrics(torch.zeros(4))
    assert e["gini"] == pytest.approx(0) and o["gini"] == pytest.approx(0.75)
    assert e["entropy"] == pytest.approx(math.log(4)) and o["entropy"] == pytest.approx(0)
    assert e["entropy_frac"] == pytest.approx(1) and e["used_frac"] == 1 and o["used_frac"] == 0.25
    assert z["gini"] == 0 and z["entropy"] == 0 and z["used_frac"] == 0

def test_param_report():
    m = make(query="mlp", query_hidden=12)
    rep = param_report(torch.nn.Sequential(m, torch.nn.Linear(3, 3)))
    assert rep["trainable"] == 1 + DIM * 12 + 12 * 8 + 12
    assert rep["frozen"] == 2 * 8 * DIM * 16
    assert rep["gradient_free"] == 8 * 8


def test_settings_validation():
    for bad in (dict(top_k=9), dict(query="conv"), dict(expert_init="xavier"), dict(temperature=0),
                dict(decay_percentile=120), dict(attraction_lr=2.0), dict(compute="sparse")):
        with pytest.raises(ValueError):
            small(**bad)


# ---------------------------------------------------------------- training
def _fit(train_query: bool, steps=60):
    """Fit a teacher with the same frozen experts but other keys; all key rules on."""
    torch.manual_seed(0)
    settings = dict(attraction=True, attraction_lr=0.05, co_pull=True, co_pull_coef=0.01, decay=True,
                    decay_warmup=10, decay_percentile=10)
    teacher, student = make(11, **settings), make(12, **settings)
    with torch.no_grad():
        teacher.keys.copy_(F.normalize(torch.randn(8, 8), dim=-1))
        student.gain.zero_()
    opt = torch.optim.Adam(student.parameters() if train_query else [student.gain], lr=3e-2)
    teacher.eval(), student.train()
    losses = []
    for step in range(steps):
        x = tokens(128, seed=100 + step)
        with torch.no_grad():
            y = teacher(x)
        loss = F.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_all_keys(student)
        losses.append(loss.item())
    return student, sum(losses[:10]) / 10, sum(losses[-10:]) / 10


def test_training_lowers_loss_with_key_updates():
    student, first, last = _fit(train_query=True)
    _, _, gain_only = _fit(train_query=False)
    # about 0.53 -> 0.25, where fitting the output gain alone stays near 0.56: the routing learns
    assert last < 0.6 * first and last < 0.7 * gain_only
    assert torch.allclose(student.keys.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert student.num_updates == 60
