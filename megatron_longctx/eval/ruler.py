"""RULER synthetic long-context tasks, model-free part: building prompts and scoring answers.

RULER (Hsieh et al., 2024, arXiv 2404.06654) measures how much of its context window a model
really uses, with synthetic tasks whose answers are known by construction. This module builds the
tasks that need no external data -- needle in a haystack (8 variants), variable tracking (vt),
common and frequent words extraction (cwe, fwe) -- at a given prompt length in the caller's
tokenizer, and scores generations with RULER's metrics. Running the model is the caller's job.

A prompt is RULER's template with the answer prefix appended (base-model style), so it ends where
the answer starts. The filler (haystack words, or list items for cwe/fwe) is fitted with a few
``count_tokens`` calls (secant search, bisection as a fallback, then the characters of one more
word for NIAH/vt) to at most ``length`` tokens and at least ``length - max(2, length // 100)``;
list tasks can only be one item (a few tokens) finer. The answer is generated after the prompt:
to keep it inside a window of W tokens, ask for ``length = W - max_new_tokens``.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import string
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_THRESHOLD", "NOISE", "TASKS", "RulerSample", "build_sample",
           "effective_length", "score", "string_match_all", "string_match_part"]

CountTokens = Callable[[str], int]

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again. ")
# RULER's bar for an "effective" length: Llama-2-7B's average score at 4k
DEFAULT_THRESHOLD = 85.6
_DEPTHS = [i / 39 for i in range(40)]  # RULER draws needle depths from 40 evenly spaced ones

# key words: concrete nouns and adjectives, pairs of which make RULER-like keys ("amber-falcon")
_WORDS = """amber ancient anchor apple arrow badge basket beacon bitter blanket bottle brave breezy
bridge bright bucket butter cabin calm camera candle canyon carpet castle cellar chair cherry
circle clever clock cloud collar comet copper cosmic cotton crimson crystal curious dagger desert
diamond dragon dusty eager electric engine falcon fancy feather fence fierce forest fountain
fragile frozen garden gentle giant glacier golden graceful guitar hammer happy harbor helmet
hollow humble island jacket jolly jungle kettle ladder lantern lemon lively lizard loyal lucky
magnet marble meadow mellow mighty mirror misty modest monkey needle noble orchard oyster palace
parrot patient pepper pillow planet pocket polite proud pumpkin puzzle quiet rabbit rapid ribbon
rocket rustic saddle salmon scarlet secret shadow shelter shiny silent silver smooth snowy sober
spicy spider statue steady stormy sturdy summer sunny sunset swift temple tender thunder ticket
tidy tiger tomato tunnel turtle valley velvet violin vivid wagon walnut wild window winter witty
wizard young zealous""".split()


@dataclass
class RulerSample:
    task: str
    prompt: str  # full text given to the model, ending with the answer prefix
    references: list[str]
    max_new_tokens: int  # generation budget: room for every reference
    metric: str  # "all" (string_match_all) or "part" (string_match_part)


# --- scoring ---------------------------------------------------------------------------------

def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of references found in the prediction (case-insensitive substring), 0..1."""
    if not references:
        raise ValueError("string_match_all needs at least one reference.")
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference is in the prediction (case-insensitive substring), else 0.0."""
    if not references:
        raise ValueError("string_match_part needs at least one reference.")
    pred = prediction.lower()
    return float(any(ref.lower() in pred for ref in references))


_METRICS = {"all": string_match_all, "part": string_match_part}


def score(sample: RulerSample, prediction: str) -> float:
    """The sample's metric on one prediction, in percent (0..100)."""
    if sample.metric not in _METRICS:
        raise ValueError(f"Unknown metric {sample.metric!r}; expected one of {sorted(_METRICS)}.")
    return 100.0 * _METRICS[sample.metric](prediction, sample.references)


def effective_length(scores_by_length: dict[int, float],
                     threshold: float = DEFAULT_THRESHOLD) -> int | None:
    """RULER's effective length: the last length before the first one scoring below
    ``threshold`` (a later recovery does not count); None if the shortest already fails."""
    best = None
    for length in sorted(scores_by_length):
        if scores_by_length[length] < threshold:
            break
        best = length
    return best


