"""`build` / `decode` on real documents: tokenizer settings, round trips, splits, shuffling, sidecars."""
import itertools
import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from data.__main__ import main
from data.docs import decode_shards, read_jsonl
from data.shards import BOS_ID, load_shard, split_documents

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OFFICIAL_1024 = SHARED / "fineweb" / "tokenizers" / "fineweb_1024_bpe.model"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data beside the checkout")

N_FINEWEB, N_DEBMIX, N_VAL, VOCAB = 240, 80, 40, 512
# Trainer fields about the input or the run, which legitimately differ from the official model's.
RUN_FIELDS = {"input", "input_format", "model_prefix", "vocab_size", "input_sentence_size",
              "shuffle_input_sentence", "num_threads", "training_sentence_size", "mining_sentence_size"}


def head(path, n):
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, n)]


def normalized(sp, text):
    """What SentencePiece makes of a text (NFKC, whitespace collapsed): decode(encode(t)) must equal it."""
    return sp.normalize(text).replace("\u2581", " ")


def decoded(paths, model):
    return list(decode_shards([str(p) for p in paths], spm.SentencePieceProcessor(model_file=str(model))))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A plain .jsonl of FineWeb documents and a .jsonl.xz of debmix documents."""
    d = tmp_path_factory.mktemp("inputs")
    fineweb = head(SHARED / "fineweb" / "docs" / "fineweb_docs.jsonl.xz", N_FINEWEB)
    debmix = head(SHARED / "debmix" / "train.jsonl.xz", N_DEBMIX)
    (d / "fineweb.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(fineweb)))
    with lzma.open(d / "debmix.jsonl.xz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t, "src": "x"}) + "\n" for t in debmix)
    return [d / "fineweb.jsonl", d / "debmix.jsonl.xz"], fineweb + debmix


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    paths, _ = inputs
    out = tmp_path_factory.mktemp("built")
    assert main(["build", *map(str, paths), "--vocab-size", str(VOCAB), "--val-docs", str(N_VAL),
                 "--out", str(out), "--byte-sidecar", "--shard-tokens", "300000", "--seed", "7",
                 "--tokenizer-sentences", "20000"]) == 0
    ds = out / "datasets" / f"fineweb10B_sp{VOCAB}"
    return {
        "out": out, "model": out / "tokenizers" / f"fineweb_{VOCAB}_bpe.model",
        "train": sorted(ds.glob("fineweb_train_*.bin")), "val": sorted(ds.glob("fineweb_val_0*.bin")),
        "sidecar": sorted(ds.glob("fineweb_val_bytes_*.bin")),
    }


def test_tokenizer_has_official_settings(built):
    ours, official = model_pb2.ModelProto(), model_pb2.ModelProto()
    ours.ParseFromString(built["model"].read_bytes())
    official.ParseFromString(OFFICIAL_1024.read_bytes())
    for field in model_pb2.TrainerSpec.DESCRIPTOR.fields:
        if field.name not in RUN_FIELDS:
            assert getattr(ours.trainer_spec, field.name) == getattr(official.trainer_spec, field.name), field.name
    assert ours.trainer_spec.model_type == model_pb2.TrainerSpec.BPE and ours.trainer_spec.byte_fallback
    assert ours.normalizer_spec == official.normalizer_spec  # nmt_nfkc table included
    assert ours.normalizer_spec.name == "nmt_nfkc" and not ours.normalizer_spec.add_dummy_prefix
    assert ours.denormalizer_spec == official.denormalizer_spec
    assert [p.piece for p in ours.pieces[:4]] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert len(ours.pieces) == VOCAB


def test_layout_and_shard_sizes(built):
    assert [p.name for p in built["train"]][0] == "fineweb_train_000000.bin" and len(built["train"]) >= 2
    sizes = [load_shard(p).size for p in built["train"]]
    assert all(s == 300_000 for s in sizes[:-1]) and 0 < sizes[-1] <= 300_000
    assert load_shard(built["train"][0])[0] == BOS_ID and load_shard(built["val"][0])[0] == BOS_ID


def test_round_trip_and_val_split(built, inputs):
    _, docs = inputs
    sp = spm.SentencePieceProcessor(model_file=str(built["model"]))
    expected = [normalized(sp, t) for t in docs]
    val = decoded(built["val"], built["model"])
    train = decoded(built["train"], built["model"])
    assert val == expected[:N_VAL]  # the first documents, in input order
    assert len(train) == len(docs) - N_VAL
    assert sorted(train) == sorted(expected[N_VAL:])
    assert train != expected[N_VAL:]  # shuffled


def test_decode_command(built, inputs, tmp_path):
    _, docs = inputs
    out = tmp_path / "val.jsonl.xz"
    assert main(["decode", *map(str, built["val"]), "--tokenizer", str(built["model"]), "--out", str(out)]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(built["model"]))
    assert list(read_jsonl(out)) == [normalized(sp, t) for t in docs[:N_VAL]]


def test_decode_refuses_sidecar(built, tmp_path, capsys):
    assert main(["decode", str(built["sidecar"][0]), "--tokenizer", str(built["model"]),
                 "--out", str(tmp_path / "x.jsonl")]) == 1
    assert "byte sidecar" in capsys.readouterr().err


def test_byte_sidecar_counts_decoded_utf8(built):
    sp = spm.SentencePieceProcessor(model_file=str(built["model"]))
    tokens = np.concatenate([load_shard(p) for p in built["val"]])
    counts = np.concatenate([load_shard(p) for p in built["sidecar"]])
    assert counts.shape == tokens.shape
    starts = np.flatnonzero(tokens == BOS_ID)
    ends = np.append(starts[1:], tokens.size)
    for s, e in zip(starts, ends):
        text = sp.decode(tokens[s + 1:e].tolist())
        assert int(counts[s:e].sum()) == len(text.encode("utf-8"))
    assert not counts[starts].any()  # BOS carries no bytes


def test_shuffle_is_seeded(built, inputs, tmp_path):
    paths, docs = inputs
    def run(name, *extra):
        out = tmp_path / name
        assert main(["build", *map(str, paths), "--tokenizer", str(built["model"]), "--out", str(out),
                     "--workers", "2", *extra]) == 0
        return out / "datasets" / f"fineweb10B_sp{VOCAB}" / "fineweb_train_000000.bin"
    a, b, c, d = run("a", "--seed", "1"), run("b", "--seed", "1"), run("c", "--seed", "2"), run("d", "--no-shuffle")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(built["model"]))
    assert sorted(decoded([a], built["model"])) == sorted(decoded([c], built["model"]))
    assert decoded([d], built["model"]) == [normalized(sp, t) for t in docs]


def test_bin_input_reencodes_to_same_tokens(tmp_path):
    """An official shard as input, decoded per document and re-encoded, in input order."""
    shard = SHARED / "fineweb" / "sp1024" / "fineweb_train_000000.bin"
    assert main(["build", str(shard), "--tokenizer", str(OFFICIAL_1024), "--no-shuffle",
                 "--out", str(tmp_path)]) == 0
    ours = load_shard(tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin")
    np.testing.assert_array_equal(ours, load_shard(shard))
    assert (tmp_path / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == OFFICIAL_1024.read_bytes()


def test_official_val_decodes_and_reencodes(tmp_path):
    """decode then encode with the same tokenizer gives the official ids (first 300 documents)."""
    val = np.asarray(load_shard(SHARED / "fineweb" / "sp1024" / "fineweb_val_000000.bin"))
    docs = split_documents(val)[:300]
    sp = spm.SentencePieceProcessor(model_file=str(OFFICIAL_1024))
    texts = decoded([SHARED / "fineweb" / "sp1024" / "fineweb_val_000000.bin"], OFFICIAL_1024)
    assert len(texts) == 1621
    assert sp.encode(texts[:300]) == [d[1:].tolist() for d in docs]


def test_refuses_to_mix_with_old_shards(built, inputs, tmp_path, capsys):
    paths, _ = inputs
    args = ["build", str(paths[0]), "--tokenizer", str(built["model"]), "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 1 and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_clear_input_errors(tmp_path, capsys):
    shard = SHARED / "fineweb" / "sp1024" / "fineweb_train_000000.bin"
    assert main(["build", str(shard), "--vocab-size", "300", "--out", str(tmp_path)]) == 1
    assert "--bin-tokenizer" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert main(["build", str(bad), "--vocab-size", "300", "--out", str(tmp_path)]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_sample_is_small_and_valid():
    sample = Path(__file__).resolve().parents[1] / "data" / "sample"
    files = [p for p in sample.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 2_000_000
    ds = sample / "datasets" / "fineweb10B_sp1024"
    for split in ("train", "val"):
        tokens = load_shard(ds / f"fineweb_{split}_000000.bin")
        assert tokens[0] == BOS_ID and tokens.size > 50_000
    assert (sample / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == OFFICIAL_1024.read_bytes()


def test_benchmark_set_checks_sources_and_counts(tmp_path, capsys):
    from data.benchmark import check_counts
    (tmp_path / "fineweb").mkdir()
    assert main(["benchmark-set", "--vocab", "1024", "--sources", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "benchmark sources missing" in err and "debmix/train.jsonl.xz" in err
    check_counts(33_817, 69_897_117, 1024)
    with pytest.raises(RuntimeError, match="33,816 documents, expected 33,817"):
        check_counts(33_816, 69_897_117, 1024)
    with pytest.raises(RuntimeError, match="expected 49.7M within 2%"):
        check_counts(33_817, 47_000_000, 8192)


def test_byte_counts_of_official_val_match_text():
    """SPEC section 3's byte rule on the official SP1024 val shard: per document, the UTF-8 length."""
    from data.bytecount import piece_tables, token_bytes
    sp = spm.SentencePieceProcessor(model_file=str(OFFICIAL_1024))
    tokens = np.asarray(load_shard(SHARED / "fineweb" / "sp1024" / "fineweb_val_000000.bin"))
    counts = token_bytes(tokens, piece_tables(sp))
    docs = split_documents(tokens)[:200]
    pos = 0
    for d in docs:
        assert int(counts[pos:pos + d.size].sum()) == len(sp.decode(d[1:].tolist()).encode("utf-8"))
        pos += d.size
