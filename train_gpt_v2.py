"""train_gpt_v2.py: the research trainer: train_gpt.py's record stack plus the ablation surface.

It extends train_gpt.py by import, never by copy: the same loop, optimizer, evaluation and export
run through train_gpt.main() with this file's Recipe. Every knob added here defaults to the record
stack, so with no overrides the model's logits equal train_gpt.py's bit for bit (tests/test_v2.py).
Knobs that have no effect in a configuration (MOE_TOP_K with MOE_EXPERTS=0, ROPE_DIMS without RoPE)
are refused when set, so an ablation cannot silently measure nothing.

  torchrun --standalone --nproc_per_node=8 train_gpt_v2.py      # the record stack
  MLP_ACTIVATION=swiglu NORM_TYPE=layer torchrun ... train_gpt_v2.py
  ARCH_FAMILY=gpt2 ... / MOE_EXPERTS=8 MOE_TOP_K=2 ... / MOE_EXPERTS=64 MOE_TOP_K=4 MOE_ROUTER=som ...
  python train_gpt_v2.py --help                                  # every setting, with its default
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_gpt as tg
from data.shards import BOS_ID
from golf import budget, dist, precision, v2_experts, v2_optim
from golf.attention import segment_ids_from_starts, segment_starts
from golf.config import Config, Knob, KnobError
from golf.loader import PackedLoader
from golf.moe import MoEMLP
from golf.som_router import EXPERT_INITS, QUERY_KINDS, SOMSettings, update_all_keys
from golf.v2_attention import Variant, alibi_slopes, attend_variant, variant_docs

_SOM = SOMSettings()
# one table: later additions (optimizer, budget, tokenizer, precision knobs) go here too
V2_KNOBS = (
    # block
    Knob("ARCH_FAMILY", str, "record",
         "record; gpt2 (LayerNorm, GELU, biases, learned positions, tied head); llama (RMSNorm, SwiGLU, "
         "RoPE on every head dim, no biases, untied head). Sets only knobs left at their defaults; the "
         "record's other techniques stay on"),
    Knob("MLP_ACTIVATION", str, "leaky_relu2",
         "leaky_relu2 (LeakyReLU(LEAKY_SLOPE)^2), relu2, gelu, or swiglu (hidden scaled by 2/3: parameter-matched)"),
    Knob("NORM_TYPE", str, "rms", "rms (RMSNorm) or layer (LayerNorm); neither has learned parameters"),
    Knob("BIAS", bool, False, "zero-initialised biases on every block projection (q, k, v, out, MLP); not with FUSED_MLP"),
    Knob("DROPOUT", float, 0.0, "dropout on the embeddings and on every attention and MLP output, in training only"),
    Knob("TIE_EMBEDDINGS", bool, True, "the LM head is the token embedding; 0: a separate zero-initialised head (AdamW at TIED_EMBED_LR)"),
    # attention
    Knob("POS_ENCODING", str, "rope",
         "rope (ROPE_DIMS leading dims of each head), alibi, learned (absolute, added to the embedding) or none"),
    Knob("ATTN_WINDOW", int, 0, "sliding window: a token attends to itself and the N-1 tokens before it; 0: full causal"),
    Knob("ATTN_SINKS", int, 0, "learned key/value sink slots per KV head that every query sees (values start at zero)"),
    Knob("ATTN_GATE_TYPE", str, "head",
         "the output gate (SPARSE_ATTN_GATE_ENABLED) from GATE_WIDTH input channels: one per head, or one per channel"),
    # mixture of experts (golf/moe.py, golf/som_router.py)
    Knob("MOE_EXPERTS", int, 0, "experts per MoE layer; 0: dense MLPs"),
    Knob("MOE_TOP_K", int, 2, "experts each token runs"),
    Knob("MOE_LAYERS", str, "", "physical layers with experts: comma-separated indices or ranges a-b; empty: every layer"),
    Knob("MOE_EXPERT_MULT", float, 0.0, "expert hidden width as a multiple of MODEL_DIM; 0: MLP_MULT"),
    Knob("MOE_ROUTER", str, "learned", "learned (softmax router, trained) or som (self-organizing: frozen experts, gradient-free keys)"),
    Knob("MOE_ROUTING", str, "dropless", "learned router: dropless, or capacity (assignments past an expert's capacity are dropped)"),
    Knob("MOE_CAPACITY_FACTOR", float, 1.25, "capacity routing: slots per expert = factor x tokens x top_k / experts"),
    Knob("MOE_ROUTER_NOISE", float, 0.0, "learned router: std of Gaussian noise on its logits in training"),
    Knob("MOE_AUX_LOSS_WEIGHT", float, 0.01, "learned router: weight of the load-balance loss (Switch)"),
    Knob("MOE_Z_LOSS_WEIGHT", float, 0.0, "learned router: weight of the router z-loss (ST-MoE)"),
    Knob("SOM_TEMPERATURE", float, _SOM.temperature, "som: softmax temperature over the chosen experts' cosines, training"),
    Knob("SOM_EVAL_TEMPERATURE", float, _SOM.eval_temperature, "som: the same at evaluation (sharper)"),
    Knob("SOM_KEY_DIM", int, _SOM.key_dim, "som: width of queries and keys"),
    Knob("SOM_QUERY", str, _SOM.query, "som: query network, linear or mlp"),
    Knob("SOM_QUERY_HIDDEN", int, _SOM.query_hidden, "som: hidden width of the mlp query network"),
    Knob("SOM_EXPERT_INIT", str, _SOM.expert_init, "som: frozen expert init, normal, orthogonal or uniform"),
    Knob("SOM_SEED", int, _SOM.seed, "som: layer i's frozen experts and first keys come from seed SOM_SEED + i"),
    Knob("SOM_USAGE_DECAY", float, _SOM.usage_decay, "som: decay of each expert's usage EMA"),
    Knob("SOM_ATTRACTION", bool, _SOM.attraction, "som: keys move toward the mean query that chose them"),
    Knob("SOM_ATTRACTION_LR", float, _SOM.attraction_lr, "som: attraction step before usage damping"),
    Knob("SOM_INERTIA", float, _SOM.inertia, "som: attraction step / (1 + inertia x usage); 0: no damping"),
    Knob("SOM_CO_PULL", bool, _SOM.co_pull, "som: keys chosen together pull toward each other"),
    Knob("SOM_CO_PULL_COEF", float, _SOM.co_pull_coef, "som: co-selection pull step"),
    Knob("SOM_DECAY", bool, _SOM.decay, "som: after warmup, keys used at or below the percentile move toward a recent query"),
    Knob("SOM_DECAY_PERCENTILE", float, _SOM.decay_percentile, "som: usage percentile below which keys are moved"),
    Knob("SOM_DECAY_WARMUP", int, _SOM.decay_warmup, "som: key updates before decay starts"),
    Knob("SOM_DECAY_COEF", float, _SOM.decay_coef, "som: step toward the recent query"),
    Knob("SOM_MAX_SAVED", int, _SOM.max_saved, "som: tokens per rank kept from a training forward for the key updates"),
    # optimizer of the block matrices (golf/v2_optim.py); embeddings and scalars keep AdamW
    Knob("MATRIX_OPTIMIZER", str, "muon", "muon (MATRIX_LR, MUON_*), adamw, lion or adafactor (factored second moment)"),
    Knob("ADAMW_MATRIX_LR", float, 0.002, "adamw: learning rate of the matrices"),
    Knob("ADAMW_MATRIX_BETA1", float, 0.9, "adamw: beta1 of the matrices"),
    Knob("ADAMW_MATRIX_BETA2", float, 0.95, "adamw: beta2 of the matrices"),
    Knob("ADAMW_MATRIX_WD", float, 0.1, "adamw: decoupled weight decay of the matrices"),
    Knob("LION_LR", float, 0.0003, "lion: learning rate (every coordinate moves by lr: 3-10x below AdamW's)"),
    Knob("LION_BETA1", float, 0.9, "lion: interpolation of momentum and gradient whose sign is the update"),
    Knob("LION_BETA2", float, 0.99, "lion: momentum decay"),
    Knob("LION_WD", float, 0.3, "lion: decoupled weight decay (3-10x AdamW's, as the LR is smaller)"),
    Knob("ADAFACTOR_LR", float, 0.01, "adafactor: learning rate (absolute: no relative step, no parameter scaling)"),
    Knob("ADAFACTOR_BETA1", float, 0.0, "adafactor: momentum of the update; 0: none (the memory-light default)"),
    Knob("ADAFACTOR_DECAY", float, -0.8, "adafactor: second-moment decay b2_t = 1 - t^DECAY"),
    Knob("ADAFACTOR_CLIP", float, 1.0, "adafactor: the update's RMS is clipped to this"),
    Knob("ADAFACTOR_WD", float, 0.0, "adafactor: decoupled weight decay"),
    # schedule and budget (golf/budget.py)
    Knob("LR_WARMUP_FRAC", float, 0.0, "linear LR warmup from 0 over this fraction of the budget (not WARMUP_STEPS' compile priming)"),
    Knob("WARMDOWN_SHAPE", str, "linear", "warmdown over WARMDOWN_FRAC: linear (the record), cosine or sqrt (1-sqrt), down to MIN_LR"),
    Knob("BUDGET_TYPE", str, "time", "time (MAX_WALLCLOCK_SECONDS), steps (ITERATIONS), tokens (BUDGET_TOKENS) or flops (BUDGET_FLOPS)"),
    Knob("BUDGET_TOKENS", int, 0, "tokens: training tokens; ITERATIONS becomes BUDGET_TOKENS // TRAIN_BATCH_TOKENS"),
    Knob("BUDGET_FLOPS", float, 0.0, "flops: training FLOPs (6 x active params + attention per token); sets ITERATIONS"),
    Knob("MAX_TRAIN_TOKENS_DISTINCT", int, 0, "train on only the first N tokens of the train stream, repeated in epochs; 0: all"),
    # precision and memory (golf/precision.py)
    Knob("AMP_DTYPE", str, "auto", "auto (bf16 on CUDA if supported, else fp16 with loss scaling; none on CPU), bf16 or fp16"),
    Knob("CUDA_MEMORY_FRACTION", float, 0.0, "cap the CUDA allocator at this fraction of the GPU (a 24 GB card on a bigger one); 0: none"),
)
KNOBS = tg.KNOBS + V2_KNOBS
ACTIVATIONS = ("leaky_relu2", "relu2", "gelu", "swiglu")
NORMS = {"rms": tg.rms_norm, "layer": lambda x: F.layer_norm(x, (x.size(-1),))}
FAMILIES = {
    "record": {},
    "gpt2": {"NORM_TYPE": "layer", "MLP_ACTIVATION": "gelu", "BIAS": True, "POS_ENCODING": "learned",
             "TIE_EMBEDDINGS": True},
    "llama": {"NORM_TYPE": "rms", "MLP_ACTIVATION": "swiglu", "BIAS": False, "POS_ENCODING": "rope",
              "ROPE_DIMS": lambda cfg: cfg.model_dim // cfg.num_heads, "TIE_EMBEDDINGS": False},
}
CHOICES = {"ARCH_FAMILY": tuple(FAMILIES), "MLP_ACTIVATION": ACTIVATIONS, "NORM_TYPE": tuple(NORMS),
           "POS_ENCODING": ("rope", "alibi", "learned", "none"), "ATTN_GATE_TYPE": ("head", "channel"),
           "MOE_ROUTER": ("learned", "som"), "MOE_ROUTING": ("dropless", "capacity"),
           "SOM_QUERY": QUERY_KINDS, "SOM_EXPERT_INIT": EXPERT_INITS}
LEARNED_ROUTER_ONLY = ("MOE_ROUTING", "MOE_CAPACITY_FACTOR", "MOE_ROUTER_NOISE", "MOE_AUX_LOSS_WEIGHT",
                       "MOE_Z_LOSS_WEIGHT")
LEARNED_POS_STD = 0.01  # GPT-2's init of its position table


# ----------------------------------------------------------------------------- settings
def inert_reason(cfg: Config, name: str) -> str | None:
    """Why knob `name` does nothing in this configuration, or None when it acts."""
    if name.startswith(("MOE_", "SOM_")) and name != "MOE_EXPERTS" and cfg.moe_experts == 0:
        return "MOE_EXPERTS=0 (dense MLPs)"
    if name.startswith("SOM_") and cfg.moe_router != "som":
        return f"MOE_ROUTER={cfg.moe_router}"
    if name in LEARNED_ROUTER_ONLY and cfg.moe_router == "som":
        return "MOE_ROUTER=som (no learned router)"
    if name == "MOE_CAPACITY_FACTOR" and cfg.moe_routing != "capacity":
        return f"MOE_ROUTING={cfg.moe_routing}"
    if name in ("ROPE_DIMS", "ROPE_BASE") and cfg.pos_encoding != "rope":
        return f"POS_ENCODING={cfg.pos_encoding}"
    if name == "ATTN_GATE_TYPE" and not cfg.sparse_attn_gate_enabled:
        return "SPARSE_ATTN_GATE_ENABLED=0"
    for kind, names in v2_optim.OPTIMIZER_KNOBS.items():
        if name in names and cfg.matrix_optimizer != kind:
            return f"MATRIX_OPTIMIZER={cfg.matrix_optimizer}"
    if name in ("BUDGET_TOKENS", "BUDGET_FLOPS") and cfg.budget_type != name[7:].lower():
        return f"BUDGET_TYPE={cfg.budget_type}"
    return None


def resolve(cfg: Config, budget_steps: bool = True) -> Config:
    """ARCH_FAMILY's values for the knobs left at their defaults, MoE's TTT targets, then every check
    that needs several knobs, then (`budget_steps`) the step count of a steps / tokens / FLOPs budget.
    Idempotent: GPTv2 calls it too (without the budget), so a model built from parsed knobs is right."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name.lower()) not in allowed:
            raise KnobError(f"{name}={getattr(cfg, name.lower())!r}: expected one of {', '.join(allowed)}")
    values, sources = cfg.as_dict(), dict(cfg.sources)
    for name, value in FAMILIES[cfg.arch_family].items():
        if sources[name] == "default":
            values[name] = value(cfg) if callable(value) else value
            sources[name] = f"ARCH_FAMILY={cfg.arch_family}"
    targets = cfg.ttt_lora_targets.split(",")
    if cfg.moe_experts > 0 and {"fc", "proj"} & set(targets):
        # TTT hooks its LoRA adapters on every block's mlp.fc / mlp.proj, which expert layers lack
        if sources["TTT_LORA_TARGETS"] != "default":
            raise KnobError(f"TTT_LORA_TARGETS={cfg.ttt_lora_targets!r}: fc and proj do not exist in MoE "
                            "blocks (MOE_EXPERTS>0); choose from q,k,v,o,head")
        values["TTT_LORA_TARGETS"] = ",".join(t for t in targets if t not in ("fc", "proj"))
        sources["TTT_LORA_TARGETS"] = "MOE_EXPERTS>0: expert layers have no fc/proj"
    cfg = Config(values, sources)
    for name, source in cfg.sources.items():
        reason = source == "env" and inert_reason(cfg, name)
        if reason:
            raise KnobError(f"{name} is set but does nothing with {reason}; unset it")
    for name in ("ATTN_WINDOW", "ATTN_SINKS", "MOE_EXPERTS", "MOE_EXPERT_MULT"):
        if getattr(cfg, name.lower()) < 0:
            raise KnobError(f"{name}={getattr(cfg, name.lower())}: expected >= 0")
    if not 0 <= cfg.dropout < 1:
        raise KnobError(f"DROPOUT={cfg.dropout}: expected a probability in [0, 1)")
    if cfg.bias and cfg.fused_mlp:
        raise KnobError("BIAS=1 with FUSED_MLP=1: the fused kernel has no bias; unset one of them")
    if cfg.moe_experts:
        v2_experts.parse_layers(cfg.moe_layers, cfg.num_layers)
    v2_optim.check(cfg)
    budget.lr_scale(0.0, cfg.warmdown_frac, cfg.min_lr, cfg.lr_warmup_frac, cfg.warmdown_shape)  # checks
    precision.choose_dtype(cfg.amp_dtype, torch.device("cpu"))
    if cfg.max_train_tokens_distinct < 0:
        raise KnobError(f"MAX_TRAIN_TOKENS_DISTINCT={cfg.max_train_tokens_distinct}: expected >= 0 (0: all)")
    if not 0.0 <= cfg.cuda_memory_fraction <= 1.0:
        raise KnobError(f"CUDA_MEMORY_FRACTION={cfg.cuda_memory_fraction}: expected a fraction in [0, 1] (0: no cap)")
    if budget_steps and not str(cfg.sources["ITERATIONS"]).startswith("BUDGET_TYPE"):
        more, how = budget.resolve_budget(cfg, GPTv2)
        if more:
            cfg = Config({**cfg.as_dict(), **more}, {**cfg.sources, **how})
    return cfg


