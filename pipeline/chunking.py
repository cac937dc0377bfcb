"""Split a document into variable-length chunks on natural boundaries, with stable content-derived ids.

A chunk is an exact substring of its document. The splitter fills a token budget and then walks back to the
last paragraph break, else the last sentence end, inside the window (never giving up more than half of the
budget), else cuts at a token boundary. Overlap repeats the last ``overlap`` tokens of a chunk at the start of
the next one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

# Offline stand-in for a subword tokenizer: words in pieces of at most 16 characters, and each punctuation mark.
# Long "words" (base64, minified text) therefore still cost tokens in proportion to their length, which keeps
# chunk sizes bounded on hostile input. Real APIs count differently; keep a margin below provider limits.
TOKEN = re.compile(r"\w{1,16}|[^\w\s]")
_PARAGRAPH_GAP = re.compile(r"\n[^\S\n]*\n")
_SENTENCE_END = frozenset(".!?。！？")


def count_tokens(text: str) -> int:
    """Number of tokens in ``text`` under :data:`TOKEN`."""
    return sum(1 for _ in TOKEN.finditer(text))


@dataclass(frozen=True)
class Chunk:
    """One piece of one document, as it travels to the embedders and into the store."""

    id: str
    doc: str
    ordinal: int
    text: str
    tokens: int


def chunk_id(doc: str, ordinal: int, text: str) -> str:
    """Stable id: document path + ordinal + a digest of the text (same corpus → same ids, on any machine)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=6).hexdigest()
    return f"{doc}#{ordinal}:{digest}"


def text_hash(text: str) -> str:
    """Digest of a chunk's text, as the store records it (sync skips a pair whose text and model are stored)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def chunk_text(
    doc: str, text: str, *, max_tokens: int, overlap: int = 0, fits: Callable[[str], bool] | None = None
) -> list[Chunk]:
    """Split ``text`` of document ``doc`` into chunks of at most ``max_tokens`` tokens.

    ``overlap`` must be smaller than ``max_tokens``; every token of ``text`` lands in at least one chunk.
    ``fits(piece)`` (e.g. "within every model's input window, counted by its own tokenizer") shortens a chunk
    that does not fit to the longest prefix that does, then back to a natural boundary; a single token that
    does not fit stays a chunk of its own (the caller reports it).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise ValueError(
            f"overlap must be in [0, max_tokens), got overlap={overlap}, max_tokens={max_tokens}"
        )
    spans = [m.span() for m in TOKEN.finditer(text)]
    chunks: list[Chunk] = []
    start = 0
    while start < len(spans):
        stop = min(start + max_tokens, len(spans))
        if stop < len(spans):
            stop = _natural_stop(text, spans, start, stop)
        if fits is not None and not fits(text[spans[start][0] : spans[stop - 1][1]]):
            stop = _fitting_stop(text, spans, start, stop, fits)
        piece = text[spans[start][0] : spans[stop - 1][1]]
        ordinal = len(chunks)
        chunks.append(Chunk(chunk_id(doc, ordinal, piece), doc, ordinal, piece, stop - start))
        if stop == len(spans):
            break
        start = max(stop - overlap, start + 1)
    return chunks


def _natural_stop(text: str, spans: list[tuple[int, int]], start: int, stop: int) -> int:
    """Best token index to end a chunk at, in (start + half the window, stop]: paragraph > sentence > hard cut."""
    earliest = start + max(1, (stop - start) // 2)
    sentence_stop = None
    for k in range(stop, earliest - 1, -1):
        gap = text[spans[k - 1][1] : spans[k][0]]
        if _PARAGRAPH_GAP.search(gap):
            return k
        if sentence_stop is None and gap and text[spans[k - 1][0] : spans[k - 1][1]] in _SENTENCE_END:
            sentence_stop = k
    return sentence_stop or stop


def _fitting_stop(
    text: str, spans: list[tuple[int, int]], start: int, stop: int, fits: Callable[[str], bool]
) -> int:
    """The natural stop below the longest prefix of tokens [start, stop) that ``fits`` (at least one token)."""
    lo, hi = start + 1, stop - 1  # ``stop`` itself does not fit; the fit is monotone in the prefix length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(text[spans[start][0] : spans[mid - 1][1]]):
            lo = mid
        else:
            hi = mid - 1
    return _natural_stop(text, spans, start, lo) if lo > start + 1 else lo
