"""The byte-level tokenizer (data/bytelevel.py): every UTF-8 byte one token, exact round trips, bpb
bytes equal to raw UTF-8 lengths, and shards built by the ordinary builder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm

from data.build import build
from data.bytelevel import SPECIALS, VOCAB_SIZE, byte_level_model, write_byte_level_tokenizer
from data.shards import BOS_ID, load_stream
from golf.bpb import ByteCounter

TEXTS = ["Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n", "Grüße, 東京, ✓ 😀",
         "\ue000\ue001 private use and \x00\x01 controls", ""]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return write_byte_level_tokenizer(tmp_path_factory.mktemp("bt"))


def test_every_byte_is_one_token_and_decoding_is_exact(model_file):
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    assert sp.vocab_size() == VOCAB_SIZE == 260 and sp.bos_id() == BOS_ID
    for text in TEXTS:
        ids = sp.encode(text)
        assert ids == [SPECIALS + b for b in text.encode("utf-8")], text
        assert sp.decode(ids) == text


def test_bpb_bytes_are_the_raw_utf8_lengths(model_file):
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    counter = ByteCounter.from_tokenizer(str(model_file), VOCAB_SIZE)
    stream = np.array([t for text in TEXTS for t in [BOS_ID] + sp.encode(text)], dtype=np.int64)
    per_token = counter.stream_bytes(stream)
    assert int(per_token.sum()) == sum(len(t.encode("utf-8")) for t in TEXTS)
    assert set(per_token[stream == BOS_ID].tolist()) == {0}  # a BOS carries no bytes


def test_the_model_is_deterministic_and_not_silently_replaced(tmp_path, model_file):
    assert byte_level_model() == model_file.read_bytes()
    path = write_byte_level_tokenizer(tmp_path)
    path.write_bytes(b"other")
    with pytest.raises(FileExistsError, match="differs from the byte-level model"):
        write_byte_level_tokenizer(tmp_path)
    assert write_byte_level_tokenizer(tmp_path, overwrite=True).read_bytes() == model_file.read_bytes()


def test_the_shard_builder_uses_it_unchanged(tmp_path, model_file):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:4]), encoding="utf-8")
    build([str(docs)], tmp_path / "out", tokenizer=str(model_file), val_docs=1, seed=None, workers=1,
          dataset_name="bytes", log=lambda *a: None)
    val = load_stream(str(tmp_path / "out" / "datasets" / "bytes" / "fineweb_val_*.bin"))
    assert val.tolist() == [BOS_ID] + [SPECIALS + b for b in TEXTS[0].encode("utf-8")]
