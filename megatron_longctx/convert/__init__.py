"""Hugging Face (Llama, Mistral, Qwen2) <-> megatron_longctx checkpoint conversion.

``hf_to_mcore(hf_dir, out_dir, tp=1, pp=1)`` writes a megatron-core distributed checkpoint
that ``--pretrained-checkpoint``, ``--load`` and ``load_model`` accept;
``mcore_to_hf(ckpt_dir, hf_dir, architecture="auto")`` writes sharded safetensors, config.json
and the tokenizer files that transformers loads.
"""

from megatron_longctx.convert.hf_config import ConversionError, hf_config, model_config_from_hf
from megatron_longctx.convert.hf_to_mcore import hf_to_mcore
from megatron_longctx.convert.mcore_to_hf import mcore_to_hf

__all__ = ["ConversionError", "hf_config", "hf_to_mcore", "mcore_to_hf", "model_config_from_hf"]
