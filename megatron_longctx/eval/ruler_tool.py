"""``tools/eval_ruler.py``: RULER's synthetic tasks (those needing no external data) for one or
more checkpoints: a task x length table, the average, and the effective length."""

from __future__ import annotations

import argparse
import logging
import os
import random
import time

import torch
from tqdm import tqdm

from megatron_longctx.eval.generation import greedy_generate
from megatron_longctx.eval.report import plot_lines, write_table
from megatron_longctx.eval.ruler import DEFAULT_THRESHOLD, TASKS, build_sample, effective_length
from megatron_longctx.eval.ruler import score as ruler_score
from megatron_longctx.eval.tool_args import (
    add_checkpoint_args,
    checkpoint_tokenizer,
    label,
    lengths_arg,
    parallel_config,
)

logger = logging.getLogger(__name__)


def ruler_scores(model, tokenizer, tasks: list[str], lengths: list[int], samples: int,
                 haystack: str, seed: int = 0, progress=None) -> dict[str, dict[int, float]]:
    """``{task: {length: mean score 0..100}}``. Each prompt leaves room for the answer, so
    prompt + answer fit in ``length`` tokens; samples are the same for every checkpoint."""
    def count_tokens(text: str) -> int:
        return len(tokenizer.tokenize(text))

    device = next(model.parameters()).device
    results: dict[str, dict[int, float]] = {task: {} for task in tasks}
    for length in lengths:
        for task in tasks:
            budget = build_sample(task, length, count_tokens, random.Random(0),
                                  haystack).max_new_tokens
            total = 0.0
            for i in range(samples):
                rng = random.Random(f"{seed}/{task}/{length}/{i}")
                sample = build_sample(task, length - budget, count_tokens, rng, haystack)
                prompt = torch.tensor([tokenizer.tokenize(sample.prompt)], device=device)
                out = greedy_generate(model, prompt, sample.max_new_tokens,
                                      stop_ids=[tokenizer.eod])[0].tolist()
                if tokenizer.eod in out:
                    out = out[:out.index(tokenizer.eod)]
                total += ruler_score(sample, tokenizer.detokenize(out))
                if progress:
                    progress(task, length)
            results[task][length] = total / samples
    return results


def _haystack(args) -> str:
    """Essay haystack text: ``--haystack`` file, else Python's standard-library sources."""
    if args.haystack:
        with open(args.haystack, encoding="utf-8") as f:
            return f.read()
    from megatron_longctx.data.corpora.stdlib_corpus import stdlib_documents

    need, parts = 8 * max(args.lengths), []  # >= ~2 words per token
    for text in stdlib_documents():
        parts.append(text)
        if sum(map(len, parts)) > need * 6:
            break
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lengths", type=lengths_arg, required=True,
                   help="context lengths (prompt + answer), e.g. 4096,8192,16384")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help=f"comma-separated subset of: {', '.join(TASKS)}")
    p.add_argument("--samples", type=int, default=20, help="samples per task and length")
    p.add_argument("--haystack", default=None,
                   help="text file for the essay haystacks (default: stdlib sources)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="average score an effective length must reach (RULER: 85.6)")
    p.add_argument("--seed", type=int, default=0)
    add_checkpoint_args(p, out="eval/ruler")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    tasks = [t for t in args.tasks.replace(" ", "").split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise SystemExit(f"error: unknown --tasks {unknown}; choose from {', '.join(TASKS)}")
    if args.samples < 1:
        raise SystemExit("error: --samples must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch.distributed as dist

    from megatron_longctx.model import load_model

    tokenizer = checkpoint_tokenizer(args)
    haystack = _haystack(args)
    parallel = parallel_config(args)
    results = {}
    for ckpt in args.load:
        model = load_model(ckpt, parallel)
        started = time.perf_counter()
        with tqdm(total=len(tasks) * len(args.lengths) * args.samples, unit="sample",
                  desc=label(ckpt), disable=dist.get_rank() != 0) as bar:
            def progress(task, length):
                bar.update(1)
                bar.set_postfix(task=task, length=length)

            results[ckpt] = ruler_scores(model, tokenizer, tasks, args.lengths, args.samples,
                                         haystack, args.seed, progress)
        logger.info("%s: %.0f s", ckpt, time.perf_counter() - started)
        del model
    if dist.get_rank() != 0:
        return results
    averages = {c: {n: sum(r[t][n] for t in tasks) / len(tasks) for n in args.lengths}
                for c, r in results.items()}
    effective = {c: effective_length(a, args.threshold) for c, a in averages.items()}
    header = ["checkpoint", "task", *[str(n) for n in args.lengths]]
    rows = []
    for c, r in results.items():
        rows += [[label(c), t, *[r[t][n] for n in args.lengths]] for t in tasks]
        rows.append([label(c), "average", *[averages[c][n] for n in args.lengths]])
    meta = {"lengths": args.lengths, "tasks": tasks, "samples": args.samples,
            "threshold": args.threshold, "seed": args.seed,
            "scores": {c: {t: {str(n): s for n, s in by.items()} for t, by in r.items()}
                       for c, r in results.items()},
            "average": {c: {str(n): s for n, s in a.items()} for c, a in averages.items()},
            "effective_length": effective}
    paths = write_table(args.out, "ruler", header, rows, meta)
    plot_lines(os.path.join(args.out, "ruler.png"),
               {label(c): (args.lengths, [a[n] for n in args.lengths])
                for c, a in averages.items()},
               "context length (tokens)", "average score",
               f"RULER average over {len(tasks)} tasks (threshold {args.threshold:g})")
    with open(paths["md"]) as f:
        print(f.read())
    for c, n in effective.items():
        print(f"{label(c)}: effective length {n if n is not None else 'none'} "
              f"(average >= {args.threshold:g})")
    return results
