"""A real, long corpus present on every machine: Python's standard-library sources.

One document per ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (tests and
site-packages excluded), in sorted path order so every machine sees the same corpus; or, for
long-context work, one document per top-level package (its files concatenated; a top-level
module is its own package): 200 documents, half of them over ~7k tokens.
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


def stdlib_package_documents(root: str | None = None) -> Iterator[tuple[str, str]]:
    """``(package, text)`` per top-level package, its files concatenated in path order, each
    preceded by a ``# file: <path>`` line."""
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    by_package: dict[str, list[str]] = {}
    for path in stdlib_files(str(root_path)):
        relative = path.relative_to(root_path)
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            by_package.setdefault(relative.parts[0], []).append(f"# file: {relative}\n{text}")
    for package, texts in by_package.items():
        yield package, "\n".join(texts)


def write_stdlib_jsonl(path: str, max_docs: int | None = None, repeat: int = 1,
                       by_package: bool = False, holdout_every: int = 0,
                       holdout_path: str | None = None) -> tuple[int, int]:
    """Write the corpus as JSONL (``{"text": ...}`` per line); with ``holdout_every`` k, every
    k-th document goes to ``holdout_path`` instead (held-out evaluation data). Returns the
    numbers of documents written to each file."""
    if holdout_every and not holdout_path:
        raise ValueError("--holdout-every needs --holdout-output")
    docs = (text for _, text in stdlib_package_documents()) if by_package else stdlib_documents()
    texts = [t for _, t in zip(range(max_docs), docs)] if max_docs is not None else list(docs)
    counts = [0, 0]
    outputs = [path] + ([holdout_path] if holdout_every else [])
    files = [open(f"{p}.tmp", "w", encoding="utf-8") for p in outputs]
    try:
        for _ in range(repeat):
            for i, text in enumerate(texts):
                which = int(bool(holdout_every) and i % holdout_every == holdout_every - 1)
                files[which].write(json.dumps({"text": text}) + "\n")
                counts[which] += 1
    finally:
        for f in files:
            f.close()
    for p in outputs:
        os.replace(f"{p}.tmp", p)
    return counts[0], counts[1]