# --- fitting a prompt to a token length ------------------------------------------------------

def _tolerance(length: int) -> int:
    return max(2, length // 100)


def _search(f: Callable[[int], int], length: int, lo: int, hi: int, task: str,
            f_lo: int | None = None) -> tuple[int, int]:
    """``(n, f(n))`` for an n in [lo, hi] with ``length - tol <= f(n) <= length``, else the
    largest n with ``f(n) <= length``; f is non-decreasing. Token counts are close to linear in
    the filler, so secant steps need a handful of calls; a step that fails to halve the bracket
    is followed by a bisection, which bounds the calls by O(log(hi - lo))."""
    tol = _tolerance(length)
    target = length - tol / 4  # aim near the top of the window, leaving room for rounding
    a, fa = lo, f(lo) if f_lo is None else f_lo
    if fa > length:
        raise ValueError(f"length {length} is too short for {task}: its fixed parts alone take "
                         f"{fa} tokens.")
    f0, b, fb, bisect = fa, None, 0, False
    while fa < length - tol and a < (hi if b is None else b - 1):
        if b is None:  # no upper bound yet: a small first step, then the mean slope
            slope = (fa - f0) / (a - lo) if a > lo else 0.0
            m = a + (math.ceil((target - fa) / slope) if slope > 0 else
                     max(1, (length - fa) // 8, a - lo))
        elif bisect:
            m = (a + b) // 2
        else:
            m = a + round((target - fa) * (b - a) / (fb - fa))
        m = min(max(m, a + 1), hi if b is None else b - 1)
        width = None if b is None else b - a
        fm = f(m)
        if fm <= length:
            a, fa = m, fm
        else:
            b, fb = m, fm
        # a secant step that failed to halve the bracket is followed by one bisection
        bisect = not bisect and width is not None and 2 * (b - a) > width
    return a, fa


class _Units:
    """Words of a text, each with its trailing whitespace; cyclic ones repeat the text."""

    def __init__(self, text: str, read: int | None, cyclic: bool, task: str = ""):
        found = (m.group() for m in re.finditer(r"\S+\s*", text))
        self.words = [w if w[-1].isspace() else w + " " for w in itertools.islice(found, read)]
        if not self.words:
            raise ValueError(f"{task} builds its haystack from haystack_text, which has no words.")
        self.cyclic = cyclic

    def take(self, n: int) -> list[str]:
        reps, rest = divmod(n, len(self.words))
        return self.words * reps + self.words[:rest]


def _boundary(words: list[str], j: int) -> bool:
    if j in (0, len(words)):
        return True
    prev = words[j - 1]
    return prev.rstrip()[-1:] in (".", "!", "?") or "\n" in prev


def _insert(words: list[str], inserts: list[tuple[float, str]], whole: bool) -> str:
    """Words joined, each ``(depth, text)`` at the sentence boundary nearest word
    ``depth * len(words)``: within max(5, 1%) words (any distance if ``whole``, where the words
    are needles), else between words right there. Sorted by depth, stable: a vt chain stays
    defined before use."""
    n = len(words)
    radius = n if whole else max(5, n // 100)
    parts, start = [], 0
    for d, text in sorted(inserts, key=lambda item: item[0]):
        p = round(d * n)
        j = next((j for off in range(radius + 1) for j in (p - off, p + off)
                  if 0 <= j <= n and _boundary(words, j)), p)
        j = max(j, start)
        parts += ["".join(words[start:j]), text + " "]
        start = j
    parts.append("".join(words[start:]))
    return "".join(parts)


def _fit_text(task: str, length: int, count_tokens: CountTokens, units: _Units,
              inserts: list[tuple[float, str]], whole: bool, frame: Callable[[str], str]) -> str:
    """The prompt ``frame(haystack)`` with as many haystack words as fit ``length``, the
    ``inserts`` placed among them, then a prefix of the next word to close the last gap."""
    def render(n: int, k: int = 0) -> str:
        partial = units.take(n + 1)[-1][:k] if k else ""
        return frame((_insert(units.take(n), inserts, whole) + partial).rstrip())

    n_max = 4 * length + 16 if units.cyclic else len(units.words)
    n, fn = _search(lambda n: count_tokens(render(n)), length, 0, n_max, task)
    if length - fn > _tolerance(length) and (units.cyclic or n < n_max):
        word = units.take(n + 1)[-1].rstrip()
        k, _ = _search(lambda k: count_tokens(render(n, k)), length, 0, len(word) - 1, task, fn)
        return render(n, k)
    return render(n)


def _fit_list(task: str, length: int, count_tokens: CountTokens, render: Callable[[int], str],
              lo: int, hi: int) -> str:
    m, _ = _search(lambda m: count_tokens(render(m)), length, lo, max(lo, hi), task)
    return render(m)


def _budget(base: int, references: list[str], count_tokens: CountTokens) -> int:
    # RULER's per-task budget, raised where the references alone need more (e.g. a byte
    # tokenizer), with room for the separators and numbering a model writes around them
    return max(base, 2 * count_tokens(", ".join(references)) + 16)


# --- random content ----------------------------------------------------------------------------

def _synthetic_words(rng: random.Random, seen: set[str]) -> Iterator[str]:
    """Endless distinct pronounceable non-words ("bakotu"), for when real words run out."""
    while True:
        word = "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(3))
        if word not in seen:
            seen.add(word)
            yield word


def _word_stream(rng: random.Random, haystack_text: str) -> Iterator[str]:
    """Distinct lowercase words: the fixed list and the haystack's own words, shuffled, then
    synthetic ones (cwe needs ~10k distinct words at 128k tokens)."""
    real = sorted(set(_WORDS) | set(re.findall(r"\b[a-z]{4,10}\b", haystack_text[:200_000])))
    rng.shuffle(real)
    yield from real
    yield from _synthetic_words(rng, set(real))


def _keys(rng: random.Random, kind: str, k: int) -> list[str]:
    if kind == "uuids":
        return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(k)]
    # distinct ordered pairs of distinct words; synthetic words join when the list is too short
    size = max(len(_WORDS), math.isqrt(k) + 2)
    pool = _WORDS + list(itertools.islice(_synthetic_words(rng, set(_WORDS)), size - len(_WORDS)))
    keys = []
    for idx in rng.sample(range(size * (size - 1)), k):
        i, j = divmod(idx, size - 1)
        keys.append(f"{pool[i]}-{pool[j + (j >= i)]}")
    return keys


def _values(rng: random.Random, kind: str, k: int, avoid: str) -> list[str]:
    if kind == "uuids":
        return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(k)]
    values: dict[str, None] = {}  # ordered and distinct
    while len(values) < k:
        value = str(rng.randint(1_000_000, 9_999_999))
        if value not in avoid:  # a value must occur only in its needle
            values[value] = None
    return list(values)


# --- tasks -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Niah:
    haystack: str  # "noise" (NOISE repeated), "essay" (haystack_text) or "needle" (distractors)
    key: str  # "words" or "uuids"
    value: str  # "numbers" or "uuids"
    num_keys: int = 1  # inserted needles' keys, the queried ones first
    num_values: int = 1  # values per key
    num_queries: int = 1


_NIAH = {
    "niah_single_1": _Niah("noise", "words", "numbers"),
    "niah_single_2": _Niah("essay", "words", "numbers"),
    "niah_single_3": _Niah("essay", "words", "uuids"),
    "niah_multikey_1": _Niah("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": _Niah("needle", "words", "numbers"),
    "niah_multikey_3": _Niah("needle", "uuids", "uuids"),
    "niah_multivalue": _Niah("essay", "words", "numbers", num_values=4),
    "niah_multiquery": _Niah("essay", "words", "numbers", num_keys=4, num_queries=4),
}


def _niah(task: str, length: int, count_tokens: CountTokens, rng: random.Random,
          haystack_text: str, depth: float | None) -> RulerSample:
    cfg = _NIAH[task]
    plural, units = cfg.value, None
    if cfg.haystack != "needle":
        text = NOISE if cfg.haystack == "noise" else haystack_text
        units = _Units(text, length + 1, cyclic=True, task=task)
    # a needle is 10 words, each at least a token: this many distractors fill any haystack
    n_stream = length // 10 + 2 if cfg.haystack == "needle" else 0
    keys = _keys(rng, cfg.key, cfg.num_keys + n_stream)
    n_inserted = cfg.num_keys * cfg.num_values
    values = _values(rng, cfg.value, n_inserted + n_stream, "".join(units.words) if units else "")
    needle = "One of the special magic {} for {} is: {}.".format
    pairs = [(keys[i // cfg.num_values], values[i]) for i in range(n_inserted)]
    depths = rng.sample(_DEPTHS, n_inserted)
    if depth is not None:  # the first needle is a queried one
        depths[0] = depth
    inserts = [(d, needle(plural, k, v)) for d, (k, v) in zip(depths, pairs)]
    if units is None:
        units = _Units(" ".join(needle(plural, k, v) for k, v in
                                zip(keys[cfg.num_keys:], values[n_inserted:])), None, cyclic=False)
    queries = keys[:cfg.num_queries]
    references = [v for k, v in pairs if k in queries]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + " and " + queries[-1]
    if len(references) == 1:
        question = (f"What is the special magic {plural[:-1]} for {query} mentioned in the "
                    f"provided text? The special magic {plural[:-1]} for {query} mentioned in "
                    f"the provided text is")
    else:
        question = (f"What are all the special magic {plural} for {query} mentioned in the "
                    f"provided text? The special magic {plural} for {query} mentioned in the "
                    f"provided text are")
    head = (f"Some special magic {plural} are hidden within the following text. Make sure to "
            f"memorize it. I will quiz you about the {plural} afterwards.\n")
    prompt = _fit_text(task, length, count_tokens, units, inserts, cfg.haystack == "needle",
                       lambda context: f"{head}{context}\n{question}")
    return RulerSample(task, prompt, references, _budget(128, references, count_tokens), "all")


def _vt(task: str, length: int, count_tokens: CountTokens, rng: random.Random,
        haystack_text: str, depth: float | None) -> RulerSample:
    names: list[str] = []
    while len(names) < 5:  # one chain of 4 hops
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names and name.lower() not in NOISE.lower():
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}."]
    chain += [f"VAR {new} = VAR {old}." for old, new in zip(names, names[1:])]
    inserts = list(zip(sorted(rng.sample(_DEPTHS, len(chain))), chain))
    frame = ("Memorize and track the chain(s) of variable assignment hidden in the following "
             "text.\n\n{}\nQuestion: Find all variables that are assigned the value {} in the "
             "text above. Answer: According to the chain(s) of variable assignment in the text "
             "above, {} variables are assigned the value {}, they are:").format
    prompt = _fit_text(task, length, count_tokens, _Units(NOISE, None, cyclic=True), inserts,
                       False, lambda context: frame(context, value, len(names), value))
    return RulerSample(task, prompt, names, _budget(30, names, count_tokens), "all")


def _cwe(task: str, length: int, count_tokens: CountTokens, rng: random.Random,
         haystack_text: str, depth: float | None) -> RulerSample:
    # RULER's counts; short prompts cannot hold 30 copies of 10 words
    num_cw, freq_cw, freq_ucw = (10, 30, 3) if length >= 4096 else (10, 2, 1)
    lo, hi = num_cw * freq_cw, length // 2 + 1  # a list item is at least 2 tokens
    stream = _word_stream(rng, haystack_text)
    common: list[str] = []
    for word in stream:  # no common word inside another: a substring would score as a hit
        if not any(word in c or c in word for c in common):
            common.append(word)
            if len(common) == num_cw:
                break
    rare = list(itertools.islice((w for w in stream if not any(c in w for c in common)),
                                 max(0, hi - lo) // freq_ucw + 1))
    seed = rng.getrandbits(64)

    def render(m: int) -> str:
        # m list items; the last rare word may get fewer than freq_ucw copies
        words = common * freq_cw + [rare[i // freq_ucw] for i in range(m - lo)]
        random.Random(f"{seed}:{m}").shuffle(words)
        items = " ".join(f"{i}. {w}" for i, w in enumerate(words, 1))
        return ("Below is a numbered list of words. In these words, some appear more often than "
                f"others. Memorize the ones that appear most often.\n{items}\nQuestion: What are "
                f"the {num_cw} most common words in the above list? Answer: The top {num_cw} "
                "words that appear most often in the list are:")

    prompt = _fit_list(task, length, count_tokens, render, lo, hi)
    return RulerSample(task, prompt, common, _budget(120, common, count_tokens), "all")


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Integer counts summing to ``total``, proportional to ``weights`` (largest remainders;
    ties go to the heavier weight, so counts never increase along decreasing weights)."""
    norm = total / sum(weights)
    exact = [w * norm for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[:total - sum(counts)]:
        counts[i] += 1
    return counts


def _fwe(task: str, length: int, count_tokens: CountTokens, rng: random.Random,
         haystack_text: str, depth: float | None) -> RulerSample:
    alpha, size = 2.0, 2000
    vocab: dict[str, None] = {"....": None}  # RULER: the top rank is noise the question skips
    while len(vocab) < size:
        vocab["".join(rng.choices(string.ascii_lowercase, k=5))] = None
    words = list(vocab)
    weights = [k ** -alpha for k in range(1, size + 1)]
    # from this many words on, rank 4 beats rank 5 by >= 2 before rounding: the top 3 are strict
    lo = math.ceil(2 * sum(weights) / (4 ** -alpha - 5 ** -alpha))
    seed = rng.getrandbits(64)

    def render(m: int) -> str:
        text = [w for w, c in zip(words, _apportion(m, weights)) for _ in range(c)]
        random.Random(f"{seed}:{m}").shuffle(text)
        return ("Read the following coded text and track the frequency of each coded word. Find "
                f"the three most frequently appeared coded words. {' '.join(text)}\nQuestion: Do "
                "not provide any explanation. Please ignore the dots '....'. What are the three "
                "most frequently appeared words in the above coded text? Answer: According to "
                "the coded text above, the three most frequently appeared words are:")

    prompt = _fit_list(task, length, count_tokens, render, lo, length)
    references = words[1:4]
    return RulerSample(task, prompt, references, _budget(50, references, count_tokens), "all")


TaskGenerator = Callable[[str, int, CountTokens, random.Random, str, float | None], RulerSample]
TASKS: dict[str, TaskGenerator] = {**{name: _niah for name in _NIAH},
                                   "vt": _vt, "cwe": _cwe, "fwe": _fwe}


def build_sample(task: str, length: int, count_tokens: CountTokens, rng: random.Random,
                 haystack_text: str, depth: float | None = None) -> RulerSample:
    """One sample of ``task`` whose prompt is ``length`` tokens (see the module docstring).

    ``count_tokens`` is the tokenizer's length function; ``haystack_text`` is the essay haystack
    of niah_single_2/3, multikey_1, multivalue and multiquery (repeated when short; its words
    also feed cwe's word list). ``depth`` in [0, 1] places a queried needle (NIAH only); by
    default every needle goes to a random depth. Deterministic for a given ``rng`` state."""
    if task not in TASKS:
        raise ValueError(f"Unknown RULER task {task!r}; valid tasks: {', '.join(TASKS)}.")
    if length < 1:
        raise ValueError(f"length must be a positive number of tokens, got {length}.")
    if depth is not None and task not in _NIAH:
        raise ValueError(f"depth applies to the niah_* tasks only, not {task}.")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}.")
    return TASKS[task](task, length, count_tokens, rng, haystack_text, depth)
