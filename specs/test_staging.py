"""Staging: chunk sets and vectors round-trip through files; a task reads exactly its batch's range."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline import staging
from pipeline.chunking import Chunk, chunk_id
from pipeline.compat import AIRFLOW_3

# Airflow's names for the local disk in a URL: Airflow 2 registers a file system for file:// only.
LOCAL_SCHEMES = [
    "file",
    pytest.param("local", marks=pytest.mark.skipif(not AIRFLOW_3, reason="Airflow 2: no local://")),
]

texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)
# Text that JSON writes as it is (it escapes quotes, backslashes and control characters).
verbatim_texts = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"), exclude_characters='"\\')
)


@settings(max_examples=30, deadline=None)
@given(st.lists(texts, max_size=12), st.data())
def test_a_staged_chunk_set_reads_back_any_range_exactly(tmp_path_factory, bodies: list[str], data) -> None:
    """Any [start, stop) of a staged chunk set reads back exactly those chunks, in order, with their token counts."""
    chunks = [Chunk(chunk_id(f"d{i}.txt", 0, t), f"d{i}.txt", 0, t, len(t)) for i, t in enumerate(bodies)]
    ref = staging.write_chunk_set(str(tmp_path_factory.mktemp("set")), chunks)
    assert ref["count"] == len(chunks) and ref["tokens"] == sum(c.tokens for c in chunks)
    assert staging.read_token_counts(ref) == [c.tokens for c in chunks]
    start = data.draw(st.integers(0, len(chunks)))
    stop = data.draw(st.integers(start, len(chunks)))
    assert staging.read_chunks(ref, start, stop) == chunks[start:stop]
    assert staging.read_chunks(ref) == chunks


def test_a_range_outside_the_set_is_refused(tmp_path) -> None:
    """Reading past the end of a chunk set raises instead of returning a short batch."""
    ref = staging.write_chunk_set(str(tmp_path), [Chunk("a#0:x", "a", 0, "text", 1)])
    with pytest.raises(IndexError, match="outside a set of 1"):
        staging.read_chunks(ref, 0, 2)


@example(ids=["\x00"], dim=1).via("numpy's str arrays dropped trailing NULs")
@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=8, unique=True), st.integers(1, 6))
def test_staged_vectors_read_back_with_their_ids(tmp_path_factory, ids: list[str], dim: int) -> None:
    """Vectors staged for a batch read back bit-identical, as float32, with their ids in order."""
    vectors = np.arange(len(ids) * dim, dtype=np.float32).reshape(len(ids), dim) / 7
    path = str(tmp_path_factory.mktemp("v") / "vectors" / "m" / "000001.npz")
    staging.write_vectors(path, ids, vectors)
    got_ids, got = staging.read_vectors(path)
    assert got_ids == ids
    assert got.dtype == np.float32 and np.array_equal(got, vectors)


def test_a_staged_file_holding_pickled_objects_is_refused_not_unpickled(tmp_path) -> None:
    """Staged files are read without pickle: a file with Python objects in it cannot run code in a task."""
    np.savez(tmp_path / "v.npz", ids=np.array([{"not": "an id"}], dtype=object), vectors=np.eye(1))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        staging.read_vectors(str(tmp_path / "v.npz"))


def test_vectors_of_any_float_type_are_staged_as_float32(tmp_path) -> None:
    """An encoder's float64 rows are staged (and read back) as float32, the store's type, at half the bytes."""
    vectors = np.array([[1 / 3, 2 / 3], [0.1, 0.7]], dtype=np.float64)
    staging.write_vectors(str(tmp_path / "v.npz"), ["a", "b"], vectors)
    ids, got = staging.read_vectors(str(tmp_path / "v.npz"))
    assert ids == ["a", "b"] and got.dtype == np.float32 and np.array_equal(got, vectors.astype(np.float32))


@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60))
def test_a_report_written_as_text_reads_back_the_same_into_a_folder_made_for_it(
    tmp_path_factory, text
) -> None:
    """write_text creates the report's folders and stores UTF-8; read_text returns it, and None for no file."""
    base = tmp_path_factory.mktemp("report")
    uri = str(base / "reports" / "run" / "report.json")
    assert staging.read_text(uri) is None
    staging.write_text(uri, text)
    assert staging.read_text(uri) == text
    assert (base / "reports" / "run" / "report.json").read_bytes() == text.encode("utf-8")


@pytest.mark.smoke
def test_a_file_url_stages_through_airflows_object_storage_path(tmp_path) -> None:
    """A ``file://`` work dir goes through Airflow's ObjectStoragePath (as ``s3://`` would) and reads back the same."""
    from pipeline.compat import ObjectStoragePath

    uri = f"file://{tmp_path}/chunks"
    assert isinstance(staging.as_path(uri), ObjectStoragePath)
    chunks = [Chunk(chunk_id("a.txt", i, f"text {i}"), "a.txt", i, f"text {i}", 2) for i in range(3)]
    ref = staging.write_chunk_set(uri, chunks)
    assert (tmp_path / "chunks" / "chunks.jsonl").exists()
    assert staging.read_chunks(ref, 1, 3) == chunks[1:]
    staging.write_vectors(f"file://{tmp_path}/v/1.npz", ["x", "y"], np.eye(2, dtype=np.float32))
    assert staging.read_vectors(f"file://{tmp_path}/v/1.npz")[0] == ["x", "y"]


