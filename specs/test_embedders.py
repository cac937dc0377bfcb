"""The offline embedders: deterministic, L2-normalised, the right dimension; bad names and inputs refused."""

from __future__ import annotations

import json
import math
import os
import string
import subprocess
import sys
import tempfile
import zlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.chunking import TOKEN
from pipeline.embedders import (
    DEFAULT_MODELS,
    KNOWN_MODELS,
    MODEL_PREFIXES,
    Embedder,
    InputRejectedError,
    TransientEmbeddingError,
    UnknownModelError,
    get_embedder,
    hashing,
    model_version,
    runs_locally,
    validate_models,
)
from specs.strategies import OFFLINE_MODELS, nonblank_texts, whitespace

DIMS = {"hash-words-256": 256, "hash-chars-384": 384}
batches = st.lists(nonblank_texts(), min_size=1, max_size=8)
offline = st.sampled_from(OFFLINE_MODELS)


def test_the_defaults_are_the_offline_hashing_models() -> None:
    """The default models need no network and no download."""
    assert set(DEFAULT_MODELS) == set(OFFLINE_MODELS) == set(DIMS)


@pytest.mark.parametrize("model", OFFLINE_MODELS)
def test_an_embedder_carries_the_name_it_is_registered_under(model: str) -> None:
    """get_embedder(name).name is name: its errors name the model that was asked for."""
    assert get_embedder(model).name == model


@pytest.mark.parametrize("model", OFFLINE_MODELS)
def test_a_hashing_models_version_follows_the_hashing_version(model: str, monkeypatch) -> None:
    """Bumping ``hashing.VERSION`` changes each hashing model's version (its stored vectors become stale, sync
    re-embeds them); the two models never share a version."""
    before = {m: model_version(m) for m in OFFLINE_MODELS}
    monkeypatch.setattr(hashing, "VERSION", hashing.VERSION + "+bumped")
    after = model_version(model)
    assert after != before[model] and after.endswith("+bumped")
    assert len(set(before.values())) == len(OFFLINE_MODELS)


@given(offline, batches)
def test_rows_are_unit_length_with_the_models_dimension(model: str, texts: list[str]) -> None:
    """Every row is an L2-normalised float32 vector of the model's dimension."""
    vectors = get_embedder(model).embed(texts)
    assert vectors.shape == (len(texts), DIMS[model]) and vectors.dtype == np.float32
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(1.0, abs=1e-5)


@given(offline, batches)
def test_embedding_is_deterministic_and_independent_of_the_batch(model: str, texts: list[str]) -> None:
    """The same text gets the same vector in every call, alone or in any batch."""
    embedder = get_embedder(model)
    together = embedder.embed(texts)
    assert np.array_equal(together, get_embedder(model).embed(texts))
    for text, row in zip(texts, together, strict=True):
        assert np.array_equal(embedder.embed([text])[0], row)


