"""A real, long corpus present on every machine: Python's standard-library sources.

One document per ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (tests and
site-packages excluded), in sorted path order so every machine sees the same corpus.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib"}


def stdlib_files(root: str | None = None) -> list[Path]:
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root_path):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def stdlib_documents(root: str | None = None, max_docs: int | None = None) -> Iterator[str]:
    """Yield the text of each stdlib source file (non-UTF-8 bytes replaced)."""
    for i, path in enumerate(stdlib_files(root)):
        if max_docs is not None and i >= max_docs:
            return
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            yield text


def write_stdlib_jsonl(path: str, max_docs: int | None = None, repeat: int = 1) -> int:
    """Write the corpus as JSONL (``{"text": ...}`` per line); returns the number of lines."""
    n = 0
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            for text in stdlib_documents(max_docs=max_docs):
                f.write(json.dumps({"text": text}) + "\n")
                n += 1
    os.replace(tmp, path)
    return n
