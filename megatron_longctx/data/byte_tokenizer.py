"""UTF-8 byte tokenizer (kept as an import path; the class lives with the other tokenizers)."""

from megatron_longctx.data.tokenizers import ByteTokenizer

__all__ = ["ByteTokenizer"]
