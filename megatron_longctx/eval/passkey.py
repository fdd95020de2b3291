"""Passkey retrieval (METHODS.md §6): a number hidden at a chosen depth of repeated filler text,
asked for at the end, answered by greedy decoding.

Prompts are built from token ids, not text, so every prompt has exactly the requested length
and the needle starts at the requested fraction of the filler, whatever the tokenizer. All
trials of one (length, depth) cell have the same length and run as one batch.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_longctx.eval.generation import greedy_generate

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MAX_KEY = 50000


@dataclass
class PasskeyPrompt:
    ids: list[int]
    key: int
    needle_start: int  # token index of the needle's first token
    filler_before: int  # filler tokens before the needle (of ``filler_total``)
    filler_total: int


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> PasskeyPrompt:
    """``length`` tokens: intro, filler, the needle after ``depth`` of the filler, filler,
    question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    intro = tokenizer.tokenize(INTRO)
    needle = tokenizer.tokenize(" " + NEEDLE.format(key=key))
    question = tokenizer.tokenize(" " + QUESTION)
    filler_total = length - len(intro) - len(needle) - len(question)
    if filler_total < 0:
        raise ValueError(f"a passkey prompt needs more than {length - filler_total} tokens "
                         f"with this tokenizer; got --lengths {length}")
    unit = tokenizer.tokenize(" " + FILLER)
    filler = (unit * (filler_total // len(unit) + 1))[:filler_total]
    before = round(depth * filler_total)
    ids = intro + filler[:before] + needle + filler[before:] + question
    return PasskeyPrompt(ids, key, len(intro) + before, before, filler_total)


def answer_is_correct(generated: str, key: int) -> bool:
    """The first number in the answer is the key (``12345`` for ``1234`` is wrong)."""
    match = re.search(r"\d+", generated)
    return match is not None and int(match.group()) == key


def trial_key(seed: int, length: int, depth: float, trial: int) -> int:
    """The same keys for every checkpoint evaluated with the same seed."""
    return random.Random(f"{seed}/{length}/{depth}/{trial}").randint(1, MAX_KEY)


def passkey_accuracy(model, tokenizer, lengths: Sequence[int], depths: Sequence[float],
                     trials: int = 10, seed: int = 0, progress: Callable | None = None
                     ) -> dict[int, dict[float, float]]:
    """``{length: {depth: accuracy in [0, 1]}}`` over ``trials`` keys per cell."""
    answer_budget = len(tokenizer.tokenize(f" {MAX_KEY - 1}.")) + 2
    device = next(model.parameters()).device
    results: dict[int, dict[float, float]] = {}
    for length in lengths:
        results[length] = {}
        for depth in depths:
            prompts = [passkey_prompt(tokenizer, length, depth, trial_key(seed, length, depth, t))
                       for t in range(trials)]
            batch = torch.tensor([p.ids for p in prompts], dtype=torch.long, device=device)
            generated = greedy_generate(model, batch, answer_budget)  # [trials, n]
            correct = sum(answer_is_correct(tokenizer.detokenize(g.tolist()), p.key)
                          for g, p in zip(generated, prompts))
            results[length][depth] = correct / trials
            if progress:
                progress(length, depth, correct)
    return results
