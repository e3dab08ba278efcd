"""MATRIX_OPTIMIZER (golf/v2_optim.py): Lion and Adafactor against hand computations, the matrices
stepped through OptimizerSet (lr schedule, reset, two gloo ranks equal one process), knob errors."""
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import train_gpt_v2 as v2
from golf.config import KnobError, parse_knobs
from golf.optim import build_optimizer
from golf.v2_optim import Adafactor, Lion, matrix_factory
from tests.gloo_ranks import free_port, gloo_group
from tests.test_optim import _classify, _hp, _make_params, _rank_grads


def test_lion_one_step_by_hand():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    opt.state[p]["exp_avg"] = torch.tensor([1.0, 1.0, -1.0])
    p.grad = torch.tensor([-20.0, 3.0, 4.0])
    opt.step()
    # c = 0.9 m + 0.1 g = [-1.1, 1.2, -0.5]; p <- p (1 - 0.05) - 0.1 sign(c)
    torch.testing.assert_close(p.detach(), torch.tensor([0.95 + 0.1, -1.9 - 0.1, 0.475 + 0.1]))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.99 - 0.2, 0.99 + 0.03, -0.99 + 0.04]))


def test_adafactor_state_is_factored_and_one_step_by_hand():
    w, e, b = (nn.Parameter(torch.ones(3, 4)), nn.Parameter(torch.ones(2, 3, 5)), nn.Parameter(torch.ones(4)))
    opt = Adafactor([w, e, b], lr=0.1, clip=1e9, eps=0.0)
    g = torch.arange(1.0, 13.0).view(3, 4)
    w.grad, e.grad, b.grad = g, torch.ones(2, 3, 5), torch.full((4,), 2.0)
    opt.step()
    assert opt.state[w]["row"].shape == (3,) and opt.state[w]["col"].shape == (4,)
    assert opt.state[e]["row"].shape == (2, 3) and opt.state[e]["col"].shape == (2, 5)
    assert opt.state[b]["v"].shape == (4,)
    # step 1: b2 = 1 - 1^-0.8 = 0, so R, C are this grad's row / column means of g^2
    sq = g.square()
    R, C = sq.mean(1), sq.mean(0)
    torch.testing.assert_close(opt.state[w]["row"], R)
    V = torch.outer(R, C) / R.mean()
    torch.testing.assert_close(Adafactor.second_moment(opt.state[w]), V)
    torch.testing.assert_close(w.detach(), 1 - 0.1 * g / V.sqrt())
    torch.testing.assert_close(b.detach(), torch.full((4,), 0.9))  # unfactored: g / |g|
    # update clipping: rms(u) is capped at clip
    w2 = nn.Parameter(torch.zeros(3, 4))
    opt2 = Adafactor([w2], lr=1.0, clip=0.5)
    w2.grad = g
    opt2.step()
    assert abs(w2.detach().square().mean().sqrt().item() - 0.5) < 1e-5


def _cfg(**env):
    return v2.resolve(parse_knobs(v2.KNOBS, {k: str(v) for k, v in env.items()}))


def test_adamw_matrices_step_like_torch_adamw_at_the_scheduled_lr():
    cfg = _cfg(MATRIX_OPTIMIZER="adamw", ADAMW_MATRIX_LR=0.01, ADAMW_MATRIX_WD=0.1)
    hp = _hp(matrix_optimizer="adamw")
    named, ref = _make_params(), _make_params()
    opt = build_optimizer(named, _classify, hp, matrix_optimizer=matrix_factory(cfg))
    assert opt.groups == [] and opt.describe().startswith("adamw[6@lr0.01]")
    mats = [p for n, p in ref.items() if n.startswith("m")]
    torch_opt = torch.optim.AdamW(mats, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step, scale in enumerate((1.0, 0.5)):
        grads = _rank_grads(named, step, 0)
        for n, g in grads.items():
            named[n].grad = g.clone()
        opt.step(scale, 0.95)
        for group in torch_opt.param_groups:
            group["lr"] = 0.01 * scale
        for p, n in zip(mats, [n for n in ref if n.startswith("m")]):
            p.grad = grads[n].clone()
        torch_opt.step()
    for n, p in ref.items():
        if n.startswith("m"):
            torch.testing.assert_close(named[n].detach(), p.detach())


def test_reset_replays_the_matrix_optimizer():
    cfg = _cfg(MATRIX_OPTIMIZER="lion")
    named = _make_params()
    opt = build_optimizer(named, _classify, _hp(), matrix_optimizer=matrix_factory(cfg))
    start = ({n: p.detach().clone() for n, p in named.items()}, opt.state_dict())

    def run():
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(start[0][n])
        opt.load_state_dict(start[1])
        for step in range(2):
            for n, g in _rank_grads(named, step, 0).items():
                named[n].grad = g
            opt.step(1.0, 0.95)
        return {n: p.detach().clone() for n, p in named.items()}

    a, b = run(), run()
    assert all(torch.equal(a[n], b[n]) for n in a)


def _worker(rank, port, out):
    torch.set_num_threads(1)
    with gloo_group(rank, 2, port):
        named = _make_params()
        opt = build_optimizer(named, _classify, _hp(grad_clip_norm=1.0), matrix_optimizer=matrix_factory(_cfg(MATRIX_OPTIMIZER="adafactor")))
        for step in range(3):
            for n, g in _rank_grads(named, step, rank).items():
                named[n].grad = g
            opt.step(1.0, 0.95)
        torch.save({n: p.detach() for n, p in named.items()}, f"{out}/rank{rank}.pt")


def test_two_ranks_equal_one_process_with_averaged_grads():
    named = _make_params()
    opt = build_optimizer(named, _classify, _hp(grad_clip_norm=1.0), matrix_optimizer=matrix_factory(_cfg(MATRIX_OPTIMIZER="adafactor")))
    for step in range(3):
        g0, g1 = _rank_grads(named, step, 0), _rank_grads(named, step, 1)
        for n in g0:
            named[n].grad = (g0[n] + g1[n]) / 2
        opt.step(1.0, 0.95)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(free_port(), out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}/rank{r}.pt") for r in range(2)]
    for n, p in named.items():
        assert torch.equal(ranks[0][n], ranks[1][n])
        torch.testing.assert_close(ranks[0][n], p.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("env,match", [
    ({"MATRIX_OPTIMIZER": "sgd"}, "MATRIX_OPTIMIZER"),
    ({"LION_LR": "0.001"}, "LION_LR is set but does nothing with MATRIX_OPTIMIZER=muon"),
    ({"MATRIX_OPTIMIZER": "adamw", "MUON_WD": "0.1"}, "MUON_WD is set but does nothing"),
    ({"MATRIX_OPTIMIZER": "lion", "LION_BETA1": "1.5"}, "LION_BETA1"),
    ({"MATRIX_OPTIMIZER": "adafactor", "ADAFACTOR_DECAY": "0.5"}, "ADAFACTOR_DECAY"),
    ({"MATRIX_OPTIMIZER": "adamw", "ADAMW_MATRIX_LR": "-1"}, "ADAMW_MATRIX_LR"),
])
def test_bad_optimizer_knobs_name_the_variable(env, match):
    with pytest.raises(KnobError, match=match):
        _cfg(**env)


def test_default_is_muon_unchanged():
    cfg = _cfg()
    assert matrix_factory(cfg) is None
    named = _make_params()
    assert v2.v2_optim.build(named, _classify, cfg).describe().startswith("muon[")
