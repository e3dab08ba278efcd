"""golf/bpb.py on the real validation documents: per-document byte sums must equal the UTF-8 size
of the decoded text (SPEC.md section 3), for SP1024 and for SP8192 re-encodings of the same text."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from data.shards import load_shard, split_documents, write_shard
from golf.bpb import BpbMeter, ByteCounter, load_byte_sidecar
from tests.gloo_ranks import free_port, gloo_group

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VAL = SHARED / "fineweb" / "sp1024" / "fineweb_val_000000.bin"
TOK = {v: SHARED / "fineweb" / "tokenizers" / f"fineweb_{v}_bpe.model" for v in (1024, 8192)}

needs_data = pytest.mark.skipif(
    not (VAL.exists() and all(p.exists() for p in TOK.values())), reason=f"real data missing under {SHARED}"
)


def _sp(v):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(TOK[v]))


@pytest.fixture(scope="module")
def val_docs():
    return split_documents(load_shard(VAL))


@pytest.fixture(scope="module")
def val_texts(val_docs):
    return _sp(1024).decode([d[1:].tolist() for d in val_docs])


def _doc_sums(counter, docs):
    """Per-document byte sums from one pass over the concatenated stream (prev of each target is
    the token before it; each document's BOS counts 0 and is the prev of its first real token)."""
    stream = np.concatenate(docs).astype(np.int64)
    t = torch.from_numpy(stream)
    per_target = counter.token_bytes(t[:-1], t[1:])
    assert per_target.dtype == torch.int32 and per_target.shape == t[1:].shape
    per_token = np.concatenate([[0], per_target.numpy()])  # align: entry i = bytes of token i
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    return np.add.reduceat(per_token.astype(np.int64), starts)


@needs_data
def test_sp1024_doc_bytes_match_decoded_text(val_docs, val_texts):
    assert len(val_docs) == 1621
    counter = ByteCounter.from_tokenizer(TOK[1024], vocab_size=1024)
    sums = _doc_sums(counter, val_docs)
    expected = np.array([len(t.encode("utf-8")) for t in val_texts])
    bad = np.flatnonzero(sums != expected)
    assert bad.size == 0, f"{bad.size} docs differ, first doc {bad[:1]}: {sums[bad[:1]]} vs {expected[bad[:1]]}"


@needs_data
def test_sp8192_reencoded_doc_bytes_match_decoded_text(val_texts):
    sp8 = _sp(8192)
    encoded = sp8.encode(val_texts)
    docs = [np.array([1] + ids, dtype=np.int64) for ids in encoded]
    counter = ByteCounter.from_tokenizer(TOK[8192], vocab_size=8192)
    sums = _doc_sums(counter, docs)
    expected = np.array([len(t.encode("utf-8")) for t in sp8.decode(encoded)])
    assert np.array_equal(sums, expected)


@needs_data
def test_hand_checked_cases():
    sp = _sp(1024)
    c = ByteCounter.from_tokenizer(TOK[1024])
    the, inn = sp.piece_to_id("\u2581the"), sp.piece_to_id("in")
    byte_e9 = sp.piece_to_id("<0xE9>")
    bos, eos, unk, pad = 1, 2, 3, 0

    def nb(prev, tgt):
        return int(c.token_bytes(torch.tensor([prev]), torch.tensor([tgt]))[0])

    assert nb(bos, the) == 3  # first word of a document: no space byte
    assert nb(inn, the) == 4  # " the"
    assert nb(the, inn) == 2
    assert nb(inn, byte_e9) == 1
    assert nb(byte_e9, the) == 4  # a byte token is not a control token
    for ctl in (bos, eos, unk, pad):
        assert nb(inn, ctl) == 0
    assert nb(unk, the) == 3  # unknown counts as control for the space rule


@needs_data
def test_token_bytes_shape_dtype_and_errors():
    c = ByteCounter.from_tokenizer(TOK[1024])
    prev = torch.randint(0, 1024, (3, 5), dtype=torch.int32)
    out = c.to("cpu").token_bytes(prev, prev.to(torch.int16))
    assert out.shape == (3, 5) and out.dtype == torch.int32
    with pytest.raises(ValueError, match="shape"):
        c.token_bytes(prev, prev[:, :2])
    with pytest.raises(ValueError, match=r"fineweb_1024_bpe\.model.*1024.*8192"):
        ByteCounter.from_tokenizer(TOK[1024], vocab_size=8192)


@needs_data
def test_sidecar_gives_same_bpb_as_luts(tmp_path, val_docs):
    tokens = np.asarray(load_shard(VAL))
    counter = ByteCounter.from_tokenizer(TOK[1024])
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", counter.stream_bytes(tokens))
    sidecar = load_byte_sidecar(str(tmp_path / "fineweb_val_bytes_*.bin"), expected_tokens=tokens.size)

    rng = np.random.default_rng(0)
    nats = torch.from_numpy(rng.uniform(0.0, 8.0, tokens.size - 1))
    t = torch.from_numpy(tokens.astype(np.int64))
    a, b = BpbMeter("cpu"), BpbMeter("cpu")
    # LUT path in uneven windows, the way an evaluator walks the stream.
    for lo in range(0, tokens.size - 1, 300_001):
        hi = min(lo + 300_001, tokens.size - 1)
        a.update(nats[lo:hi], counter.token_bytes(t[lo:hi], t[lo + 1:hi + 1]))
    b.update(nats, torch.from_numpy(sidecar[1:].astype(np.int64)))
    assert a.bytes == b.bytes == sum(len(s.encode()) for s in _sp(1024).decode([d[1:].tolist() for d in val_docs]))
    assert a.result() == pytest.approx(b.result(), rel=1e-12)


def test_sidecar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="sidecar"):
        load_byte_sidecar(str(tmp_path / "nothing_*.bin"))
    write_shard(tmp_path / "s_000000.bin", np.arange(10))
    with pytest.raises(ValueError, match="10 entries.*12 tokens"):
        load_byte_sidecar(str(tmp_path / "s_*.bin"), expected_tokens=12)
    bad = tmp_path / "t_000000.bin"
    bad.write_bytes((tmp_path / "s_000000.bin").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_byte_sidecar(str(bad))


def test_meter_float64_and_result():
    rng = np.random.default_rng(1)
    chunks = [rng.uniform(0, 10, n).astype(np.float32) for n in (1, 1000, 77777)]
    bytes_ = [rng.integers(0, 6, n) for n in (1, 1000, 77777)]
    m = BpbMeter("cpu")
    for n, b in zip(chunks, bytes_):
        m.update(torch.from_numpy(n).view(-1, 1), torch.from_numpy(b).to(torch.int32))
    tot_nats = math.fsum(float(x) for c in chunks for x in c)
    tot_bytes = int(sum(b.sum() for b in bytes_))
    assert m.tokens == 78778 and m.bytes == tot_bytes
    assert m.nats == pytest.approx(tot_nats, rel=1e-13)
    loss, bpb = m.result()
    assert loss == pytest.approx(tot_nats / 78778, rel=1e-13)
    assert bpb == pytest.approx(tot_nats / math.log(2) / tot_bytes, rel=1e-13)
    # float64 sums: a float32 running sum of a million 0.1s is visibly off, ours is not.
    m2 = BpbMeter("cpu")
    for _ in range(100):
        m2.update(torch.full((10_000,), 0.1, dtype=torch.float32), torch.ones(10_000))
    assert m2.nats == pytest.approx(1e6 * float(np.float32(0.1)), rel=1e-12)
    m2.all_reduce()  # not distributed: unchanged, and idempotent
    m2.all_reduce()
    assert m2.tokens == 1_000_000
    with pytest.raises(ValueError, match="same scored tokens"):
        m.update(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="nothing scored"):
        BpbMeter("cpu").result()


def test_meter_mask_counts_what_selecting_counts():
    rng = np.random.default_rng(2)
    nats = torch.from_numpy(rng.uniform(0, 10, (5, 48)))
    bytes_ = torch.from_numpy(rng.integers(0, 6, (5, 48)))
    mask = torch.from_numpy(rng.random((5, 48)) < 0.6)
    picked, masked = BpbMeter("cpu"), BpbMeter("cpu")
    picked.update(nats[mask], bytes_[mask])
    masked.update(nats, bytes_, mask)
    assert (masked.nats, masked.bytes, masked.tokens) == (picked.nats, picked.bytes, picked.tokens)
    with pytest.raises(ValueError, match="mask shape"):
        masked.update(nats, bytes_, mask[:, :47])


def _reduce_worker(rank, world, port, out_dir):
    with gloo_group(rank, world, port):
        m = BpbMeter("cpu")
        # Ranks score different amounts, so the mean of per-rank bpb would be wrong.
        n = 10 if rank == 0 else 30
        m.update(torch.full((n,), float(rank + 1)), torch.full((n,), rank + 2))
        m.all_reduce()
        m.all_reduce()  # idempotent
        torch.save(torch.tensor([m.nats, m.bytes, m.tokens], dtype=torch.float64), f"{out_dir}/r{rank}.pt")


def test_all_reduce_sums_across_two_processes(tmp_path):
    mp.spawn(_reduce_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    nats, nbytes, tokens = 10 * 1 + 30 * 2, 10 * 2 + 30 * 3, 40
    for r in range(2):
        got = torch.load(tmp_path / f"r{r}.pt").tolist()
        assert got == [nats, nbytes, tokens]
