"""train_gpt.py: the record trainer. Reads top to bottom: settings, model, optimizer, loop, export.

The defaults train the best public entry's stack (SPEC.md section 5, 35,945,671 parameters); every
technique has its own switch, and the naive baseline is the overrides listed in the README.

  torchrun --standalone --nproc_per_node=8 train_gpt.py       # the real thing, 600 s cap
  python train_gpt.py --help                                  # every setting, with its default

CPU example (2 cores, a few minutes, the embedded sample; ./run.sh runs this configuration):
  VOCAB_SIZE=1024 DATA_PATH=data/sample/datasets/fineweb10B_sp1024 \
  TOKENIZER_PATH=data/sample/tokenizers/fineweb_1024_bpe.model NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 \
  NUM_KV_HEADS=2 NUM_LOOPS=1 LOOP_START=1 LOOP_END=2 PARALLEL_START_LAYER=3 XSA_LAST_N=4 \
  TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=4096 GRAD_ACCUM_STEPS=1 ITERATIONS=150 MAX_WALLCLOCK_SECONDS=0 \
  WARMUP_STEPS=0 python train_gpt.py
"""
from __future__ import annotations

import copy
import glob
import math
import resource
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.shards import BOS_ID, load_stream
import kernels
from golf import dist
from kernels.leaky_mlp import leaky_mlp
from kernels.softcap_ce import softcap_cross_entropy
from golf.attention import at_queries, attend, backend_name, doc_boundaries, flex_options, parse_flex_options, set_flex_options
from golf.bpb import ByteCounter, load_byte_sidecar
from golf.config import Alias, Knob, KnobError, format_config, help_text, parse_knobs
from golf.evaluate import evaluate_stream, target_bytes
from golf.loader import PackedLoader
from golf.optim import EMA, build_optimizer, lr_schedule, momentum_warmup
from golf.profile import profile_lines, profile_steps
from golf.runlog import RunLog, compile_breakdown, write_summary
from golf.ttt import TTTSettings, evaluate_ttt, packs, phase_ends, prime as prime_ttt, split_documents
from quant import export
from quant.artifact import ArtifactTooLarge, check_artifact, size_log_lines
from quant.hessian import HessianCollector
from quant.int8 import pack_int8, unpack_int8
from quant.pack import packed_trainer
from quant.serialize import serialize


def _warmdown_iters_to_frac(raw: str, env) -> float:
    # The naive baseline counts warmdown in steps; we take a fraction of the active budget.
    return int(raw) / int(env.get("ITERATIONS", "20000"))


