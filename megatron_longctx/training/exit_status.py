"""Why a run stopped, as a job script sees it: ``<save>/exit_reason`` (DECISIONS 7).

The training loop writes ``finished``, ``signal``, ``duration`` or ``interval`` there after its
last checkpoint (no file: the run failed or was killed). A preempted or time-limited run
(``signal``/``duration``) is worth requeueing: it resumes from that checkpoint.

``examples/slurm/pretrain.sbatch`` asks, before starting the training step, where the run with
its flags keeps that file; this also checks the flags, the recipe and (in a job, from
``SLURM_NTASKS``) the parallel layout before any node starts work:

    python -m megatron_longctx.training.exit_status --config recipe.yaml --save runs/x
    # prints runs/x (a staged recipe: its <save>, beside the stage_<k> directories)

It runs in the batch shell: no megatron-core import.
"""

from __future__ import annotations

import os
import sys

EXIT_REASON_FILE = "exit_reason"
INTERRUPTED = ("signal", "duration")  # reasons after which a requeued job resumes


def exit_reason_dir(stages) -> str | None:
    """Where a run of these stage configs writes ``exit_reason``: its ``--save`` (a staged
    recipe: the parent of its ``<save>/stage_<k>`` directories); None when it saves nothing."""
    save = stages[0].checkpoint.save
    if not save:
        return None
    return os.path.dirname(save) if len(stages) > 1 else save


def read_exit_reason(directory: str | None) -> str | None:
    try:
        with open(os.path.join(directory or "", EXIT_REASON_FILE)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    """Print the ``exit_reason`` directory of ``longctx-pretrain`` run with ``argv`` (an empty
    line when the run saves nothing). Exits non-zero with a message on bad flags or layouts,
    and on a ``--save`` without ``--load`` (a requeued job must resume)."""
    from megatron_longctx.arguments import parse_stages

    world_size = os.environ.get("SLURM_NTASKS")  # in a job: check the layout it will run
    try:
        stages, _ = parse_stages(argv)
        for cfg in stages:
            if world_size and not cfg.checkpoint.use_checkpoint_args:  # as training does
                cfg.validate(int(world_size))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    ck = stages[0].checkpoint
    if len(stages) == 1 and ck.save and not ck.load:  # staged recipes load <save>/stage_<k>
        raise SystemExit(f"error: --save {ck.save} without --load: a requeued job would start "
                         f"over; pass --load {ck.save} as well (with --pretrained-checkpoint "
                         f"for the first start)")
    print(exit_reason_dir(stages) or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
