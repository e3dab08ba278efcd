"""Calibration statistics for GPTQ (SPEC.md section 5, "Quantization").

GPTQ minimises the output error of a linear layer y = W x over calibration inputs, which only needs
the inputs' second moment H = E[x x^T] (in_features x in_features) per weight. HessianCollector
accumulates it from forward pre-hooks, so calibration is just running the model on training batches.
A module that runs several times per forward (looped layers) contributes every pass's input: the
quantized weight serves all of them.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


class HessianCollector:
    """Running sums of x x^T (fp32, on the inputs' device) and token counts, keyed by weight name."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._hooked: set[str] = set()

    @torch.no_grad()
    def add(self, name: str, x: torch.Tensor) -> None:
        """Adds the tokens of x ([..., in_features], any float dtype) to name's statistics."""
        if x.dim() < 1 or not x.is_floating_point():
            raise ValueError(f"HessianCollector.add({name!r}): expected a float tensor [..., in_features], "
                             f"got {tuple(x.shape)} {x.dtype}")
        d = x.shape[-1]
        # fp32 before the matmul: bf16 activations would lose most of H's small eigen-directions
        x = x.detach().reshape(-1, d).float()
        H = self._sums.get(name)
        if H is None:
            H = self._sums[name] = torch.zeros(d, d, dtype=torch.float32, device=x.device)
            self._counts[name] = 0
        elif H.shape[0] != d or H.device != x.device:
            raise ValueError(f"HessianCollector.add({name!r}): input has {d} features on {x.device}, "
                             f"earlier inputs had {H.shape[0]} on {H.device}")
        H.addmm_(x.T, x)  # in place: no [d, d] temporary per call
        self._counts[name] += x.shape[0]

    @property
    def counts(self) -> dict[str, int]:
        """Tokens accumulated per weight name."""
        return dict(self._counts)

    def hessians(self) -> dict[str, torch.Tensor]:
        """{name: sum(x x^T) / tokens}: the mean, so Hessians from different token counts compare."""
        return {name: H / self._counts[name] for name, H in self._sums.items()}

    def attach(self, model: nn.Module, names: Mapping[str, nn.Module]) -> "HessianCollector":
        """Hooks each module (one applying F.linear(input, module.weight)) so its input is added under
        its weight's name. The names are checked against model's parameters, so a Hessian can never be
        filed under a weight it was not measured for. Returns self, for `with collector.attach(...):`."""
        params = dict(model.named_parameters())
        for name, module in names.items():
            weight = getattr(module, "weight", None)
            if name not in params or weight is not params[name]:
                raise ValueError(f"HessianCollector.attach: module given for {name!r} ({type(module).__name__}) "
                                 f"does not hold the model's parameter of that name as its .weight")
            if name in self._hooked:
                raise ValueError(f"HessianCollector.attach: {name!r} is already hooked; its inputs would count twice")
            self._hooked.add(name)
            self._handles.append(module.register_forward_pre_hook(
                lambda _module, args, name=name: self.add(name, args[0])))
        return self

    def detach(self) -> None:
        """Removes every hook; the accumulated statistics stay."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()

    def __enter__(self) -> "HessianCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
