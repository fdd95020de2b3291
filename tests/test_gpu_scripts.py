"""The GPU checks as far as a CPU machine can check them: tests/gpu is collected and every test
skipped with the reason, the one-command runner and the wheel script document themselves
and parse, and the GPU benchmark refuses to run without CUDA before doing any work."""

import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN, PREPARE = (os.path.join(ROOT, "tests", "gpu", name)
                for name in ("run.sh", "prepare_wheels.sh"))
ENV = {**os.environ, "PYTHONPATH": ROOT}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, tests/gpu runs for real")
def test_gpu_tests_are_collected_and_skipped_with_the_reason():
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/gpu", "-rs", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    skipped = int(re.search(r"(\d+) skipped", summary).group(1))
    assert skipped >= 40 and not re.search(r"passed|failed|error", summary), summary
    reasons = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert reasons and all("needs a CUDA GPU" in line for line in reasons), reasons[:3]
    for name in ("test_gpu_attention", "test_gpu_model", "test_gpu_training",
                 "test_gpu_chunked_loss"):
        assert f"tests/gpu/{name}.py" in proc.stdout, name


def test_scripts_parse_and_document_the_wheel_folder():
    for script in (RUN, PREPARE):
        assert os.access(script, os.X_OK), script
        subprocess.run(["bash", "-n", script], check=True)
        text = open(script).read()
        assert "set -euo pipefail" in text, script
    help_text = subprocess.run([RUN, "--help"], capture_output=True, text=True, check=True).stdout
    for words in ("--wheels DIR", "MEGATRON_LONGCTX_WHEELS", "prepare_wheels.sh", "--no-index"):
        assert words in help_text, words
    prepare = subprocess.run([PREPARE, "--help"], capture_output=True, text=True,
                             check=True).stdout
    assert "CPython 3.12" in prepare and "64 MiB" in prepare and "torch" in prepare


def test_run_refuses_a_missing_wheel_folder(tmp_path):
    proc = subprocess.run([RUN, "--wheels", str(tmp_path / "none")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "prepare_wheels.sh" in proc.stderr


def test_gpu_benchmark_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the benchmark would run")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_step.py"),
                           "--seqs", "8192"], env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "needs CUDA" in proc.stderr
    assert "Traceback" not in proc.stderr
