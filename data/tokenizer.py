"""SentencePiece tokenizers with the official challenge settings.

The trainer and normalizer settings are read from a reference model (the official SP1024 tokenizer,
embedded in data/sample/) rather than retyped, so a tokenizer we train differs from the official ones
only in its vocabulary size and training text.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

REFERENCE_MODEL = Path(__file__).resolve().parent / "sample" / "tokenizers" / "fineweb_1024_bpe.model"

# Trainer fields that describe the input or the run, not the tokenizer: never copied or compared.
RUN_FIELDS = frozenset({
    "input", "input_format", "model_prefix", "vocab_size", "input_sentence_size",
    "shuffle_input_sentence", "num_threads", "training_sentence_size", "mining_sentence_size",
})
# Normalizer fields the trainer accepts as flags (the charsmap is copied after training).
NORMALIZER_FLAGS = {"name": "normalization_rule_name", "add_dummy_prefix": "add_dummy_prefix",
                    "remove_extra_whitespaces": "remove_extra_whitespaces",
                    "escape_whitespaces": "escape_whitespaces"}


def read_model(path: str | os.PathLike) -> model_pb2.ModelProto:
    """Parses a .model file; an error naming it if it is not a SentencePiece model."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist (expected a SentencePiece .model file)")
    data = Path(path).read_bytes()
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # protobuf raises its own DecodeError type
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise ValueError(f"{path}: SentencePiece model has no pieces")
    return proto


def official_settings(reference: str | os.PathLike = REFERENCE_MODEL) -> dict:
    """Trainer keyword arguments equal to the reference model's trainer + normalizer settings."""
    proto = read_model(reference)
    settings = {}
    for field, value in proto.trainer_spec.ListFields():
        if field.name in RUN_FIELDS:
            continue
        if field.enum_type is not None:
            value = field.enum_type.values_by_number[value].name
        elif field.is_repeated:
            value = ",".join(value)
        settings[field.name] = value
    for field, flag in NORMALIZER_FLAGS.items():
        settings[flag] = getattr(proto.normalizer_spec, field)
    return settings


def sentences(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of the documents: SentencePiece trains on lines (and skips very long ones)."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, max_sentences: int = 1_000_000,
                    reference: str | os.PathLike = REFERENCE_MODEL) -> bytes:
    """Trains a BPE tokenizer with the official settings; returns the serialized model."""
    settings = official_settings(reference)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(texts), model_writer=buf, vocab_size=vocab_size,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1, minloglevel=2, **settings,
    )
    proto = model_pb2.ModelProto.FromString(buf.getvalue())
    # The built-in nmt_nfkc table follows the library's Unicode version (this one differs from the
    # official models' table in 2 code points): copy the reference's so text normalises identically.
    proto.normalizer_spec.CopyFrom(read_model(reference).normalizer_spec)
    return proto.SerializeToString()


def load(path_or_bytes: str | os.PathLike | bytes) -> spm.SentencePieceProcessor:
    """A processor from a .model path or serialized bytes."""
    if isinstance(path_or_bytes, bytes):
        return spm.SentencePieceProcessor(model_proto=path_or_bytes)
    path = Path(path_or_bytes)
    read_model(path)  # clear error for a wrong file instead of SentencePiece's generic one
    return spm.SentencePieceProcessor(model_file=str(path))
