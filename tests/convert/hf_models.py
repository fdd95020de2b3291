"""Tiny random transformers models (2 layers, hidden 64) per family and RoPE type, written as
sharded safetensors, and helpers to compare them with converted checkpoints."""

from __future__ import annotations

import os

import torch

ORIG = 64  # original_max_position_embeddings; test batches are longer
MAX_POS = 4 * ORIG
SEQ = 100
VOCAB = 250  # padded to 256 in our checkpoints
PAIRS = 8  # head_dim 16 -> 8 frequency pairs

HF_ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": ORIG, "beta_fast": 16.0, "beta_slow": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIG},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0,
                 "short_factor": [1.0 + 0.02 * j for j in range(PAIRS)],
                 "long_factor": [1.0 + 0.4 * j for j in range(PAIRS)],
                 "original_max_position_embeddings": ORIG},
}
FAMILIES = ("llama", "mistral", "qwen2")


def hf_config(family: str, rope: dict, tied: bool = False, **overrides):
    import transformers

    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  max_position_embeddings=ORIG if rope["rope_type"] == "dynamic" else MAX_POS,
                  rope_parameters=dict(rope), tie_word_embeddings=tied,
                  initializer_range=0.15)  # attention far from uniform: RoPE errors show
    if family == "mistral":
        kwargs["sliding_window"] = None
    elif family == "qwen2":
        kwargs.update(use_sliding_window=False)
    kwargs.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[family]
    return cls(**kwargs)


def make_hf_model(directory: str, family: str, rope: dict, tied: bool = False, seed: int = 0,
                  shard_size: str = "60KB", **overrides):
    """A random model saved (sharded) to ``directory``; returns it in eval mode. Norm weights
    and q/k/v biases are randomised too, so a mix-up between them would show."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, rope, tied, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name
                        else 0.1 * torch.randn_like(p))
    model.eval().save_pretrained(directory, max_shard_size=shard_size)
    return model


def write_tokenizer(directory: str) -> None:
    """A tiny word-level tokenizer (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(20)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[2, SEQ]`` (longer than ORIG) and contiguous positions."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    return tokens, torch.arange(SEQ)[None].repeat(2, 1)


def hf_logits(model, tokens, positions) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=positions).logits.float()


def safetensors_state(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(directory, name)))
    return state
