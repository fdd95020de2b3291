"""Llama-style GPT on megatron-core, with our rotary module and core attention."""

from megatron_longctx.model.gpt import LongContextGPTModel, build_model, transformer_config

__all__ = ["LongContextGPTModel", "build_model", "transformer_config"]
