"""Matrix optimizers for the research trainer's MATRIX_OPTIMIZER ablation: AdamW, Lion and a factored
Adafactor in place of Muon on the block matrices. Embeddings and scalars keep their AdamW either way.

They plug into golf/optim.py's OptimizerSet through `build_optimizer(..., matrix_optimizer=factory)`:
the matrices then travel with the replicated AdamW params (one all-reduce of local grads, global-norm
clipping), so every rank applies the same update and no rank logic lives here.

Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 1):
    c = b1 m + (1 - b1) g;  p <- p (1 - lr wd) - lr sign(c);  m <- b2 m + (1 - b2) g
Every coordinate moves by exactly lr, so Lion wants an LR 3-10x below AdamW's and a larger wd.

Adafactor (Shazeer & Stern 2018, Algorithm 4 with the update clipping of section 6), for the last
two dims [.., r, c] of a matrix (a 3-D expert stack is factored per expert):
    b2_t = 1 - t^decay                        (decay -0.8: b2 grows towards 1; t counts from 1)
    R <- b2_t R + (1 - b2_t) mean_cols(g^2 + eps)       [.., r]
    C <- b2_t C + (1 - b2_t) mean_rows(g^2 + eps)       [.., c]
    V = R C^T / mean(R)                       (rank-1 estimate of the second moment: r + c numbers, not r c)
    u = g / sqrt(V);  u <- u / max(1, rms(u) / clip);  optional momentum m <- b1 m + (1 - b1) u
    p <- p (1 - lr wd) - lr u
1-D tensors keep an unfactored second moment. No relative step size and no parameter scaling: the LR
is absolute, so the trainer's LR schedule drives it like the others.
"""
from __future__ import annotations

import torch
from torch import Tensor

from golf.config import KnobError

MATRIX_OPTIMIZERS = ("muon", "adamw", "lion", "adafactor")


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.to(p.dtype)
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(torch.sign(m * b1 + g * (1 - b1)), alpha=-lr)
                m.lerp_(g, 1 - b2)
        return None


