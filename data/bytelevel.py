"""A byte-level tokenizer for tokenizer ablations: every UTF-8 byte is a token (ids 4..259), after the
reference's four specials (<pad>, <s> = BOS 1, </s>, <unk>). It is a SentencePiece model with no pieces
but bytes, byte fallback on and an identity normalizer that keeps spaces as spaces, so the project's
shard builder, loader and byte counter (golf/bpb.py: a byte piece counts 1 byte) use it unchanged:

  python -m data byte-tokenizer --out .     # -> tokenizers/fineweb_byte260.model
  python -m data build docs.jsonl --tokenizer tokenizers/fineweb_byte260.model --name fineweb10B_byte260
  VOCAB_SIZE=260 TOKENIZER_PATH=... DATA_PATH=... torchrun ... train_gpt_v2.py
"""
from __future__ import annotations

import os
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as model_pb2

from .tokenizer import REFERENCE_MODEL, read_model

SPECIALS = 4  # <pad>, <s>, </s>, <unk> as in the reference model: BOS stays id 1
VOCAB_SIZE = SPECIALS + 256
FILE_NAME = f"fineweb_byte{VOCAB_SIZE}.model"


def byte_level_model(reference: str | os.PathLike = REFERENCE_MODEL) -> bytes:
    """The serialized model: the reference's specials and trainer settings, 256 byte pieces."""
    ref = read_model(reference)
    specials = [p for p in ref.pieces[:SPECIALS]]
    if [p.piece for p in specials] != ["<pad>", "<s>", "</s>", "<unk>"]:
        raise ValueError(f"{reference}: expected the specials <pad>, <s>, </s>, <unk> first, "
                         f"got {[p.piece for p in specials]}")
    m = model_pb2.ModelProto()
    m.CopyFrom(ref)
    del m.pieces[:]
    for p in specials:
        m.pieces.add(piece=p.piece, score=0.0, type=p.type)
    for b in range(256):
        m.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=model_pb2.ModelProto.SentencePiece.BYTE)
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.vocab_size = VOCAB_SIZE
    # identity text: no NFKC, no dummy prefix, spaces kept as the byte 0x20 (not "▁", 3 bytes)
    for spec in (m.normalizer_spec, m.denormalizer_spec):
        spec.name, spec.precompiled_charsmap = "identity", b""
        spec.add_dummy_prefix = spec.remove_extra_whitespaces = spec.escape_whitespaces = False
    return m.SerializeToString()


def write_byte_level_tokenizer(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Writes <out>/tokenizers/fineweb_byte260.model; refuses to replace a different file."""
    path = Path(out) / "tokenizers" / FILE_NAME
    data = byte_level_model()
    if path.exists() and path.read_bytes() != data and not overwrite:
        raise FileExistsError(f"{path} exists and differs from the byte-level model; pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
