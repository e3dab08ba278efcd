"""LR_WARMUP_FRAC / WARMDOWN_SHAPE, BUDGET_TYPE (steps, tokens, FLOPs), MAX_TRAIN_TOKENS_DISTINCT,
AMP_DTYPE's loss scaler and CUDA_MEMORY_FRACTION (golf/budget.py, golf/precision.py), and one CPU run."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt_v2 as v2
from data.shards import write_shard
from golf import budget, precision
from golf.config import KnobError, parse_knobs
from golf.optim import lr_schedule
from tests.trainer_runs import run_trainer


def _cfg(**env):
    return v2.resolve(parse_knobs(v2.KNOBS, {k: str(v) for k, v in env.items()}))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5, 0.9, 0.95, 1.0])
def test_linear_default_is_the_record_schedule(p):
    assert v2.lr_scale(_cfg(), p) == lr_schedule(p, 0.85, 0.1)


def test_shapes_and_warmup_at_several_points():
    f = budget.lr_scale
    # warmdown over the last half, floor 0.2: w = (1 - p) / 0.5
    assert f(0.25, 0.5, 0.2, shape="cosine") == 1.0
    assert f(0.75, 0.5, 0.2, shape="cosine") == pytest.approx(0.2 + 0.8 * 0.5)  # w = 0.5: halfway
    assert f(0.875, 0.5, 0.2, shape="cosine") == pytest.approx(0.2 + 0.8 * (1 - math.cos(math.pi / 4)) / 2)
    assert f(1.0, 0.5, 0.2, shape="cosine") == pytest.approx(0.2)
    assert f(0.75, 0.5, 0.2, shape="sqrt") == pytest.approx(0.2 + 0.8 * (1 - math.sqrt(0.5)))
    assert f(1.0, 0.5, 0.2, shape="sqrt") == pytest.approx(0.2)
    assert f(0.75, 0.5, 0.2, shape="linear") == 0.5
    # warmup over the first 10%: linear from 0, then the schedule
    assert f(0.0, 0.5, 0.2, warmup_frac=0.1) == 0.0
    assert f(0.05, 0.5, 0.2, warmup_frac=0.1) == pytest.approx(0.5)
    assert f(0.1, 0.5, 0.2, warmup_frac=0.1) == 1.0
    assert f(0.06, 1.0, 0.1, warmup_frac=0.1) == pytest.approx(0.6 * 0.94)


@pytest.mark.parametrize("env,match", [
    ({"WARMDOWN_SHAPE": "exp"}, "WARMDOWN_SHAPE"), ({"LR_WARMUP_FRAC": "1.5"}, "LR_WARMUP_FRAC"),
    ({"BUDGET_TYPE": "joules"}, "BUDGET_TYPE"), ({"BUDGET_TYPE": "tokens"}, "BUDGET_TOKENS"),
    ({"BUDGET_TOKENS": "1000"}, "BUDGET_TOKENS is set but does nothing with BUDGET_TYPE=time"),
    ({"BUDGET_TYPE": "tokens", "BUDGET_TOKENS": "100"}, "BUDGET_TOKENS buys no full step"),
    ({"BUDGET_TYPE": "tokens", "BUDGET_TOKENS": "10000000", "ITERATIONS": "5"}, "ITERATIONS"),
    ({"BUDGET_TYPE": "steps", "MAX_WALLCLOCK_SECONDS": "60"}, "MAX_WALLCLOCK_SECONDS"),
    ({"AMP_DTYPE": "fp8"}, "AMP_DTYPE"), ({"CUDA_MEMORY_FRACTION": "1.5"}, "CUDA_MEMORY_FRACTION"),
    ({"MAX_TRAIN_TOKENS_DISTINCT": "-1"}, "MAX_TRAIN_TOKENS_DISTINCT"),
])
def test_bad_budget_and_precision_knobs_name_the_variable(env, match):
    with pytest.raises(KnobError, match=match):
        _cfg(**env)


def test_steps_and_tokens_budgets_set_iterations_without_a_time_cap():
    c = _cfg(BUDGET_TYPE="steps", ITERATIONS=123)
    assert (c.iterations, c.max_wallclock_seconds) == (123, 0.0)
    c = _cfg(BUDGET_TYPE="tokens", BUDGET_TOKENS=10 * 786_432 + 5)
    assert (c.iterations, c.max_wallclock_seconds) == (10, 0.0)
    assert c.sources["ITERATIONS"].startswith("BUDGET_TYPE=tokens")
    assert v2.resolve(c).iterations == 10  # idempotent


def test_mean_keys_and_flops_per_token_by_hand():
    assert budget.mean_keys(4) == 2.5  # (1 + 2 + 3 + 4) / 4
    assert budget.mean_keys(4, window=2, sinks=1) == (1 + 2 + 2 + 2) / 4 + 1
    cfg = _cfg(NUM_LOOPS=0, PARALLEL_START_LAYER=-1, NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1,
               VOCAB_SIZE=128, TRAIN_SEQ_LEN=8, XSA_LAST_N=2)
    model = v2.GPTv2(cfg)
    n = sum(p.numel() for p in model.parameters())  # tied: the embedding counts once, as the head
    assert budget.flops_per_token(model, cfg, False) == 6 * n + 12 * 2 * 64 * 4.5


def test_flops_budget_equalises_cost_across_architectures():
    """The same FLOPs buy fewer steps for a costlier model; MoE counts active experts only; the
    looped phase costs more per step."""
    base = dict(BUDGET_TYPE="flops", BUDGET_FLOPS=1e18)
    rec = _cfg(**base)
    m = budget.meta_model(v2.GPTv2, rec)
    f0, f1 = (budget.flops_per_token(m, rec, looping) * rec.train_batch_tokens for looping in (False, True))
    assert f1 > f0
    k = math.ceil(0.35 * rec.iterations)
    assert k * f0 + (rec.iterations - k) * f1 <= 1e18 < budget.steps_for_flops(1e18, f0, f1, 0.35) * f1 + f1
    assert budget.steps_for_flops(10.0, 3.0, 3.0, None) == 3
    wide = _cfg(**base, MLP_MULT=8)
    assert wide.iterations < rec.iterations
    dense, moe = _cfg(**base, NUM_LOOPS=0), _cfg(**base, NUM_LOOPS=0, MOE_EXPERTS=8, MOE_TOP_K=1)
    md = budget.meta_model(v2.GPTv2, dense)
    mm = budget.meta_model(v2.GPTv2, moe)
    # top-1 of 8 same-size experts: the same active MLP params as dense, plus the router
    extra = budget.flops_per_token(mm, moe, False) - budget.flops_per_token(md, dense, False)
    assert 0 < extra < 6 * 11 * 512 * 8 + 1


def test_loss_scaler_scales_grads_unscales_and_skips_infs():
    s = precision.LossScaler(init=8.0, interval=2)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = s.scale_loss((w * 3).sum())
    assert loss.item() == 9.0  # the value is unchanged
    loss.backward()
    torch.testing.assert_close(w.grad, torch.tensor([24.0, 24.0]))
    assert not s.unscale_([w])
    torch.testing.assert_close(w.grad, torch.tensor([3.0, 3.0]))
    s.update(False), s.update(False)
    assert s.scale == 16.0  # grew after `interval` good steps
    w.grad = torch.tensor([float("inf"), 1.0])
    assert s.unscale_([w])
    s.update(True)
    assert s.scale == 8.0 and s.skipped == 1


def test_wrapped_step_skips_an_overflowing_step():
    class Opt:
        def __init__(self):
            self.params, self.steps = [torch.nn.Parameter(torch.ones(2))], 0

        def step(self, lr, mom):
            self.steps += 1
            return torch.tensor(1.0)

        def zero_grad(self):
            self.params[0].grad = None

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = state["steps"]
    opt, s = Opt(), precision.LossScaler(init=4.0)
    s.wrap(opt)
    initial = opt.state_dict()
    opt.params[0].grad = torch.tensor([4.0, float("nan")])
    assert math.isinf(opt.step(1.0, 0.9).item()) and opt.steps == 0 and opt.params[0].grad is None
    opt.params[0].grad = torch.tensor([4.0, 8.0])
    opt.step(1.0, 0.9)
    assert opt.steps == 1 and s.scale == 2.0
    torch.testing.assert_close(opt.params[0].grad, torch.tensor([2.0, 4.0]))
    opt.load_state_dict(initial)  # the trainer's reset after compile priming restores the scale too
    assert opt.steps == 0 and (s.scale, s.good_steps, s.skipped) == (4.0, 0, 0)


def test_amp_choice_and_memory_fraction_on_cpu():
    cpu = torch.device("cpu")
    assert precision.choose_dtype("auto", cpu) is None
    assert precision.choose_dtype("auto", torch.device("cuda"), bf16_supported=False) == torch.float16
    assert precision.choose_dtype("auto", torch.device("cuda"), bf16_supported=True) == torch.bfloat16
    assert precision.choose_dtype("fp16", cpu) == torch.float16
    assert precision.apply_memory_fraction(0.0, cpu) is None
    assert "ignored" in precision.apply_memory_fraction(0.5, cpu)
    assert _cfg(CUDA_MEMORY_FRACTION=0.4).cuda_memory_fraction == 0.4
    with torch.autocast("cpu", dtype=torch.float16):  # CPU autocast runs fp16 matmuls
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16


def test_repeated_loader_cycles_the_first_distinct_tokens(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(100))
    ld = v2.RepeatedLoader(10, str(tmp_path / "fineweb_train_*.bin"), 4, 8)
    try:
        seen = [ld.next_batch()[0][0].flatten().tolist() for _ in range(3)]
    finally:
        ld.close()
    stream = [i % 10 for i in range(24)]
    assert seen == [stream[0:4] + stream[4:8], stream[8:12] + stream[12:16], stream[16:20] + stream[20:24]]


def test_cpu_run_with_adafactor_a_token_budget_and_warmup(tmp_path):
    run_trainer(tmp_path, script="train_gpt_v2.py", MATRIX_OPTIMIZER="adafactor", BUDGET_TYPE="tokens",
                BUDGET_TOKENS="3072", LR_WARMUP_FRAC="0.5", WARMDOWN_SHAPE="cosine",
                MAX_TRAIN_TOKENS_DISTINCT="1500", CUDA_MEMORY_FRACTION="0.5", AMP_DTYPE="bf16",
                VAL_LOSS_EVERY="0")
    log = (tmp_path / "t.txt").read_text()
    assert "ITERATIONS=3 (BUDGET_TYPE=tokens: 3072 tokens / TRAIN_BATCH_TOKENS=1024)" in log
    assert "optimizer: adafactor[" in log and "cuda_memory_fraction:0.5 ignored" in log
    assert "amp_dtype:bf16 autocast:bfloat16" in log
    losses = [float(x) for x in __import__("re").findall(r"^step:\d/3 train_loss:(\S+)", log, __import__("re").M)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
