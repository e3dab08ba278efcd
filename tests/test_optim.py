"""golf/optim.py on CPU: Polar Express, MuonEq-R, sharded Muon over 2 gloo ranks against one process,
AdamW averaging and weight decay, global-norm clipping, optimizer reset, EMA and the schedules."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from golf.optim import (EMA, POLAR_EXPRESS_COEFFS, build_optimizer, lr_schedule, momentum_warmup,
                        muon_shard_update, polar_express, row_normalize)
from tests.gloo_ranks import free_port, gloo_group

# 3 of one shape (padded to 4 over 2 ranks), one tall matrix alone (rank 1 holds only padding), a pair
SHAPES = [(16, 32)] * 3 + [(32, 16)] + [(24, 24)] * 2


def _hp(**kw):
    base = dict(matrix_lr=0.02, scalar_lr=0.02, tied_embed_lr=0.03, muon_wd=0.095, embed_wd=0.085, adam_wd=0.02,
                beta1=0.9, beta2=0.99, adam_eps=1e-8, muon_backend_steps=5, muon_row_normalize=True,
                grad_clip_norm=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


def _make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    named = {f"m{i}": nn.Parameter(0.1 * torch.randn(*s, generator=g)) for i, s in enumerate(SHAPES)}
    named["emb"] = nn.Parameter(0.1 * torch.randn(64, 16, generator=g))
    named["gain"] = nn.Parameter(torch.ones(16))
    named["bias"] = nn.Parameter(torch.zeros(4))
    return named


def _classify(name, p):
    return "matrix" if name.startswith("m") else "embed" if name == "emb" else "scalar"


def _rank_grads(named, step, rank):
    """What rank `rank` computes at `step`; 'bias' gets no grad at step 2 (on every rank)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {n: torch.randn(p.shape, generator=g) for n, p in named.items() if not (n == "bias" and step == 2)}


def _train(named, hp, rank, world, steps=4):
    """Steps the optimizer; one process gets the average of both ranks' grads."""
    opt = build_optimizer(named, _classify, hp)
    norms = []
    for step in range(steps):
        if world == 1:
            g0, g1 = _rank_grads(named, step, 0), _rank_grads(named, step, 1)
            for n in g0:
                named[n].grad = (g0[n] + g1[n]) / 2
        else:
            for n, g in _rank_grads(named, step, rank).items():
                named[n].grad = g
        norms.append(opt.step(lr_scale=1.0 - 0.2 * step, muon_momentum=0.9 + 0.02 * step))
    return opt, torch.stack(norms)


CONFIGS = {"noclip": _hp(), "clip": _hp(grad_clip_norm=1.0)}


def _rank_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    with gloo_group(rank, 2, port):
        result = {}
        for key, hp in CONFIGS.items():
            named = _make_params()
            opt, norms = _train(named, hp, rank, 2)
            result[key] = {"params": {n: p.detach().clone() for n, p in named.items()}, "norms": norms,
                           "momentum": opt.state_dict()["muon_momentum"]}
        torch.save(result, f"{out_dir}/rank{rank}.pt")


