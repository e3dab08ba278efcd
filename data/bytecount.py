"""Per-token UTF-8 byte counts (SPEC.md section 3), for byte sidecars.

A token counts the UTF-8 bytes its piece adds to the decoded document: the piece's text with `▁`
read as a space, except that a leading `▁` right after a control token (the document's BOS) adds
nothing, since decoding drops it. Byte-fallback pieces count 1, control and unknown pieces 0. Summed
over a document this equals the UTF-8 length of the decoded text.
"""
from __future__ import annotations

import numpy as np

SPACE = "\u2581"


def piece_tables(sp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bytes without a leading space, starts with ▁, is control) for every piece id."""
    n = sp.get_piece_size()
    length = np.zeros(n, dtype=np.int32)
    leading = np.zeros(n, dtype=bool)
    control = np.zeros(n, dtype=bool)
    for i in range(n):
        if sp.is_control(i):
            control[i] = True
        elif sp.is_byte(i):
            length[i] = 1
        elif not sp.is_unknown(i):
            piece = sp.id_to_piece(i)
            leading[i] = piece.startswith(SPACE)
            length[i] = len(piece.replace(SPACE, " ").encode("utf-8")) - int(leading[i])
    return length, leading, control


def token_bytes(tokens: np.ndarray, tables: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Byte count (uint16) of every token of a stream that starts at a document boundary;
    `tables` comes from `piece_tables` (built once per tokenizer: it loops over all pieces)."""
    length, leading, control = tables
    tokens = np.asarray(tokens, dtype=np.int64)
    prev_control = np.ones(tokens.size, dtype=bool)  # the stream's first token follows nothing
    prev_control[1:] = control[tokens[:-1]]
    out = length[tokens] + (leading[tokens] & ~prev_control)
    return out.astype(np.uint16)
