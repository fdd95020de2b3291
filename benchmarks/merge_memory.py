#!/usr/bin/env python
"""Peak anonymous memory of ``tools/merge_checkpoints.py`` against the size of one input
checkpoint, beside the in-memory average a script would do.

* Inputs: a random Llama (hidden 1024, 12 layers, GQA 16/8 heads, FFN 2816, vocabulary 8192:
  158 M parameters; ``benchmarks/convert_memory.py``'s model) converted twice to our
  checkpoints (fp32 parameters: 605 MB each), cached in ``--workdir``.
* Each case runs in a fresh process whose RssAnon (``/proc/<pid>/status``: not the page cache
  or mapped files) is sampled every 10 ms; the figure is the peak above its RssAnon once torch,
  megatron-core and megatron_longctx are imported, divided by one input's tensor bytes (its
  ``.distcp`` files). Cases: ``tools/merge_checkpoints.py --weights 0.5 0.5`` with the default
  ``--read-chunk-mib 64`` and with 4; the reference, both models loaded with ``load_model``
  and their tensors averaged in memory.
* Also reported: the peak Pss_Anon of the checkpoint writers megatron-core forks.

    python benchmarks/merge_memory.py [--layers 12] [--hidden 1024]
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

from benchmarks.convert_memory import make_model, pss_anon, rss_anon  # noqa: E402

_MERGE = """
import sys
from megatron_longctx.methods.merge_tool import main
import megatron_longctx.methods.merge, megatron_longctx.model.gpt  # noqa
import megatron_longctx.training.checkpoint, megatron_longctx.convert.hf_to_mcore  # noqa
print("READY", flush=True)
sys.stdin.readline()
main(["--load", sys.argv[1], sys.argv[2], "--weights", "0.5", "0.5", "--save", sys.argv[3],
      "--read-chunk-mib", sys.argv[4]])
"""

# the reference: both models loaded, their tensors averaged in memory
_IN_MEMORY = """
import sys
import torch
from megatron_longctx.model import load_model
import megatron_longctx.model.gpt, megatron_longctx.training.checkpoint  # noqa
print("READY", flush=True)
sys.stdin.readline()
a = load_model(sys.argv[1]).gpt.state_dict()
b = load_model(sys.argv[2]).gpt.state_dict()
merged = {k: (a[k] + b[k]) / 2 for k in a if torch.is_tensor(a[k])}
"""


def convert(hf_dir: str, ckpt: str) -> None:
    if not os.path.isfile(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_hf_to_mcore.py"),
                        "--hf-dir", hf_dir, "--save", ckpt], check=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL)


def measure(child: str, *args: str, interval: float = 0.01) -> dict[str, int]:
    """RssAnon of the process running ``child`` once imported (``base``) and at its ``peak``,
    and the peak Pss_Anon of its ``forked`` children (checkpoint writers), in bytes."""
    import psutil

    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", child, *args], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    base = rss_anon(proc.pid)
    peak, forked, stop = [base], [0], threading.Event()

    def sample():
        parent = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                children = parent.children(recursive=True)
            except psutil.Error:
                children = []
            peak[0] = max(peak[0], rss_anon(proc.pid))
            forked[0] = max(forked[0], sum(pss_anon(c.pid) for c in children))
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    proc.stdin.close()
    proc.stdout.read()
    code = proc.wait()
    seconds = time.perf_counter() - started
    stop.set()
    thread.join()
    if code != 0:
        raise RuntimeError(f"the measured process failed with exit code {code}")
    return {"base": base, "peak": peak[0], "forked": forked[0], "seconds": seconds}


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
    model_bytes = make_model(hf_dir, args.layers, args.hidden, args.ffn, args.heads, args.groups,
                             args.vocab, args.dtype)
    # two inputs: the model converted twice (what is in them does not change the memory)
    ckpts = [os.path.join(args.workdir, f"ckpt-{name}-{i}") for i in (1, 2)]
    for ckpt in ckpts:
        convert(hf_dir, ckpt)
    step = os.path.join(ckpts[0], "iter_0000000")
    input_bytes = sum(os.path.getsize(os.path.join(step, f)) for f in os.listdir(step)
                      if f.endswith(".distcp"))
    results = {}
    for label, chunk_mib in (("merge_checkpoints", "64"), ("merge_checkpoints, 4 MiB reads", "4"),
                             ("in-memory average (reference)", None)):
        if chunk_mib is None:
            memory = measure(_IN_MEMORY, *ckpts)
        else:
            out_dir = tempfile.mkdtemp(dir=args.workdir, prefix="merged-")
            try:
                memory = measure(_MERGE, *ckpts, out_dir, chunk_mib)
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)
        results[label] = {"input_bytes": input_bytes, **memory,
                          "ratio": (memory["peak"] - memory["base"]) / input_bytes}
    if args.json:
        print(json.dumps(results))
        return
    print(f"{name}: one input checkpoint {input_bytes / 2**20:.0f} MiB "
          f"({model_bytes / 2**20:.0f} MiB as {args.dtype} safetensors); anonymous memory above "
          f"the imported interpreter, merging two inputs 0.5/0.5:")
    for label, r in results.items():
        print(f"  {label}: peak +{(r['peak'] - r['base']) / 2**20:.0f} MiB = {r['ratio']:.2f}x "
              f"one input; forked writers {r['forked'] / 2**20:.0f} MiB; {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
