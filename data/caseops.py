"""CaseOps: a reversible case transform (SPEC.md section 5), so a tokenizer spends no vocabulary on
"The" / "the" / "THE" variants.

Words (maximal runs of `str.isalpha()` characters) are lowercased and their case is written with
four control symbols from the Unicode Private Use Area (never produced by normal text, kept intact
by the nmt_nfkc normalizer and reserved as single SentencePiece user symbols):

    U+E000  TITLE    the next letter is uppercase (word-initial: "Paris" -> TITLE "paris")
    U+E001  ALLCAPS  every lowercase letter of the next word is uppercase ("NASA" -> ALLCAPS "nasa";
                     words of at least 2 uppercase letters and no lowercase letter)
    U+E002  CAP      the next letter is uppercase (inside a word: "iPhone" -> "i" CAP "phone",
                     "McDonald" -> TITLE "mc" CAP "donald")
    U+E003  ESC      the next character is literal: one of these four symbols present in the input
                     is written as ESC + symbol, so the transform is bijective on any text

A word-initial marker (TITLE, ALLCAPS) of a word that follows a space is written before that space
(" Paris" -> TITLE " paris"), so the word keeps its "▁paris" piece instead of costing a separate "▁"
token; decode moves the space back. CAP is never followed by a space.

Only letters whose case maps one to one are touched: an uppercase letter `u` with
`len(u.lower()) == 1 and u.lower().upper() == u` (and its lowercase partner). Others are left as they
are: 'ß' (upper "SS"), 'İ' (lower "i̇"), titlecase digraphs like 'ǅ', final sigma 'ς', dotless 'ı'.
The tables come from Python's Unicode database, so encode and decode must run on Python versions
with the same Unicode version (3.11: Unicode 14) for letters added in later versions.

`decode` accepts any string: a marker that cannot apply (not followed by a lowercase letter or a
word) is dropped, a trailing ESC is dropped. `byte_counts` mirrors it and gives, per character of
an encoded string, the UTF-8 bytes of the original text it stands for: 0 for markers and ESC, the
original letter's UTF-8 length for a case-restored letter (which may differ from the lowercase
letter's), its own length otherwise; they always sum to len(decode(s).encode("utf-8")).
"""
from __future__ import annotations

import re
import sys
from functools import lru_cache

import numpy as np

TITLE, ALLCAPS, CAP, ESC = "\ue000", "\ue001", "\ue002", "\ue003"
CONTROLS = (TITLE, ALLCAPS, CAP, ESC)
_CONTROL_RE = re.compile("[\ue000-\ue003]")


def _upper_of(c: str) -> str | None:
    """The uppercase partner of a lowercase letter whose case maps one to one, else None."""
    u = c.upper()
    if len(u) == 1 and u != c and u.lower() == c and c.isalpha() and u.isalpha():
        return u
    return None


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[int, str], dict[int, str], re.Pattern]:
    """(upper -> lower, lower -> upper) translate tables, and a regex matching one uppercase letter."""
    to_lower: dict[int, str] = {}
    to_upper: dict[int, str] = {}
    for cp in range(sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        u = _upper_of(c)
        if u is not None:
            to_upper[cp] = u
            to_lower[ord(u)] = c
    upper_re = re.compile(_char_class(sorted(to_lower)))
    return to_lower, to_upper, upper_re


def _char_class(code_points) -> str:
    """A regex character class of sorted code points, as ranges (much faster to match than singles)."""
    ranges: list[list[int]] = []
    for cp in code_points:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return "[" + "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                         for a, b in ranges) + "]"


@lru_cache(maxsize=1)
def _word_re() -> re.Pattern:
    """Maximal runs of str.isalpha() characters (re's \\w also takes digits and other numerics)."""
    return re.compile(_char_class(cp for cp in range(sys.maxunicode + 1) if chr(cp).isalpha()) + "+")


def prepare() -> None:
    """Builds the lookup tables now (about 1 s; otherwise on first use), e.g. before forking workers."""
    _tables()
    _word_re()


def is_upper(c: str) -> bool:
    """An uppercase letter that CaseOps lowercases (its case maps one to one)."""
    return ord(c) in _tables()[0]


def is_lower(c: str) -> bool:
    """A lowercase letter that CaseOps may restore to uppercase."""
    return ord(c) in _tables()[1]


def _escape(segment: str) -> str:
    return _CONTROL_RE.sub(lambda m: ESC + m.group(), segment)


def _encode_word(word: str, to_lower: dict[int, str]) -> tuple[str, str]:
    """(word-initial marker or "", the encoded word); the word holds at least one uppercase letter."""
    n_upper = sum(ord(c) in to_lower for c in word)
    n_lower = sum(ord(c) in _tables()[1] for c in word)
    if n_upper >= 2 and n_lower == 0:
        return ALLCAPS, word.translate(to_lower)
    out, lead = [], ""
    for i, c in enumerate(word):
        if ord(c) in to_lower:
            if i == 0:
                lead = TITLE
            else:
                out.append(CAP)
            out.append(to_lower[ord(c)])
        else:
            out.append(c)
    return lead, "".join(out)


