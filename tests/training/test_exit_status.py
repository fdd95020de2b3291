"""What the Slurm job script asks before training: where ``exit_reason`` will be, and whether
the flags make a job that can resume (the requeue itself: tests/slurm)."""

import pytest

from megatron_longctx.config import RunConfig, chain_stages
from megatron_longctx.training import exit_status


def _stages(count: int, save: str | None) -> list[RunConfig]:
    configs = [RunConfig() for _ in range(count)]
    for cfg in configs:
        cfg.checkpoint.save = save
    return chain_stages(configs)


def test_exit_reason_dir_is_the_save_dir_or_the_stages_parent():
    assert exit_status.exit_reason_dir(_stages(1, "runs/a")) == "runs/a"
    staged = _stages(3, "runs/b")
    assert staged[0].checkpoint.save == "runs/b/stage_1"  # where the loop writes per stage
    assert exit_status.exit_reason_dir(staged) == "runs/b"  # where run.main writes overall
    assert exit_status.exit_reason_dir(_stages(1, None)) is None


def test_main_prints_the_directory_and_checks_the_job(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert exit_status.main(["--data-path", "stdlib", "--save", "s", "--load", "s"]) == 0
    assert capsys.readouterr().out == "s\n"
    assert exit_status.main(["--data-path", "stdlib"]) == 0
    assert capsys.readouterr().out == "\n"  # saves nothing: the script warns
    with pytest.raises(SystemExit, match="--save s without --load: a requeued job would"):
        exit_status.main(["--data-path", "stdlib", "--save", "s"])
    monkeypatch.setenv("SLURM_NTASKS", "3")
    with pytest.raises(SystemExit, match="world size 3 is not divisible by TP"):
        exit_status.main(["--data-path", "stdlib", "--save", "s", "--load", "s",
                          "--tensor-model-parallel-size", "2"])
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / exit_status.EXIT_REASON_FILE).write_text("signal\n")
    assert exit_status.read_exit_reason(str(tmp_path / "s")) in exit_status.INTERRUPTED
    assert exit_status.read_exit_reason(str(tmp_path / "missing")) is None
