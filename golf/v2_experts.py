"""Mixture-of-experts MLPs in the research trainer's blocks: the learned router (golf/moe.py) or the
self-organizing one (golf/som_router.py), picked by MOE_ROUTER, on the layers MOE_LAYERS names.

What train_gpt_v2.py's model calls:
    make_experts(cfg, layer)   the layer's MoE MLP, or None where it stays dense
    pop_aux_loss(layers)       weighted balance + z losses of the training forward just run
    clear_stats(model)         forget usage gathered so far (the trainer's reset after compile priming)
    describe(model)            parameter counts: total, active per token, trainable, frozen, gradient-free
    report(model, step, log)   per-layer expert usage since the last report, summed over ranks

An expert has MOE_EXPERT_MULT x MODEL_DIM hidden units (0: MLP_MULT, each expert the dense MLP's
size) and the block's activation: LeakyReLU(LEAKY_SLOPE)^2, ReLU^2 or GELU; SwiGLU experts do not
exist here. SOM layer i draws its frozen experts from seed SOM_SEED + i, so a model rebuilt from
its config regenerates them and the artifact never stores them.
"""
from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from golf import dist
from golf.config import KnobError
from golf.moe import MoEMLP, collect_moe_metrics, expert_metrics, moe_layers, param_counts
from golf.som_router import SOMMoE, SOMSettings, param_report, som_layers

# constructor argument -> the knob that sets it, so a refused value is reported by its variable
_MOE_KNOB_OF = {"num_experts": "MOE_EXPERTS", "top_k": "MOE_TOP_K", "routing": "MOE_ROUTING",
                "capacity_factor": "MOE_CAPACITY_FACTOR", "router_noise": "MOE_ROUTER_NOISE",
                "aux_loss_weight": "MOE_AUX_LOSS_WEIGHT", "z_loss_weight": "MOE_Z_LOSS_WEIGHT"}
_SOM_FIELDS = [f.name for f in dataclasses.fields(SOMSettings)]


def _knob_error(err: ValueError, knob_of: dict[str, str]) -> KnobError:
    msg = str(err)
    for name, knob in knob_of.items():
        msg = re.sub(rf"\b{name}=", f"{knob}=", msg)
    return KnobError(msg)


def parse_layers(raw: str, num_layers: int) -> set[int]:
    """MOE_LAYERS: '' (every layer) or comma-separated indices and ranges a-b (inclusive)."""
    if not raw.strip():
        return set(range(num_layers))
    layers = set()
    try:
        for part in raw.split(","):
            lo, _, hi = part.strip().partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        layers = set()
    if not layers or not all(0 <= i < num_layers for i in layers):
        raise KnobError(f"MOE_LAYERS={raw!r}: expected comma-separated layer indices or ranges a-b "
                        f"within 0..{num_layers - 1} (NUM_LAYERS={num_layers}), or empty for every layer")
    return layers


def expert_hidden(cfg) -> int:
    return int((cfg.moe_expert_mult or cfg.mlp_mult) * cfg.model_dim)


def _activation(cfg) -> tuple[str, float]:
    """(MoE activation name, LeakyReLU slope) for MLP_ACTIVATION; ReLU^2 is the slope-0 LeakyReLU^2."""
    if cfg.mlp_activation == "swiglu":
        raise KnobError("MLP_ACTIVATION=swiglu with MOE_EXPERTS>0: experts are two-matrix MLPs; "
                        "expected leaky_relu2, relu2 or gelu")
    return {"leaky_relu2": ("leaky_relu2", cfg.leaky_slope), "relu2": ("leaky_relu2", 0.0),
            "gelu": ("gelu", 0.0)}[cfg.mlp_activation]


