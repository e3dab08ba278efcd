"""Attention variants of the research trainer: ALiBi, sliding windows and learned sink slots.

    spec = Variant(window=256, sinks=2, alibi=True)
    docs = variant_docs(segment_ids, isolate, spec)   # once per forward, outside a compiled model
    y = attend_variant(q, k, v, docs, spec, slopes, sink_k, sink_v)

For a query at row position i and a key at position j (both in one row):
  visible   j <= i, the same document when the batch is isolated (golf/attention.py's segments),
            and i - j < window when window > 0 (each token sees itself and window - 1 earlier ones)
  ALiBi     score += -slope_h * (i - j), slopes from alibi_slopes (Press et al. 2022), no rotary
  sinks     `sinks` learned key/value slots per KV head in front of the row: every query sees them,
            whatever its document or window, and they carry no ALiBi bias

Backends: FlexAttention on CUDA (a block mask from the rules, ALiBi as a score_mod), SDPA with a
dense mask on CPU (the reference the tests compare with). A DocInfo that was not made by
variant_docs (the TTT scorer builds its own) is converted on the fly to the dense form: TTT windows
change shape every chunk, and a compiled FlexAttention would recompile for each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from golf.attention import DocInfo, _flex_fns, flex_attention


@dataclass(frozen=True)
class Variant:
    window: int = 0  # 0: full causal attention
    sinks: int = 0
    alibi: bool = False

    @property
    def active(self) -> bool:
        return self.window > 0 or self.sinks > 0 or self.alibi


@dataclass
class VariantDocs:
    """The layout of one batch for attend_variant: the mask its backend needs."""
    backend: str  # "flex" | "sdpa"
    mask: object  # flex: BlockMask over [T, sinks + T]; sdpa: bool [B or 1, 1, T, sinks + T]


def alibi_slopes(heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes: 2^(-8 h / H) for h = 1..H when H is a power of two; otherwise those of
    the next lower power of two n, then every other slope of 2n (the paper's rule)."""
    n = 2 ** math.floor(math.log2(heads))
    base = [2 ** (-8 * h / n) for h in range(1, n + 1)]
    extra = [2 ** (-8 * h / (2 * n)) for h in range(1, 2 * n + 1, 2)][: heads - n]
    return torch.tensor(base + extra)


def dense_mask(seg: torch.Tensor, isolate: bool, spec: Variant) -> torch.Tensor:
    """bool [B or 1, 1, T, sinks + T]: True where a query may attend (the rules above)."""
    T = seg.shape[1]
    pos = torch.arange(T, device=seg.device)
    back = pos[:, None] - pos[None, :]  # i - j
    m = back >= 0
    if spec.window > 0:
        m = m & (back < spec.window)
    m = m[None, None]
    if isolate:
        m = m & (seg[:, None, :, None] == seg[:, None, None, :])
    if spec.sinks:
        m = torch.cat((m.new_ones(*m.shape[:3], spec.sinks), m), dim=-1)
    return m


def flex_block_mask(seg: torch.Tensor, isolate: bool, spec: Variant):
    B, T = seg.shape
    n = spec.sinks

    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx - n
        ok = (j >= 0) & (q_idx >= j)
        if spec.window > 0:
            ok = ok & (q_idx - j < spec.window)
        if isolate:
            ok = ok & (seg[b, q_idx] == seg[b, j.clamp(min=0)])
        return (kv_idx < n) | ok

    return _flex_fns(seg.device)[0](mask_mod, B, None, T, n + T, device=seg.device)


def variant_docs(seg: torch.Tensor, isolate: bool, spec: Variant, backend: str | None = None) -> VariantDocs:
    """Masks for a batch of segment ids [B, T] (golf.attention.segment_ids_from_starts): FlexAttention
    on CUDA, the dense mask elsewhere."""
    if backend is None:
        backend = "flex" if seg.is_cuda and flex_attention is not None else "sdpa"
    mask = flex_block_mask(seg, isolate, spec) if backend == "flex" else dense_mask(seg, isolate, spec)
    return VariantDocs(backend, mask)


def attend_variant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: VariantDocs | DocInfo,
                   spec: Variant, slopes: torch.Tensor | None = None, sink_k: torch.Tensor | None = None,
                   sink_v: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]; slopes [H] with ALiBi, sink_k/sink_v
    [sinks, Hkv, D] with sinks. Softmax scale 1/sqrt(D) as golf.attention.attend."""
    if not isinstance(docs, VariantDocs):
        docs = variant_docs(docs.segment_ids, docs.isolate, spec, backend="sdpa")
    B, T, H, D = q.shape
    if spec.sinks:
        k = torch.cat((sink_k.to(k.dtype).expand(B, -1, -1, -1), k), dim=1)
        v = torch.cat((sink_v.to(v.dtype).expand(B, -1, -1, -1), v), dim=1)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = k.shape[2] != H
    n = spec.sinks
    if docs.backend == "flex":
        score_mod = None
        if spec.alibi:
            def score_mod(score, b, h, q_idx, kv_idx):
                return torch.where(kv_idx < n, score, score - slopes[h] * (q_idx - (kv_idx - n)))
        out = _flex_fns(q.device)[1](qt, kt, vt, score_mod=score_mod, block_mask=docs.mask, enable_gqa=gqa)
        return out.transpose(1, 2)
    mask = docs.mask
    if spec.alibi:  # additive bias: -slope * (i - j) where visible, -inf elsewhere, 0 on the sinks
        pos = torch.arange(T, device=q.device)
        back = (pos[:, None] - pos[None, :]).to(torch.float32)
        bias = -slopes.float()[:, None, None] * back
        bias = F.pad(bias, (n, 0))[None]  # [1, H, T, n + T]
        mask = torch.where(mask, bias, float("-inf")).to(q.dtype)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)
