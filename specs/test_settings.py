"""Run settings: validated up front from DAG params / CLI options; errors name the setting."""

from __future__ import annotations

import dataclasses
import json
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
    "batch_size": [0, -3, "abc", 1.5, True, "2.5", float("nan"), float("inf"), "automatic"],
    "max_request_tokens": [0, "many"],
    "max_request_inputs": [0, -1, "all"],
    "request_concurrency": [0, 1.5, "several", True],
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
    "max_failed_share": [-0.1, 1.5, "most"],
    "object_storage_conn_id": [""],
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
        "batch_size": draw(
            st.integers(1, 512).map(lambda n: draw(st.sampled_from([n, str(n), float(n), "auto", "AUTO"])))
        ),
        "max_request_tokens": draw(st.integers(1, 10**5)),
        "max_request_inputs": draw(st.integers(1, 4096)),
        "request_concurrency": draw(st.sampled_from([draw(st.integers(1, 64)), "auto", " Auto "])),
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
    assert (isinstance(settings.batch_size, int) or settings.batch_size == "auto") and isinstance(
        settings.models, tuple
    )
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


# The error text users see, per setting: "<name>=<value given>: <what to pass instead>".
FIXES: dict[str, tuple[Any, str]] = {
    "corpus_dir": ("", "pass the corpus directory"),
    "granularity": ("document", "use one of batch, chunk"),
    "batch_size": (0, "must be >= 1, or auto"),
    "max_request_tokens": (0, "must be >= 1"),
    "max_request_inputs": (0, "must be >= 1"),
    "request_concurrency": (0, "must be >= 1, or auto"),
    "chunk_tokens": (0, "must be >= 1"),
    "chunk_overlap": (200, "must be >= 0 and < chunk_tokens"),
    "max_document_bytes": (0, "must be >= 1"),
    "max_attempts": (0, "must be >= 1"),
    "backoff_seconds": (-1.0, "must be >= 0"),
    "compare_max_chunks": (1, "must be >= 2"),
    "max_failed_share": (1.5, "must be between 0 and 1"),
    "object_storage_conn_id": ("", "name an Airflow connection"),
    "extensions": ((), "list at least one file extension, e.g. .txt"),
    "cleanup": ("everything", "use one of none, incremental, full"),
    "force_cleanup": ("yes", "expected true or false"),
}


@pytest.mark.parametrize("name", sorted(FIXES))
def test_the_error_shows_the_setting_the_value_given_and_the_fix(name: str) -> None:
    """An out-of-range setting fails with exactly ``<name>=<value>: <fix>``."""
    value, fix = FIXES[name]
    with pytest.raises(SettingsError) as raised:
        Settings(**({"corpus_dir": "c"} | {name: value}))
    assert str(raised.value) == f"{name}={value!r}: {fix}"


# The smallest value each numeric setting accepts (one below it is refused, by BAD_VALUES / FIXES).
SMALLEST_ACCEPTED = {
    "batch_size": 1, "max_request_tokens": 1, "max_request_inputs": 1, "request_concurrency": 1,
    "max_document_bytes": 1, "max_attempts": 1,
    "backoff_seconds": 0.0, "compare_max_chunks": 2,
    "max_failed_share": 0.0,  # no failed pair tolerated
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SMALLEST_ACCEPTED))
def test_lower_bounds_are_inclusive(name: str) -> None:
    """Each numeric setting accepts its documented minimum itself."""
    assert getattr(Settings("c", **{name: SMALLEST_ACCEPTED[name]}), name) == SMALLEST_ACCEPTED[name]


# The largest value each bounded setting accepts (a share or a probability: 1 itself is allowed).
LARGEST_ACCEPTED = {"max_failed_share": 1.0, "fail_rate": 1.0, "transient_rate": 1.0}


@pytest.mark.parametrize("name", sorted(LARGEST_ACCEPTED))
def test_upper_bounds_are_inclusive(name: str) -> None:
    """A share or a rate may be 1 itself (max_failed_share=1: fail only when nothing succeeded)."""
    assert getattr(Settings("c", **{name: LARGEST_ACCEPTED[name]}), name) == LARGEST_ACCEPTED[name]


def test_a_one_token_chunk_budget_is_accepted_with_no_overlap() -> None:
    """chunk_tokens=1 is the smallest budget; the overlap must then be 0."""
    assert Settings("c", chunk_tokens=1, chunk_overlap=0).chunk_tokens == 1


def test_an_unknown_model_error_names_the_models_given() -> None:
    """A bad model list fails with ``models=<list given>: unknown model(s) ...; known: ...``."""
    with pytest.raises(SettingsError) as raised:
        Settings("c", models=("hash-words-256", "gpt-17"))
    message = str(raised.value)
    assert message.startswith("models=('hash-words-256', 'gpt-17'): unknown model(s) gpt-17; known: ")


def test_models_are_deduplicated_in_order() -> None:
    """Naming a model twice embeds with it once; the first-mentioned order is kept."""
    settings = Settings.from_params(
        {"corpus_dir": "c", "models": "hash-chars-384,hash-words-256,hash-chars-384"}
    )
    assert settings.models == ("hash-chars-384", "hash-words-256")


