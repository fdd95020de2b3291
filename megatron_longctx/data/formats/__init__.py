"""Megatron's indexed dataset on disk (``.bin``/``.idx``), its per-token side data, and the
tools over finished datasets: validation, inspection, merging, shards read as one dataset."""