# ----------------------------------------------------------------------------- settings
KNOBS = (
    # the record's data: SP8192 on CaseOps text (`python -m data download caseops-sp8192`), scored by its byte sidecar
    Knob("DATA_PATH", str, "./datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
         "folder with fineweb_train_*.bin, fineweb_val_*.bin (and fineweb_val_bytes_*.bin for transformed text)"),
    Knob("TOKENIZER_PATH", str, "./tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
         "SentencePiece model the shards were made with"),
    Knob("RUN_ID", str, "", "name of the run's log and summary files (empty: a fresh id)"),
    Knob("SEED", int, 1337, "seed for initialisation"),
    Knob("LOG_DIR", str, "logs", "folder for the log, JSON summary and artifact"),
    # model (defaults: the best public entry, SPEC.md section 5)
    Knob("VOCAB_SIZE", int, 8192, "vocabulary size; must equal the tokenizer's"),
    Knob("NUM_LAYERS", int, 11, "physical transformer blocks"),
    Knob("MODEL_DIM", int, 512, "residual width"),
    Knob("NUM_HEADS", int, 8, "query heads"),
    Knob("NUM_KV_HEADS", int, 4, "key/value heads (GQA); must divide NUM_HEADS"),
    Knob("MLP_MULT", float, 4.0, "MLP hidden width as a multiple of MODEL_DIM"),
    Knob("LEAKY_SLOPE", float, 0.5, "MLP activation LeakyReLU(slope)^2; 0 gives ReLU^2"),
    Knob("ROPE_DIMS", int, 16, "leading channels of each head that RoPE rotates; the head dim rotates all"),
    Knob("ROPE_BASE", float, 10000.0, "RoPE frequency base"),
    Knob("QK_GAIN_INIT", float, 5.0, "initial learned per-head query gain (after QK RMS-norm)"),
    Knob("LN_SCALE", bool, True, "scale each block's norm outputs by 1/sqrt(layer+1)"),
    Knob("LOGIT_SOFTCAP", float, 30.0, "logits become c*tanh(logits/c); 0 disables"),
    Knob("TIED_EMBED_INIT_STD", float, 0.005, "init std of the tied embedding"),
    Knob("NUM_LOOPS", int, 2, "extra passes over layers LOOP_START..LOOP_END once looping is on (0: no recurrence)"),
    Knob("LOOP_START", int, 3, "first physical layer of the looped segment"),
    Knob("LOOP_END", int, 5, "last physical layer of the looped segment"),
    Knob("ENABLE_LOOPING_AT", float, 0.35, "fraction of the training budget after which training loops"),
    Knob("PARALLEL_START_LAYER", int, 8, "layers from here on use parallel attention/MLP lanes; -1 disables"),
    Knob("PARALLEL_FINAL_LANE", str, "mean", "final hidden from the lanes: mean, attn or mlp"),
    Knob("SKIP_GATES_ENABLED", bool, True, "sigmoid-gated U-Net skips (lerp) instead of plain addition"),
    Knob("XSA_LAST_N", int, 11, "the last N layers remove each head's component along its own value vector"),
    Knob("SPARSE_ATTN_GATE_ENABLED", bool, True, "per-head sigmoid gate on attention output from GATE_WIDTH input channels"),
    Knob("GATE_WIDTH", int, 12, "input channels feeding the attention output gate",
         (Alias("GATE_WINDOW", note="the record entries' name"),)),
    Knob("SPARSE_ATTN_GATE_SCALE", float, 0.5, "scale inside the attention gate's sigmoid"),
    Knob("SMEAR_GATE_ENABLED", bool, True, "add a gated copy of the previous token's embedding (never across BOS)"),
    Knob("SMEAR_WIDTH", int, 12, "embedding channels feeding the smear gate"),
    Knob("DOC_ISOLATION", bool, True, "attention never crosses a BOS document boundary (training and evaluation)"),
    Knob("FLEX_KERNEL_OPTIONS", str, "tuned", "FlexAttention block sizes: tuned (measured per GPU, golf/attention.py), "
         "torch (its own choice) or name=value,... e.g. fwd_BLOCK_M=128,bwd_num_warps=4"),
    # batch and budget
    Knob("TRAIN_SEQ_LEN", int, 2048, "training sequence length"),
    Knob("TRAIN_BATCH_TOKENS", int, 786_432, "tokens per optimizer step, over all ranks and micro-steps"),
    Knob("GRAD_ACCUM_STEPS", int, 0, "micro-steps per optimizer step; 0 means 8 // WORLD_SIZE"),
    Knob("ITERATIONS", int, 20_000, "optimizer steps (the schedule's budget when there is no time cap)"),
    Knob("MAX_WALLCLOCK_SECONDS", float, 600.0, "training time cap, eval excluded; 0 = no cap"),
    Knob("GPTQ_RESERVE_SECONDS", float, 8.0, "seconds of the cap kept for quantization calibration after training"),
    Knob("WARMUP_STEPS", int, 20, "untimed compile-priming steps per phase (unlooped, looped); then everything is reset"),
    Knob("PROFILE_STEPS", int, 0, "after priming, profile this many steps per phase (untimed, reset after): kernel table in the log"),
    Knob("WARMDOWN_FRAC", float, 0.85, "final fraction of the budget with linear LR decay (may exceed 1)",
         (Alias("WARMDOWN_ITERS", _warmdown_iters_to_frac, "steps, converted to WARMDOWN_ITERS / ITERATIONS"),)),
    Knob("MIN_LR", float, 0.1, "LR floor of the warmdown, as a fraction of each peak LR"),
    # optimizer
    Knob("MATRIX_LR", float, 0.026, "Muon learning rate for the block matrices"),
    Knob("SCALAR_LR", float, 0.02, "AdamW learning rate for vectors, gates and scalars"),
    Knob("TIED_EMBED_LR", float, 0.03, "AdamW learning rate for the tied embedding"),
    Knob("MUON_MOMENTUM", float, 0.97, "Muon momentum after its warmup"),
    Knob("MUON_MOMENTUM_WARMUP_START", float, 0.92, "Muon momentum at step 0"),
    Knob("MUON_MOMENTUM_WARMUP_STEPS", int, 1500, "steps of linear momentum warmup"),
    Knob("MUON_BACKEND_STEPS", int, 5, "Polar Express iterations"),
    Knob("MUON_ROW_NORMALIZE", bool, True, "MuonEq-R: unit-norm rows of the update before orthogonalising"),
    Knob("MUON_WD", float, 0.095, "decoupled weight decay of the Muon matrices"),
    Knob("EMBED_WD", float, 0.085, "decoupled weight decay of the tied embedding"),
    Knob("ADAM_WD", float, 0.02, "decoupled weight decay of the scalars"),
    Knob("BETA1", float, 0.9, "AdamW beta1"),
    Knob("BETA2", float, 0.99, "AdamW beta2"),
    Knob("ADAM_EPS", float, 1e-8, "AdamW epsilon"),
    Knob("GRAD_CLIP_NORM", float, 0.3, "global grad-norm clip; 0 disables"),
    Knob("EMA_DECAY", float, 0.9965, "EMA of the weights, used for export and final scoring; 0 disables"),
    # evaluation and logging
    # export (quant/): GPTQ on calibration Hessians, LQER, brotli; the budget fitter keeps it under the cap
    Knob("QUANT_METHOD", str, "gptq", "export: gptq, rtn (round-to-nearest at the same bits) or int8 (the baseline's int8+zlib)"),
    Knob("GPTQ_CALIBRATION_BATCHES", int, 16, "training micro-batches per rank whose activations give the Hessians"),
    Knob("MATRIX_BITS", int, 6, "bits of the block matrices"),
    Knob("EMBED_BITS", int, 7, "bits of the tied embedding"),
    Knob("ATTN_CLIP_SIGMAS", float, 13.0, "attention matrices' clip = k x row std"),
    Knob("MLP_CLIP_SIGMAS", float, 11.5, "MLP matrices' clip = k x row std"),
    Knob("EMBED_CLIP_SIGMAS", float, 14.0, "tied embedding's clip = k x row std"),
    Knob("MATRIX_CLIP_SIGMAS", float, 12.85, "other large matrices' clip = k x row std"),
    Knob("LQER_ENABLED", bool, True, "rank-r corrections (A int2, B int4) on the worst-quantized matrices"),
    Knob("LQER_RANK", int, 4, "rank of each LQER correction"),
    Knob("LQER_TOP_K", int, 3, "matrices that get an LQER correction"),
    Knob("COMPRESSOR", str, "brotli", "model bytes compressor: brotli, lzma, zlib or none"),
    Knob("FIT_BUDGET", bool, True, "if code + model exceed 16,000,000 bytes, drop LQER then widen clips until they fit"),
    Knob("VAL_LOSS_EVERY", int, 1000, "validate every N steps (0: only at the end)"),
    Knob("VAL_LAYOUT", str, "docs", "plain evaluation: docs (each document from its own start, cut every "
         "TRAIN_SEQ_LEN tokens, as the public scripts score) or stream (fixed rows of the flat stream)"),
    Knob("VAL_BATCH_TOKENS", int, 262_144, "tokens per validation batch, over all ranks (logits are vocab-wide: keep it modest)",
         (Alias("VAL_BATCH_SIZE", note="the baseline's name"),)),
    Knob("TRAIN_LOG_EVERY", int, 200, "log the training loss every N steps"),
    Knob("EVAL_SEQ_LEN", int, 0, "context window of the final evaluation stages (0: TRAIN_SEQ_LEN)"),
    Knob("EVAL_STRIDE", int, 64, "final sliding-window stage's stride; 0 or >= EVAL_SEQ_LEN skips that stage"),
    # score-first test-time training, the last scored stage (golf/ttt.py)
    Knob("TTT_ENABLED", bool, True, "final stage: score-first LoRA test-time training over the val documents"),
    Knob("TTT_CHUNK_SIZE", int, 48, "tokens scored per document before each adapter step"),
    Knob("TTT_EVAL_SEQ_LEN", int, 2048, "most tokens of a document's prefix a TTT chunk sees"),
    Knob("TTT_BATCH_DOCS", int, 64, "documents TTT scores at once (slots, one adapter each; a finished one's slot takes the next)", (Alias("TTT_BATCH_SIZE"),)),
    Knob("TTT_MICRO_BATCH_TOKENS", int, 65536, "most window tokens per TTT forward/backward (exact; H100: 65536 fastest, ~31 GB)"),
    Knob("TTT_LORA_RANK", int, 96, "rank of the TTT LoRA adapters"),
    Knob("TTT_LORA_ALPHA", float, 96.0, "LoRA scale numerator (delta = x A B * alpha / rank)"),
    Knob("TTT_LORA_TARGETS", str, "k,o,fc,proj,head", "projections with adapters: q,k,v,o,fc,proj,head"),
    Knob("TTT_LORA_LR", float, 1e-4, "AdamW learning rate of the adapters"),
    Knob("TTT_BETA1", float, 0.0, "adapter AdamW beta1"),
    Knob("TTT_BETA2", float, 0.999, "adapter AdamW beta2"),
    Knob("TTT_WEIGHT_DECAY", float, 0.5, "adapter AdamW decoupled weight decay"),
    Knob("PHASED_TTT_PREFIX_DOCS", float, 2500, "documents scored before the last global SGD pass (< 1: a fraction of val docs; 0: none)"),
    Knob("PHASED_TTT_NUM_PHASES", int, 3, "global SGD passes, evenly spaced over the prefix documents"),
    Knob("GLOBAL_TTT_LR", float, 1e-3, "SGD learning rate of the global passes"),
    Knob("GLOBAL_TTT_MOMENTUM", float, 0.9, "SGD momentum of the global passes"),
    Knob("GLOBAL_TTT_EPOCHS", int, 1, "epochs of each global pass over the scored documents"),
    Knob("GLOBAL_TTT_BATCH_SEQS", int, 32, "sequences (pieces of at most TTT_EVAL_SEQ_LEN tokens) per global SGD step"),
    Knob("GLOBAL_TTT_GRAD_CLIP", float, 1.0, "grad-norm clip of the global passes; 0 disables"),
    Knob("GLOBAL_TTT_MICRO_BATCH_TOKENS", int, 32768, "most tokens per global-pass forward/backward (exact; H100: 16384 -> 32768 cut an eager pass 38%, fewer launches)"),
    Knob("COMPILE", bool, None, "torch.compile the model (default: on with CUDA, off on CPU)"),
    Knob("TTT_LAYOUT", str, "auto", "TTT passes: packed (a step's windows end to end, varlen attention), rows (one padded row each), auto (packed on CUDA)"),
    Knob("TTT_PACK_BUCKET", int, 4096, "packed TTT passes are padded to a multiple of this many tokens, of a quarter of it below it (few shapes: few graphs)"),
    Knob("TTT_LAST_LAYER_QUERIES", bool, True, "packed TTT passes run the last layer at the scored rows only (its keys and values at every row)"),
    Knob("TTT_CUDA_GRAPHS", int, 64, "most TTT pass shapes kept as CUDA graphs: a shape seen twice is captured, later passes replay it (CUDA only; 0: off)"),
    Knob("TTT_PRIME", bool, True, "compile TTT's regions before the training clock (throwaway adapters; only with TTT_COMPILE on), so the final TTT's warm-up finds the caches warm"),
    Knob("TTT_COMPILE", bool, None, "LoRA TTT through compiled regions, dynamic shapes (default: on with CUDA; warm-up logged apart: ~190 s cold, ~17 s after TTT_PRIME)"),
    Knob("COMPILE_MODE", str, "blocks", "blocks: one graph per layer kind (~100 s on an H100); model: one per layer order (~225 s, ~5% faster unlooped)"),
    Knob("FUSED_CE", bool, True, "Triton fused softcapped cross-entropy on CUDA (kernels/softcap_ce.py; -1.3 ms/step, BENCHMARKS.md)"),
    Knob("FUSED_MLP", bool, False, "Triton MLP on CUDA in training: fc + LeakyReLU^2 in one matmul, the backward's dh in another (kernels/leaky_mlp.py; off: not yet faster)"),
)

