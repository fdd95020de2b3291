"""Impactful-token analysis: Δ of a model against itself is 0; Δ between two models equals
transformers' log-softmax difference; TP=2 gives the single-process Δ; classes on token strings;
the top 20% per document; the report and the anchor set."""

import json
import os
import string
from collections import Counter

import numpy as np
import pytest
import torch

from megatron_longctx.methods.impactful_tokens import (
    CONJ_ADP,
    DIGITS,
    OTHER_WORDS,
    PRONOUNS_AUX,
    PUNCTUATION,
    SPACE_OTHER,
    load_anchor_tokens,
    token_class,
    top_fraction,
)


def test_token_classes_from_strings():
    cases = {"2023": DIGITS, "\u25813rd": DIGITS, " 1.5": DIGITS, ",": PUNCTUATION,
             "\u2581...": PUNCTUATION, "$": PUNCTUATION, "\u0120She": PRONOUNS_AUX,
             " were": PRONOUNS_AUX, "'s": PRONOUNS_AUX, "don\u2019t": PRONOUNS_AUX,
             "\u2581and": CONJ_ADP, " Of": CONJ_ADP, "between": CONJ_ADP, "cat": OTHER_WORDS,
             " the": OTHER_WORDS, "\u2581": SPACE_OTHER, "\n": SPACE_OTHER,
             "\ufffd": SPACE_OTHER, "": SPACE_OTHER}
    assert {text: token_class(text) for text in cases} == cases


def test_top_fraction_keeps_the_largest_per_document_ties_to_the_earlier():
    delta = torch.tensor([0.1, 3.0, -1.0, 2.0, 2.0, 0.0, 0.5, -2.0, 1.0, 0.2])
    assert top_fraction(delta, 0.2).nonzero().flatten().tolist() == [1, 3]
    assert top_fraction(delta, 0.3).nonzero().flatten().tolist() == [1, 3, 4]
    assert top_fraction(delta[:3], 0.2).nonzero().flatten().tolist() == [1]  # at least one


def _byte_classes() -> dict[str, set[int]]:
    """The classes of ByteTokenizer ids 0..299 written out by hand: ASCII digits, punctuation,
    the letters ``I``/``i`` (the pronoun), other letters; the rest (control bytes, space,
    bytes >= 128 that decode alone to U+FFFD, ids >= 256 that decode to nothing) as other."""
    classes = {DIGITS: set(range(48, 58)), PUNCTUATION: {ord(c) for c in string.punctuation},
               PRONOUNS_AUX: {ord("I"), ord("i")}, CONJ_ADP: set(),
               OTHER_WORDS: {ord(c) for c in string.ascii_letters} - {ord("I"), ord("i")}}
    classes[SPACE_OTHER] = set(range(300)) - set().union(*classes.values())
    return classes


def _hf_delta(base, extended, tokens: torch.Tensor) -> torch.Tensor:
    """log p_extended(gold) - log p_base(gold) with transformers, in float64."""
    with torch.no_grad():
        logp = [m(input_ids=tokens[None]).logits[0].double().log_softmax(-1) for m in
                (base, extended)]
    gold = tokens[1:, None]
    return (logp[1][:-1].gather(-1, gold) - logp[0][:-1].gather(-1, gold)).squeeze(-1)


@pytest.fixture(scope="module")
def a_vs_b(methods_models, tmp_path_factory):
    """The tool in one process: base A, extended B."""
    from megatron_longctx.methods.impactful_tokens_tool import main

    out = tmp_path_factory.mktemp("a_vs_b")
    return out, main(["--base", methods_models["a"], "--extended", methods_models["b"],
                      "--data", methods_models["data"], "--seq-length", "48", "--out", str(out)])


def test_delta_against_itself_is_zero(methods_models, tmp_path):
    from megatron_longctx.methods.impactful_tokens_tool import main

    a = methods_models["a"]
    same = main(["--base", a, "--extended", a, "--data", methods_models["data"],
                 "--seq-length", "48", "--out", str(tmp_path)])
    assert len(same["deltas"]) == 2  # the 30-token document is skipped
    for delta in same["deltas"]:
        assert delta.shape == (47,) and not delta.any()


def test_delta_equals_transformers_and_the_report_follows_it(methods_models, a_vs_b):
    out, result = a_vs_b
    saved = np.load(out / "deltas.npz")
    for i, delta in enumerate(result["deltas"]):
        tokens = torch.from_numpy(saved[f"tokens_{i}"])
        expected = _hf_delta(methods_models["hf_a"], methods_models["hf_b"], tokens)
        assert expected.abs().max() > 1.0  # two different models
        torch.testing.assert_close(delta.double(), expected, atol=2e-4, rtol=1e-4)
        assert np.array_equal(saved[f"delta_{i}"], delta.numpy())

    # the anchor set: 20% of each document's 47 scored tokens (9 each), by largest Δ
    counts = load_anchor_tokens(str(out / "anchor_tokens.json"))
    expected_counts: dict[int, int] = {}
    for i in range(2):
        tokens, delta = saved[f"tokens_{i}"], saved[f"delta_{i}"]
        for t in np.argsort(-delta, kind="stable")[:9]:
            expected_counts[int(tokens[t + 1])] = expected_counts.get(int(tokens[t + 1]), 0) + 1
    assert counts == expected_counts

    # the report: class counts among the kept and all tokens (the checkpoints' ByteTokenizer:
    # one byte per id below 256, nothing above), and the plot
    report = json.loads((out / "results.json").read_text())
    assert report["tokens_scored"] == 94 and report["tokens_kept"] == 18
    scored = Counter(int(t) for i in range(2) for t in saved[f"tokens_{i}"][1:])
    for name, ids in _byte_classes().items():
        assert report["classes"][name]["kept"] == sum(expected_counts.get(t, 0) for t in ids)
        assert report["classes"][name]["all"] == sum(scored[t] for t in ids)
    assert report["classes"][SPACE_OTHER]["kept"] > 0 and report["classes"][OTHER_WORDS]["all"] > 0
    assert sum(c["all_share"] for c in report["classes"].values()) == pytest.approx(1.0)
    assert (out / "token_classes.md").read_text().startswith("| class | share of kept |")
    assert (out / "token_classes.png").read_bytes()[:4] == b"\x89PNG"


def test_tp2_gives_the_single_process_deltas(a_vs_b, methods_tp2):
    out, single = a_vs_b
    tp2 = np.load(os.path.join(methods_tp2["impactful_tp2"], "deltas.npz"))
    for i, delta in enumerate(single["deltas"]):
        np.testing.assert_allclose(tp2[f"delta_{i}"], delta.numpy(), atol=1e-5)
    assert load_anchor_tokens(os.path.join(methods_tp2["impactful_tp2"], "anchor_tokens.json")) \
        == load_anchor_tokens(str(out / "anchor_tokens.json"))


def test_bad_input_is_refused_before_loading(methods_models, tmp_path):
    from megatron_longctx.methods.impactful_tokens_tool import main

    a, data = methods_models["a"], methods_models["data"]
    with pytest.raises(SystemExit, match="no document of 500 tokens"):
        main(["--base", a, "--extended", a, "--data", data, "--seq-length", "500"])
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        main(["--base", a, "--extended", str(tmp_path), "--data", data, "--seq-length", "48"])
    with pytest.raises(SystemExit, match="--fraction must be in"):
        main(["--base", a, "--extended", a, "--data", data, "--seq-length", "48",
              "--fraction", "0"])
