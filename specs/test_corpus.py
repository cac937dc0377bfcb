"""Corpus discovery and reading: hostile files are rejected with a clear reason, nothing is lost."""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline import steps
from pipeline.corpus import CorpusError, Rejected, discover, read_document, resolve_root, safe_join
from pipeline.settings import Settings
from specs.strategies import bad_utf8, corpora, hostile_corpora, segment

LIMIT = 256  # max_document_bytes for the hostile corpora

# Which reason each kind of bad file gets (a fragment of it).
REASONS = {
    "empty": "empty file",
    "whitespace": "whitespace only",
    "binary": "binary file",
    "bad_utf8": "not valid UTF-8",
    "oversize": f"max_document_bytes={LIMIT}",
}

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextmanager
def recording_opens() -> Iterator[list[str]]:
    """Every path opened (``open``/``os.open`` audit events) inside the block."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


def write_corpus(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@settings(max_examples=40, deadline=None)
@given(hostile_corpora(max_document_bytes=LIMIT))
def test_every_candidate_file_is_either_embedded_or_rejected_with_its_reason(
    files: dict[str, tuple[str, bytes]],
) -> None:
    """found == embedded + rejected, and each bad file is rejected for what is wrong with it."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus")
        write_corpus(corpus, {rel: data for rel, (_, data) in files.items()})
        run = Settings(corpus_dir=str(corpus), max_document_bytes=LIMIT, work_dir=tmp)
        found = steps.discover_documents(run)
        chunked = steps.chunk_documents(run, found, f"{tmp}/run")
    candidates = {rel for rel, (kind, _) in files.items() if kind != "other_extension"}
    rejected = {r["path"]: r["reason"] for r in found["rejected"] + chunked["rejected"]}
    assert len(found["documents"]) + len(found["rejected"]) == len(candidates)
    assert chunked["documents_embedded"] + len(rejected) == len(candidates)
    for rel in candidates:
        kind = files[rel][0]
        if kind == "text":
            assert rel not in rejected
        else:
            assert REASONS[kind] in rejected[rel]


@given(bad_utf8())
@example((b"\xef\xbb\xbfab\xff", 5)).via("offset counts the BOM")
def test_invalid_utf8_is_rejected_naming_the_byte_and_its_offset(case: tuple[bytes, int]) -> None:
    """The reason names the first offending byte and its offset in the file, so it can be found with a hex editor."""
    data, offset = case
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "bad.txt").write_bytes(data)
        result = read_document(tmp, "bad.txt")
    assert isinstance(result, Rejected)
    assert f"byte 0x{data[offset]:02x} at offset {offset}" in result.reason


@settings(max_examples=30, deadline=None)
@given(corpora(min_size=1))
def test_readable_text_documents_come_back_unchanged(files: dict[str, str]) -> None:
    """Every good file is discovered (sorted, POSIX relpaths) and read back exactly."""
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(Path(tmp), {rel: text.encode() for rel, text in files.items()})
        found = discover(tmp)
        assert found.documents == sorted(files) and found.rejected == []
        for rel, text in files.items():
            assert read_document(tmp, rel) == text


def test_a_utf8_bom_is_not_part_of_the_text(tmp_path: Path) -> None:
    """A leading BOM is stripped: it would otherwise change the first chunk's text and id."""
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello")
    assert read_document(tmp_path, "bom.txt") == "hello"


def test_only_the_configured_extensions_are_candidates_case_insensitively(tmp_path: Path) -> None:
    """Files with other extensions are not candidates at all; ``.TXT`` matches ``.txt``."""
    write_corpus(tmp_path, {"a.TXT": b"x", "b.csv": b"x", "c.md": b"x", "d": b"x"})
    assert discover(tmp_path, extensions=(".txt",)).documents == ["a.TXT"]