def test_embedding_is_identical_in_another_process() -> None:
    """Vectors do not depend on the process (no ``hash()`` seed): a fresh interpreter computes the same bytes."""
    texts = ["Hello, world.", "Ünïcödé — 中文 text", "x" * 300]
    code = (
        "import json, sys; from pipeline.embedders import get_embedder;"
        "print(json.dumps({m: get_embedder(m).embed(json.loads(sys.argv[1])).tobytes().hex() for m in sys.argv[2:]}))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(texts), *OFFLINE_MODELS],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    there = json.loads(out.stdout)
    for model in OFFLINE_MODELS:
        assert there[model] == get_embedder(model).embed(texts).tobytes().hex()


@given(offline, st.lists(nonblank_texts(), max_size=3), st.integers(0, 3))
def test_an_empty_string_is_rejected_as_bad_input(model: str, texts: list[str], at: int) -> None:
    """A request holding an empty string is refused as InputRejectedError (a permanent, per-input failure)."""
    with pytest.raises(InputRejectedError, match="empty"):
        get_embedder(model).embed(texts[:at] + [""] + texts[at:])


@given(st.text(min_size=1).filter(lambda n: n not in KNOWN_MODELS and not n.startswith(MODEL_PREFIXES)))
def test_unknown_model_names_are_rejected_with_the_known_ones(name: str) -> None:
    """An unknown name is an UnknownModelError that names it and lists every known model."""
    with pytest.raises(UnknownModelError) as raised:
        get_embedder(name)
    message = str(raised.value)
    assert name in message and all(known in message for known in KNOWN_MODELS)


def test_no_model_at_all_is_rejected_with_the_known_ones() -> None:
    """An empty model list is refused, listing what could be passed."""
    with pytest.raises(UnknownModelError, match="hash-words-256"):
        validate_models([])


@given(st.lists(offline, min_size=1, max_size=6))
def test_model_lists_are_deduplicated_in_order(names: list[str]) -> None:
    """Repeated model names are embedded once, in first-mention order."""
    assert validate_models(names) == list(dict.fromkeys(names))


def cosine(model: str, a: str, b: str) -> float:
    va, vb = get_embedder(model).embed([a, b])
    return float(va @ vb)


def test_the_two_hashing_models_see_text_differently() -> None:
    """Words vs characters: a typo keeps most character n-grams but changes the word, and word order
    changes the word bigrams; so the two models disagree, which is what makes comparing them meaningful."""
    assert (
        cosine("hash-chars-384", "embedding", "embeding")
        > 0.5
        > cosine("hash-words-256", "embedding", "embeding")
    )
    words = get_embedder("hash-words-256").embed(["green apple pie", "apple pie green"])
    chars = get_embedder("hash-chars-384").embed(["green apple pie", "apple pie green"])
    assert words.shape[1] != chars.shape[1]
    assert not np.isclose(float(words[0] @ words[1]), float(chars[0] @ chars[1]))


@given(offline, whitespace().filter(bool))
def test_a_whitespace_only_text_embeds_to_the_zero_vector_not_nan(model: str, text: str) -> None:
    """Whitespace has no features: its row is all zeros (nothing to normalise), not NaN and not an error (chunks
    never are whitespace only: chunk_text makes none of a text without tokens)."""
    assert np.array_equal(get_embedder(model).embed([text]), np.zeros((1, DIMS[model]), np.float32))


@given(offline, nonblank_texts(), st.text(" \t\n\u00a0", min_size=1, max_size=3))
def test_the_amount_of_whitespace_between_tokens_does_not_change_the_vector(
    model: str, text: str, gap: str
) -> None:
    """Both hashing models see tokens, not layout: re-spacing a text (any whitespace runs) keeps its vector."""
    embedder = get_embedder(model)
    assert np.array_equal(embedder.embed([text]), embedder.embed([gap.join(text.split())]))


@given(offline, st.text(string.ascii_letters + string.digits + " .,", min_size=1).filter(str.strip))
def test_ascii_case_does_not_change_the_vector(model: str, text: str) -> None:
    """Both hashing models lowercase their features: "Apple" and "apple" embed the same."""
    embedder = get_embedder(model)
    assert np.array_equal(embedder.embed([text]), embedder.embed([text.swapcase()]))


# --- the hashing embedders, stated as a plain-Python reference -----------------------------------------------
# Stored vectors must stay comparable across releases, so the hashing models are frozen: this is their
# definition, written without numpy; the embedders must agree with it on any text.


def signed_hash_counts(features: list[str], dim: int) -> list[float]:
    """Each feature adds +1 or -1 (top bit of its CRC32) to bucket CRC32 mod dim; the sum is L2-normalised."""
    buckets = [0.0] * dim
    for feature in features:
        crc = zlib.crc32(feature.encode())
        buckets[crc % dim] += -1.0 if crc >> 31 else 1.0
    norm = math.sqrt(sum(x * x for x in buckets))
    return [x / norm for x in buckets] if norm else buckets


def word_features(text: str) -> list[str]:
    """hash-words-256 features: lower-cased word tokens and each pair of neighbouring tokens."""
    words = [w.lower() for w in TOKEN.findall(text)]
    return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]