class Adafactor(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-2, beta1: float = 0.0, decay: float = -0.8, eps: float = 1e-30,
                 clip: float = 1.0, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "beta1": beta1, "decay": decay, "eps": eps, "clip": clip,
                                  "weight_decay": weight_decay})

    @staticmethod
    def second_moment(state: dict) -> Tensor:
        """The estimate V of E[g^2]: the outer product of the row and column statistics over the
        row statistics' mean (factored), or the full table (1-D)."""
        if "row" in state:
            row, col = state["row"], state["col"]
            return row.unsqueeze(-1) * col.unsqueeze(-2) / row.mean(-1, keepdim=True).unsqueeze(-1)
        return state["v"]

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, b1, wd = group["lr"], group["beta1"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if p.ndim >= 2:
                        state["row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
                        state["col"] = torch.zeros((*p.shape[:-2], p.shape[-1]), dtype=torch.float32, device=p.device)
                    else:
                        state["v"] = torch.zeros_like(g)
                    if b1 > 0:
                        state["exp_avg"] = torch.zeros_like(g)
                state["step"] += 1
                b2 = 1.0 - state["step"] ** group["decay"]
                sq = g.square().add_(group["eps"])
                if p.ndim >= 2:
                    state["row"].lerp_(sq.mean(-1), 1 - b2)
                    state["col"].lerp_(sq.mean(-2), 1 - b2)
                else:
                    state["v"].lerp_(sq, 1 - b2)
                if p.ndim >= 2:  # g / sqrt(V) as two factors: the product R C^T can underflow fp32
                    row = state["row"] / state["row"].mean(-1, keepdim=True)
                    u = g * row.rsqrt().unsqueeze(-1) * state["col"].rsqrt().unsqueeze(-2)
                else:
                    u = g / state["v"].sqrt()
                u.div_((u.square().mean().sqrt() / group["clip"]).clamp(min=1.0))
                if b1 > 0:
                    u = state["exp_avg"].lerp_(u, 1 - b1).clone()
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(u.to(p.dtype), alpha=-lr)
        return None


def _with_base_lr(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    for group in opt.param_groups:  # OptimizerSet sets lr = base_lr x the schedule's scale each step
        group["base_lr"] = group["lr"]
    return opt


def check(cfg) -> None:
    """Errors naming the variable for values no optimizer can use."""
    if cfg.matrix_optimizer not in MATRIX_OPTIMIZERS:
        raise KnobError(f"MATRIX_OPTIMIZER={cfg.matrix_optimizer!r}: expected one of {', '.join(MATRIX_OPTIMIZERS)}")
    for name in ("ADAMW_MATRIX_LR", "ADAMW_MATRIX_WD", "LION_LR", "LION_WD", "ADAFACTOR_LR", "ADAFACTOR_WD"):
        if getattr(cfg, name.lower()) < 0:
            raise KnobError(f"{name}={getattr(cfg, name.lower())}: expected >= 0")
    for name in ("ADAMW_MATRIX_BETA1", "ADAMW_MATRIX_BETA2", "LION_BETA1", "LION_BETA2", "ADAFACTOR_BETA1"):
        if not 0 <= getattr(cfg, name.lower()) < 1:
            raise KnobError(f"{name}={getattr(cfg, name.lower())}: expected 0 <= value < 1")
    if cfg.adafactor_decay >= 0:
        raise KnobError(f"ADAFACTOR_DECAY={cfg.adafactor_decay}: expected < 0 (b2_t = 1 - t^decay rises to 1)")
    if cfg.adafactor_clip <= 0:
        raise KnobError(f"ADAFACTOR_CLIP={cfg.adafactor_clip}: expected > 0 (the update's RMS bound)")


def matrix_factory(cfg):
    """The `matrix_optimizer` factory for build_optimizer; None for Muon (the record)."""
    check(cfg)
    kind = cfg.matrix_optimizer
    if kind == "muon":
        return None
    if kind == "adamw":
        fused = lambda ps: {"fused": True} if ps and ps[0].device.type == "cuda" else {}
        return lambda ps: _with_base_lr(torch.optim.AdamW(
            ps, lr=cfg.adamw_matrix_lr, betas=(cfg.adamw_matrix_beta1, cfg.adamw_matrix_beta2), eps=cfg.adam_eps,
            weight_decay=cfg.adamw_matrix_wd, **fused(ps)))
    if kind == "lion":
        return lambda ps: _with_base_lr(Lion(ps, lr=cfg.lion_lr, betas=(cfg.lion_beta1, cfg.lion_beta2),
                                             weight_decay=cfg.lion_wd))
    return lambda ps: _with_base_lr(Adafactor(ps, lr=cfg.adafactor_lr, beta1=cfg.adafactor_beta1,
                                              decay=cfg.adafactor_decay, clip=cfg.adafactor_clip,
                                              weight_decay=cfg.adafactor_wd))


# which knobs act with which optimizer: the others are refused when set (train_gpt_v2.inert_reason)
OPTIMIZER_KNOBS = {
    "muon": ("MATRIX_LR", "MUON_MOMENTUM", "MUON_MOMENTUM_WARMUP_START", "MUON_MOMENTUM_WARMUP_STEPS",
             "MUON_BACKEND_STEPS", "MUON_ROW_NORMALIZE", "MUON_WD"),
    "adamw": ("ADAMW_MATRIX_LR", "ADAMW_MATRIX_BETA1", "ADAMW_MATRIX_BETA2", "ADAMW_MATRIX_WD"),
    "lion": ("LION_LR", "LION_BETA1", "LION_BETA2", "LION_WD"),
    "adafactor": ("ADAFACTOR_LR", "ADAFACTOR_BETA1", "ADAFACTOR_DECAY", "ADAFACTOR_CLIP", "ADAFACTOR_WD"),
}


def build(named_params, classify, cfg, compile: bool = False):
    """build_optimizer with MATRIX_OPTIMIZER's matrices (the research trainer's Recipe.optimizer)."""
    from golf.optim import build_optimizer
    return build_optimizer(named_params, classify, cfg, compile=compile, matrix_optimizer=matrix_factory(cfg))
