"""Mixture-of-experts MLP for ablations against the dense LeakyReLU(slope)^2 MLP of train_gpt.py.

    mlp = MoEMLP(dim, hidden, num_experts=8, top_k=2, slope=0.5, routing="dropless",
                 aux_loss_weight=0.01, z_loss_weight=1e-3, router_noise=0.0)
    y = mlp(x)                         # x [..., dim] -> [..., dim]
    loss = loss + moe_aux_loss(model)  # weighted balance + z losses of every MoE call since the last pop
    metrics = collect_moe_metrics(model)  # every N steps: per-layer usage, summed over ranks, then reset
    total, active = param_counts(model)

Routing. Router logits are computed in fp32 (autocast off: tiny matmul, and the softmax / logsumexp of
the aux losses are sensitive). In training, Gaussian noise of std `router_noise` is added to the logits
used for selection, gates and the balance loss; the z-loss sees the clean logits (it controls the
logits' scale, not the noise). Each token picks its top-k experts by softmax probability; its gates are
those k probabilities renormalised to sum to 1 (the softmax over the chosen k). With top_k=1 that
renormalised gate is always 1 and the router would learn only from the aux loss, so `renormalize`
defaults to top_k > 1: top-1 uses the raw probability (Switch Transformer).

Aux losses (only in training; `self.aux_loss` holds the last call's weighted sum):
  balance = E * sum_e f_e * P_e   f_e: fraction of the N*k token-expert assignments routed to e (before
                                  capacity drops), P_e: mean router probability of e over the N tokens.
      Switch normalisation: sum_e f_e = 1, so a uniform router (P_e = 1/E) gives exactly 1 whatever f
      is, and a perfectly balanced one too; dividing by N*k rather than N keeps that true for top-k.
  z = mean_tokens logsumexp(logits)^2 (ST-MoE router z-loss).
A looped layer (the record's depth recurrence) runs several times per forward; every call appends its
aux loss to a list that `pop_aux_loss()` / `moe_aux_loss(model)` sums and clears, so none is lost.

Compute. Assignments are sorted by expert (first choices before second choices, then token order: the
stable sort keeps that priority, which decides who is dropped in capacity mode), then
  * dropless, grouped: two `torch._grouped_mm` calls over the sorted rows (one GEMM launch per
    projection for all experts, group boundaries from int32 offsets). Shapes are static ([N*k, dim]);
    only the offsets are data. Used on CUDA (SM >= 80) with bf16 activations (autocast), and on CPU in
    eager mode (any float dtype; see grouped_mm_available for why not compiled on CPU).
  * padded: tokens gathered into an [E, C, dim] buffer and two `torch.bmm`s. Capacity mode uses
    C = ceil(capacity_factor * N * k / E) and drops assignments beyond C (their contribution is zero;
    the token keeps its residual). Dropless falls back to this with C = N, the worst case (a token
    picks an expert at most once), which is exact and shape-static but costs E x the compute and
    memory of the grouped path: a correctness fallback for CPU compile / fp32 on CUDA, not for speed.
No Python loop over experts anywhere.

torch.compile(fullgraph=True, dynamic=False): capacity mode and the padded dropless fallback compile on
CPU and GPU (every shape is static; usage counters are buffers updated in place, aux losses a list
attribute). Dropless grouped compiles wherever `_grouped_mm` gets bf16 (CUDA under autocast; Inductor
lowers it to a Triton template on SM >= 90 or to the ATen kernel; not verified on a GPU by the tests).
Compiled on CPU, dropless takes the padded fallback. Pop the aux losses after every training forward:
dynamo guards on the list's length, so a list left to grow would recompile each step.

Parameters. `experts_in` [E, hidden, dim] and `experts_out` [E, dim, hidden] (nn.Linear's
[out, in] layout per expert, so each slice is one expert's fc / proj) are 3-D so an optimizer can treat
them as a stack of matrices (Muon's polar_express takes [N, rows, cols]; golf.optim.build_optimizer
today rejects non-2-D 'matrix' parameters, so the classifier must route them or the optimizer must
accept stacks). Each expert's fc is orthogonal-initialised like the dense MLP's fc; `experts_out` starts
at zero like the dense proj, so the layer outputs zeros and a block starts as the identity. The router
is a CastedLinear-style fp32 weight [E, dim] with N(0, router_init_std) init (default 0.02); 0 gives
an all-zero router, whose tied logits send every token to experts 0..k-1 until the balance loss breaks
the tie, so a small random init is the default.

Usage statistics (training only, so evaluation does not pollute them) accumulate in the non-persistent
fp64 buffer `usage_stats` = [counts per expert (E), dropped assignments, balance-loss sum, z-loss sum,
calls]: every entry is additive, so ranks are combined with one all-reduce (sum), and it stays out of
state_dict / the artifact.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# layout of usage_stats after the E per-expert counts
_DROPPED, _BALANCE, _ZLOSS, _CALLS = range(4)
_EXTRA = 4


@torch._dynamo.assume_constant_result  # a trace-time constant, so the check never breaks a compiled graph
@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def grouped_mm_available(x: Tensor, *sizes: int) -> bool:
    """Whether torch._grouped_mm can run the dropless projections for activations `x`.

    CUDA: the CUTLASS kernel needs bf16, SM >= 80 and 16-byte aligned strides (sizes multiple of 8).
    CPU: eager only. The kernel takes any float dtype, but under torch.compile the fake-tensor rule
    accepts bf16 only, and with bf16 the compiled backward fails (torch 2.13: the CPU kernel's output
    strides differ from the rule's, and a later view raises), so compiled CPU takes the padded path."""
    if not hasattr(torch, "_grouped_mm"):  # added in torch 2.8
        return False
    if x.is_cuda:
        return (x.dtype == torch.bfloat16 and _cuda_capability(x.device.index or 0) >= (8, 0)
                and all(s % 8 == 0 for s in sizes))
    if x.device.type == "cpu":
        return not torch.compiler.is_compiling()
    return False


class MoEMLP(nn.Module):
    """Top-k routed mixture of `num_experts` MLPs (dim -> hidden -> dim each); see the module docstring."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int = 2,
                 activation: Callable[[Tensor], Tensor] | None = None, slope: float = 0.5,
                 routing: str = "dropless", capacity_factor: float = 1.25, router_noise: float = 0.0,
                 aux_loss_weight: float = 0.01, z_loss_weight: float = 0.0, renormalize: bool | None = None,
                 router_init_std: float = 0.02, impl: str = "auto"):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE top_k={top_k}: expected 1..num_experts={num_experts}")
        if routing not in ("dropless", "capacity"):
            raise ValueError(f"MoE routing={routing!r}: expected 'dropless' or 'capacity'")
        if routing == "capacity" and capacity_factor <= 0:
            raise ValueError(f"MoE capacity_factor={capacity_factor}: expected > 0")
        if impl not in ("auto", "grouped", "padded"):
            raise ValueError(f"MoE impl={impl!r}: expected 'auto', 'grouped' or 'padded'")
        if min(router_noise, aux_loss_weight, z_loss_weight, router_init_std) < 0:
            raise ValueError(f"MoE router_noise={router_noise}, aux_loss_weight={aux_loss_weight}, "
                             f"z_loss_weight={z_loss_weight}, router_init_std={router_init_std}: expected >= 0")
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        self.activation, self.slope = activation, slope
        self.routing, self.capacity_factor = routing, capacity_factor
        self.router_noise, self.aux_loss_weight, self.z_loss_weight = router_noise, aux_loss_weight, z_loss_weight
        self.renormalize = top_k > 1 if renormalize is None else renormalize
        self.impl = impl  # 'grouped' / 'padded' force a dropless path (tests, benchmarks)

        self.router = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.normal_(self.router, std=router_init_std)
        self.experts_in = nn.Parameter(torch.empty(num_experts, hidden, dim))
        for w in self.experts_in.data:  # per-expert orthogonal init, like the dense fc
            nn.init.orthogonal_(w)
        self.experts_out = nn.Parameter(torch.zeros(num_experts, dim, hidden))  # identity block at init

        self.register_buffer("usage_stats", torch.zeros(num_experts + _EXTRA, dtype=torch.float64),
                             persistent=False)
        self.aux_loss: Tensor | None = None
        self.aux_losses: list[Tensor] = []

    # ------------------------------------------------------------------ helpers
    def act(self, h: Tensor) -> Tensor:
        if self.activation is not None:
            return self.activation(h)
        return F.leaky_relu(h, self.slope).square()  # the record MLP's LeakyReLU(slope)^2; slope 0 is ReLU^2

    def capacity(self, n_tokens: int) -> int:
        """Slots per expert: capacity mode's ceil(factor * N * k / E) (at most N), dropless's worst case N."""
        if self.routing == "dropless":
            return n_tokens
        return min(n_tokens, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.num_experts))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, experts={self.num_experts}, top_k={self.top_k}, "
                f"routing={self.routing}" + (f", capacity_factor={self.capacity_factor}"
                                             if self.routing == "capacity" else ""))

    # ------------------------------------------------------------------ routing
    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [N, dim] -> (gates [N, k] fp32, experts [N, k] int64, probs [N, E] fp32, clean logits)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.float())
        noisy = logits
        if self.training and self.router_noise > 0:
            noisy = logits + torch.randn_like(logits) * self.router_noise
        probs = noisy.softmax(dim=-1)
        top_p, top_e = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True) if self.renormalize else top_p
        return gates, top_e, probs, logits

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if torch.is_autocast_enabled(x.device.type):
            # autocast would run a Linear on x in bf16 anyway, but the block's RMS norm hands over fp32
            # (norms autocast to fp32), and the grouped GEMM takes bf16 only: cast once, up front
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = x.reshape(-1, self.dim)
        N, E, k = x.size(0), self.num_experts, self.top_k
        gates, top_e, probs, logits = self.route(x)

        # assignment a = j*N + t is token t's j-th choice: choice-major, so a stable sort by expert puts
        # every first choice ahead of any second choice (who keeps a slot when capacity runs out)
        flat_e = top_e.t().reshape(-1)  # [k*N]
        order = torch.argsort(flat_e, stable=True)
        sorted_e = flat_e[order]
        sorted_tok = order % N
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat_e, torch.ones_like(flat_e))
        ends = counts.cumsum(0)

        use_grouped = self.routing == "dropless" and self.impl != "padded" and (
            self.impl == "grouped" or grouped_mm_available(x, self.dim, self.hidden))
        if use_grouped:
            y_assign, dropped = self._grouped(x, order, sorted_tok, ends), None
        else:
            y_assign, dropped = self._padded(x, order, sorted_e, sorted_tok, ends, counts)

        # combine: out_t = sum_j gate_tj * y(t, j); gates cast to the activation dtype like CastedLinear
        y = (y_assign.view(k, N, self.dim) * gates.t().to(y_assign.dtype)[..., None]).sum(0)

        if self.training:
            self._record(counts, probs, logits, dropped)
        return y.view(shape)

    def _grouped(self, x: Tensor, order: Tensor, sorted_tok: Tensor, ends: Tensor) -> Tensor:
        """Dropless: both projections as grouped GEMMs over the expert-sorted rows; returns rows in
        assignment order [k*N, dim]."""
        offs = ends.to(torch.int32)
        xs = x[sorted_tok]  # [k*N, dim], expert-major
        h = torch._grouped_mm(xs, self.experts_in.to(x.dtype).mT, offs=offs)  # [k*N, hidden]
        # autocast runs pow (the square) in fp32; _grouped_mm is no autocast op, so cast back
        ys = torch._grouped_mm(self.act(h).to(x.dtype), self.experts_out.to(x.dtype).mT, offs=offs)  # [k*N, dim]
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return ys[inverse]

    def _padded(self, x: Tensor, order: Tensor, sorted_e: Tensor, sorted_tok: Tensor, ends: Tensor,
                counts: Tensor) -> tuple[Tensor, Tensor]:
        """Capacity (or the dropless fallback with C = N): per-expert [C, dim] blocks and two bmm's.
        Returns rows in assignment order [k*N, dim] (zero for dropped) and the dropped count."""
        N, E = x.size(0), self.num_experts
        C = self.capacity(N)
        A = order.numel()
        pos = torch.arange(A, device=x.device) - (ends - counts)[sorted_e]  # rank within its expert
        keep = pos < C
        # slot of each sorted assignment in the flat [E*C] buffer; dropped ones go to a trash slot E*C
        slot = torch.where(keep, sorted_e * C + pos, E * C)
        # which token fills each slot (N = the zero row for empty slots); gathers, no scatter of activations
        src = torch.full((E * C + 1,), N, dtype=torch.int64, device=x.device).scatter_(0, slot, sorted_tok)
        x_ext = torch.cat((x, x.new_zeros(1, self.dim)))
        buf = x_ext[src[: E * C]].view(E, C, self.dim)
        h = torch.bmm(buf, self.experts_in.to(x.dtype).mT)  # [E, C, hidden]
        yb = torch.bmm(self.act(h), self.experts_out.to(x.dtype).mT).view(E * C, self.dim)
        y_ext = torch.cat((yb, yb.new_zeros(1, self.dim)))
        # back to assignment order: assignment order[i] sits in slot[i]
        slot_of_assign = torch.empty_like(slot).scatter_(0, order, slot)
        return y_ext[slot_of_assign], A - keep.sum()

    def _record(self, counts: Tensor, probs: Tensor, logits: Tensor, dropped: Tensor | None) -> None:
        """Aux losses for the trainer (with gradients) and detached usage statistics."""
        E = self.num_experts
        f = counts.to(probs.dtype) / counts.sum()  # fraction of assignments per expert (no gradient)
        balance = E * (f * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        self.aux_loss = self.aux_loss_weight * balance + self.z_loss_weight * z
        self.aux_losses.append(self.aux_loss)
        with torch.no_grad():
            extra = torch.stack((torch.zeros_like(balance) if dropped is None else dropped.to(balance.dtype),
                                 balance, z, torch.ones_like(balance)))
            self.usage_stats.add_(torch.cat((counts.to(torch.float64), extra.detach().to(torch.float64))))

    # ------------------------------------------------------------------ trainer hooks
    def pop_aux_loss(self) -> Tensor:
        """Sum of the weighted aux losses of every training call since the last pop (0 if none); clears."""
        total = sum(self.aux_losses) if self.aux_losses else self.router.new_zeros(())
        self.aux_losses.clear()
        return total

    def pop_usage(self) -> dict[str, Tensor]:
        """This rank's usage since the last pop (see `split_usage`); resets the counters."""
        raw = self.usage_stats.clone()
        self.usage_stats.zero_()
        return split_usage(raw, self.num_experts)


# ----------------------------------------------------------------------------- model-level helpers
def moe_layers(model: nn.Module) -> list[tuple[str, MoEMLP]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEMLP)]


