"""--profile: torch.profiler over Megatron-LM's iteration window, trace written to disk."""

import glob
import json

import pytest
import torch

from megatron_longctx.config import RunConfig
from megatron_longctx.training.profiling import build_profiler


def profiled_run(tmp_path, iterations: int, **logging) -> list[str]:
    cfg = RunConfig()
    cfg.logging.profile, cfg.logging.tensorboard_dir = True, str(tmp_path)
    for key, value in logging.items():
        setattr(cfg.logging, key, value)
    profiler = build_profiler(cfg, rank=0)
    a = torch.randn(64, 64)
    for step in range(iterations):
        with torch.profiler.record_function(f"iteration_{step}"):
            a = a @ a / 64
        if profiler is not None:
            profiler.step()
    if profiler is not None:
        profiler.stop()
    return glob.glob(str(tmp_path / "*.pt.trace.json"))


def test_profile_records_the_chosen_iterations(tmp_path):
    traces = profiled_run(tmp_path, 6, profile_step_start=2, profile_step_end=4)
    assert len(traces) == 1
    with open(traces[0]) as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"iteration_2", "iteration_3", "aten::mm"} <= names
    assert not {"iteration_0", "iteration_1", "iteration_4"} & names


def test_profile_only_on_profile_ranks_and_with_a_place_for_the_trace(tmp_path):
    assert profiled_run(tmp_path, 4, profile_ranks=[1], profile_step_start=1,
                        profile_step_end=2) == []
    cfg = RunConfig()
    cfg.data.data_path, cfg.training.train_iters, cfg.logging.profile = ["stdlib"], 1, True
    with pytest.raises(ValueError, match="--profile writes its trace to --tensorboard-dir"):
        cfg.validate(world_size=1)
