"""Composable Hypothesis strategies for the pipeline specs.

Every strategy builds valid inputs by construction (the specs use ``assume`` only for rare rejections), and
takes parameters so a spec can say which corner it wants: ``texts(kind="paragraphs")``,
``token_count_lists(huge=True)``, ``failure_masks(ids, models, transient=False)`` and so on.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from hypothesis import strategies as st

from pipeline.aggregate import NormStats
from pipeline.batching import Batch, plan_batches
from pipeline.embedders import KNOWN_MODELS, InputRejectedError, TransientEmbeddingError
from pipeline.embedders.ratelimit import texts_digest
from pipeline.emulator import peak

# --------------------------------------------------------------------------------------------- texts

WORD_ALPHABET = string.ascii_letters + string.digits + "éßøΩжλ中文_"


def words(*, min_size: int = 1, max_size: int = 12) -> st.SearchStrategy[str]:
    """One word of word characters (``\\w``), no spaces or punctuation."""
    return st.text(WORD_ALPHABET, min_size=min_size, max_size=max_size)


def long_words(*, min_size: int = 17, max_size: int = 80) -> st.SearchStrategy[str]:
    """A "word" longer than one token (base64, minified code): costs tokens in proportion to its length."""
    return st.text(string.ascii_letters + string.digits, min_size=min_size, max_size=max_size)


def plain_words(*, min_words: int = 0, max_words: int = 60) -> st.SearchStrategy[str]:
    """Words joined by single spaces: no paragraph or sentence boundary anywhere, so every cut is hard."""
    return st.lists(words(max_size=8), min_size=min_words, max_size=max_words).map(" ".join)


def sentences(*, min_words: int = 1, max_words: int = 10) -> st.SearchStrategy[str]:
    """Words ending with a sentence mark (ASCII or CJK)."""
    return st.builds(
        lambda ws, end: " ".join(ws) + end,
        st.lists(words(max_size=8), min_size=min_words, max_size=max_words),
        st.sampled_from(".!?。！？"),
    )


def paragraphs(*, min_sentences: int = 1, max_sentences: int = 4) -> st.SearchStrategy[str]:
    """Sentences joined by single spaces (one paragraph, no blank line inside)."""
    return st.lists(sentences(), min_size=min_sentences, max_size=max_sentences).map(" ".join)


def prose(*, min_paragraphs: int = 1, max_paragraphs: int = 6) -> st.SearchStrategy[str]:
    """Paragraphs separated by blank lines, sometimes with spaces or CRLF in the gap."""
    gaps = st.sampled_from(["\n\n", "\n\n\n", "\n  \n", "\r\n\r\n", "\n\t\n"])
    return st.lists(st.tuples(paragraphs(), gaps), min_size=min_paragraphs, max_size=max_paragraphs).map(
        lambda parts: "".join(p + g for p, g in parts).rstrip()
    )


def whitespace(*, max_size: int = 20) -> st.SearchStrategy[str]:
    """Whitespace only, including Unicode spaces: holds no token."""
    return st.text(" \t\n\r\x0b\x0c\u00a0\u2003\u3000", max_size=max_size)


def texts(*, kind: str = "any", max_size: int = 400) -> st.SearchStrategy[str]:
    """Document text of one ``kind`` (``any``, ``unicode``, ``prose``, ``plain``, ``long_words``, ``blank``)."""
    kinds: dict[str, st.SearchStrategy[str]] = {
        "unicode": st.text(max_size=max_size),
        "prose": prose(),
        "plain": plain_words(),
        "long_words": st.lists(st.one_of(long_words(), words()), max_size=8).map(" ".join),
        "blank": whitespace(),
    }
    if kind == "any":
        return st.one_of(*kinds.values(), st.lists(st.one_of(*kinds.values()), max_size=4).map("\n\n".join))
    return kinds[kind]


def nonblank_texts(*, kind: str = "any") -> st.SearchStrategy[str]:
    """Texts holding at least one non-whitespace character (hence at least one token)."""
    base = texts(kind=kind)
    return st.one_of(base.filter(str.strip), st.builds(lambda a, w: f"{a} {w}", base, words()))


def document_texts() -> st.SearchStrategy[str]:
    """Texts a corpus file may hold and read back unchanged: non-blank, no NUL, no leading BOM."""
    return nonblank_texts().map(lambda t: t.replace("\x00", "").lstrip("\ufeff")).filter(str.strip)


# ------------------------------------------------------------------------------------- documents

segment = st.text(string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=6)


def relpaths(*, extension: str = ".txt", max_depth: int = 2) -> st.SearchStrategy[str]:
    """A safe corpus-relative POSIX path: dot-free directory names, a file name ending in ``extension``."""
    return st.builds(
        lambda dirs, name: "/".join([*dirs, name + extension]),
        st.lists(segment, max_size=max_depth),
        segment,
    )


def corpora(
    text: st.SearchStrategy[str] | None = None, *, min_size: int = 0, max_size: int = 6
) -> st.SearchStrategy[dict[str, str]]:
    """A corpus as ``{relpath: text}`` (file names have an extension, directories never do: no clashes)."""
    return st.dictionaries(
        relpaths(), text if text is not None else document_texts(), min_size=min_size, max_size=max_size
    )


# What a hostile corpus file may be, and the bytes of such a file. ``oversize`` is relative to a limit.
FILE_KINDS = ("text", "empty", "whitespace", "binary", "bad_utf8", "oversize", "other_extension")


def file_bytes(kind: str, *, max_document_bytes: int) -> st.SearchStrategy[bytes]:
    """Bytes of a corpus file of ``kind`` (see :data:`FILE_KINDS`), valid for the given size limit."""
    small = st.text(WORD_ALPHABET + " .\n", min_size=1, max_size=max_document_bytes // 4).filter(str.strip)
    if kind in ("text", "other_extension"):
        return small.map(str.encode)
    if kind == "empty":
        return st.just(b"")
    if kind == "whitespace":
        return whitespace(max_size=max_document_bytes // 4).filter(bool).map(str.encode)
    if kind == "binary":
        return st.builds(lambda a, b: a.encode() + b"\x00" + b, small, st.binary(max_size=8))
    if kind == "bad_utf8":
        return bad_utf8().map(lambda case: case[0])
    if kind == "oversize":
        return st.integers(max_document_bytes + 1, max_document_bytes + 64).map(lambda n: b"x" * n)
    raise ValueError(kind)


def bad_utf8() -> st.SearchStrategy[tuple[bytes, int]]:
    """Bytes that are not UTF-8, and the offset of the first offending byte (with or without a BOM)."""
    bom = st.sampled_from([b"", b"\xef\xbb\xbf"])
    bad = st.sampled_from([b"\xff", b"\xfe", b"\xc3(", b"\xe2\x82(", b"\x80", b"\xed\xa0\x80"])
    valid = st.text(max_size=20).map(lambda t: t.encode("utf-8")).filter(lambda b: b"\x00" not in b)
    return st.builds(lambda m, p, x, s: (m + p + x + s, len(m) + len(p)), bom, valid, bad, valid.map(bytes))


@st.composite
def hostile_corpora(
    draw: st.DrawFn, *, max_document_bytes: int, max_size: int = 8
) -> dict[str, tuple[str, bytes]]:
    """``{relpath: (kind, bytes)}``: a corpus mixing good text files with every kind of bad file."""
    paths = draw(st.lists(relpaths(extension=""), min_size=1, max_size=max_size, unique=True))
    out = {}
    for p in paths:
        kind = draw(st.sampled_from(FILE_KINDS))
        ext = ".bin" if kind == "other_extension" else draw(st.sampled_from([".txt", ".md", ".RST"]))
        out[p + ext] = (kind, draw(file_bytes(kind, max_document_bytes=max_document_bytes)))
    return out


# ---------------------------------------------------------------------------------- token counts


def token_count_lists(
    *, min_size: int = 0, max_size: int = 60, max_count: int = 40, huge: bool | None = None
) -> st.SearchStrategy[list[int]]:
    """Token counts of an ordered chunk list; ``huge=True`` adds one chunk far above any batch cap."""
    counts = st.lists(st.integers(1, max_count), min_size=min_size, max_size=max_size)
    with_huge = st.builds(
        lambda xs, i, n: xs[:i] + [n] + xs[i:], counts, st.integers(0, max_size), st.integers(10**4, 10**6)
    )
    if huge is None:
        return st.one_of(counts, with_huge)
    return with_huge if huge else counts


def batch_sizes(n: int) -> st.SearchStrategy[int]:
    """Batch sizes from 1 to beyond the list length ``n``."""
    return st.integers(1, max(1, n) + 3)


def token_caps(*, max_cap: int = 120) -> st.SearchStrategy[int | None]:
    """A per-batch token cap, or none."""
    return st.one_of(st.none(), st.integers(1, max_cap))


# ------------------------------------------------------------------------------------------ models

OFFLINE_MODELS = tuple(m for m in KNOWN_MODELS if m != "minilm")


def model_lists(
    *, synthetic: bool = False, min_size: int = 1, max_size: int = 3
) -> st.SearchStrategy[list[str]]:
    """Distinct model names: the offline registry models, or synthetic names (for pure aggregation)."""
    names = (
        st.sampled_from(OFFLINE_MODELS) if not synthetic else st.from_regex(r"m-[a-z]{1,4}", fullmatch=True)
    )
    upper = max_size if synthetic else min(max_size, len(OFFLINE_MODELS))
    return st.lists(names, min_size=min_size, max_size=upper, unique=True)


# ----------------------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fate:
    """What the provider does with one (chunk, model) pair: succeed, fail ``transient`` times first, or refuse."""

    permanent: bool = False
    transient: int = 0


OK = Fate()


def fates(
    *, transient: bool = True, permanent: bool = True, max_transient: int = 3
) -> st.SearchStrategy[Fate]:
    options: list[st.SearchStrategy[Fate]] = [st.just(OK)]
    if transient:
        options.append(st.integers(1, max_transient).map(lambda k: Fate(transient=k)))
    if permanent:
        options.append(st.just(Fate(permanent=True)))
    return st.one_of(*options)


def failure_masks(
    ids: Sequence[str], models: Sequence[str], **kwargs: Any
) -> st.SearchStrategy[dict[tuple[str, str], Fate]]:
    """A fate for every chunk × model pair."""
    pairs = [(i, m) for m in models for i in ids]
    return st.lists(fates(**kwargs), min_size=len(pairs), max_size=len(pairs)).map(
        lambda fs: dict(zip(pairs, fs, strict=True))
    )


def permanent_set(mask: dict[tuple[str, str], Fate]) -> set[tuple[str, str]]:
    return {pair for pair, fate in mask.items() if fate.permanent}


@dataclass
class MaskedCall:
    """A provider following a failure mask for one model: like ``FaultyCall`` but with explicit fates.

    A request holding a permanent pair is refused as a whole (HTTP 400); else a request holding a pair with
    transient failures left fails (429, with ``retry_after``) and uses up one failure of each such pair.
    """

    mask: dict[tuple[str, str], Fate]
    model: str
    dim: int = 3
    retry_after: float | None = None
    calls: list[list[str]] = field(default_factory=list)
    _left: dict[str, int] = field(default_factory=dict)

    def __call__(self, ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(ids))
        fates = [self.mask.get((i, self.model), OK) for i in ids]
        if any(f.permanent for f in fates):
            raise InputRejectedError("refused")
        flaky = [i for i, f in zip(ids, fates, strict=True) if self._left.setdefault(i, f.transient) > 0]
        if flaky:
            for i in flaky:
                self._left[i] -= 1
            raise TransientEmbeddingError("busy", retry_after=self.retry_after)
        return unit_vectors(ids, self.dim)


def unit_vectors(ids: Sequence[str], dim: int) -> np.ndarray:
    """Deterministic unit vectors, one per id (a stand-in embedding)."""
    rows = [np.random.default_rng(list(i.encode()) or [0]).normal(size=dim) + 1e-3 for i in ids]
    out = np.asarray(rows, np.float32).reshape(len(ids), dim)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def chunk_ids(*, min_size: int = 0, max_size: int = 40) -> st.SearchStrategy[list[str]]:
    """Distinct chunk ids shaped like ``pipeline.chunking.chunk_id``."""
    return st.integers(min_size, max_size).map(lambda n: [f"doc.txt#{i}:{i:012x}" for i in range(n)])


# ------------------------------------------------------------------------------- embed results


@dataclass(frozen=True)
class SyntheticRun:
    """A plan, models and chunk ids, a failure mask, and the results ``steps.embed_batch`` would return."""

    chunk_ids: list[str]
    models: list[str]
    plan: list[dict[str, int]]
    mask: dict[tuple[str, str], Fate]
    results: list[dict[str, Any]]  # one per (batch, model), in plan order
    vectors: dict[tuple[int, str], np.ndarray]  # the vectors each result summarises

    def ids_of(self, start: int, stop: int) -> list[str]:
        return self.chunk_ids[start:stop]

    @property
    def permanent(self) -> set[tuple[str, str]]:
        return permanent_set(self.mask)

    def pairs_of(self, result: dict[str, Any]) -> set[tuple[str, str]]:
        return {(c, result["model"]) for c in self.ids_of(result["start"], result["stop"])}


def embed_result(
    batch: Batch, model: str, ids: Sequence[str], mask: dict[tuple[str, str], Fate], vectors: np.ndarray
) -> dict[str, Any]:
    """A result dict shaped exactly like ``pipeline.steps.embed_batch``'s, for ``ids`` under ``mask``."""
    failures = [[c, "rejected", "refused"] for c in ids if mask[(c, model)].permanent]
    ok = [c for c in ids if not mask[(c, model)].permanent]
    retried = sum(1 for c in ok if mask[(c, model)].transient)
    return {
        "batch": batch.index,
        "model": model,
        "start": batch.start,
        "stop": batch.stop,
        "succeeded": len(ok),
        "failures": failures,
        "retried": retried,
        "calls": 1 + max((mask[(c, model)].transient for c in ok), default=0) + 2 * len(failures),
        "dim": vectors.shape[1],
        "norms": NormStats.of(vectors).as_list() if ok else None,
        "vectors": f"mem://{model}/{batch.index}" if ok else None,
    }


