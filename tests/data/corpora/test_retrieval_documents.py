"""Synthetic retrieval documents: every question is answered with the key stated in its own
episode; filler counts follow the request."""

import json
import random
import re

import pytest

from megatron_longctx.data.corpora.retrieval_documents import (
    retrieval_document,
    write_retrieval_jsonl,
)
from megatron_longctx.eval.passkey import FILLER, INTRO, QUESTION


def test_each_answer_is_its_episodes_key(tmp_path):
    rng = random.Random(0)
    episodes_seen = set()
    for repeats in (0, 1, 5, 48) * 25:
        doc = retrieval_document(rng, repeats)
        assert doc.startswith(INTRO) and doc.count(FILLER) == repeats
        stated = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", doc)
        answered = re.findall(re.escape(QUESTION) + r" (\d+)\.", doc)
        assert [a for a, b in stated] == [b for a, b in stated] == answered
        episodes_seen.add(len(answered))
        # each answer comes after its own key and before the next one
        order = [m.group(0)[:4] for m in re.finditer(r"The pass key is \d+\. Remember|What is",
                                                      doc)]
        assert order == ["The ", "What"] * len(answered)
    assert episodes_seen == {1, 2, 3, 4}
    path = tmp_path / "r.jsonl"
    assert write_retrieval_jsonl(str(path), 20, max_filler=8, seed=1) == 20
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert all(1 <= t.count(FILLER) <= 8 for t in texts)
    with pytest.raises(ValueError, match="min filler"):
        write_retrieval_jsonl(str(path), 1, max_filler=0)
