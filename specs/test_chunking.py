"""Chunking: variable-length chunks on natural boundaries, exact substrings, stable ids."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.chunking import TOKEN, Chunk, chunk_id, chunk_text, count_tokens, text_hash
from specs.strategies import paragraphs, plain_words, relpaths, sentences, texts, words

max_tokens_ = st.integers(1, 40)


@st.composite
def chunking_args(draw: st.DrawFn, text: st.SearchStrategy[str] | None = None) -> tuple[str, int, int]:
    """A text, a token budget and an overlap below it."""
    max_tokens = draw(max_tokens_)
    return draw(text if text is not None else texts()), max_tokens, draw(st.integers(0, max_tokens - 1))


def rebuild_tokens(chunks: list[Chunk], overlap: int) -> list[str]:
    """The document's tokens, from the chunks minus the tokens each one repeats from the previous one."""
    tokens: list[str] = []
    previous = 0
    for c in chunks:
        repeated = min(overlap, previous - 1) if previous else 0
        tokens += TOKEN.findall(c.text)[repeated:]
        previous = c.tokens
    return tokens


@given(chunking_args())
@example(("", 5, 0)).via("empty document")
@example(("a" * 100, 3, 1)).via("one word far longer than a token")
def test_every_chunk_is_an_exact_substring_of_its_document(args: tuple[str, int, int]) -> None:
    """Each chunk's text occurs verbatim in the document and starts and ends on a token."""
    text, max_tokens, overlap = args
    for c in chunk_text("d.txt", text, max_tokens=max_tokens, overlap=overlap):
        assert c.text in text
        assert c.text == c.text.strip() and c.text


@given(chunking_args())
@example(("word. " * 30, 4, 3)).via("overlap close to the budget, sentence cuts")
def test_every_token_is_covered_in_order_and_overlap_only_repeats(args: tuple[str, int, int]) -> None:
    """Dropping the repeated overlap tokens, the chunks' tokens are exactly the document's tokens, in order."""
    text, max_tokens, overlap = args
    chunks = chunk_text("d.txt", text, max_tokens=max_tokens, overlap=overlap)
    assert rebuild_tokens(chunks, overlap) == TOKEN.findall(text)


@given(chunking_args())
def test_no_chunk_is_over_max_tokens_and_token_counts_are_exact(args: tuple[str, int, int]) -> None:
    """Every chunk holds 1..max_tokens tokens, and ``Chunk.tokens`` is the count of its own text."""
    text, max_tokens, overlap = args
    for c in chunk_text("d.txt", text, max_tokens=max_tokens, overlap=overlap):
        assert 1 <= c.tokens <= max_tokens
        assert c.tokens == count_tokens(c.text)


@given(texts(kind="blank"), max_tokens_)
def test_a_document_without_tokens_has_no_chunks(text: str, max_tokens: int) -> None:
    """Empty or whitespace-only text yields no chunk (and no empty string ever reaches an embedder)."""
    assert chunk_text("d.txt", text, max_tokens=max_tokens) == []


@given(relpaths(), chunking_args())
def test_ids_are_stable_across_calls(doc: str, args: tuple[str, int, int]) -> None:
    """Chunking the same document twice gives identical chunks and ids (no randomness, no clock)."""
    text, max_tokens, overlap = args
    first = chunk_text(doc, text, max_tokens=max_tokens, overlap=overlap)
    assert first == chunk_text(doc, text, max_tokens=max_tokens, overlap=overlap)


@given(relpaths(), chunking_args())
@example("d.txt", ("same same same same", 1, 0)).via("identical chunk texts in one document")
def test_ids_are_unique_per_document_and_carry_path_and_ordinal(doc: str, args: tuple[str, int, int]) -> None:
    """Ids are ``<path>#<ordinal>:<digest>``; ordinals count 0, 1, 2…, so ids never repeat in a document."""
    text, max_tokens, overlap = args
    chunks = chunk_text(doc, text, max_tokens=max_tokens, overlap=overlap)
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    assert len({c.id for c in chunks}) == len(chunks)
    for c in chunks:
        assert c.doc == doc
        assert c.id.startswith(f"{doc}#{c.ordinal}:")


