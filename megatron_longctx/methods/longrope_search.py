"""LongRoPE's evolutionary search (METHODS.md §4, seed 002) of per-pair rescale factors and n-hat.

An individual is ``λ_j`` (one divisor per rotary frequency pair, on a 0.01 grid in
``[1, 1 + s]``, non-decreasing in ``j``) plus ``n̂`` (the first positions left unscaled). The
search starts from YaRN's divisors and 63 mutants of them; every iteration keeps the best
``parents`` and adds ``mutations`` mutants and ``crossovers`` children of random parents. An
individual seen before is never evaluated again (the cache is keyed by the rounded genes).

The evolution is model-free: ``evaluate(individuals) -> perplexities`` is the caller's. All its
randomness comes from one ``random.Random`` whose state is part of :class:`SearchState`, which is
saved after every iteration: a resumed search makes exactly the choices an uninterrupted one
would. Ranking uses perplexities rounded to 5 significant digits, so layouts whose logits agree
to ~1e-5 (TP, CP) rank individuals identically.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

START_TOKEN_CANDIDATES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)


@dataclass(frozen=True)
class Individual:
    factors: tuple[float, ...]  # λ_j, one per rotary frequency pair, on the grid
    start_tokens: int = 0  # n̂

    @property
    def key(self) -> str:
        return f"{self.start_tokens}:" + ",".join(f"{f:.2f}" for f in self.factors)

    @classmethod
    def from_key(cls, key: str) -> Individual:
        n, factors = key.split(":")
        return cls(tuple(float(f) for f in factors.split(",")), int(n))

    def is_monotone(self) -> bool:
        return all(a <= b for a, b in zip(self.factors, self.factors[1:]))


@dataclass
class SearchConfig:
    scale: float  # s: λ_j in [1, 1 + s]
    population: int = 64
    parents: int = 32
    mutations: int = 16
    crossovers: int = 16
    iterations: int = 40
    grid: float = 0.01
    mutation_prob: float = 0.3
    crossover_prob: float = 0.3 * 0.5
    crossover_tries: int = 20
    start_token_candidates: tuple[int, ...] = START_TOKEN_CANDIDATES
    seed: int = 0

    def validate(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"--scale must be positive, got {self.scale}")
        if not 0 < self.parents <= self.population:
            raise ValueError(f"--parents ({self.parents}) must be in [1, --population "
                             f"{self.population}]")
        if self.parents + self.mutations + self.crossovers != self.population:
            raise ValueError(f"--parents + --mutations + --crossovers ({self.parents} + "
                             f"{self.mutations} + {self.crossovers}) must equal --population "
                             f"({self.population})")
        if self.iterations < 0 or self.grid <= 0:
            raise ValueError("--iterations must be >= 0 and --grid positive")
        if not self.start_token_candidates:
            raise ValueError("give at least one n-hat candidate")


@dataclass
class SearchState:
    """Everything a resumed search needs; JSON on disk."""

    config: dict
    iteration: int = 0  # completed iterations (0: the initial population is evaluated)
    population: list[str] = field(default_factory=list)  # keys
    scores: dict[str, float] = field(default_factory=dict)  # the cache: key -> perplexity
    evaluated: list[tuple[int, str, float]] = field(default_factory=list)  # in order
    best: list[tuple[int, str, float]] = field(default_factory=list)  # per iteration
    rng_state: list | None = None

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f)
        os.replace(tmp, path)  # an interrupted save leaves the previous state whole

    @classmethod
    def load(cls, path: str) -> SearchState:
        with open(path) as f:
            raw = json.load(f)
        raw["evaluated"] = [tuple(e) for e in raw["evaluated"]]
        raw["best"] = [tuple(b) for b in raw["best"]]
        return cls(**raw)


def rank_value(perplexity: float) -> float:
    """Perplexity rounded to 5 significant digits: the value individuals are ranked by."""
    return float(f"{perplexity:.4e}")


def on_grid(value: float, cfg: SearchConfig) -> float:
    steps = round((value - 1.0) / cfg.grid)
    return round(min(max(1.0 + steps * cfg.grid, 1.0), 1.0 + cfg.scale), 2)


def initial_individual(yarn_factors: Sequence[float], cfg: SearchConfig) -> Individual:
    """YaRN's per-pair divisors on the grid (monotone already: they ramp from 1 to s)."""
    return Individual(tuple(on_grid(f, cfg) for f in yarn_factors), 0)


def _grid_between(low: float, high: float, rng: random.Random, cfg: SearchConfig) -> float:
    steps = int(round((high - low) / cfg.grid))
    return round(low + rng.randint(0, max(steps, 0)) * cfg.grid, 2)


def mutate(parent: Individual, rng: random.Random, cfg: SearchConfig) -> Individual:
    """Each gene with probability ``mutation_prob`` redrawn on the grid between its (current)
    neighbours, so the result stays monotone; n̂ redrawn with the same probability."""
    factors = list(parent.factors)
    top = round(1.0 + cfg.scale, 2)
    for j in range(len(factors)):
        if rng.random() < cfg.mutation_prob:
            low = factors[j - 1] if j > 0 else 1.0
            high = factors[j + 1] if j + 1 < len(factors) else top
            factors[j] = _grid_between(low, high, rng, cfg)
    start = parent.start_tokens
    if rng.random() < cfg.mutation_prob:
        start = rng.choice(cfg.start_token_candidates)
    return Individual(tuple(factors), start)


