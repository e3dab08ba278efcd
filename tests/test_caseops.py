"""CaseOps: the reversible case transform, its tokenizer, shards and byte sidecar (SPEC.md 3 and 5)."""
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from data import caseops, tokenizer as tok
from data.__main__ import main
from data.bytecount import piece_tables, token_bytes
from data.docs import decode_shards, read_bin, read_jsonl, write_jsonl
from data.encode import encode_documents_caseops
from data.shards import BOS_ID, load_shard, split_documents
from golf.bpb import BpbMeter, load_byte_sidecar

T, A, C, E = caseops.TITLE, caseops.ALLCAPS, caseops.CAP, caseops.ESC
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SP1024 = SAMPLE / "tokenizers" / "fineweb_1024_bpe.model"
VOCAB = 400

# Characters chosen for their case behaviour: one-to-one pairs, letters whose lower/upper is longer
# or maps elsewhere (left alone), titlecase digraphs, letters whose UTF-8 length changes with case,
# supplementary-plane cased letters, uncased scripts, marks, digits, whitespace, the controls.
POOL = list("aAbBzZ iI\t\n.,'-0123456789") + [
    "ß", "ẞ", "İ", "ı", "ǅ", "Ǆ", "ǆ", "ǈ", "ς", "σ", "Σ", "ΐ", "é", "É", "Ⱥ", "ⱥ", "ɐ", "Ɐ", "ﬁ", "ŉ",
    "\u212a", "\u2126", "Ａ", "ａ", "\u0345", "\u0301", "Я", "я", "Ꭰ", "ꭰ", "𐐀", "𐐨", "𞤀", "日", "本", "😀", "ا",
    "Ⅻ", "ⓐ", "Ⓐ", "²", "_", "\u00a0", "\u2581", "\x00", "\ue004", "\uf8ff", T, A, C, E,
]
WORDS = ["the", "The", "THE", "iPhone", "McDonald", "a", "A", "I", "NASA", "eBay", "straße", "STRAßE",
         "İstanbul", "ǅemal", "ΟΔΟΣ", "Οδός", "ıI", "Ⱥpple", "ȺȺ", "𐐀𐐨", "HELLOs", "x" + T + "Y"]


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randrange(0, 12)):
        if rng.random() < 0.5:
            parts.append(rng.choice(WORDS))
        else:
            parts.append("".join(rng.choice(POOL) for _ in range(rng.randrange(1, 8))))
        parts.append(rng.choice(["", " ", " ", "  ", "\n", ". ", "-"]))
    return "".join(parts)


def utf8_len(s: str) -> int:
    return len(s.encode("utf-8"))


# ---------------------------------------------------------------- the transform


@pytest.mark.parametrize("text, encoded", [
    ("", ""),
    ("   \n\t ", "   \n\t "),
    ("hello world", "hello world"),
    ("Hello World", T + "hello" + T + " world"),
    ("NASA", A + "nasa"),
    ("I", T + "i"),
    ("AB", A + "ab"),
    ("iPhone", "i" + C + "phone"),
    ("McDonald", T + "mc" + C + "donald"),
    ("HELLOs", T + "h" + C + "e" + C + "l" + C + "l" + C + "os"),
    ("NASA and Paris", A + "nasa and" + T + " paris"),
    ("\nParis", "\n" + T + "paris"),
    ("DON'T", A + "don'" + T + "t"),
    ("MP3", A + "mp3"),
    ("STRAßE", A + "straße"),      # ß has no one-letter uppercase: left alone inside the ALLCAPS word
    ("İstanbul", "İstanbul"),      # İ lowercases to two characters: left alone
    ("ǅemal", "ǅemal"),            # titlecase digraph: no one-to-one lowercase
    ("Οδός ΟΔΟΣ", T + "οδός" + A + " οδοσ"),
    ("ı", "ı"),
    (T, E + T),
    (E, E + E),
    (" " + T + " X", " " + E + T + T + " x"),
    ("a\ue004b", "a\ue004b"),      # other Private Use characters are not controls
])
def test_examples(text, encoded):
    assert caseops.encode(text) == encoded
    assert caseops.decode(encoded) == text


def test_controls_are_private_use_and_distinct():
    import unicodedata
    assert len(set(caseops.CONTROLS)) == 4
    assert all(unicodedata.category(c) == "Co" and not c.isalpha() for c in caseops.CONTROLS)


def test_random_round_trip():
    rng = random.Random(1234)
    for _ in range(4000):
        text = random_text(rng)
        enc = caseops.encode(text)
        assert caseops.decode(enc) == text, repr(text)
        counts = caseops.byte_counts(enc)
        assert len(counts) == len(enc) and sum(counts) == utf8_len(text)
        weights = caseops.byte_weights(enc)
        assert weights.size == utf8_len(enc) and int(weights.sum()) == utf8_len(text)
        assert not weights.size or weights.min() >= 0


