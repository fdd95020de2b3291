"""Shared bits of the benchmark scripts: timing and a machine line for the results."""

from __future__ import annotations

import os
import platform
import time

import torch


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
            f", {time.strftime('%Y-%m-%d')}")


def best_of(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Fastest wall time of ``repeats`` calls, in seconds (after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_markdown(path: str, title: str, header: list[str], rows: list[list], notes: str) -> str:
    lines = [f"# {title}", "", f"Machine: {machine()}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines + ["", notes, ""])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text