def test_unknown_settings_message_lists_them_and_every_known_setting() -> None:
    """The message is ``unknown setting(s) a, b; known: <every setting, comma-separated>``."""
    with pytest.raises(SettingsError) as raised:
        Settings.from_params({"corpus_dir": "c", "zeta": 1, "alpha": 2})
    known = ", ".join(f.name for f in dataclasses.fields(Settings))
    assert str(raised.value) == f"unknown setting(s) alpha, zeta; known: {known}"


def test_a_none_param_does_not_stop_the_ones_after_it() -> None:
    """Params after an unset (None) one still apply."""
    settings = Settings.from_params(
        {"corpus_dir": "c", "batch_size": None, "chunk_tokens": 50, "chunk_overlap": 5}
    )
    assert (settings.batch_size, settings.chunk_tokens, settings.chunk_overlap) == ("auto", 50, 5)


@pytest.mark.parametrize("name", ["fail_rate", "transient_rate", "backoff_seconds", "max_failed_share"])
def test_fractional_settings_accept_numeric_strings(name: str) -> None:
    """Rates, the backoff and the failure budget given as strings (the trigger form's text fields) become floats."""
    settings = Settings.from_params({"corpus_dir": "c", name: "0.25"})
    assert getattr(settings, name) == 0.25 and isinstance(getattr(settings, name), float)


@pytest.mark.parametrize("name", ["corpus_dir", "work_dir", "store_uri", "report_path"])
def test_local_paths_become_absolute_and_uris_stay_as_given(name: str, tmp_path, monkeypatch) -> None:
    """Tasks may run in another working directory, so relative paths are resolved once; URIs are kept."""
    monkeypatch.chdir(tmp_path)
    assert getattr(Settings(**({"corpus_dir": "c"} | {name: "rel/x"})), name) == str(tmp_path / "rel" / "x")
    assert getattr(Settings(**({"corpus_dir": "c"} | {name: "s3://bucket/x"})), name) == "s3://bucket/x"


@given(valid_params())
def test_as_dict_survives_a_json_round_trip_unchanged(params: dict[str, Any]) -> None:
    """as_dict() is plain JSON (lists, not tuples): what the report stores is what from_params gets back."""
    plain = Settings.from_params(params).as_dict()
    assert json.loads(json.dumps(plain)) == plain


@pytest.mark.parametrize("value", [2.5, "2.5"])
def test_a_fractional_count_is_refused_not_rounded(value: Any) -> None:
    """batch_size=2.5 is an error, never silently 2."""
    with pytest.raises(SettingsError) as raised:
        Settings.from_params({"corpus_dir": "c", "batch_size": value})
    expected = "expected a whole number" if isinstance(value, float) else "expected an integer or auto"
    assert str(raised.value) == f"batch_size={value!r}: {expected}"


@pytest.mark.parametrize(("name", "value", "wanted"), [("batch_size", "many", "an integer or auto"),
                                                        ("fail_rate", "half", "a number"),
                                                        ("max_attempts", True, "an integer")])  # fmt: skip
def test_a_value_of_the_wrong_type_says_what_type_is_expected(name: str, value: Any, wanted: str) -> None:
    """Text where a number belongs (or a boolean) fails with ``<name>=<value>: expected <type>``."""
    with pytest.raises(SettingsError) as raised:
        Settings.from_params({"corpus_dir": "c", name: value})
    assert str(raised.value) == f"{name}={value!r}: expected {wanted}"


def test_batch_size_auto_is_the_default_and_is_accepted_in_any_case() -> None:
    """batch_size defaults to auto (the planner sizes batches); "Auto" and " auto " mean the same."""
    assert Settings("c").batch_size == "auto"
    assert Settings.from_params({"corpus_dir": "c", "batch_size": " Auto "}).batch_size == "auto"
    assert Settings("c", granularity="chunk").effective_batch_size == 1


def test_request_concurrency_auto_is_the_default_and_environment_facts_next_to_settings_are_ignored() -> None:
    """request_concurrency defaults to auto (the embedder says how many requests in flight pay off); the facts
    the DAG adds next to the settings (the API models' token budget) are not settings and are not refused."""
    assert Settings("c").request_concurrency == "auto"
    assert (
        Settings.from_params({"corpus_dir": "c", "request_concurrency": "AUTO"}).request_concurrency == "auto"
    )
    found = Settings("c").as_dict() | {"rate_tokens_per_second": 2000.0}
    assert Settings.from_params(found) == Settings("c")


def test_max_batch_tokens_is_still_accepted_as_the_old_name_of_max_request_tokens() -> None:
    """The old name sets the request token cap, as a param, a keyword or an attribute; as_dict has the new name."""
    by_param = Settings.from_params({"corpus_dir": "c", "max_batch_tokens": "300"})
    by_keyword = Settings("c", max_batch_tokens=300)
    assert by_param == by_keyword == Settings("c", max_request_tokens=300)
    assert by_keyword.max_batch_tokens == by_keyword.max_request_tokens == 300
    assert "max_batch_tokens" not in by_param.as_dict() and by_param.as_dict()["max_request_tokens"] == 300


def test_the_old_and_new_name_disagreeing_is_refused() -> None:
    """max_batch_tokens and max_request_tokens given with different values: an error naming both."""
    with pytest.raises(SettingsError) as raised:
        Settings.from_params({"corpus_dir": "c", "max_batch_tokens": 10, "max_request_tokens": 20})
    assert (
        str(raised.value)
        == "max_batch_tokens is another name for max_request_tokens; pass only max_request_tokens"
    )