# ----------------------------------------------------------------------------- model
class CastedLinear(nn.Linear):
    """fp32 master weights, matmul in the activation dtype (bf16 under autocast)."""

    def __init__(self, in_features: int, out_features: int, init: str = "default"):
        super().__init__(in_features, out_features, bias=False)
        if init == "zero":  # output projections start at zero so each block starts as the identity
            nn.init.zeros_(self.weight)
        elif init == "orthogonal":
            nn.init.orthogonal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no bias here; the research trainer adds one (BIAS=1) by setting self.bias
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class PartialRotary(nn.Module):
    """RoPE on the first `dims` channels of each head (rotate-half within them); the rest pass through.
    cos/sin of the first `table_len` positions are buffers: computed inside the compiled graph,
    Inductor would evaluate them again for every element of q and k (two thirds of the norm+RoPE
    forward kernels' time). The trainer sizes the tables for its longest sequence (training,
    evaluation or TTT window), so explicit positions, which count from 0 in each sequence, index them."""

    def __init__(self, head_dim: int, dims: int, base: float, table_len: int = 2048):
        super().__init__()
        if dims % 2 or not 0 <= dims <= head_dim:
            raise KnobError(f"ROPE_DIMS={dims} must be even and at most the head dim {head_dim}")
        self.dims = dims
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dims, 2).float() / max(dims, 1)), persistent=False)
        freqs = self.angles(table_len, self.inv_freq.device)
        self.register_buffer("cos_table", freqs.cos(), persistent=False)
        self.register_buffer("sin_table", freqs.sin(), persistent=False)

    def angles(self, n: int, device) -> torch.Tensor:
        """[n, dims / 2]: each row position's rotation angle per channel pair."""
        return torch.outer(torch.arange(n, device=device, dtype=torch.float32), self.inv_freq)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        # x: [B, T, H, D]; positions [B, T] (packed sequences), default each token's index in its row
        if self.dims == 0:
            return x
        if positions is not None:  # packed rows may be longer than the tables; their sequences are not
            cos, sin = self.cos_table[positions][:, :, None, :], self.sin_table[positions][:, :, None, :]
        elif x.size(1) <= self.cos_table.size(0):
            cos, sin = self.cos_table[None, : x.size(1), None, :], self.sin_table[None, : x.size(1), None, :]
        else:  # a row longer than any configured sequence
            freqs = self.angles(x.size(1), x.device)
            cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        rot, rest = x[..., : self.dims], x[..., self.dims :]
        x1, x2 = rot.chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg, xsa: bool):
        super().__init__()
        dim, heads, kv_heads = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        if dim % heads or heads % kv_heads:
            raise KnobError(f"MODEL_DIM={dim} must divide by NUM_HEADS={heads}, and NUM_HEADS by NUM_KV_HEADS={kv_heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        kv_dim = kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim, "orthogonal")
        self.c_k = CastedLinear(dim, kv_dim, "orthogonal")
        self.c_v = CastedLinear(dim, kv_dim, "orthogonal")
        self.proj = CastedLinear(dim, dim, "zero")
        self.q_gain = nn.Parameter(torch.full((heads,), cfg.qk_gain_init))
        self.rotary = PartialRotary(self.head_dim, cfg.rope_dims, cfg.rope_base,
                                    max(cfg.train_seq_len, cfg.eval_seq_len, cfg.ttt_eval_seq_len))
        self.xsa = xsa
        # sparse output gate: per head, sigmoid(scale * w . first GATE_WIDTH input channels); zero init = 0.5
        self.gate_width, self.gate_scale = cfg.gate_width, cfg.sparse_attn_gate_scale
        if cfg.sparse_attn_gate_enabled:
            self.attn_gate_w = nn.Parameter(torch.zeros(heads, cfg.gate_width))

    def forward(self, a: torch.Tensor, docs) -> torch.Tensor:
        """Attention of every row of a [B, T, C], or of docs' query rows only ([1, Q, C] out; keys and
        values still come from every row)."""
        aq = at_queries(a, docs)
        B, T, C = aq.shape
        q = self.c_q(aq).view(B, T, self.heads, self.head_dim)
        k = self.c_k(a).view(*a.shape[:2], self.kv_heads, self.head_dim)
        v = self.c_v(a).view(*a.shape[:2], self.kv_heads, self.head_dim)
        # QK RMS-norm bounds the logits; the learned gain then sets their temperature per head
        positions = getattr(docs, "positions", None)  # research attention variants pass their own layout
        q_positions = positions if positions is None else at_queries(positions, docs)
        q = self.rotary(rms_norm(q), q_positions) * self.q_gain.to(q.dtype)[:, None]
        k = self.rotary(rms_norm(k), positions)
        # autocast leaves the RMS-normed q, k in fp32; FlexAttention and FA3 need one dtype (v's, bf16)
        y = self.attend(q.to(v.dtype), k.to(v.dtype), v, docs)  # [B, T, H, D]
        if self.xsa:  # remove each head's component along its own position's (normalised) value vector
            v_hat = F.normalize(at_queries(v, docs), dim=-1).repeat_interleave(self.heads // self.kv_heads, dim=2)
            y = y - (y * v_hat).sum(-1, keepdim=True) * v_hat
        if hasattr(self, "attn_gate_w"):
            gate = torch.sigmoid(self.gate_scale * F.linear(aq[..., : self.gate_width], self.attn_gate_w.to(a.dtype)))
            y = y * gate.view(B, T, self.heads, -1)  # [B, T, H] here; per channel in the research trainer
        return self.proj(y.reshape(B, T, C))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs) -> torch.Tensor:
        """The attention kernel (golf/attention.py); the research trainer adds ALiBi, windows and sinks."""
        return attend(q, k, v, docs)


class MLP(nn.Module):
    def __init__(self, dim: int, mult: float, slope: float, fused: bool = False):
        super().__init__()
        hidden = int(mult * dim)
        self.fc = CastedLinear(dim, hidden, "orthogonal")
        self.proj = CastedLinear(hidden, dim, "zero")
        self.slope, self.fused = slope, fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and self.training:  # evaluation calls self.fc and self.proj, so TTT and calibration hooks see them
            return leaky_mlp(x, self.fc.weight, self.proj.weight, self.slope)
        return self.proj(F.leaky_relu(self.fc(x), self.slope).square())  # slope 0 is ReLU^2


class Block(nn.Module):
    norm = staticmethod(rms_norm)  # the research trainer swaps norms and MLPs by subclassing

    def __init__(self, cfg, layer: int):
        super().__init__()
        dim = cfg.model_dim
        self.attn = self.make_attention(cfg, layer)
        self.mlp = self.make_mlp(cfg, layer)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        # learned mix of the stream and the embedding output x0, starting as the plain stream
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        # damps deep layers' inputs; a buffer, not a float, so every layer shares one compiled graph
        self.register_buffer("norm_scale", torch.tensor(1 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0),
                             persistent=False)

    def make_attention(self, cfg, layer: int) -> nn.Module:
        return Attention(cfg, xsa=layer >= cfg.num_layers - cfg.xsa_last_n)

    def make_mlp(self, cfg, layer: int) -> nn.Module:
        return MLP(cfg.model_dim, cfg.mlp_mult, cfg.leaky_slope, cfg.fused_mlp)

    def attn_branch(self, x: torch.Tensor, x0: torch.Tensor, docs) -> torch.Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        return x, self.attn_scale.to(x.dtype) * self.attn(self.norm(x) * self.norm_scale, docs)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_scale.to(x.dtype) * self.mlp(self.norm(x) * self.norm_scale)

    def forward(self, x: torch.Tensor, x0: torch.Tensor, docs, mlp_lane: torch.Tensor | None = None):
        """The next stream; for a parallel-lane layer (`mlp_lane` given), the attention branch of x
        and the MLP branch of the MLP lane, which the caller mixes."""
        x, a = self.attn_branch(x, x0, docs)
        if mlp_lane is not None:
            return a, self.mlp_branch(at_queries(mlp_lane, docs))
        x = at_queries(x, docs) + a
        return x + self.mlp_branch(x)


def call(fn, *args):
    """`fn(*args)`: the one function COMPILE_MODE=blocks compiles. Dynamo guards on `fn` and on the
    structure of the modules passed in and takes their weights as inputs, so each layer kind (encoder,
    serial or parallel decoder, XSA or not) gets one graph that serves every layer of that kind."""
    return fn(*args)


def mix_skip(x, skip, weight, gate):
    """A U-Net skip into the decoder stream: x + w * skip, or lerp(w * skip, x, sigmoid(g)) when gated."""
    if skip is None:
        return x
    skip = weight.to(x.dtype) * skip
    return x + skip if gate is None else torch.lerp(skip, x, torch.sigmoid(gate).to(x.dtype))


def serial_decoder_layer(block, x, x0, docs, skip, skip_weight, skip_gate):
    return block(mix_skip(x, skip, skip_weight, skip_gate), x0, docs)


def parallel_decoder_layer(block, x, lane1, x0, docs, skip, skip_weight, skip_gate, post, resid):
    """Two residual lanes: the attention lane (x, with the skip mixed in) and the MLP lane (`lane1`,
    on the first parallel layer the stream before the skip)."""
    lane0 = mix_skip(x, skip, skip_weight, skip_gate)
    a, m = block(lane0, x0, docs, lane1)
    lane0, lane1 = at_queries(lane0, docs), at_queries(lane1, docs)  # the last layer of a pruned forward
    post, resid = post.to(x.dtype), resid.to(x.dtype)
    return (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
            resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m)


def layer_order(cfg, looping: bool) -> list[int]:
    """Physical layer of each virtual layer: LOOP_START..LOOP_END run NUM_LOOPS+1 times when looping."""
    if not looping or cfg.num_loops == 0:
        return list(range(cfg.num_layers))
    segment = list(range(cfg.loop_start, cfg.loop_end + 1))
    return list(range(cfg.loop_start)) + segment * (cfg.num_loops + 1) + list(range(cfg.loop_end + 1, cfg.num_layers))


class GPT(nn.Module):
    block = Block
    norm = staticmethod(rms_norm)
    packable = True  # hidden() honours DocInfo.positions and seq_starts: TTT may pack several windows in a row

    def __init__(self, cfg):
        super().__init__()
        L = cfg.num_layers
        if cfg.num_loops and not 0 <= cfg.loop_start <= cfg.loop_end < L:
            raise KnobError(f"need 0 <= LOOP_START={cfg.loop_start} <= LOOP_END={cfg.loop_end} < NUM_LAYERS={L}")
        self.cfg = cfg
        self.looping = False  # set by the trainer after ENABLE_LOOPING_AT; evaluation always loops
        self.regions = None  # the compiled `call`, set for one call by compile_model (blocks mode)
        self.softcap = cfg.logit_softcap
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        if cfg.smear_gate_enabled:  # x_t += lambda * sigmoid(w . x_t[:width]) * x_{t-1}, never across a BOS
            self.smear_gate = CastedLinear(cfg.smear_width, 1, "zero")
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.blocks = nn.ModuleList(self.block(cfg, i) for i in range(L))
        # U-Net: encoder outputs are added back, last-in first-out, before the decoder's blocks;
        # sized for the longest (looped) order, whose encoder/decoder split is the widest
        order = layer_order(cfg, looping=True)
        self.num_skips = min(len(order) // 2, len(order) - len(order) // 2)
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, cfg.model_dim))
        if cfg.skip_gates_enabled:  # x <- lerp(w * skip, x, sigmoid(g)): an even mix at zero init
            self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, cfg.model_dim))
        self.parallel_start = cfg.parallel_start_layer if 0 <= cfg.parallel_start_layer < L else L
        if self.parallel_start < L:  # two residual lanes: lane 0 feeds attention, lane 1 the MLP
            self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2))
            self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1))
            for looping in (False, True):
                order = layer_order(cfg, looping)
                dec = order[len(order) // 2 :]
                first = next((k for k, i in enumerate(dec) if i >= self.parallel_start), len(dec))
                if any(i < self.parallel_start for i in dec[first:]) or self.parallel_start < L // 2:
                    raise KnobError(f"PARALLEL_START_LAYER={cfg.parallel_start_layer} must start a tail of "
                                    f"decoder layers (decoder order {dec}); use -1 to disable")

    def smear(self, x: torch.Tensor, idx: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., : self.cfg.smear_width]))
        keep = idx[:, 1:, None] != BOS_ID  # a BOS never sees the previous document
        if starts is not None:  # nor does the first token of a packed sequence see the one before it
            keep = keep & ~starts[:, 1:, None]
        return torch.cat((x[:, :1], x[:, 1:] + gate[:, 1:] * keep.to(x.dtype) * x[:, :-1]), dim=1)

    def after_step(self) -> None:
        """Called after every optimizer step; research models update gradient-free state here."""

    def describe(self) -> dict:
        """Facts beyond the parameter count, logged as `model_info` and kept in the summary
        (research models: active vs total parameters of a mixture of experts)."""
        return {}

    def report(self, step: int, log) -> dict:
        """Called on every rank before each validation: research models log statistics gathered in
        training (expert usage, summed over ranks) and return them for the summary."""
        return {}

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Input embeddings; the research trainer adds learned positions and dropout here."""
        return self.tok_emb(idx)

    def output_weight(self) -> torch.Tensor:
        """The LM head's matrix: the tied embedding (the research trainer can untie it)."""
        return self.tok_emb.weight

    def doc_info(self, idx: torch.Tensor):
        """Document layout of a batch. Build it outside a compiled model and pass it in: its tensors
        are then graph inputs (Inductor's FlexAttention lowering fails on a mask computed in-graph)."""
        return doc_boundaries(idx, BOS_ID, self.cfg.doc_isolation)

    def stream_input(self, idx: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
        """x0: embeddings in the residual stream's dtype (bf16 under autocast), smeared, normed;
        `starts` (DocInfo.seq_starts) marks where packed sequences begin."""
        x = self.embed(idx)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if hasattr(self, "smear_gate"):
            x = self.smear(x, idx, starts)
        return self.norm(x)

    def stream_output(self, x: torch.Tensor, lanes) -> torch.Tensor:
        if lanes is not None:
            x = {"mean": 0.5 * (lanes[0] + lanes[1]), "attn": lanes[0], "mlp": lanes[1]}[self.cfg.parallel_final_lane]
        return self.norm(x)

    def hidden(self, idx: torch.Tensor, docs=None) -> torch.Tensor:
        """Final normed hidden states. Every piece of work goes through `run` (the compiled `call` in
        COMPILE_MODE=blocks), so no elementwise glue runs eagerly between the compiled layers."""
        docs = self.doc_info(idx) if docs is None else docs
        # with query rows (golf.attention.Queries), the last layer and the output run at those rows
        # only; every earlier layer still runs at every row, whose keys and values the last one reads
        pruned = getattr(docs, "queries", None) is not None
        if pruned and self.query_block() is None:
            raise ValueError("query rows need a last layer that runs once (LOOP_END below NUM_LAYERS - 1)")
        every = docs.every_row() if pruned else docs
        run = self.regions or call
        # one tensor passed as two arguments makes Dynamo compile another graph (it guards on `a is b`);
        # a view is a distinct argument at no cost
        x0 = run(type(self).stream_input, self, idx, getattr(docs, "seq_starts", None))
        x = x0.view_as(x0)
        order = layer_order(self.cfg, self.looping or not self.training)
        n_enc = len(order) // 2
        skips, lanes = [], None
        gates = getattr(self, "skip_gates", None)
        for k, i in enumerate(order):
            block, layer_docs = self.blocks[i], docs if k == len(order) - 1 else every
            if k < n_enc:
                x = run(block, x, x0, layer_docs)
                skips.append(x.view_as(x))
                continue
            d = k - n_enc
            skip = (skips.pop(), self.skip_weights[d], None if gates is None else gates[d]) \
                if d < self.num_skips and skips else (None, None, None)
            if i < self.parallel_start:
                x = run(serial_decoder_layer, block, x, x0, layer_docs, *skip)
                continue
            lanes = run(parallel_decoder_layer, block, x, x.view_as(x) if lanes is None else lanes[1], x0, layer_docs, *skip,
                        self.parallel_post_lambdas[i], self.parallel_resid_lambdas[i])
            x = lanes[0]  # the skip of the next decoder step mixes into the attention lane
        return run(type(self).stream_output, self, x, lanes)

    def query_block(self) -> int | None:
        """The physical block of the evaluation order's last layer, the one a forward with query rows
        runs at those rows only; None when it also runs earlier (a loop through the last layer)."""
        order = layer_order(self.cfg, looping=True)
        return order[-1] if order.count(order[-1]) == 1 else None

    def logits(self, idx: torch.Tensor, docs=None) -> torch.Tensor:
        return self.head(self.hidden(idx, docs))

    def head(self, x: torch.Tensor, head_delta=None) -> torch.Tensor:
        """Softcapped fp32 logits of final hidden states; `head_delta(x)` (test-time LoRA) is added
        before the cap. Separate from hidden() so TTT computes logits of the scored positions only."""
        logits = F.linear(x, self.output_weight().to(x.dtype))
        if head_delta is not None:
            logits = logits + head_delta(x)
        logits = logits.float()
        return self.softcap * torch.tanh(logits / self.softcap) if self.softcap > 0 else logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", docs=None) -> torch.Tensor:
        x = self.hidden(idx, docs)
        return (self.regions or call)(type(self).loss, self, x, targets, reduction)

    def loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        logits = F.linear(x, self.output_weight().to(x.dtype))  # the softcap is inside the loss
        loss = softcap_cross_entropy(logits.flatten(0, 1), targets.flatten(), self.softcap, reduction,
                                     use_kernel=None if self.cfg.fused_ce else False)
        return loss.view_as(targets) if reduction == "none" else loss


# ----------------------------------------------------------------------------- optimizer
MATRIX_NAMES = ("c_q.weight", "c_k.weight", "c_v.weight", "proj.weight", "fc.weight")


def param_kind(name: str, p: torch.Tensor) -> str:
    """Muon for the blocks' projection matrices, AdamW for the embedding and everything small."""
    if name == "tok_emb.weight":
        return "embed"
    return "matrix" if name.startswith("blocks.") and name.endswith(MATRIX_NAMES) else "scalar"


# ----------------------------------------------------------------------------- training
def grad_accum_steps(cfg, world: int) -> int:
    """Micro-steps per optimizer step: GRAD_ACCUM_STEPS, or 8 // world (the 8-GPU math on fewer GPUs;
    1 above 8 GPUs, e.g. two nodes). The global batch must split evenly into rank micro-batches."""
    accum = cfg.grad_accum_steps or max(1, 8 // world)
    if cfg.grad_accum_steps == 0 and world < 8 and 8 % world:
        raise KnobError(f"WORLD_SIZE={world} does not divide 8; set GRAD_ACCUM_STEPS explicitly")
    micro = world * accum * cfg.train_seq_len
    if cfg.train_batch_tokens % micro:
        raise KnobError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} must divide by WORLD_SIZE*GRAD_ACCUM_STEPS*"
                        f"TRAIN_SEQ_LEN={world}*{accum}*{cfg.train_seq_len}={micro}")
    return accum