def char_features(text: str) -> list[str]:
    """hash-chars-384 features: the 3-, 4- and 5-grams of the lower-cased text, whitespace runs as one space,
    padded with a space at each end."""
    padded = " " + " ".join(text.lower().split()) + " "
    return [padded[i : i + n] for n in (3, 4, 5) for i in range(len(padded) - n + 1)]


REFERENCE = {"hash-words-256": (word_features, 256), "hash-chars-384": (char_features, 384)}


@given(st.sampled_from(sorted(REFERENCE)), nonblank_texts())
@example("hash-words-256", "Hello HELLO world").via("case folds to lower, repeated words add up")
@example("hash-chars-384", "Ab").via("shorter than a 4-gram once padded")
def test_hashing_models_equal_their_reference_definition(model: str, text: str) -> None:
    """hash-words-256 / hash-chars-384 = L2-normalised signed CRC32 feature hashing of their features."""
    features, dim = REFERENCE[model]
    expected = np.asarray(signed_hash_counts(features(text), dim), np.float32)
    assert np.allclose(get_embedder(model).embed([text])[0], expected, atol=1e-6)


def test_the_reference_features_of_a_short_text() -> None:
    """Known answer: "Big  Cat" has words big, cat, "big cat" and the n-grams of " big cat "."""
    assert word_features("Big  Cat") == ["big", "cat", "big cat"]
    assert char_features("Big  Cat") == [" bi", "big", "ig ", "g c", " ca", "cat", "at ",
                                         " big", "big ", "ig c", "g ca", " cat", "cat ",
                                         " big ", "big c", "ig ca", "g cat", " cat "]  # fmt: skip


def test_signed_hashing_lets_collisions_cancel() -> None:
    """Features whose CRC32 top bits differ pull their bucket in opposite directions (not all +1)."""
    assert [zlib.crc32(w.encode()) >> 31 for w in ("apple", "plum")] == [1, 0]
    vector = get_embedder("hash-words-256").embed(["apple plum"])[0]
    assert (vector < 0).any() and (vector > 0).any()


class _Broken:
    """encode() stand-ins that break the embedder contract."""

    @staticmethod
    def wrong_shape(texts):
        return np.ones((len(texts), 3), np.float32)

    @staticmethod
    def not_finite(texts):
        return np.full((len(texts), 4), np.nan, np.float32)


@pytest.mark.parametrize("encode", [_Broken.wrong_shape, _Broken.not_finite])
def test_an_encoder_breaking_the_contract_is_an_error_naming_the_model(encode) -> None:
    """Rows of the wrong width, or NaN/inf values, never reach the store: embed() raises, naming the model."""
    embedder = Embedder("broken-model", 4, encode)
    with pytest.raises(RuntimeError, match=r"broken-model returned \(2, \d\), expected \(2, 4\) finite"):
        embedder.embed(["a", "b"])


def test_an_empty_input_error_says_so() -> None:
    """The empty-string refusal says what was wrong with the request."""
    with pytest.raises(InputRejectedError, match=r"^empty string in request; embedders reject empty inputs$"):
        get_embedder("hash-words-256").embed(["ok", ""])


def test_a_transient_error_keeps_its_message_and_retry_after() -> None:
    """TransientEmbeddingError carries the provider's message and its Retry-After (seconds)."""
    error = TransientEmbeddingError("429 slow down", retry_after=1.5)
    assert str(error) == "429 slow down" and error.retry_after == 1.5


@pytest.mark.smoke
def test_openai_names_resolve_through_the_airflow_connection(monkeypatch, tmp_path) -> None:
    """openai:<model>@<conn> builds a client from that Airflow connection (no request when dimensions is set)."""
    conn = {"conn_type": "http", "host": "http://127.0.0.1:9", "password": "k", "extra": {"dimensions": 8}}
    monkeypatch.setenv("AIRFLOW_CONN_EMB_OFFLINE", json.dumps(conn))
    embedder = get_embedder("openai:some-model@emb_offline", work_dir=str(tmp_path))
    assert (embedder.name, embedder.dim) == ("openai:some-model@emb_offline", 8)


