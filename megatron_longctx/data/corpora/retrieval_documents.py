"""Synthetic retrieval documents: a key stated early in a document and recalled at its end.

A tiny model trained only on source code never learns to retrieve a number from far back, so
passkey accuracy would be zero for every method and say nothing. Mixing a small share of these
documents into pretraining teaches the skill at the training length; whether it survives at
longer contexts is then what a context-extension method decides. They use the passkey
template (METHODS.md §6) with keys of their own, and lengths spread log-uniformly so that
both short- and long-context training see complete documents. A document holds 1-4 episodes
(filler, a new key, filler, the question and its answer): several recalls per document give a
small model enough examples to learn copying within a few hundred steps.
"""

from __future__ import annotations

import json
import math
import os
import random

from megatron_longctx.eval.passkey import FILLER, INTRO, MAX_KEY, NEEDLE, QUESTION


def retrieval_document(rng: random.Random, filler_repeats: int) -> str:
    """The intro, then 1-4 episodes that share ``filler_repeats`` filler sentences (spread at
    random before and after each episode's key), each ending with the question and the answer
    (that episode's key)."""
    episodes = rng.randint(1, 4)
    cuts = sorted(rng.randint(0, filler_repeats) for _ in range(2 * episodes - 1))
    gaps = [b - a for a, b in zip([0, *cuts], [*cuts, filler_repeats])]  # 2 per episode
    parts = [INTRO]
    for e in range(episodes):
        key = rng.randint(1, MAX_KEY)
        parts += [*[FILLER] * gaps[2 * e], NEEDLE.format(key=key), *[FILLER] * gaps[2 * e + 1],
                  f"{QUESTION} {key}."]
    return " ".join(parts)


def write_retrieval_jsonl(path: str, count: int, max_filler: int, min_filler: int = 1,
                          seed: int = 0) -> int:
    """``count`` documents with ``min_filler``..``max_filler`` filler sentences
    (log-uniform) as JSONL; returns the number written."""
    if not 1 <= min_filler <= max_filler:
        raise ValueError(f"need 1 <= min filler ({min_filler}) <= max filler ({max_filler})")
    rng = random.Random(seed)
    low, high = math.log(min_filler), math.log(max_filler + 1)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for _ in range(count):
            repeats = min(max_filler, int(math.exp(rng.uniform(low, high))))
            f.write(json.dumps({"text": retrieval_document(rng, repeats)}) + "\n")
    os.replace(tmp, path)
    return count