def moe_aux_loss(model: nn.Module) -> Tensor | float:
    """Weighted aux losses of all MoE layers since the last call (popped); 0.0 for a model without MoE.
    Call it inside the (compiled) forward that produced them, or right after it in eager mode."""
    losses = [m.pop_aux_loss() for _, m in moe_layers(model)]
    return sum(losses) if losses else 0.0


def split_usage(raw: Tensor, num_experts: int) -> dict[str, Tensor]:
    """usage_stats vector -> counts [E] (assignments routed, before drops), dropped, balance / z-loss
    sums and the number of calls they were summed over."""
    E = num_experts
    return {"counts": raw[:E], "dropped": raw[E + _DROPPED], "balance_loss_sum": raw[E + _BALANCE],
            "z_loss_sum": raw[E + _ZLOSS], "calls": raw[E + _CALLS]}


def collect_moe_metrics(model: nn.Module, all_reduce: bool = True) -> dict[str, dict]:
    """Per-MoE-layer metrics since the last collection, summed over ranks (one all-reduce for all
    layers; call it on every rank), then resets the counters. Keys: module names."""
    layers = moe_layers(model)
    if not layers:
        return {}
    # layers may differ in expert count: pad to one width so a single collective carries them all
    width = max(m.usage_stats.numel() for _, m in layers)
    raw = torch.stack([F.pad(m.usage_stats, (0, width - m.usage_stats.numel())) for _, m in layers])
    if all_reduce:
        from golf import dist  # local: keeps this module importable without the process-group plumbing
        dist.all_reduce_(raw)
    out = {}
    for (name, m), row in zip(layers, raw.cpu()):
        m.usage_stats.zero_()
        u = split_usage(row, m.num_experts)
        calls = max(float(u["calls"]), 1.0)
        assigned = float(u["counts"].sum())
        out[name] = expert_metrics(u["counts"]) | {
            "dropped_frac": float(u["dropped"]) / assigned if assigned else 0.0,
            "balance_loss": float(u["balance_loss_sum"]) / calls,
            "z_loss": float(u["z_loss_sum"]) / calls,
        }
    return out


