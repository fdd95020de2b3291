"""Corpus files (JSONL, Parquet, compressed) to indexed datasets: input reading, chat
rendering and prompt masks, sentence splitting, sharding across nodes, the worker pipeline."""
