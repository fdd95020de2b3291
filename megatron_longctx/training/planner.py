"""Layout planner: every valid TP/PP/CP/DP layout of a recipe with its memory per GPU and step time.

Memory comes from the one estimator (:mod:`megatron_longctx.training.memory`, also behind
``--dry-run``), the step time from the one FLOPs function
(:func:`megatron_longctx.training.flops.num_floating_point_operations`) at a stated throughput
per GPU. For each layout the planner picks the fastest options that fit: no recompute, then
selective, then full; the distributed optimizer whenever DP x CP > 1 (it only saves memory);
the logits chunked by the recipe's ``--cross-entropy-chunk-size`` rule. Layouts are sorted by
fit, then step time.

    python tools/plan_layout.py --model examples/llama2_7b_harpe_128k.yaml --seq-length 131072 \\
        --gpus 32 --gpu-memory 80 [--micro-batch-size 1 2] [--explain]

What the step time leaves out: communication (TP all-reduces, CP all-gathers, DP reduces),
kernel efficiency differences between layouts, and optimizer time; it counts model FLOPs plus
recompute and the 1F1B pipeline bubble ``(pp - 1) / micro-batches``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from dataclasses import dataclass

from megatron_longctx.config import RunConfig, load_stages
from megatron_longctx.training.memory import (
    GIB,
    MemoryEstimate,
    estimate_memory,
    stage_memory,
    with_options,
)

RECOMPUTE = (None, "selective", "full")  # fastest first
DEFAULT_TFLOPS = 400.0  # bf16 per GPU: ~40% of an H100's 989 TFLOP/s dense peak
DEFAULT_HEADROOM = 0.1  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    dp: int
    micro_batch_size: int

    def __str__(self) -> str:
        return f"TP={self.tp} PP={self.pp} CP={self.cp} DP={self.dp} MBS={self.micro_batch_size}"


@dataclass
class Plan:
    layout: Layout
    recompute: str | None
    distributed_optimizer: bool
    estimate: MemoryEstimate  # with the options above
    fits: bool
    step_seconds: float
    variants: dict[str, float]  # GiB of the terms under the alternative options


def layout_config(cfg: RunConfig, layout: Layout, recompute: str | None = None,
                  distributed_optimizer: bool = False) -> RunConfig:
    """``cfg`` at ``layout``; sequence parallelism whenever TP > 1 (Megatron-LM's advice)."""
    return with_options(
        cfg, parallel__tensor_model_parallel_size=layout.tp,
        parallel__pipeline_model_parallel_size=layout.pp,
        parallel__context_parallel_size=layout.cp, parallel__sequence_parallel=layout.tp > 1,
        parallel__use_distributed_optimizer=distributed_optimizer,
        training__micro_batch_size=layout.micro_batch_size,
        training__recompute_granularity=recompute)


def valid_layouts(cfg: RunConfig, gpus: int, micro_batch_sizes: list[int],
                  gpus_per_node: int) -> list[Layout]:
    """Layouts the config validation accepts for ``gpus`` ranks, with TP inside one node and a
    global batch divisible by micro-batch x DP."""
    found = []
    for tp in _divisors(min(gpus, gpus_per_node)):
        for pp in _divisors(gpus // tp):
            for cp in _divisors(gpus // (tp * pp)):
                dp = gpus // (tp * pp * cp)
                for mbs in micro_batch_sizes:
                    layout = Layout(tp, pp, cp, dp, mbs)
                    candidate = layout_config(cfg, layout)
                    try:
                        candidate.parallel.validate(gpus, candidate.model,
                                                    candidate.training.seq_length)
                    except ValueError:
                        continue
                    if cfg.training.global_batch_size % (mbs * dp) == 0:
                        found.append(layout)
    return found


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def step_seconds(cfg: RunConfig, gpus: int, tflops_per_gpu: float) -> float:
    """Model FLOPs of one iteration plus recompute, over ``gpus x tflops_per_gpu``, stretched
    by the 1F1B bubble."""
    from megatron_longctx.training.flops import attention_flops, num_floating_point_operations

    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    flops = num_floating_point_operations(m, t.seq_length, t.global_batch_size, tp=tp)
    if t.recompute_granularity == "full":  # one more forward of every layer (not the logits)
        logits = num_floating_point_operations(dataclasses.replace(m, num_layers=0),
                                               t.seq_length, t.global_batch_size, tp=tp)
        flops += (flops - logits) / 3
    elif t.recompute_granularity == "selective":  # one more forward of the core attention
        flops += attention_flops(m, t.global_batch_size * t.seq_length ** 2) / 3
    micro_batches = t.global_batch_size // (t.micro_batch_size * p.data_parallel_size(gpus))
    bubble = (pp - 1) / micro_batches
    return flops / (gpus * tflops_per_gpu * 1e12) * (1 + bubble)


def plan_layouts(cfg: RunConfig, gpus: int, gpu_memory_gib: float,
                 micro_batch_sizes: list[int], tflops_per_gpu: float = DEFAULT_TFLOPS,
                 headroom: float = DEFAULT_HEADROOM, gpus_per_node: int = 8) -> list[Plan]:
    """Every valid layout with its fastest fitting options, sorted by fit then step time."""
    usable = gpu_memory_gib * (1 - headroom) * GIB
    plans = []
    for layout in valid_layouts(cfg, gpus, micro_batch_sizes, gpus_per_node):
        sharded = layout.dp * layout.cp > 1
        options = [(r, sharded) for r in RECOMPUTE]
        estimates = {o: estimate_memory(layout_config(cfg, layout, *o), gpus) for o in options}
        fitting = [o for o in options if estimates[o].total <= usable]
        # nothing fits: show the smallest
        chosen = fitting[0] if fitting else min(options, key=lambda o: estimates[o].total)
        chunk_off = with_options(layout_config(cfg, layout, *chosen),
                                 training__cross_entropy_chunk_size=0)
        chunk_on = with_options(layout_config(cfg, layout, *chosen),
                                training__cross_entropy_chunk_size=_chunk_tokens(cfg, layout))
        plain = estimate_memory(layout_config(cfg, layout, chosen[0], False), gpus)
        variants = {
            **{f"activations_{r or 'none'}": estimates[(r, sharded)]["activations"] / GIB
               for r in RECOMPUTE},
            "optimizer_plain": plain["optimizer"] / GIB,
            "optimizer_distributed": estimates[chosen]["optimizer"] / GIB,
            "logits_full": _last_stage_logits(chunk_off, gpus) / GIB,
            "logits_chunked": _last_stage_logits(chunk_on, gpus) / GIB,
        }
        plans.append(Plan(layout, chosen[0], chosen[1], estimates[chosen],
                          fits=bool(fitting),
                          step_seconds=step_seconds(layout_config(cfg, layout, *chosen), gpus,
                                                    tflops_per_gpu),
                          variants=variants))
    plans.sort(key=functools.cmp_to_key(_fit_then_speed))

    return plans


def _fit_then_speed(a: Plan, b: Plan) -> int:
    """Fitting first; then faster; step times within 1% are a tie (the estimate leaves out
    communication), broken by less memory."""
    if a.fits != b.fits:
        return -1 if a.fits else 1
    if abs(a.step_seconds - b.step_seconds) > 0.01 * min(a.step_seconds, b.step_seconds):
        return -1 if a.step_seconds < b.step_seconds else 1
    return (a.estimate.total > b.estimate.total) - (a.estimate.total < b.estimate.total)


def _chunk_tokens(cfg: RunConfig, layout: Layout) -> int:
    """The automatic chunk size of ``--cross-entropy-chunk-size`` (used when it switches on)."""
    from megatron_longctx.model.chunked_loss import AUTO_CHUNK_LOGITS_BYTES
    from megatron_longctx.model.gpt import padded_vocab_size

    m = cfg.model
    vocab = padded_vocab_size(m.vocab_size, layout.tp, m.make_vocab_size_divisible_by) // layout.tp
    return max(1, AUTO_CHUNK_LOGITS_BYTES // (vocab * 4))


def _last_stage_logits(cfg: RunConfig, gpus: int) -> float:
    last = stage_memory(cfg, gpus, cfg.parallel.pipeline_model_parallel_size - 1)
    return last["logits"]


def format_table(plans: list[Plan]) -> str:
    """One row per plan, GiB per GPU; ``a/b/c`` cells give the term under each option."""
    rows = [["TP", "PP", "CP", "DP", "MBS", "weights", "grads", "optim plain/dist",
             "activations none/sel/full", "logits full/chunked", "recompute", "dist-opt",
             "peak GiB", "fits", "step s"]]
    for plan in plans:
        lo, v, e = plan.layout, plan.variants, plan.estimate
        rows.append([
            str(lo.tp), str(lo.pp), str(lo.cp), str(lo.dp), str(lo.micro_batch_size),
            f"{e['weights'] / GIB:.1f}", f"{e['gradients'] / GIB:.1f}",
            f"{v['optimizer_plain']:.1f}/{v['optimizer_distributed']:.1f}",
            f"{v['activations_none']:.1f}/{v['activations_selective']:.1f}/"
            f"{v['activations_full']:.1f}",
            f"{v['logits_full']:.2f}/{v['logits_chunked']:.2f}",
            plan.recompute or "none", "yes" if plan.distributed_optimizer else "no",
            f"{e.total / GIB:.1f}", "yes" if plan.fits else "NO", f"{plan.step_seconds:.1f}"])
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def load_recipe(path: str, stage: int | None) -> RunConfig:
    stages = load_stages(path)
    if stage is None:
        return stages[-1]
    if not 1 <= stage <= len(stages):
        raise ValueError(f"--stage {stage}: {path} has {len(stages)} stage(s), give 1 to "
                         f"{len(stages)}")
    return stages[stage - 1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="CONFIG",
                        help="YAML recipe (model and training sections are read)")
    parser.add_argument("--stage", type=int, help="stage of a staged recipe (default: last)")
    parser.add_argument("--seq-length", type=int, help="default: the recipe's")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-memory", type=float, required=True, metavar="GiB")
    parser.add_argument("--micro-batch-size", type=int, nargs="+",
                        help="one or several (default: the recipe's)")
    parser.add_argument("--global-batch-size", type=int, help="default: the recipe's")
    parser.add_argument("--vocab-size", type=int, help="default: the recipe's model.vocab_size")
    parser.add_argument("--tflops-per-gpu", type=float, default=DEFAULT_TFLOPS,
                        help="achieved model TFLOP/s per GPU for the step time")
    parser.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                        help="share of GPU memory kept free (CUDA context, NCCL, fragmentation)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="TP stays inside a node")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                        help="default: the recipe's")
    parser.add_argument("--explain", action="store_true",
                        help="print every layout's memory terms under the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_recipe(args.model, args.stage)
        t = cfg.training
        cfg = with_options(
            cfg, training__seq_length=args.seq_length or t.seq_length,
            training__global_batch_size=args.global_batch_size or t.global_batch_size,
            training__bf16=t.bf16 if args.bf16 is None else args.bf16,
            model__vocab_size=args.vocab_size or cfg.model.vocab_size)
        if args.gpus < 1 or args.gpu_memory <= 0 or args.tflops_per_gpu <= 0:
            raise ValueError("--gpus, --gpu-memory and --tflops-per-gpu must be positive")
        if not 0 <= args.headroom < 1:
            raise ValueError(f"--headroom must be in [0, 1), got {args.headroom}")
        cfg.model.validate()
        sizes = args.micro_batch_size or [cfg.training.micro_batch_size]
        plans = plan_layouts(cfg, args.gpus, args.gpu_memory, sizes, args.tflops_per_gpu,
                             args.headroom, args.gpus_per_node)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    m, t = cfg.model, cfg.training
    print(f"{args.model}: {m.num_layers} layers, hidden {m.hidden_size}, "
          f"{m.num_attention_heads} heads / {m.query_groups} groups, vocab {m.vocab_size}, "
          f"seq {t.seq_length}, global batch {t.global_batch_size}, "
          f"{'bf16' if t.bf16 else 'fp32'}; {args.gpus} GPUs x {args.gpu_memory:g} GiB "
          f"({1 - args.headroom:.0%} usable), {args.tflops_per_gpu:g} TFLOP/s per GPU")
    if not plans:
        print("no valid layout: the heads, groups, layers, sequence or global batch do not "
              "divide for these GPU counts")
        return 1
    print(format_table(plans))
    print("GiB per GPU (the most loaded pipeline stage). optim: Adam states without/with the "
          "distributed optimizer; activations: saved for backward without/selective/full "
          "recompute; logits: full / chunked. SP on whenever TP > 1. step s: FLOPs (Megatron-LM "
          "formula) + recompute over the stated throughput, with the 1F1B bubble; no "
          "communication.")
    if args.explain:
        for plan in plans:
            print(f"\n{plan.layout} (recompute {plan.recompute or 'none'}, distributed "
                  f"optimizer {'on' if plan.distributed_optimizer else 'off'}):")
            print(plan.estimate.explain())
    return 0 if any(plan.fits for plan in plans) else 2