def encode(text: str) -> str:
    """The CaseOps form of `text` (any string; `decode(encode(text)) == text`)."""
    to_lower, _, upper_re = _tables()
    if not upper_re.search(text):
        return _escape(text)
    word_re = _word_re()
    out: list[str] = []
    pos = 0
    for m in upper_re.finditer(text):  # only words holding an uppercase letter change
        i = m.start()
        if i < pos:
            continue  # inside the word just encoded
        start = i
        while start > pos and text[start - 1].isalpha():
            start -= 1
        end = word_re.match(text, i).end()
        lead, body = _encode_word(text[start:end], to_lower)
        gap = _escape(text[pos:start])
        if lead and gap.endswith(" "):
            out += [gap[:-1], lead, " ", body]  # the marker goes before the space: "▁word" stays one piece
        else:
            out += [gap, lead, body]
        pos = end
    out.append(_escape(text[pos:]))
    return "".join(out)


def _walk(s: str, events: list[tuple[int, int]] | None) -> str:
    """decode(s); appends to `events` (char index in s, original UTF-8 bytes) for every character of
    s that does not stand for exactly its own UTF-8 bytes (controls, restored letters)."""
    _, to_upper, _ = _tables()
    word_re = _word_re()
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        m = _CONTROL_RE.search(s, i)
        j = m.start() if m else n
        if j > i:  # literal text up to the next control
            out.append(s[i:j])
        if m is None:
            break
        op = m.group()
        if events is not None:
            events.append((j, 0))  # the control itself stands for no original bytes
        i = j + 1
        if op == ESC:
            if i < n:
                out.append(s[i])
                i += 1
            continue
        k = i + 1 if op != CAP and s.startswith(" ", i) else i  # TITLE/ALLCAPS may sit before a space
        if op == ALLCAPS:
            w = word_re.match(s, k)
            if w is None:
                continue  # nothing to apply to: the marker is dropped
            lowered = w.group()
            restored = lowered.translate(to_upper)
        else:
            if k >= n or ord(s[k]) not in to_upper:
                continue
            lowered, restored = s[k], to_upper[ord(s[k])]
        if k > i:
            out.append(" ")
        out.append(restored)
        if events is not None and not lowered.isascii():
            for off, (a, b) in enumerate(zip(lowered, restored)):
                la, lb = len(a.encode("utf-8")), len(b.encode("utf-8"))
                if la != lb:
                    events.append((k + off, lb))
        i = k + len(restored)
    return "".join(out)


def decode(s: str) -> str:
    """The original text of a CaseOps string (any string is accepted, see the module docstring)."""
    if not _CONTROL_RE.search(s):
        return s
    return _walk(s, None)


def byte_counts(s: str) -> list[int]:
    """Per character of `s`, the UTF-8 bytes of `decode(s)` it accounts for (sums to that length)."""
    counts = [len(c.encode("utf-8")) for c in s]
    events: list[tuple[int, int]] = []
    _walk(s, events)
    for i, b in events:
        counts[i] = b
    return counts


def _char_lengths(s: str) -> np.ndarray:
    cps = np.frombuffer(s.encode("utf-32-le"), dtype="<u4")
    return (1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)).astype(np.int64)


def byte_weights(s: str) -> np.ndarray:
    """Per UTF-8 byte of `s` (int64, len(s.encode())), the original bytes it accounts for.

    A character whose original is as long as itself gives 1 to each of its bytes (so byte-fallback
    tokens of unchanged text count 1, as without the transform); a marker gives 0; a restored letter
    of original length `o` and encoded length `t` gives 1 to its first min(o, t) - 1 bytes and the
    rest, o - min(o, t) + 1, to its last byte. Sums to len(decode(s).encode("utf-8"))."""
    raw = s.encode("utf-8")
    weights = np.ones(len(raw), dtype=np.int64)
    if not _CONTROL_RE.search(s):
        return weights
    events: list[tuple[int, int]] = []
    _walk(s, events)
    tlen = _char_lengths(s)
    orig = tlen.copy()
    where, value = np.asarray(events, dtype=np.int64).reshape(-1, 2).T
    orig[where] = value
    if len(raw) == len(s):  # ASCII: one byte per character
        return orig
    char = np.repeat(np.arange(len(s)), tlen)  # the character of every byte
    k = np.arange(len(raw)) - (np.cumsum(tlen) - tlen)[char]  # position of the byte in it
    t, o = tlen[char], orig[char]
    m = np.minimum(o, t)
    return np.where(k == t - 1, np.where(o > 0, o - m + 1, 0), (k < m - 1).astype(np.int64))
