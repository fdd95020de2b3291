"""``./examples/quickstart.sh --smoke``: the whole job (data, base, six 8x extension runs,
perplexity and passkey evaluation, report) end to end, then a rerun that reuses every step."""

import json
import math
import os
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ["base", "control", "abf", "pi", "yarn", "harpe", "pose"]


def _quickstart(out):
    env = {**os.environ, "QUICKSTART_OUT": str(out)}
    proc = subprocess.run([os.path.join(ROOT, "examples", "quickstart.sh"), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _rope(run_dir):
    from megatron_longctx.training.checkpoint import load_common, resolve_checkpoint

    args = load_common(resolve_checkpoint(run_dir))["args"]
    return args["model"]["rope_parameters"], args["training"]["seq_length"]


def test_quickstart_smoke_runs_the_whole_job_and_reuses_it(tmp_path):
    started = time.monotonic()
    _quickstart(tmp_path)
    first = time.monotonic() - started
    runs = tmp_path / "runs" / "quickstart_smoke"
    report = (runs / "report.md").read_text()
    assert "## Reading" in report and "At 2048 tokens (8x the 256-token" in report
    for png in ("eval/perplexity/perplexity.png", "eval/passkey/passkey.png"):
        assert f"]({png})" in report
        assert (runs / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ppl = json.loads((runs / "eval/perplexity/results.json").read_text())
    assert [os.path.basename(c) for c in ppl["by_checkpoint"]] == RUNS
    for by_length in ppl["by_checkpoint"].values():
        assert set(by_length) == {"256", "2048"}
        assert all(1 < r["ppl"] < 1e4 and math.isfinite(r["ppl"]) for r in by_length.values())
    passkey = json.loads((runs / "eval/passkey/results.json").read_text())
    assert [os.path.basename(c) for c in passkey["accuracy"]] == RUNS
    # each run trained what the recipe says, from the base's weights
    expected = {"base": ("default", 256), "control": ("default", 256),
                "abf": ("default", 2048), "pi": ("linear", 2048), "yarn": ("yarn", 2048),
                "harpe": ("harpe", 2048), "pose": ("yarn", 256)}
    for run, (rope_type, length) in expected.items():
        assert (runs / run / "exit_reason").read_text().strip() == "finished"
        rope, seq_length = _rope(str(runs / run))
        assert (rope["rope_type"], seq_length) == (rope_type, length), run
    assert _rope(str(runs / "abf"))[0]["rope_theta"] == 500000.0
    assert _rope(str(runs / "yarn"))[0]["factor"] == 8.0
    from megatron_longctx.training.checkpoint import load_common, resolve_checkpoint

    pose = load_common(resolve_checkpoint(str(runs / "pose")))["args"]["data"]
    assert (pose["position_transform"], pose["target_length"]) == ("pose", 2048)
    assert len(torch.load(runs / "pi" / "iter_0000003" / "common.pt", weights_only=False)
               ["args"].megatron_longctx["model"]["rope_parameters"]) >= 2
    # a rerun trains and evaluates nothing again
    mtime = (runs / "eval/passkey/results.json").stat().st_mtime
    started = time.monotonic()
    log = _quickstart(tmp_path)
    assert log.count("finished earlier") == len(RUNS)
    assert (runs / "eval/passkey/results.json").stat().st_mtime == mtime
    assert time.monotonic() - started < first / 3