@example(["Grüße aus 東京 🚀"]).via("non-ASCII text is staged as UTF-8, not as \\u escapes")
@given(st.lists(verbatim_texts))
def test_staged_chunk_text_is_utf8_as_written(tmp_path_factory, bodies: list[str]) -> None:
    """chunks.jsonl holds each chunk's text verbatim in UTF-8 (no \\u escapes: staging costs the text's own bytes)."""
    chunks = [Chunk(chunk_id("d.txt", i, t), "d.txt", i, t, 1) for i, t in enumerate(bodies)]
    root = tmp_path_factory.mktemp("set")
    staging.write_chunk_set(str(root), chunks)
    lines = (root / "chunks.jsonl").read_bytes().splitlines()
    assert [t.encode("utf-8") in line for t, line in zip(bodies, lines, strict=True)] == [True] * len(bodies)


def test_a_local_chunk_set_reference_carries_no_connection(tmp_path) -> None:
    """A chunk set on local disk is referenced by exactly its uri, count and tokens: a path needs no connection."""
    ref = staging.write_chunk_set(str(tmp_path), [Chunk("a#0:x", "a", 0, "text", 3)], conn_id="aws_default")
    assert ref == {"uri": str(tmp_path), "count": 1, "tokens": 3}


@pytest.mark.parametrize("scheme", ["file", "local"])
def test_a_url_path_and_the_paths_under_it_go_through_the_connection_given(tmp_path, scheme: str) -> None:
    """as_path(url, conn_id) is an ObjectStoragePath of that connection, and so is every path joined under it."""
    path = staging.as_path(f"{scheme}://{tmp_path}/set", "staging_conn")
    conn_ids = [p.serialize()["conn_id"] for p in (path, path / "chunks.jsonl", path.parent)]
    assert conn_ids == ["staging_conn"] * 3


@pytest.mark.parametrize("scheme", LOCAL_SCHEMES)
def test_a_chunk_set_on_a_url_names_its_connection_in_its_reference(tmp_path, scheme: str) -> None:
    """A URL chunk set's reference adds its conn_id (an id, never a key): readers in other tasks go through it."""
    chunks = [Chunk(chunk_id("a.txt", i, f"text {i}"), "a.txt", i, f"text {i}", 2) for i in range(3)]
    uri = f"{scheme}://{tmp_path}/set"
    ref = staging.write_chunk_set(uri, chunks, conn_id="staging_conn")
    assert ref == {"uri": uri, "count": 3, "tokens": 6, "conn_id": "staging_conn"}
    assert staging.read_chunks(ref) == chunks


@pytest.mark.parametrize("scheme", LOCAL_SCHEMES)
def test_local_urls_get_the_folders_they_need(tmp_path, scheme: str) -> None:
    """``file://`` and ``local://`` (Airflow 3's two names for the local disk) get missing folders made, as paths do."""
    base = f"{scheme}://{tmp_path}"
    ref = staging.write_chunk_set(f"{base}/runs/r/chunks", [Chunk("a#0:x", "a", 0, "text", 1)])
    staging.write_vectors(f"{base}/runs/r/vectors/m/000001.npz", ["a#0:x"], np.eye(1, dtype=np.float32))
    staging.write_text(f"{base}/reports/r.json", "{}")
    assert staging.read_chunks(ref)[0].text == "text" and staging.read_text(f"{base}/reports/r.json") == "{}"
    assert staging.read_vectors(f"{base}/runs/r/vectors/m/000001.npz")[0] == ["a#0:x"]


def test_a_staged_mask_says_per_model_which_chunks_to_embed_and_no_mask_means_all(tmp_path) -> None:
    """read_mask gives model j's column of the staged mask for chunks [start, stop); a set staged without a mask
    (no sync) has every chunk to embed."""
    chunks = [Chunk(chunk_id("a.txt", i, f"t {i}"), "a.txt", i, f"t {i}", 2) for i in range(4)]
    ref = staging.write_chunk_set(str(tmp_path), chunks)
    assert staging.read_mask(ref, 1, 4, "m") == [True, True, True]
    mask = np.array([[True, False], [False, False], [True, True], [False, True]])
    masked = staging.write_mask(ref, ["m", "n"], mask)
    assert staging.read_mask(masked, 0, 4, "m") == [True, False, True, False]
    assert staging.read_mask(masked, 1, 4, "n") == [False, True, True]


@pytest.mark.parametrize("scheme", LOCAL_SCHEMES)
def test_vectors_and_texts_on_a_url_are_staged_through_the_connection_given(
    monkeypatch, tmp_path, scheme
) -> None:
    """Vectors and text files written to (and read from) a URL go through the connection given (on object storage:
    its keys), as chunk sets do: every path staging opens is an ObjectStoragePath of that connection."""
    as_path, conn_ids = staging.as_path, []

    def recording(uri: str, conn_id: str | None = None):
        path = as_path(uri, conn_id)
        conn_ids.append(path.serialize()["conn_id"])
        return path

    monkeypatch.setattr(staging, "as_path", recording)
    base = f"{scheme}://{tmp_path}"
    staging.write_vectors(
        f"{base}/vectors/m/000001.npz", ["a#0:x"], np.eye(1, dtype=np.float32), "staging_conn"
    )
    assert staging.read_vectors(f"{base}/vectors/m/000001.npz", "staging_conn")[0] == ["a#0:x"]
    staging.write_text(f"{base}/reports/r.json", "{}", "staging_conn")
    assert staging.read_text(f"{base}/reports/r.json", "staging_conn") == "{}"
    assert conn_ids == ["staging_conn"] * 4
