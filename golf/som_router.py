"""Self-organizing MoE router: frozen random experts, a trained query network, gradient-free keys.

A layer holds `num_experts` frozen, randomly initialised two-layer MLP experts, a trainable query
network and one unit-norm key per expert. A token's query q = normalize(query_net(x)) is compared
with every key by cosine similarity; the `top_k` most similar experts run on the token and their
outputs are mixed with softmax(cos / T) over the chosen k (T = `temperature` in training,
`eval_temperature`, sharper, in eval). The layer output is `gain * sum_k w_k expert_k(x)` with a
trainable scalar gain that starts at zero, so a residual block holding it starts as the identity.

What learns how:
  query network, gain   by gradient (it reaches the query network through the mixing weights w)
  keys                  without gradient: `update_keys()` after each optimizer step (rules below)
  experts               never; they are buffers regenerated from `seed` at construction and are
                        not in the state dict (persistent=False), so the artifact never stores them

Key update rules, applied by `update_keys()` in this order to the queries q (unit vectors) and
choices saved from the last training forward (with gradient accumulation: the last micro-batch;
subsampled by a stride to at most `max_saved` tokens; with several ranks, every rank's saved tokens
gathered, so all ranks apply the same update and their keys stay identical). Each rule
has its own switch and coefficient, works on the keys the previous rule left and re-normalises each
key it moves; keys a rule does not move stay bit-identical; with every rule off the keys never change.
  usage EMA   share_e = (choices of e) * E / (tokens * k), so 1 is a uniform share;
              usage_e <- usage_decay * usage_e + (1 - usage_decay) * share_e   (starts at 1)
  attraction  for every key chosen at least once: m_e = mean of the queries that chose e and
              key_e <- normalize(key_e + step_e * (m_e - key_e)),
              step_e = attraction_lr / (1 + inertia * usage_e)   (inertia = 0: no damping)
  co_pull     for every key chosen at least once (top_k > 1): p_e = mean of the keys chosen together
              with e, one term per (token, partner), and key_e <- normalize(key_e + co_pull_coef * (p_e - key_e))
  decay       once `decay_warmup` updates have been done: keys whose usage EMA is at or below its
              `decay_percentile`-th percentile over the layer's experts and below a uniform share (1,
              the EMA's mean; this keeps evenly used layers untouched, while "at or below" still catches
              the common case of many dead experts tied at one usage) move toward one saved query picked
              at random (one per key, from a seeded generator), reviving them where tokens are:
              key_e <- normalize(key_e + decay_coef * (q_rand(e) - key_e))
"Decay" here is decay of an unused key's position, not of its norm (keys stay unit norm): a pull
toward the mean query would collapse every under-used key onto one point, a random recent query
spreads them over the region the tokens occupy.

Expert compute has no Python loop over experts; `compute` picks how:
  "grouped"  choices sorted by expert and run with torch._grouped_mm (one GEMM per expert segment
             in a single call): exact top-k cost. Needs dims aligned to 16 bytes and bf16 (or autocast
             to bf16); fp32 runs only eagerly on CPU.
  "dense"    every expert on every token, outputs of unchosen experts multiplied by 0: two plain
             matmuls with static shapes, E/k times the FLOPs. Gathering each choice's weights instead
             would need tokens * k * dim * hidden elements of memory, too much at training batch sizes.
  "auto"     grouped where it can run, else dense.

Usage: training forwards add each expert's choice count to `usage_counts` (all tokens);
`usage_histogram()` pops them and `usage_metrics()` turns them into Gini, entropy and the fraction
of experts used. Under torch.compile the forward's bookkeeping is a buffer update and an attribute
store of detached tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from golf.moe import expert_metrics

QUERY_KINDS = ("linear", "mlp")
EXPERT_INITS = ("normal", "orthogonal", "uniform")
ACTIVATIONS = ("leaky_relu2", "gelu")
COMPUTES = ("auto", "grouped", "dense")


@dataclass(frozen=True)
class SOMSettings:
    num_experts: int = 64
    top_k: int = 4
    expert_hidden: int | None = None  # hidden width of one expert; None: dim // 2
    key_dim: int = 64
    temperature: float = 0.1  # softmax temperature over the chosen k cosines, training
    eval_temperature: float = 0.05  # sharper at eval
    query: str = "linear"  # "linear": dim -> key_dim; "mlp": dim -> query_hidden -> key_dim
    query_hidden: int = 128
    expert_init: str = "normal"  # "normal" | "orthogonal" | "uniform", all with variance 1 / fan_in
    activation: str = "leaky_relu2"  # LeakyReLU(slope)^2 as in the record MLP, or "gelu"
    leaky_slope: float = 0.5
    seed: int = 1234  # experts and initial keys; give each layer its own (e.g. seed + layer)
    compute: str = "auto"
    # gradient-free key updates (see the module docstring for the exact rules)
    usage_decay: float = 0.99
    attraction: bool = True
    attraction_lr: float = 0.05
    inertia: float = 1.0  # 0 switches the usage damping of attraction off
    co_pull: bool = False
    co_pull_coef: float = 0.01
    decay: bool = True
    decay_percentile: float = 10.0
    decay_warmup: int = 100  # update_keys calls before decay starts
    decay_coef: float = 0.1
    max_saved: int = 4096  # tokens kept from the last training forward for update_keys

    def __post_init__(self):
        def need(ok: bool, what: str):
            if not ok:
                raise ValueError(f"SOMSettings: {what}")
        need(1 <= self.top_k <= self.num_experts, f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        need(self.temperature > 0, f"temperature={self.temperature} must be > 0")
        need(self.eval_temperature > 0, f"eval_temperature={self.eval_temperature} must be > 0")
        need(self.query in QUERY_KINDS, f"query={self.query!r} not in {QUERY_KINDS}")
        need(self.expert_init in EXPERT_INITS, f"expert_init={self.expert_init!r} not in {EXPERT_INITS}")
        need(self.activation in ACTIVATIONS, f"activation={self.activation!r} not in {ACTIVATIONS}")
        need(self.compute in COMPUTES, f"compute={self.compute!r} not in {COMPUTES}")
        need(0 <= self.usage_decay < 1, f"usage_decay={self.usage_decay} must be in [0, 1)")
        need(0 <= self.decay_percentile <= 100, f"decay_percentile={self.decay_percentile} must be in [0, 100]")
        for name in ("attraction_lr", "co_pull_coef", "decay_coef"):
            need(0 <= getattr(self, name) <= 1, f"{name}={getattr(self, name)} must be in [0, 1]")
        for name, low in (("inertia", 0), ("decay_warmup", 0), ("max_saved", 1), ("key_dim", 1), ("query_hidden", 1)):
            need(getattr(self, name) >= low, f"{name}={getattr(self, name)} must be >= {low}")


def _unit(v: torch.Tensor) -> torch.Tensor:
    return F.normalize(v, dim=-1)


def _gather_ranks(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (same shape on each) concatenated along dim 0 in rank order; `t` alone in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.new_empty((dist.get_world_size() * t.shape[0], *t.shape[1:]))
    dist.all_gather_into_tensor(out, t.contiguous())
    return out


def _frozen_weight(g: torch.Generator, experts: int, fan_in: int, fan_out: int, init: str) -> torch.Tensor:
    """[experts, fan_in, fan_out] (used as x @ W), made on CPU from `g` so every device gets the same bits."""
    shape = (experts, fan_in, fan_out)
    if init == "normal":
        return torch.randn(shape, generator=g, device="cpu") / math.sqrt(fan_in)
    if init == "uniform":  # U(-a, a) with a^2 / 3 = 1 / fan_in
        return (torch.rand(shape, generator=g, device="cpu") * 2 - 1) * math.sqrt(3 / fan_in)
    # orthogonal: QR of a Gaussian, signs fixed so Q is unique; scaled to the Frobenius norm a
    # normal init would have (sqrt(fan_out)), so all three inits give outputs of the same size.
    # QR goes through LAPACK, so two builds may differ in the last bits; normal/uniform are exact.
    big, small = max(fan_in, fan_out), min(fan_in, fan_out)
    q, r = torch.linalg.qr(torch.randn(experts, big, small, generator=g, device="cpu"))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    q = q if fan_in >= fan_out else q.transpose(-2, -1)
    return q * math.sqrt(fan_out / small)


class _Linear(nn.Linear):
    """Bias-free linear, fp32 master weight, matmul in the activation dtype (as CastedLinear)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_in, n_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class SOMMoE(nn.Module):
    """x [..., dim] -> [..., dim]. See the module docstring; `seed` defaults to settings.seed."""

    def __init__(self, dim: int, settings: SOMSettings = SOMSettings(), seed: int | None = None):
        super().__init__()
        s = self.settings = settings
        self.dim, self.hidden = dim, s.expert_hidden or dim // 2
        self.seed = s.seed if seed is None else seed
        E = s.num_experts
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        # fixed draw order (w1, w2, keys): the experts are a pure function of (seed, shapes, init)
        self.register_buffer("w1", _frozen_weight(g, E, dim, self.hidden, s.expert_init), persistent=False)
        self.register_buffer("w2", _frozen_weight(g, E, self.hidden, dim, s.expert_init), persistent=False)
        # keys are learned (without gradient) and small, so they are saved with the model
        self.register_buffer("keys", _unit(torch.randn(E, s.key_dim, generator=g, device="cpu")))
        # training-only state, not needed to run the model
        self.register_buffer("usage_ema", torch.ones(E), persistent=False)
        self.register_buffer("usage_counts", torch.zeros(E, dtype=torch.int64), persistent=False)
        self.num_updates = 0
        self._decay_gen = torch.Generator(device="cpu").manual_seed(self.seed + 1)
        self._saved: tuple[torch.Tensor, torch.Tensor] | None = None

        if s.query == "linear":
            self.query = _Linear(dim, s.key_dim)
        else:
            self.query = nn.Sequential(_Linear(dim, s.query_hidden), nn.GELU(), _Linear(s.query_hidden, s.key_dim))
        self.gain = nn.Parameter(torch.zeros(1))  # zero: the block starts as the identity

    # ------------------------------------------------------------------ routing and experts
    def temperature(self) -> float:
        return self.settings.temperature if self.training else self.settings.eval_temperature

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, dim] -> (expert ids [N, k], mixing weights [N, k] fp32, unit queries [N, key_dim] fp32).
        Routing runs in fp32: cosines of nearby keys differ by little and are divided by T."""
        q = _unit(self.query(x).float())
        cos = q @ self.keys.float().t()
        top = cos.topk(self.settings.top_k, dim=-1)
        return top.indices, torch.softmax(top.values / self.temperature(), dim=-1), q

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.settings.activation == "gelu":
            return F.gelu(h)
        return F.leaky_relu(h, self.settings.leaky_slope).square()

    def _use_grouped(self, x: torch.Tensor) -> bool:
        mode = self.settings.compute
        if mode == "dense":
            return False
        aligned = all(n * x.element_size() % 16 == 0 for n in (self.dim, self.hidden))
        # bf16 only, except eager CPU (fp32 there lets the tests check it exactly; compiled, the op's
        # meta function takes bf16 only)
        dtype_ok = x.dtype == torch.bfloat16 or (x.device.type == "cpu" and not torch.compiler.is_compiling())
        ok = hasattr(torch, "_grouped_mm") and aligned and dtype_ok
        if mode == "grouped" and not ok:
            raise RuntimeError("SOMMoE compute='grouped' needs torch._grouped_mm, dims aligned to 16 bytes "
                               "and bf16 activations (fp32 only in eager on CPU)")
        return ok

    def experts(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_j w[:, j] * expert_{idx[:, j]}(x): x [N, dim], idx/w [N, k] -> [N, dim] in x's dtype."""
        N, k, E, H = x.shape[0], idx.shape[1], self.settings.num_experts, self.hidden
        if torch.is_autocast_enabled(x.device.type):  # run in the autocast dtype, as an autocast matmul would
            x = x.to(torch.get_autocast_dtype(x.device.type))
        w1, w2, w = self.w1.to(x.dtype), self.w2.to(x.dtype), w.to(x.dtype)
        if not self._use_grouped(x):
            h = self._act(x @ w1.transpose(0, 1).reshape(self.dim, E * H)).view(N, E, H)
            gate = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter(1, idx, w)
            return (h * gate.unsqueeze(-1)).view(N, E * H) @ w2.reshape(E * H, self.dim)
        flat = idx.reshape(-1)  # choice c = token * k + slot
        order = torch.argsort(flat, stable=True)  # choices grouped by expert
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        offs = counts.cumsum(0).to(torch.int32)  # end of each expert's segment
        xs = x[order // k]
        # autocast runs pow (the square) in fp32; _grouped_mm is no autocast op, so cast back
        ys = torch._grouped_mm(self._act(torch._grouped_mm(xs, w1, offs=offs)).to(xs.dtype), w2, offs=offs)
        # back to choice order (a permutation, so no atomics), then mix each token's k outputs
        back = torch.empty_like(ys)
        back[order] = ys
        return (back.view(N, k, self.dim) * w.unsqueeze(-1)).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.dim)
        idx, w, q = self.route(x2)
        if self.training:
            self._remember(q, idx)
        y = self.experts(x2, idx, w)
        return (self.gain.to(y.dtype) * y).view(shape)

    def _remember(self, q: torch.Tensor, idx: torch.Tensor) -> None:
        flat = idx.reshape(-1)
        self.usage_counts.scatter_add_(0, flat, torch.ones_like(flat))
        stride = -(-q.shape[0] // self.settings.max_saved)  # ceil: at most max_saved tokens, spread evenly
        self._saved = (q[::stride].detach(), idx[::stride].detach())

    # ------------------------------------------------------------------ gradient-free key updates
    @torch.no_grad()
    def update_keys(self) -> None:
        """Apply the enabled key rules to the last training forward's queries (see the module docstring).
        Call after each optimizer step; a second call without a training forward in between does nothing."""
        if self._saved is None:
            return
        q, idx = (_gather_ranks(t) for t in self._saved)
        self._saved = None
        s, E, k = self.settings, self.settings.num_experts, self.settings.top_k
        q = q.float()
        n = q.shape[0]
        chose = torch.zeros(n, E, device=q.device).scatter_(1, idx, 1.0)  # [n, E] 0/1
        count = chose.sum(0)
        used = (count > 0).unsqueeze(-1)
        self.usage_ema.mul_(s.usage_decay).add_(count * E / (n * k), alpha=1 - s.usage_decay)
        keys = self.keys.float()
        if s.attraction:
            mean_q = chose.t() @ q / count.clamp_min(1).unsqueeze(-1)
            step = (s.attraction_lr / (1 + s.inertia * self.usage_ema)).unsqueeze(-1)
            keys = torch.where(used, _unit(keys + step * (mean_q - keys)), keys)
        if s.co_pull and k > 1:
            together = chose.t() @ chose  # [E, E] tokens choosing both
            together.fill_diagonal_(0)
            partner = together @ keys / (count * (k - 1)).clamp_min(1).unsqueeze(-1)
            keys = torch.where(used, _unit(keys + s.co_pull_coef * (partner - keys)), keys)
        if s.decay and self.num_updates >= s.decay_warmup:
            u = self.usage_ema
            under = ((u <= torch.quantile(u, s.decay_percentile / 100)) & (u < 1)).unsqueeze(-1)
            target = q[torch.randint(n, (E,), generator=self._decay_gen).to(q.device)]
            keys = torch.where(under, _unit(keys + s.decay_coef * (target - keys)), keys)
        self.num_updates += 1
        self.keys.copy_(keys)

    # ------------------------------------------------------------------ usage
    def usage_histogram(self, reset: bool = True) -> torch.Tensor:
        """Choices per expert [E] (int64, CPU) in training forwards since the last reset."""
        counts = self.usage_counts.detach().cpu().clone()
        if reset:
            self.usage_counts.zero_()
        return counts


# ---------------------------------------------------------------------- metrics and reports
def usage_metrics(counts: torch.Tensor) -> dict[str, float]:
    """gini, entropy (nats), entropy_frac (entropy / log E: 1 is uniform), used_frac (experts chosen at
    least once); the same load metrics as the learned-router MoE (golf/moe.py)."""
    m = expert_metrics(counts)
    n = counts.numel()
    return {"gini": m["gini"], "entropy": m["entropy"] * math.log(n) if n > 1 else 0.0,
            "entropy_frac": m["entropy"] if m["tokens_per_expert"] and sum(m["tokens_per_expert"]) else 0.0,
            "used_frac": m["used_frac"]}


def som_layers(model: nn.Module) -> list[tuple[str, SOMMoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SOMMoE)]


def update_all_keys(model: nn.Module) -> None:
    """The trainer's hook: call after each optimizer step."""
    for _, m in som_layers(model):
        m.update_keys()


def usage_report(model: nn.Module, reset: bool = True) -> dict[str, dict]:
    """Per SOM layer: usage_metrics plus the raw histogram (list of counts per expert)."""
    out = {}
    for name, m in som_layers(model):
        counts = m.usage_histogram(reset)
        out[name] = {**usage_metrics(counts), "histogram": counts.tolist()}
    return out


def param_report(module: nn.Module) -> dict[str, int]:
    """Element counts: trainable (gradient), frozen (parameters without grad + SOM experts, regenerated
    from the seed, never stored) and gradient_free (SOM keys: learned by update_keys, stored)."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    layers = [m for _, m in som_layers(module)]
    frozen += sum(m.w1.numel() + m.w2.numel() for m in layers)
    return {"trainable": trainable, "frozen": frozen, "gradient_free": sum(m.keys.numel() for m in layers)}
