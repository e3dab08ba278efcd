"""Optimizers for the trainer: sharded Muon (Polar Express + MuonEq-R) on the block matrices, AdamW on
the replicated small tensors, one gradient-communication pass with global-norm clipping, a weight EMA
and the LR / momentum schedules. No DDP: the trainer runs backward on its micro-batches (grads are this
rank's local means) and `OptimizerSet.step` does all communication.

API
---
    opt = build_optimizer(named_params, classify, hp, compile=False, matrix_optimizer=None)
        named_params: dict[str, Parameter]  (the same order on every rank, e.g. dict(model.named_parameters()))
        classify(name, param) -> "matrix" | "embed" | "scalar"  ("matrix": 2-D, or a 3-D stack such as MoE
            experts [E, rows, cols], whose E matrices each get their own Muon update)
        hp: object with matrix_lr, scalar_lr, tied_embed_lr, muon_wd, embed_wd, adam_wd, beta1, beta2,
            adam_eps, muon_backend_steps, muon_row_normalize, grad_clip_norm
        matrix_optimizer: None (Muon), or a factory list[Parameter] -> torch.optim.Optimizer whose param
            groups carry "base_lr" (the research trainer's AdamW / Lion / Adafactor): the matrices are then
            replicated like the AdamW params (one all-reduce, clipped with the rest) and stepped by it
    grad_norm = opt.step(lr_scale, muon_momentum)  # 0-d tensor: global grad norm before clipping
    snap = opt.state_dict(); ...; opt.load_state_dict(snap)  # per-rank snapshot (compile-priming reset)

    ema = EMA(model, decay); ema.update() every step; ema.copy_to(model) at the end
    lr_schedule(progress, warmdown_frac, min_lr) and momentum_warmup(step, start, end, steps)

One optimizer step, in order
----------------------------
1. Matrix grads, grouped by (shape, dtype) in first-seen order, are stacked into [N_pad, r, c] (N padded
   with zero matrices to a multiple of the world size) and reduce-scattered (sum, then / world): rank k
   holds the averaged grads of matrices [k*S, (k+1)*S), S = N_pad / world.
2. Replicated grads (embed + scalar) are packed into one flat fp32 buffer plus one extra slot holding this
   rank's sum of squares of its averaged matrix shards. One all-reduce (sum) of that buffer averages the
   replicated grads and adds up the matrix part of the squared norm, so the global norm over ALL params
   costs no extra collective: |g|^2 = slot + |averaged replicated grads|^2 (zero padding adds nothing).
3. Clipping (GRAD_CLIP_NORM > 0): coef = min(1, clip / (norm + 1e-6)) as in clip_grad_norm_, multiplied
   into the shards and the replicated grads as a device tensor (no host sync).
4. Muon on the rank's shard only (momentum buffers exist only for the shard): Nesterov momentum,
   MuonEq-R row normalisation (MUON_ROW_NORMALIZE), Polar Express. The bf16 results are all-gathered to
   [N_pad, r, c] and every rank applies p <- p * (1 - lr * MUON_WD) - lr * max(1, r/c)**0.5 * update to
   all matrices: same inputs and elementwise ops on every rank, so parameters stay identical, and the
   bf16 gather moves half the bytes of gathering fp32 parameters.
5. AdamW (decoupled weight decay p <- p * (1 - lr * wd)) on the replicated params, overlapping step 4's
   gathers. With a `matrix_optimizer` the matrices are replicated params too (steps 1 and 4 have no
   groups) and that optimizer steps them here, at its base_lr x lr_scale.
6. All grads are set to None. A parameter without a grad counts as a zero grad, so every rank always
   issues the same collectives.
A single process runs the same code with the collectives skipped.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from golf.dist import rank_and_world

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): one minimax-optimal (a, b, c)
# per iteration of X <- a X + (b A + c A^2) X, A = X X^T, computed for 5 iterations with safety factor
# 2e-2 and cushion 2. Values as published in karpathy/nanochat nanochat/optims.py and modded-nanogpt,
# and used by the parameter-golf records (POLAR_EXPRESS_NS=1).
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# The coefficients assume the spectral norm may exceed its bound by up to 2%: dividing by 1.02 x the
# Frobenius norm (>= the spectral norm) keeps every singular value inside the designed interval.
_PE_SAFETY = 1.02
_PE_EPS = 1e-6
_ROW_EPS = 1e-7  # as the MuonEq-R records: a zero row stays zero instead of becoming NaN
_CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_

_HP_FIELDS = ("matrix_lr", "scalar_lr", "tied_embed_lr", "muon_wd", "embed_wd", "adam_wd", "beta1", "beta2",
              "adam_eps", "muon_backend_steps", "muon_row_normalize", "grad_clip_norm")


# ----------------------------------------------------------------------------- orthogonalisation
def polar_express(g: Tensor, steps: int = 5) -> Tensor:
    """Approximate polar factor U V^T of g ([rows, cols] or a stack [N, rows, cols]), in bf16.

    Singular values come out near 1, not exactly 1 (Muon only needs the direction): with 5 steps, every
    singular value s of g with s / |g|_F >= 2e-3 lands in [0.86, 1.14] in exact arithmetic, [0.85, 1.15]
    in bf16; smaller ones (below the range the coefficients were designed for) are only partly grown.
    Works on the wide orientation (A = X X^T is the smaller Gram); a stack is one batched call."""
    if g.ndim not in (2, 3):
        raise ValueError(f"polar_express: expected a matrix or a stack [N, rows, cols], got shape {tuple(g.shape)}")
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"MUON_BACKEND_STEPS={steps}: expected 1..{len(POLAR_EXPRESS_COEFFS)} "
                         "(one Polar Express coefficient triple per iteration)")
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * _PE_SAFETY + _PE_EPS)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


def row_normalize(u: Tensor) -> Tensor:
    """MuonEq-R: each row (last dim) scaled to unit L2 norm, before orthogonalisation (no rescale after:
    Polar Express normalises the whole matrix anyway)."""
    return u / u.norm(dim=-1, keepdim=True).clamp_min(_ROW_EPS)


def muon_shard_update(grad: Tensor, momentum_buf: Tensor, momentum: Tensor, steps: int,
                      row_norm: bool) -> Tensor:
    """Muon direction for a stack of averaged grads [S, r, c]; updates `momentum_buf` in place.
    `momentum` is a 0-d tensor so a compiled version does not recompile as the warmup changes it."""
    momentum_buf.mul_(momentum).add_(grad)
    u = grad + momentum * momentum_buf  # Nesterov
    if row_norm:
        u = row_normalize(u)
    return polar_express(u, steps)


# ----------------------------------------------------------------------------- collectives
def _reduce_scatter(out: Tensor, inp: Tensor):
    # newer torch calls it reduce_scatter_single and deprecates the old name (same signature)
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, op=dist.ReduceOp.SUM, async_op=True)


def _all_gather(out: Tensor, inp: Tensor):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, async_op=True)


def _copy_grads(dst: list[Tensor], grads: list[Tensor | None]) -> None:
    """dst[i] <- grads[i], zero where a parameter has no grad (keeps the collectives identical)."""
    have = [(d, g) for d, g in zip(dst, grads) if g is not None]
    for d, g in zip(dst, grads):
        if g is None:
            d.zero_()
    if have:
        torch._foreach_copy_([d for d, _ in have], [g.view_as(d) for d, g in have])


# ----------------------------------------------------------------------------- optimizer set
@dataclass
class _MatrixGroup:
    """Same-shape matrices optimised as one stack; this rank owns stack rows [rank*shard, (rank+1)*shard)."""
    params: list[Tensor]  # updated in place: 2-D parameters, or views of single matrices of a 3-D stack
    sources: list[tuple[Tensor, int | None]]  # (parameter, matrix index in a 3-D stack) of each entry
    shape: tuple[int, int]
    shard: int  # matrices per rank (after padding)
    grads: Tensor  # [n_pad, r, c] stacked local grads; padding rows stay zero
    reduced: Tensor  # [shard, r, c] averaged grads of this rank's matrices (a view of `grads` in one process)
    momentum: Tensor  # [shard, r, c]
    gathered: Tensor  # [n_pad, r, c] bf16 orthogonalised updates of every matrix

    def param_grads(self) -> list[Tensor | None]:
        return [p.grad if i is None or p.grad is None else p.grad[i] for p, i in self.sources]

    @property
    def scale(self) -> float:
        # as the records: equal update RMS per input dimension for tall matrices
        return max(1.0, self.shape[0] / self.shape[1]) ** 0.5


class OptimizerSet:
    """Muon (sharded) + AdamW behind one `step`; built by `build_optimizer` (see the module docstring)."""

    def __init__(self, matrices: list[tuple[str, Tensor]], embeds: list[tuple[str, Tensor]],
                 scalars: list[tuple[str, Tensor]], hp, compile: bool = False, matrix_optimizer=None):
        self.world = rank_and_world()[1]
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.matrix_lr, self.muon_wd = float(hp.matrix_lr), float(hp.muon_wd)
        self.backend_steps, self.row_norm = int(hp.muon_backend_steps), bool(hp.muon_row_normalize)
        self.grad_clip_norm = float(hp.grad_clip_norm)
        everything = [p for _, p in matrices + embeds + scalars]
        self.params = everything
        self.device = everything[0].device
        self._momentum_t = torch.zeros((), dtype=torch.float32)  # CPU 0-d: no recompiles, no H2D copy
        self._update = torch.compile(muon_shard_update, dynamic=False, fullgraph=True) if compile \
            else muon_shard_update
        self.matrix_opt = None
        if matrix_optimizer is not None and matrices:
            # the matrices join the replicated params: averaged by the one all-reduce, clipped with the rest
            self.matrix_opt = matrix_optimizer([p for _, p in matrices])
        handed_over, matrices = (matrices, []) if self.matrix_opt is not None else ([], matrices)

        # matrices grouped by (shape, dtype, device), in first-seen order (the same on every rank); a 3-D
        # parameter (MoE experts [E, rows, cols]) is E matrices, each with its own Muon update
        by_key: dict[tuple, list[tuple[Tensor, int | None]]] = {}
        for _, p in matrices:
            for i in range(p.shape[0]) if p.ndim == 3 else (None,):
                by_key.setdefault((tuple(p.shape[-2:]), p.dtype, p.device), []).append((p, i))
        self.groups: list[_MatrixGroup] = []
        for (shape, dtype, device), sources in by_key.items():
            ps = [p if i is None else p.detach()[i] for p, i in sources]
            shard = math.ceil(len(ps) / self.world)
            n_pad = shard * self.world
            grads = torch.zeros((n_pad, *shape), dtype=dtype, device=device)
            if self.world > 1:
                reduced = torch.zeros((shard, *shape), dtype=dtype, device=device)
                gathered = torch.zeros((n_pad, *shape), dtype=torch.bfloat16, device=device)
            else:
                reduced, gathered = grads, grads.new_empty(0)  # no copies; the update is used directly
            self.groups.append(_MatrixGroup(ps, sources, shape, shard, grads, reduced,
                                            torch.zeros((shard, *shape), dtype=dtype, device=device), gathered))

        # replicated params: one flat fp32 buffer, last slot carries the matrix part of the squared norm
        self.replicated = [p for _, p in handed_over + embeds + scalars]
        self._flat = torch.zeros(sum(p.numel() for p in self.replicated) + 1, dtype=torch.float32,
                                 device=self.device)
        self._flat_views, off = [], 0
        for p in self.replicated:
            self._flat_views.append(self._flat[off:off + p.numel()].view(p.shape))
            off += p.numel()

        adam_groups = []
        for ps, lr, wd in (([p for _, p in embeds], hp.tied_embed_lr, hp.embed_wd),
                           ([p for _, p in scalars], hp.scalar_lr, hp.adam_wd)):
            if ps:
                adam_groups.append({"params": ps, "lr": float(lr), "base_lr": float(lr), "weight_decay": float(wd)})
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.adam = torch.optim.AdamW(adam_groups, betas=(float(hp.beta1), float(hp.beta2)), eps=float(hp.adam_eps),
                                      **fused) if adam_groups else None

    def describe(self) -> str:
        """One line for the log: what each optimizer owns."""
        mats = " ".join(f"{len(g.params)}x{g.shape[0]}x{g.shape[1]}" for g in self.groups)
        adam = " ".join(f"{len(g['params'])}@lr{g['base_lr']:g}/wd{g['weight_decay']:g}"
                        for g in self.adam.param_groups) if self.adam else "-"
        if self.matrix_opt is not None:
            g = self.matrix_opt.param_groups[0]
            first = f"{type(self.matrix_opt).__name__.lower()}[{len(g['params'])}@lr{g['base_lr']:g}]"
        else:
            first = f"muon[{mats or '-'}] row_normalize:{int(self.row_norm)} steps:{self.backend_steps}"
        return f"{first} adamw[{adam}] world:{self.world}"

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr_scale: float, muon_momentum: float) -> Tensor:
        """Communicates grads, clips, updates every parameter, sets grads to None. Returns the global
        grad norm before clipping (0-d tensor on the device; reading it syncs)."""
        world = self.world
        # 1. matrix grads: stack, reduce-scatter (async, all groups back to back), average
        works = []
        for grp in self.groups:
            _copy_grads(list(grp.grads[:len(grp.params)].unbind(0)), grp.param_grads())
            if world > 1:
                works.append(_reduce_scatter(grp.reduced, grp.grads))
        for w in works:
            w.wait()
        shard_sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for grp in self.groups:
            if world > 1:
                grp.reduced.div_(world)
            shard_sq = shard_sq + torch.linalg.vector_norm(grp.reduced, dtype=torch.float32).square()

        # 2. replicated grads + the matrix part of the squared norm: one all-reduce
        _copy_grads(self._flat_views, [p.grad for p in self.replicated])
        self._flat[-1] = shard_sq
        if world > 1:
            dist.all_reduce(self._flat)
            self._flat[:-1].div_(world)
        rep = self._flat[:-1]
        norm = (self._flat[-1] + torch.dot(rep, rep)).sqrt()

        # 3. clip (device tensor: no host sync)
        if self.grad_clip_norm > 0:
            coef = (self.grad_clip_norm / (norm + _CLIP_EPS)).clamp(max=1.0)
            rep.mul_(coef)
            for grp in self.groups:
                grp.reduced.mul_(coef)

        # 4. Muon on this rank's shard, gathers overlapping the next group's math and the AdamW step
        lr = self.matrix_lr * lr_scale
        self._momentum_t.fill_(muon_momentum)
        gathers, sent, updates = [], [], []
        for grp in self.groups:
            upd = self._update(grp.reduced, grp.momentum, self._momentum_t, self.backend_steps, self.row_norm)
            if world > 1:
                sent.append(upd.contiguous())  # held until the gather is waited on
                gathers.append(_all_gather(grp.gathered, sent[-1]))
                updates.append(grp.gathered)
            else:
                updates.append(upd)

        # 5. AdamW on the replicated params; their grads are the reduced views of the flat buffer
        for p, v in zip(self.replicated, self._flat_views):
            p.grad = v if v.dtype == p.dtype else v.to(p.dtype)
        if self.adam is not None:
            for group in self.adam.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
            self.adam.step()
        if self.matrix_opt is not None:
            for group in self.matrix_opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
            self.matrix_opt.step()

        for w in gathers:
            w.wait()
        for grp, upd in zip(self.groups, updates):
            if self.muon_wd > 0:
                torch._foreach_mul_(grp.params, 1.0 - lr * self.muon_wd)  # decoupled weight decay
            full = upd[:len(grp.params)].to(grp.params[0].dtype)
            torch._foreach_add_(grp.params, list(full.unbind(0)), alpha=-lr * grp.scale)

        # 6. grads are consumed
        self.zero_grad()
        return norm

    def state_dict(self) -> dict:
        """A snapshot (tensors copied) of this rank's state: its momentum shards and the AdamW state."""
        return {"world_size": self.world,
                "muon_momentum": [g.momentum.clone() for g in self.groups],
                "adam": copy.deepcopy(self.adam.state_dict()) if self.adam else None,
                "matrix_opt": copy.deepcopy(self.matrix_opt.state_dict()) if self.matrix_opt else None}

    def load_state_dict(self, state: dict) -> None:
        """Restores a snapshot from `state_dict` of this optimizer (same world size and parameters); the
        snapshot stays untouched, so it can be loaded again."""
        if state.get("world_size") != self.world:
            raise ValueError(f"optimizer state is for world_size={state.get('world_size')}, "
                             f"this run has {self.world}: Muon momentum is sharded per rank")
        bufs = state["muon_momentum"]
        if [tuple(b.shape) for b in bufs] != [tuple(g.momentum.shape) for g in self.groups]:
            raise ValueError("optimizer state's Muon momentum shapes "
                             f"{[tuple(b.shape) for b in bufs]} do not match this model's "
                             f"{[tuple(g.momentum.shape) for g in self.groups]}")
        for g, b in zip(self.groups, bufs):
            g.momentum.copy_(b)  # in place: a compiled update keeps its buffers
        if self.adam is not None:
            # a copy: torch's load_state_dict may keep the given tensors and step them in place later
            self.adam.load_state_dict(copy.deepcopy(state["adam"]))
        if self.matrix_opt is not None:
            self.matrix_opt.load_state_dict(copy.deepcopy(state["matrix_opt"]))