def val_layout(cfg, seq_len: int, stride: int) -> str:
    """VAL_LAYOUT for plain evaluation; sliding windows (a stride below the window) score the stream."""
    if cfg.val_layout not in ("docs", "stream"):
        raise KnobError(f"VAL_LAYOUT={cfg.val_layout!r}: expected 'docs' or 'stream'")
    return cfg.val_layout if stride in (0, seq_len) else "stream"


def compile_model(model: GPT, mode: str, backend: str = "inductor"):
    """What the training and validation steps call. `model` traces the whole forward (one graph per
    layer order: unlooped and looped); `blocks` compiles `call`, through which the forward runs each
    layer with its skip and lane mixing, the input embedding and the loss: all layers and both orders
    share a few graphs (about a third of the compile time; no fusion across layer boundaries)."""
    # the kernel switch caches itself on first use; resolved inside a graph, the cache's change would
    # fail that graph's guard and compile it twice
    kernels.enabled(), kernels.triton_available()
    if mode == "model":
        return torch.compile(model, dynamic=False, fullgraph=True, backend=backend)
    if mode != "blocks":
        raise KnobError(f"COMPILE_MODE={mode!r}: expected 'model' or 'blocks'")
    # graphs per layer kind (XSA or not, with or without a skip, serial or parallel) and mode (train,
    # eval), above Dynamo's default limit of 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    region = torch.compile(call, dynamic=False, fullgraph=True, backend=backend)

    def run(*args, **kwargs):
        model.regions = region  # only for this call: calibration runs the eager model, TTT eager or its own regions
        try:
            return model(*args, **kwargs)
        finally:
            model.regions = None
    return run


