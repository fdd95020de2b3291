"""Write synthetic retrieval documents (a pass key stated early, recalled at the end) as JSONL,
to mix a small share into pretraining so that passkey retrieval is learnable by small models.

    python tools/make_retrieval_corpus.py --output data/retrieval.jsonl --count 3000 \
        --max-filler 120
"""

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--min-filler", type=int, default=1,
                        help="fewest filler sentences (~21 tokens each with a small vocabulary)")
    parser.add_argument("--max-filler", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # after parsing: the passkey phrasing lives with the evaluation, which imports the model
    from megatron_longctx.data.corpora.retrieval_documents import write_retrieval_jsonl

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    try:
        n = write_retrieval_jsonl(args.output, args.count, args.max_filler, args.min_filler,
                                  args.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {n} retrieval documents to {args.output}")