def build_optimizer(named_params: dict[str, nn.Parameter], classify: Callable[[str, nn.Parameter], str], hp,
                    compile: bool = False, matrix_optimizer=None) -> OptimizerSet:
    """Splits parameters by `classify` into Muon matrices and AdamW embed/scalar groups (or, with
    `matrix_optimizer`, matrices stepped by the optimizer it builds; see the module docstring).
    `compile` wraps the per-shard Muon math in torch.compile: one graph per matrix shape, so keep the
    number of distinct shapes under dynamo's recompile limit (8 by default)."""
    missing = [f for f in _HP_FIELDS if not hasattr(hp, f)]
    if missing:
        raise ValueError(f"build_optimizer: hp lacks {', '.join(missing)}")
    if not 1 <= int(hp.muon_backend_steps) <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"MUON_BACKEND_STEPS={hp.muon_backend_steps}: expected 1..{len(POLAR_EXPRESS_COEFFS)} "
                         "(one Polar Express coefficient triple per iteration)")
    if hp.grad_clip_norm < 0:
        raise ValueError(f"GRAD_CLIP_NORM={hp.grad_clip_norm}: expected >= 0 (0 disables clipping)")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(hp, name) < 1:
            raise ValueError(f"{name.upper()}={getattr(hp, name)}: expected 0 <= value < 1")
    for name in ("muon_wd", "embed_wd", "adam_wd", "matrix_lr", "scalar_lr", "tied_embed_lr"):
        if getattr(hp, name) < 0:
            raise ValueError(f"{name.upper()}={getattr(hp, name)}: expected >= 0")
    if not named_params:
        raise ValueError("build_optimizer: no parameters")
    parts: dict[str, list[tuple[str, Tensor]]] = {"matrix": [], "embed": [], "scalar": []}
    for name, p in named_params.items():
        if not p.requires_grad:
            continue
        kind = classify(name, p)
        if kind not in parts:
            raise ValueError(f"classify({name!r}) returned {kind!r}: expected 'matrix', 'embed' or 'scalar'")
        if kind == "matrix" and p.ndim not in (2, 3):
            raise ValueError(f"classify({name!r}) returned 'matrix' for shape {tuple(p.shape)}: Muon needs 2-D "
                             "(or a 3-D stack of matrices, updated one matrix at a time)")
        parts[kind].append((name, p))
    devices = {p.device for ps in parts.values() for _, p in ps}
    if len(devices) > 1:
        raise ValueError(f"build_optimizer: parameters on several devices {sorted(map(str, devices))}")
    return OptimizerSet(parts["matrix"], parts["embed"], parts["scalar"], hp, compile=compile,
                        matrix_optimizer=matrix_optimizer)


