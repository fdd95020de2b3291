"""Write a context-extension report (markdown with tables, plots and a reading of the numbers)
from the outputs of tools/eval_perplexity.py and tools/eval_passkey.py.

    python tools/extension_report.py --perplexity eval/ppl --passkey eval/passkey \
        --base base --control control --train-length 256 --out report.md
"""

import argparse


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--perplexity", required=True, help="tools/eval_perplexity.py --out")
    p.add_argument("--passkey", default=None, help="tools/eval_passkey.py --out")
    p.add_argument("--base", required=True, help="run name (checkpoint folder) of the base")
    p.add_argument("--control", required=True,
                   help="run name of the base trained further at its original length and RoPE")
    p.add_argument("--train-length", type=int, required=True, help="the base's training length")
    p.add_argument("--title", default="Context extension report")
    p.add_argument("--preamble", default="", help="markdown placed under the title")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from megatron_longctx.eval.extension_report import read_results, write_report  # torch

    results = read_results(args.perplexity, args.passkey)
    for run in (args.base, args.control):
        if run not in results.perplexity:
            raise SystemExit(f"error: no run named {run!r} in {args.perplexity}/results.json "
                             f"(runs: {', '.join(results.perplexity)})")
    write_report(args.out, results, args.base, args.control, args.train_length,
                 args.perplexity, args.passkey, args.title, args.preamble)
    print(f"wrote {args.out}")

