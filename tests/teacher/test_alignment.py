"""Property tests of the byte-offset alignment of two tokenisations of one text (hypothesis).

Tokenisations are drawn as random cuts of the text's UTF-8 bytes (cuts may split a character, as
byte-level BPE tokens do) with empty tokens mixed in (as special tokens decode to nothing); each
token's end comes from prefix decodings, exactly as the cross-tokenizer teacher computes it.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from opd.teacher.alignment import Chunk, align, chunk_sums, covered_bytes, token_ends


@st.composite
def tokenisation(draw, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=len(data))) if len(data) > 1 else set())
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])] if data else []
    for _ in range(draw(st.integers(0, 3))):  # tokens that decode to nothing
        pieces.insert(draw(st.integers(0, len(pieces))), b"")
    return pieces


def ends_of(pieces: list[bytes], text: str) -> list[int]:
    prefixes = [b"".join(pieces[: k + 1]).decode("utf-8", errors="replace") for k in range(len(pieces))]
    return token_ends(prefixes, text)


@st.composite
def two_tokenisations(draw):
    text = draw(st.text(max_size=40))
    data = text.encode("utf-8")
    return text, draw(tokenisation(data)), draw(tokenisation(data))


def _flat(ranges) -> list[int]:
    return [k for r in ranges for k in r]


@settings(max_examples=300, deadline=None)
@given(two_tokenisations())
def test_chunks_tile_the_text_and_hold_every_token_once(case):
    text, s_pieces, t_pieces = case
    data = text.encode("utf-8")
    chunks = align(ends_of(s_pieces, text), ends_of(t_pieces, text))
    if not s_pieces or not t_pieces:
        assert chunks == [] or not data
        return
    # Tiling: contiguous spans from byte 0 to the end of the text.
    assert chunks[0].start == 0 and covered_bytes(chunks) == len(data)
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:]))
    # Every token of each side in exactly one chunk, in order.
    assert _flat(c.student for c in chunks) == list(range(len(s_pieces)))
    assert _flat(c.teacher for c in chunks) == list(range(len(t_pieces)))
    for c in chunks:
        # Each chunk is a real alignment: both runs spell the same bytes, the chunk's bytes.
        assert b"".join(s_pieces[k] for k in c.student) == data[c.start:c.end] == b"".join(t_pieces[k] for k in c.teacher)
        assert len(c.student) >= 1 and len(c.teacher) >= 1


@settings(max_examples=300, deadline=None)
@given(two_tokenisations(), st.randoms(use_true_random=False))
def test_sums_are_conserved(case, rnd):
    text, s_pieces, t_pieces = case
    chunks = align(ends_of(s_pieces, text), ends_of(t_pieces, text))
    if not text:
        return
    s_vals = [rnd.uniform(-10, 0) for _ in s_pieces]
    t_vals = [rnd.uniform(-10, 0) for _ in t_pieces]
    s_sums, t_sums = chunk_sums(s_vals, chunks, "student"), chunk_sums(t_vals, chunks, "teacher")
    assert abs(sum(s_sums) - sum(s_vals)) < 1e-9 and abs(sum(t_sums) - sum(t_vals)) < 1e-9
    # The chunk advantages add up to the sequence-level log-ratio.
    assert abs(sum(t - s for t, s in zip(t_sums, s_sums)) - (sum(t_vals) - sum(s_vals))) < 1e-9


def test_a_teacher_that_stops_matching_the_text_covers_only_the_shared_prefix():
    text = "ab\u00e9cd"  # é is 2 bytes: text bytes a b \xc3 \xa9 c d
    s_ends = ends_of([b"a", b"b", "é".encode(), b"cd"], text)
    # The teacher's decoding reads "ab?cd" (an unknown token): it matches the text only up to "ab".
    t_ends = token_ends(["a", "ab", "ab?", "ab?cd"], text)
    assert t_ends == [1, 2, None, None]
    chunks = align(s_ends, t_ends)
    assert chunks == [Chunk(0, 1, range(0, 1), range(0, 1)), Chunk(1, 2, range(1, 2), range(1, 2))]
    assert covered_bytes(chunks) == 2


def test_a_token_ending_inside_a_character_has_no_boundary():
    # A byte-level token holding the first byte of é decodes to U+FFFD; the next one completes the character.
    assert token_ends(["\ufffd", "é", "é!"], "é!") == [None, 2, 3]
    # Paired with a tokenisation that ends on byte 0 (an empty token), the half character still joins the é chunk.
    chunks = align([None, 2, 3], [0, 2, 3])
    assert [(c.start, c.end, c.student, c.teacher) for c in chunks] == [
        (0, 2, range(0, 2), range(0, 2)), (2, 3, range(2, 3), range(2, 3))]
