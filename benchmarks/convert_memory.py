#!/usr/bin/env python
"""Peak anonymous memory of ``hf_to_mcore`` against the size of the model it converts.

* Input: a random Llama written as sharded safetensors (default bf16, hidden 1024, 12 layers,
  GQA 16/8 heads, FFN 2816, vocabulary 8192: 158 M parameters, 317 MB), cached in
  ``--workdir``.
* Conversion: ``tools/convert_hf_to_mcore.py`` in a fresh process; its RssAnon
  (``/proc/<pid>/status``: not the page cache or mapped files) sampled every 10 ms. The figure
  is the peak above its RssAnon once torch, megatron-core and megatron_longctx are imported
  (the interpreter's fixed cost, ~0.3 GB, is not the conversion's), divided by the bytes of
  the safetensors input.
* Reported apart (Pss_Anon, so that pages shared copy-on-write count once): the checkpoint
  writers megatron-core forks (the copies of the interpreter's pages they come to own, which
  depend on the interpreter, not the model: they read the weights from the mapped files) and
  the interpreters multiprocessing spawns (megatron-core's result-queue Manager, ~0.2 GB).
* Output and scratch files go to ``--workdir``: on a tmpfs they would be memory too (Shmem).

    python benchmarks/convert_memory.py [--layers 12] [--hidden 1024] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_CHILD = """
import sys
sys.path.insert(0, sys.argv[3])
import convert_hf_to_mcore
import megatron_longctx.model.gpt, megatron_longctx.training.checkpoint  # noqa
print("READY", flush=True)
sys.stdin.readline()
convert_hf_to_mcore.main(["--hf-dir", sys.argv[1], "--save", sys.argv[2]])
"""


def _proc_field(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    return None


def rss_anon(pid: int) -> int:
    """RssAnon of ``pid`` in bytes (0 once it is gone)."""
    return _proc_field(f"/proc/{pid}/status", "RssAnon:") or 0


def pss_anon(pid: int) -> int:
    """Pss_Anon of ``pid``: its anonymous pages, those it still shares copy-on-write with its
    parent counted in proportion (RssAnon on kernels without it)."""
    value = _proc_field(f"/proc/{pid}/smaps_rollup", "Pss_Anon:")
    return rss_anon(pid) if value is None else value


def make_model(directory: str, layers: int, hidden: int, ffn: int, heads: int, groups: int,
               vocab: int, dtype: str, shard_bytes: int = 100 * 2**20) -> int:
    """A random Llama in ``directory`` (written once); returns its tensor bytes."""
    import torch
    import transformers

    from megatron_longctx.convert.hf_config import model_config_from_hf
    from megatron_longctx.convert.safetensors_io import SafetensorsWriter
    from megatron_longctx.model.hf_conversion import hf_shapes

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=groups, tie_word_embeddings=False,
        max_position_embeddings=4096, dtype=dtype)
    shapes = hf_shapes(model_config_from_hf(config.to_dict())[0])
    done = os.path.join(directory, "config.json")
    if not os.path.isfile(done):
        os.makedirs(directory, exist_ok=True)
        writer = SafetensorsWriter(directory, shard_bytes)
        g = torch.Generator().manual_seed(0)
        for name, shape in shapes.items():
            writer.add(name, (0.02 * torch.randn(shape, generator=g)).to(getattr(torch, dtype)))
        writer.close()
        config.to_json_file(done)
    return sum(torch.Size(s).numel() for s in shapes.values()) * \
        getattr(torch, dtype).itemsize


def _is_helper(process) -> bool:
    """A fresh interpreter multiprocessing started (spawn: megatron-core's result-queue Manager;
    the resource tracker), as opposed to a forked copy of the converting process."""
    try:
        return "multiprocessing" in " ".join(process.cmdline())
    except Exception:  # gone or a zombie
        return False


def measure(hf_dir: str, out_dir: str, interval: float = 0.01) -> dict[str, int]:
    """Anonymous memory of a process converting ``hf_dir``, in bytes: its RssAnon once
    imported (``base``) and at its ``peak``; the peak Pss_Anon of its ``forked`` children
    (megatron-core's checkpoint writers) and of its ``helpers`` (interpreters multiprocessing
    spawned)."""
    import psutil

    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, hf_dir, out_dir,
                             os.path.join(ROOT, "tools")], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    base = rss_anon(proc.pid)
    peak, forked_peak, helpers, stop = [base], [0], [0], threading.Event()

    def sample():
        parent = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                children = parent.children(recursive=True)
            except psutil.Error:
                children = []
            spawned = [c for c in children if _is_helper(c)]
            forked = [c for c in children if c not in spawned]
            peak[0] = max(peak[0], rss_anon(proc.pid))
            forked_peak[0] = max(forked_peak[0], sum(pss_anon(c.pid) for c in forked))
            helpers[0] = max(helpers[0], sum(pss_anon(c.pid) for c in spawned))
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    proc.stdin.close()
    proc.stdout.read()
    code = proc.wait()
    stop.set()
    thread.join()
    if code != 0:
        raise RuntimeError(f"conversion failed with exit code {code}")
    return {"base": base, "peak": peak[0], "forked": forked_peak[0], "helpers": helpers[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "megatron_longctx_bench"))
    parser.add_argument("--json", action="store_true", help="one JSON line instead of text")
    args = parser.parse_args()
    name = f"llama-l{args.layers}-h{args.hidden}-v{args.vocab}-{args.dtype}"
    hf_dir = os.path.join(args.workdir, name)
    model_bytes = make_model(hf_dir, args.layers, args.hidden, args.ffn, args.heads,
                             args.groups, args.vocab, args.dtype)
    out_dir = tempfile.mkdtemp(dir=args.workdir, prefix="converted-")
    try:
        memory = measure(hf_dir, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    result = {"model_bytes": model_bytes, **memory,
              "ratio": (memory["peak"] - memory["base"]) / model_bytes}
    if args.json:
        print(json.dumps(result))
    else:
        mib = {k: v / 2**20 for k, v in result.items()}
        print(f"{name}: model {mib['model_bytes']:.0f} MiB; anonymous memory after imports "
              f"{mib['base']:.0f} MiB, peak {mib['peak']:.0f} MiB (conversion "
              f"{mib['peak'] - mib['base']:.0f} MiB = {result['ratio']:.2f}x the model); "
              f"besides: forked writers {mib['forked']:.0f} MiB, spawned helpers "
              f"{mib['helpers']:.0f} MiB")


if __name__ == "__main__":
    main()
