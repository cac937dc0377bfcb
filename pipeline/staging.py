"""Staged data between tasks: chunk sets and vectors live in files, XCom carries only small references.

A chunk set is a directory with ``chunks.jsonl`` (one chunk per line) and ``index.npz`` (byte offsets of the
lines and token counts), so a task reads exactly its batch's byte range. Vectors of one (batch, model) are one
``.npz`` file. Paths are ``pathlib.Path`` or Airflow's ``ObjectStoragePath`` (same API), so ``file://`` works
locally and ``s3://`` / ``gs://`` on a cluster, authenticated by the Airflow connection ``conn_id`` (an id, never
a key: it may travel in a chunk set's reference).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from pipeline.chunking import Chunk


def as_path(uri: str, conn_id: str | None = None) -> Any:
    """A path object for ``uri``: ObjectStoragePath for URLs (``s3://``, ``file://``), pathlib otherwise."""
    if "://" in uri:
        from pipeline.compat import ObjectStoragePath

        return ObjectStoragePath(uri, conn_id=conn_id)
    from pathlib import Path

    return Path(uri)


def write_chunk_set(uri: str, chunks: Iterable[Chunk], conn_id: str | None = None) -> dict[str, Any]:
    """Stage ``chunks`` under ``uri``; returns the reference that travels through XCom."""
    root = as_path(uri, conn_id)
    _make_folder(root)
    offsets, tokens = [0], []
    with (root / "chunks.jsonl").open("wb") as out:
        for c in chunks:
            line = json.dumps([c.id, c.doc, c.ordinal, c.tokens, c.text], ensure_ascii=False).encode() + b"\n"
            out.write(line)
            offsets.append(offsets[-1] + len(line))
            tokens.append(c.tokens)
    _save_npz(root / "index.npz", offsets=np.asarray(offsets, np.int64), tokens=np.asarray(tokens, np.int64))
    ref = {"uri": uri, "count": len(tokens), "tokens": int(sum(tokens))}
    return ref | ({"conn_id": conn_id} if conn_id and "://" in uri else {})  # readers need no other context


def _root(chunk_set: dict[str, Any]) -> Any:
    return as_path(chunk_set["uri"], chunk_set.get("conn_id"))


def read_token_counts(chunk_set: dict[str, Any]) -> list[int]:
    return _load_npz(_root(chunk_set) / "index.npz")["tokens"].tolist()


def read_chunks(chunk_set: dict[str, Any], start: int = 0, stop: int | None = None) -> list[Chunk]:
    """Chunks ``[start, stop)`` of the set, reading only their bytes."""
    root = _root(chunk_set)
    offsets = _load_npz(root / "index.npz")["offsets"]
    stop = len(offsets) - 1 if stop is None else stop
    if not 0 <= start <= stop <= len(offsets) - 1:
        raise IndexError(f"chunk range [{start}, {stop}) outside a set of {len(offsets) - 1} chunks")
    with (root / "chunks.jsonl").open("rb") as f:
        f.seek(int(offsets[start]))
        data = f.read(int(offsets[stop] - offsets[start]))
    return [
        Chunk(id=i, doc=d, ordinal=o, tokens=t, text=x)
        for i, d, o, t, x in map(json.loads, data.splitlines())
    ]


def write_mask(chunk_set: dict[str, Any], models: list[str], mask: np.ndarray) -> dict[str, Any]:
    """Stage which chunks of the set each model must embed (``mask[i, j]``: chunk i pending for ``models[j]``)."""
    _save_npz(_root(chunk_set) / "mask.npz", mask=np.asarray(mask, bool).reshape(-1, len(models)))
    return chunk_set | {"mask": list(models)}


def read_mask(chunk_set: dict[str, Any], start: int, stop: int, model: str) -> list[bool]:
    """Which chunks ``[start, stop)`` ``model`` must embed: all of them in a set staged without a mask."""
    if "mask" not in chunk_set:
        return [True] * (stop - start)
    mask = _load_npz(_root(chunk_set) / "mask.npz")["mask"]
    return mask[start:stop, chunk_set["mask"].index(model)].tolist()


def write_vectors(uri: str, ids: list[str], vectors: np.ndarray, conn_id: str | None = None) -> None:
    path = as_path(uri, conn_id)
    _make_folder(path.parent)
    # ids as JSON bytes: numpy's str arrays silently drop trailing NULs, and pickled objects are not allowed
    encoded = np.frombuffer(json.dumps(list(ids)).encode(), np.uint8)
    _save_npz(path, ids=encoded, vectors=np.asarray(vectors, np.float32))


def read_vectors(uri: str, conn_id: str | None = None) -> tuple[list[str], np.ndarray]:
    data = _load_npz(as_path(uri, conn_id))
    return json.loads(data["ids"].tobytes()), data["vectors"]


def _make_folder(path: Any) -> None:
    """Create a local folder. Object stores have no folders, and s3fs's mkdir would create a missing bucket."""
    if getattr(path, "protocol", "file") in ("file", "local", ""):
        path.mkdir(parents=True, exist_ok=True)


def _save_npz(path: Any, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()  # one write: object stores want whole objects, not seeks
    np.savez(buffer, **arrays)
    with path.open("wb") as f:
        f.write(buffer.getvalue())


def _load_npz(path: Any) -> dict[str, np.ndarray]:
    with path.open("rb") as f:
        with np.load(io.BytesIO(f.read()), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def write_text(uri: str, text: str, conn_id: str | None = None) -> None:
    """Write a small text file (a report) locally or to object storage, creating its folder."""
    path = as_path(uri, conn_id)
    _make_folder(path.parent)
    with path.open("wb") as f:
        f.write(text.encode("utf-8"))


def read_text(uri: str, conn_id: str | None = None) -> str | None:
    """The text of ``uri``, or None if it does not exist."""
    path = as_path(uri, conn_id)
    if not path.exists():
        return None
    with path.open("rb") as f:
        return f.read().decode("utf-8")
