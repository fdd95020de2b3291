"""Data, by stage: ``corpora`` (built-in corpora) -> ``preprocessing`` (JSONL/Parquet to
tokens, with ``tokenization``) -> ``formats`` (Megatron's ``.bin``/``.idx`` and side data:
writing, checking, merging, reading shards as one) -> ``samples`` (what training reads:
packed long-context samples, position-transformed windows, blends)."""
