"""Evaluation: sliding windows score every target once, and no scoring mode lets a token's score depend
on tokens after it (SPEC.md section 6) — plain, sliding, LoRA TTT and phased TTT alike."""
from __future__ import annotations

import contextlib
import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from data.shards import BOS_ID, load_stream
from golf import ttt
from golf.attention import packed_doc_info
from golf.bpb import ByteCounter
from golf.evaluate import document_pieces, evaluate_stream, pack_pieces, target_bytes, window_plan
from tests.gloo_ranks import free_port, gloo_group
from tests.test_record_stack import SMALL, small_model
from tests.trainer_runs import SAMPLE

CPU = torch.device("cpu")
VOCAB = 1024
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def val():
    """The first ~2,400 tokens of the sample val stream (several whole documents) and their bytes."""
    tokens = load_stream(str(SAMPLE / "datasets" / "fineweb10B_sp1024" / "fineweb_val_*.bin"))
    bos = np.flatnonzero(tokens == BOS_ID)
    tokens = np.array(tokens[: bos[bos > 2400][0] + 1])
    counter = ByteCounter.from_tokenizer(str(SAMPLE / "tokenizers" / "fineweb_1024_bpe.model"), VOCAB)
    return tokens, target_bytes(tokens, counter, None)


@pytest.fixture(scope="module")
def model():
    m = small_model(VOCAB_SIZE=VOCAB, seed=3)
    with torch.no_grad():  # a quieter model: random 0.2-std weights make the logits saturate
        for p in m.parameters():
            p.mul_(0.5)
    return m.eval()


