"""train_gpt.py: the record trainer. Reads top to bottom: settings, model, optimizer, data, loop, export.

Today it trains the naive baseline of SPEC.md section 5 (9 x 512, GQA 8/4, ReLU^2 MLP 2x, tied
embeddings, U-Net skips, QK RMS-norm, RoPE, logit softcap 30, Muon + Adam, int8 + zlib export).

  torchrun --standalone --nproc_per_node=8 train_gpt.py       # the real thing, 600 s cap
  python train_gpt.py --help                                  # every setting, with its default

CPU example (2 cores, about two minutes, the embedded sample):
  DATA_PATH=data/sample/datasets/fineweb10B_sp1024 \
  TOKENIZER_PATH=data/sample/tokenizers/fineweb_1024_bpe.model \
  NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=8192 \
  GRAD_ACCUM_STEPS=1 ITERATIONS=200 MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=0 python train_gpt.py
"""
from __future__ import annotations

import copy
import math
import os
import resource
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data.shards import load_shard, load_stream, shard_paths
from golf import dist
from golf.bpb import ByteCounter
from golf.config import Alias, Knob, KnobError, format_config, help_text, parse_knobs
from golf.evaluate import evaluate_stream
from golf.runlog import RunLog, project_sources, write_summary
from quant.artifact import ArtifactTooLarge, check_artifact, size_log_lines
from quant.int8 import pack_int8, unpack_int8
from quant.serialize import serialize


def _warmdown_iters_to_frac(raw: str, env) -> float:
    # The naive baseline counts warmdown in steps; we take a fraction of the active budget.
    return int(raw) / int(env.get("ITERATIONS", "20000"))


# ----------------------------------------------------------------------------- settings
KNOBS = (
    Knob("DATA_PATH", str, "./datasets/fineweb10B_sp1024", "folder with fineweb_train_*.bin and fineweb_val_*.bin"),
    Knob("TOKENIZER_PATH", str, "./tokenizers/fineweb_1024_bpe.model", "SentencePiece model the shards were made with"),
    Knob("RUN_ID", str, "", "name of the run's log and summary files (empty: a fresh id)"),
    Knob("SEED", int, 1337, "seed for initialisation"),
    Knob("LOG_DIR", str, "logs", "folder for the log, JSON summary and artifact"),
    # model
    Knob("VOCAB_SIZE", int, 1024, "vocabulary size; must equal the tokenizer's"),
    Knob("NUM_LAYERS", int, 9, "transformer blocks"),
    Knob("MODEL_DIM", int, 512, "residual width"),
    Knob("NUM_HEADS", int, 8, "query heads"),
    Knob("NUM_KV_HEADS", int, 4, "key/value heads (GQA); must divide NUM_HEADS"),
    Knob("MLP_MULT", float, 2.0, "MLP hidden width as a multiple of MODEL_DIM"),
    Knob("ROPE_BASE", float, 10000.0, "RoPE frequency base"),
    Knob("LOGIT_SOFTCAP", float, 30.0, "logits become c*tanh(logits/c); 0 disables"),
    Knob("QK_GAIN_INIT", float, 1.5, "initial learned per-head query gain (after QK RMS-norm)"),
    Knob("TIED_EMBED_INIT_STD", float, 0.005, "init std of the tied embedding"),
    # batch and budget
    Knob("TRAIN_SEQ_LEN", int, 1024, "training sequence length"),
    Knob("TRAIN_BATCH_TOKENS", int, 524_288, "tokens per optimizer step, over all ranks and micro-steps"),
    Knob("GRAD_ACCUM_STEPS", int, 0, "micro-steps per optimizer step; 0 means 8 // WORLD_SIZE"),
    Knob("ITERATIONS", int, 20_000, "optimizer steps (the schedule's budget when there is no time cap)"),
    Knob("MAX_WALLCLOCK_SECONDS", float, 600.0, "training time cap, eval excluded; 0 = no cap"),
    Knob("WARMUP_STEPS", int, 20, "untimed compile-priming steps; model, optimizer and loader are reset after"),
    Knob("WARMDOWN_FRAC", float, 0.087, "final fraction of the budget with linear LR decay to 0 "
         "(the baseline's 1200 of 13,780 steps)",
         (Alias("WARMDOWN_ITERS", _warmdown_iters_to_frac, "steps, converted to WARMDOWN_ITERS / ITERATIONS"),)),
    # optimizer
    Knob("MATRIX_LR", float, 0.04, "Muon learning rate for the block matrices"),
    Knob("SCALAR_LR", float, 0.04, "Adam learning rate for vectors and scalars"),
    Knob("TIED_EMBED_LR", float, 0.05, "Adam learning rate for the tied embedding"),
    Knob("MUON_MOMENTUM", float, 0.95, "Muon momentum after its warmup"),
    Knob("MUON_MOMENTUM_WARMUP_START", float, 0.85, "Muon momentum at step 0"),
    Knob("MUON_MOMENTUM_WARMUP_STEPS", int, 500, "steps of linear momentum warmup"),
    Knob("MUON_BACKEND_STEPS", int, 5, "Newton-Schulz iterations"),
    Knob("BETA1", float, 0.9, "Adam beta1"),
    Knob("BETA2", float, 0.95, "Adam beta2"),
    Knob("ADAM_EPS", float, 1e-8, "Adam epsilon"),
    Knob("GRAD_CLIP_NORM", float, 0.0, "global grad-norm clip; 0 disables"),
    # evaluation and logging
    Knob("VAL_LOSS_EVERY", int, 1000, "validate every N steps (0: only at the end)"),
    Knob("VAL_BATCH_TOKENS", int, 524_288, "tokens per validation batch, over all ranks",
         (Alias("VAL_BATCH_SIZE", note="the baseline's name"),)),
    Knob("TRAIN_LOG_EVERY", int, 200, "log the training loss every N steps"),
    Knob("COMPILE", bool, None, "torch.compile the model (default: on with CUDA, off on CPU)"),
)


