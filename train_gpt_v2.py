"""train_gpt_v2.py: the research trainer: train_gpt.py's record stack plus the ablation surface.

It extends train_gpt.py by import, never by copy: the same loop, optimizer, evaluation and export
run through train_gpt.main() with this file's Recipe. Every knob added here defaults to the record
stack, so with no overrides the model's logits equal train_gpt.py's bit for bit (tests/test_v2.py).

  torchrun --standalone --nproc_per_node=8 train_gpt_v2.py      # the record stack
  MLP_ACTIVATION=swiglu NORM_TYPE=layer torchrun ... train_gpt_v2.py
  python train_gpt_v2.py --help                                  # every setting, with its default
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import train_gpt as tg
from golf import dist
from golf.config import Knob, KnobError

V2_KNOBS = (
    Knob("MLP_ACTIVATION", str, "leaky_relu2",
         "leaky_relu2 (LeakyReLU(LEAKY_SLOPE)^2), relu2, gelu, or swiglu (hidden scaled by 2/3: parameter-matched)"),
    Knob("NORM_TYPE", str, "rms", "rms (RMSNorm) or layer (LayerNorm); neither has learned parameters"),
)
KNOBS = tg.KNOBS + V2_KNOBS
ACTIVATIONS = ("leaky_relu2", "relu2", "gelu", "swiglu")
NORMS = {"rms": tg.rms_norm, "layer": lambda x: F.layer_norm(x, (x.size(-1),))}


def swiglu_hidden(dim: int, mult: float) -> int:
    """SwiGLU has three matrices instead of two: 2/3 of the dense hidden width keeps the parameter
    count within 1% of the dense MLP's (rounding to a multiple of 8 would miss that at small widths)."""
    return max(1, round(2 * int(mult * dim) / 3))


class GatedMLP(nn.Module):
    """SwiGLU: proj(silu(gate(x)) * up(x)); proj starts at zero like the dense MLP's."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = tg.CastedLinear(dim, hidden, "orthogonal")
        self.fc = tg.CastedLinear(dim, hidden, "orthogonal")
        self.proj = tg.CastedLinear(hidden, dim, "zero")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.gate(x)) * self.fc(x))


class ActMLP(tg.MLP):
    """The dense MLP with another activation."""

    def __init__(self, dim: int, mult: float, act):
        super().__init__(dim, mult, 0.0)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class BlockV2(tg.Block):
    def __init__(self, cfg, layer: int):
        super().__init__(cfg, layer)
        self.norm = NORMS[cfg.norm_type]

    def make_mlp(self, cfg) -> nn.Module:
        act = cfg.mlp_activation
        if act == "leaky_relu2":
            return super().make_mlp(cfg)
        if act == "swiglu":
            return GatedMLP(cfg.model_dim, swiglu_hidden(cfg.model_dim, cfg.mlp_mult))
        return ActMLP(cfg.model_dim, cfg.mlp_mult, {"relu2": lambda h: F.relu(h).square(), "gelu": F.gelu}[act])


class GPTv2(tg.GPT):
    block = BlockV2

    def __init__(self, cfg):
        if cfg.mlp_activation not in ACTIVATIONS:
            raise KnobError(f"MLP_ACTIVATION={cfg.mlp_activation!r}: expected one of {', '.join(ACTIVATIONS)}")
        if cfg.norm_type not in NORMS:
            raise KnobError(f"NORM_TYPE={cfg.norm_type!r}: expected one of {', '.join(NORMS)}")
        super().__init__(cfg)
        self.norm = NORMS[cfg.norm_type]


def param_kind(name: str, p: torch.Tensor) -> str:
    """The record's grouping; SwiGLU's gate matrix is a block matrix too (Muon)."""
    if name.startswith("blocks.") and name.endswith("mlp.gate.weight"):
        return "matrix"
    return tg.param_kind(name, p)


RECIPE = tg.Recipe(knobs=KNOBS, model=GPTv2, classify=param_kind, script=__file__,
                   title=__doc__.strip().splitlines()[0])

if __name__ == "__main__":
    dist.run_main(lambda: tg.main(RECIPE))