# ----------------------------------------------------------------------------- EMA
def _param_list(params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    return list(params.parameters()) if isinstance(params, nn.Module) else list(params)


class EMA:
    """fp32 exponential moving average of parameters: shadow <- decay * shadow + (1 - decay) * param.
    Parameters only (no buffers). `params` is a module or an iterable of tensors, in a fixed order."""

    def __init__(self, params: nn.Module | Iterable[Tensor], decay: float = 0.9965):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA_DECAY={decay}: expected 0 <= decay < 1")
        self.decay = float(decay)
        self.params = _param_list(params)
        if not self.params:
            raise ValueError("EMA: no parameters to track")
        self.shadow = [p.detach().float().clone() for p in self.params]
        self._all_fp32 = all(p.dtype == torch.float32 for p in self.params)

    @torch.no_grad()
    def update(self) -> None:
        src = [p.detach() for p in self.params] if self._all_fp32 else [p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, src, 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, target: nn.Module | Iterable[Tensor] | None = None) -> None:
        """Writes the averages into `target` (default: the tracked parameters)."""
        dst = self.params if target is None else _param_list(target)
        if [tuple(t.shape) for t in dst] != [tuple(s.shape) for s in self.shadow]:
            raise ValueError(f"EMA.copy_to: target has {len(dst)} tensors whose shapes do not match the "
                             f"{len(self.shadow)} tracked ones")
        for d, s in zip(dst, self.shadow):
            d.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if [tuple(s.shape) for s in state["shadow"]] != [tuple(s.shape) for s in self.shadow]:
            raise ValueError("EMA state's shapes do not match the tracked parameters")
        self.decay = float(state["decay"])
        for s, t in zip(self.shadow, state["shadow"]):
            s.copy_(t)


# ----------------------------------------------------------------------------- schedules
def lr_schedule(progress: float, warmdown_frac: float, min_lr: float = 0.1) -> float:
    """LR multiplier: 1 until the last `warmdown_frac` of the budget, then the line (1 - progress) /
    warmdown_frac towards 0, clamped at the floor `min_lr` (the records' rule: with 0.85 and 0.1 the
    floor is reached at progress 0.915). warmdown_frac > 1 means the line started before the budget,
    so it is already below 1 at progress 0. warmdown_frac = 0: always 1."""
    if warmdown_frac < 0:
        raise ValueError(f"WARMDOWN_FRAC={warmdown_frac}: expected >= 0")
    if not 0.0 <= min_lr <= 1.0:
        raise ValueError(f"MIN_LR={min_lr}: expected a fraction of the peak LR in [0, 1]")
    if warmdown_frac == 0:
        return 1.0
    return min(1.0, max(min_lr, (1.0 - progress) / warmdown_frac))


def momentum_warmup(step: int, start: float, end: float, steps: int) -> float:
    """Muon momentum: linear from `start` at step 0 to `end` at `steps`, then `end` (steps <= 0: `end`)."""
    if steps <= 0:
        return end
    frac = min(max(step, 0) / steps, 1.0)
    return (1.0 - frac) * start + frac * end
