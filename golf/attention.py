"""Document-isolated causal attention: a token attends only to earlier tokens of its own document.

Documents start at BOS tokens; each row of the batch is its own sequence, so the first token of a
row also starts a segment (a document continued from the previous row sees none of its beginning).
Build the boundaries once per forward and pass them to every layer:

    info = doc_boundaries(input_ids)           # [B, T] token ids -> DocInfo
    y = attend(q, k, v, info)                  # q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D]

A packed batch may also name query rows (`Queries`): the rows a model's last layer computes when
only they are scored (TTT scores a window's last chunk). Each segment's query rows are its last
tokens, so a varlen kernel given the queries' own cu_seqlens aligns them causally with the segment's
end; `attend` then takes q [1, Q, H, D] for k/v [1, T, Hkv, D].

Backends, chosen from what is importable and the device (`backend_name` says which, for the log):
  "fa3"   FlashAttention 3 varlen on CUDA: the batch flattened to [B*T], segments given by cu_seqlens.
  "flex"  FlexAttention on CUDA: a block mask from per-token segment ids (causal & same segment).
  "fa2"   FlashAttention 2 varlen as torch ships it (aten::_flash_attention_forward/backward) on CUDA:
          like "fa3"; the backend of packed batches (`packed_doc_info`) when FA3 is missing.
  "sdpa"  scaled_dot_product_attention with a dense [B, 1, T, T] boolean mask. The CPU default:
          FlexAttention has no backward on CPU and its eager CPU path (the full score matrix) ran
          about 6x slower than the dense mask at B=32, T=256 on torch 2.13. Also the test reference.
With isolate=False every backend is plain causal attention over each row (the naive baseline).
Everything has static shapes under torch.compile(fullgraph=True); only eager FA3 has a host sync.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

BOS_ID = 1
_NAMES = {"fa3": "flash_attention_3_varlen", "flex": "flex_attention", "fa2": "flash_attention_2_varlen",
          "sdpa": "sdpa_dense_mask"}

try:
    from flash_attn_interface import flash_attn_varlen_func as _fa3_varlen  # FlashAttention 3 (Hopper)
except ImportError:
    _fa3_varlen = None

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # older torch
    create_block_mask = flex_attention = None

# On CUDA both FlexAttention functions run compiled: uncompiled FlexAttention materialises the full
# score matrix. The wrappers are made here, not on first use, because a compiled model must be able
# to trace through them (creating a torch.compile wrapper inside a traced graph is a graph break);
# inside a compiled model they cost nothing extra. CPU stays eager (see the module docstring).
if flex_attention is not None and torch.cuda.is_available():
    _FLEX_CUDA = (torch.compile(create_block_mask, dynamic=False), torch.compile(flex_attention, dynamic=False))
else:
    _FLEX_CUDA = None


# FlexAttention kernel options (`kernel_options`), measured on one H100 at the trainer's shape (48 rows
# of 2048 tokens, 8/4 heads of dim 64, bf16, real document boundaries; bench/flex_tune.py and
# docs/BENCHMARKS.md). torch 2.11's own choice (forward 128x128 blocks, 8 warps) took 0.65 + 1.84 ms
# per call forward + backward; these take 0.50 + 1.68 ms, and the full-batch step 781 / 1,191 ms
# instead of 803 / 1,221 (same machine). They apply on GPUs of that compute capability only; others
# keep torch's choice, as do other head dims and the research variants (golf/v2_attention.py: not
# measured). `set_flex_options` replaces them (FLEX_KERNEL_OPTIONS).
TUNED_FLEX = {((9, 0), 64): {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4,
                             "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32,
                             "bwd_num_stages": 3, "bwd_num_warps": 4}}
_flex_options: dict | None = None  # None: TUNED_FLEX for the device's capability and head dim
FLEX_OPTION_NAMES = {f"{p}{k}" for p in ("fwd_", "bwd_") for k in ("BLOCK_M", "BLOCK_N", "num_stages", "num_warps")} | {
    f"bwd_{k}" for k in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")} | {"USE_TMA", "WRITE_DQ"}


def parse_flex_options(text: str) -> dict | None:
    """'fwd_BLOCK_M=128,bwd_num_warps=4' -> {name: int or bool}; 'tuned' -> None (TUNED_FLEX); 'torch' or
    empty -> {} (torch's own choice). Raises ValueError naming what is wrong."""
    text = text.strip()
    if text == "tuned":
        return None
    if text in ("torch", ""):
        return {}
    out = {}
    for item in text.split(","):
        name, eq, value = item.strip().partition("=")
        if not eq or name not in FLEX_OPTION_NAMES:
            close = difflib.get_close_matches(name, sorted(FLEX_OPTION_NAMES), n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"FLEX_KERNEL_OPTIONS: {item.strip()!r} is not name=value with a name from "
                             f"{', '.join(sorted(FLEX_OPTION_NAMES))} (or the whole value 'tuned' or 'torch'){hint}")
        if value in ("true", "false", "True", "False"):
            out[name] = value.lower() == "true"
        elif value.isdigit():
            out[name] = int(value)
        else:
            raise ValueError(f"FLEX_KERNEL_OPTIONS: {name}={value!r}: expected an integer or true/false")
    return out


def set_flex_options(options: dict | None) -> None:
    """Kernel options every later FlexAttention call passes (None: TUNED_FLEX for the GPU and head dim)."""
    global _flex_options
    _flex_options = options


def flex_options(device: torch.device, head_dim: int = 64) -> dict | None:
    """What flex_attention gets as kernel_options on `device` (None: torch's own choice)."""
    if device.type != "cuda":
        return None
    options = (TUNED_FLEX.get((torch.cuda.get_device_capability(device), head_dim), {}) if _flex_options is None
               else _flex_options)
    return dict(options) or None


def _flash2_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                   cu_q: torch.Tensor | None = None, max_q: int | None = None) -> torch.Tensor:
    """Causal FlashAttention 2 over the segments of a flattened batch: q [N, H, D], k/v [N, Hkv, D]
    (grouped-query heads handled by the kernel), cu_seqlens [S + 1] int32 (empty segments allowed),
    max_len >= the longest segment; softmax scale 1/sqrt(D). `cu_q`, `max_q`: q holds only each
    segment's last rows (the kernel aligns a shorter query segment with its key segment's end). The
    aten op carries its own backward (a plain op to the compiler, so compiled graphs holding it stay
    cacheable)."""
    cu_q, max_q = (cu, max_len) if cu_q is None else (cu_q, max_q)
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu, max_q, max_len, 0.0, True, False)[0]


