"""RULER over a model: a model that answers with every reference scores 100 on every task, one
that gives only the first reference scores each task's share; prompts leave room for the
answer inside the length."""

import random

import pytest
import torch

from megatron_longctx.data.tokenization.tokenizers import ByteTokenizer
from megatron_longctx.eval.ruler import TASKS, build_sample
from megatron_longctx.eval.ruler_tool import ruler_scores

HAYSTACK = " ".join(f"Essay sentence number {i} talks about gardens and rivers."
                    for i in range(400))


class Oracle(torch.nn.Module):
    """Knows each prompt's references (built beforehand with the tool's seeds) and answers with
    all of them, or only the first; byte tokens, then the end-of-document id."""

    def __init__(self, answers: dict[str, list[str]], first_only: bool):
        super().__init__()
        self.answers, self.first_only = answers, first_only
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.prompt_lengths = []

    def next_token_logits(self, ids, cache, rope_seq_len):
        if cache.offset == 0:
            tok = ByteTokenizer()
            refs = self.answers[tok.detokenize(ids[0].tolist())]
            text = refs[0] if self.first_only else ", ".join(refs)
            self.pending = tok.tokenize(" " + text) + [tok.eod]
            self.prompt_lengths.append((ids.shape[1], rope_seq_len))
        cache.offset += ids.shape[1]
        logits = torch.zeros(ids.shape[0], 258)
        logits[:, self.pending.pop(0)] = 1.0
        return logits


def _answers(tasks, lengths, samples):
    tok = ByteTokenizer()

    def count(text):
        return len(tok.tokenize(text))

    answers = {}
    for length in lengths:
        for task in tasks:
            budget = build_sample(task, length, count, random.Random(0), HAYSTACK).max_new_tokens
            for i in range(samples):
                sample = build_sample(task, length - budget, count,
                                      random.Random(f"0/{task}/{length}/{i}"), HAYSTACK)
                answers[sample.prompt] = sample.references
    return answers


@pytest.mark.parametrize("first_only", [False, True])
def test_scores_follow_the_answers(first_only):
    tasks, lengths = list(TASKS), [1500]
    oracle = Oracle(_answers(tasks, lengths, samples=2), first_only)
    scores = ruler_scores(oracle, ByteTokenizer(), tasks, lengths, samples=2, haystack=HAYSTACK)
    if not first_only:
        assert scores == {task: {1500: 100.0} for task in tasks}
    else:
        expected = {"niah_multivalue": 25.0, "niah_multiquery": 25.0, "vt": 20.0, "cwe": 10.0,
                    "fwe": 100 / 3}
        for task in tasks:  # one reference of several: that share; single-reference tasks: 100
            assert scores[task][1500] == pytest.approx(expected.get(task, 100.0)), task
    for prompt, final in oracle.prompt_lengths:  # the prompt and its answer fit the length
        assert prompt <= final <= 1500
