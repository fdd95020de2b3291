"""Our model (megatron-core layers + our rotary and core attention) equals transformers'
LlamaForCausalLM on the same weights for every rope type, with non-contiguous position_ids
and lengths past original_max_position_embeddings. HARPE, which transformers lacks, is checked
against an independent float64 Llama written here (itself checked against transformers)."""


import pytest
import torch
from transformers import LlamaForCausalLM

from megatron_longctx.config import ModelConfig, ParallelConfig
from megatron_longctx.convert.hf_config import hf_config
from megatron_longctx.model import build_model
from megatron_longctx.model.gpt import padded_vocab_size
from megatron_longctx.model.hf_conversion import from_hf, to_hf
from megatron_longctx.model.sharding import full_tensors, load_full_state_dict
from megatron_longctx.rope import compute_inv_freq

ORIG = 64
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "abf": {"rope_type": "default", "rope_theta": 1e6},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "ntk": {"rope_type": "ntk", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": ORIG},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": ORIG},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIG},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0,
                 "short_factor": [1.0 + 0.02 * j for j in range(8)],
                 "long_factor": [1.0 + 0.4 * j for j in range(8)],
                 "original_max_position_embeddings": ORIG},
}
# PoSE-style: two chunks with a gap, reaching past the original length
POSITIONS = {
    "contiguous_short": torch.arange(48)[None].repeat(2, 1),
    "pose_gap_long": torch.cat([torch.arange(20), torch.arange(150, 178)])[None].repeat(2, 1),
}


def model_config(rope, **kw) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                       num_query_groups=2, vocab_size=258, max_position_embeddings=ORIG * 4,
                       rope_parameters=rope, **kw)


@pytest.fixture
def rng():
    torch.manual_seed(0)


def our_logits(model, cfg, tokens, positions):
    with torch.no_grad():
        return model(tokens, positions, None)[..., :cfg.vocab_size].float()


@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("positions", POSITIONS)
def test_logits_equal_transformers(model_parallel, rng, rope, positions):
    cfg = model_config(ROPES[rope])
    model = build_model(cfg, ParallelConfig()).eval()
    hf = LlamaForCausalLM(hf_config(cfg)).eval()
    hf.load_state_dict(to_hf(full_tensors(model), cfg))
    tokens = torch.randint(0, 258, (2, 48))
    pos = POSITIONS[positions]
    with torch.no_grad():
        expected = hf(input_ids=tokens, position_ids=pos).logits
    ours = our_logits(model, cfg, tokens, pos)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_conversion_round_trip(model_parallel, rng):
    cfg = model_config(ROPES["yarn"], add_qkv_bias=True)
    model = build_model(cfg, ParallelConfig())
    full = full_tensors(model)
    back = from_hf(to_hf(full, cfg), cfg, padded_vocab_size(cfg.vocab_size, 1))
    assert set(back) == set(full)
    for name, t in full.items():
        rows = cfg.vocab_size if "word_embeddings" in name or "output_layer" in name else None
        torch.testing.assert_close(back[name][:rows], t[:rows], rtol=0, atol=0)
    # and loads into a model again
    load_full_state_dict(build_model(cfg, ParallelConfig()), back)


# -- HARPE: independent float64 reference ---------------------------------------------------


def reference_llama(hf_state, cfg: ModelConfig, inv_freq_per_head, tokens, positions):
    """Plain float64 Llama forward with per-head rotary frequencies ``[heads, d/2]``."""
    sd = {k: v.double() for k, v in hf_state.items()}
    h, g, d = cfg.num_attention_heads, cfg.query_groups, cfg.head_dim
    b, s = tokens.shape

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_epsilon)

    def rotate(x, inv):  # x [b, heads, s, d], inv [heads, d/2]
        ang = positions.double()[:, None, :, None] * inv.double()[None, :, None, :]
        cos, sin = ang.cos(), ang.sin()
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    x = sd["model.embed_tokens.weight"][tokens]
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        y = rms(x, sd[p + "input_layernorm.weight"])
        q = (y @ sd[p + "self_attn.q_proj.weight"].T).view(b, s, h, d).transpose(1, 2)
        k = (y @ sd[p + "self_attn.k_proj.weight"].T).view(b, s, g, d).transpose(1, 2)
        v = (y @ sd[p + "self_attn.v_proj.weight"].T).view(b, s, g, d).transpose(1, 2)
        q = rotate(q, inv_freq_per_head)
        k = rotate(k, inv_freq_per_head[::h // g])
        k, v = k.repeat_interleave(h // g, 1), v.repeat_interleave(h // g, 1)
        att = (q @ k.transpose(-1, -2)) / d ** 0.5
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(b, s, h * d)
        x = x + o @ sd[p + "self_attn.o_proj.weight"].T
        y = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = y @ sd[p + "mlp.gate_proj.weight"].T, y @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_reference_llama_equals_transformers(model_parallel, rng):
    cfg = model_config(ROPES["abf"])
    model = build_model(cfg, ParallelConfig())
    hf_state = to_hf(full_tensors(model), cfg)
    hf = LlamaForCausalLM(hf_config(cfg)).eval()
    hf.load_state_dict(hf_state)
    tokens, pos = torch.randint(0, 258, (2, 48)), POSITIONS["pose_gap_long"]
    inv, _ = compute_inv_freq(cfg.rope_parameters, cfg.head_dim, 4, 2)
    with torch.no_grad():
        expected = hf(input_ids=tokens, position_ids=pos).logits.double()
    torch.testing.assert_close(reference_llama(hf_state, cfg, inv, tokens, pos), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("harpe", [
    {"rope_type": "harpe", "harpe_bases": [1e4, 1e6]},
    {"rope_type": "harpe", "harpe_scheme": "uniform_descending", "harpe_base_min": 1e3,
     "harpe_base_max": 5e5},
])
@pytest.mark.parametrize("positions", POSITIONS)
def test_harpe_logits_equal_float64_reference(model_parallel, rng, harpe, positions):
    cfg = model_config(harpe)
    model = build_model(cfg, ParallelConfig()).eval()
    hf_state = to_hf(full_tensors(model), cfg)
    inv, _ = compute_inv_freq(harpe, cfg.head_dim, 4, 2)
    assert not torch.equal(inv[0], inv[2])  # the two groups really differ
    tokens, pos = torch.randint(0, 258, (2, 48)), POSITIONS[positions]
    expected = reference_llama(hf_state, cfg, inv, tokens, pos)
    torch.testing.assert_close(our_logits(model, cfg, tokens, pos).double(), expected,
                               rtol=1e-5, atol=1e-5)
    # control: the shared-base model is measurably different
    shared = reference_llama(hf_state, cfg, inv[:1].expand(4, -1), tokens, pos)
    assert (shared - expected).abs().max() > 1e-3