# Three offline connections (no request: dimensions is set), two of them serving the same width.
WIDTHS = {"embedding_api": 8, "emb_offline": 8, "emb_wide": 16}


@given(st.from_regex(r"[a-z][a-z0-9.-]{0,15}", fullmatch=True), st.sampled_from(sorted(WIDTHS)))
@example("text-embedding-3-small", "embedding_api").via("no @<conn_id>: the default connection serves it")
def test_an_openai_models_version_is_the_providers_model_and_width_whichever_connection_serves_it(
    model: str, conn_id: str
) -> None:
    """The version of ``openai:<model>[@<conn_id>]`` is ``<model>@<dim>``: its stored vectors stay current when
    another connection serves the same model and width, and become stale when the width changes."""
    conns = {
        f"AIRFLOW_CONN_{c.upper()}": json.dumps(
            {"conn_type": "http", "host": "http://127.0.0.1:9", "password": "k", "extra": {"dimensions": dim}}
        )
        for c, dim in WIDTHS.items()
    }
    name = f"openai:{model}" if conn_id == "embedding_api" else f"openai:{model}@{conn_id}"
    with mock.patch.dict(os.environ, conns), tempfile.TemporaryDirectory() as work_dir:
        assert get_embedder(name, work_dir=work_dir).version == f"{model}@{WIDTHS[conn_id]}"


@given(
    st.sampled_from(KNOWN_MODELS)
    | st.from_regex(r"openai:[a-z][a-z0-9.-]{0,15}(@[a-z_]{1,8})?", fullmatch=True)
)
def test_the_registrys_models_run_locally_and_api_models_do_not(name: str) -> None:
    """runs_locally: the registry's models (hashing, MiniLM) are computed by the worker's CPU, an ``openai:``
    model by its provider (batch_size auto splits only the latter's corpus for parallel slots)."""
    assert runs_locally(name) == (not name.startswith("openai:"))


def test_vectors_are_float32_whatever_the_encoder_returns() -> None:
    """An encoder returning float64 (a provider's JSON, torch defaults) still yields float32 rows for the store."""
    vectors = Embedder("f64", 2, lambda texts: np.ones((len(texts), 2), np.float64)).embed(["a"])
    assert vectors.dtype == np.float32


@pytest.mark.parametrize("name", ["openai:", "openai:@emb_offline", "openai:@"])
def test_a_prefixed_name_without_a_model_is_rejected(name: str) -> None:
    """``openai:`` needs a model before any ``@<conn_id>``: ``openai:`` or ``openai:@conn`` is an unknown model."""
    with pytest.raises(UnknownModelError, match="unknown model"):
        validate_models([name])


def test_a_prefixed_name_with_a_model_is_known() -> None:
    """``openai:<model>`` and ``openai:<model>@<conn_id>`` are valid model names (resolved later, by connection)."""
    names = ["openai:text-embedding-3-small", "openai:m@emb_offline"]
    assert validate_models(names) == names


def test_every_unknown_model_is_named_in_the_error() -> None:
    """Several unknown models are listed comma-separated in one error, before the known ones."""
    with pytest.raises(UnknownModelError) as raised:
        validate_models(["nope", "hash-words-256", "also-nope"])
    assert str(raised.value).startswith("unknown model(s) nope, also-nope; known: hash-words-256, ")


def test_an_openai_models_rate_buckets_live_in_the_work_dir(monkeypatch, tmp_path) -> None:
    """The SQLite rate-limit buckets of ``openai:<model>@<conn>`` are under ``<work_dir>/ratelimit``, shared by
    the tasks that share that work dir."""
    extra = {"dimensions": 8, "requests_per_minute": 60}
    conn = {"conn_type": "http", "host": "http://127.0.0.1:9", "password": "k", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_EMB_OFFLINE", json.dumps(conn))
    get_embedder("openai:some-model@emb_offline", work_dir=str(tmp_path))
    assert any(p.suffix == ".sqlite" for p in (tmp_path / "ratelimit").iterdir())
