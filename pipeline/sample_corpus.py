"""Build a real, offline sample corpus: the documentation of the Python standard library, one file a module.

No download: the text comes from the docstrings of the interpreter running this code, so the same Python
version gives the same corpus (and the same chunk ids) on every machine.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import warnings
from pathlib import Path

# Modules with side effects on import (GUI, interactive help, self-tests) or that are platform-specific.
_SKIP_PREFIXES = ("antigravity", "this", "idlelib", "tkinter", "turtle", "test", "lib2to3", "pydoc_data",
                  "msvcrt", "winreg", "winsound", "_", "ensurepip", "venv", "__main__", "xxsubtype")  # fmt: skip


def module_text(name: str) -> str | None:
    """Markdown text of a module's docstring and its public members' docstrings, or None if it has none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - optional modules (e.g. missing C libraries) are simply skipped
        return None
    parts = [f"# {name}\n", inspect.getdoc(module) or ""]
    for member_name, member in sorted(vars(module).items()):
        if member_name.startswith("_") or getattr(member, "__module__", None) != name:
            continue
        doc = inspect.getdoc(member)
        if doc:
            parts.append(f"\n## {name}.{member_name}\n\n{doc}\n")
    text = "\n".join(parts).strip()
    return text if len(text) > 200 else None


def write_sample_corpus(directory: str | Path, *, limit: int = 300) -> list[Path]:
    """Write up to ``limit`` module documents (``.md``, in sub-folders by package) under ``directory``."""
    root = Path(directory)
    names = sorted(name for name in sys.stdlib_module_names if not name.startswith(_SKIP_PREFIXES))
    written: list[Path] = []
    for name in names:
        for module_name in [name, *_submodules(name)]:
            if len(written) >= limit:
                return written
            text = module_text(module_name)
            if text is None:
                continue
            path = root / Path(*module_name.split(".")).with_suffix(".md")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
            written.append(path)
    return written


def _submodules(name: str) -> list[str]:
    try:
        package = importlib.import_module(name)
    except Exception:  # noqa: BLE001
        return []
    paths = getattr(package, "__path__", None)
    if not paths:
        return []
    return sorted(
        f"{name}.{m.name}" for m in pkgutil.iter_modules(paths) if not m.name.startswith(("_", "test"))
    )


def replicate_corpus(source: str | Path, target: str | Path, copies: int) -> list[Path]:
    """A corpus ``copies`` times the size of ``source``, deterministically: copy ``k`` of each document lives
    under ``copy-k/`` and every non-empty line of it ends with `` (copy k)``, so no chunk's text repeats
    (a provider or cache cannot answer a copy from an earlier one) and token counts stay comparable."""
    source, target = Path(source), Path(target)
    written: list[Path] = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        text = path.read_text(encoding="utf-8")
        for k in range(copies):
            out = target / f"copy-{k}" / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(line.rstrip("\n") + (f" (copy {k})\n" if line.strip() else "\n")
                                   for line in text.splitlines(keepends=True)), encoding="utf-8")  # fmt: skip
            written.append(out)
    return written