@given(
    st.dictionaries(
        st.text("abcxyz", min_size=1, max_size=4),
        st.sampled_from([".txt", ".TXT", ".csv", ".bin", ""]),
        max_size=8,
    )
)
@example({"a": ".csv", "b": ".txt"}).via("a file of another extension sorts before a candidate")
def test_a_file_of_another_extension_hides_no_candidate_next_to_it(names: dict[str, str]) -> None:
    """Within one folder, whatever other files sort before or after them, every configured-extension file is found."""
    with tempfile.TemporaryDirectory() as tmp:
        for stem, ext in names.items():
            for folder in (Path(tmp), Path(tmp, "sub")):
                folder.mkdir(exist_ok=True)
                (folder / f"{stem}{ext}").write_text("text")
        found = discover(tmp, extensions=(".txt",))
    wanted = sorted(f"{stem}{ext}" for stem, ext in names.items() if ext.lower() == ".txt")
    assert found.documents == sorted([*wanted, *(f"sub/{n}" for n in wanted)]) and found.rejected == []


def test_an_oversize_file_is_rejected_naming_the_setting_without_being_read(tmp_path: Path) -> None:
    """A file above max_document_bytes is rejected from its size alone, and the reason names the setting."""
    (tmp_path / "big.txt").write_bytes(b"x" * 101)
    with recording_opens() as opened:
        found = discover(tmp_path, max_document_bytes=100)
    assert found.rejected == [Rejected("big.txt", found.rejected[0].reason)]
    assert "101 bytes" in found.rejected[0].reason and "max_document_bytes=100" in found.rejected[0].reason
    assert str(tmp_path / "big.txt") not in opened


def test_a_symlink_leading_outside_the_root_is_rejected_and_never_opened(tmp_path: Path) -> None:
    """A link to a file outside the corpus is rejected by discovery, which never opens the target."""
    outside = tmp_path / "secret.txt"
    outside.write_text("top secret")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "link.txt").symlink_to(outside)
    with recording_opens() as opened:
        found = discover(corpus)
    assert found.documents == []
    assert found.rejected == [Rejected("link.txt", "symlink leads outside the corpus root (never read)")]
    assert str(outside) not in opened


def test_reading_through_an_escaping_symlink_is_refused(tmp_path: Path) -> None:
    """read_document refuses a relpath whose real path leaves the root, even if discovery was bypassed."""
    os.mkfifo(tmp_path / "pipe.txt")  # a reader would block forever: refusing must happen before any open
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "link.txt").symlink_to(tmp_path / "pipe.txt")
    with recording_opens() as opened, pytest.raises(CorpusError, match="escapes the corpus root"):
        read_document(corpus, "link.txt")
    assert str(tmp_path / "pipe.txt") not in opened


def test_a_symlink_inside_the_root_is_an_ordinary_document(tmp_path: Path) -> None:
    """A link to another file of the corpus is read like that file."""
    (tmp_path / "real.txt").write_text("hello")
    (tmp_path / "alias.txt").symlink_to(tmp_path / "real.txt")
    assert discover(tmp_path).documents == ["alias.txt", "real.txt"]
    assert read_document(tmp_path, "alias.txt") == "hello"


def test_a_broken_symlink_is_rejected(tmp_path: Path) -> None:
    """A dangling link is rejected as ``broken symlink``, not an exception."""
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing.txt")
    assert discover(tmp_path).rejected == [Rejected("gone.txt", "broken symlink")]


def test_a_fifo_is_rejected_as_not_a_regular_file_without_being_opened(tmp_path: Path) -> None:
    """Special files (FIFOs) are rejected from their type: opening one would hang the task."""
    os.mkfifo(tmp_path / "pipe.txt")
    with recording_opens() as opened:
        found = discover(tmp_path)
    assert found.rejected == [Rejected("pipe.txt", "not a regular file")]
    assert str(tmp_path / "pipe.txt") not in opened