# ----------------------------------------------------------------------------- model
class CastedLinear(nn.Linear):
    """fp32 master weights, matmul in the activation dtype (bf16 under autocast)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        if zero_init:  # output projections start at zero so each block starts as the identity
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, H, T, D]; rotate pairs (first half, second half) by position-dependent angles
        t = torch.arange(x.size(-2), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def _flash_attention_3():
    try:
        from flash_attn_interface import flash_attn_func  # FlashAttention 3 (Hopper)
    except ImportError:
        return None
    return flash_attn_func


FA3 = _flash_attention_3()
ATTENTION_BACKEND = "flash_attention_3" if FA3 is not None else "sdpa"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, T, D] -> [B, H, T, D]."""
    if FA3 is not None and q.is_cuda:
        out = FA3(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float):
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads:
            raise KnobError(f"MODEL_DIM={dim} must divide by NUM_HEADS={num_heads}, and NUM_HEADS by NUM_KV_HEADS={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))
        self.rotary = Rotary(self.head_dim, rope_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # QK RMS-norm bounds the logits; the learned gain then sets their temperature per head
        q = self.rotary(rms_norm(q)) * self.q_gain.to(q.dtype)[None, :, None, None]
        k = self.rotary(rms_norm(k))
        y = causal_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim: int, mult: float):
        super().__init__()
        hidden = int(mult * dim)
        self.fc = CastedLinear(dim, hidden)
        self.proj = CastedLinear(hidden, dim, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.model_dim
        self.attn = Attention(dim, cfg.num_heads, cfg.num_kv_heads, cfg.rope_base, cfg.qk_gain_init)
        self.mlp = MLP(dim, cfg.mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        # learned mix of the stream and the embedding output x0, starting as the plain stream
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.softcap = cfg.logit_softcap
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        # U-Net: the first half's outputs are added back, last-in first-out, into the second half
        self.num_encoder = cfg.num_layers // 2
        num_skips = min(self.num_encoder, cfg.num_layers - self.num_encoder)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim))

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx)
        if torch.is_autocast_enabled(x.device.type):  # the residual stream runs in the autocast dtype (bf16)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = x0 = rms_norm(x)
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder and skips and i - self.num_encoder < len(self.skip_weights):
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips.pop()
            x = block(x, x0)
            if i < self.num_encoder:
                skips.append(x)
        logits = F.linear(rms_norm(x), self.tok_emb.weight.to(x.dtype)).float()
        return self.softcap * torch.tanh(logits / self.softcap) if self.softcap > 0 else logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self.logits(idx)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
        return loss.view_as(targets) if reduction == "none" else loss


# ----------------------------------------------------------------------------- optimizer
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients tuned for fast convergence


def newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximately orthogonalises g (the nearest semi-orthogonal matrix) in bf16."""
    a, b, c = NS_COEFFS
    x = g.bfloat16()
    x = x / (x.norm() + 1e-7)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Momentum + orthogonalised updates for 2-D matrices. Each rank orthogonalises every
    world_size-th matrix and the updates are summed across ranks, so the work is split evenly."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, compile: bool = False):
        super().__init__(list(params), dict(lr=lr, momentum=momentum, backend_steps=backend_steps))
        self.orthogonalise = torch.compile(newton_schulz) if compile else newton_schulz

    @torch.no_grad()
    def step(self):
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
            if torch.distributed.is_initialized() else (0, 1)
        for group in self.param_groups:
            params = group["params"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.bfloat16)
            offset = 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    state = self.state[p]
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    g = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                    g = self.orthogonalise(g, group["backend_steps"])
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5  # equal RMS for tall matrices
                    flat[offset : offset + p.numel()] = g.flatten()
                offset += p.numel()
            dist.all_reduce_(flat)
            offset = 0
            for p in params:
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


def build_optimizers(model: GPT, cfg, compile: bool) -> list[torch.optim.Optimizer]:
    matrices = [p for n, p in model.blocks.named_parameters() if p.ndim == 2]
    scalars = [p for n, p in model.blocks.named_parameters() if p.ndim < 2] + [model.skip_weights]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    adam = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, **fused)
    optimizers = [
        torch.optim.Adam([{"params": [model.tok_emb.weight], "lr": cfg.tied_embed_lr}], **adam),
        Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
             compile=compile),
        torch.optim.Adam([{"params": scalars, "lr": cfg.scalar_lr}], **adam),
    ]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def lr_multiplier(progress: float, warmdown_frac: float) -> float:
    """1 until the last `warmdown_frac` of the budget, then linear to 0 at progress 1."""
    if warmdown_frac <= 0 or progress < 1 - warmdown_frac:
        return 1.0
    return max(0.0, (1 - progress) / warmdown_frac)


# ----------------------------------------------------------------------------- data
class TokenLoader:
    """Reads the train shards as one endless stream. Each call takes the next global batch; rank r's
    micro-batch m is the same tokens whatever the split between ranks and accumulation, so 1 rank
    with accumulation 8 sees exactly what 8 ranks see."""

    def __init__(self, pattern: str, rank: int, world: int):
        self.paths, self.rank, self.world = shard_paths(pattern), rank, world
        self.reset()

    def reset(self) -> None:
        self.file, self.pos = 0, 0
        self.tokens = load_shard(self.paths[0])

    def _take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.file = (self.file + 1) % len(self.paths)
                self.tokens, self.pos = load_shard(self.paths[self.file]), 0
            chunk = self.tokens[self.pos : self.pos + n]
            parts.append(chunk)
            self.pos += len(chunk)
            n -= len(chunk)
        return np.concatenate(parts)

    def next_micro_batches(self, global_tokens: int, seq_len: int, accum: int, device: torch.device):
        """Yields `accum` (inputs, targets) pairs of this rank's share of one optimizer step."""
        local = global_tokens // (self.world * accum)
        span = local + 1  # one extra token so targets are inputs shifted by one
        for _ in range(accum):
            chunk = self._take(span * self.world)[self.rank * span : (self.rank + 1) * span]
            t = torch.from_numpy(chunk.astype(np.int64)).to(device, non_blocking=True)
            yield t[:-1].view(-1, seq_len), t[1:].view(-1, seq_len)


