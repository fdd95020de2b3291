"""Pretrain / continue pretraining a Llama-style model on megatron-core.

Example (2 processes, TP=2, on CPU or GPU):
    torchrun --nproc_per_node 2 tools/pretrain.py --tensor-model-parallel-size 2 \
        --num-layers 4 --hidden-size 128 --num-attention-heads 8 --num-query-groups 2 \
        --seq-length 256 --micro-batch-size 2 --global-batch-size 8 --train-iters 50 \
        --rotary-base 500000 --data-path stdlib
A recipe with ``stages:`` (``--config examples/llama2_7b_abf_3stage.yaml``) runs its stages in
order; rerunning the same command skips finished stages and resumes the unfinished one.
Under Slurm: examples/slurm/pretrain.sbatch.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from megatron_longctx.arguments import parse_stages

    try:
        stages, args = parse_stages(argv, description=__doc__)
    except ValueError as err:  # a malformed recipe
        raise SystemExit(f"error: {err}") from None
    # megatron-core (seconds to import) only once the flags parsed: --help and typos stay fast
    from megatron_longctx.training.run import main as run

    run(stages, dry_run=getattr(args, "dry_run", False),
        world_size=getattr(args, "world_size", None), notes=args.megatron_notes)
    return 0
