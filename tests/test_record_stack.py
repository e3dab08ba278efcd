"""Property tests of the record stack in train_gpt.py, one (or a few) per technique.

Each test exercises the model through its public pieces (GPT, Block, Attention, MLP, PartialRotary,
layer_order, param_kind) on a tiny fp32 CPU config, and most carry a negative control: the same check
with the technique's knob turned off (or its code path monkeypatched away) must fail, so a switch
that silently does nothing cannot pass.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from data.shards import BOS_ID
from golf.attention import doc_boundaries
from golf.config import parse_knobs

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "VOCAB_SIZE": "64", "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "ROPE_DIMS": "8", "NUM_LOOPS": "1", "LOOP_START": "1", "LOOP_END": "2", "PARALLEL_START_LAYER": "3",
    "XSA_LAST_N": "4", "GATE_WIDTH": "12", "SMEAR_WIDTH": "12",
}
# SMALL's orders: unlooped 0,1,2,3; looped 0,1,2,1,2,3 (encoder 0,1,2 | decoder 1,2,3), 3 skips


def cfg_of(**overrides):
    return parse_knobs(tg.KNOBS, {**SMALL, **{k: str(v) for k, v in overrides.items()}})


def randomised(model, seed: int):
    """Every parameter N(0, 0.2^2) from a generator seeded seed + 1 (zero inits hide bugs)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def small_model(randomise=True, seed=0, **overrides):
    torch.manual_seed(seed)
    model = tg.GPT(cfg_of(**overrides))
    return randomised(model, seed) if randomise else model


def copy_weights(src, dst):
    """dst gets every parameter of src it has (same names); the rest of dst stays as it is."""
    missing, _ = dst.load_state_dict(src.state_dict(), strict=False)
    return missing


