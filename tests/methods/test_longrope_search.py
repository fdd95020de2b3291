"""LongRoPE search: operators keep individuals monotone, on the grid and in bounds; nothing is
evaluated twice; an interrupted search resumes to the same result; the found factors beat YaRN
and PI on held-out documents of a tiny pretrained model; TP=2 scores equal one process; the
output loads in transformers' ``longrope``."""

import csv
import json
import os
import random

import pytest
import torch

from megatron_longctx.methods.longrope_search import (
    Individual,
    LongRopeSearch,
    SearchConfig,
    SearchState,
    crossover,
    initial_individual,
    longrope_parameters,
    mutate,
    yarn_divisors,
)

from distributed import ROOT, run_python, run_torchrun

TOOL = os.path.join(ROOT, "tools", "longrope_search.py")


def _on_grid_and_bounded(ind: Individual, cfg: SearchConfig) -> bool:
    return all(1.0 <= f <= 1.0 + cfg.scale + 1e-9 and abs(round(f * 100) - f * 100) < 1e-6
               for f in ind.factors)


def test_operators_keep_individuals_monotone_on_grid_and_in_bounds():
    cfg = SearchConfig(scale=4.0, start_token_candidates=(0, 4, 16))
    rng = random.Random(0)
    start = initial_individual(yarn_divisors(4.0, 64, 10000.0, 16), cfg)
    assert start.is_monotone() and start.factors[0] == 1.0 and start.factors[-1] == 4.0
    population = [start]
    for _ in range(2000):
        a, b = rng.choice(population), rng.choice(population)
        child = mutate(a, rng, cfg) if rng.random() < 0.5 else crossover(a, b, rng, cfg)
        assert child.is_monotone(), child
        assert _on_grid_and_bounded(child, cfg), child
        assert child.start_tokens in (0, 4, 16)
        population.append(child)
    assert len({p.key for p in population}) > 1000  # the operators do explore
    # a crossover of incompatible parents falls back to a mutation, still monotone
    low, high = Individual((1.0, 1.0, 5.0, 5.0)), Individual((1.0, 5.0, 5.0, 5.0))
    assert crossover(high, low, rng, cfg).is_monotone()


def _toy_objective(counter: list):
    """A smooth bowl around a monotone target, plus an n-hat preference; counts evaluations."""
    target = [1.0 + 3.0 * (j / 7) ** 2 for j in range(8)]

    def evaluate(individuals):
        counter.extend(i.key for i in individuals)
        return [10.0 + sum((f - t) ** 2 for f, t in zip(i.factors, target))
                + 0.01 * abs(i.start_tokens - 4) for i in individuals]
    return evaluate


def _cfg(**kw):
    return SearchConfig(scale=4.0, population=16, parents=8, mutations=4, crossovers=4,
                        iterations=6, start_token_candidates=(0, 1, 2, 4, 8), seed=3, **kw)


def test_search_improves_never_reevaluates_and_resumes_identically(tmp_path):
    start = initial_individual(yarn_divisors(4.0, 64, 10000.0, 16), _cfg())
    counted = []
    full = LongRopeSearch(_cfg(), start, _toy_objective(counted))
    best = full.run()
    assert len(counted) == len(set(counted)) == len(full.state.scores)  # never twice
    assert full.state.scores[best.key] < full.state.scores[start.key]
    assert [b[2] for b in full.state.best] == sorted((b[2] for b in full.state.best),
                                                     reverse=True)
    # interrupted after iteration 3 (state saved each iteration), then resumed from disk
    path = str(tmp_path / "state.json")

    def save_then_stop(state):
        state.save(path)
        if state.iteration == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        LongRopeSearch(_cfg(), start, _toy_objective([])).run(save_then_stop)
    resumed = LongRopeSearch(_cfg(), start, _toy_objective([]), SearchState.load(path))
    assert resumed.run() == best
    assert resumed.state.evaluated == [tuple(e) for e in full.state.evaluated]
    assert resumed.state.best == full.state.best


def test_longrope_output_equals_transformers_inverse_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megatron_longctx.rope.methods import compute_inv_freq

    factors = tuple(1.0 + 0.25 * j for j in range(8))
    rope = longrope_parameters(Individual(factors, 0), 4.0, 64, 10000.0)
    assert json.loads(json.dumps(rope)) == rope  # a plain JSON/YAML block
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                         rope_parameters={k: v for k, v in rope.items()
                                          if k != "longrope_start_tokens"})
    for seq_len in (32, 200):  # short and long factors
        theirs, their_factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=seq_len)
        ours, our_factor = compute_inv_freq(rope, 16, 4, 4, seq_len=seq_len,
                                            max_position_embeddings=256)
        torch.testing.assert_close(ours[0], theirs.float(), rtol=1e-6, atol=0)
        assert our_factor == pytest.approx(their_factor)