@st.composite
def synthetic_runs(
    draw: st.DrawFn,
    *,
    min_chunks: int = 0,
    max_chunks: int = 30,
    synthetic_models: bool = True,
    transient: bool = True,
) -> SyntheticRun:
    """A whole fan-out: chunk ids, a batch plan, models, a failure mask and one result per (batch, model)."""
    ids = draw(chunk_ids(min_size=min_chunks, max_size=max_chunks))
    models = draw(model_lists(synthetic=synthetic_models))
    plan = plan_batches([1] * len(ids), batch_size=draw(batch_sizes(len(ids))))
    mask = draw(failure_masks(ids, models, transient=transient))
    dims = {m: draw(st.integers(1, 6)) for m in models}
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    results, vectors = [], {}
    for batch in plan:
        for model in models:
            batch_ids = ids[batch.start : batch.stop]
            ok = [c for c in batch_ids if not mask[(c, model)].permanent]
            v = rng.normal(size=(len(ok), dims[model])) * rng.uniform(0.5, 2.0, size=(len(ok), 1))
            vectors[(batch.index, model)] = v
            results.append(embed_result(batch, model, batch_ids, mask, v))
    return SyntheticRun(ids, models, [b.as_dict() for b in plan], mask, results, vectors)


def ceil_log2(n: int) -> int:
    return math.ceil(math.log2(n)) if n > 1 else 0