def test_a_symlinked_directory_is_reported_not_followed(tmp_path: Path) -> None:
    """Directory links are listed as rejected (with what to do) instead of being walked or silently skipped."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.txt").write_text("a")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    found = discover(tmp_path)
    assert found.documents == ["real/a.txt"]
    assert [r.path for r in found.rejected] == ["alias"] and "not followed" in found.rejected[0].reason


@given(st.lists(st.sampled_from(["..", ".", "a", "b"]) | segment, min_size=1, max_size=5).map("/".join))
@example("../x.txt").via("parent directory")
@example("a/../../x.txt").via("climbs out after going in")
def test_safe_join_never_returns_a_path_outside_the_root(rel: str) -> None:
    """safe_join returns a path inside the root, or raises CorpusError naming the relpath when it escapes."""
    root = Path("/nonexistent/corpus")
    lexical = os.path.normpath(os.path.join(root, rel))
    if lexical != str(root) and not lexical.startswith(f"{root}/"):
        with pytest.raises(CorpusError, match="escapes the corpus root"):
            safe_join(root, rel)
    else:
        joined = safe_join(root, rel)
        assert joined == root or root in joined.parents


@pytest.mark.parametrize("rel", ["/etc/passwd", "../etc/passwd", "a/../../etc/passwd"])
def test_absolute_and_parent_relpaths_are_refused(tmp_path: Path, rel: str) -> None:
    """Absolute paths and ``..`` that leave the root are refused, naming the offending path."""
    with pytest.raises(CorpusError) as raised:
        safe_join(tmp_path, rel)
    assert repr(rel) in str(raised.value)


def test_a_missing_corpus_is_a_corpus_error_naming_the_path(tmp_path: Path) -> None:
    """A corpus directory that does not exist fails the run up front, naming the path."""
    missing = tmp_path / "nope"
    with pytest.raises(CorpusError, match="does not exist") as raised:
        discover(missing)
    assert str(missing) in str(raised.value)


def test_a_file_given_as_corpus_is_a_corpus_error_naming_the_path(tmp_path: Path) -> None:
    """A regular file passed as the corpus directory fails up front, naming the path."""
    file = tmp_path / "notes.txt"
    file.write_text("x")
    with pytest.raises(CorpusError, match="not a directory") as raised:
        resolve_root(file)
    assert str(file) in str(raised.value)


# Rejection reasons exactly as the report shows them (what was wrong, and what to do where there is a fix).
CONTENT_REASONS = {
    b"": "empty file",
    b" \n\t ": "whitespace only",
    b"text\x00more": "binary file (contains NUL bytes); only UTF-8 text is embedded",
}


@pytest.mark.parametrize("content", sorted(CONTENT_REASONS))
def test_content_rejections_read_as_documented(tmp_path: Path, content: bytes) -> None:
    """Empty, whitespace-only and binary files are rejected with these exact reasons."""
    (tmp_path / "f.txt").write_bytes(content)
    assert read_document(tmp_path, "f.txt") == Rejected("f.txt", CONTENT_REASONS[content])


def test_max_document_bytes_is_inclusive_and_the_reason_says_what_to_do(tmp_path: Path) -> None:
    """A file of exactly max_document_bytes is a document; one byte more is rejected with the fix."""
    (tmp_path / "fits.txt").write_bytes(b"x" * 100)
    (tmp_path / "over.txt").write_bytes(b"x" * 101)
    found = discover(tmp_path, max_document_bytes=100)
    assert found.documents == ["fits.txt"]
    assert found.rejected == [Rejected("over.txt", "101 bytes is above max_document_bytes=100; "
                                                   "split the file or raise --max-document-bytes")]  # fmt: skip


def test_a_symlinked_directory_reason_says_how_to_include_it(tmp_path: Path) -> None:
    """The rejection of a directory link tells the user to pass its target instead."""
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert discover(tmp_path).rejected == [
        Rejected("alias", "symlinked directory: not followed (walk its target directly)")
    ]


def test_a_document_that_cannot_be_read_is_rejected_with_the_os_reason(tmp_path: Path) -> None:
    """An OSError while reading becomes ``unreadable: <strerror>`` for that document, not a crash."""
    (tmp_path / "dir.txt").mkdir()  # reading a directory fails with EISDIR
    assert read_document(tmp_path, "dir.txt") == Rejected("dir.txt", "unreadable: Is a directory")


def test_a_directory_the_process_may_not_list_is_rejected_not_silently_skipped(
    tmp_path: Path, monkeypatch
) -> None:
    """A subdirectory that cannot be listed is rejected with the OS reason, its files not silently lost
    (simulated: the specs run as root, who may list all)."""
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "locked" / "deeper").mkdir(parents=True)
    (tmp_path / "locked" / "deeper" / "secret.txt").write_text("secret")
    real_scandir = os.scandir

    def scandir(path: str) -> Iterator[os.DirEntry[str]]:
        if Path(path).name == "locked":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = discover(tmp_path)
    assert found.documents == ["ok.txt"]
    reason = "unreadable directory: Permission denied; fix its permissions to embed its files"
    assert found.rejected == [Rejected("locked", reason)]


def test_files_the_process_may_not_read_are_rejected_as_permission_denied(
    tmp_path: Path, monkeypatch
) -> None:
    """Without read permission a file is rejected, unopened (simulated: the specs run as root, who may read all)."""
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "locked.txt").write_text("secret")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p).name != "locked.txt" and real_access(p, mode))
    found = discover(tmp_path)
    assert found.documents == ["ok.txt"]
    assert found.rejected == [Rejected("locked.txt", "unreadable: permission denied")]


def test_a_file_gone_between_listing_and_reading_is_rejected_with_the_os_reason(tmp_path: Path, monkeypatch):
    """A file that vanishes after the walk listed it (a race, simulated) is ``unreadable: <strerror>``, no crash."""
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "gone.txt").write_text("soon deleted")
    real_stat = Path.stat

    def stat(self: Path, **kwargs):
        if self.name == "gone.txt":
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    found = discover(tmp_path)
    assert found.documents == ["ok.txt"]
    assert found.rejected == [Rejected("gone.txt", "unreadable: No such file or directory")]


@pytest.mark.parametrize("denied", [os.R_OK, os.X_OK], ids=["not-listable", "not-searchable"])
def test_an_unreadable_corpus_directory_is_a_corpus_error_naming_it_and_the_fix(
    tmp_path: Path, monkeypatch, denied: int
) -> None:
    """A corpus folder the process may not list (read) or not enter (execute) fails up front (simulated
    permissions, as above: the access check is asked for both and refuses the one missing)."""
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path or not mode & denied)
    with pytest.raises(CorpusError) as raised:
        resolve_root(tmp_path)
    assert str(raised.value) == f"corpus directory {str(tmp_path)!r} is not readable; fix its permissions"


def test_a_path_escaping_the_root_is_refused_naming_both(tmp_path: Path) -> None:
    """safe_join's refusal names the document path and the corpus root."""
    with pytest.raises(CorpusError) as raised:
        safe_join(tmp_path, "../etc/passwd")
    assert (
        str(raised.value)
        == f"document path '../etc/passwd' escapes the corpus root {str(tmp_path)!r}; it is never read"
    )


