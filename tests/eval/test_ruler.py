"""RULER tasks without a model: the scoring functions on hand-made answers, and every task's
prompt parsed back -- its token length, where its answers sit, and that they are the answers."""

import argparse
import collections
import json
import logging
import random
import re
import string
import textwrap

import pytest

from megatron_longctx.eval.ruler import (
    NOISE,
    TASKS,
    RulerSample,
    build_sample,
    effective_length,
    score,
    string_match_all,
    string_match_part,
)

# prose of a few kB, on every machine: some standard-library module docstrings
HAYSTACK = "\n".join(m.__doc__ for m in (argparse, collections, json, logging, random, re,
                                         string, textwrap))
NIAH = [t for t in TASKS if t.startswith("niah_")]
NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def words(s: str) -> int:
    return len(s.split())


TOKENIZERS = {"words": words, "chars": len}


@pytest.fixture(scope="module")
def spm_count(tmp_path_factory):
    """A real SentencePiece BPE model (400 pieces: ~5 tokens a word, a coarse fit), trained by
    our trainer in well under a second."""
    from megatron_longctx.data.tokenization.sentencepiece_trainer import (
        SentencePieceTrainConfig,
        train_sentencepiece,
    )
    from megatron_longctx.data.tokenization.tokenizers import SentencePieceTokenizer

    directory = tmp_path_factory.mktemp("ruler_spm")
    corpus = directory / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in HAYSTACK.split("\n\n")))
    model = train_sentencepiece(SentencePieceTrainConfig(
        inputs=[str(corpus)], output_prefix=str(directory / "spm"), vocab_size=400,
        num_threads=1))
    tokenizer = SentencePieceTokenizer(model)
    return lambda s: len(tokenizer.tokenize(s))


def build(task, length, count=words, seed=0, **kw):
    return build_sample(task, length, count, random.Random(seed), HAYSTACK, **kw)


def context_of(prompt: str) -> str:
    """The text between the instruction line(s) and the question."""
    body = prompt.split("\n", 1)[1].lstrip("\n")
    return body.rsplit("\n", 1)[0]


