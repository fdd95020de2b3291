"""Write Python's standard-library sources as a JSONL corpus (one {"text": ...} per file, or
per top-level package with --by-package: long documents for long-context work).

A real, long corpus present on every machine: the quick start and the benchmarks use it.
    python tools/make_stdlib_corpus.py --output data/stdlib.jsonl [--repeat 4]
    python tools/make_stdlib_corpus.py --by-package --output data/train.jsonl \
        --holdout-every 10 --holdout-output data/heldout.jsonl
"""

import argparse
import os

from megatron_longctx.data.corpora.stdlib_corpus import write_stdlib_jsonl


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-docs", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1, help="write the corpus N times")
    parser.add_argument("--by-package", action="store_true",
                        help="one document per top-level package (files concatenated)")
    parser.add_argument("--holdout-every", type=int, default=0,
                        help="send every k-th document to --holdout-output instead")
    parser.add_argument("--holdout-output", default=None)
    args = parser.parse_args(argv)
    for path in (args.output, args.holdout_output):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        n, held = write_stdlib_jsonl(args.output, args.max_docs, args.repeat, args.by_package,
                                     args.holdout_every, args.holdout_output)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    size = os.path.getsize(args.output) / 2**20
    print(f"wrote {n} documents ({size:.1f} MiB) to {args.output}"
          + (f", {held} to {args.holdout_output}" if args.holdout_every else ""))

