"""Helpers shared by the data-pipeline tests."""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
UNICODE_DOCS = [
    "Grüße aus Köln — naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά.",
    "  leading spaces, trailing tab\t\nand\r\nwindows newlines  ",
    "x",
]


def load_tool(name: str):
    """Import ``tools/{name}.py`` as a module (tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}",
                                                  os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, *args: str, check: bool = True, timeout: float = 120
             ) -> subprocess.CompletedProcess:
    """Run ``tools/{name}.py`` in a fresh interpreter (real CLI, real multiprocessing)."""
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "tools", f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


def read_jsonl_texts(path, key: str = "text") -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f]


def documents(prefix) -> list[list[int]]:
    """Every document of the indexed dataset at ``prefix``, as token lists (megatron-core's
    reader)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def wait_until_writing(proc, prefix: str, timeout: float = 60) -> None:
    """Return once ``proc`` has written tokens to ``{prefix}``'s temporary ``.bin`` (or ended,
    or ``timeout`` passed): the moment a kill leaves a partial dataset behind."""
    import time

    from megatron_longctx.data.formats.indexed_writer import temp_files

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        bins = [p for p in temp_files(prefix) if ".bin.tmp-" in p]
        if bins and os.path.getsize(bins[0]) > 0:
            return
        time.sleep(0.005)
