"""Run settings: validated up front from DAG params / CLI options; errors name the setting."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.settings import Settings, SettingsError
from specs.strategies import OFFLINE_MODELS, model_lists

# (setting, a value it must refuse): out of range, wrong type, non-whole numbers, booleans for numbers.
BAD_VALUES: dict[str, list[Any]] = {
    "corpus_dir": [""],
    "models": ["nope", ["hash-words-256", "gpt-17"], ""],
    "granularity": ["document", "BATCH"],
    "batch_size": [0, -3, "abc", 1.5, True, "2.5", float("nan"), float("inf")],
    "max_batch_tokens": [0, "many"],
    "chunk_tokens": [0, -1, 2.5],
    "chunk_overlap": [-1, 200, 10**6],
    "extensions": ["", " , "],
    "max_document_bytes": [0],
    "fail_rate": [-0.1, 1.5, "half", float("nan"), True],
    "transient_rate": [2, "x"],
    "fail_seed": ["seed", 0.5],
    "max_attempts": [0],
    "backoff_seconds": [-1, "slow"],
    "compare_max_chunks": [1, 0],
}
bad_settings = st.sampled_from(sorted(BAD_VALUES)).flatmap(
    lambda k: st.tuples(st.just(k), st.sampled_from(BAD_VALUES[k]))
)


@given(bad_settings)
@example(("batch_size", float("inf"))).via("infinity for a whole number")
@example(("models", "nope")).via("unknown model")
def test_a_bad_value_raises_settings_error_naming_the_setting(bad: tuple[str, Any]) -> None:
    """Every out-of-range or mistyped value is a SettingsError whose message names the setting."""
    name, value = bad
    params = {"corpus_dir": "corpus", name: value}
    with pytest.raises(SettingsError) as raised:
        Settings.from_params(params)
    assert name in str(raised.value)


def test_unknown_settings_are_errors_listing_the_known_ones() -> None:
    """A misspelt setting is refused (not ignored), and the message lists the valid names."""
    with pytest.raises(SettingsError, match="batch_sise") as raised:
        Settings.from_params({"corpus_dir": "c", "batch_sise": 4})
    assert "batch_size" in str(raised.value)


def test_fail_and_transient_rates_summing_above_one_are_refused() -> None:
    """fail_rate + transient_rate above 1 is a SettingsError naming both."""
    with pytest.raises(SettingsError, match="fail_rate \\+ transient_rate"):
        Settings.from_params({"corpus_dir": "c", "fail_rate": 0.7, "transient_rate": 0.7})


@st.composite
def valid_params(draw: st.DrawFn) -> dict[str, Any]:
    """DAG params as a user would pass them: some settings, numbers possibly as strings, lists as CSV."""
    chunk_tokens = draw(st.integers(1, 1000))
    fail = draw(st.floats(0, 1))
    params: dict[str, Any] = {
        "corpus_dir": draw(st.sampled_from(["corpus", "/data/corpus"])),
        "models": draw(model_lists().map(lambda ms: draw(st.sampled_from([ms, ",".join(ms)])))),
        "granularity": draw(st.sampled_from(["batch", "chunk"])),
        "batch_size": draw(st.integers(1, 512).map(lambda n: draw(st.sampled_from([n, str(n), float(n)])))),
        "max_batch_tokens": draw(st.integers(1, 10**5)),
        "chunk_tokens": chunk_tokens,
        "chunk_overlap": draw(st.integers(0, chunk_tokens - 1)),
        "extensions": draw(st.sampled_from([[".txt"], ".txt,.md", [".md", ".rst"]])),
        "max_document_bytes": draw(st.integers(1, 10**9)),
        "fail_rate": fail,
        "transient_rate": draw(st.floats(0, 1 - fail)),
        "fail_seed": draw(st.integers(0, 2**31)),
        "max_attempts": draw(st.integers(1, 10)),
        "backoff_seconds": draw(st.floats(0, 10)),
        "compare_max_chunks": draw(st.integers(2, 10**4)),
        "work_dir": "/tmp/work",
    }
    keep = draw(st.sets(st.sampled_from(sorted(params)))) | {"corpus_dir"}
    if keep & {
        "chunk_overlap",
        "chunk_tokens",
    }:  # drawn together: the default overlap may not fit a small budget
        keep |= {"chunk_overlap", "chunk_tokens"}
    return {k: v for k, v in params.items() if k in keep}


@given(valid_params())
def test_as_dict_round_trips_through_from_params(params: dict[str, Any]) -> None:
    """Settings.from_params(s.as_dict()) == s: the report's settings can re-create the run."""
    settings = Settings.from_params(params)
    assert Settings.from_params(settings.as_dict()) == settings


@given(valid_params())
def test_valid_params_are_converted_to_typed_values(params: dict[str, Any]) -> None:
    """Numbers given as strings or whole floats become ints; CSV lists become tuples without blanks."""
    settings = Settings.from_params(params)
    assert isinstance(settings.batch_size, int) and isinstance(settings.models, tuple)
    assert set(settings.models) <= set(OFFLINE_MODELS) and all(e.strip() for e in settings.extensions)
    assert settings.effective_batch_size == (1 if settings.granularity == "chunk" else settings.batch_size)


def test_none_means_the_default() -> None:
    """A param left as None (unset in the trigger form) takes the default."""
    assert (
        Settings.from_params({"corpus_dir": "c", "batch_size": None}).batch_size == Settings("c").batch_size
    )


def test_the_store_defaults_to_the_work_dir() -> None:
    """Without store_uri, vectors go to <work_dir>/store."""
    assert Settings("c", work_dir="/w").store_uri == "/w/store"