def tokens(B=2, T=40, seed=0, bos_at=()):
    """Random non-BOS ids with BOS at position 0 of each row and at (row, pos) in bos_at."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(2, 64, (B, T), generator=g)
    idx[:, 0] = BOS_ID
    for b, t in bos_at:
        idx[b, t] = BOS_ID
    return idx


def n_params(**env):
    with torch.device("meta"):  # the default model's orthogonal inits take ~25 s on CPU; meta is instant
        model = tg.GPT(parse_knobs(tg.KNOBS, env))
    return sum(p.numel() for p in model.parameters()), model


def split_skips(n: int) -> int:
    return min(n // 2, n - n // 2)


# ----------------------------------------------------------------------------- 1. parameter counts
def test_default_parameter_count():
    n, model = n_params()
    assert n == 35_945_671
    assert model.num_skips == 8 == split_skips(len(tg.layer_order(model.cfg, True)))


def readme_baseline_env() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "<!-- naive-baseline -->")
    assert lines[start + 1].startswith("```"), "the marker must be followed by a code fence"
    end = next(i for i in range(start + 2, len(lines)) if lines[i].strip().startswith("```"))
    env = {}
    for line in lines[start + 2 : end]:
        for tok in line.split():
            m = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(\S*)", tok)
            if m:
                env[m.group(1)] = m.group(2)
    return env


def test_readme_naive_baseline_parameter_count():
    env = readme_baseline_env()
    assert {"VOCAB_SIZE", "NUM_LAYERS", "MLP_MULT", "NUM_LOOPS", "SMEAR_GATE_ENABLED"} <= set(env)
    n, model = n_params(**env)
    assert n == 17_059_912
    # none of the record-stack extras survive the baseline's overrides
    names = {name for name, _ in model.named_parameters()}
    assert not any(s in name for name in names for s in ("smear", "skip_gates", "attn_gate_w", "parallel_"))


@pytest.mark.parametrize("knob, value, delta", [
    ("SMEAR_GATE_ENABLED", "0", lambda c, s: c.smear_width + 1),
    ("SKIP_GATES_ENABLED", "0", lambda c, s: s * c.model_dim),
    ("SPARSE_ATTN_GATE_ENABLED", "0", lambda c, s: c.num_layers * c.num_heads * c.gate_width),
    ("PARALLEL_START_LAYER", "-1", lambda c, s: c.num_layers * 6),
])
def test_each_knob_off_removes_its_parameters(knob, value, delta):
    base, model = n_params()
    off, _ = n_params(**{knob: value})
    expected = delta(model.cfg, model.num_skips)
    assert expected > 0 and base - off == expected, (knob, base - off, expected)


def test_no_loops_shrinks_the_skips_to_the_unlooped_split():
    base, looped = n_params()
    off, unlooped = n_params(NUM_LOOPS="0")
    cfg = looped.cfg
    assert len(tg.layer_order(cfg, True)) == 17 and len(tg.layer_order(cfg, False)) == 11
    assert looped.num_skips == split_skips(17) == 8 and unlooped.num_skips == split_skips(11) == 5
    # skip_weights and skip_gates: one MODEL_DIM row each per skip
    assert base - off == (8 - 5) * cfg.model_dim * 2


# ----------------------------------------------------------------------------- 2. SmearGate BOS fix
def test_smear_never_crosses_bos():
    model = small_model()
    with torch.no_grad():
        model.smear_lambda.fill_(0.7)
    idx = tokens(bos_at=[(0, 13), (1, 25)])
    x = torch.randn(*idx.shape, 64)
    with torch.no_grad():
        y = model.smear(x, idx)
    bos = idx == BOS_ID
    assert torch.equal(y[bos], x[bos])  # every BOS row (including position 0) passes through
    nb = ~bos
    assert (y[nb] - x[nb]).abs().amax(-1).min() > 1e-4  # every other position takes some of its predecessor
    # the exact rule at a non-BOS position t: x_t + lambda * sigmoid(w . x_t[:width]) * x_{t-1}
    t = 5
    g = 0.7 * torch.sigmoid(x[:, t, :12] @ model.smear_gate.weight[0])
    torch.testing.assert_close(y[:, t], x[:, t] + g[:, None] * x[:, t - 1])


def test_smear_bos_makes_documents_independent(monkeypatch):
    model = small_model().eval()
    with torch.no_grad():
        model.smear_lambda.fill_(0.7)
    a = tokens(B=1, T=40, bos_at=[(0, 17)])
    b = a.clone()
    b[0, 1:17] = torch.randint(2, 64, (16,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ha, hb = model.hidden(a), model.hidden(b)
        la, lb = model.logits(a), model.logits(b)
    assert torch.equal(ha[:, 17:], hb[:, 17:]) and torch.equal(la[:, 17:], lb[:, 17:])
    assert not torch.allclose(ha[:, 1:17], hb[:, 1:17])
    # control: the same documents but the smear's BOS check disabled (attention still isolated)
    docs = doc_boundaries(a, BOS_ID, True)
    monkeypatch.setattr(tg, "BOS_ID", -1)
    with torch.no_grad():
        ha, hb = model.hidden(a, docs), model.hidden(b, docs)
    assert not torch.allclose(ha[:, 17], hb[:, 17])


# ----------------------------------------------------------------------------- 3. XSA
def capture_attention(model):
    """Per Attention call: (v [B,T,Hkv,D], y [B,T,H,D] just before the output projection)."""
    vs, ys, handles = {}, {}, []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        vs[i], ys[i] = [], []
        handles.append(attn.c_v.register_forward_hook(lambda m, a, out, i=i: vs[i].append(out)))
        handles.append(attn.proj.register_forward_pre_hook(lambda m, a, i=i: ys[i].append(a[0])))
    return vs, ys, handles


def xsa_dots(model, idx):
    """Largest |<y_h, v_hat_{h // group}>| relative to the mean |y_h|, per physical layer. (Relative to the
    mean, not each position's own norm: at a document start y_h is v itself, so XSA leaves ~0 there.)"""
    vs, ys, handles = capture_attention(model)
    with torch.no_grad():
        model.logits(idx)
    for h in handles:
        h.remove()
    H, Hkv = model.cfg.num_heads, model.cfg.num_kv_heads
    D = model.cfg.model_dim // H
    out = {}
    for i in vs:
        assert len(vs[i]) == len(ys[i]) > 0
        worst = 0.0
        for v, y in zip(vs[i], ys[i]):
            B, T, _ = y.shape
            y = y.view(B, T, H, D)
            v = v.view(B, T, Hkv, D)
            for h in range(H):
                v_hat = F.normalize(v[:, :, h // (H // Hkv)], dim=-1)
                dot = (y[:, :, h] * v_hat).sum(-1).abs() / y[:, :, h].norm(dim=-1).mean()
                worst = max(worst, dot.max().item())
        out[i] = worst
    return out


def test_xsa_output_orthogonal_to_own_value():
    idx = tokens(bos_at=[(0, 20)])
    on = small_model().eval()
    dots = xsa_dots(on, idx)
    assert all(b.attn.xsa for b in on.blocks)
    assert max(dots.values()) < 1e-5, dots
    # XSA_LAST_N=2: only layers 2 and 3 are orthogonalised
    part = small_model(XSA_LAST_N=2).eval()
    copy_weights(on, part)
    dots = xsa_dots(part, idx)
    assert [b.attn.xsa for b in part.blocks] == [False, False, True, True]
    assert dots[2] < 1e-5 and dots[3] < 1e-5 and dots[0] > 1e-2 and dots[1] > 1e-2, dots
    # control: XSA off everywhere
    off = small_model(XSA_LAST_N=0).eval()
    copy_weights(on, off)
    dots = xsa_dots(off, idx)
    assert min(dots.values()) > 1e-2, dots


# ----------------------------------------------------------------------------- 4. partial RoPE
def test_partial_rotary_rotates_only_leading_channels():
    D, dims = 16, 8
    rope = tg.PartialRotary(D, dims, 10000.0)
    x = torch.randn(2, 12, 3, D)
    y = rope(x)
    assert torch.equal(y[..., dims:], x[..., dims:])  # untouched channels, every position
    torch.testing.assert_close(y[:, 0], x[:, 0])       # position 0: no rotation
    half = dims // 2
    # every leading channel changes at positions > 0 (the slowest pair too, if only a little)
    assert ((y[:, 1:, :, :dims] - x[:, 1:, :, :dims]).abs() > 1e-7).float().mean() > 0.99
    pair_x = x[..., :half] ** 2 + x[..., half:dims] ** 2
    pair_y = y[..., :half] ** 2 + y[..., half:dims] ** 2
    torch.testing.assert_close(pair_y, pair_x)         # each (i, i + dims/2) pair keeps its norm
    # relative positions: <R_m q, R_n k> depends only on m - n
    q, k = torch.randn(D), torch.randn(D)
    seq_q, seq_k = q.expand(1, 12, 1, D), k.expand(1, 12, 1, D)
    rq, rk = rope(seq_q.contiguous())[0, :, 0], rope(seq_k.contiguous())[0, :, 0]
    torch.testing.assert_close((rq[7] * rk[4]).sum(), (rq[5] * rk[2]).sum())


def test_full_rotary_rotates_every_channel():
    D = 16
    x = torch.randn(1, 6, 2, D)
    y = tg.PartialRotary(D, D, 10000.0)(x)
    assert ((y[:, 1:] - x[:, 1:]).abs() > 1e-7).all()
    assert torch.equal(tg.PartialRotary(D, 0, 10000.0)(x), x)


def test_rotary_table_equals_rotation_by_explicit_positions():
    """cos/sin come from the tables by row index or by explicit positions, so rows and packed
    sequences (longer rows than the tables included) rotate bit-identically in any dtype the model is
    cast to; a row longer than the tables without positions computes them."""
    D, T = 16, 12
    rope = tg.PartialRotary(D, 8, 10000.0, table_len=T)
    x = torch.randn(2, T + 3, 3, D)
    positions = torch.arange(T)[None].expand(2, -1)
    assert torch.equal(rope(x[:, :T]), rope(x[:, :T], positions))
    packed = torch.cat((torch.arange(5), torch.arange(T - 2)))[None].expand(2, -1)  # a row of T + 3 tokens
    assert torch.equal(rope(x, packed)[:, 5:], rope(x[:, 5:]))
    rope64, x64 = tg.PartialRotary(D, 8, 10000.0, table_len=T).double(), x.double()
    assert torch.equal(rope64(x64[:, :T]), rope64(x64[:, :T], positions))
    torch.testing.assert_close(rope(x)[:, :T], rope(x[:, :T]), rtol=0, atol=1e-6)


def test_model_uses_rope_dims():
    model = small_model()
    assert all(b.attn.rotary.dims == 8 for b in model.blocks)
    assert model.blocks[0].attn.head_dim == 16


# ----------------------------------------------------------------------------- 5. document isolation
def doc_batch():
    # row 0: documents [0,16) [16,30) [30,48); row 1: [0,20) [20,48)
    return tokens(B=2, T=48, seed=3, bos_at=[(0, 16), (0, 30), (1, 20)])


def perturbed(idx, row, lo, hi, seed=9):
    out = idx.clone()
    out[row, lo:hi] = torch.randint(2, 64, (hi - lo,), generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(out, idx)
    return out


@pytest.mark.parametrize("training", [False, True])
def test_document_isolation(training):
    model = small_model().train(training)
    idx = doc_batch()
    with torch.no_grad():
        ref = model.logits(idx)
        earlier = model.logits(perturbed(idx, 0, 1, 16))   # previous document, same row
        later = model.logits(perturbed(idx, 0, 31, 48))    # next document, same row
        other_row = model.logits(perturbed(idx, 1, 1, 48))  # another row
    target = slice(16, 30)
    for out in (earlier, later, other_row):
        assert torch.equal(out[0, target], ref[0, target])
    assert not torch.allclose(earlier[0, :16], ref[0, :16])  # the perturbation itself did something


def test_no_doc_isolation_leaks_across_documents():
    on = small_model()
    model = small_model(DOC_ISOLATION=0).eval()
    copy_weights(on, model)
    idx = doc_batch()
    with torch.no_grad():
        ref = model.logits(idx)
        earlier = model.logits(perturbed(idx, 0, 1, 16))
        other_row = model.logits(perturbed(idx, 1, 1, 48))
    assert not torch.allclose(earlier[0, 16:30], ref[0, 16:30])  # the later document sees the earlier one
    assert torch.equal(other_row[0], ref[0])                     # rows stay separate sequences


# ----------------------------------------------------------------------------- 6. looping
def test_default_layer_order():
    cfg = parse_knobs(tg.KNOBS, {})
    assert (cfg.num_layers, cfg.num_loops, cfg.loop_start, cfg.loop_end) == (11, 2, 3, 5)
    assert tg.layer_order(cfg, True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert tg.layer_order(cfg, False) == list(range(11))
    assert tg.layer_order(cfg.replace(num_loops=0), True) == list(range(11))


def block_calls(model, idx):
    """Calls per physical layer, in call order (Attention runs once per virtual layer, parallel or not)."""
    calls = []
    handles = [b.attn.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model.logits(idx)
    for h in handles:
        h.remove()
    return calls


def test_looping_switch_and_eval_always_loops():
    model = small_model()
    idx = tokens(B=1, T=16)
    looped, unlooped = tg.layer_order(model.cfg, True), tg.layer_order(model.cfg, False)
    assert looped == [0, 1, 2, 1, 2, 3] and unlooped == [0, 1, 2, 3]
    model.train()
    model.looping = False
    assert block_calls(model, idx) == unlooped
    model.looping = True
    assert block_calls(model, idx) == looped
    model.eval()
    for flag in (False, True):
        model.looping = flag
        assert block_calls(model, idx) == looped
    # the loop really recomputes: a looped forward differs from an unlooped one
    model.train()
    with torch.no_grad():
        model.looping = False
        a = model.logits(idx)
        model.looping = True
        b = model.logits(idx)
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------- 7. zero-init gates
def test_zero_init_model_is_the_normed_embedding():
    model = small_model(randomise=False).eval()
    idx = tokens(bos_at=[(0, 11)])
    x = torch.randn(*idx.shape, 64)
    assert model.smear_lambda.item() == 0.0
    assert torch.equal(model.smear(x, idx), x)  # smear starts as the identity
    # skip gates start as an even mix: lerp(w * skip, x, sigmoid(0)) = 0.5 x + 0.5 w * skip, with w = 1
    assert torch.equal(torch.sigmoid(model.skip_gates), torch.full((3, 64), 0.5))
    assert torch.equal(model.skip_weights, torch.ones(3, 64))
    for b in model.blocks:
        assert torch.equal(torch.sigmoid(b.attn.gate_scale * b.attn.attn_gate_w), torch.full((4, 12), 0.5))
        assert not b.attn.proj.weight.any() and not b.mlp.proj.weight.any()
        assert torch.equal(b.resid_mix, torch.stack((torch.ones(64), torch.zeros(64))))
    seen = []

    def same(m, args, out):  # a serial block returns the stream; a parallel one its two branches
        seen.append(torch.equal(out, args[0]) if torch.is_tensor(out) else not any(t.any() for t in out))
    handles = [b.register_forward_hook(same) for b in model.blocks]
    with torch.no_grad():
        h = model.hidden(idx)
    for hd in handles:
        hd.remove()
    assert seen and all(seen)  # every serial block leaves the stream unchanged; parallel branches are 0
    # skips (0.5/0.5 lerp of x0 with x0) and the parallel lanes (scaled copies) keep the direction, so
    # the output is x0 normed once more (x0 = rms_norm(emb) is not exactly unit-rms: the embedding's
    # std 0.005 makes its mean square comparable to rms_norm's eps)
    x0 = tg.rms_norm(model.tok_emb(idx))
    torch.testing.assert_close(h, tg.rms_norm(x0), atol=1e-5, rtol=1e-5)


def test_zero_init_attention_gate_halves_each_head():
    cfg = cfg_of()
    torch.manual_seed(0)
    gated = tg.Attention(cfg, xsa=True)
    plain = tg.Attention(cfg_of(SPARSE_ATTN_GATE_ENABLED=0), xsa=True)
    with torch.no_grad():
        gated.proj.weight.normal_()
    assert not gated.attn_gate_w.any() and not hasattr(plain, "attn_gate_w")
    assert copy_weights(gated, plain) == []
    a = torch.randn(2, 24, 64)
    idx = tokens(B=2, T=24, bos_at=[(1, 9)])
    docs = doc_boundaries(idx, BOS_ID, True)
    with torch.no_grad():
        yg, yp = gated(a, docs), plain(a, docs)
    assert yp.abs().min() > 0
    torch.testing.assert_close(yg, 0.5 * yp, rtol=1e-6, atol=1e-7)
    # a non-zero gate weight: head h is scaled by sigmoid(scale * w_h . a[:GATE_WIDTH])
    with torch.no_grad():
        gated.attn_gate_w.normal_()
        gated.proj.weight.copy_(torch.eye(64))
        plain.proj.weight.copy_(torch.eye(64))
        yg, yp = gated(a, docs), plain(a, docs)
    g = torch.sigmoid(0.5 * a[..., :12] @ gated.attn_gate_w.T)  # [B, T, H]
    torch.testing.assert_close(yg.view(2, 24, 4, 16), yp.view(2, 24, 4, 16) * g[..., None])


@pytest.mark.parametrize("gates", ["zero", "random", "off"])
def test_skip_connection_mix(gates):
    """Decoder step d=1 of the looped order (block 2, second call) gets lerp(w1 * enc1, x, sigmoid(g1))."""
    model = small_model(SKIP_GATES_ENABLED=int(gates != "off")).eval()
    if gates == "zero":
        with torch.no_grad():
            model.skip_gates.zero_()
    ins, outs = {1: [], 2: []}, {1: [], 2: []}
    hs = [model.blocks[i].register_forward_pre_hook(lambda m, a, i=i: ins[i].append(a[0])) for i in (1, 2)]
    hs += [model.blocks[i].register_forward_hook(lambda m, a, o, i=i: outs[i].append(o)) for i in (1, 2)]
    with torch.no_grad():
        model.logits(tokens(B=1, T=16))
    for h in hs:
        h.remove()
    assert len(outs[1]) == len(ins[2]) == 2
    enc1, dec0, x_in = outs[1][0], outs[1][1], ins[2][1]
    skip = model.skip_weights[1] * enc1
    if gates == "off":
        expected = dec0 + skip
    else:
        s = torch.sigmoid(model.skip_gates[1])
        if gates == "zero":
            assert torch.equal(s, torch.full_like(s, 0.5))
        expected = s * dec0 + (1 - s) * skip
    torch.testing.assert_close(x_in, expected)
    if gates == "zero":
        torch.testing.assert_close(x_in, 0.5 * dec0 + 0.5 * skip)
        assert not torch.allclose(x_in, dec0 + skip)


# ----------------------------------------------------------------------------- 8. LeakyReLU(slope)^2
@pytest.mark.parametrize("slope", [0.5, 0.0])
def test_mlp_activation(slope):
    model = small_model(LEAKY_SLOPE=slope)
    mlp = model.blocks[0].mlp
    assert mlp.slope == slope
    got = {}
    h1 = mlp.fc.register_forward_hook(lambda m, a, o: got.__setitem__("pre", o))
    h2 = mlp.proj.register_forward_pre_hook(lambda m, a: got.__setitem__("act", a[0]))
    with torch.no_grad():
        mlp(torch.randn(3, 5, 64))
    h1.remove(), h2.remove()
    pre, act = got["pre"], got["act"]
    neg = pre < 0
    assert neg.any() and (~neg).any()
    torch.testing.assert_close(act[~neg], pre[~neg] ** 2)
    torch.testing.assert_close(act[neg], slope ** 2 * pre[neg] ** 2)
    if slope == 0:
        assert not act[neg].any()
    else:
        assert (act[neg] > 0).all()


# ----------------------------------------------------------------------------- 9. parallel lanes
def final_prenorm(model, idx, monkeypatch):
    """The argument of the model's last norm call in hidden(): the final lane before the norm."""
    seen = []
    real = tg.rms_norm

    def spy(x):
        seen.append(x)
        return real(x)
    monkeypatch.setattr(model, "norm", spy, raising=False)
    with torch.no_grad():
        h = model.hidden(idx)
    monkeypatch.undo()
    torch.testing.assert_close(h, real(seen[-1]))
    return seen[-1]


def test_parallel_final_lane(monkeypatch):
    idx = tokens(bos_at=[(0, 21)])
    models = {lane: small_model(PARALLEL_FINAL_LANE=lane).eval() for lane in ("attn", "mlp", "mean")}
    for m in models.values():
        copy_weights(models["attn"], m)
    pre = {lane: final_prenorm(m, idx, monkeypatch) for lane, m in models.items()}
    with torch.no_grad():
        hid = {lane: m.hidden(idx) for lane, m in models.items()}
    for a, b in (("attn", "mlp"), ("attn", "mean"), ("mlp", "mean")):
        assert not torch.allclose(hid[a], hid[b], atol=1e-3), (a, b)
    torch.testing.assert_close(pre["mean"], 0.5 * (pre["attn"] + pre["mlp"]))


def test_parallel_layer_feeds_mlp_its_own_lane():
    """In a parallel layer the MLP reads the MLP lane (here: the stream before the skip), not x + attn."""
    for start, parallel in ((3, True), (-1, False)):
        model = small_model(PARALLEL_START_LAYER=start).eval()
        assert (model.parallel_start == 3) == parallel
        prev_out, mlp_in = [], []
        hs = [model.blocks[3].mlp.register_forward_pre_hook(lambda m, a: mlp_in.append(a[0]))]
        # block 2's output (serial) is the stream entering virtual layer 5 (block 3)
        hs.append(model.blocks[2].register_forward_hook(lambda m, a, o: prev_out.append(o)))
        with torch.no_grad():
            model.logits(tokens(B=1, T=16))
        for h in hs:
            h.remove()
        b3 = model.blocks[3]
        expect_parallel = tg.rms_norm(prev_out[-1]) * b3.norm_scale
        assert len(mlp_in) == 1
        if parallel:
            torch.testing.assert_close(mlp_in[0], expect_parallel)
        else:
            assert not torch.allclose(mlp_in[0], expect_parallel, atol=1e-3)


# ----------------------------------------------------------------------------- 10. optimizer grouping
def test_param_kind_groups():
    model = small_model(randomise=False)
    kinds = {name: tg.param_kind(name, p) for name, p in model.named_parameters()}
    matrix = {n for n, k in kinds.items() if k == "matrix"}
    expected = {f"blocks.{i}.{m}.weight" for i in range(4)
                for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")}
    assert matrix == expected
    assert {n for n, k in kinds.items() if k == "embed"} == {"tok_emb.weight"}
    scalar = {n for n, k in kinds.items() if k == "scalar"}
    assert scalar == set(kinds) - matrix - {"tok_emb.weight"}
    for name in ("smear_gate.weight", "smear_lambda", "skip_weights", "skip_gates", "parallel_post_lambdas",
                 "parallel_resid_lambdas", "blocks.0.attn.attn_gate_w", "blocks.0.attn.q_gain",
                 "blocks.0.resid_mix", "blocks.0.attn_scale", "blocks.0.mlp_scale"):
        assert kinds[name] == "scalar", name
    assert set(kinds.values()) == {"matrix", "embed", "scalar"}


# ----------------------------------------------------------------------------- 11. backends
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("isolate", [True, False])
def test_flex_matches_sdpa_on_cpu(isolate):
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = small_model(DOC_ISOLATION=int(isolate)).eval()
    idx = tokens(B=2, T=40, bos_at=[(0, 13), (1, 25)])
    sdpa = doc_boundaries(idx, BOS_ID, isolate)
    flex = doc_boundaries(idx, BOS_ID, isolate, backend="flex")
    assert sdpa.backend == "sdpa" and flex.backend == "flex"
    with torch.no_grad():
        a = model.logits(idx, sdpa)
        b = model.logits(idx, flex)
        c = model.logits(idx)
    assert torch.equal(a, c)  # the default on CPU is the SDPA path
    assert a.abs().max() > 1e-2
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- 12. compile modes
@pytest.mark.parametrize("looping", [False, True])
def test_blocks_mode_runs_everything_through_the_region(looping, monkeypatch):
    """COMPILE_MODE=blocks: the forward calls `call` for the input, every layer (skip and lane mixing
    included) and the loss, so nothing but Python runs between compiled graphs; same loss and grads."""
    torch._dynamo.reset()
    idx = tokens(B=2, T=40, bos_at=[(0, 13)])
    targets = torch.roll(idx, -1, dims=1)
    results = []
    for mode in (None, "blocks"):
        model = small_model(seed=3).train()
        model.looping = looping
        calls = []
        if mode:
            real = tg.torch.compile
            monkeypatch.setattr(tg.torch, "compile", lambda fn, **kw: (lambda *a: calls.append(a[0]) or
                                                                       real(fn, **kw)(*a)))
        fwd = tg.compile_model(model, mode, backend="eager") if mode else model
        loss = fwd(idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, calls))
        monkeypatch.undo()
    (loss_e, grads_e, _), (loss_b, grads_b, calls) = results
    assert torch.equal(loss_b, loss_e)
    for name, g in grads_e.items():
        assert torch.equal(grads_b[name], g), name
    order = tg.layer_order(cfg_of(), looping)
    names = [getattr(c, "__name__", type(c).__name__) for c in calls]
    n_enc = len(order) // 2
    assert names == (["stream_input"] + ["Block"] * n_enc + ["serial_decoder_layer"] * (len(order) - n_enc - 1)
                     + ["parallel_decoder_layer", "stream_output", "loss"])
    assert model.regions is None  # set only for the duration of a call: TTT runs the eager model


def test_blocks_mode_compiles_fullgraph():
    torch._dynamo.reset()
    model = small_model(seed=4).train()
    idx = tokens(B=2, T=40, bos_at=[(1, 9)])
    fwd = tg.compile_model(model, "blocks", backend="eager")
    with torch.no_grad():
        ref = model(idx, torch.roll(idx, -1, dims=1))
        assert torch.equal(fwd(idx, torch.roll(idx, -1, dims=1)), ref)
    with pytest.raises(tg.KnobError, match="COMPILE_MODE='graph'"):
        tg.compile_model(model, "graph")


def test_blocks_mode_graph_count_at_the_defaults():
    """Both training phases of the default model compile 7 graphs in blocks mode: the input, the
    encoder block, serial and parallel decoder layers (with a skip), the last layer (no skip), the
    output norm and the loss. A tensor passed twice to one call, or a guard on state that changes
    after the first trace, would add graphs (and compile time) without a failure anywhere else."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tg.GPT(parse_knobs(tg.KNOBS, {"TRAIN_SEQ_LEN": "128"}))
    fwd = tg.compile_model(model, "blocks", backend="eager")
    idx = torch.randint(1, 8192, (1, 128), generator=torch.Generator().manual_seed(0))
    for looping in (False, True, False):
        model.looping = looping
        fwd(idx, idx).backward()
    assert counters["stats"]["unique_graphs"] == 7
