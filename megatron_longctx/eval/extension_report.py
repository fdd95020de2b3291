"""A context-extension report: the perplexity and passkey results of several runs (a base
model, a control trained further at the base length, one run per extension method) as one
markdown page with the tables, the plots and a short reading written from the numbers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from megatron_longctx.eval.tool_args import label


@dataclass
class ExtensionResults:
    lengths: list[int]  # perplexity lengths
    perplexity: dict[str, dict[int, float]]  # run -> length -> perplexity
    passkey: dict[str, dict[int, float]]  # run -> length -> mean accuracy over depths


def read_results(perplexity_dir: str, passkey_dir: str | None) -> ExtensionResults:
    with open(os.path.join(perplexity_dir, "results.json")) as f:
        ppl = json.load(f)
    perplexity = {label(c): {int(n): r["ppl"] for n, r in by.items()}
                  for c, by in ppl["by_checkpoint"].items()}
    passkey = {}
    if passkey_dir:
        with open(os.path.join(passkey_dir, "results.json")) as f:
            acc = json.load(f)["accuracy"]
        passkey = {label(c): {int(n): sum(d.values()) / len(d) for n, d in by.items()}
                   for c, by in acc.items()}
    return ExtensionResults(sorted(int(n) for n in ppl["lengths"]), perplexity, passkey)


def reading(results: ExtensionResults, base: str, control: str, train_length: int) -> str:
    """One paragraph stating what the numbers show (nothing assumed)."""
    target = results.lengths[-1]
    ppl = results.perplexity
    factor = target / train_length
    methods = [r for r in ppl if r not in (base, control)]
    at = {r: ppl[r][target] for r in ppl}
    better = [m for m in methods if at[m] < at[control]]
    worse = [m for m in methods if m not in better]
    best = min(methods, key=at.get) if methods else None
    text = [f"At {target} tokens ({factor:g}x the {train_length}-token training length) the "
            f"control (the base trained further at {train_length} tokens with its original "
            f"RoPE, same token budget) has perplexity {at[control]:.2f} and the base "
            f"{at[base]:.2f}."]
    if better:
        text.append(" Beating the control there: " + ", ".join(
            f"{m} {at[m]:.2f} ({at[control] / at[m]:.1f}x lower)" for m in better) + ".")
    if worse:
        text.append(" Not beating it: " + ", ".join(f"{m} {at[m]:.2f}" for m in worse) + ".")
    if best is not None:
        short = {r: ppl[r][train_length] for r in ppl if train_length in ppl[r]}
        if short:
            text.append(f" The best at {target} is {best}; at the training length "
                        f"({train_length}) it scores {short[best]:.2f} against the control's "
                        f"{short[control]:.2f}, so the extension "
                        f"{'costs' if short[best] > short[control] else 'does not cost'} "
                        f"short-context quality here.")
    if results.passkey:
        pk_target = max(next(iter(results.passkey.values())))
        scores = {r: acc.get(pk_target) for r, acc in results.passkey.items()}
        text.append(f" Passkey retrieval at {pk_target} tokens (mean over depths): " + ", ".join(
            f"{r} {100 * s:.0f}%" for r, s in scores.items() if s is not None) + ".")
        short_pk = {r: acc.get(train_length) for r, acc in results.passkey.items()}
        if short_pk.get(base) == 0.0:
            text.append(f" The base retrieves no key even at its {train_length}-token training "
                        f"length, so passkey cannot separate the methods at this scale.")
        elif short_pk.get(base) is not None:
            text.append(f" At {train_length} tokens the base retrieves {100 * short_pk[base]:.0f}%"
                        f" of keys: what the extension methods have to carry over.")
    return "".join(text)


def write_report(path: str, results: ExtensionResults, base: str, control: str,
                 train_length: int, perplexity_dir: str, passkey_dir: str | None,
                 title: str = "Context extension report", preamble: str = "") -> str:
    out_dir = os.path.dirname(os.path.abspath(path))

    def rel(p: str) -> str:
        return os.path.relpath(p, out_dir)

    parts = [f"# {title}\n", preamble, "## Reading\n", reading(results, base, control,
                                                                train_length) + "\n",
             "## Perplexity by context length (held-out documents)\n",
             f"![perplexity]({rel(os.path.join(perplexity_dir, 'perplexity.png'))})\n"]
    with open(os.path.join(perplexity_dir, "perplexity.md")) as f:
        parts.append(f.read())
    if passkey_dir:
        parts += ["\n## Passkey retrieval (accuracy, length x depth)\n",
                  f"![passkey]({rel(os.path.join(passkey_dir, 'passkey.png'))})\n"]
        with open(os.path.join(passkey_dir, "passkey.md")) as f:
            parts.append(f.read())
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
