"""Shared bits of the benchmark scripts: timing, a machine line for the results, running a
configuration in its own process, and the transformers training step we compare with."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

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


class PeakRSS:
    """Sum of RSS over a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.02):
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.process] + self.process.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def launch_worker(script: str, args: list[str], timeout: float, env: dict | None = None
                  ) -> dict:
    """Run ``python script --worker *args OUT`` in its own process (its own peak memory, a
    crash or OOM of its own) and return the JSON object it writes to ``OUT``, with ``wall_s``;
    on failure ``{"error": ...}`` (``"OOM"`` for an out-of-memory exit)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = {**os.environ, "PYTHONPATH": root, **(env or {})}
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, script, "--worker", *args, out], env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0:
            text = proc.stderr or proc.stdout
            if "out of memory" in text.lower() or "OutOfMemoryError" in text:
                return {"error": "OOM"}
            tail = text.strip().splitlines()[-1:] or ["?"]
            return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
        with open(out) as f:
            result = json.load(f)
        result["wall_s"] = time.perf_counter() - start
        return result


def goal(value: float, target: float, at_least: bool) -> str:
    met = value >= target if at_least else value <= target
    return (f"{value:.2f} (goal {'>=' if at_least else '<='} {target}: "
            f"{'met' if met else 'NOT met'})")


def hf_train_step(model: torch.nn.Module, training, next_batch: Callable[[], dict]
                  ) -> Callable[[], float]:
    """One step of transformers' ``LlamaForCausalLM`` as its ``Trainer`` runs it: bf16 through
    ``torch.autocast`` over fp32 weights (``training.bf16``), ``torch.optim.AdamW`` without
    weight decay on 1-D weights (as megatron-core), gradient clipping. ``next_batch()``: our
    collated micro-batch (``tokens``, ``position_ids``, ``labels``) on the model's device."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    t = training
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    device = next(model.parameters()).device.type

    def step() -> float:
        batch = next_batch()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=t.bf16):
            # shift_labels: our labels are already the next tokens (all s positions count)
            loss = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                         labels=batch["labels"], shift_labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step
