"""Tokenizers by Megatron-LM's ``--tokenizer-type`` names (from local files only) and the
SentencePiece trainer."""