def expert_metrics(counts: Tensor) -> dict:
    """Load metrics of one layer from its tokens-per-expert counts [E].

    gini: 0 for equal loads, (E-1)/E when one expert takes everything (sorted-rank formula
          sum_i (2i - E - 1) x_(i) / (E * sum x), i = 1..E ascending).
    entropy: entropy of the load distribution / log E (1 uniform, 0 all in one; 1 when E == 1).
    dead_experts: experts with no tokens; used_frac: the fraction with at least one.
    max_mean_load: max / mean (1 uniform, E all in one).
    With no tokens at all: gini 0, entropy 0, every expert dead, max_mean_load 0."""
    c = counts.detach().double().cpu().flatten()
    E, total = c.numel(), float(c.sum())
    dead = int((c == 0).sum())
    if total <= 0:
        return {"tokens_per_expert": [0] * E, "gini": 0.0, "entropy": 0.0, "dead_experts": dead,
                "used_frac": 0.0, "max_mean_load": 0.0}
    x = c.sort().values
    i = torch.arange(1, E + 1, dtype=torch.float64)
    gini = float(((2 * i - E - 1) * x).sum() / (E * total))
    p = c / total
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(E)) if E > 1 else 1.0
    return {"tokens_per_expert": [int(v) for v in c.round().long()], "gini": gini, "entropy": entropy,
            "dead_experts": dead, "used_frac": (E - dead) / E, "max_mean_load": float(c.max() / c.mean())}


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active-per-token) parameter counts: an MoE layer's expert weights count top_k / E toward
    active (each token runs k of E experts; capacity drops are not discounted); the router and every
    other parameter count fully. Shared parameters are counted once."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for _, m in moe_layers(model):
        experts = m.experts_in.numel() + m.experts_out.numel()
        inactive += experts * (1 - m.top_k / m.num_experts)
    return total, total - round(inactive)