# ----------------------------------------------------------------------------- training
def main() -> None:
    if "--help" in sys.argv or "-h" in sys.argv:
        print(help_text(KNOBS, __doc__.strip().splitlines()[0]))
        return
    cfg = parse_knobs(KNOBS)
    info = dist.setup()
    device, cuda = info.device, info.device.type == "cuda"
    accum = cfg.grad_accum_steps or max(1, 8 // info.world_size)
    if cfg.grad_accum_steps == 0 and 8 % info.world_size:
        raise KnobError(f"WORLD_SIZE={info.world_size} does not divide 8; set GRAD_ACCUM_STEPS explicitly")
    micro = info.world_size * accum * cfg.train_seq_len
    if cfg.train_batch_tokens % micro:
        raise KnobError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} must divide by WORLD_SIZE*GRAD_ACCUM_STEPS*"
                        f"TRAIN_SEQ_LEN={info.world_size}*{accum}*{cfg.train_seq_len}")
    use_compile = cuda if cfg.compile is None else cfg.compile
    run_id = cfg.run_id or time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]
    log_dir = Path(cfg.log_dir)
    log = RunLog(log_dir / f"{run_id}.txt" if info.is_main else None)
    meta = log.provenance(__file__, format_config(cfg))
    log(f"run_id:{run_id} world_size:{info.world_size} grad_accum_steps:{accum} device:{device} "
        f"compile:{use_compile} attention:{ATTENTION_BACKEND}")
    if FA3 is None:
        log("attention: FlashAttention 3 not importable; using PyTorch scaled_dot_product_attention")

    # data and tokenizer
    data = Path(cfg.data_path)
    counter = ByteCounter.from_tokenizer(cfg.tokenizer_path, cfg.vocab_size).to(device)
    val_tokens = load_stream(str(data / "fineweb_val_*.bin"))
    if len(val_tokens) - 1 < cfg.train_seq_len:
        raise ValueError(f"{data}: validation stream has {len(val_tokens)} tokens, shorter than TRAIN_SEQ_LEN={cfg.train_seq_len}")
    if int(val_tokens.max()) >= cfg.vocab_size:
        raise ValueError(f"{data}: validation token id {int(val_tokens.max())} >= VOCAB_SIZE={cfg.vocab_size}")
    loader = TokenLoader(str(data / "fineweb_train_*.bin"), info.rank, info.world_size)
    log(f"train_shards:{len(loader.paths)} val_tokens:{len(val_tokens)} tokenizer:{cfg.tokenizer_path}")

    # model and optimizers
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    base_model = GPT(cfg).to(device)
    n_params = sum(p.numel() for p in base_model.parameters())
    log(f"model_params:{n_params}")
    model = torch.compile(base_model, dynamic=False, fullgraph=True) if use_compile else base_model
    train_model = DDP(model, device_ids=[info.local_rank] if cuda else None) if info.distributed else model
    optimizers = build_optimizers(base_model, cfg, use_compile)
    muon = optimizers[1]
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda)

    def eval_loss(x, y):
        with autocast:
            return model(x, y, reduction="none")

    def validate() -> tuple[float, float]:
        base_model.eval()
        batch_seqs = max(1, cfg.val_batch_tokens // (info.world_size * cfg.train_seq_len))
        result = evaluate_stream(eval_loss, val_tokens, cfg.train_seq_len, batch_seqs, counter, device,
                                 info.rank, info.world_size)
        base_model.train()
        return result

    def train_step(step: int, progress: float) -> torch.Tensor:
        frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps > 0 else 1.0
        for group in muon.param_groups:
            group["momentum"] = (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
        scale = lr_multiplier(progress, cfg.warmdown_frac)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        total = torch.zeros((), device=device)
        for i, (x, y) in enumerate(loader.next_micro_batches(cfg.train_batch_tokens, cfg.train_seq_len, accum, device)):
            if info.distributed:  # all-reduce gradients only on the last micro-step
                train_model.require_backward_grad_sync = i == accum - 1
            with autocast:
                loss = train_model(x, y)
            (loss / accum).backward()
            total += loss.detach() / accum
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(base_model.parameters(), cfg.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        base_model.zero_grad(set_to_none=True)
        return total

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # compile priming: run real steps untimed, then put model, optimizers and loader back
    compile_s = 0.0
    if cfg.warmup_steps > 0:
        initial_model = copy.deepcopy(base_model.state_dict())
        initial_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        t0 = time.perf_counter()
        for step in range(cfg.warmup_steps):
            train_step(step, 0.0)
        sync()
        compile_s = time.perf_counter() - t0
        base_model.load_state_dict(initial_model)
        for opt, state in zip(optimizers, initial_opts):
            opt.load_state_dict(state)
        loader.reset()
        log(f"compile_warmup_steps:{cfg.warmup_steps} compile_time:{compile_s:.1f}s (not counted in train_time)")

    cap_ms = 1000 * cfg.max_wallclock_seconds
    log(f"train_batch_tokens:{cfg.train_batch_tokens} seq_len:{cfg.train_seq_len} iterations:{cfg.iterations} "
        f"max_wallclock_seconds:{cfg.max_wallclock_seconds:g}")
    val_history, train_ms, step, stop_reason = [], 0.0, 0, "iterations"
    sync()
    t0 = time.perf_counter()
    while True:
        last = step == cfg.iterations or stop_reason == "wallclock_cap"
        if last or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0):
            sync()
            train_ms += 1000 * (time.perf_counter() - t0)
            val_loss, val_bpb = validate()
            val_history.append({"step": step, "val_loss": val_loss, "val_bpb": val_bpb, "train_time_ms": train_ms})
            log(f"step:{step}/{cfg.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
            sync()
            t0 = time.perf_counter()
        if last:
            break
        elapsed = train_ms + 1000 * (time.perf_counter() - t0)
        progress = elapsed / cap_ms if cap_ms > 0 else step / cfg.iterations
        loss = train_step(step, progress)
        step += 1
        elapsed = train_ms + 1000 * (time.perf_counter() - t0)
        if cfg.train_log_every > 0 and (step % cfg.train_log_every == 0 or step <= 10):
            loss = dist.all_reduce_(loss) / info.world_size  # the global batch's loss, not rank 0's share
            log(f"step:{step}/{cfg.iterations} train_loss:{loss.item():.4f} train_time:{elapsed:.0f}ms "
                f"step_avg:{elapsed / step:.2f}ms")
        if cap_ms > 0 and (dist.any_rank(elapsed >= cap_ms, device) if info.distributed else elapsed >= cap_ms):
            log(f"stopping_early: wallclock_cap train_time:{elapsed:.0f}ms step:{step}/{cfg.iterations}")
            stop_reason = "wallclock_cap"
    train_ms_total = val_history[-1]["train_time_ms"]

    if cuda:
        peak = {"allocated_mib": torch.cuda.max_memory_allocated() // 2**20,
                "reserved_mib": torch.cuda.max_memory_reserved() // 2**20}
        log(f"peak memory allocated: {peak['allocated_mib']} MiB reserved: {peak['reserved_mib']} MiB")
    else:
        peak = {"cpu_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
        log(f"peak memory (cpu max rss): {peak['cpu_max_rss_mib']} MiB")

    # export: int8 + zlib, then score the round-tripped weights
    pre_loss, pre_bpb = val_history[-1]["val_loss"], val_history[-1]["val_bpb"]
    log(f"final_prequant_exact val_loss:{pre_loss:.8f} val_bpb:{pre_bpb:.8f}")
    state = {k: v.detach().cpu() for k, v in base_model.state_dict().items()}
    blob = pack_int8(state)
    code_bytes = sum(p.stat().st_size for p in project_sources(__file__))
    for line in size_log_lines(code_bytes, len(blob), "int8+zlib"):
        log(line)
    try:
        total_bytes, over_cap = check_artifact(code_bytes, len(blob)), None
    except ArtifactTooLarge as e:
        total_bytes, over_cap = code_bytes + len(blob), e
        log(f"ERROR: {e}")
    if info.is_main:  # full-precision weights (pickle-free) for re-quantization without retraining
        (log_dir / f"{run_id}_model.pre.bin").write_bytes(serialize(state, {"run_id": run_id, "config": cfg.as_dict()}))
        (log_dir / f"{run_id}_model.int8.z").write_bytes(blob)
    base_model.load_state_dict(unpack_int8(blob))
    q_loss, q_bpb = validate()
    log(f"final_int8_zlib_roundtrip val_loss:{q_loss:.4f} val_bpb:{q_bpb:.4f}")
    log(f"final_int8_zlib_roundtrip_exact val_loss:{q_loss:.8f} val_bpb:{q_bpb:.8f}")

    if info.is_main:
        steps_done = step
        write_summary(log_dir / f"{run_id}.json", {
            **meta, "run_id": run_id, "trainer": Path(__file__).name, "config": cfg.as_dict(),
            "world_size": info.world_size, "grad_accum_steps": accum, "device": str(device),
            "attention_backend": ATTENTION_BACKEND, "compile": use_compile, "compile_time_s": compile_s,
            "model_params": n_params, "steps": steps_done, "stop_reason": stop_reason,
            "train_time_ms": train_ms_total, "step_avg_ms": train_ms_total / max(steps_done, 1),
            "tokens_per_s": cfg.train_batch_tokens * steps_done / max(train_ms_total / 1000, 1e-9),
            "peak_memory": peak, "val_history": val_history,
            "stages": {"prequant": {"val_loss": pre_loss, "val_bpb": pre_bpb},
                       "int8_zlib_roundtrip": {"val_loss": q_loss, "val_bpb": q_bpb}},
            "bytes": {"code": code_bytes, "model": len(blob), "total": total_bytes, "over_cap": over_cap is not None},
        })
        log(f"summary: {log_dir / f'{run_id}.json'}")
    if over_cap is not None:
        raise over_cap


if __name__ == "__main__":
    dist.run_main(main)
