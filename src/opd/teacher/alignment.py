"""Aligning two tokenisations of one text on byte offsets (cross-tokenizer distillation).

A tokenisation is described by the byte offset in the text where each of its tokens ends, or None where
a token does not end on a character boundary of the text (a byte-level token holding part of a
multi-byte character; a token whose decoding no longer matches the text). A token that decodes to
nothing ends where the one before it did. A chunk is the shortest run of student tokens and run of
teacher tokens that end at the same byte: chunks tile the text, every token lies in exactly one chunk,
and both runs of a chunk spell exactly its bytes. Where one side's decoding stops matching the text,
alignment stops at the last byte both share; the text after it is not covered.

Pure functions on plain lists: the tokenizers only enter through `token_ends`, which reads the byte offsets
off prefix decodings (decode(ids[:k + 1]) for every k), the one operation every tokenizer has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Chunk:
    start: int  # the chunk's text is bytes [start, end)
    end: int
    student: range  # indices of its student tokens
    teacher: range  # indices of its teacher tokens


def token_ends(prefix_texts: Sequence[str], text: str) -> list[Optional[int]]:
    """Byte offset where each token ends, from the decodings of the token prefixes.

    Token k ends at len(decode(ids[:k + 1])) when that decoding is a prefix of `text`; otherwise (a half-decoded
    character shows up as U+FFFD, or the decoding went its own way) it has no boundary of its own: None.
    """
    ends: list[Optional[int]] = []
    for prefix in prefix_texts:
        ends.append(len(prefix.encode("utf-8")) if text.startswith(prefix) else None)
    return ends


def align(student_ends: Sequence[Optional[int]], teacher_ends: Sequence[Optional[int]]) -> list[Chunk]:
    """Chunks at the byte offsets where both tokenisations have a token boundary, in text order."""
    chunks: list[Chunk] = []
    i = j = 0  # next unread token of each side
    start = 0
    n_s, n_t = len(student_ends), len(teacher_ends)
    while i < n_s and j < n_t:
        i0, j0 = i, j
        end_s, end_t = student_ends[i], teacher_ends[j]
        i, j = i + 1, j + 1
        # Extend the side that ends earlier (or mid-character) until both end on the same byte.
        while end_s is None or end_t is None or end_s != end_t:
            if end_s is None or (end_t is not None and end_s < end_t):
                if i == n_s:
                    return _absorb_empty_tail(chunks, student_ends, teacher_ends)
                end_s, i = student_ends[i], i + 1
            else:
                if j == n_t:
                    return _absorb_empty_tail(chunks, student_ends, teacher_ends)
                end_t, j = teacher_ends[j], j + 1
        chunks.append(Chunk(start, end_s, range(i0, i), range(j0, j)))
        start = end_s
    return _absorb_empty_tail(chunks, student_ends, teacher_ends)


def _absorb_empty_tail(chunks: list[Chunk], student_ends: Sequence[Optional[int]],
                       teacher_ends: Sequence[Optional[int]]) -> list[Chunk]:
    """Tokens left on one side that add no bytes after the last chunk (say, a trailing special token) join it."""
    if not chunks:
        return chunks
    last = chunks[-1]
    i, j = last.student.stop, last.teacher.stop
    while i < len(student_ends) and student_ends[i] == last.end:
        i += 1
    while j < len(teacher_ends) and teacher_ends[j] == last.end:
        j += 1
    chunks[-1] = Chunk(last.start, last.end, range(last.student.start, i), range(last.teacher.start, j))
    return chunks


def covered_bytes(chunks: Sequence[Chunk]) -> int:
    return chunks[-1].end if chunks else 0


def chunk_sums(values: Sequence[float], chunks: Sequence[Chunk], side: str) -> list[float]:
    """Sum of per-token values over each chunk's tokens of one side ("student" or "teacher")."""
    return [sum(values[k] for k in getattr(c, side)) for c in chunks]