@given(relpaths(), st.integers(0, 10**6), st.text(min_size=1))
@example("notes/a.txt", 7, "Grüße, 世界.").via("non-ASCII text: the digest is of its UTF-8 bytes")
def test_an_id_is_path_ordinal_and_a_12_hex_digit_blake2b_of_the_utf8_text(
    doc: str, ordinal: int, text: str
) -> None:
    """chunk_id is ``<path>#<ordinal>:<BLAKE2b with a 6-byte digest of the UTF-8 text>``, the same on any machine
    and in any release: the store is keyed by it."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=6).hexdigest()
    assert chunk_id(doc, ordinal, text) == f"{doc}#{ordinal}:{digest}"


@given(st.text())
@example("Grüße, 世界.").via("non-ASCII text: the digest is of its UTF-8 bytes")
def test_a_text_hash_is_the_32_hex_digit_blake2b_of_the_utf8_text(text: str) -> None:
    """text_hash is BLAKE2b with a 16-byte digest of the UTF-8 text, in hex, the same on any machine and in any
    release: sync compares it with the hashes stored by earlier runs (another digest re-embeds every pair)."""
    assert text_hash(text) == hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


@given(st.lists(relpaths(), min_size=2, max_size=2, unique=True), words())
def test_the_same_text_in_two_documents_gets_different_ids(docs: list[str], text: str) -> None:
    """Ids include the document path: equal texts in different files do not collide in the store."""
    a, b = (chunk_text(d, text, max_tokens=5)[0].id for d in docs)
    assert a != b


@given(chunking_args(text=plain_words(min_words=1)))
def test_hard_cuts_fill_the_budget_and_overlap_repeats_exactly_overlap_tokens(
    args: tuple[str, int, int],
) -> None:
    """Without paragraph or sentence boundaries every chunk but the last has max_tokens tokens and the next
    one starts with its last ``overlap`` tokens."""
    text, max_tokens, overlap = args
    chunks = chunk_text("d.txt", text, max_tokens=max_tokens, overlap=overlap)
    for before, after in itertools.pairwise(chunks):
        assert before.tokens == max_tokens
        tail = TOKEN.findall(before.text)[max_tokens - overlap :] if overlap else []
        assert TOKEN.findall(after.text)[:overlap] == tail


@st.composite
def paragraph_documents(draw: st.DrawFn) -> tuple[list[str], int]:
    """Paragraphs that each fit the budget but no two of them together (each holds more than half of it)."""
    max_tokens = draw(st.integers(2, 30))
    paras = draw(st.lists(paragraphs(max_sentences=6), min_size=1, max_size=6))
    fitted = []
    for p in paras:
        tokens = list(TOKEN.finditer(p))
        keep = draw(st.integers(max_tokens // 2 + 1, max_tokens))
        filler = draw(words(max_size=6))
        while len(tokens) < keep:  # pad short paragraphs with words, cut long ones at a token end
            p = f"{p} {filler}"
            tokens = list(TOKEN.finditer(p))
        fitted.append(p[: tokens[keep - 1].end()])
    return fitted, max_tokens


@given(paragraph_documents(), st.sampled_from(["\n\n", "\n \n", "\r\n\r\n", "\n\n\n"]))
def test_paragraph_boundaries_are_preferred_over_filling_the_budget(
    doc: tuple[list[str], int], gap: str
) -> None:
    """When each paragraph fits but no two do, every chunk is exactly one paragraph."""
    paras, max_tokens = doc
    chunks = chunk_text("d.txt", gap.join(paras), max_tokens=max_tokens)
    assert [c.text for c in chunks] == paras


@given(
    st.lists(sentences(max_words=6), min_size=1, max_size=8), plain_words(max_words=10), st.integers(1, 30)
)
@example(["one two three four five six."], "seven eight nine ten", 9).via("one sentence end in the window")
@example(["one two.", "three.", "four five."], "six seven eight nine", 9).via(
    "two in the window: the later one"
)
def test_sentence_ends_are_preferred_over_hard_cuts(
    sentences_: list[str], tail: str, max_tokens: int
) -> None:
    """Without a paragraph break in the window, the chunk ends after the last sentence mark in it that keeps half
    the budget, else it is cut hard at max_tokens."""
    text = " ".join([*sentences_, tail]).strip()
    ends = list(itertools.accumulate(count_tokens(s) for s in sentences_))  # tokens up to each sentence end
    total = count_tokens(text)
    in_window = [k for k in ends if max(1, max_tokens // 2) <= k <= max_tokens]
    expected = total if total <= max_tokens else max(in_window, default=max_tokens)
    assert chunk_text("d.txt", text, max_tokens=max_tokens)[0].tokens == expected


@given(
    plain_words(min_words=1, max_words=30),
    st.sampled_from(["\n\n", "\n \n", ". ", "? ", "。\n"]),
    plain_words(min_words=30, max_words=32),
    st.integers(1, 30),
)
@example("one", ". ", "two three four five six seven eight nine ten eleven", 8).via("2 tokens of 8: cut hard")
@example("one", "\n\n", "two three four", 3).via("a budget of 3 keeps a one-token chunk (half, rounded down)")
@example("one two three", "\n\n", "four five six seven eight nine", 8).via(
    "one token short of half the budget"
)
def test_a_natural_boundary_never_costs_more_than_half_the_budget(
    before: str, boundary: str, after: str, max_tokens: int
) -> None:
    """A paragraph break or sentence end in the window ends the chunk only if the chunk keeps max_tokens // 2
    tokens (at least one); an earlier one is ignored and the chunk is cut hard at max_tokens."""
    at = count_tokens(before + boundary)  # the chunk's tokens if it ends at the boundary (a mark is a token)
    expected = at if max(1, max_tokens // 2) <= at <= max_tokens else max_tokens
    assert chunk_text("d.txt", before + boundary + after, max_tokens=max_tokens)[0].tokens == expected


@st.composite
def words_joined_by_marks(draw: st.DrawFn) -> str:
    """Words joined by a space or by a sentence mark with no space after it (3.14, v1.2, a!b): no boundary."""
    ws = draw(st.lists(words(max_size=6), min_size=1, max_size=40))
    joints = draw(st.lists(st.sampled_from([" ", ".", "!", "?", "。"]), min_size=len(ws), max_size=len(ws)))
    return "".join(w + j for w, j in zip(ws, joints, strict=True)).rstrip()


@given(chunking_args(text=words_joined_by_marks()))
@example(("version 3.14 is out now", 4, 0)).via("a decimal point")
def test_a_sentence_mark_inside_a_word_or_number_ends_no_sentence(args: tuple[str, int, int]) -> None:
    """A mark with no whitespace after it (3.14, v1.2, a!b) is no sentence end: every chunk but the last is cut
    hard at max_tokens."""
    text, max_tokens, overlap = args
    chunks = chunk_text("d.txt", text, max_tokens=max_tokens, overlap=overlap)
    assert all(c.tokens == max_tokens for c in chunks[:-1])


@pytest.mark.parametrize(
    ("max_tokens", "overlap"),
    [(0, 0), (-1, 0), (5, 5), (5, 6), (5, -1), (1, 1)],
)
def test_invalid_max_tokens_or_overlap_raise(max_tokens: int, overlap: int) -> None:
    """max_tokens must be >= 1 and overlap in [0, max_tokens): anything else is a ValueError naming it."""
    with pytest.raises(ValueError, match="max_tokens|overlap"):
        chunk_text("d.txt", "some text", max_tokens=max_tokens, overlap=overlap)