def som_settings(cfg) -> SOMSettings:
    """SOMSettings from the SOM_* knobs (field f is knob SOM_F) and the shared MoE knobs."""
    act, slope = _activation(cfg)
    knob_of = {"num_experts": "MOE_EXPERTS", "top_k": "MOE_TOP_K", "expert_hidden": "MOE_EXPERT_MULT",
               **{f: f"SOM_{f.upper()}" for f in _SOM_FIELDS if hasattr(cfg, f"som_{f}")}}
    own = {f: getattr(cfg, f"som_{f}") for f in _SOM_FIELDS if hasattr(cfg, f"som_{f}")}
    try:
        return SOMSettings(num_experts=cfg.moe_experts, top_k=cfg.moe_top_k, expert_hidden=expert_hidden(cfg),
                           activation=act, leaky_slope=slope, **own)
    except ValueError as e:
        raise _knob_error(e, knob_of) from None


def make_experts(cfg, layer: int) -> nn.Module | None:
    if cfg.moe_experts == 0 or layer not in parse_layers(cfg.moe_layers, cfg.num_layers):
        return None
    if cfg.moe_router == "som":
        s = som_settings(cfg)
        return SOMMoE(cfg.model_dim, s, seed=s.seed + layer)
    act, slope = _activation(cfg)
    try:
        return MoEMLP(cfg.model_dim, expert_hidden(cfg), cfg.moe_experts, cfg.moe_top_k,
                      activation=F.gelu if act == "gelu" else None, slope=slope, routing=cfg.moe_routing,
                      capacity_factor=cfg.moe_capacity_factor, router_noise=cfg.moe_router_noise,
                      aux_loss_weight=cfg.moe_aux_loss_weight, z_loss_weight=cfg.moe_z_loss_weight)
    except ValueError as e:
        raise _knob_error(e, _MOE_KNOB_OF) from None


def pop_aux_loss(layers: tuple[MoEMLP, ...]) -> torch.Tensor:
    return sum(m.pop_aux_loss() for m in layers)


def clear_stats(model: nn.Module) -> None:
    for _, m in moe_layers(model):
        m.usage_stats.zero_()
        m.aux_losses.clear()
    for _, m in som_layers(model):
        m.usage_counts.zero_()
        m._saved = None


def describe(model: nn.Module) -> dict:
    """Parameter counts of a model with experts ({} without): total and active per token (an MoE
    layer's experts count top_k / E), trainable, and for SOM layers the frozen experts (buffers,
    regenerated from the seed) and the gradient-free keys."""
    moe, som = moe_layers(model), som_layers(model)
    if not moe and not som:
        return {}
    total, active = param_counts(model)
    info = {"params_total": total, "params_active": active}
    if som:
        rep = param_report(model)
        frozen_active = sum((m.w1.numel() + m.w2.numel()) * m.settings.top_k // m.settings.num_experts
                            for _, m in som)
        info.update(params_trainable=rep["trainable"], params_frozen=rep["frozen"],
                    params_frozen_active=frozen_active, params_gradient_free=rep["gradient_free"])
    return info


def report(model: nn.Module, step: int, log) -> dict:
    """Logs and returns each expert layer's usage since the last report (training forwards only),
    summed over ranks; call it on every rank. Learned-router layers add dropped_frac and the mean
    balance / z losses. Layers that saw no training token (the step-0 validation) are left out."""
    layers = collect_moe_metrics(model)
    som = som_layers(model)
    if som:
        counts = torch.stack([m.usage_counts for _, m in som]).double()
        dist.all_reduce_(counts)
        for (name, m), row in zip(som, counts.cpu()):
            m.usage_counts.zero_()
            layers[name] = expert_metrics(row)
    layers = {name: m for name, m in layers.items() if sum(m["tokens_per_expert"])}  # none before training
    for name, m in layers.items():
        extra = "".join(f" {k}:{m[k]:.4f}" for k in ("dropped_frac", "balance_loss", "z_loss") if k in m)
        log(f"experts step:{step} layer:{name} gini:{m['gini']:.4f} entropy:{m['entropy']:.4f} "
            f"dead:{m['dead_experts']} used_frac:{m['used_frac']:.4f} max_mean_load:{m['max_mean_load']:.3f}{extra} "
            f"tokens:{','.join(map(str, m['tokens_per_expert']))}")
    return {"experts": layers} if layers else {}
