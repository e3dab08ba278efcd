"""Research trainer, attention knobs: ALiBi, sliding windows, sink slots, learned / no positions, the
per-channel output gate; FlexAttention (CPU forward) against the dense SDPA reference."""
import pytest
import torch

from data.shards import BOS_ID
from golf.attention import segment_ids_from_starts, segment_starts
from golf.v2_attention import Variant, alibi_slopes, attend_variant, variant_docs
from tests.test_record_stack import tokens
from tests.v2_models import build, n_params

pytestmark = pytest.mark.usefixtures("one_thread")


def segments(idx, isolate=True):
    return segment_ids_from_starts(segment_starts(idx, BOS_ID, isolate))


def one_hot_values(B, T, Hkv):
    """v[b, j, h] = e_j: each output row is then the attention weights themselves."""
    return torch.eye(T).expand(B, Hkv, T, T).transpose(1, 2).contiguous()


def weights(spec, T=12, H=4, Hkv=2, idx=None, q=None, k=None, **kw):
    """Attention weights [B, T, H, T] of zero (or given) q, k under `spec`, read off one-hot values."""
    B = 1 if idx is None else idx.shape[0]
    q = torch.zeros(B, T, H, T) if q is None else q
    k = torch.zeros(B, T, Hkv, T) if k is None else k
    seg = segments(idx) if idx is not None else torch.zeros(B, T, dtype=torch.int32)
    return attend_variant(q, k, one_hot_values(B, T, Hkv), variant_docs(seg, idx is not None, spec), spec, **kw)


def test_alibi_slopes_follow_the_paper():
    assert torch.equal(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    assert torch.equal(alibi_slopes(4), torch.tensor([2.0 ** -i for i in (2, 4, 6, 8)]))
    # not a power of two: the 4-head slopes, then every other slope of 8 heads
    assert torch.equal(alibi_slopes(6), torch.tensor([2.0 ** -i for i in (2, 4, 6, 8, 1, 3)]))


def test_alibi_weights_decay_with_distance_by_each_heads_slope():
    slopes = alibi_slopes(4)
    w = weights(Variant(alibi=True), slopes=slopes)[0]  # zero scores: only the bias remains
    for i in (0, 5, 11):
        for h in range(4):
            bias = -slopes[h] * (i - torch.arange(i + 1.0))
            torch.testing.assert_close(w[i, h, : i + 1], torch.softmax(bias, 0))
            assert torch.all(w[i, h, i + 1:] == 0)


def test_window_limits_attention_and_its_gradient():
    spec, T, W = Variant(window=4), 16, 4
    w = weights(spec, T=T)[0]
    for i in range(T):
        lo = max(0, i - W + 1)
        torch.testing.assert_close(w[i, :, lo: i + 1], torch.full((4, i + 1 - lo), 1 / (i + 1 - lo)))
        assert w[i, :, :lo].abs().sum() == 0
    # no gradient reaches keys or values beyond the window
    q, k, v = torch.randn(1, T, 4, 8), torch.randn(1, T, 2, 8, requires_grad=True), torch.randn(1, T, 2, 8, requires_grad=True)
    out = attend_variant(q, k, v, variant_docs(torch.zeros(1, T, dtype=torch.int32), False, spec), spec)
    out[0, 12].sum().backward()
    for g in (k.grad, v.grad):
        assert g[0, :9].abs().sum() == 0 and g[0, 9:13].abs().sum(-1).min() > 0 and g[0, 13:].abs().sum() == 0


def test_window_as_long_as_the_row_is_full_attention():
    idx = tokens(bos_at=((0, 17),))
    torch.testing.assert_close(build(ATTN_WINDOW=40).logits(idx), build().logits(idx), atol=1e-5, rtol=0)
    assert not torch.allclose(build(ATTN_WINDOW=3).logits(idx), build().logits(idx), atol=1e-3)


def test_sinks_are_seen_by_every_query_across_documents():
    idx = torch.full((1, 12), 5)
    idx[0, 0] = idx[0, 6] = BOS_ID
    T, n = 12, 2
    sink_k = torch.zeros(n, 2, T)
    sink_v = torch.zeros(n, 2, T)
    w = weights(Variant(sinks=n), idx=idx, sink_k=sink_k, sink_v=sink_v)[0]
    # zero scores everywhere: each query splits its mass evenly over the sinks and its own document's prefix
    for i in range(T):
        start = 0 if i < 6 else 6
        visible = i - start + 1
        torch.testing.assert_close(w[i, :, start: i + 1], torch.full((4, visible), 1 / (visible + n)))
        assert w[i, :, :start].abs().sum() == 0
    # a sink value comes out in proportion to the sink's weight
    sink_v[0, :, 0] = 1.0
    w2 = weights(Variant(sinks=n), idx=idx, sink_k=sink_k, sink_v=sink_v)[0]
    torch.testing.assert_close(w2[6, :, 0], torch.full((4,), 1 / 3))


def test_sink_parameters_and_init():
    plain, sunk = build(randomise=False), build(randomise=False, ATTN_SINKS=3)
    assert n_params(sunk) - n_params(plain) == 4 * 2 * 3 * 2 * 16  # layers x (k, v) x sinks x kv heads x head dim
    assert torch.equal(sunk.blocks[0].attn.sink_v, torch.zeros(3, 2, 16))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("spec", [Variant(window=5), Variant(sinks=2), Variant(alibi=True),
                                  Variant(window=6, sinks=3, alibi=True)], ids=str)
@pytest.mark.parametrize("isolate", [True, False])
def test_flex_matches_the_dense_reference(spec, isolate):
    pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, h, 16, generator=g) for h in (4, 2, 2))
    sinks = {"sink_k": torch.randn(spec.sinks, 2, 16, generator=g), "sink_v": torch.randn(spec.sinks, 2, 16, generator=g)}
    seg = segments(tokens(bos_at=((0, 13), (1, 25))), isolate)
    out = [attend_variant(q, k, v, variant_docs(seg, isolate, spec, backend), spec, alibi_slopes(4), **sinks)
           for backend in ("sdpa", "flex")]
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=0)


