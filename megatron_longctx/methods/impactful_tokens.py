"""LongRecipe's impactful-token analysis (arXiv 2409.00509, METHODS.md §3): which tokens a
context-extended model predicts better than its base model, on the same long documents.

For each document ``x`` and position ``t``, ``Δ_t = log p_ext(x_t | x_<t) − log p_base(x_t | x_<t)``
(log-softmax of the gold token, from the shared scorer: ``Δ = nll_base − nll_extended``). The
``fraction`` (20%) of each document's tokens with the largest Δ are kept; their token ids are
the *anchor tokens* the sample selection looks for, and their classes (defined on the token
strings, no tagger: digits, punctuation, pronouns/auxiliaries, conjunctions/adpositions, other
words) say what long context helps with (the paper: numerals ~0.4 of the kept tokens, then
pronouns/auxiliaries ~0.15, conjunctions/adpositions ~0.1).
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from megatron_longctx.eval.scoring import token_nll

DIGITS = "digits"
PUNCTUATION = "punctuation"
PRONOUNS_AUX = "pronouns/auxiliaries"
CONJ_ADP = "conjunctions/adpositions"
OTHER_WORDS = "other words"
SPACE_OTHER = "whitespace/other"
CLASSES = (DIGITS, PUNCTUATION, PRONOUNS_AUX, CONJ_ADP, OTHER_WORDS, SPACE_OTHER)

# Fixed English lists (closed classes). A word in both lists (e.g. "that") counts as the first.
PRONOUNS_AND_AUXILIARIES = frozenset("""
i me my mine myself you your yours yourself yourselves he him his himself she her hers herself
it its itself we us our ours ourselves they them their theirs themselves this that these those
who whom whose which what whoever whomever whatever whichever one ones oneself someone anyone
everyone noone somebody anybody everybody nobody something anything everything nothing
be am is are was were been being have has had having do does did doing
will would shall should can could may might must ought
's 're 've 'd 'll 'm n't ain't isn't aren't wasn't weren't hasn't haven't hadn't doesn't don't
didn't won't wouldn't shan't shouldn't can't cannot couldn't mightn't mustn't
""".split())
CONJUNCTIONS_AND_ADPOSITIONS = frozenset("""
and or but nor yet so because although though while whereas whether if unless since until
than as once lest whenever wherever both either neither
of in to for with on at by from about into onto upon over under above below between among
amongst through throughout during before after behind beyond across along around against
toward towards within without inside outside near via per despite except like unlike off up
down out past underneath beneath beside besides amid amidst till versus vs
""".split())

# word-start markers of subword vocabularies (SentencePiece, byte-level BPE)
_MARKERS = str.maketrans({"\u2581": " ", "\u0120": " ", "\u010a": "\n"})


def token_class(text: str) -> str:
    """The class of a token from its string: a digit anywhere -> digits (numerals such as
    ``2023``, ``3rd``, ``1.5``); only punctuation/symbols -> punctuation; a listed closed-class
    word (case-insensitive) -> its class; letters -> other words; whitespace, control and
    undecodable fragments -> whitespace/other."""
    word = text.translate(_MARKERS).strip()
    if not word or "\ufffd" in word:
        return SPACE_OTHER
    if any(c.isdigit() for c in word):
        return DIGITS
    lower = word.lower().replace("\u2019", "'")
    if lower in PRONOUNS_AND_AUXILIARIES:
        return PRONOUNS_AUX
    if lower in CONJUNCTIONS_AND_ADPOSITIONS:
        return CONJ_ADP
    if any(c.isalpha() for c in word):
        return OTHER_WORDS
    if all(unicodedata.category(c)[0] in "PS" for c in word):
        return PUNCTUATION
    return SPACE_OTHER


def document_nll(model, documents: Sequence[Tensor]) -> list[Tensor]:
    """Per document ``[n]``, ``-log p(x_t | x_<t)`` for ``t = 1 .. n-1``: ``[n - 1]`` fp32."""
    return [token_nll(model, doc[None])[0] for doc in documents]


def deltas(nll_base: Sequence[Tensor], nll_extended: Sequence[Tensor]) -> list[Tensor]:
    """``Δ = log p_ext − log p_base = nll_base − nll_ext`` per document ``[n - 1]``."""
    return [b - e for b, e in zip(nll_base, nll_extended)]


def top_fraction(delta: Tensor, fraction: float) -> Tensor:
    """Mask ``[n]`` of the ``round(fraction · n)`` (at least 1) tokens with the largest Δ; ties
    go to the earlier position, so the set is deterministic."""
    k = max(1, round(fraction * delta.numel()))
    order = torch.sort(-delta, stable=True).indices  # descending Δ, earlier first among ties
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


@dataclass
class ImpactfulTokens:
    """What the analysis found over all documents (token ids are the gold tokens ``x_t``)."""

    fraction: float
    kept: Counter = field(default_factory=Counter)  # id -> times among the kept tokens
    total: Counter = field(default_factory=Counter)  # id -> times among all scored tokens
    delta_sum: dict = field(default_factory=dict)  # id -> sum of Δ over its kept occurrences

    def add(self, tokens: Tensor, delta: Tensor) -> None:
        """One document: ``tokens [n]`` and the Δ of ``tokens[1:]``."""
        gold = tokens[1:].tolist()
        mask = top_fraction(delta, self.fraction).tolist()
        values = delta.tolist()
        self.total.update(gold)
        for token, keep, value in zip(gold, mask, values):
            if keep:
                self.kept[token] += 1
                self.delta_sum[token] = self.delta_sum.get(token, 0.0) + value

    def class_shares(self, classify: Callable[[int], str]) -> dict[str, dict]:
        """``{class: {"kept", "all", "kept_share", "all_share", "enrichment"}}`` over
        :data:`CLASSES` (enrichment: kept share / overall share)."""
        kept, total = Counter(), Counter()
        for token, n in self.kept.items():
            kept[classify(token)] += n
        for token, n in self.total.items():
            total[classify(token)] += n
        n_kept, n_all = sum(kept.values()), sum(total.values())
        shares = {}
        for name in CLASSES:
            k_share = kept[name] / n_kept if n_kept else 0.0
            a_share = total[name] / n_all if n_all else 0.0
            shares[name] = {"kept": kept[name], "all": total[name], "kept_share": k_share,
                            "all_share": a_share,
                            "enrichment": k_share / a_share if a_share else math.nan}
        return shares

    def anchors(self, decode: Callable[[int], str]) -> list[dict]:
        """The anchor tokens, most often kept first: id, text, class, count (times kept),
        total (times scored), kept_rate, mean Δ when kept."""
        rows = []
        for token, count in sorted(self.kept.items(), key=lambda kv: (-kv[1], kv[0])):
            text = decode(token)
            rows.append({"id": int(token), "text": text, "class": token_class(text),
                         "count": count, "total": self.total[token],
                         "kept_rate": count / self.total[token],
                         "mean_delta": self.delta_sum[token] / count})
        return rows


def save_anchor_tokens(path: str, anchors: list[dict], meta: dict) -> None:
    """The anchor set for the sample selection: ``{"counts": {id: count}, "anchors": [...],
    ...meta}``."""
    with open(path, "w") as f:
        json.dump({**meta, "counts": {str(a["id"]): a["count"] for a in anchors},
                   "anchors": anchors}, f, indent=1)


def load_anchor_tokens(path: str) -> dict[int, int]:
    """Token id -> times kept, from :func:`save_anchor_tokens`'s file."""
    with open(path) as f:
        data = json.load(f)
    if "counts" not in data:
        raise ValueError(f"{path} is not an anchor-token file (tools/analyze_impactful_tokens.py "
                         f"writes anchor_tokens.json)")
    return {int(token): int(count) for token, count in data["counts"].items()}
