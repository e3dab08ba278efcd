"""Document-isolated attention: segment boundaries, backends agreeing, and isolation itself.

CPU runs SDPA (forward and backward) and FlexAttention's eager path (forward only: FlexAttention has
no CPU backward, and compiling it on CPU takes about 40 s, too slow here). bench/attention_check.py
checks the CUDA backends in bf16 under torch.compile.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from golf.attention import (BOS_ID, attend, available_backends, backend_name, cu_seqlens_from_starts,
                            default_backend, doc_boundaries, flex_options, parse_flex_options,
                            segment_ids_from_starts, segment_starts, set_flex_options)

# CPU backends under test; flex forward only
BACKENDS = ["sdpa", "flex"]
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # expected on CPU


def _ids(rows):
    return torch.tensor(rows, dtype=torch.int64)


# Row 0 starts mid-document (no BOS at 0) and holds three segments; the document starting at
# row 0's position 4 continues into row 1, which must start a new segment there anyway.
IDS = _ids([[5, 1, 7, 8, 1, 9],
            [4, 4, 1, 2, 3, 3],
            [1, 6, 6, 6, 6, 6]])
EXPECTED_CU = [0, 1, 4, 6, 8, 12, 18]


def test_cu_seqlens_from_bos_positions():
    starts = segment_starts(IDS, BOS_ID)
    cu = cu_seqlens_from_starts(starts)
    assert cu.dtype == torch.int32 and cu.tolist() == EXPECTED_CU
    # padded form (static shape for torch.compile): same boundaries, then empty segments
    padded = cu_seqlens_from_starts(starts, pad=True)
    assert padded.dtype == torch.int32 and padded.numel() == IDS.numel() + 1
    assert padded[:len(EXPECTED_CU)].tolist() == EXPECTED_CU and (padded[len(EXPECTED_CU):] == 18).all()
    # without isolation only row starts count
    assert cu_seqlens_from_starts(segment_starts(IDS, BOS_ID, isolate=False)).tolist() == [0, 6, 12, 18]
    # a batch that is one document per row, and one of a single token per position
    assert cu_seqlens_from_starts(segment_starts(torch.full((2, 3), 1))).tolist() == list(range(7))
    assert cu_seqlens_from_starts(segment_starts(torch.full((2, 3), 9))).tolist() == [0, 3, 6]


def test_segment_ids_index_cu_seqlens():
    starts = segment_starts(IDS)
    seg, cu = segment_ids_from_starts(starts), cu_seqlens_from_starts(starts)
    assert seg.tolist() == [[0, 1, 1, 1, 2, 2], [3, 3, 4, 4, 4, 4], [5, 5, 5, 5, 5, 5]]
    flat = torch.arange(IDS.numel()).view_as(IDS)
    assert ((cu[seg.long()] <= flat) & (flat < cu[seg.long() + 1])).all()


def test_doc_boundaries_fields():
    info = doc_boundaries(IDS, backend="sdpa")
    assert info.max_seqlen == 6 and info.mask.shape == (3, 1, 6, 6) and info.mask.dtype == torch.bool
    assert doc_boundaries(IDS, isolate=False, backend="sdpa").mask is None  # is_causal, no mask
    assert type(doc_boundaries(IDS, backend="flex").mask).__name__ == "BlockMask"


def _random_batch(B=3, T=64, H=4, Hkv=2, D=16, p_bos=0.06, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 1000, (B, T), generator=g)
    ids[torch.rand(B, T, generator=g) < p_bos] = BOS_ID
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    return ids, q, k, v


def _reference(ids, q, k, v, isolate=True):
    """Each segment attended alone with plain causal SDPA, kv heads repeated by hand."""
    rep = q.shape[2] // k.shape[2]
    out = torch.empty_like(q)
    starts = segment_starts(ids, isolate=isolate)
    for b in range(ids.shape[0]):
        bounds = starts[b].nonzero().flatten().tolist() + [ids.shape[1]]
        for s, e in zip(bounds[:-1], bounds[1:]):
            qs = q[b, s:e].transpose(0, 1)
            ks = k[b, s:e].repeat_interleave(rep, dim=1).transpose(0, 1)
            vs = v[b, s:e].repeat_interleave(rep, dim=1).transpose(0, 1)
            out[b, s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])  # MHA, GQA, MQA
def test_matches_per_document_reference(backend, heads):
    H, Hkv = heads
    ids, q, k, v = _random_batch(H=H, Hkv=Hkv)
    assert segment_starts(ids).sum() > 2 * ids.shape[0]  # several documents per row
    out = attend(q, k, v, doc_boundaries(ids, backend=backend))
    assert out.shape == q.shape
    torch.testing.assert_close(out, _reference(ids, q, k, v), atol=1e-5, rtol=1e-5)


def test_flex_agrees_with_sdpa():
    ids, q, k, v = _random_batch(B=4, T=256, H=8, Hkv=4, D=32, p_bos=0.01, seed=1)
    ref = attend(q, k, v, doc_boundaries(ids, backend="sdpa"))
    out = attend(q, k, v, doc_boundaries(ids, backend="flex"))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_causal_equals_sdpa_is_causal(backend):
    ids, q, k, v = _random_batch(p_bos=0.2)  # BOS tokens present, and ignored
    out = attend(q, k, v, doc_boundaries(ids, isolate=False, backend=backend))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_document_unchanged_by_other_documents(backend):
    # row 0: [doc A (tokens 0..9, continued from before) | doc X (10..19) | doc Y (20..31)]
    # row 1: [doc Z ...]. Doc X must not notice anything done to A, Y or Z.
    B, T, H, Hkv, D = 2, 32, 4, 2, 8
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 1000, (B, T), generator=g)
    ids[0, 10] = ids[0, 20] = BOS_ID
    ids[1, 0] = BOS_ID
    q, k, v = (torch.randn(B, T, h, D, generator=g) for h in (H, Hkv, Hkv))
    X = (0, slice(10, 20))
    base = attend(q, k, v, doc_boundaries(ids, backend=backend))[X]

    ids2, q2, k2, v2 = ids.clone(), q.clone(), k.clone(), v.clone()
    ids2[0, 3] = ids2[0, 25] = ids2[1, 7] = BOS_ID      # split the other documents
    ids2[0, 21:] = 77                                  # and change their tokens
    for t in (q2, k2, v2):
        t[0, :10] = torch.randn(t[0, :10].shape, generator=g) * 10  # same row, before X
        t[0, 20:] = torch.randn(t[0, 20:].shape, generator=g) * 10  # same row, after X
        t[1] = torch.randn(t[1].shape, generator=g) * 10            # another row
    out = attend(q2, k2, v2, doc_boundaries(ids2, backend=backend))[X]
    assert torch.equal(out, base)


def test_no_gradient_crosses_documents():
    ids, q, k, v = _random_batch(B=2, T=48, p_bos=0.0, seed=4)
    ids[0, 16] = ids[0, 32] = BOS_ID
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attend(q, k, v, doc_boundaries(ids, backend="sdpa"))
    out[0, 16:32].sum().backward()  # loss on the middle document of row 0 only
    for t in (q, k, v):
        assert t.grad[0, 16:32].abs().sum() > 0
        assert t.grad[0, :16].abs().sum() == 0 and t.grad[0, 32:].abs().sum() == 0
        assert t.grad[1].abs().sum() == 0


def _fake_fa3_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """Stand-in for flash_attn_varlen_func ([total, H, D] layout): causal SDPA per segment, a query
    segment shorter than its key segment aligned with the key segment's end (as FlashAttention 2.1+
    and 3 align them)."""
    assert causal and q.dim() == 3 and cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.shape == cu_k.shape
    rep = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for qs, qe, ks, ke in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        assert qe - qs <= max_q and ke - ks <= max_k and qe - qs <= ke - ks
        if qe > qs:  # padded cu_seqlens end with empty segments
            kk, vv = (t[ks:ke].repeat_interleave(rep, dim=1).transpose(0, 1) for t in (k, v))
            allowed = torch.arange(ke - ks)[None, :] <= torch.arange(ke - ks - (qe - qs), ke - ks)[:, None]
            out[qs:qe] = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1), kk, vv, attn_mask=allowed).transpose(0, 1)
    return out, None  # (out, lse), as some FA3 versions return


@pytest.mark.parametrize("isolate, pad", [(True, False), (True, True), (False, False)])
def test_fa3_path_with_a_stand_in(monkeypatch, isolate, pad):
    """The thin FA3 path (flattening, cu_seqlens, reshaping) against the reference; pad is what
    it builds under torch.compile."""
    import golf.attention as ga
    monkeypatch.setattr(ga, "_fa3_varlen", _fake_fa3_varlen)
    monkeypatch.setattr(ga, "available_backends", lambda device: ["fa3", "sdpa"])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: pad)
    ids, q, k, v = _random_batch()
    info = doc_boundaries(ids, isolate=isolate)
    assert info.backend == "fa3" and info.max_seqlen == ids.shape[1]
    assert info.cu_seqlens.numel() == (ids.numel() + 1 if pad else segment_starts(ids, isolate=isolate).sum() + 1)
    torch.testing.assert_close(attend(q, k, v, info), _reference(ids, q, k, v, isolate), atol=1e-5, rtol=1e-5)


def test_packed_batches_on_the_fa2_path_with_a_stand_in(monkeypatch):
    """TTT's packed rows on CUDA: packed_doc_info's cu_seqlens (ending with empty segments) through the
    FA2 varlen path, with a stand-in kernel, against the dense-mask backend on the same layout."""
    import golf.attention as ga
    monkeypatch.setattr(ga, "_flash2_varlen", _fake_fa2_varlen)
    bounds = [0, 12, 30, 40]
    seg = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.tensor(np.diff(bounds)))[None]
    pos = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])[None]
    cu = torch.tensor(bounds + [40, 40], dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 40, h, 8, generator=g) for h in (4, 2, 2))
    dense = ga.packed_doc_info(seg, cu, 20, pos, pos == 0, backend="sdpa")
    fa2 = ga.packed_doc_info(seg, cu, 20, pos, pos == 0, backend="fa2")
    assert ga.packed_backend("cpu") == "sdpa"
    torch.testing.assert_close(attend(q, k, v, fa2), attend(q, k, v, dense), atol=1e-5, rtol=1e-5)
    ids = torch.where(pos == 0, BOS_ID, 5)  # the same segments, marked by BOS tokens
    torch.testing.assert_close(attend(q, k, v, dense), _reference(ids, q, k, v), atol=1e-5, rtol=1e-5)


def _fake_fa2_varlen(q, k, v, cu, max_len, cu_q=None, max_q=None):
    """Stand-in for golf.attention._flash2_varlen."""
    return _fake_fa3_varlen(q, k, v, cu if cu_q is None else cu_q, cu, max_len if max_q is None else max_q, max_len, True)[0]


@pytest.mark.parametrize("backend", ["sdpa", "fa2", "fa3"])
def test_query_rows_attend_like_every_row(monkeypatch, backend):
    """A packed batch's query rows (each segment's last tokens, some segments none) get the outputs
    and gradients that the same rows get when every row is a query: the dense mask, and the varlen
    paths through stand-ins that align a shorter query segment with its key segment's end."""
    import golf.attention as ga
    monkeypatch.setattr(ga, "_flash2_varlen", _fake_fa2_varlen)
    monkeypatch.setattr(ga, "_fa3_varlen", _fake_fa3_varlen)
    bounds, last = [0, 12, 30, 40], [3, 0, 10]  # the query rows of each segment: its last 3, none, all 10
    seg = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.tensor(np.diff(bounds)))[None]
    pos = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])[None]
    cu = torch.tensor(bounds + [40], dtype=torch.int32)
    index = torch.cat([torch.arange(e - n, e) for e, n in zip(bounds[1:], last)])
    q_cu = torch.tensor(np.concatenate(([0], np.cumsum(last), [13])), dtype=torch.int32)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 40, h, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    every = ga.packed_doc_info(seg, cu, 20, pos, pos == 0, backend="sdpa")
    some = ga.packed_doc_info(seg, cu, 20, pos, pos == 0, index, q_cu, backend=backend)
    assert some.queries.index is index and some.every_row().queries is None and some.every_row().cu_seqlens is cu
    w = torch.randn(1, 13, 4, 8, generator=g)
    ref = attend(q, k, v, every)[:, index]
    got = attend(ga.at_queries(q, some), k, v, some)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"q \[B, Q, H, D\]"):
        attend(q, k, v, some)