TITLE = __doc__.strip().splitlines()[0]


def record_lr_scale(cfg, progress: float) -> float:
    return lr_schedule(progress, cfg.warmdown_frac, cfg.min_lr)


def record_loader(cfg, *args) -> PackedLoader:
    return PackedLoader(*args)


def record_runtime(cfg, device, model, opt, log):
    """(autocast context of training and evaluation, what a training loss becomes before backward):
    bf16 on CUDA, none on CPU; the loss as it is (the research trainer scales it for fp16)."""
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"), None


@dataclass(frozen=True)
class Recipe:
    """What a trainer script plugs into main(): its knobs, its model class, how its parameters are
    grouped for the optimizer, and its own file (logged, and packed for the code bytes). The research
    trainer passes its extended versions, and `resolve`, which fills knobs a preset implies (the log
    shows the resolved values); the loop, evaluation and export are shared. Its extension points:
    `optimizer` (build_optimizer's signature), `lr_scale(cfg, progress)`, `loader(cfg, *PackedLoader
    args)` and `runtime(cfg, device, model, opt, log)` -> (autocast context, loss scaling or None)."""
    knobs: tuple = KNOBS
    model: type = GPT
    classify: Callable[[str, torch.Tensor], str] = param_kind
    script: str = __file__
    title: str = TITLE
    resolve: Callable | None = None
    optimizer: Callable = build_optimizer
    lr_scale: Callable = record_lr_scale
    loader: Callable = record_loader
    runtime: Callable = record_runtime


