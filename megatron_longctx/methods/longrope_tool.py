"""``tools/longrope_search.py``: LongRoPE's search on one of our checkpoints, in one process or
under torchrun (TP/PP/CP share each evaluation; DP replicas evaluate different individuals).

The objective is the shared perplexity scorer on ``--num-documents`` documents cut to
``--target-length``. Every rank runs the same evolution on the same scores (rank 0's, broadcast),
so the layout changes nothing but speed. ``--out`` holds ``state.json`` (resumed from when
present), ``individuals.csv`` (every evaluated individual), ``rope_parameters.json``/``.yaml``
(the result, a recipe's ``rope_parameters``), ``long_factor.json``/``short_factor.json`` (for
``--longrope-long-factor FILE``/``--longrope-short-factor FILE``), ``search.png``
and ``baselines.json`` (the found factors against PI and YaRN at the same length).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from dataclasses import asdict

import yaml
from tqdm import tqdm

from megatron_longctx.eval.scoring import perplexity
from megatron_longctx.eval.tool_args import (
    add_checkpoint_args,
    add_document_args,
    long_documents_arg,
    parallel_config,
)
from megatron_longctx.methods.longrope_search import (
    START_TOKEN_CANDIDATES,
    Individual,
    LongRopeSearch,
    SearchConfig,
    SearchState,
    initial_individual,
    longrope_parameters,
    yarn_divisors,
)

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target-length", type=int, required=True, help="L': tokens per document")
    p.add_argument("--scale", type=float, default=None,
                   help="s: factors in [1, 1 + s] (default: target / original length)")
    p.add_argument("--original-max-position-embeddings", type=int, default=None,
                   help="the length the model was trained at (default: the checkpoint's "
                        "--seq-length)")
    p.add_argument("--short", action="store_true",
                   help="readjust short_factor at --target-length <= the original length, "
                        "keeping long_factor from --rope-parameters")
    p.add_argument("--rope-parameters", default=None,
                   help="JSON of an earlier search (long_factor kept in --short mode)")
    p.add_argument("--population", type=int, default=64)
    p.add_argument("--parents", type=int, default=32)
    p.add_argument("--mutations", type=int, default=16)
    p.add_argument("--crossovers", type=int, default=16)
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--grid", type=float, default=0.01)
    p.add_argument("--start-token-candidates", default=",".join(map(str, START_TOKEN_CANDIDATES)),
                   help="n-hat values searched (those below --target-length are used)")
    p.add_argument("--seed", type=int, default=0)
    add_document_args(p, "documents of at least --target-length tokens (>= 5)")
    add_checkpoint_args(p, out="longrope")
    return p


class Objective:
    """Perplexity of the model under an individual's ``rope_parameters``. With DP > 1 the
    model replicas evaluate different individuals of a batch in parallel (replica ``r`` takes
    every ``dp``-th one from ``r``); every rank then ranks rank 0's numbers."""

    def __init__(self, model, docs, length: int, parameters):
        self.model, self.docs, self.length, self.parameters = model, docs, length, parameters
        self.evaluated_here = 0  # individuals this replica evaluated

    def _perplexity(self, rope: dict) -> float:
        from megatron_longctx.eval.scoring import token_nll

        self.model.set_rope_parameters(rope)
        total, count = 0.0, 0
        for doc in self.docs:
            nll = token_nll(self.model, doc[None, :self.length].to(self._device()))
            total, count = total + float(nll.double().sum()), count + nll.numel()
        return perplexity(total, count)

    def rope_perplexity(self, rope: dict) -> float:
        """One setting, evaluated by every replica (the baselines)."""
        import torch.distributed as dist

        value = [self._perplexity(rope)]
        dist.broadcast_object_list(value, src=0)  # every rank ranks rank 0's numbers
        return value[0]

    def _device(self):
        return next(self.model.parameters()).device

    def __call__(self, individuals: list[Individual]) -> list[float]:
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state

        dp = parallel_state.get_data_parallel_world_size()
        replica = parallel_state.get_data_parallel_rank()
        scores = torch.zeros(len(individuals), dtype=torch.float64)  # [individuals]
        for i in range(replica, len(individuals), dp):
            scores[i] = self._perplexity(self.parameters(individuals[i]))
            self.evaluated_here += 1
        if dp > 1:  # each score is non-zero on exactly one replica
            dist.all_reduce(scores, group=parallel_state.get_data_parallel_group())
        values = scores.tolist()
        dist.broadcast_object_list(values, src=0)
        return values


def _write_csv(path: str, state: SearchState) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "perplexity", "start_tokens", "factors"])
        for iteration, key, ppl in state.evaluated:
            individual = Individual.from_key(key)
            writer.writerow([iteration, f"{ppl:.6f}", individual.start_tokens,
                             " ".join(f"{x:.2f}" for x in individual.factors)])
    os.replace(tmp, path)