# --------------------------------------------------------------------------------------------- real clients


def resilient_run(client: Any, texts: Sequence[str], *, max_attempts: int = 4, cap: float = 30.0,
                  base: float = 0.5, sleep: Any = None) -> tuple[Any, list[float], int]:  # fmt: skip
    """embed_resiliently over a real client's embedder (ids ``c0``, ``c1``...): ``(outcome, sleeps, transient
    errors)``. Sleeps are only recorded, unless ``sleep`` (e.g. ``time.sleep``) is given to really wait."""
    from pipeline.resilience import Backoff, embed_resiliently

    embedder = client.embedder()
    sleeps: list[float] = []
    transient = 0

    def call(ids: Sequence[str], batch: Sequence[str]) -> np.ndarray:
        nonlocal transient
        try:
            return embedder.embed(batch)
        except TransientEmbeddingError:
            transient += 1
            raise

    def pause(seconds: float) -> None:
        sleeps.append(seconds)
        if sleep is not None:
            sleep(seconds)

    ids = [f"c{i}" for i in range(len(texts))]
    backoff = Backoff(base=base, max_attempts=max_attempts, cap=cap)
    return embed_resiliently(ids, texts, call, backoff=backoff, sleep=pause), sleeps, transient


def permit_lags(records: list, permits: list, limits: dict[str, int], window: float, clock: float) -> dict:
    """The budget's own evidence, checked exactly; returns each kind's largest permit-to-arrival lag (s) of a
    request the provider accepted. ``permits``: (texts_digest, stamps in ms by kind, tokens charged) of every
    request sent (an ``on_permit`` log); ``records``: the provider's log; ``clock``: seconds from the provider's
    time.monotonic() to the stamps' wall clock. In any window, the permits of each kind weigh at most its limit
    (closed windows of whole ms, as the buckets count); every request the provider saw had its own permit, was
    sent after it and charged at least what the provider counted; no permit was spent twice."""
    for kind, limit in limits.items():
        stamps = sorted((p[1][kind], 1 if kind == "requests" else p[2]) for p in permits)
        spent = peak([SimpleNamespace(t=t, tokens=w) for t, w in stamps], window * 1000 + 1, kind)
        assert spent <= limit, (f"the budget granted {spent} {kind} in {window} s, limit {limit}", stamps)
    unsent: dict[str, list] = {}
    for digest, stamps, charged in permits:  # a batch is sent again only after its previous answer
        unsent.setdefault(digest, []).append(({k: s / 1000 - clock for k, s in stamps.items()}, charged))
    lags = dict.fromkeys(limits, 0.0)
    for r in sorted(records, key=lambda r: r.t):
        assert unsent.get(texts_digest(r.texts)), (
            f"the provider saw a request the budget never permitted: {r}"
        )
        when, charged = unsent[texts_digest(r.texts)].pop(0)
        assert r.tokens <= charged, (r, charged)
        for kind in limits:
            assert r.t - when[kind] > -0.001, (kind, r, when)  # arrived after its permit (stamps: whole ms)
            if r.status == 200:
                lags[kind] = max(lags[kind], r.t - when[kind])
    assert not any(unsent.values()), unsent
    return lags