def test_alibi_model_has_no_rotary_and_depends_on_distance():
    m = build(POS_ENCODING="alibi")
    attn = m.blocks[0].attn
    assert isinstance(attn.rotary, torch.nn.Identity) and torch.equal(attn.alibi_slopes, alibi_slopes(4))
    assert "alibi_slopes" not in m.state_dict()  # recomputed, never stored
    assert not torch.allclose(m.logits(tokens()), build(POS_ENCODING="none").logits(tokens()))


def test_learned_positions_are_added_to_the_embedding():
    plain, learned = build(randomise=False), build(randomise=False, POS_ENCODING="learned")
    assert n_params(learned) - n_params(plain) == 2048 * 64  # TRAIN_SEQ_LEN = TTT_EVAL_SEQ_LEN = 2048 rows
    assert learned.pos_emb.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert build(randomise=False, POS_ENCODING="learned", TTT_ENABLED=0, TRAIN_SEQ_LEN=256).pos_emb.num_embeddings == 256
    m = build(POS_ENCODING="learned")
    idx = tokens()
    torch.testing.assert_close(m.embed(idx), m.tok_emb(idx) + m.pos_emb.weight[:40])
    assert all(isinstance(b.attn.rotary, torch.nn.Identity) for b in m.blocks)
    with pytest.raises(ValueError, match="POS_ENCODING=learned has 2048 positions"):
        m.embed(torch.ones(1, 2049, dtype=torch.long))


def test_no_position_encoding_leaves_queries_and_keys_unrotated():
    m = build(POS_ENCODING="none")
    x = torch.randn(2, 9, 4, 16)
    assert all(b.attn.rotary(x) is x for b in m.blocks)
    assert build().blocks[0].attn.rotary.dims == 16  # the default rotates


def test_channel_gate_equals_head_gate_with_rows_repeated_per_channel():
    head, channel = build(), build(ATTN_GATE_TYPE="channel")
    assert channel.blocks[0].attn.attn_gate_w.shape == (64, 12)
    n = sum(p.numel() for name, p in channel.named_parameters() if name.endswith("attn_gate_w"))
    assert n == 4 * 64 * 12  # layers x channels x GATE_WIDTH
    state = head.state_dict()
    for name in list(state):
        if name.endswith("attn_gate_w"):
            state[name] = state[name].repeat_interleave(16, dim=0)  # each head's row for its 16 channels
    channel.load_state_dict(state)
    idx = tokens()
    torch.testing.assert_close(channel.logits(idx), head.logits(idx), atol=1e-5, rtol=0)
    with torch.no_grad():
        channel.blocks[0].attn.attn_gate_w[0].add_(1.0)
    assert not torch.allclose(channel.logits(idx), head.logits(idx), atol=1e-4)