def test_lone_surrogates_round_trip():
    for text in ["\ud800", "A\udfffB", "x\ud83dY Z"]:
        assert caseops.decode(caseops.encode(text)) == text


def test_every_code_point_round_trips():
    """Each character alone, glued into long words, and as a word after a space and an uppercase."""
    cps = [cp for cp in range(sys.maxunicode + 1) if not 0xD800 <= cp <= 0xDFFF]
    for i in range(0, len(cps), 8192):
        chars = [chr(cp) for cp in cps[i:i + 8192]]
        for text in ("".join(chars), " ".join(chars), "".join("A" + c + " " for c in chars[::7])):
            assert caseops.decode(caseops.encode(text)) == text


def test_case_tables_are_one_to_one():
    to_lower, to_upper, _ = caseops._tables()
    assert len(to_lower) == len(to_upper) > 1000
    for u, l in to_lower.items():
        assert to_upper[ord(l)] == chr(u) and chr(u).lower() == l and l.upper() == chr(u)
    for c in "ßİıǅς\u0345ŉ\u212a":
        assert not caseops.is_upper(c) and not caseops.is_lower(c)
    assert caseops.is_upper("Σ") and caseops.is_lower("σ") and caseops.is_upper("𐐀")


def test_decode_accepts_any_string():
    """Markers with nothing to apply to are dropped; the byte counts always sum to the decoded size."""
    assert caseops.decode(T) == caseops.decode(A) == caseops.decode(E) == ""
    assert caseops.decode(T + "1") == "1" and caseops.decode(A + " .") == " ." and caseops.decode(C + " a") == " a"
    rng = random.Random(99)
    pool = POOL + [T, A, C, E] * 5
    for _ in range(4000):
        s = "".join(rng.choice(pool) for _ in range(rng.randrange(0, 25)))
        dec = caseops.decode(s)
        assert sum(caseops.byte_counts(s)) == utf8_len(dec)
        assert int(caseops.byte_weights(s).sum()) == utf8_len(dec)
        assert caseops.decode(caseops.encode(dec)) == dec


def test_byte_attribution():
    """Controls count 0; a restored letter counts its original UTF-8 length, here shorter than the
    lowercase letter it is written as (Ⱥ is 2 bytes, ⱥ 3), on the last byte."""
    enc = caseops.encode("Ⱥb")
    assert enc == T + "ⱥb"
    assert caseops.byte_counts(enc) == [0, 2, 1]
    assert caseops.byte_weights(enc).tolist() == [0, 0, 0, 1, 0, 1, 1]
    enc = caseops.encode("ÉCOLE " + T)
    assert caseops.byte_counts(enc) == [0, 2, 1, 1, 1, 1, 1, 0, 3]
    assert caseops.byte_weights("abc").tolist() == [1, 1, 1]


# ---------------------------------------------------------------- tokenizer, shards, sidecar

TRICKY = [
    "Hello  World\n\nTHE END  ",
    "   leading spaces, ＦＵＬＬＷＩＤＴＨ and the ﬁ ligature; ǅemal, İstanbul, ΟΔΟΣ Οδός, STRAßE, ıI",
    "literal controls \ue000\ue001\ue002\ue003 and \ue003 and an escape at the end \ue003",
    "iPhone McDonald's NASA-X a I O'NEIL 'Quoted' Ⱥpple ȺȺ 𐐀𐐨 Deseret",
    "Привет МИР, こんにちは 世界, مرحبا, Ελληνικά ΑΘΗΝΑ 😀",
    "only lowercase and digits 12345 here",
    "A",
    "",
    "   \n ",
    "Tab\tSeparated\tVALUES\r\nline Two",
]