def test_a_symlink_loop_is_rejected_not_a_crash(tmp_path: Path) -> None:
    """a.txt -> b.txt -> a.txt: both links are rejected as a loop; discovery and reading go on."""
    (tmp_path / "a.txt").symlink_to(tmp_path / "b.txt")
    (tmp_path / "b.txt").symlink_to(tmp_path / "a.txt")
    (tmp_path / "ok.txt").write_text("fine")
    found = discover(tmp_path)
    assert found.documents == ["ok.txt"]
    assert found.rejected == [Rejected("a.txt", "symlink loop"), Rejected("b.txt", "symlink loop")]
    with pytest.raises(CorpusError, match="symlink loop"):
        read_document(tmp_path, "a.txt")


def test_rejections_are_listed_by_path_whatever_the_walk_order(tmp_path: Path) -> None:
    """The report lists rejected files sorted by corpus-relative path, across folders."""
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "big.txt").write_bytes(b"x" * 50)
    (tmp_path / "m.txt").symlink_to(tmp_path / "gone.txt")
    (tmp_path / "a").mkdir()
    os.mkfifo(tmp_path / "a" / "pipe.txt")
    found = discover(tmp_path, max_document_bytes=10)
    assert [r.path for r in found.rejected] == ["a/pipe.txt", "m.txt", "z/big.txt"]