@pytest.fixture(scope="module")
def search_setup(tmp_path_factory):
    """A tiny byte-level Llama pretrained at 64 tokens, stdlib documents as JSONL."""
    from megatron_longctx.data.corpora.stdlib_corpus import stdlib_documents

    root = tmp_path_factory.mktemp("longrope")
    docs = root / "docs.jsonl"
    with open(docs, "w") as f:
        for text in stdlib_documents(max_docs=400):
            if len(text.encode()) >= 400:
                f.write(json.dumps({"text": text}) + "\n")
    run_python(os.path.join(ROOT, "tools", "pretrain.py"), "--data-path", "stdlib",
               "--seq-length", "64", "--micro-batch-size", "16", "--global-batch-size", "16",
               "--train-iters", "150", "--lr", "3e-3", "--min-lr", "3e-4",
               "--lr-warmup-iters", "10", "--hidden-size", "96", "--ffn-hidden-size", "256",
               "--num-layers", "2", "--num-attention-heads", "4", "--save",
               str(root / "ckpt"), "--log-interval", "50")
    return root


SEARCH = ["--target-length", "256", "--num-documents", "5", "--population", "8",
          "--parents", "4", "--mutations", "2", "--crossovers", "2", "--iterations", "4",
          "--start-token-candidates", "0,2,8"]


def test_search_beats_yarn_and_pi_on_held_out_documents(search_setup, single_process_group):
    from megatron_longctx.eval.tool_args import long_documents_arg
    from megatron_longctx.methods.longrope_tool import Objective, build_parser, main
    from megatron_longctx.model import load_model

    root = search_setup
    out = str(root / "search1")
    result = main(["--load", str(root / "ckpt"), "--data", str(root / "docs.jsonl"), *SEARCH,
                   "--out", out])
    rope = result["rope_parameters"]
    assert rope["rope_type"] == "longrope" and len(rope["long_factor"]) == 12
    with open(os.path.join(out, "individuals.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result["evaluations"] == len({r["factors"] + r["start_tokens"]
                                                      for r in rows})
    assert os.path.getsize(os.path.join(out, "search.png")) > 0
    # held-out documents (not the search's) at 4x the training length
    held = build_parser().parse_args(["--load", str(root / "ckpt"), "--data",
                                      str(root / "docs.jsonl"), "--target-length", "256",
                                      "--first-document", "150", "--num-documents", "8"])
    model = load_model(str(root / "ckpt"))
    objective = Objective(model, long_documents_arg(held, 256), 256, None)
    common = {"rope_theta": 10000.0, "factor": 4.0}
    found = objective.rope_perplexity(rope)
    yarn_genes = initial_individual(yarn_divisors(4.0, 64, 10000.0, 24), SearchConfig(4.0))
    yarn_initial = objective.rope_perplexity({**rope, "long_factor": list(yarn_genes.factors),
                                              "longrope_start_tokens": 0})
    pi = objective.rope_perplexity({"rope_type": "linear", **common})
    print(f"held-out ppl at 256: found {found:.3f}, YaRN initial {yarn_initial:.3f}, "
          f"PI {pi:.3f}")
    assert found < yarn_initial and found < pi
    # the same search at TP=2: every individual's perplexity within 1e-4 relative
    run_torchrun(TOOL, 2, "--load", str(root / "ckpt"), "--data", str(root / "docs.jsonl"),
                 *SEARCH, "--tensor-model-parallel-size", "2", "--out", str(root / "tp2"))
    with open(root / "tp2" / "individuals.csv") as f:
        tp2 = list(csv.DictReader(f))
    assert [(r["iteration"], r["factors"], r["start_tokens"]) for r in tp2] == \
        [(r["iteration"], r["factors"], r["start_tokens"]) for r in rows]
    for a, b in zip(rows, tp2):
        assert float(b["perplexity"]) == pytest.approx(float(a["perplexity"]), rel=1e-4)
    # DP=2: the two replicas evaluate alternate individuals, the search is unchanged
    out = run_torchrun(TOOL, 2, "--load", str(root / "ckpt"), "--data", str(root / "docs.jsonl"),
                       *SEARCH, "--out", str(root / "dp2"))
    with open(root / "dp2" / "individuals.csv") as f:
        dp2 = list(csv.DictReader(f))
    assert [(r["iteration"], r["factors"], r["start_tokens"]) for r in dp2] == \
        [(r["iteration"], r["factors"], r["start_tokens"]) for r in rows]
    for a, b in zip(rows, dp2):
        assert float(b["perplexity"]) == pytest.approx(float(a["perplexity"]), rel=1e-4)
    shares = sorted(int(line.split()[3]) for line in out.splitlines()
                    if " evaluated " in line and line.startswith("rank"))
    assert len(shares) == 2 and sum(shares) == len(rows) and shares[1] - shares[0] <= 5
