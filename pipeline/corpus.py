"""Find the documents of a corpus and read them, rejecting what cannot be embedded with a reason.

Nothing is silently dropped: every candidate file ends up either as a document or as a :class:`Rejected`
entry. Symlinks leading outside the corpus root are never read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_EXTENSIONS = (".txt", ".md", ".rst")
DEFAULT_MAX_DOCUMENT_BYTES = 10 * 1024 * 1024


class CorpusError(ValueError):
    """The corpus as a whole is unusable (missing, not a directory, unreadable)."""


@dataclass(frozen=True)
class Rejected:
    """A candidate document that was not embedded, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Discovery:
    documents: list[str]  # corpus-relative POSIX paths, sorted
    rejected: list[Rejected]


def resolve_root(corpus_dir: str | os.PathLike[str]) -> Path:
    """The corpus root as an absolute real path, or a :class:`CorpusError` naming the problem and the fix."""
    root = Path(corpus_dir).expanduser()
    if not root.exists():
        raise CorpusError(f"corpus directory {str(corpus_dir)!r} does not exist; pass an existing directory")
    if not root.is_dir():
        raise CorpusError(
            f"corpus path {str(corpus_dir)!r} is not a directory; pass the folder holding the files"
        )
    if not os.access(root, os.R_OK | os.X_OK):
        raise CorpusError(f"corpus directory {str(corpus_dir)!r} is not readable; fix its permissions")
    return root.resolve()


def discover(
    corpus_dir: str | os.PathLike[str],
    *,
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
) -> Discovery:
    """Walk the corpus recursively (without following directory symlinks) and classify candidate files."""
    root = resolve_root(corpus_dir)
    wanted = tuple(e.lower() for e in extensions)
    documents: list[str] = []
    rejected: list[Rejected] = []

    def unlisted(exc: OSError) -> None:  # os.walk skips a directory it cannot list: say so, lose nothing
        reason = f"unreadable directory: {exc.strerror or exc}; fix its permissions to embed its files"
        rejected.append(Rejected(_rel(Path(exc.filename), root), reason))

    for current, dirnames, filenames in os.walk(root, onerror=unlisted, followlinks=False):
        here = Path(current)
        dirnames.sort()
        for name in dirnames:
            if (here / name).is_symlink():  # os.walk lists them but does not descend: say so
                rel = _rel(here / name, root)
                rejected.append(Rejected(rel, "symlinked directory: not followed (walk its target directly)"))
        for name in sorted(filenames):
            if not name.lower().endswith(wanted):
                continue
            path = here / name
            rel = _rel(path, root)
            reason = _unreadable_reason(path, root, max_document_bytes)
            if reason:
                rejected.append(Rejected(rel, reason))
            else:
                documents.append(rel)
    return Discovery(sorted(documents), sorted(rejected, key=lambda r: r.path))


def read_document(corpus_dir: str | os.PathLike[str], rel: str) -> str | Rejected:
    """The text of document ``rel``, or why it cannot be embedded (binary, not UTF-8, empty, whitespace)."""
    root = Path(corpus_dir).resolve()
    path = safe_join(root, rel)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Rejected(rel, f"unreadable: {exc.strerror or exc}")
    if b"\x00" in data:
        return Rejected(rel, "binary file (contains NUL bytes); only UTF-8 text is embedded")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + len(data) - len(exc.object)  # utf-8-sig reports offsets after a BOM
        return Rejected(
            rel, f"not valid UTF-8 (byte 0x{data[offset]:02x} at offset {offset}); re-encode it as UTF-8"
        )
    if not text:
        return Rejected(rel, "empty file")
    if not text.strip():
        return Rejected(rel, "whitespace only")
    return text


def safe_join(root: Path, rel: str) -> Path:
    """``root / rel`` resolved, refusing anything (``..``, absolute paths, symlinks) that escapes ``root``."""
    try:
        candidate = (root / rel).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise CorpusError(f"document path {rel!r} is a symlink loop; it is never read") from None
    if candidate != root and root not in candidate.parents:
        raise CorpusError(f"document path {rel!r} escapes the corpus root {str(root)!r}; it is never read")
    return candidate


def _unreadable_reason(path: Path, root: Path, max_bytes: int) -> str | None:
    if path.is_symlink():
        try:
            target = path.resolve()
        except (OSError, RuntimeError):  # a -> b -> a: RuntimeError up to Python 3.12, OSError (ELOOP) after
            return "symlink loop"
        if not target.exists():
            return "broken symlink"
        if root not in target.parents:
            return "symlink leads outside the corpus root (never read)"
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if not path.is_file():
        return "not a regular file"
    if size > max_bytes:
        return f"{size} bytes is above max_document_bytes={max_bytes}; split the file or raise --max-document-bytes"
    if not os.access(path, os.R_OK):
        return "unreadable: permission denied"
    return None


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