def _flex_fns(device: torch.device):
    """(create_block_mask, flex_attention) for `device`."""
    return _FLEX_CUDA if device.type == "cuda" else (create_block_mask, flex_attention)


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on `device` (forward and backward) in this process."""
    device = torch.device(device)
    out = []
    if device.type == "cuda":
        if _fa3_varlen is not None:
            out.append("fa3")
        if flex_attention is not None:
            out.append("flex")
        out.append("fa2")
    return out + ["sdpa"]


def default_backend(device: torch.device | str, isolate: bool = True) -> str:
    """The fastest available backend. Without isolation FlexAttention buys nothing over SDPA's own
    causal kernels, so plain causal runs on FA3 or SDPA (as the naive baseline always did)."""
    best = available_backends(device)[0]
    return "sdpa" if best == "flex" and not isolate else best


def backend_name(device: torch.device | str, isolate: bool = True) -> str:
    """What the trainer logs, e.g. 'flex_attention (doc-isolated)', 'sdpa_causal (plain causal)'."""
    backend = default_backend(device, isolate)
    name = "sdpa_causal" if backend == "sdpa" and not isolate else _NAMES[backend]
    return f"{name} ({'doc-isolated' if isolate else 'plain causal'})"


# ----------------------------------------------------------------------------- boundaries
def segment_starts(input_ids: torch.Tensor, bos_id: int = BOS_ID, isolate: bool = True) -> torch.Tensor:
    """[B, T] bool: True where a segment starts, i.e. at every BOS and at the first token of each
    row (rows are separate sequences). Without isolation only row starts count."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    starts = input_ids == bos_id if isolate else torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    return starts


def cu_seqlens_from_starts(starts: torch.Tensor, pad: bool = False) -> torch.Tensor:
    """int32 cumulative segment boundaries over the flattened [B*T] batch: [0, s1, ..., B*T].

    pad=True gives a fixed length B*T + 1 (the most segments B*T tokens can have), the tail filled
    with B*T, i.e. empty trailing segments: static shapes for torch.compile, no host sync."""
    flat = starts.reshape(-1)
    n = flat.numel()
    if pad:
        idx = torch.nonzero_static(flat, size=n, fill_value=n).reshape(-1)
    else:
        idx = flat.nonzero().reshape(-1)
    return torch.cat([idx, idx.new_full((1,), n)]).to(torch.int32)