def assert_haystack(haystack: str, source: str) -> None:
    """``haystack`` is the start of ``source`` (repeated), its last word possibly cut."""
    got, want = haystack.split(), source.split()
    want = want * (len(got) // len(want) + 1)
    assert got[:-1] == want[:len(got) - 1]
    assert want[len(got) - 1].startswith(got[-1])


def assert_length(prompt: str, length: int, count) -> None:
    n = count(prompt)
    assert length - max(2, length // 100) <= n <= length, (n, length)


# --- scoring -----------------------------------------------------------------------------------

def test_string_match_on_near_misses():
    assert string_match_all("The special magic number is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("The special magic number is 1234568.", ["1234567"]) == 0.0
    assert string_match_all("123456", ["1234567"]) == 0.0  # a truncated answer is wrong
    assert string_match_all("they are: abcde, Fghij", ["ABCDE", "FGHIJ"]) == 1.0  # any case
    assert string_match_all("apple, pear", ["apple", "plum", "pear", "fig"]) == 0.5
    assert string_match_part("apple, pear", ["plum", "pear"]) == 1.0
    assert string_match_part("apple, pear", ["plum", "fig"]) == 0.0
    assert string_match_part("APPLE", ["apple"]) == 1.0
    with pytest.raises(ValueError, match="at least one reference"):
        string_match_all("x", [])


def test_score_is_percent_with_the_samples_metric():
    refs = ["1111111", "2222222", "3333333", "4444444"]
    multivalue = RulerSample("niah_multivalue", "...", refs, 128, "all")
    assert score(multivalue, "they are 2222222 and 4444444, also 3333334") == 50.0
    assert score(multivalue, "4444444 3333333 2222222 1111111") == 100.0
    assert score(multivalue, "none") == 0.0
    qa = RulerSample("qa", "...", ["Paris", "paris, France"], 32, "part")
    assert score(qa, "It is PARIS.") == 100.0
    assert score(qa, "It is Lyon.") == 0.0
    with pytest.raises(ValueError, match="Unknown metric"):
        score(RulerSample("x", "", ["a"], 1, "exact"), "a")


def test_effective_length():
    # the first failure ends it, even when a longer length recovers
    assert effective_length({4096: 92.0, 8192: 88.0, 16384: 80.0, 32768: 95.0}) == 8192
    assert effective_length({32768: 95.0, 4096: 92.0, 16384: 80.0, 8192: 88.0}) == 8192
    assert effective_length({4096: 99.0, 8192: 90.0, 16384: 86.0}) == 16384  # all pass
    assert effective_length({4096: 70.0, 8192: 95.0}) is None  # the shortest fails
    assert effective_length({4096: 85.6, 8192: 85.59}) == 4096  # the threshold itself passes
    assert effective_length({4096: 80.0, 8192: 70.0}, threshold=75.0) == 4096
    assert effective_length({}) is None


# --- prompt length -----------------------------------------------------------------------------

@pytest.mark.parametrize("tokenizer", list(TOKENIZERS))
@pytest.mark.parametrize("length", [3000, 6000])  # cwe: 2 vs 1 copies below 4096, 30 vs 3 above
def test_every_task_has_the_requested_length(tokenizer, length):
    count = TOKENIZERS[tokenizer]
    calls = []
    for task in TASKS:
        def counting(s, calls=calls):
            calls.append(1)
            return count(s)
        sample = build(task, length, counting)
        assert_length(sample.prompt, length, count)
        assert sample.max_new_tokens >= count(", ".join(sample.references)), task
    # count_tokens may tokenize 128k tokens per call: a few calls per sample, not a scan
    assert len(calls) <= 8 * len(TASKS), len(calls)


def test_lengths_with_a_sentencepiece_tokenizer(spm_count):
    for task in TASKS:
        assert_length(build(task, 4096, spm_count).prompt, 4096, spm_count)
    # just above the fixed parts: the last haystack word is cut to close a ~5-token gap
    for task in ("niah_single_1", "vt"):
        with pytest.raises(ValueError, match="too short") as info:
            build(task, 1, spm_count)
        fixed = int(re.search(r"take (\d+) tokens", str(info.value)).group(1))
        for length in range(fixed + 3, fixed + 40, 4):
            assert_length(build(task, length, spm_count).prompt, length, spm_count)


def test_max_new_tokens_leaves_room_for_the_references():
    vt = build("vt", 3000, len)  # 5 names by character: more than RULER's 30
    assert vt.max_new_tokens >= len(", ".join(vt.references)) > 30
    assert build("vt", 3000, words).max_new_tokens == 30  # RULER's budget otherwise


# --- the answers are where they should be ------------------------------------------------------

def queried_keys(prompt: str) -> list[str]:
    query = re.search(r"for (.+) mentioned in the provided text\?", prompt).group(1)
    return re.split(r", | and ", query)


@pytest.mark.parametrize("task", NIAH)
def test_niah_needles_hold_the_references(task):
    sample = build(task, 3000, seed=3)
    prompt, refs = sample.prompt, sample.references
    plural = "uuids" if task in ("niah_single_3", "niah_multikey_3") else "numbers"
    assert prompt.startswith(f"Some special magic {plural} are hidden")
    assert re.search(r"mentioned in the provided text (is|are)$", prompt)
    needles = NEEDLE.findall(prompt)
    keys = queried_keys(prompt)
    assert sorted(v for _, k, v in needles if k in keys) == sorted(refs)
    for ref in refs:
        assert prompt.count(ref) == 1, ref  # only in its needle
    expected = {"niah_single_1": (1, 1, 1), "niah_single_2": (1, 1, 1),
                "niah_single_3": (1, 1, 1), "niah_multikey_1": (4, 1, 1),
                "niah_multivalue": (1, 4, 1), "niah_multiquery": (4, 1, 4)}
    distinct_keys = {k for _, k, _ in needles}
    if task in expected:
        n_keys, n_values, n_queries = expected[task]
        assert len(needles) == n_keys * n_values
        assert len(distinct_keys) == n_keys and len(keys) == n_queries
        assert len(set(refs)) == n_values * n_queries
        assert_haystack(NEEDLE.sub("", context_of(prompt)), NOISE if task == "niah_single_1"
                        else HAYSTACK)
    else:  # multikey_2/3: a haystack of distractor needles, all with other keys
        assert len(needles) > 150 and len(distinct_keys) == len(needles)
        assert len(refs) == 1 and all(t == plural for t, _, _ in needles)
        if task == "niah_multikey_3":
            assert UUID.fullmatch(keys[0]) and UUID.fullmatch(refs[0])
        residue = NEEDLE.sub("", context_of(prompt)).split()
        assert len(residue) <= 9  # at most one cut needle at the end
    if plural == "numbers":
        assert all(re.fullmatch(r"\d{7}", r) for r in refs)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.33, 0.5, 0.77, 1.0])
def test_needle_depth(depth):
    prompt = build("niah_single_1", 5000, depth=depth).prompt
    assert abs(prompt.index("One of the special magic") / len(prompt) - depth) <= 0.02
    # a queried needle of a multi-needle task goes there too
    prompt = build("niah_multikey_1", 5000, depth=depth).prompt
    key = queried_keys(prompt)[0]
    assert abs(prompt.index(f"for {key} is:") / len(prompt) - depth) <= 0.02


def test_random_depths_spread_over_the_haystack():
    positions = [build("niah_single_2", 3000, seed=s).prompt.index("One of the special")
                 for s in range(12)]
    assert max(positions) - min(positions) > 8000  # ~19 kB of prompt


def test_variable_tracking_chain_resolves_to_the_value():
    sample = build("vt", 3000, seed=5)
    value = re.search(r"assigned the value (\d{5}) in the text above", sample.prompt).group(1)
    assignments = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", sample.prompt)
    assert len(assignments) == 5
    env = {}
    for name, rhs in assignments:  # in text order: each variable is defined before use
        env[name] = rhs if rhs.isdigit() else env[rhs[4:]]
    assert sorted(env) == sorted(sample.references)
    assert set(env.values()) == {value}
    assert sample.prompt.endswith(f"5 variables are assigned the value {value}, they are:")
    assert_haystack(re.sub(r"VAR [A-Z]{5} = (VAR [A-Z]{5}|\d+)\.", "",
                           context_of(sample.prompt)), NOISE)
    # the chain is spread out, not one block
    starts = [sample.prompt.index(f"VAR {n} =") for n in sample.references]
    assert max(starts) - min(starts) > len(sample.prompt) // 10


@pytest.mark.parametrize("length", [3000, 6000])
def test_cwe_references_are_the_ten_most_common_words(length):
    sample = build("cwe", length, seed=2)
    items = re.findall(r"(\d+)\. (\S+)", context_of(sample.prompt))
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    counts = collections.Counter(w for _, w in items)
    refs = sample.references
    assert len(set(refs)) == 10
    others = [c for w, c in counts.items() if w not in refs]
    assert min(counts[w] for w in refs) > max(others)
    assert (min(counts[w] for w in refs), max(others)) == ((30, 3) if length >= 4096 else (2, 1))
    assert len(others) > 100  # the list scales with the length
    assert not any(a != b and a in b for a in refs for b in counts)  # no accidental hits


def test_fwe_references_are_the_three_most_frequent_coded_words():
    for length in (3000, 6000):
        sample = build("fwe", length, seed=4)
        text = sample.prompt.split("coded words. ", 1)[1].rsplit("\nQuestion:", 1)[0].split()
        counts = collections.Counter(text)
        assert counts.most_common(1)[0][0] == "...."  # the noise the question says to ignore
        coded = collections.Counter({w: c for w, c in counts.items() if w != "...."})
        assert sorted(w for w, _ in coded.most_common(3)) == sorted(sample.references)
        third, fourth = (c for _, c in coded.most_common(4)[2:])
        assert third > fourth
        assert all(re.fullmatch(r"[a-z]{5}", w) for w in coded)
        assert len(text) > length // 2  # the text scales with the length


# --- determinism and errors --------------------------------------------------------------------

@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_sample_other_seed_other_sample(task):
    a, b, c = build(task, 2000, seed=11), build(task, 2000, seed=11), build(task, 2000, seed=12)
    assert a == b
    assert a.prompt != c.prompt and a.references != c.references


def test_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"Unknown RULER task 'niah'.*niah_single_1.*fwe"):
        build("niah", 3000)
    with pytest.raises(ValueError, match=r"too short for cwe: its fixed parts alone take \d+"):
        build("cwe", 50)
    with pytest.raises(ValueError, match="too short for niah_multiquery"):
        build("niah_multiquery", 60)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        build("niah_single_1", 3000, depth=1.5)
    with pytest.raises(ValueError, match="niah_\\* tasks only, not vt"):
        build("vt", 3000, depth=0.5)
    with pytest.raises(ValueError, match="positive"):
        build("fwe", 0)
    with pytest.raises(ValueError, match="niah_single_2 builds its haystack from haystack_text"):
        build_sample("niah_single_2", 3000, words, random.Random(0), "  \n ")
    # the noise and needle haystacks need no text
    assert build_sample("niah_single_1", 300, words, random.Random(0), "").prompt
    assert build_sample("niah_multikey_2", 300, words, random.Random(0), "").prompt