def crossover(first: Individual, second: Individual, rng: random.Random,
              cfg: SearchConfig) -> Individual:
    """Genes from ``second`` with probability ``crossover_prob``; a non-monotone child is
    retried up to ``crossover_tries`` times, then ``first`` is mutated instead."""
    for _ in range(cfg.crossover_tries):
        factors = tuple(b if rng.random() < cfg.crossover_prob else a
                        for a, b in zip(first.factors, second.factors))
        start = second.start_tokens if rng.random() < 0.5 else first.start_tokens
        child = Individual(factors, start)
        if child.is_monotone():
            return child
    return mutate(first, rng, cfg)


Evaluate = Callable[[list[Individual]], list[float]]


class LongRopeSearch:
    """``run()`` evolves from ``state`` (a fresh one, or one loaded to resume)."""

    def __init__(self, cfg: SearchConfig, initial: Individual, evaluate: Evaluate,
                 state: SearchState | None = None, max_tries: int = 50):
        cfg.validate()
        self.cfg, self.initial, self.evaluate = cfg, initial, evaluate
        self.state = state or SearchState(config=asdict(cfg))
        self.rng = random.Random(cfg.seed)
        if self.state.rng_state is not None:
            version, internal, gauss = self.state.rng_state
            self.rng.setstate((version, tuple(internal), gauss))
        self.max_tries = max_tries  # to draw an individual not seen before
        self.evaluations = 0  # this process's model evaluations (the cache avoids repeats)

    def _fresh(self, make: Callable[[], Individual], taken: set[str]) -> Individual:
        """A new individual, unseen if ``max_tries`` draws allow (else a seen one: cached)."""
        child = make()
        for _ in range(self.max_tries):
            if child.key not in self.state.scores and child.key not in taken:
                break
            child = make()
        taken.add(child.key)
        return child

    def _score(self, individuals: list[Individual]) -> None:
        new = list({i.key: i for i in individuals if i.key not in self.state.scores}.values())
        if new:
            self.evaluations += len(new)
            for individual, ppl in zip(new, self.evaluate(new)):
                self.state.scores[individual.key] = float(ppl)
                self.state.evaluated.append((self.state.iteration, individual.key, float(ppl)))

    def ranked(self, keys: list[str]) -> list[str]:
        return sorted(dict.fromkeys(keys), key=lambda k: (rank_value(self.state.scores[k]), k))

    def best(self) -> tuple[Individual, float]:
        key = self.ranked(list(self.state.scores))[0]
        return Individual.from_key(key), self.state.scores[key]

    def _end_iteration(self, population: list[Individual], on_iteration) -> None:
        self.state.population = [i.key for i in population]
        best, ppl = self.best()
        self.state.best.append((self.state.iteration, best.key, ppl))
        self.state.rng_state = list(self.rng.getstate())
        if on_iteration:
            on_iteration(self.state)

    def _children(self, parents: list[Individual]) -> list[Individual]:
        """``mutations`` mutants and ``crossovers`` children of random parents, new if
        possible."""
        cfg, rng = self.cfg, self.rng
        taken = {p.key for p in parents}

        def mutant() -> Individual:
            return mutate(rng.choice(parents), rng, cfg)

        def child() -> Individual:
            if len(parents) < 2:
                return mutant()
            return crossover(*rng.sample(parents, 2), rng, cfg)

        return ([self._fresh(mutant, taken) for _ in range(cfg.mutations)]
                + [self._fresh(child, taken) for _ in range(cfg.crossovers)])

    def run(self, on_iteration: Callable[[SearchState], None] | None = None) -> Individual:
        """Evolve until ``cfg.iterations``; ``on_iteration(state)`` after each (save it there).
        Returns the best individual found."""
        cfg = self.cfg
        if not self.state.population:  # iteration 0: YaRN and its mutants
            taken = {self.initial.key}
            population = [self.initial] + [
                self._fresh(lambda: mutate(self.initial, self.rng, cfg), taken)
                for _ in range(cfg.population - 1)]
            self._score(population)
            self._end_iteration(population, on_iteration)
        while self.state.iteration < cfg.iterations:
            self.state.iteration += 1
            parents = [Individual.from_key(k)
                       for k in self.ranked(self.state.population)[:cfg.parents]]
            children = self._children(parents)
            self._score(children)
            self._end_iteration(parents + children, on_iteration)
        return self.best()[0]


def yarn_divisors(scale: float, original_length: int, rope_theta: float, dim: int) -> list[float]:
    """YaRN's actual per-pair divisor ``θ_j / θ'_j = 1 / ((1 - r_j) + r_j / s)`` as our ``yarn``
    rope type computes it."""
    from megatron_longctx.rope.methods import base_inv_freq, compute_inv_freq

    yarn, _ = compute_inv_freq({"rope_type": "yarn", "rope_theta": rope_theta, "factor": scale,
                                "original_max_position_embeddings": original_length}, dim, 1, 1)
    return (base_inv_freq(rope_theta, dim) / yarn[0]).tolist()


def longrope_parameters(best: Individual, scale: float, original_length: int, rope_theta: float,
                        short_factor: Sequence[float] | None = None) -> dict:
    """The ``rope_parameters`` block training, evaluation and conversion accept."""
    return {"rope_type": "longrope", "rope_theta": rope_theta, "factor": scale,
            "original_max_position_embeddings": original_length,
            "long_factor": list(best.factors),
            "short_factor": list(short_factor or [1.0] * len(best.factors)),
            "longrope_start_tokens": best.start_tokens}