def _plot(path: str, state: SearchState, yarn: list[float], best: Individual) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([b[0] for b in state.best], [b[2] for b in state.best], marker="o")
    left.set(xlabel="iteration", ylabel="best perplexity", title="LongRoPE search")
    left.grid(alpha=0.3)
    right.plot(yarn, label="YaRN (initial)")
    right.plot(best.factors, label=f"found (n̂ = {best.start_tokens})")
    right.set(xlabel="frequency pair j", ylabel="rescale factor λ_j", title="factors")
    right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch.distributed as dist

    from megatron_longctx.model import load_model
    from megatron_longctx.training.checkpoint import load_common, resolve_checkpoint

    if len(args.load) != 1:
        raise SystemExit("error: give one checkpoint to --load")
    path = resolve_checkpoint(args.load[0])
    if path is None:
        raise SystemExit(f"error: {args.load[0]} holds no checkpoint")
    saved = load_common(path).get("args") or {}
    original = args.original_max_position_embeddings or saved["training"]["seq_length"]
    earlier = None
    if args.rope_parameters:
        with open(args.rope_parameters) as f:
            earlier = json.load(f)
    if args.short:
        if earlier is None or args.target_length > original:
            raise SystemExit("error: --short readjusts short_factor at --target-length <= the "
                             "original length, keeping the long_factor of --rope-parameters")
        scale = earlier["factor"]
    else:
        if args.target_length <= original:
            raise SystemExit(f"error: --target-length {args.target_length} must exceed the "
                             f"original length {original} (or use --short)")
        scale = args.scale or args.target_length / original
    candidates = tuple(n for n in (int(v) for v in args.start_token_candidates.split(","))
                       if n < args.target_length)
    cfg = SearchConfig(scale, args.population, args.parents, args.mutations, args.crossovers,
                       args.iterations, args.grid, start_token_candidates=candidates,
                       seed=args.seed)
    try:
        cfg.validate()
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    docs = long_documents_arg(args, args.target_length)
    if len(docs) < min(5, args.num_documents):
        raise SystemExit(f"error: {args.data} has {len(docs)} documents of {args.target_length} "
                         f"tokens from document {args.first_document} on; the search needs "
                         f"{min(5, args.num_documents)}")
    model = load_model(args.load[0], parallel_config(args))
    theta = model.config.rope_parameters.get("rope_theta", 10000.0)
    dim = int(model.config.head_dim * model.config.rotary_percent)
    yarn = yarn_divisors(scale, original, theta, dim)

    def parameters(individual: Individual) -> dict:
        if args.short:
            return {**earlier, "short_factor": list(individual.factors),
                    "longrope_start_tokens": individual.start_tokens}
        return longrope_parameters(individual, scale, original, theta)

    objective = Objective(model, docs, args.target_length, parameters)
    initial = (Individual(tuple([1.0] * (dim // 2)), 0) if args.short
               else initial_individual(yarn, cfg))
    os.makedirs(args.out, exist_ok=True)
    state_path = os.path.join(args.out, "state.json")
    state = SearchState.load(state_path) if os.path.exists(state_path) else None
    if state is not None and state.config != json.loads(json.dumps(asdict(cfg))):
        raise SystemExit(f"error: {state_path} is a search with other settings; use another "
                         f"--out or delete it")
    writer = dist.get_rank() == 0
    search = LongRopeSearch(cfg, initial, objective, state)
    with tqdm(total=cfg.iterations + 1, initial=len(search.state.best), unit="iter",
              desc="longrope", disable=not writer) as bar:
        def on_iteration(state: SearchState) -> None:
            if writer:
                state.save(state_path)
                _write_csv(os.path.join(args.out, "individuals.csv"), state)
            bar.update(1)
            bar.set_postfix(best_ppl=f"{state.best[-1][2]:.4f}", evaluated=len(state.scores))

        best = search.run(on_iteration)
    result = parameters(best)
    best_ppl = search.state.scores[best.key]
    baselines = {"longrope": best_ppl,
                 "yarn_initial_individual": search.state.scores[initial.key]}
    if not args.short:
        common = {"rope_theta": theta, "factor": scale}
        baselines["yarn"] = objective.rope_perplexity(
            {"rope_type": "yarn", "original_max_position_embeddings": original, **common})
        baselines["pi"] = objective.rope_perplexity({"rope_type": "linear", **common})
    if writer:
        with open(os.path.join(args.out, "rope_parameters.json"), "w") as f:
            json.dump(result, f, indent=1)
        for name in ("long_factor", "short_factor"):  # for --longrope-long-factor FILE
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                json.dump(result[name], f)
        with open(os.path.join(args.out, "rope_parameters.yaml"), "w") as f:
            yaml.safe_dump({"model": {"rope_parameters": result}}, f, sort_keys=False)
        with open(os.path.join(args.out, "baselines.json"), "w") as f:
            json.dump({"target_length": args.target_length, "perplexity": baselines}, f,
                      indent=1)
        _plot(os.path.join(args.out, "search.png"), search.state, yarn, best)
        print(json.dumps({"perplexity": baselines, "start_tokens": best.start_tokens,
                          "evaluated": len(search.state.scores)}))
    if objective.evaluated_here < search.evaluations:  # DP replicas shared the work
        print(f"rank {dist.get_rank()} evaluated {objective.evaluated_here} of the "
              f"{search.evaluations} individuals", flush=True)
    return {"rope_parameters": result, "perplexity": baselines,
            "evaluations": search.evaluations}