def test_backend_choice_on_cpu():
    assert available_backends("cpu") == ["sdpa"]
    assert default_backend("cpu") == "sdpa" and default_backend("cpu", isolate=False) == "sdpa"
    assert backend_name("cpu") == "sdpa_dense_mask (doc-isolated)"
    assert backend_name("cpu", isolate=False) == "sdpa_causal (plain causal)"
    assert doc_boundaries(IDS).backend == "sdpa"


def test_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="not available on cpu"):
        doc_boundaries(IDS, backend="fa3")
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        doc_boundaries(IDS.flatten())
    ids, q, k, v = _random_batch(H=4, Hkv=3)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attend(q, k, v, doc_boundaries(ids))
    ids, q, k, v = _random_batch()
    with pytest.raises(ValueError, match="built for a batch"):
        attend(q, k, v, doc_boundaries(ids[:, :32]))


def test_flex_kernel_options_parse_and_apply(monkeypatch):
    """FLEX_KERNEL_OPTIONS: 'tuned' (the measured table, by compute capability), 'torch' or name=value
    pairs; a misspelt name or a bad value is an error naming the knob; CPU never gets options."""
    assert parse_flex_options("tuned") is None and parse_flex_options("torch") == {}
    assert parse_flex_options("fwd_BLOCK_M=64, bwd_num_warps=4,USE_TMA=true") == {
        "fwd_BLOCK_M": 64, "bwd_num_warps": 4, "USE_TMA": True}
    with pytest.raises(ValueError, match="FLEX_KERNEL_OPTIONS: 'fwd_BLOCKM=64' is not name=value.*did you mean fwd_BLOCK_M"):
        parse_flex_options("fwd_BLOCKM=64")
    with pytest.raises(ValueError, match="fwd_BLOCK_M='big': expected an integer"):
        parse_flex_options("fwd_BLOCK_M=big")
    assert flex_options(torch.device("cpu")) is None
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    try:
        assert flex_options(cuda)["fwd_BLOCK_N"] == 64  # the H100 table, head dim 64
        assert flex_options(cuda, head_dim=128) is None
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        assert flex_options(cuda) is None  # not measured there: torch's choice
        set_flex_options({"bwd_num_warps": 4})
        assert flex_options(cuda) == {"bwd_num_warps": 4}
        set_flex_options({})
        assert flex_options(cuda) is None
    finally:
        set_flex_options(None)


def test_traces_as_one_graph():
    """Boundaries plus attention trace without graph breaks (the trainer compiles fullgraph).
    Dynamo's eager backend checks the tracing without the slow CPU code generation."""
    ids, q, k, v = _random_batch()

    def step(ids, q, k, v):
        info = doc_boundaries(ids, backend="sdpa")
        # the padded cu_seqlens is what the FA3 path builds under compile
        cu = cu_seqlens_from_starts(segment_starts(ids), pad=True)
        return attend(q, k, v, info), cu

    out, cu = torch.compile(step, fullgraph=True, backend="eager")(ids, q, k, v)
    torch.testing.assert_close(out, _reference(ids, q, k, v), atol=1e-5, rtol=1e-5)
    exact = cu_seqlens_from_starts(segment_starts(ids))
    assert torch.equal(cu[:len(exact)], exact)