def main(recipe: Recipe = Recipe()) -> None:
    if "--help" in sys.argv or "-h" in sys.argv:
        print(help_text(recipe.knobs, recipe.title))
        return
    cfg = parse_knobs(recipe.knobs)
    if recipe.resolve is not None:
        cfg = recipe.resolve(cfg)
    try:
        set_flex_options(parse_flex_options(cfg.flex_kernel_options))
    except ValueError as e:
        raise KnobError(str(e)) from None
    info = dist.setup()
    device, cuda = info.device, info.device.type == "cuda"
    accum = grad_accum_steps(cfg, info.world_size)
    if cfg.parallel_final_lane not in ("mean", "attn", "mlp"):
        raise KnobError(f"PARALLEL_FINAL_LANE={cfg.parallel_final_lane!r}: expected mean, attn or mlp")
    if cfg.ttt_enabled:  # TTT's settings are checked now, not after the whole training run
        try:
            ttt_settings(cfg, 1, device)
        except ValueError as e:
            raise KnobError(str(e)) from None
    use_compile = cuda if cfg.compile is None else cfg.compile
    run_id = cfg.run_id or time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]
    log_dir = Path(cfg.log_dir)
    log = RunLog(log_dir / f"{run_id}.txt" if info.is_main else None)
    meta = log.provenance(recipe.script, format_config(cfg))
    attention = backend_name(device, cfg.doc_isolation)
    log(f"run_id:{run_id} world_size:{info.world_size} grad_accum_steps:{accum} device:{device} "
        f"compile:{use_compile and cfg.compile_mode} attention:{attention}")
    if cuda and not attention.startswith("flash_attention_3"):
        log("attention: FlashAttention 3 not importable; using " + attention)
    flex_kernel = None  # the FlexAttention kernel options in use (None: torch's choice, or no FlexAttention)
    if attention.startswith("flex"):
        flex_kernel = flex_options(device, cfg.model_dim // cfg.num_heads)
        log(f"attention: flex kernel_options {flex_kernel or 'torch default'} (FLEX_KERNEL_OPTIONS={cfg.flex_kernel_options})")

    # data and tokenizer
    data = Path(cfg.data_path)
    counter = ByteCounter.from_tokenizer(cfg.tokenizer_path, cfg.vocab_size).to(device)
    val_tokens = load_stream(str(data / "fineweb_val_[0-9]*.bin"))
    if len(val_tokens) - 1 < cfg.train_seq_len:
        raise ValueError(f"{data}: validation stream has {len(val_tokens)} tokens, shorter than TRAIN_SEQ_LEN={cfg.train_seq_len}")
    if int(val_tokens.max()) >= cfg.vocab_size:
        raise ValueError(f"{data}: validation token id {int(val_tokens.max())} >= VOCAB_SIZE={cfg.vocab_size}")
    sidecar_pattern = str(data / "fineweb_val_bytes_*.bin")
    sidecar = load_byte_sidecar(sidecar_pattern, len(val_tokens)) if glob.glob(sidecar_pattern) else None
    if sidecar is None and "caseops" in Path(cfg.tokenizer_path).name.lower():
        raise ValueError(f"{data}: a CaseOps tokenizer ({cfg.tokenizer_path}) needs the val byte sidecar "
                         f"{sidecar_pattern}: its pieces are transformed text, not the original bytes")
    byte_counts = target_bytes(val_tokens, counter, sidecar)
    log(f"val_bytes: {'byte sidecar ' + sidecar_pattern if sidecar is not None else 'tokenizer pieces'}")
    loader = recipe.loader(cfg, str(data / "fineweb_train_*.bin"), cfg.train_seq_len, cfg.train_batch_tokens,
                           accum, info.rank, info.world_size, device)
    log(f"train_shards:{len(loader.paths)} val_tokens:{len(val_tokens)} val_layout:{val_layout(cfg, 0, 0)} "
        f"tokenizer:{cfg.tokenizer_path}")

    # model and optimizer
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    base_model = recipe.model(cfg).to(device)
    n_params = sum(p.numel() for p in base_model.parameters())
    log(f"model_params:{n_params}")
    model_info = base_model.describe()
    if model_info:
        log("model_info " + " ".join(f"{k}:{v}" for k, v in model_info.items()))
    log("layers: unlooped " + ",".join(map(str, layer_order(cfg, False))) +
        (" looped " + ",".join(map(str, layer_order(cfg, True))) if cfg.num_loops else ""))
    model = compile_model(base_model, cfg.compile_mode) if use_compile else base_model
    opt = recipe.optimizer(dict(base_model.named_parameters()), recipe.classify, cfg, compile=use_compile)
    log("optimizer: " + opt.describe())
    autocast, scale_loss = recipe.runtime(cfg, device, base_model, opt, log)

    def eval_loss(x, y):
        with autocast:
            return model(x, y, reduction="none", docs=base_model.doc_info(x))

    def validate(seq_len: int = cfg.train_seq_len, stride: int = 0) -> tuple[float, float]:
        base_model.eval()  # evaluation always runs the looped order
        batch_seqs = max(1, cfg.val_batch_tokens // (info.world_size * seq_len))
        result = evaluate_stream(eval_loss, val_tokens, seq_len, batch_seqs, byte_counts, device,
                                 info.rank, info.world_size, stride, layout=val_layout(cfg, seq_len, stride))
        base_model.train()
        return result

    def train_step(step: int, progress: float) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for x, y in loader.next_batch():
            with autocast:
                loss = model(x, y, docs=base_model.doc_info(x))
            (loss / accum if scale_loss is None else scale_loss(loss / accum)).backward()
            total += loss.detach() / accum
        momentum = momentum_warmup(step, cfg.muon_momentum_warmup_start, cfg.muon_momentum,
                                   cfg.muon_momentum_warmup_steps)
        opt.step(recipe.lr_scale(cfg, progress), momentum)
        return total

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # compile priming: real steps in each phase (unlooped, looped), untimed; then everything is reset
    compile_s, profiles = 0.0, {}
    if cfg.warmup_steps > 0 or cfg.profile_steps > 0:
        initial_model = copy.deepcopy(base_model.state_dict())
        initial_opt = copy.deepcopy(opt.state_dict())
        t0 = time.perf_counter()
        for looping in (False, True) if cfg.num_loops else (False,):
            base_model.looping = looping
            for step in range(cfg.warmup_steps):
                train_step(step, 0.0)
        sync()
        compile_s = time.perf_counter() - t0
        for looping in ((False, True) if cfg.num_loops else (False,)) if cfg.profile_steps > 0 else ():
            base_model.looping = looping
            phase = "looped" if looping else "unlooped"
            profiles[phase] = profile_steps(lambda: train_step(0, 0.0), cfg.profile_steps, device)
            for line in profile_lines(profiles[phase], phase):
                log(line)
        base_model.looping = False
        base_model.load_state_dict(initial_model)
        opt.load_state_dict(initial_opt)
        loader.reset()
        log(f"compile_warmup_steps:{cfg.warmup_steps} compile_time:{compile_s:.1f}s (not counted in train_time)")
    compile_phases = compile_breakdown() if use_compile else {}
    if compile_phases:
        log("compile_phases: " + " ".join(f"{k}:{v:g}{'' if k == 'graphs' else 's'}" for k, v in compile_phases.items()))
    ttt_prime_s = None
    if cfg.ttt_enabled and cfg.ttt_prime:
        s = ttt_settings(cfg, 1, device)  # the val documents' count only sets phase boundaries: no part of the compile
        if s.compile:
            ttt_prime_s = prime_ttt(base_model, s, device, autocast, log)
            log(f"ttt_prime_time:{ttt_prime_s:.1f}s (TTT's compile with throwaway adapters, not counted in train_time)")
            if cuda:  # the adapters' buffers and activations go back before training
                torch.cuda.empty_cache()
    ema = EMA(base_model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    cap_ms = 1000 * max(0.0, cfg.max_wallclock_seconds - cfg.gptq_reserve_seconds) if cfg.max_wallclock_seconds > 0 else 0.0
    log(f"train_batch_tokens:{cfg.train_batch_tokens} seq_len:{cfg.train_seq_len} iterations:{cfg.iterations} "
        f"max_wallclock_seconds:{cfg.max_wallclock_seconds:g} effective_cap:{cap_ms:.0f}ms")
    val_history, loop_began, train_ms, step, stop_reason = [], None, 0.0, 0, "iterations"
    model_reports = []
    sync()
    t0 = time.perf_counter()
    while True:
        last = step == cfg.iterations or stop_reason == "wallclock_cap"
        if last or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0):
            sync()
            train_ms += 1000 * (time.perf_counter() - t0)
            # the model's own report (the research trainer's expert usage) covers training steps only:
            # logged before the validation, so a run cut during a long validation still has it
            if report := base_model.report(step, log):
                model_reports.append({"step": step, **report})
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
        if cfg.num_loops and not base_model.looping and progress >= cfg.enable_looping_at:
            base_model.looping = True
            loop_began = (elapsed, step)
            log(f"looping_enabled step:{step} train_time:{elapsed:.0f}ms virtual_layers:{len(layer_order(cfg, True))}")
        loss = train_step(step, progress)
        if ema is not None:
            ema.update()
        base_model.after_step()
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
    phases = phase_summary(loop_began, train_ms_total, step, cfg.train_batch_tokens)
    for name, p in phases.items():
        log(f"phase:{name} steps:{p['steps']} step_avg:{p['step_avg_ms']:.2f}ms tokens_per_s:{p['tokens_per_s']:.0f}")

    if cuda:
        peak = {"allocated_mib": torch.cuda.max_memory_allocated() // 2**20,
                "reserved_mib": torch.cuda.max_memory_reserved() // 2**20}
        log(f"peak memory allocated: {peak['allocated_mib']} MiB reserved: {peak['reserved_mib']} MiB")
    else:
        peak = {"cpu_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
        log(f"peak memory (cpu max rss): {peak['cpu_max_rss_mib']} MiB")

    stages = {"in_training": {"val_loss": val_history[-1]["val_loss"], "val_bpb": val_history[-1]["val_bpb"]}}
    if ema is not None:  # the averaged weights are what gets exported and scored
        ema.copy_to(base_model)
        e_loss, e_bpb = validate()
        log(f"final_ema val_loss:{e_loss:.4f} val_bpb:{e_bpb:.4f}")
        stages["ema"] = {"val_loss": e_loss, "val_bpb": e_bpb}
    pre_loss, pre_bpb = stages["ema" if ema is not None else "in_training"].values()
    log(f"final_prequant_exact val_loss:{pre_loss:.8f} val_bpb:{pre_bpb:.8f}")
    stages["prequant"] = {"val_loss": pre_loss, "val_bpb": pre_bpb}

    # export: quantize and pack (rank 0), prove the size, then score the round-tripped weights everywhere
    state = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in base_model.state_dict().items()}
    hessians, calib_s = None, 0.0
    if cfg.quant_method == "gptq":
        t0 = time.perf_counter()
        hessians = calibrate(base_model, loader, cfg.gptq_calibration_batches, autocast)
        calib_s = time.perf_counter() - t0
        log(f"gptq_calibration batches:{cfg.gptq_calibration_batches} ranks:{info.world_size} time:{calib_s:.1f}s")
    loader.close()
    trainer = packed_trainer(recipe.script)
    code_bytes = len(trainer)
    t0 = time.perf_counter()
    label, blob, over_cap, fit_steps, unfitted = export_label(cfg), b"", None, [], None
    if info.is_main:
        try:
            blob, fit_steps, unfitted = quantize_and_pack(cfg, state, hessians, code_bytes, log)
        except ArtifactTooLarge as e:  # only without the fitter or when even it fails: the blob is kept
            over_cap, blob = e, e.blob
    blob = dist.broadcast_bytes(blob, device)
    unfitted = dist.broadcast_bytes(unfitted or b"", device)
    export_s = time.perf_counter() - t0
    for line in size_log_lines(code_bytes, len(blob), label):
        log(line)
    if over_cap is None and info.is_main:
        try:
            check_artifact(code_bytes, len(blob))
        except ArtifactTooLarge as e:
            over_cap = e
    if over_cap is not None:
        log(f"ERROR: {over_cap}")
    log(f"export_time:{export_s:.1f}s (quantize + pack, after {calib_s:.1f}s of calibration)")
    if info.is_main:  # full-precision weights (pickle-free) for re-quantization without retraining
        cpu_state = {k: v.cpu() for k, v in state.items()}
        (log_dir / f"{run_id}_model.pre.bin").write_bytes(serialize(cpu_state, {"run_id": run_id, "config": cfg.as_dict()}))
        if hessians is not None:
            (log_dir / f"{run_id}_hessians.bin").write_bytes(serialize({k: v.cpu() for k, v in hessians.items()}))
        (log_dir / f"{run_id}_model.{cfg.quant_method}.bin").write_bytes(blob)
        (log_dir / f"{run_id}_trainer.py").write_bytes(trainer)  # the code bytes counted, for record folders
    t0 = time.perf_counter()
    if unfitted:  # what the budget fitter's changes cost: the export as configured, scored first
        base_model.load_state_dict(export.unpack(unfitted))
        u_loss, u_bpb = validate()
    base_model.load_state_dict(unpack_int8(blob) if cfg.quant_method == "int8" else export.unpack(blob))
    q_loss, q_bpb = validate()
    stage = "int8_zlib_roundtrip" if cfg.quant_method == "int8" else "quant_roundtrip"
    log(f"final_{stage} val_loss:{q_loss:.4f} val_bpb:{q_bpb:.4f} eval_time:{time.perf_counter() - t0:.1f}s")
    log(f"final_{stage}_exact val_loss:{q_loss:.8f} val_bpb:{q_bpb:.8f}")
    stages[stage] = {"val_loss": q_loss, "val_bpb": q_bpb, "gap_vs_prequant": q_bpb - pre_bpb}
    if unfitted:
        log(f"export_fit_cost val_bpb:{q_bpb - u_bpb:+.5f} (unfitted {u_bpb:.5f}, {len(unfitted)} model bytes; "
            f"fitted {q_bpb:.5f}, {len(blob)})")
        stages["unfitted_roundtrip"] = {"val_loss": u_loss, "val_bpb": u_bpb, "model_bytes": len(unfitted),
                                        "fit_cost_bpb": q_bpb - u_bpb}
    stages.update(final_stages(cfg, base_model, val_tokens, byte_counts, validate, autocast, device, log))
    eval_s = time.perf_counter() - t0
    log(f"eval_total_time:{eval_s:.1f}s (artifact deserialization and every scored stage, compile warm-ups included)")

    if info.is_main:
        write_summary(log_dir / f"{run_id}.json", {
            **meta, "run_id": run_id, "trainer": Path(recipe.script).name, "config": cfg.as_dict(),
            "world_size": info.world_size, "grad_accum_steps": accum, "device": str(device),
            "attention_backend": attention, "flex_kernel_options": flex_kernel,
            "compile": use_compile, "compile_time_s": compile_s, "ttt_prime_s": ttt_prime_s,
            "compile_phases": compile_phases, "model_params": n_params, "steps": step, "stop_reason": stop_reason,
            "train_time_ms": train_ms_total, "step_avg_ms": train_ms_total / max(step, 1),
            "tokens_per_s": cfg.train_batch_tokens * step / max(train_ms_total / 1000, 1e-9), "phases": phases,
            "peak_memory": peak, "val_history": val_history, "stages": stages,
            "model_info": model_info, "model_reports": model_reports,
            "bytes": {"code": code_bytes, "model": len(blob), "total": code_bytes + len(blob),
                      "over_cap": over_cap is not None, "label": label},
            "export": {"method": cfg.quant_method, "calibration_s": calib_s, "export_s": export_s, "fit_steps": fit_steps},
            "eval_total_s": eval_s, "profiles": profiles,
        })
        log(f"summary: {log_dir / f'{run_id}.json'}")
    if over_cap is not None:
        raise over_cap


@torch.no_grad()
def calibrate(model: GPT, loader: PackedLoader, batches: int, autocast) -> dict[str, torch.Tensor]:
    """Hessians (mean x x^T) of every block matrix's input, and of the final hidden state for the tied
    embedding, over `batches` training micro-batches per rank, summed over ranks. The model runs its
    evaluation (looped) order: every pass through a looped layer counts."""
    model.eval()
    names = {f"{n}.weight": m for n, m in model.named_modules()
             if isinstance(m, CastedLinear) and f"{n}.weight".endswith(MATRIX_NAMES) and n.startswith("blocks.")}
    collector = HessianCollector()
    with collector.attach(model, names):
        seen = 0
        while seen < batches:
            for x, _ in loader.next_batch():
                if seen == batches:
                    break
                with autocast:
                    collector.add("tok_emb.weight", model.hidden(x))
                seen += 1
    model.train()
    sums, counts = collector.hessians(), collector.counts
    for name, H in sums.items():  # mean over this rank's tokens -> global mean over every rank's tokens
        n = torch.tensor(float(counts[name]), device=H.device, dtype=torch.float64)
        H.mul_(counts[name])
        dist.all_reduce_(H)
        dist.all_reduce_(n)
        H.div_(float(n))
    return sums


def export_label(cfg) -> str:
    if cfg.quant_method == "int8":
        return "int8+zlib"
    bits = f"int{cfg.matrix_bits}/int{cfg.embed_bits}"
    return f"{bits} {cfg.quant_method}{'+lqer' if cfg.lqer_enabled else ''}+{cfg.compressor}"


def quant_settings(cfg) -> export.QuantSettings:
    return export.QuantSettings(
        matrix_bits=cfg.matrix_bits, embed_bits=cfg.embed_bits, attn_clip_sigmas=cfg.attn_clip_sigmas,
        mlp_clip_sigmas=cfg.mlp_clip_sigmas, embed_clip_sigmas=cfg.embed_clip_sigmas,
        matrix_clip_sigmas=cfg.matrix_clip_sigmas, lqer_enabled=cfg.lqer_enabled, lqer_rank=cfg.lqer_rank,
        lqer_top_k=cfg.lqer_top_k, compressor=cfg.compressor, gptq=cfg.quant_method == "gptq")


def quantize_and_pack(cfg, state, hessians, code_bytes: int, log) -> tuple[bytes, list[dict], bytes | None]:
    """The model bytes of the artifact, the budget fitter's steps (none for int8 or FIT_BUDGET=0), and
    the unfitted model bytes when the fitter changed anything (None otherwise), to score its cost."""
    if cfg.quant_method == "int8":
        return pack_int8({k: v.cpu() for k, v in state.items()}), [], None
    if cfg.quant_method not in ("gptq", "rtn"):
        raise KnobError(f"QUANT_METHOD={cfg.quant_method!r}: expected gptq, rtn or int8")
    qs, unfitted = quant_settings(cfg), None
    if cfg.fit_budget:
        try:
            blob, qs, steps, qm, first = export.fit_to_budget(state, hessians, qs, code_bytes, log=log)
            unfitted = first if len(steps) > 1 else None
        except ArtifactTooLarge as e:  # log it and score the unfitted model anyway; the run still fails
            e.blob = export.pack(export.quantize_state(state, hessians, qs), qs.compressor)
            raise
    else:
        qm, steps = export.quantize_state(state, hessians, qs), []
        blob = export.pack(qm, qs.compressor)
    for line in export.describe(qm):
        log(line)
    return blob, steps, unfitted


def ttt_settings(cfg, n_docs: int, device: torch.device) -> TTTSettings:
    return TTTSettings(
        chunk=cfg.ttt_chunk_size, seq_len=cfg.ttt_eval_seq_len, batch_docs=cfg.ttt_batch_docs,
        lora_rank=cfg.ttt_lora_rank, lora_alpha=cfg.ttt_lora_alpha,
        targets=tuple(t for t in cfg.ttt_lora_targets.split(",") if t), lr=cfg.ttt_lora_lr,
        beta1=cfg.ttt_beta1, beta2=cfg.ttt_beta2, weight_decay=cfg.ttt_weight_decay,
        phase_ends=phase_ends(cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases, n_docs),
        global_lr=cfg.global_ttt_lr, global_momentum=cfg.global_ttt_momentum, global_epochs=cfg.global_ttt_epochs,
        global_batch_seqs=cfg.global_ttt_batch_seqs, global_grad_clip=cfg.global_ttt_grad_clip,
        global_micro_tokens=cfg.global_ttt_micro_batch_tokens,
        micro_tokens=cfg.ttt_micro_batch_tokens, seed=cfg.seed, layout=cfg.ttt_layout, pack_bucket=cfg.ttt_pack_bucket,
        last_layer_queries=cfg.ttt_last_layer_queries,
        graphs=cfg.ttt_cuda_graphs if device.type == "cuda" else 0,  # on CPU a replay is no faster
        compile=device.type == "cuda" if cfg.ttt_compile is None else cfg.ttt_compile)


def final_stages(cfg, model, val_tokens, byte_counts, validate, autocast, device, log) -> dict:
    """The scored stages after export, on the round-tripped weights: sliding windows, then TTT.
    Each logs its score (with an _exact twin) and its wall time."""
    stages = {}
    seq_len = cfg.eval_seq_len or cfg.train_seq_len
    if 0 < cfg.eval_stride < seq_len:
        t0 = time.perf_counter()
        loss, bpb = validate(seq_len, cfg.eval_stride)
        secs = time.perf_counter() - t0
        log(f"final_sliding_window seq_len:{seq_len} stride:{cfg.eval_stride} val_loss:{loss:.4f} val_bpb:{bpb:.4f} "
            f"eval_time:{secs:.1f}s")
        log(f"final_sliding_window_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
        stages["sliding_window"] = {"val_loss": loss, "val_bpb": bpb, "eval_time_s": secs}
    if cfg.ttt_enabled:
        s = ttt_settings(cfg, len(split_documents(val_tokens)), device)
        log(f"ttt: chunk:{s.chunk} seq_len:{s.seq_len} batch_docs:{s.batch_docs} lora_rank:{s.lora_rank} "
            f"targets:{','.join(s.targets)} phase_ends:{list(s.phase_ends)} micro_batch_tokens:{s.micro_tokens} "
            f"compile:{int(s.compile)} layout:{'packed' if packs(s, model, device) else 'rows'}")
        if device.type == "cuda":  # TTT's own peak: training's cached blocks are released first
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        r = evaluate_ttt(model, val_tokens, byte_counts, s, device, autocast, log=log)
        peak = torch.cuda.max_memory_allocated(device) // 2**20 if device.type == "cuda" else None
        scoring = r["seconds"] - r["compile_seconds"]  # the public entries time TTT after their compile warmup
        log(f"final_ttt val_loss:{r['val_loss']:.4f} val_bpb:{r['val_bpb']:.4f} eval_time:{r['seconds']:.1f}s "
            f"tokens_per_s:{r['tokens'] / max(r['seconds'], 1e-9):.0f} compile_warmup:{r['compile_seconds']:.1f}s "
            f"after_warmup_tokens_per_s:{r['tokens'] / max(scoring, 1e-9):.0f}" + (f" peak_memory:{peak}MiB" if peak else ""))
        log(f"final_ttt_exact val_loss:{r['val_loss']:.8f} val_bpb:{r['val_bpb']:.8f}")
        stages["ttt"] = {"val_loss": r["val_loss"], "val_bpb": r["val_bpb"], "eval_time_s": r["seconds"],
                         "compile_warmup_s": r["compile_seconds"],
                         "tokens": r["tokens"], "phase_ends": r["phase_ends"], "peak_memory_mib": peak,
                         "phases": r["phases"], "cuda_graphs": r["cuda_graphs"], "layout": r["layout"]}
    return stages


def phase_summary(loop_began: tuple[float, int] | None, total_ms: float, steps: int, batch_tokens: int) -> dict:
    """ms/step and tokens/s before and after looping turned on at (train ms, step); one phase when it never did."""
    if loop_began is None:
        spans = {"all": (total_ms, steps)}
    else:
        ms, at = loop_began
        spans = {"unlooped": (ms, at), "looped": (total_ms - ms, steps - at)}
    return {name: {"steps": n, "step_avg_ms": ms / max(n, 1), "tokens_per_s": batch_tokens * n / max(ms / 1000, 1e-9)}
            for name, (ms, n) in spans.items()}


if __name__ == "__main__":
    dist.run_main(main)
