"""Triton kernels, one family per file, each beside a plain PyTorch reference and a switch to use it.

  kernels/softcap_ce.py   softcap_cross_entropy: fused softcapped cross-entropy (forward + backward)
  kernels/leaky_mlp.py    leaky_relu_sq_linear: fused x @ w.T + LeakyReLU(slope)^2 (backward reuses h)
  kernels/segment_mm.py   segment_mm: rows times their group's matrix (TTT's packed LoRA products)

The switch: the environment variable GOLF_KERNELS, read once on first use ("0", "false", "no" or
"off" = the plain PyTorch references everywhere; anything else or unset = the Triton kernels).
set_enabled() overrides it from code (a trainer knob), and every public function also takes
use_kernel=True/False/None (None = the switch). With the switch on, the kernels run on CUDA tensors
and the reference on anything else. use_kernel=True forces the kernel, which on CPU tensors needs
TRITON_INTERPRET=1 set before kernels/*.py were imported (tests/conftest.py does this on machines
without CUDA); that is for tests only, the interpreter is far too slow for training. The reference
path is what the trainer computed before the kernels existed, so torch.compile fuses it as before.
"""
from __future__ import annotations

import os

import torch

_enabled: bool | None = None
_triton_ok: bool | None = None


def enabled() -> bool:
    """The switch: GOLF_KERNELS read once (default on), unless set_enabled() overrode it."""
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get("GOLF_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")
    return _enabled


def set_enabled(on: bool | None) -> None:
    """Force the kernels on/off from code; None re-reads GOLF_KERNELS on next use."""
    global _enabled
    _enabled = None if on is None else bool(on)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            _triton_ok = True
        except Exception:  # no Triton (or a broken install): references only
            _triton_ok = False
    return _triton_ok


def use_triton(t: torch.Tensor, use_kernel: bool | None, interpreted: bool) -> bool:
    """Whether the Triton path runs for tensor t.

    use_kernel None (the default everywhere): the switch, and only for CUDA tensors; CPU tensors get
    the reference, so CPU runs of the trainer never crawl through the interpreter even when
    TRITON_INTERPRET=1 is inherited (the test session sets it). use_kernel True: the kernel, on CUDA
    or, when the calling module's kernels were built for the interpreter, on CPU (the tests);
    anything else is an error. use_kernel False: the reference.
    interpreted: whether the calling module's kernels were built for the interpreter (decided by
    TRITON_INTERPRET when the module was imported, so it is the module's flag, not today's env)."""
    if use_kernel is None:
        return enabled() and t.is_cuda and triton_available()
    if not use_kernel:
        return False
    if not triton_available():
        raise RuntimeError("use_kernel=True but Triton cannot be imported")
    if not (t.is_cuda or interpreted):
        raise RuntimeError(f"use_kernel=True on a {t.device.type} tensor: the Triton kernels need CUDA tensors, or "
                           "TRITON_INTERPRET=1 set before kernels/*.py are imported")
    return True
