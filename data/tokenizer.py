"""SentencePiece tokenizers with the official challenge settings.

The trainer and normalizer settings are read from a reference model (the official SP1024 tokenizer,
embedded in data/sample/) rather than retyped, so a tokenizer we train differs from the official ones
only in its vocabulary size and training text.
"""
from __future__ import annotations

import io
import os
import random
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


def normalized_text(sp, text: str) -> str:
    """`text` as the tokenizer `sp` decodes it back: its normalizer applied (nmt_nfkc, whitespace runs
    collapsed, ends stripped), "▁" read as a space."""
    return sp.normalize(text).replace("\u2581", " ")


def caseops_lines(texts: Iterable[str], reference: str | os.PathLike = REFERENCE_MODEL) -> Iterator[str]:
    """Training lines for a CaseOps tokenizer: each line of each document normalized first (as the
    shards' documents are, so the case markers never sit inside a whitespace run the normalizer would
    collapse), then case-encoded (data/caseops.py). Split before normalizing, which turns newlines
    into spaces, so long documents still give lines under the trainer's length limit."""
    from . import caseops
    sp = load(reference)
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield caseops.encode(normalized_text(sp, line))


def is_caseops_model(model: str | os.PathLike | bytes) -> bool:
    """Whether a tokenizer reserves the CaseOps control symbols as user-defined pieces."""
    from . import caseops
    proto = model_pb2.ModelProto.FromString(model) if isinstance(model, bytes) else read_model(model)
    user = {p.piece for p in proto.pieces if p.type == model_pb2.ModelProto.SentencePiece.USER_DEFINED}
    return all(c in user for c in caseops.CONTROLS)


def is_caseops_processor(sp) -> bool:
    """Whether a loaded tokenizer has the CaseOps control symbols as pieces of their own."""
    from . import caseops
    return all(sp.id_to_piece(sp.piece_to_id(c)) == c for c in caseops.CONTROLS)


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, max_sentences: int = 1_000_000,
                    reference: str | os.PathLike = REFERENCE_MODEL, caseops: bool = False,
                    seed: int | None = None) -> bytes:
    """Trains a BPE tokenizer with the official settings; returns the serialized model.

    `caseops`: train on the CaseOps form of the documents (`caseops_lines`) with the four control
    symbols reserved as user-defined pieces (ids 4-7, always single tokens). `seed`: sample the
    `max_sentences` lines here with this seed, so the same documents give the same tokenizer
    (SentencePiece's own sampling differs from process to process even with its seed set)."""
    settings = official_settings(reference)
    if caseops:
        from . import caseops as ops
        texts = caseops_lines(texts, reference)
        settings["user_defined_symbols"] = ",".join(ops.CONTROLS)
    lines: Iterable[str] = sentences(texts)
    sample = dict(input_sentence_size=max_sentences, shuffle_input_sentence=True)
    if seed is not None:
        lines = list(lines)
        if len(lines) > max_sentences:
            lines = random.Random(seed).sample(lines, max_sentences)
        sample = dict(input_sentence_size=0, shuffle_input_sentence=False)  # 0: all of them
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
        num_threads=os.cpu_count() or 1, minloglevel=2, **sample, **settings,
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
