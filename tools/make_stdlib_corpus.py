#!/usr/bin/env python
"""Write Python's standard-library sources as a JSONL corpus (one {"text": ...} per file).

A real, long corpus present on every machine: the quick start and the benchmarks use it.
    python tools/make_stdlib_corpus.py --output data/stdlib.jsonl [--repeat 4]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longctx.data.stdlib_corpus import write_stdlib_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-docs", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1, help="write the corpus N times")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    n = write_stdlib_jsonl(args.output, max_docs=args.max_docs, repeat=args.repeat)
    size = os.path.getsize(args.output) / 2**20
    print(f"wrote {n} documents ({size:.1f} MiB) to {args.output}")


if __name__ == "__main__":
    main()
