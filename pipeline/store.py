"""The vector store: LanceDB, embedded (no server), one table per model keyed by chunk id.

Upserts are ``merge_insert`` on the stable chunk id, so re-running the same corpus adds no rows. The URI may
be a local directory or object storage (``s3://bucket/path``, ``gs://…``) or LanceDB Cloud (``db://…``)
without code changes; ``storage_options`` (endpoint, region, keys: see ``object_storage``) configure object
storage. ``lancedb`` is imported inside the functions: DAG parsing must stay cheap.

One task writes each table (``upsert_vectors``, not mapped; one active DAG run): LanceDB commits on S3 through
conditional puts, but concurrent merges into one table may conflict, so the design never has two writers.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np

from pipeline.chunking import Chunk, text_hash


@dataclass(frozen=True)
class UpsertResult:
    inserted: int
    updated: int


def table_name(model: str) -> str:
    """LanceDB table of ``model``: readable, and distinct for distinct models (``a/b`` vs ``a_b``)."""
    safe = re.sub(r"[^0-9A-Za-z_.-]", "_", model)
    if safe != model:  # something was replaced: disambiguate with a digest of the real name
        safe += "-" + hashlib.blake2b(model.encode(), digest_size=4).hexdigest()
    return "emb_" + safe


Options = dict[str, str] | None


def connect(uri: str, storage_options: Options = None) -> Any:
    import lancedb

    return lancedb.connect(uri, storage_options=storage_options or None)


# Sync columns (pipeline.sync): rows written before they existed get them as NULL, i.e. stale: re-embedded.
SYNC_COLUMNS = {"text_hash": "CAST(NULL AS STRING)", "model_version": "CAST(NULL AS STRING)"}


def upsert(
    uri: str,
    model: str,
    chunks: Sequence[Chunk],
    vectors: np.ndarray,
    *,
    version: str = "",
    compact: bool = True,
    storage_options: Options = None,
) -> UpsertResult:
    """Insert or update the vectors of ``chunks`` for ``model``; identical re-upserts leave the count unchanged.

    Each row records the chunk's text hash and the model ``version`` that embedded it (what sync compares).
    """
    import pyarrow as pa

    if len(chunks) != len(vectors):
        raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
    if not len(chunks):
        return UpsertResult(0, 0)
    dim = int(vectors.shape[1])
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("doc", pa.string()),
            ("ordinal", pa.int32()),
            ("text", pa.string()),
            ("vector", pa.list_(pa.float32(), dim)),
            ("text_hash", pa.string()),
            ("model_version", pa.string()),
        ]
    )
    rows = pa.table(
        {
            "id": [c.id for c in chunks],
            "doc": [c.doc for c in chunks],
            "ordinal": pa.array([c.ordinal for c in chunks], pa.int32()),
            "text": [c.text for c in chunks],
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(vectors, np.float32).ravel()), dim
            ),
            "text_hash": [text_hash(c.text) for c in chunks],
            "model_version": [version] * len(chunks),
        },
        schema=schema,
    )
    db, name = connect(uri, storage_options), table_name(model)
    # Not create_table(exist_ok=True): it checks an existing table against this schema and refuses the previous one.
    table = db.open_table(name) if name in set(_list_tables(db)) else db.create_table(name, schema=schema)
    missing = {k: v for k, v in SYNC_COLUMNS.items() if k not in table.schema.names}
    if missing:  # a table of the previous schema: migrate in place; its rows stay, stale until re-embedded
        table.add_columns(missing)
    before = table.count_rows()
    result = table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(rows)
    inserted = table.count_rows() - before
    if compact:  # every update writes new fragments; compact and drop old versions so the store stays small
        table.optimize(cleanup_older_than=timedelta(hours=1))  # keep recent versions for concurrent readers
    return UpsertResult(inserted, result.num_updated_rows)


def count_vectors(uri: str, models: Sequence[str], storage_options: Options = None) -> dict[str, int]:
    """Vectors present per model (0 for a model that has no table yet)."""
    db = connect(uri, storage_options)
    existing = set(_list_tables(db))
    return {
        m: (db.open_table(table_name(m)).count_rows() if table_name(m) in existing else 0) for m in models
    }


def read_ids(uri: str, model: str, storage_options: Options = None) -> list[str]:
    db = connect(uri, storage_options)
    if table_name(model) not in set(_list_tables(db)):
        return []
    return db.open_table(table_name(model)).to_arrow().column("id").to_pylist()


def _list_tables(db: Any) -> list[str]:
    return list(db.list_tables().tables)  # lancedb >= 0.40 (pyproject): local and remote connections alike


def _open(uri: str, model: str, storage_options: Options = None) -> Any | None:
    if "://" not in uri and not os.path.isdir(uri):  # reading must not create a store (connect makes the dir)
        return None
    db = connect(uri, storage_options)
    return db.open_table(table_name(model)) if table_name(model) in set(_list_tables(db)) else None


def read_index(
    uri: str, model: str, storage_options: Options = None
) -> dict[str, tuple[str | None, str | None, str]]:
    """``{id: (text_hash, model_version, doc)}`` of ``model``'s rows (None where a previous schema had none)."""
    table = _open(uri, model, storage_options)
    if table is None:
        return {}
    names = table.schema.names
    columns = ["id", "doc", *(c for c in SYNC_COLUMNS if c in names)]
    data = table.search().select(columns).limit(None).to_arrow().to_pydict()
    none = [None] * len(data["id"])
    return {
        i: (h, v, d)
        for i, d, h, v in zip(
            data["id"], data["doc"], data.get("text_hash", none), data.get("model_version", none), strict=True
        )
    }


def read_vectors(
    uri: str, model: str, ids: Sequence[str], storage_options: Options = None
) -> dict[str, np.ndarray]:
    """Vectors of ``ids`` (those present) of ``model``."""
    table = _open(uri, model, storage_options)
    if table is None or not ids:
        return {}
    found: dict[str, np.ndarray] = {}
    for part in _batches(ids):
        data = table.search().where(_id_filter(part)).select(["id", "vector"]).limit(None).to_arrow()
        # The table's width, not -1: a part none of whose ids is stored reads 0 rows, and (0, -1) is no shape.
        width = data.schema.field("vector").type.list_size
        vectors = data.column("vector").combine_chunks().flatten().to_numpy().reshape(len(data), width)
        found.update(zip(data.column("id").to_pylist(), vectors, strict=True))
    return found


def delete(uri: str, model: str, ids: Sequence[str], storage_options: Options = None) -> int:
    """Delete the rows of ``ids`` of ``model``; returns how many rows went."""
    table = _open(uri, model, storage_options)
    if table is None or not ids:
        return 0
    before = table.count_rows()
    for part in _batches(ids):
        table.delete(_id_filter(part))
    table.optimize(cleanup_older_than=timedelta(hours=1))
    return before - table.count_rows()


def _batches(ids: Sequence[str], size: int = 500) -> list[Sequence[str]]:
    ids = sorted(ids)
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def _id_filter(ids: Sequence[str]) -> str:
    # Chunk ids come from file names: quote them as SQL strings (a quote doubles), never splice them raw.
    return "id IN (" + ", ".join("'" + i.replace("'", "''") + "'" for i in ids) + ")"
