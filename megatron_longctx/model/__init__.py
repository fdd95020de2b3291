"""Llama-style GPT on megatron-core, with our rotary module and core attention."""

from megatron_longctx.model.causal_lm import CausalLM
from megatron_longctx.model.gpt import LongContextGPTModel, build_model, transformer_config
from megatron_longctx.model.kv_cache import KVCache
from megatron_longctx.model.loading import load_model

__all__ = ["CausalLM", "KVCache", "LongContextGPTModel", "build_model", "load_model",
           "transformer_config"]
