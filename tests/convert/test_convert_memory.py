"""A sharded-safetensors model of >= 200 MB converts (tools/convert_hf_to_mcore.py, a fresh
process) with a peak of anonymous memory (RssAnon, not the page cache) of at most half the
model's bytes above the imported interpreter's, measured by benchmarks/convert_memory.py."""

import os
import sys

from distributed import ROOT

sys.path.insert(0, ROOT)
from benchmarks.convert_memory import make_model, measure  # noqa: E402


def test_conversion_peak_anonymous_memory(tmp_path):
    hf_dir, out_dir = str(tmp_path / "hf"), str(tmp_path / "out")
    model_bytes = make_model(hf_dir, layers=8, hidden=1024, ffn=2816, heads=16, groups=8,
                             vocab=8192, dtype="bfloat16")
    assert model_bytes >= 200e6
    memory = measure(hf_dir, out_dir)
    ratio = (memory["peak"] - memory["base"]) / model_bytes
    print(f"model {model_bytes / 2**20:.0f} MiB, conversion peak {ratio:.2f}x; forked "
          f"writers {memory['forked'] / 2**20:.0f} MiB, spawned helpers "
          f"{memory['helpers'] / 2**20:.0f} MiB")
    assert ratio <= 0.5
    assert os.path.isdir(os.path.join(out_dir, "iter_0000000"))
