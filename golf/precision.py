"""Mixed precision for the research trainer (AMP_DTYPE) and the CUDA memory cap (CUDA_MEMORY_FRACTION).

auto: bf16 autocast on a GPU that supports it (the record), fp16 with dynamic loss scaling on one that
does not (V100, T4, older consumer cards), no autocast on CPU (as the record). bf16 / fp16 force the
dtype, also on CPU (CPU autocast runs both), so the fp16 path is testable without a GPU.

fp16's 5 exponent bits underflow small gradients, so the loss is multiplied by a scale S before
backward and the gradients divided by S before the optimizer; a step whose gradients hold an inf or
NaN (S too large) is skipped and S halved; after `interval` good steps in a row S doubles. This is
torch.amp.GradScaler's policy (init 2^16, growth 2, backoff 0.5, interval 2000), written here because
GradScaler only steps torch.optim optimizers and golf/optim.py's OptimizerSet (sharded Muon plus its
own communication) is not one. The loss keeps its value (only its gradient is scaled), so logged
train losses are unchanged. The inf check is one all-reduce, so every rank skips the same steps.
"""
from __future__ import annotations

import torch

from golf import dist
from golf.config import KnobError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def choose_dtype(amp: str, device: torch.device, bf16_supported: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for AMP_DTYPE on `device` (None: no autocast)."""
    if amp not in ("auto", *AMP_DTYPES):
        raise KnobError(f"AMP_DTYPE={amp!r}: expected auto, bf16 or fp16")
    if amp != "auto":
        return AMP_DTYPES[amp]
    if device.type != "cuda":
        return None
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


class LossScaler:
    """Dynamic loss scaling (see the module docstring)."""

    def __init__(self, init: float = 2.0 ** 16, growth: float = 2.0, backoff: float = 0.5, interval: int = 2000):
        self.scale, self.growth, self.backoff, self.interval = float(init), growth, backoff, interval
        self.good_steps = 0
        self.skipped = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` with its value unchanged and its gradient multiplied by the scale."""
        return loss + (self.scale - 1.0) * (loss - loss.detach())

    @torch.no_grad()
    def unscale_(self, params) -> bool:
        """Divides every grad by the scale; True when some rank's grads hold an inf or NaN."""
        grads = [p.grad for p in params if p.grad is not None]
        bad = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)
            for g in grads:
                bad += (~torch.isfinite(g)).any().float()
        return bool(dist.all_reduce_(bad).item() > 0)

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps == self.interval:
            self.scale *= self.growth
            self.good_steps = 0

    def wrap(self, opt) -> None:
        """Makes opt.step(lr_scale, momentum) unscale first and skip (grads dropped) on an inf."""
        inner = opt.step

        def step(lr_scale: float, muon_momentum: float) -> torch.Tensor:
            found_inf = self.unscale_(opt.params)
            self.update(found_inf)
            if found_inf:
                opt.zero_grad()
                return torch.full((), float("inf"))
            return inner(lr_scale, muon_momentum)

        opt.step = step
        # the scaler's state travels with the optimizer's, so the trainer's reset after compile priming
        # (opt.load_state_dict of the initial snapshot) also restores the initial scale
        inner_state, inner_load = opt.state_dict, opt.load_state_dict
        fields = ("scale", "good_steps", "skipped")

        def state_dict() -> dict:
            return {**inner_state(), "loss_scaler": {f: getattr(self, f) for f in fields}}

        def load_state_dict(state: dict) -> None:
            state = dict(state)
            for f, v in state.pop("loss_scaler", {}).items():
                setattr(self, f, v)
            inner_load(state)

        opt.state_dict, opt.load_state_dict = state_dict, load_state_dict


def apply_memory_fraction(fraction: float, device: torch.device) -> str | None:
    """Caps this process's CUDA caching allocator at `fraction` of the GPU (0: no cap; ignored on
    CPU). Returns the log line, or None when nothing was done."""
    if not 0.0 <= fraction <= 1.0:
        raise KnobError(f"CUDA_MEMORY_FRACTION={fraction}: expected a fraction in [0, 1] (0: no cap)")
    if fraction == 0:
        return None
    if device.type != "cuda":
        return f"cuda_memory_fraction:{fraction:g} ignored (device {device})"
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    total = torch.cuda.get_device_properties(device).total_memory
    return f"cuda_memory_fraction:{fraction:g} cap:{fraction * total / 2**30:.1f}GiB of {total / 2**30:.1f}GiB"