# ----------------------------------------------------------------------------- Polar Express
def _svals(x):
    return torch.linalg.svdvals(x.float())


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (32, 256)])
def test_polar_express_near_orthogonal_random(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    x = polar_express(g)
    assert x.dtype == torch.bfloat16 and x.shape == g.shape
    s = _svals(x)
    assert 0.85 <= s.min() and s.max() <= 1.15, (s.min(), s.max())  # documented band
    u, _, vh = torch.linalg.svd(g)
    k = min(shape)
    polar = u[:, :k] @ vh[:k]
    assert (x.float() - polar).norm() / polar.norm() < 0.15  # the direction is U V^T


def test_polar_express_square_with_spread_spectrum():
    # a random square matrix has singular values near 0, below the coefficients' design range, so set
    # the spectrum: 0.02..1 (s / |g|_F >= 3e-3)
    gen = torch.Generator().manual_seed(2)
    q1, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    g = q1 @ torch.diag(torch.linspace(0.02, 1.0, 64)) @ q2.T
    s = _svals(polar_express(g))
    assert 0.85 <= s.min() and s.max() <= 1.15, (s.min(), s.max())


@pytest.mark.parametrize("shape", [(3, 16, 48), (3, 48, 16)])
def test_polar_express_batched_equals_per_matrix(shape):
    b = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    one_call = polar_express(b)
    each = torch.stack([polar_express(m) for m in b])
    torch.testing.assert_close(one_call.float(), each.float(), rtol=0, atol=1e-2)  # bf16; equal on CPU here


def test_polar_express_rejects_bad_input():
    with pytest.raises(ValueError, match="MUON_BACKEND_STEPS=6"):
        polar_express(torch.randn(4, 4), steps=len(POLAR_EXPRESS_COEFFS) + 1)
    with pytest.raises(ValueError, match="MUON_BACKEND_STEPS=0"):
        polar_express(torch.randn(4, 4), steps=0)
    with pytest.raises(ValueError, match="shape"):
        polar_express(torch.randn(4))


# ----------------------------------------------------------------------------- MuonEq-R and the Muon math
def test_row_normalize_unit_rows_zero_row_stays_zero():
    u = torch.randn(3, 8, 5)
    u[1, 2] = 0
    r = row_normalize(u)
    norms = r.norm(dim=-1)
    assert torch.equal(r[1, 2], torch.zeros(5))
    norms[1, 2] = 1
    torch.testing.assert_close(norms, torch.ones(3, 8))


def test_muon_shard_update_is_nesterov_then_row_norm_then_polar_express():
    gen = torch.Generator().manual_seed(4)
    grad, buf = torch.randn(2, 8, 12, generator=gen), torch.randn(2, 8, 12, generator=gen)
    m = torch.tensor(0.9)
    expected_buf = buf * m + grad
    expected_u = grad + m * expected_buf
    state = buf.clone()
    out = muon_shard_update(grad, state, m, 5, True)
    torch.testing.assert_close(state, expected_buf)
    torch.testing.assert_close(out.float(), polar_express(row_normalize(expected_u)).float(), rtol=0, atol=1e-2)
    no_rownorm = muon_shard_update(grad, buf.clone(), m, 5, False)
    torch.testing.assert_close(no_rownorm.float(), polar_express(expected_u).float(), rtol=0, atol=1e-2)


def test_muon_matches_per_matrix_reference():
    """One process, no clipping: each matrix follows the record's Muon (MuonEq-R variant, Polar Express),
    p <- p (1 - lr wd) - lr max(1, r/c)^0.5 O."""
    named = _make_params()
    ref = {n: p.detach().clone() for n, p in named.items() if n.startswith("m")}
    bufs = {n: torch.zeros_like(p) for n, p in ref.items()}
    hp = _hp()
    opt = build_optimizer(named, _classify, hp)
    for step in range(3):
        grads = _rank_grads(named, step, 0)
        for n, g in grads.items():
            named[n].grad = g.clone()
        lr_scale, mom = 1.0 - 0.2 * step, 0.9 + 0.02 * step
        opt.step(lr_scale, mom)
        lr = hp.matrix_lr * lr_scale
        for n, p in ref.items():
            bufs[n].mul_(mom).add_(grads[n])
            u = row_normalize(grads[n] + mom * bufs[n])
            o = polar_express(u).float()
            p.mul_(1 - lr * hp.muon_wd).add_(o, alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)
    for n, p in ref.items():
        torch.testing.assert_close(named[n].detach(), p, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- sharded == single process
def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for key, hp in CONFIGS.items():
            named = _make_params()
            opt, norms = _train(named, hp, 0, 1)
            momentum = opt.state_dict()["muon_momentum"]
            for r in range(2):
                got = ranks[r][key]
                for n, p in named.items():
                    if key == "noclip":  # same sums, same per-matrix math: bit for bit
                        assert torch.equal(got["params"][n], p.detach()), (key, r, n)
                    else:  # the norm adds shard sums in another order: last-bit differences
                        torch.testing.assert_close(got["params"][n], p.detach(), rtol=0, atol=1e-5)
                torch.testing.assert_close(got["norms"], norms, rtol=1e-6, atol=0)
                # each rank keeps momentum only for its own shard of every shape group
                for g, full in enumerate(momentum):
                    shard = got["momentum"][g]
                    s = shard.shape[0]
                    assert s == math.ceil(full.shape[0] / 2)
                    mine = full[r * s:(r + 1) * s]
                    torch.testing.assert_close(shard[:mine.shape[0]], mine, rtol=0, atol=1e-5)
                    assert torch.equal(shard[mine.shape[0]:], torch.zeros_like(shard[mine.shape[0]:]))  # padding
            assert ranks[0][key]["params"].keys() == named.keys()
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- AdamW, weight decay, clipping
def test_weight_decay_alone_with_no_grads():
    """No grads count as zero grads: Muon's update is 0 and AdamW's is 0, leaving p (1 - lr wd)."""
    named = _make_params()
    before = {n: p.detach().clone() for n, p in named.items()}
    hp = _hp(muon_wd=0.1, embed_wd=0.2, adam_wd=0.3)
    opt = build_optimizer(named, _classify, hp)
    norm = opt.step(lr_scale=0.5, muon_momentum=0.95)
    assert norm.item() == 0.0
    for n, p in named.items():
        lr, wd = {"matrix": (hp.matrix_lr, hp.muon_wd), "embed": (hp.tied_embed_lr, hp.embed_wd),
                  "scalar": (hp.scalar_lr, hp.adam_wd)}[_classify(n, p)]
        torch.testing.assert_close(p.detach(), before[n] * (1 - 0.5 * lr * wd), rtol=1e-7, atol=0)
        assert p.grad is None


def test_grad_clip_caps_the_global_norm():
    named = _make_params()
    grads = _rank_grads(named, 0, 0)
    expected = torch.sqrt(sum(g.square().sum() for g in grads.values()))
    for clip, want in ((1.0, 1.0), (1e9, expected.item())):
        params = _make_params()
        for n, g in grads.items():
            params[n].grad = g.clone()
        hp = _hp(grad_clip_norm=clip)
        opt = build_optimizer(params, _classify, hp)
        norm = opt.step(1.0, 0.9)
        torch.testing.assert_close(norm, expected)  # reported before clipping
        # after one step, Muon momentum = clipped matrix grads, AdamW exp_avg = (1 - beta1) clipped grads
        mat = opt.state_dict()["muon_momentum"]
        rep = [s["exp_avg"] / (1 - hp.beta1) for s in opt.adam.state.values()]
        clipped = math.sqrt(sum(t.square().sum().item() for t in mat + rep))
        assert clipped == pytest.approx(want, rel=1e-5)
        coef = min(1.0, clip / (expected.item() + 1e-6))
        torch.testing.assert_close(mat[0][0], grads["m0"] * coef)


def test_state_dict_reset_replays_identically():
    named = _make_params()
    opt = build_optimizer(named, _classify, _hp(grad_clip_norm=1.0))
    start_params = {n: p.detach().clone() for n, p in named.items()}
    start_state = opt.state_dict()

    def two_steps():
        for step in range(2):
            for n, g in _rank_grads(named, step, 0).items():
                named[n].grad = g
            opt.step(1.0, 0.92)
        return {n: p.detach().clone() for n, p in named.items()}

    first = two_steps()
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(start_params[n])
    opt.load_state_dict(start_state)
    second = two_steps()
    for n in first:
        assert torch.equal(first[n], second[n]), n
    opt.load_state_dict(start_state)  # the snapshot was not consumed
    assert all(torch.count_nonzero(m) == 0 for m in opt.state_dict()["muon_momentum"])


def test_build_optimizer_errors_name_the_problem():
    named = _make_params()
    with pytest.raises(ValueError, match="classify\\('m0'\\) returned 'bogus'"):
        build_optimizer(named, lambda n, p: "bogus", _hp())
    with pytest.raises(ValueError, match="'gain'.*Muon needs 2-D"):
        build_optimizer(named, lambda n, p: "matrix", _hp())
    with pytest.raises(ValueError, match="hp lacks muon_wd"):
        build_optimizer(named, _classify, SimpleNamespace(**{k: v for k, v in vars(_hp()).items() if k != "muon_wd"}))
    with pytest.raises(ValueError, match="MUON_BACKEND_STEPS=7"):
        build_optimizer(named, _classify, _hp(muon_backend_steps=7))
    with pytest.raises(ValueError, match="GRAD_CLIP_NORM=-1"):
        build_optimizer(named, _classify, _hp(grad_clip_norm=-1))
    opt = build_optimizer(named, _classify, _hp())
    with pytest.raises(ValueError, match="world_size=4"):
        opt.load_state_dict({**opt.state_dict(), "world_size": 4})
    assert "muon[3x16x32 1x32x16 2x24x24]" in opt.describe()


# ----------------------------------------------------------------------------- EMA
def test_ema_matches_closed_form_and_copies():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    d, k = 0.9, 6
    history = [[p.detach().double().clone() for p in model.parameters()]]
    ema = EMA(model, decay=d)
    for _ in range(k):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        history.append([p.detach().double().clone() for p in model.parameters()])
        ema.update()
    for j, shadow in enumerate(ema.shadow):
        closed = d ** k * history[0][j] + sum((1 - d) * d ** (k - i) * history[i][j] for i in range(1, k + 1))
        torch.testing.assert_close(shadow.double(), closed, rtol=1e-5, atol=1e-6)
    other = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    ema.copy_to(other)
    for p, s in zip(other.parameters(), ema.shadow):
        assert torch.equal(p.detach(), s)
    snap = ema.state_dict()
    ema.update()
    ema.load_state_dict(snap)
    ema.copy_to()
    for p, s in zip(model.parameters(), snap["shadow"]):
        assert torch.equal(p.detach(), s)
    with pytest.raises(ValueError, match="EMA_DECAY=1.0"):
        EMA(model, 1.0)
    with pytest.raises(ValueError, match="shapes do not match"):
        ema.copy_to(nn.Linear(4, 3))


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("progress,frac,min_lr,want", [
    (0.0, 0.5, 0.1, 1.0),
    (0.5, 0.5, 0.1, 1.0),        # the warmdown starts here
    (0.75, 0.5, 0.0, 0.5),       # halfway down the line to 0
    (0.75, 0.5, 0.1, 0.5),       # above the floor: the line
    (0.96, 0.5, 0.1, 0.1),       # the line (0.08) is below the floor
    (1.0, 0.5, 0.1, 0.1),
    (1.3, 0.5, 0.1, 0.1),        # past the budget: the floor
    (0.5, 0.0, 0.1, 1.0),        # no warmdown
    (0.0, 2.0, 0.0, 0.5),        # the line started before the budget
    (0.5, 2.0, 0.1, 0.25),
    (0.15, 0.85, 0.1, 1.0),      # the record: 85% warmdown, floor 0.1 reached at 0.915
    (0.575, 0.85, 0.1, 0.5),
    (0.915, 0.85, 0.1, 0.1),
])
def test_lr_schedule(progress, frac, min_lr, want):
    assert lr_schedule(progress, frac, min_lr) == pytest.approx(want)


def test_lr_schedule_rejects_bad_knobs():
    with pytest.raises(ValueError, match="WARMDOWN_FRAC=-0.1"):
        lr_schedule(0.5, -0.1)
    with pytest.raises(ValueError, match="MIN_LR=1.5"):
        lr_schedule(0.5, 0.5, 1.5)


def test_momentum_warmup():
    assert momentum_warmup(0, 0.92, 0.97, 1500) == pytest.approx(0.92)
    assert momentum_warmup(750, 0.92, 0.97, 1500) == pytest.approx(0.945)
    assert momentum_warmup(1500, 0.92, 0.97, 1500) == pytest.approx(0.97)
    assert momentum_warmup(9000, 0.92, 0.97, 1500) == pytest.approx(0.97)
    assert momentum_warmup(3, 0.92, 0.97, 0) == 0.97