@pytest.fixture(scope="module")
def sample_docs():
    sp = tok.load(SP1024)
    val = read_bin(SAMPLE / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin", sp)
    train = read_bin(SAMPLE / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin", sp)
    return val[:30], train[:110]


@pytest.fixture(scope="module")
def built(sample_docs, tmp_path_factory):
    """A tiny CaseOps build: val = the tricky documents + 30 sample documents, train = 110 more."""
    val, train = sample_docs
    d = tmp_path_factory.mktemp("caseops")
    docs = TRICKY + val + train
    write_jsonl(d / "docs.jsonl", docs)
    assert main(["build", str(d / "docs.jsonl"), "--caseops", "--vocab-size", str(VOCAB),
                 "--val-docs", str(len(TRICKY) + len(val)), "--out", str(d / "out"), "--workers", "2",
                 "--tokenizer-sentences", "20000", "--seed", "3"]) == 0
    ds = d / "out" / "datasets" / f"fineweb10B_sp{VOCAB}_caseops"
    ref = tok.load(SP1024)
    return {
        "dir": d, "out": d / "out", "docs": docs, "n_val": len(TRICKY) + len(val),
        "model": d / "out" / "tokenizers" / f"fineweb_{VOCAB}_caseops.model",
        "train": sorted(ds.glob("fineweb_train_0*.bin")), "val": sorted(ds.glob("fineweb_val_0*.bin")),
        "sidecar": sorted(ds.glob("fineweb_val_bytes_*.bin")),
        # the original text of a document: what the tokenizer's normalizer makes of it
        "original": [tok.normalized_text(ref, t) for t in docs],
    }


def test_tokenizer_reserves_controls(built):
    ours, official = model_pb2.ModelProto(), model_pb2.ModelProto()
    ours.ParseFromString(built["model"].read_bytes())
    official.ParseFromString(SP1024.read_bytes())
    assert [p.piece for p in ours.pieces[:8]] == ["<pad>", "<s>", "</s>", "<unk>", *caseops.CONTROLS]
    assert all(p.type == model_pb2.ModelProto.SentencePiece.USER_DEFINED for p in ours.pieces[4:8])
    assert list(ours.trainer_spec.user_defined_symbols) == list(caseops.CONTROLS)
    for field in model_pb2.TrainerSpec.DESCRIPTOR.fields:
        if field.name not in tok.RUN_FIELDS | {"user_defined_symbols"}:
            assert getattr(ours.trainer_spec, field.name) == getattr(official.trainer_spec, field.name), field.name
    assert ours.normalizer_spec == official.normalizer_spec and len(ours.pieces) == VOCAB
    sp = tok.load(built["model"])
    assert tok.is_caseops_processor(sp) and not tok.is_caseops_processor(tok.load(SP1024))
    for i, c in enumerate(caseops.CONTROLS):
        assert sp.encode(c) == [4 + i]
    assert sp.encode(caseops.encode("Hello there, NASA")).count(4) == 1


def test_val_sidecar_counts_original_bytes(built):
    sp = tok.load(built["model"])
    tokens = np.concatenate([load_shard(p) for p in built["val"]])
    counts = load_byte_sidecar(str(built["sidecar"][0].parent / "fineweb_val_bytes_*.bin"), tokens.size)
    docs = split_documents(tokens)
    assert len(docs) == built["n_val"]
    pos = 0
    for i, d in enumerate(docs):
        original = built["original"][i]
        if i >= len(TRICKY):
            assert original == built["docs"][i]  # sample documents are already normalized
        assert caseops.decode(sp.decode(d[1:].tolist())) == original, repr(original)
        assert int(counts[pos:pos + d.size].sum()) == utf8_len(original), repr(original)
        assert counts[pos] == 0 and d[0] == BOS_ID
        pos += d.size
    assert sum(d.startswith(T) or f" {T}" in d for d in (caseops.encode(o) for o in built["original"]))


def test_train_shards_decode_to_originals(built):
    train = list(decode_shards([str(p) for p in built["train"]], tok.load(built["model"])))
    assert sorted(train) == sorted(built["original"][built["n_val"]:])


def test_bpb_from_sidecar_equals_bpb_on_original_bytes(built):
    """Fixed per-token losses: bpb with sidecar bytes == the same nats over the original UTF-8 size."""
    tokens = np.concatenate([load_shard(p) for p in built["val"]]).astype(np.int64)
    sidecar = load_byte_sidecar(str(built["sidecar"][0].parent / "fineweb_val_bytes_*.bin"), tokens.size)
    rng = np.random.default_rng(0)
    table = torch.from_numpy(rng.uniform(0.5, 9.0, VOCAB))
    targets = torch.from_numpy(tokens[1:])
    nats = table[targets]
    meter = BpbMeter("cpu")
    for lo in range(0, targets.numel(), 7777):  # uneven windows, as an evaluator walks the stream
        meter.update(nats[lo:lo + 7777], torch.from_numpy(sidecar[1 + lo:1 + lo + 7777].astype(np.int64)))
    val_bytes = sum(utf8_len(t) for t in built["original"][:built["n_val"]])
    assert meter.bytes == val_bytes
    loss, bpb = meter.result()
    assert bpb == pytest.approx(float(nats.sum()) / math.log(2) / val_bytes, rel=1e-12)
    assert loss == pytest.approx(float(nats.mean()), rel=1e-12)


def test_unchanged_text_gets_the_piece_byte_rule(built, sample_docs):
    """Without uppercase letters or controls the sidecar is exactly SPEC section 3's piece rule."""
    docs = [t.lower() for t in sample_docs[0]]
    docs = [t for t in docs if not caseops._tables()[2].search(t)]
    model = built["model"].read_bytes()
    tables = piece_tables(tok.load(model))
    for arr, counts, changed in encode_documents_caseops(docs, model, workers=1):
        assert changed == 0
        np.testing.assert_array_equal(counts, token_bytes(arr, tables))


def test_decode_command_gives_original_text(built, tmp_path):
    out = tmp_path / "val.jsonl"
    assert main(["decode", *map(str, built["val"]), "--tokenizer", str(built["model"]), "--out", str(out)]) == 0
    assert list(read_jsonl(out)) == built["original"][:built["n_val"]]


def test_tokenizer_kind_must_match(built, tmp_path, capsys):
    docs = built["dir"] / "docs.jsonl"
    assert main(["build", str(docs), "--caseops", "--tokenizer", str(SP1024), "--out", str(tmp_path)]) == 1
    assert "not a CaseOps tokenizer" in capsys.readouterr().err
    assert main(["build", str(docs), "--tokenizer", str(built["model"]), "--out", str(tmp_path)]) == 1
    assert "--caseops" in capsys.readouterr().err
    # reusing the CaseOps tokenizer gives the same val shard and sidecar
    assert main(["build", str(docs), "--caseops", "--tokenizer", str(built["model"]), "--no-shuffle",
                 "--val-docs", str(built["n_val"]), "--out", str(tmp_path / "again"), "--workers", "1"]) == 0
    again = tmp_path / "again" / "datasets" / f"fineweb10B_sp{VOCAB}_caseops"
    assert (again / "fineweb_val_000000.bin").read_bytes() == built["val"][0].read_bytes()
    assert (again / "fineweb_val_bytes_000000.bin").read_bytes() == built["sidecar"][0].read_bytes()


def test_tokenizer_command(built, tmp_path):
    """`tokenizer --caseops --seed` gives the same model in two processes (line sampling included)."""
    docs = tmp_path / "few.jsonl"
    write_jsonl(docs, [t.replace(". ", ".\n") for t in built["docs"][len(TRICKY):len(TRICKY) + 60]])
    models = []
    for run in ("a", "b"):
        subprocess.run([sys.executable, "-m", "data", "tokenizer", str(docs), "--caseops", "--vocab-size", "350",
                        "--out", str(tmp_path / run), "--seed", "1", "--tokenizer-sentences", "400"],
                       cwd=REPO, check=True, capture_output=True)
        models.append((tmp_path / run / "tokenizers" / "fineweb_350_caseops.model").read_bytes())
    assert models[0] == models[1]
    assert tok.is_caseops_model(models[0]) and tok.load(models[0]).get_piece_size() == 350
    assert main(["tokenizer", str(docs), "--vocab-size", "350", "--out", str(tmp_path)]) == 0
    assert not tok.is_caseops_model(tmp_path / "tokenizers" / "fineweb_350_bpe.model")


def test_benchmark_caseops_options(built, tmp_path, capsys):
    from data.benchmark import check_counts, source_files
    src = tmp_path / "src"
    for rel in ["fineweb/sp1024/fineweb_train_000000.bin", "fineweb/docs/fineweb_docs.jsonl.xz",
                "debmix/train.jsonl.xz", "fineweb/sp1024/fineweb_val_000000.bin",
                "fineweb/tokenizers/fineweb_1024_bpe.model"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"")
    assert "tokenizer" not in source_files(src, 8192, caseops=True)  # no shared CaseOps tokenizer needed
    assert main(["benchmark-set", "--vocab", "8192", "--caseops", "--tokenizer", str(built["model"]),
                 "--sources", str(src), "--out", str(tmp_path / "o")]) == 1
    assert f"has {VOCAB} pieces, not --vocab 8192" in capsys.readouterr().err
    assert main(["benchmark-set", "--vocab", "8192", "--tokenizer", str(built["model"]),
                 "--sources", str(src), "--out", str(tmp_path / "o")]) == 1
    assert "--tokenizer is for --caseops" in capsys.readouterr().err
    check_counts(33_817, 47_206_223, 8192, caseops=True)
    check_counts(33_817, 67_902_420, 1024, caseops=True)
    check_counts(33_817, None, 8192, caseops=True)  # a tokenizer from elsewhere: documents only
    with pytest.raises(RuntimeError, match="expected 47.2M"):
        check_counts(33_817, 49_700_000, 8192, caseops=True)
    with pytest.raises(RuntimeError, match="documents"):
        check_counts(33_000, None, 8192, caseops=True)
