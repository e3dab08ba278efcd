"""Equal-cost comparisons for the research trainer: the LR schedule's warmup and warmdown shapes, and
training budgets in steps, tokens or FLOPs turned into the step count the loop runs.

The loop (train_gpt.main) measures progress as train time / cap, or step / ITERATIONS when there is
no cap. A steps, tokens or FLOPs budget is therefore ITERATIONS with the cap off: the LR schedule,
looping and warmdown all follow the active budget's fraction.

FLOPs per training token (forward + backward = 3 x forward), for a layer order of L virtual layers:
    6 x N_active  +  12 x L x MODEL_DIM x K
N_active: the parameters a token's matmuls touch: every block's (an MoE layer's experts count
top_k / E; SOM's frozen experts count the same though they are buffers) once per pass through the
block, the LM head (the tied embedding counts once, as the head; an input embedding lookup and
learned positions are free), and the small non-block tensors. K: the mean number of keys a query sees
under the causal mask, (T + 1) / 2 for full attention over T tokens, less with ATTN_WINDOW, plus
ATTN_SINKS (QK^T and AV: 2 x 2 x head_dim flops per key per head, forward). Document isolation is
data-dependent and not discounted: the count is an upper bound of the attention's share.
Depth recurrence changes the cost mid-run: steps before ENABLE_LOOPING_AT cost the unlooped order's
FLOPs, the rest the looped order's.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from golf.config import KnobError

BUDGET_TYPES = ("time", "steps", "tokens", "flops")
WARMDOWN_SHAPES = ("linear", "cosine", "sqrt")


# ----------------------------------------------------------------------------- LR schedule
def lr_scale(progress: float, warmdown_frac: float, min_lr: float, warmup_frac: float = 0.0,
             shape: str = "linear") -> float:
    """LR multiplier at `progress` (fraction of the active budget): a linear warmup from 0 over the
    first `warmup_frac`, times the warmdown. `linear` is golf.optim.lr_schedule exactly (the line
    (1 - progress) / warmdown_frac clamped to [min_lr, 1]); with w = clamp((1 - progress) /
    warmdown_frac, 0, 1) the fraction of the warmdown left, `cosine` is min_lr + (1 - min_lr)(1 -
    cos(pi w)) / 2 and `sqrt` min_lr + (1 - min_lr)(1 - sqrt(1 - w)) (the 1-sqrt cooldown, Hagele et
    al. 2024): both reach the floor exactly at the end of the budget."""
    from golf.optim import lr_schedule

    if shape not in WARMDOWN_SHAPES:
        raise KnobError(f"WARMDOWN_SHAPE={shape!r}: expected one of {', '.join(WARMDOWN_SHAPES)}")
    if not 0.0 <= warmup_frac < 1.0:
        raise KnobError(f"LR_WARMUP_FRAC={warmup_frac}: expected a fraction in [0, 1)")
    if shape == "linear" or warmdown_frac == 0:
        scale = lr_schedule(progress, warmdown_frac, min_lr)
    else:
        lr_schedule(progress, warmdown_frac, min_lr)  # the same checks of WARMDOWN_FRAC and MIN_LR
        w = min(1.0, max(0.0, (1.0 - progress) / warmdown_frac))
        shaped = (1 - math.cos(math.pi * w)) / 2 if shape == "cosine" else 1 - math.sqrt(1 - w)
        scale = min_lr + (1 - min_lr) * shaped
    if warmup_frac > 0 and progress < warmup_frac:
        scale *= max(0.0, progress) / warmup_frac
    return scale


# ----------------------------------------------------------------------------- FLOPs
def _active_params(module: nn.Module) -> float:
    """Parameters a token uses in `module`: MoE experts at top_k / E, SOM frozen experts included."""
    from golf.moe import MoEMLP
    from golf.som_router import SOMMoE

    n = float(sum(p.numel() for p in module.parameters()))
    for m in module.modules():
        if isinstance(m, MoEMLP):
            n -= (m.experts_in.numel() + m.experts_out.numel()) * (1 - m.top_k / m.num_experts)
        elif isinstance(m, SOMMoE):
            n += (m.w1.numel() + m.w2.numel()) * m.settings.top_k / m.settings.num_experts
    return n


def mean_keys(seq_len: int, window: int = 0, sinks: int = 0) -> float:
    """Mean keys per query under the causal mask (position t sees min(t, window) tokens), plus sinks."""
    w = seq_len if window <= 0 else min(window, seq_len)
    total = w * (w + 1) / 2 + (seq_len - w) * w  # positions 1..w see t keys, the rest see w
    return total / seq_len + sinks


def flops_per_token(model: nn.Module, cfg, looping: bool) -> float:
    """Training FLOPs per token of `model` (a train_gpt.GPT) running its unlooped or looped order."""
    from train_gpt import layer_order

    order = layer_order(cfg, looping)
    block_params = [_active_params(b) for b in model.blocks]
    outside = _active_params(model) - sum(block_params)
    if hasattr(model, "lm_head"):  # untied: the input embedding is a lookup
        outside -= model.tok_emb.weight.numel()
    if hasattr(model, "pos_emb"):
        outside -= model.pos_emb.weight.numel()
    n_active = outside + sum(block_params[i] for i in order)
    keys = mean_keys(cfg.train_seq_len, getattr(cfg, "attn_window", 0), getattr(cfg, "attn_sinks", 0))
    return 6 * n_active + 12 * len(order) * cfg.model_dim * keys


def steps_for_flops(budget: float, step_unlooped: float, step_looped: float, loop_at: float | None) -> int:
    """The most steps N whose FLOPs fit `budget`, when steps from ceil(loop_at x N) on cost
    `step_looped` (loop_at None: never)."""
    def cost(n: int) -> float:
        k = n if loop_at is None else min(n, math.ceil(loop_at * n))
        return k * step_unlooped + (n - k) * step_looped

    lo, hi = 0, int(budget // min(step_unlooped, step_looped)) + 1  # cost(n) rises with n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
    return lo


def meta_model(model_cls, cfg) -> nn.Module:
    """The model built without memory (shapes only), for counting."""
    with torch.device("meta"):
        return model_cls(cfg)


def resolve_budget(cfg, model_cls) -> tuple[dict, dict]:
    """(values, sources) overrides for ITERATIONS and MAX_WALLCLOCK_SECONDS under BUDGET_TYPE; the
    sources say how the step count was reached (logged at the top of the run)."""
    kind = cfg.budget_type
    if kind not in BUDGET_TYPES:
        raise KnobError(f"BUDGET_TYPE={kind!r}: expected one of {', '.join(BUDGET_TYPES)}")
    if kind == "time":
        return {}, {}
    if cfg.sources.get("MAX_WALLCLOCK_SECONDS") == "env" and cfg.max_wallclock_seconds > 0:
        raise KnobError(f"MAX_WALLCLOCK_SECONDS={cfg.max_wallclock_seconds:g} with BUDGET_TYPE={kind}: a time cap "
                        "would end the run and drive the schedule instead; unset it")
    values, sources = {"MAX_WALLCLOCK_SECONDS": 0.0}, {"MAX_WALLCLOCK_SECONDS": f"BUDGET_TYPE={kind}"}
    if kind == "steps":
        return values, sources
    if cfg.sources.get("ITERATIONS") == "env":
        raise KnobError(f"ITERATIONS is set with BUDGET_TYPE={kind}: the budget sets the step count; unset it")
    batch = cfg.train_batch_tokens
    if kind == "tokens":
        if cfg.budget_tokens <= 0:
            raise KnobError(f"BUDGET_TOKENS={cfg.budget_tokens}: expected > 0 with BUDGET_TYPE=tokens")
        steps = cfg.budget_tokens // batch
        how = f"BUDGET_TYPE=tokens: {cfg.budget_tokens} tokens / TRAIN_BATCH_TOKENS={batch}"
        name = "BUDGET_TOKENS"
    else:
        if cfg.budget_flops <= 0:
            raise KnobError(f"BUDGET_FLOPS={cfg.budget_flops}: expected > 0 with BUDGET_TYPE=flops")
        model = meta_model(model_cls, cfg)
        f0 = flops_per_token(model, cfg, False) * batch
        f1 = flops_per_token(model, cfg, True) * batch if cfg.num_loops else f0
        steps = steps_for_flops(cfg.budget_flops, f0, f1, cfg.enable_looping_at if cfg.num_loops else None)
        how = (f"BUDGET_TYPE=flops: {cfg.budget_flops:.4g} FLOPs / {f0:.4g} per step"
               + (f" unlooped, {f1:.4g} looped from ENABLE_LOOPING_AT={cfg.enable_looping_at:g}" if cfg.num_loops else ""))
        name = "BUDGET_FLOPS"
    if steps < 1:
        raise KnobError(f"{name} buys no full step of TRAIN_BATCH_TOKENS={batch} ({how})")
    values["ITERATIONS"], sources["ITERATIONS"] = steps, how
    return values, sources