# ----------------------------------------------------------------------------- model
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


def attention_variant(cfg) -> Variant:
    return Variant(cfg.attn_window, cfg.attn_sinks, cfg.pos_encoding == "alibi")


class NoRotary(nn.Identity):
    """Positions without rotary embedding (ALiBi, learned, none): takes the rotary's arguments, rotates nothing."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return x


class AttentionV2(tg.Attention):
    """The record attention with another position encoding, a window, sinks or a per-channel gate."""

    def __init__(self, cfg, layer: int):
        super().__init__(cfg, xsa=layer >= cfg.num_layers - cfg.xsa_last_n)
        if cfg.pos_encoding != "rope":
            self.rotary = NoRotary()
        self.variant = attention_variant(cfg)
        if self.variant.alibi:
            self.register_buffer("alibi_slopes", alibi_slopes(self.heads), persistent=False)
        if cfg.attn_sinks:
            shape = (cfg.attn_sinks, self.kv_heads, self.head_dim)
            self.sink_k = nn.Parameter(torch.randn(shape))  # RMS-normed in use, like the real keys
            self.sink_v = nn.Parameter(torch.zeros(shape))
        if cfg.attn_gate_type == "channel" and hasattr(self, "attn_gate_w"):
            self.attn_gate_w = nn.Parameter(torch.zeros(cfg.model_dim, self.gate_width))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs) -> torch.Tensor:
        if not self.variant.active:
            return super().attend(q, k, v, docs)
        sinks = (tg.rms_norm(self.sink_k), self.sink_v) if self.variant.sinks else (None, None)
        return attend_variant(q, k, v, docs, self.variant, getattr(self, "alibi_slopes", None), *sinks)


class BlockV2(tg.Block):
    def __init__(self, cfg, layer: int):
        super().__init__(cfg, layer)
        self.norm = NORMS[cfg.norm_type]
        if cfg.bias:
            for m in self.modules():
                if isinstance(m, tg.CastedLinear):
                    m.bias = nn.Parameter(torch.zeros(m.out_features))
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def make_attention(self, cfg, layer: int) -> nn.Module:
        return AttentionV2(cfg, layer)

    def make_mlp(self, cfg, layer: int) -> nn.Module:
        experts = v2_experts.make_experts(cfg, layer)
        if experts is not None:
            return experts
        act = cfg.mlp_activation
        if act == "leaky_relu2":
            return super().make_mlp(cfg, layer)
        if act == "swiglu":
            return GatedMLP(cfg.model_dim, swiglu_hidden(cfg.model_dim, cfg.mlp_mult))
        return ActMLP(cfg.model_dim, cfg.mlp_mult, {"relu2": lambda h: F.relu(h).square(), "gelu": F.gelu}[act])

    def attn_branch(self, x: torch.Tensor, x0: torch.Tensor, docs):
        x, a = super().attn_branch(x, x0, docs)
        return x, a if self.drop is None else self.drop(a)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        m = super().mlp_branch(x)
        return m if self.drop is None else self.drop(m)


def max_positions(cfg) -> int:
    """Rows the learned position table needs: the longest window of training, evaluation or TTT."""
    return max(cfg.train_seq_len, cfg.eval_seq_len, cfg.ttt_eval_seq_len if cfg.ttt_enabled else 0)


class GPTv2(tg.GPT):
    block = BlockV2
    packable = False  # learned positions, ALiBi, windows and sinks assume one sequence per row: TTT keeps rows

    def __init__(self, cfg):
        cfg = resolve(cfg, budget_steps=False)
        super().__init__(cfg)
        self.norm = NORMS[cfg.norm_type]
        if cfg.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(max_positions(cfg), cfg.model_dim)
            nn.init.normal_(self.pos_emb.weight, std=LEARNED_POS_STD)
        if not cfg.tie_embeddings:  # zero init, like every output projection here
            self.lm_head = tg.CastedLinear(cfg.model_dim, cfg.vocab_size, "zero")
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.variant = attention_variant(cfg)
        self.moe = tuple(m for m in self.modules() if isinstance(m, MoEMLP))  # a tuple: not registered twice
        # replacing the weights (the reset after compile priming) starts the usage statistics afresh
        self.register_load_state_dict_post_hook(lambda module, keys: v2_experts.clear_stats(module))

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        x = super().embed(idx)
        if hasattr(self, "pos_emb"):
            T = idx.shape[1]
            if T > self.pos_emb.num_embeddings:
                raise ValueError(f"POS_ENCODING=learned has {self.pos_emb.num_embeddings} positions "
                                 f"(the longest of TRAIN_SEQ_LEN, EVAL_SEQ_LEN, TTT_EVAL_SEQ_LEN); got a row of {T}")
            x = x + self.pos_emb.weight[:T].to(x.dtype)
        return x if self.drop is None else self.drop(x)

    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight if hasattr(self, "lm_head") else super().output_weight()

    def doc_info(self, idx: torch.Tensor):
        if not self.variant.active:
            return super().doc_info(idx)
        seg = segment_ids_from_starts(segment_starts(idx, BOS_ID, self.cfg.doc_isolation))
        return variant_docs(seg, self.cfg.doc_isolation, self.variant)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", docs=None) -> torch.Tensor:
        loss = super().forward(idx, targets, reduction, docs)
        if self.moe and self.training:
            aux = v2_experts.pop_aux_loss(self.moe)
            # the aux losses' gradient with the task loss's value: train_loss stays comparable with dense runs
            loss = loss + (aux - aux.detach())
        return loss

    def after_step(self) -> None:
        update_all_keys(self)

    def describe(self) -> dict:
        return v2_experts.describe(self)

    def report(self, step: int, log) -> dict:
        return v2_experts.report(self, step, log)


# ----------------------------------------------------------------------------- optimizer grouping
_SOM_QUERY = re.compile(r"blocks\.\d+\.mlp\.query(\.\d+)?\.weight")


def param_kind(name: str, p: torch.Tensor) -> str:
    """The record's grouping, plus: SwiGLU's gate, MoE expert stacks (one Muon update per expert) and
    the SOM query network are block matrices (Muon); an untied head and learned positions are
    embeddings (AdamW); biases, sinks and routers stay scalars."""
    if name.startswith("blocks.") and name.endswith(("mlp.gate.weight", "mlp.experts_in", "mlp.experts_out")):
        return "matrix"
    if _SOM_QUERY.fullmatch(name):
        return "matrix"
    if name in ("lm_head.weight", "pos_emb.weight"):
        return "embed"
    return tg.param_kind(name, p)


# ----------------------------------------------------------------------------- training hooks
def lr_scale(cfg, progress: float) -> float:
    return budget.lr_scale(progress, cfg.warmdown_frac, cfg.min_lr, cfg.lr_warmup_frac, cfg.warmdown_shape)


class RepeatedLoader(PackedLoader):
    """PackedLoader over only the first `distinct` tokens of the stream: its wrap-around then repeats
    them, epoch after epoch (MAX_TRAIN_TOKENS_DISTINCT, data-repetition studies)."""

    def __init__(self, distinct: int, *args):
        self.distinct = distinct
        super().__init__(*args)

    def _start(self, step: int) -> None:
        # before the prefetch thread reads anything: the stream (and each shard's span) ends at `distinct`
        self.total = min(self.total, self.distinct)
        self.starts = np.minimum(self.starts, self.total)
        super()._start(step)


def loader(cfg, *args) -> PackedLoader:
    if cfg.max_train_tokens_distinct:
        return RepeatedLoader(cfg.max_train_tokens_distinct, *args)
    return PackedLoader(*args)


def runtime(cfg, device, model, opt, log):
    """AMP_DTYPE's autocast (and fp16's loss scaling), CUDA_MEMORY_FRACTION's cap; each logged."""
    line = precision.apply_memory_fraction(cfg.cuda_memory_fraction, device)
    if line:
        log(line)
    dtype = precision.choose_dtype(cfg.amp_dtype, device)
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False), None
    autocast = torch.autocast(device_type=device.type, dtype=dtype)
    if dtype != torch.float16:
        if cfg.amp_dtype != "auto" or device.type != "cuda":
            log(f"amp_dtype:{cfg.amp_dtype} autocast:bfloat16")
        return autocast, None
    scaler = precision.LossScaler()
    scaler.wrap(opt)
    log(f"amp_dtype:{cfg.amp_dtype} autocast:float16 loss_scale:{scaler.scale:g}"
        + (" (this GPU has no bf16)" if cfg.amp_dtype == "auto" else ""))
    return autocast, scaler.scale_loss


RECIPE = tg.Recipe(knobs=KNOBS, model=GPTv2, classify=param_kind, script=__file__,
                   title=__doc__.strip().splitlines()[0], resolve=resolve, optimizer=v2_optim.build,
                   lr_scale=lr_scale, loader=loader, runtime=runtime)

if __name__ == "__main__":
    dist.run_main(lambda: tg.main(RECIPE))
