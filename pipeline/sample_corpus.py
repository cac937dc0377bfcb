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