def segment_ids_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """[B, T] int32: each token's segment index, numbered over the flattened batch, so token
    (b, t) lies in [cu_seqlens[i], cu_seqlens[i + 1]) with i = ids[b, t]."""
    return (starts.reshape(-1).cumsum(0) - 1).view_as(starts).to(torch.int32)


@dataclass
class Queries:
    """The query rows of a packed batch [1, T] (see the module docstring): for every segment, its last
    tokens (possibly none), in segment order."""

    index: torch.Tensor                 # [Q] int64: the rows' positions in the batch
    cu_seqlens: torch.Tensor            # int32, as long as the batch's: segment s's rows are cu[s]..cu[s + 1]
    max_seqlen: int                     # upper bound on one segment's query rows
    mask: torch.Tensor | None = None    # sdpa: bool [1, 1, Q, T]


@dataclass
class DocInfo:
    """Segment layout of one batch, built once per forward and shared by every layer."""

    backend: str                      # "fa3" | "flex" | "fa2" | "sdpa"
    isolate: bool                     # False: plain causal attention over each row
    segment_ids: torch.Tensor         # [B, T] int32, see segment_ids_from_starts
    cu_seqlens: torch.Tensor | None   # int32 (fa3, fa2; padded with empty segments under compile)
    max_seqlen: int                   # upper bound on a segment's length: T (static, valid for FA3)
    mask: object = None               # flex: BlockMask; sdpa: bool [B, 1, T, T] or None (is_causal)
    positions: torch.Tensor | None = None   # [B, T] rotary position of each token; None: its index in the row
    seq_starts: torch.Tensor | None = None  # [B, T] bool: tokens that begin a sequence (the smear stops there)
    queries: Queries | None = None          # packed batches: rows whose outputs alone are needed (last layer)

    def every_row(self) -> "DocInfo":
        """The same layout with every row a query (what all layers but the last use)."""
        return replace(self, queries=None)


def at_queries(x: torch.Tensor, info) -> torch.Tensor:
    """x [B, T, ...] at the query rows of `info` ([1, Q, ...]); x itself when every row is one (also
    for the research trainer's own layouts, which have no queries)."""
    queries = getattr(info, "queries", None)
    return x if queries is None else x.flatten(0, 1).index_select(0, queries.index)[None]


def doc_boundaries(input_ids: torch.Tensor, bos_id: int = BOS_ID, isolate: bool = True,
                   backend: str | None = None) -> DocInfo:
    """Segments of a [B, T] batch of token ids and the mask object `backend` needs (default:
    default_backend(input_ids.device, isolate)). Call once per forward, outside the layer loop."""
    backend = backend or default_backend(input_ids.device, isolate)
    # an explicit "flex" is allowed on CPU too: forward only, the tests compare it with SDPA there
    usable = available_backends(input_ids.device) + (["flex"] if flex_attention is not None else [])
    if backend not in usable:
        raise ValueError(f"attention backend {backend!r} is not available on {input_ids.device}; "
                         f"expected one of {sorted(set(usable))}")
    starts = segment_starts(input_ids, bos_id, isolate)
    seg = segment_ids_from_starts(starts)
    B, T = input_ids.shape
    cu, mask = None, None
    if backend in ("fa3", "fa2") and not isolate:  # row starts only: known without looking at the tokens
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=input_ids.device)
    elif backend in ("fa3", "fa2"):
        cu = cu_seqlens_from_starts(starts, pad=torch.compiler.is_compiling())
    elif backend == "flex":
        make_mask = _flex_fns(input_ids.device)[0]
        if isolate:
            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (seg[b, q_idx] == seg[b, kv_idx])
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
        mask = make_mask(mask_mod, B, None, T, T, device=input_ids.device)
    elif isolate:  # sdpa: dense mask; without isolation is_causal needs none
        pos = torch.arange(T, device=input_ids.device)
        mask = ((pos[:, None] >= pos[None, :]) & (seg[:, :, None] == seg[:, None, :])).unsqueeze(1)
    return DocInfo(backend, isolate, seg, cu, T, mask)