def loss_fn(model):
    def fn(x, y):
        return F.cross_entropy(model.logits(x).flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    return fn


def perturb(tokens: np.ndarray, positions: np.ndarray, seed: int = 0) -> np.ndarray:
    """Changes the tokens at `positions` to other non-BOS ids; document boundaries stay where they are."""
    out = tokens.copy()
    g = np.random.default_rng(seed)
    pos = positions[tokens[positions] != BOS_ID]
    out[pos] = (tokens[pos] - 2 + g.integers(1, VOCAB - 2, len(pos))) % (VOCAB - 2) + 2
    return out


# ----------------------------------------------------------------------------- windows
@pytest.mark.parametrize("n_targets,seq_len,stride", [(100, 32, 32), (100, 32, 8), (97, 32, 7), (32, 32, 1), (101, 16, 5)])
def test_sliding_windows_score_every_target_once_with_enough_context(n_targets, seq_len, stride):
    tokens = np.arange(n_targets + 1) % 50 + 2
    n_windows, keep_from = window_plan(n_targets, seq_len, stride)
    context = np.full(n_targets, np.nan)
    calls = []

    def fn(x, y):  # "loss" = the position inside the window, i.e. the context a target had
        calls.append(x.shape)
        return torch.arange(x.shape[1], dtype=torch.float32).expand(x.shape).clone()

    loss, _ = evaluate_stream(fn, tokens, seq_len, 3, np.ones(len(tokens), np.int64), CPU, stride=stride,
                              token_nats=context)
    assert not np.isnan(context).any()  # every target scored
    assert loss == pytest.approx(context.mean())  # and each exactly once (the meter saw n_targets tokens)
    assert len(set(calls)) == 1 and calls[0][1] == seq_len  # one padded shape
    tail = context[seq_len:]
    assert (tail >= seq_len - stride).all()  # every target past the first window sees >= seq_len - stride tokens
    assert n_windows == 1 + -(-(n_targets - seq_len) // stride) and keep_from == seq_len - stride


def test_windows_split_over_ranks_cover_the_stream_once():
    tokens = np.arange(301) % 50 + 2
    seen = np.zeros(300)
    for rank in range(3):
        nats = np.full(300, np.nan)
        evaluate_stream(lambda x, y: torch.ones(x.shape), tokens, 32, 2, np.ones(301, np.int64), CPU, rank, 3,
                        stride=16, token_nats=nats)
        seen += ~np.isnan(nats)
    assert (seen == 1).all()


def test_bad_stride_is_refused():
    with pytest.raises(ValueError, match="EVAL_STRIDE"):
        window_plan(100, 32, 33)



# ----------------------------------------------------------------------------- document layout
def test_document_pieces_cut_each_document_from_its_start():
    # a headless first document (no BOS at 0), a short one, one of 2.5 pieces, and a final one-token target
    tokens = np.full(40, 5)
    tokens[[3, 7, 30]] = BOS_ID
    pieces = document_pieces(tokens, 8, BOS_ID)
    assert pieces.tolist() == [[0, 3], [3, 4], [7, 8], [15, 8], [23, 7], [30, 8], [38, 1]]
    covered = np.concatenate([np.arange(a, a + n) for a, n in pieces])
    np.testing.assert_array_equal(covered, np.arange(len(tokens) - 1))  # every target position once


def test_packing_never_splits_and_keeps_continuations_at_row_starts():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 33, 200)
    pieces = np.stack([np.cumsum(lengths) - lengths, lengths], 1)
    opens = rng.random(200) < 0.2
    row, off, n_rows = pack_pieces(pieces, opens, 32)
    assert (off[opens] == 0).all() and (off + lengths <= 32).all()
    slots = np.zeros((n_rows, 32), int)
    for r, o, n in zip(row, off, lengths):
        slots[r, o:o + n] += 1
    assert slots.max() == 1  # no two pieces overlap
    assert n_rows <= opens.sum() + -(-lengths[~opens].sum() // 32) + 2  # best fit wastes little


def test_docs_layout_scores_every_piece_as_if_alone(model, val):
    tokens, bytes_ = val
    seq_len = 64
    nats = np.full(len(tokens) - 1, np.nan)
    loss, bpb = evaluate_stream(loss_fn(model), tokens, seq_len, 5, bytes_, CPU, token_nats=nats, layout="docs")
    assert not np.isnan(nats).any()
    assert loss == pytest.approx(nats.mean()) and bpb == pytest.approx(nats.sum() / np.log(2) / bytes_[1:].sum())
    fn = loss_fn(model)
    for a, n in document_pieces(tokens, seq_len, BOS_ID)[::7]:
        seq = torch.from_numpy(tokens[a:a + n + 1].astype(np.int64))[None]
        alone = fn(seq[:, :-1], seq[:, 1:])
        np.testing.assert_allclose(nats[a:a + n], alone[0].detach().double().numpy(), rtol=1e-4, atol=1e-5)


def test_docs_layout_split_over_ranks_covers_the_stream_once(val):
    tokens, _ = val
    seen = np.zeros(len(tokens) - 1)
    for rank in range(3):
        nats = np.full(len(tokens) - 1, np.nan)
        evaluate_stream(lambda x, y: torch.ones(x.shape), tokens, 64, 4, np.ones(len(tokens), np.int64), CPU,
                        rank, 3, token_nats=nats, layout="docs")
        seen += ~np.isnan(nats)
    assert (seen == 1).all()


def test_docs_layout_is_plain_evaluation_only():
    with pytest.raises(ValueError, match="needs layout 'stream'"):
        evaluate_stream(lambda x, y: x, np.arange(100), 32, 2, np.ones(100, np.int64), CPU, stride=16, layout="docs")
    with pytest.raises(ValueError, match="expected 'stream' or 'docs'"):
        evaluate_stream(lambda x, y: x, np.arange(100), 32, 2, np.ones(100, np.int64), CPU, layout="rows")

# ----------------------------------------------------------------------------- legality
def stream_scores(model, tokens, bytes_, stride, layout="stream"):
    nats = np.full(len(tokens) - 1, np.nan)
    evaluate_stream(loss_fn(model), tokens, 64, 8, bytes_, CPU, stride=stride, token_nats=nats, layout=layout)
    return nats


@pytest.mark.parametrize("stride,layout", [(64, "stream"), (16, "stream"), (0, "docs")])
def test_plain_and_sliding_scores_ignore_future_tokens(model, val, stride, layout):
    tokens, bytes_ = val
    ref = stream_scores(model, tokens, bytes_, stride, layout)
    for t in np.random.default_rng(stride).integers(10, len(tokens) - 10, 4):
        changed = stream_scores(model, perturb(tokens, np.arange(t + 1, len(tokens)), seed=int(t)), bytes_, stride,
                                layout)
        np.testing.assert_array_equal(changed[:t], ref[:t])  # targets up to token t
        assert not np.array_equal(changed[t:], ref[t:])  # the perturbation was seen where it may be


def small_ttt(**kw) -> ttt.TTTSettings:
    """Small settings; lora_rank 4 keeps the adapters' rows 16 bytes wide in float32, so packed passes
    run torch._grouped_mm (kernels/segment_mm.py's reference) as on the GPU."""
    base = dict(chunk=16, seq_len=48, batch_docs=2, lora_rank=4, lora_alpha=4.0, lr=3e-2, beta1=0.5,
                weight_decay=0.1, pad_multiple=16, pack_bucket=32, global_lr=3e-2, global_batch_seqs=4)
    return ttt.TTTSettings(**{**base, **kw})


ARCH_SWITCHES = [{}, {"NUM_LOOPS": 0}, {"PARALLEL_START_LAYER": -1}, {"XSA_LAST_N": 0},
                 {"SPARSE_ATTN_GATE_ENABLED": 0}, {"SMEAR_GATE_ENABLED": 0}, {"SKIP_GATES_ENABLED": 0},
                 {"LN_SCALE": 0}, {"PARALLEL_FINAL_LANE": "attn"}, {"DOC_ISOLATION": 0}]


def ttt_scores(model, tokens, bytes_, s, lora=True):
    nats = np.full(len(tokens) - 1, np.nan)
    result = ttt.evaluate_ttt(model, tokens, bytes_, s, CPU, lora=lora, token_nats=nats)
    assert not np.isnan(nats).any()
    return nats, result


def order_keys(tokens, s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every target position: its phase, its document and its chunk in the document."""
    docs = ttt.split_documents(tokens)
    phase, doc, chunk = (np.zeros(len(tokens) - 1, np.int64) for _ in range(3))
    for k, order in enumerate(ttt.plan(docs, s)):
        for d in order:
            a, e = docs[d]
            phase[a:e], doc[a:e], chunk[a:e] = k, d, np.arange(e - a) // s.chunk
    return phase, doc, chunk


@pytest.mark.parametrize("layout", ["rows", "packed"])
@pytest.mark.parametrize("phases", [(), (2,)], ids=["lora", "phased"])
def test_ttt_scores_ignore_tokens_scored_later(model, val, phases, layout):
    """A target's score may depend on its own document up to its chunk and, through the global passes,
    on the documents of earlier phases; changing every other token (later chunks of its document, the
    other documents of its phase, later phases) leaves it bit for bit unchanged. Packed, the windows
    of other documents share the target's row: still nothing of theirs reaches it."""
    tokens, bytes_ = val
    s = small_ttt(phase_ends=phases, layout=layout)
    ref, _ = ttt_scores(model, tokens, bytes_, s)
    phase, doc, chunk = order_keys(tokens, s)
    rng = np.random.default_rng(len(phases))
    for g in rng.choice(len(phase), 4, replace=False):
        seen = (phase < phase[g]) | ((doc == doc[g]) & (chunk <= chunk[g]))
        changed, _ = ttt_scores(model, perturb(tokens, np.flatnonzero(~seen) + 1, seed=int(g)), bytes_, s)
        np.testing.assert_array_equal(changed[seen], ref[seen])
        assert not np.array_equal(changed[~seen], ref[~seen])


def test_ttt_adapts_and_phases_change_later_scores(model, val):
    tokens, bytes_ = val
    s = small_ttt()
    frozen, r0 = ttt_scores(model, tokens, bytes_, s, lora=False)
    plain = stream_scores(model, tokens, bytes_, 64)
    adapted, r1 = ttt_scores(model, tokens, bytes_, s)
    phased, r2 = ttt_scores(model, tokens, bytes_, small_ttt(phase_ends=(2,)))
    assert r0["tokens"] == r1["tokens"] == len(tokens) - 1  # the same targets as plain evaluation
    first_chunks = order_keys(tokens, s)[2] == 0
    np.testing.assert_array_equal(adapted[first_chunks], frozen[first_chunks])  # nothing learned yet
    assert not np.allclose(adapted, frozen)
    assert not np.allclose(phased, adapted)
    assert np.isfinite(plain).all()


@contextlib.contextmanager
def float64():
    """Model and adapters in float64, for comparisons of TTT runs whose float32 rounding differs."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def test_packed_layout_scores_like_rows(model, val):
    """TTT_LAYOUT=packed lays a step's windows end to end in one row (varlen attention, rotary
    positions and the smear restarting at every window, one LoRA adapter per window through
    kernels/segment_mm.py) and must score exactly what one padded row per window scores: phased, float64 at
    a calm lr; also with every window its own pass (micro_tokens below a window) and with 8 slots."""
    tokens, bytes_ = val
    kw = dict(phase_ends=(2,), lr=CALM_LR, global_lr=CALM_LR)
    with float64():
        m64 = copy.deepcopy(model).double()
        rows, r = ttt_scores(m64, tokens, bytes_, small_ttt(**kw, batch_docs=4, layout="rows"))
        assert r["layout"] == "rows"
        for extra in (dict(batch_docs=4), dict(batch_docs=4, micro_tokens=1), dict(batch_docs=8, pack_bucket=64),
                      dict(batch_docs=4, last_layer_queries=False)):
            packed, r = ttt_scores(m64, tokens, bytes_, small_ttt(**kw, **extra, layout="packed"))
            assert r["layout"] == "packed"
            np.testing.assert_allclose(packed, rows, atol=1e-9)


@pytest.mark.parametrize("switch", ARCH_SWITCHES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "defaults")
def test_packed_windows_score_as_if_alone(switch):
    """The model side of packing, for the defaults and with each architecture knob switched: windows
    packed into one row (one starting mid-document, so with no BOS to stop the smear), each with its
    own slot's adapters (random, so every slot's delta differs), get the nats they get as rows of
    their own: two windows (2 gathered LoRA rows), and three, every slot (row g is slot g's, read in
    place) with the slots out of order; each with the last layer at every row and at the query rows
    only (its adapters' rows too)."""
    m = small_model(**switch).eval()
    tokens = np.random.default_rng(0).integers(2, 64, 200)
    tokens[[0, 90, 150]] = BOS_ID
    s = ttt.TTTSettings(chunk=8, seq_len=40, lora_rank=4, pad_multiple=8, pack_bucket=16, batch_docs=3)
    adapters = ttt.Adapters(m, s, 3, CPU)
    with torch.no_grad():
        for lora in adapters.loras:
            lora.B.normal_(std=0.1)
    off = torch.autocast("cpu", enabled=False)
    try:
        for (n, T), queries in itertools.product(((2, 64), (3, 80)), (False, True)):  # 36 + 13 (+ 20) window tokens, in buckets of 16
            rows = ttt._Rows(slots=np.array([2, 0, 1][:n]), base=np.array([30, 90, 150][:n]),
                             span=np.array([36, 13, 20][:n]), offset=np.array([30, 5, 12][:n]),
                             train=np.array([True, False, True][:n]))
            [(arrays, idx)] = list(ttt._packed_passes(tokens, rows, s, queries))
            assert arrays[1].shape == (1, T) and len(arrays[0]) == max(n, 2) and len(arrays) == (14 if queries else 11)
            with torch.no_grad():
                got = ttt._pass(m, adapters, off, False, s.seq_len, *map(torch.from_numpy, arrays))[0]
            for j in range(n):
                r = rows.slots[j] if n == 3 else j  # the window's LoRA row
                x = torch.from_numpy(tokens[rows.base[j] : rows.base[j] + rows.span[j]][None])
                at = torch.from_numpy(rows.offset[j] + np.arange(s.chunk))[None]
                scored = at[0] < rows.span[j]
                y = torch.from_numpy(tokens[idx[r] + 1])[None]
                adapters.select(torch.tensor(rows.slots[j : j + 1]))
                with torch.no_grad():
                    alone = ttt._nats(m, x, y[:, scored], adapters.head, off, at[:, scored])
                torch.testing.assert_close(got[r][scored], alone[0], rtol=1e-5, atol=1e-5)
    finally:
        adapters.remove()


def test_packed_pass_lora_rows():
    """A packed pass of one or two windows carries 2 LoRA rows (a long document's chain gathers and
    stores no idle slots), a larger one every slot, row g slot g's: its windows lie in slot order and
    each slot's row of tokens ends where its window does (empty for slots without one); rows without
    a window are unscored, and the last window's row holds the padding."""
    tokens = np.arange(4000) % 50 + 2
    s = ttt.TTTSettings(chunk=8, seq_len=40, lora_rank=4, pad_multiple=8, pack_bucket=16, batch_docs=6)
    for slots, G in (([0], 2), ([3, 1], 2), ([0, 1, 2], 6), ([4, 0, 2], 6), ([5, 3, 1, 0, 2, 4], 6)):
        n = len(slots)
        rows = ttt._Rows(slots=np.array(slots), base=100 * np.arange(n), span=np.full(n, 40), offset=np.full(n, 32),
                         train=np.ones(n, dtype=bool))
        [(arrays, idx)] = list(ttt._packed_passes(tokens, rows, s))
        lora_rows, x, scored, weight, ends = arrays[0], arrays[1], arrays[4], arrays[5], arrays[10]
        assert len(lora_rows) == G and len(ends) == G and scored.shape == (G, s.chunk)
        held = sorted(slots) if G == 6 else list(range(n))  # the rows holding a window
        if G == 6:
            assert (lora_rows == np.arange(6)).all()
            # each window's scored inputs come from its own document (base 100 x its position in `slots`)
            assert all((idx[slot] // 100 == slots.index(slot)).all() for slot in slots)
        else:
            assert (lora_rows[:n] == slots).all()
        assert scored[held].all() and scored.sum() == n * s.chunk and (weight[held] == 1).all() and weight.sum() == n
        starts = np.concatenate(([0], ends[:-1]))
        assert ((ends - starts)[held[:-1]] == 40).all() and ends[-1] == x.shape[1]
        assert (ends[held[-1] :] == x.shape[1]).all()  # the last window's row runs to the end: the padding


def test_query_rows_are_each_segments_last_tokens():
    """_query_rows: every window gets at least its scored rows; the rest of Q comes from the padding's
    segments first, then from the windows' earlier tokens; each segment's rows are its last tokens,
    in segment order, with cu_seqlens as long as the batch's."""
    cu = np.array([0, 10, 14, 30, 34, 40, 40], dtype=np.int32)  # windows of 10, 4, 16; padding of 4 and 6; an empty one
    for Q, rows in ((11, [3, 2, 6, 0, 0, 0]), (15, [3, 2, 6, 4, 0, 0]), (20, [3, 2, 6, 4, 5, 0]),
                    (25, [7, 2, 6, 4, 6, 0]), (33, [10, 4, 9, 4, 6, 0]), (40, [10, 4, 16, 4, 6, 0])):
        index, q_cu = ttt._query_rows(cu, np.array([3, 2, 6]), Q)
        assert q_cu.dtype == np.int32 and len(q_cu) == len(cu) and np.diff(q_cu).tolist() == rows
        expect = np.concatenate([np.arange(e - n, e) for e, n in zip(cu[1:], rows)])
        assert index.dtype == np.int64 and index.tolist() == expect.tolist()


def test_last_layer_queries_need_a_last_layer_that_runs_once(model, val):
    """A loop through the last layer runs its block twice, at every row and at the query rows: TTT
    then keeps the last layer at every row (and scores as before), and the model refuses query rows."""
    tokens, bytes_ = val
    looped = small_model(VOCAB_SIZE=VOCAB, seed=3, LOOP_START=2, LOOP_END=3, PARALLEL_START_LAYER=-1).eval()
    assert looped.query_block() is None and model.query_block() == 3
    assert not ttt.last_layer_queries(small_ttt(layout="packed"), looped, CPU)
    assert ttt.last_layer_queries(small_ttt(layout="packed"), model, CPU)
    assert not ttt.last_layer_queries(small_ttt(layout="packed", last_layer_queries=False), model, CPU)
    assert not ttt.last_layer_queries(small_ttt(), model, CPU)  # rows on CPU
    ttt_scores(looped, tokens, bytes_, small_ttt(layout="packed"))
    seg = torch.zeros(1, 8, dtype=torch.int32)
    info = packed_doc_info(seg, torch.tensor([0, 8], dtype=torch.int32), 8, torch.arange(8)[None],
                           torch.arange(8)[None] == 0, torch.arange(6, 8), torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="LOOP_END below NUM_LAYERS - 1"):
        looped.hidden(torch.full((1, 8), 5), info)


def test_packed_layout_is_checked():
    with pytest.raises(ValueError, match="TTT_LAYOUT"):
        ttt.TTTSettings(layout="padded")
    with pytest.raises(ValueError, match="TTT_PACK_BUCKET"):
        ttt.TTTSettings(pack_bucket=100)  # not a multiple of the pad multiple, 64
    with pytest.raises(ValueError, match="does not support packed"):
        ttt.packs(ttt.TTTSettings(layout="packed"), torch.nn.Linear(2, 2), CPU)
    model = small_model()
    assert ttt.packs(ttt.TTTSettings(layout="packed"), model, CPU)
    assert not ttt.packs(ttt.TTTSettings(), model, CPU)  # auto: rows on CPU (a dense mask per packed row)
    assert ttt.packs(ttt.TTTSettings(), model, torch.device("cuda"))


def test_ttt_scores_do_not_depend_on_slots_or_passes(model, val):
    """A document's scores do not depend on the documents scored beside it, nor on how a step's rows
    are split into passes: four slots at once, one row per pass (micro_tokens below a window), and one
    document at a time all agree. In float64 at a calm lr: the head's logits are float32, and Adam's
    first steps are nearly sign(grad), so at the usual test lr a rounding-level difference of another
    pass split (the global pass splits too) grows into whole nats within 30 steps."""
    tokens, bytes_ = val
    kw = dict(phase_ends=(2,), lr=CALM_LR, global_lr=CALM_LR)
    with float64():
        m64 = copy.deepcopy(model).double()
        whole, _ = ttt_scores(m64, tokens, bytes_, small_ttt(**kw, batch_docs=4))
        split, _ = ttt_scores(m64, tokens, bytes_, small_ttt(**kw, batch_docs=4, micro_tokens=1, global_micro_tokens=1))
        alone, _ = ttt_scores(m64, tokens, bytes_, small_ttt(**kw, batch_docs=1))
    for other in (split, alone):
        np.testing.assert_allclose(other, whole, atol=1e-3)
        assert np.abs(other - whole).mean() < 1e-6


@pytest.mark.parametrize("slots", [3, 8], ids=["masked", "rows"])
@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_adapter_adamw_is_torch_adamw_per_slot(beta1, slots):
    """The adapters' AdamW: a slot stepping alone follows torch.optim.AdamW on its own parameters;
    slots not stepped keep their values and state; a slot reset mid-way starts over (its own step
    count) and then matches a fresh torch.optim.AdamW. Both ways of stepping: over every row, masked
    (4 step rows of 3 slots), and over the step rows alone (4 of 8)."""
    m = small_model(seed=5).eval()
    s = ttt.TTTSettings(chunk=8, seq_len=32, lora_rank=3, lr=1e-2, beta1=beta1, beta2=0.99, weight_decay=0.3)
    adapters = ttt.Adapters(m, s, slots, CPU)
    try:
        lora = adapters.loras[0]
        ref = torch.nn.Parameter(lora.A[0].detach().clone())
        opt = torch.optim.AdamW([ref], lr=s.lr, betas=(beta1, s.beta2), weight_decay=s.weight_decay, foreach=False)
        g = torch.Generator().manual_seed(0)
        untouched = lora.A[2].detach().clone()
        for step in range(5):
            grad = torch.randn(ref.shape, generator=g)
            if step == 3:  # slot 0 takes a new document: fresh values, fresh optimizer
                adapters.reset(np.array([0]))
                with torch.no_grad():
                    ref.copy_(lora.A[0])
                opt = torch.optim.AdamW([ref], lr=s.lr, betas=(beta1, s.beta2), weight_decay=s.weight_decay,
                                        foreach=False)
            lora.gA[0] = grad
            lora.gA[1] = grad * 2
            ref.grad = grad.clone()
            adapters.step(adapters.slot_rows(np.array([0, 1, 1])))  # padded to 4 rows: 0, 1, 1, 0
            opt.step()
            torch.testing.assert_close(lora.A[0], ref, rtol=1e-5, atol=1e-6)
            assert not lora.gA.any()  # zeroed for the next chunk
        assert torch.equal(lora.A[2], untouched) and adapters.t.tolist() == [2.0, 5.0] + [0.0] * (slots - 2)
    finally:
        adapters.remove()


@pytest.mark.parametrize("compiled,layout", [(False, "rows"), (True, "rows"), (False, "packed"), (True, "packed")])
def test_ttt_steps_replayed_as_graphs_score_like_direct_steps(model, val, compiled, layout):
    """TTT_CUDA_GRAPHS: steps of repeated shapes are captured and replayed (on CPU the replay re-runs the
    captured Python on the graph's static inputs, so a step that read anything but its inputs would
    score differently). Phased, so replays continue across a global pass that changes the weights;
    same scores bit for bit, same result."""
    tokens, bytes_ = val
    kw = dict(phase_ends=(2,), compile=compiled, layout=layout)
    nats = []
    for graphs in (0, 2):
        lines, out = [], np.full(len(tokens) - 1, np.nan)
        r = ttt.evaluate_ttt(copy.deepcopy(model), tokens, bytes_, small_ttt(**kw, graphs=graphs), CPU,
                             token_nats=out, log=lines.append, backend="aot_eager")
        nats.append((out, r["val_bpb"], lines))
    (plain, bpb0, _), (replayed, bpb1, lines) = nats
    assert not [line for line in lines if "ttt_compile_failed" in line]
    np.testing.assert_array_equal(replayed, plain)
    assert bpb1 == bpb0
    stats = [line for line in lines if line.startswith("ttt_cuda_graphs")]
    assert len(stats) == 1 and int(stats[0].split("replays:")[1].split()[0]) > 10, stats
    assert r["cuda_graphs"]["replays"] > 10 and r["cuda_graphs"]["failed"] is None


class _NoHostWaits(TorchDispatchMode):
    """Raises on every op whose result the host would have to wait for on a GPU: a tensor read as a
    Python number or bool, or an output whose shape depends on the data."""
    WAITS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item", "repeat_interleave")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.WAITS:
            raise AssertionError(f"the device step waits for the device: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["rows", "packed"])
def test_the_device_step_never_waits_for_the_device(model, val, monkeypatch, layout):
    """What a CUDA graph needs of golf.ttt._step (and what keeps the GPU queue full without graphs):
    no op in it reads device data on the host. Scoring, backward and the adapters' step all run."""
    tokens, bytes_ = val
    calls = []

    def guard(name):
        work = getattr(ttt, name)

        def guarded(*args):
            calls.append(name)
            with _NoHostWaits():
                return work(*args)
        monkeypatch.setattr(ttt, name, guarded)
    guard("_pass")
    guard("_adapter_step")
    r = ttt.evaluate_ttt(copy.deepcopy(model), tokens, bytes_, small_ttt(layout=layout), CPU)
    assert r["tokens"] == len(tokens) - 1
    assert calls.count("_pass") > 10 and calls.count("_adapter_step") > 10, calls


def test_warm_up_runs_every_kind_of_packed_pass(model, monkeypatch):
    """The warm-up (and so TTT_PRIME) runs packed passes of every slot with a backward, of two LoRA rows
    with a backward and without one: kernels first launched later (kernels/segment_mm.py's Triton
    backward, JIT-compiled at first use) would cost compile time inside the scored phases."""
    seen, pack = set(), ttt._pack

    def record(tokens, rows, sel, width, s, queries=False):
        arrays, idx = pack(tokens, rows, sel, width, s, queries)
        seen.add((len(arrays[0]), bool(arrays[5].any())))  # (LoRA rows, trains)
        return arrays, idx
    monkeypatch.setattr(ttt, "_pack", record)
    s = small_ttt(layout="packed", batch_docs=4)
    m = copy.deepcopy(model).eval()
    adapters = ttt.Adapters(m, s, s.batch_docs, CPU)
    try:
        with ttt._frozen(m):
            ttt.warm_up(m, adapters, s, CPU, torch.autocast("cpu", enabled=False))
    finally:
        adapters.remove()
    assert {(4, True), (2, True), (2, False)} <= seen, seen


def test_prime_leaves_the_model_as_it_was_and_ttt_scores_the_same(model, val):
    """TTT_PRIME: compiling TTT's regions ahead with throwaway adapters changes nothing a later
    evaluation or training sees: weights, modes, requires_grad, hooks, regions; scores bit for bit."""
    tokens, bytes_ = val
    s = small_ttt(phase_ends=(2,), compile=True)
    m = copy.deepcopy(model).train()
    m.blocks[0].attn.c_q.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = [p.requires_grad for p in m.parameters()]
    seconds = ttt.prime(m, s, CPU, backend="aot_eager")
    assert seconds > 0 and m.training and m.regions is None
    assert [p.requires_grad for p in m.parameters()] == flags
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert not any(mod._forward_hooks for mod in m.modules())
    got = [np.full(len(tokens) - 1, np.nan) for _ in range(2)]
    for out, mm in zip(got, (m.eval(), copy.deepcopy(model))):
        ttt.evaluate_ttt(mm, tokens, bytes_, s, CPU, token_nats=out, backend="aot_eager")
    np.testing.assert_array_equal(got[0], got[1])


def test_compiled_ttt_scores_like_eager(model, val):
    """TTT_COMPILE: LoRA scoring runs the layers through regions compiled with dynamic shapes (the LoRA
    hooks traced inside); phased, so the eager global pass runs between compiled batches. Same scores
    as eager, few graphs, and the model keeps no regions afterwards. Float64 at a calm learning rate: the logits are float32, and
    at the small tests' usual lr a rounding difference of another op order grows ~2x per step."""
    from torch._dynamo.utils import counters
    tokens, bytes_ = val
    torch._dynamo.reset()
    counters.clear()
    kw = dict(phase_ends=(2,), lr=CALM_LR, global_lr=CALM_LR)
    with float64():
        m64 = copy.deepcopy(model).double()
        eager, _ = ttt_scores(m64, tokens, bytes_, small_ttt(**kw))
        nats = np.full(len(tokens) - 1, np.nan)
        r = ttt.evaluate_ttt(m64, tokens, bytes_, small_ttt(**kw, compile=True), CPU, token_nats=nats,
                             backend="aot_eager")  # Dynamo and AOT autograd as with Inductor, without codegen
    assert m64.regions is None and r["tokens"] == len(tokens) - 1
    np.testing.assert_allclose(nats, eager, atol=1e-6)
    # one graph per piece for every window width and row count: input, block at layer 0 (input
    # without grad) and after, serial and parallel decoder layers, output; one for the adapters' AdamW
    # step; the global pass is eager
    assert counters["stats"]["unique_graphs"] == 7


def test_ttt_restores_the_model(model, val):
    tokens, bytes_ = val
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, r = ttt_scores(model, tokens, bytes_, small_ttt(phase_ends=(1, 2)))
    # the phases' timings: a global pass after each but the last, their tokens all of the run's
    assert [p["docs"] for p in r["phases"]] == [1, 1, r["docs"] - 2]
    assert [p["global_s"] is None for p in r["phases"]] == [False, False, True]
    assert sum(p["tokens"] for p in r["phases"]) == r["tokens"] and all(p["scoring_s"] > 0 for p in r["phases"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(p.requires_grad for p in model.parameters()) or all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("switch", ARCH_SWITCHES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "defaults")
def test_ttt_forward_with_zero_adapters_is_the_model_forward(switch):
    check_ttt_forward_is_the_model_forward(small_model(**switch).eval(), ttt.TARGETS)


def check_ttt_forward_is_the_model_forward(m, targets):
    """Also run over the research trainer's knobs (tests/test_v2_ttt.py)."""
    idx = torch.randint(2, 64, (3, 40), generator=torch.Generator().manual_seed(1))
    idx[:, 0] = BOS_ID
    idx[1, 20] = BOS_ID
    s = ttt.TTTSettings(chunk=8, seq_len=40, lora_rank=4, targets=targets)
    ref = m.logits(idx)
    adapters = ttt.Adapters(m, s, 3, CPU)
    try:
        per_block = len([t for t in targets if t != "head"])
        assert len(adapters.loras) == len(m.blocks) * per_block + ("head" in targets)  # every block, and the head
        got = m.head(m.hidden(idx), head_delta=adapters.head)
        assert torch.equal(got, ref)
        # the TTT scoring path itself (causal attention: its rows are single documents)
        single = idx.clone()
        single[1, 20] = 7
        y = torch.roll(single, -1, 1)
        plain = F.cross_entropy(m.logits(single).flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        off = torch.autocast("cpu", enabled=False)
        torch.testing.assert_close(ttt._nats(m, single, y, adapters.head, off), plain, rtol=1e-5, atol=1e-5)
        at = torch.tensor([[25, 30], [3, 39], [0, 20]])
        torch.testing.assert_close(ttt._nats(m, single, y.gather(1, at), adapters.head, off, at), plain.gather(1, at),
                                   rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # and the adapters really are in the path
            for lora in adapters.loras:
                lora.B.normal_()
        assert not torch.allclose(m.head(m.hidden(idx), head_delta=adapters.head), ref)
    finally:
        adapters.remove()
    assert torch.equal(m.logits(idx), ref)


def test_scored_distributions_are_normalised(model, val):
    tokens, _ = val
    s = ttt.TTTSettings(chunk=8, seq_len=32, lora_rank=4)
    adapters = ttt.Adapters(model, s, 2, CPU)
    try:
        with torch.no_grad():
            for lora in adapters.loras:
                lora.B.normal_(std=0.1)
            x = torch.from_numpy(tokens[:64].astype(np.int64)).view(2, 32)
            for logits in (model.logits(x), model.head(model.hidden(x), head_delta=adapters.head)):
                total = torch.softmax(logits.double(), dim=-1).sum(-1)
                torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)
    finally:
        adapters.remove()


def test_phase_boundaries_as_counts_or_fractions():
    assert ttt.phase_ends(2500, 3, 50_000) == (833, 1666, 2500)
    assert ttt.phase_ends(0.05, 3, 50_000) == (833, 1666, 2500)
    assert ttt.phase_ends(0.05, 3, 1621) == (27, 54, 81)
    assert ttt.phase_ends(2500, 3, 1621) == (833, 1621)
    assert ttt.phase_ends(0, 3, 1621) == () == ttt.phase_ends(100, 0, 1621)


def test_documents_partition_the_stream_targets():
    tokens = np.array([BOS_ID, 5, 6, BOS_ID, 7, BOS_ID, 8, 9, 10])
    docs = ttt.split_documents(tokens)
    assert docs.tolist() == [[0, 3], [3, 5], [5, 8]]
    covered = np.concatenate([np.arange(a, e) for a, e in docs])
    assert covered.tolist() == list(range(len(tokens) - 1))


def test_unknown_lora_target_is_refused():
    with pytest.raises(ValueError, match="TTT_LORA_TARGETS"):
        ttt.TTTSettings(targets=("k", "mlp"))


# The ranks' global pass sums gradients in another order (rounding-level differences); at the test
# lr of 3e-2, thirty Adam steps on a long document grow those into 0.006 bpb even in float64, so the
# rank comparison runs at a calmer lr, where they stay at rounding level
CALM_LR = 3e-3


def _ttt_worker(rank, world, port, out_dir, tokens, bytes_):
    with gloo_group(rank, world, port):
        torch.set_num_threads(1)
        m = small_model(VOCAB_SIZE=VOCAB, seed=3)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(0.5)
        with float64():
            r = ttt.evaluate_ttt(m.double().eval(), tokens, bytes_, small_ttt(phase_ends=(2,), lr=CALM_LR), CPU)
        torch.save(torch.tensor([r["val_loss"], r["val_bpb"], r["tokens"]], dtype=torch.float64), f"{out_dir}/r{rank}.pt")


def test_ttt_over_two_ranks_matches_one_process(model, val, tmp_path):
    import torch.multiprocessing as mp

    tokens, bytes_ = val
    with float64():
        _, one = ttt_scores(copy.deepcopy(model).double(), tokens, bytes_, small_ttt(phase_ends=(2,), lr=CALM_LR))
    mp.spawn(_ttt_worker, args=(2, free_port(), str(tmp_path), tokens, bytes_), nprocs=2, join=True)
    for r in range(2):
        loss, bpb, n = torch.load(tmp_path / f"r{r}.pt").tolist()
        assert n == one["tokens"]
        # the global pass sums gradients in another order across ranks: equal up to rounding
        assert bpb == pytest.approx(one["val_bpb"], rel=1e-5) and loss == pytest.approx(one["val_loss"], rel=1e-5)


def test_ttt_regions_do_not_tie_equal_sizes():
    """A TTT batch's first window can be 64 rows x 64 positions. With Dynamo's duck sizing, rows and
    width would share one symbol and the next width would compile every graph again (on the H100:
    222 s, then 138 s more); the regions turn it off, so one graph serves all shapes."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    run = ttt.compiled_regions("aot_eager")

    def piece(x, w):
        return torch.relu(x @ w) * x.shape[1]

    w = torch.randn(8, 8)
    for rows, width in ((4, 4), (4, 6), (3, 5)):
        x = torch.randn(rows, width, 8)
        torch.testing.assert_close(run(piece, x, w), piece(x, w))
    assert counters["stats"]["unique_graphs"] == 1


def test_ttt_falls_back_to_eager_when_compile_fails(model, val):
    """A model piece the compiler rejects must not cost the evaluation: TTT logs it and runs eager."""
    tokens, bytes_ = val

    def failing_backend(gm, example_inputs):
        raise RuntimeError("no codegen for this piece")

    torch._dynamo.reset()
    logs = []
    eager = ttt.evaluate_ttt(model, tokens, bytes_, small_ttt(), CPU)
    r = ttt.evaluate_ttt(model, tokens, bytes_, small_ttt(compile=True), CPU, backend=failing_backend, log=logs.append)
    assert r["val_bpb"] == eager["val_bpb"] and model.regions is None
    assert any(line.startswith("ttt_compile_failed: ") and "TTT runs eager" in line for line in logs), logs


def test_phase_documents_are_dealt_over_ranks():
    """Longest first, dealt: each of 4 ranks' first takes (16 slots) holds every 4th of the phase's
    longest documents, not the first rank the 16 longest; one rank keeps plain longest-first order;
    a phase smaller than the ranks' slots spreads as evenly."""
    lengths = np.arange(1, 101)[np.random.default_rng(0).permutation(100)]
    docs = np.stack((np.r_[0, np.cumsum(lengths)[:-1]], np.cumsum(lengths)), 1)
    s = ttt.TTTSettings(batch_docs=16)
    [one] = ttt.plan(docs, s)
    assert (np.diff(lengths[one]) <= 0).all()
    [four] = ttt.plan(docs, s, world=4)
    assert sorted(four) == list(range(100)) and (four[64:] == one[64:]).all()
    firsts = [lengths[four[16 * r : 16 * r + 16]].sum() for r in range(4)]
    assert max(firsts) - min(firsts) <= 3 * 16  # each rank one of every four in turn
    assert lengths[one[:16]].sum() > 1.3 * max(firsts)
    np.testing.assert_array_equal(ttt.deal(10, 4, 16), [0, 4, 8, 1, 5, 9, 2, 6, 3, 7])