def packed_backend(device: torch.device | str) -> str:
    """The backend for packed batches: a varlen FlashAttention on CUDA, the dense mask elsewhere."""
    if torch.device(device).type != "cuda":
        return "sdpa"
    return "fa3" if _fa3_varlen is not None else "fa2"


def packed_doc_info(segment_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, positions: torch.Tensor,
                    seq_starts: torch.Tensor, query_index: torch.Tensor | None = None,
                    query_cu_seqlens: torch.Tensor | None = None, backend: str | None = None) -> DocInfo:
    """DocInfo of a packed batch [1, T] whose sequences the caller laid out (TTT windows of several
    documents, each from its own position 0): segment ids [1, T] int32, cu_seqlens int32 (its
    boundaries; may end with empty segments), max_seqlen >= the longest, positions [1, T] and
    seq_starts [1, T] bool; optionally the query rows (`Queries`: their positions [Q] and cu_seqlens,
    each segment's rows its last tokens). Builds nothing that waits for the device."""
    backend = backend or packed_backend(segment_ids.device)
    mask = qmask = queries = None
    if backend not in ("fa3", "fa2", "sdpa"):
        raise ValueError(f"packed batches need a varlen backend (fa3, fa2) or sdpa, not {backend!r}")
    if backend == "sdpa":  # the varlen kernels take cu_seqlens alone
        pos, seg = torch.arange(segment_ids.shape[1], device=segment_ids.device), segment_ids[0]
        mask = ((pos[:, None] >= pos[None, :]) & (seg[:, None] == seg[None, :]))[None, None]
        if query_index is not None:
            qmask = ((pos[None, :] <= query_index[:, None]) & (seg[query_index][:, None] == seg[None, :]))[None, None]
    if query_index is not None:
        queries = Queries(query_index, query_cu_seqlens, min(max_seqlen, query_index.shape[0]), qmask)
    return DocInfo(backend, True, segment_ids, cu_seqlens, max_seqlen, mask, positions, seq_starts, queries)


# ----------------------------------------------------------------------------- attention
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, info: DocInfo) -> torch.Tensor:
    """q [B, T, H, D], k/v [B, T, Hkv, D] (H a multiple of Hkv) -> [B, T, H, D], softmax scale
    1/sqrt(D), each token attending to itself and earlier tokens of its segment only. With
    `info.queries`, q holds the query rows only: [1, Q, H, D] -> [1, Q, H, D]."""
    B, T, H, D = k.shape[0], k.shape[1], q.shape[2], q.shape[3]
    queries = info.queries
    Tq = T if queries is None else queries.index.shape[0]
    if k.shape != v.shape or q.shape[:2] != (B, Tq) or k.shape[3] != D or H % k.shape[2]:
        raise ValueError(f"expected q [B, {'T' if queries is None else 'Q'}, H, D] and k, v [B, T, Hkv, D] with H a "
                         f"multiple of Hkv; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if tuple(info.segment_ids.shape) != (B, T):
        raise ValueError(f"DocInfo was built for a batch of {tuple(info.segment_ids.shape)}, k is for {(B, T)}")
    gqa = k.shape[2] != H
    if info.backend in ("fa3", "fa2"):
        Hkv = k.shape[2]
        flat = q.reshape(B * Tq, H, D), k.reshape(B * T, Hkv, D), v.reshape(B * T, Hkv, D)
        cu_q, max_q = (info.cu_seqlens, info.max_seqlen) if queries is None else (queries.cu_seqlens, queries.max_seqlen)
        if info.backend == "fa2":
            return _flash2_varlen(*flat, info.cu_seqlens, info.max_seqlen, cu_q, max_q).view(B, Tq, H, D)
        out = _fa3_varlen(*flat, cu_q, info.cu_seqlens, max_q, info.max_seqlen, causal=True)
        out = out[0] if isinstance(out, tuple) else out  # some FA3 versions also return the LSE
        return out.view(B, Tq, H, D)
    if queries is not None and info.backend != "sdpa":
        raise ValueError(f"query rows need a varlen backend (fa3, fa2) or sdpa, not {info.backend!r}")
    # FlexAttention and SDPA take [B, H, T, D]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask = info.mask if queries is None else queries.mask
    if info.backend == "flex":
        out = _flex_fns(q.device)[1](qt, kt, vt, block_mask=mask, enable_gqa=gqa,
                                      kernel_options=flex_options(q.device, D))
    elif mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)
