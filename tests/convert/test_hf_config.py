"""config.json <-> ModelConfig: every RoPE type both ways (both config spellings), lengths kept
apart, the exported RoPE equal to transformers' own, and every refusal with its reason."""

import warnings

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megatron_longctx.config import ModelConfig
from megatron_longctx.convert.hf_config import (
    ConversionError,
    hf_config,
    model_config_from_hf,
    resolve_architecture,
    rope_from_hf,
    rope_to_hf,
)
from megatron_longctx.rope import compute_inv_freq

ORIG = 64
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 5e5},
    "linear": {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_fast": 16.0,
             "beta_slow": 2.0, "original_max_position_embeddings": ORIG},
    "llama3": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIG},
    "longrope": {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings":
                 ORIG, "short_factor": [1.0] * 8, "long_factor": [1.0 + j for j in range(8)]},
}


def hf_dict(rope: dict, legacy: bool = False, arch: str = "LlamaForCausalLM", **extra) -> dict:
    raw = {"architectures": [arch], "vocab_size": 250, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 4 * ORIG, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False, **extra}
    if legacy:  # transformers < 4.56: rope_theta beside rope_scaling ("type" in older files)
        scaling = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
        raw["rope_theta"] = rope["rope_theta"]
        if rope["rope_type"] != "default":
            raw["rope_scaling"] = {"type": rope["rope_type"], **scaling}
    else:
        raw["rope_parameters"] = dict(rope)
    return raw


def hf_inv_freq(config, seq_len=None):
    fn = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]] \
        if config.rope_parameters["rope_type"] != "default" else None
    if fn is None:
        theta = config.rope_parameters["rope_theta"]
        return 1.0 / theta ** (torch.arange(0, 16, 2).float() / 16), 1.0
    return fn(config, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("legacy", [False, True], ids=["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("rope", ROPES)
def test_import_then_export_preserves_rope(rope, legacy):
    model, arch = model_config_from_hf(hf_dict(ROPES[rope], legacy))
    assert arch == "llama"
    ours = model.rope_parameters
    assert ours["rope_type"] == rope and ours["rope_theta"] == ROPES[rope]["rope_theta"]
    if rope == "dynamic":  # transformers' pretrained length is max_position_embeddings
        assert ours["original_max_position_embeddings"] == model.max_position_embeddings == 4 * ORIG
    elif rope != "default" and rope != "linear":
        assert ours["original_max_position_embeddings"] == ORIG
        assert model.max_position_embeddings == 4 * ORIG
    if rope in ("yarn", "longrope"):
        assert ours["factor"] == ROPES[rope].get("factor", 4.0)  # explicit, never implicit
    config = hf_config(model, "llama")
    expected = {**ROPES[rope]}
    if rope == "longrope":
        expected["factor"] = 4.0
    assert config.rope_parameters == expected
    assert config.max_position_embeddings == 4 * ORIG
    # our frequencies equal transformers' for the exported config, short and long inputs
    for seq_len in (ORIG // 2, 3 * ORIG):
        theirs, their_factor = hf_inv_freq(config, seq_len)
        mine, my_factor = compute_inv_freq(ours, 16, 4, 2, seq_len=seq_len,
                                           max_position_embeddings=model.max_position_embeddings)
        torch.testing.assert_close(mine[0], theirs.float(), rtol=1e-6, atol=0)
        assert my_factor == pytest.approx(their_factor)


def test_implicit_factor_and_top_level_original_length():
    # YaRN without factor: the factor transformers uses (max / original) is written explicitly
    rope = {k: v for k, v in ROPES["yarn"].items() if k != "factor"}
    model, _ = model_config_from_hf(hf_dict(rope))
    assert model.rope_parameters["factor"] == 4.0
    # Phi-3 style: a top-level original_max_position_embeddings wins (as in transformers)
    rope = {k: v for k, v in ROPES["longrope"].items() if k != "original_max_position_embeddings"}
    ours, max_pos = rope_from_hf(hf_dict(rope, original_max_position_embeddings=32))
    assert ours["original_max_position_embeddings"] == 32 and ours["factor"] == max_pos / 32


def test_yarn_without_factor_exports_the_factor_used():
    """Defect 2: transformers refuses a yarn config without factor; we fill in the one the
    model used (max_position_embeddings / original)."""
    model = ModelConfig(max_position_embeddings=512, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 128})
    config = hf_config(model)
    assert config.rope_parameters["factor"] == 4.0
    mine, _ = compute_inv_freq(model.rope_parameters, 16, 4, 4, max_position_embeddings=512)
    theirs, _ = hf_inv_freq(config)
    torch.testing.assert_close(mine[0], theirs.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("rope", ["default", "linear", "yarn"])
def test_partial_rotary_is_refused(rope):
    """Defect 1: transformers' Llama has no partial rotary (wrong logits or a crash before)."""
    model = ModelConfig(rotary_percent=0.5, rope_parameters=dict(ROPES[rope]))
    with pytest.raises(ConversionError, match="rotary_percent=0.5"):
        hf_config(model)
    with pytest.raises(ConversionError, match="partial_rotary_factor"):
        model_config_from_hf(hf_dict(ROPES[rope], partial_rotary_factor=0.5))


def test_qkv_bias_exports_as_qwen2():
    """Defect 3: q/k/v biases are Qwen2 (no o_proj bias), never Llama's attention_bias."""
    model = ModelConfig(add_qkv_bias=True)
    assert resolve_architecture(model) == "qwen2"
    assert type(hf_config(model, "qwen2")).__name__ == "Qwen2Config"
    for arch in ("llama", "mistral"):
        with pytest.raises(ConversionError, match="export it as qwen2"):
            resolve_architecture(model, arch)
    with pytest.raises(ConversionError, match="has none"):
        resolve_architecture(ModelConfig(), "qwen2")
    assert resolve_architecture(ModelConfig(), "auto", source="mistral") == "mistral"


def test_ntk_and_harpe_export():
    ntk = ModelConfig(rope_parameters={"rope_type": "ntk", "rope_theta": 1e4, "factor": 8.0})
    params, _, _ = rope_to_hf(ntk)
    assert params == {"rope_type": "default", "rope_theta": 1e4 * 8.0 ** (16 / 14)}
    harpe = ModelConfig(num_query_groups=2, rope_parameters={
        "rope_type": "harpe", "harpe_scheme": "uniform_ascending", "harpe_base_min": 1e4,
        "harpe_base_max": 3e4})
    with pytest.warns(UserWarning, match="stock transformers ignores them"):
        config = hf_config(harpe)
    assert config.harpe_bases == [1e4, 3e4]
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e4}
    assert '"harpe_bases"' in config.to_json_string()


def test_longrope_start_tokens_refused():
    rope = {**ROPES["longrope"], "longrope_start_tokens": 4}
    with pytest.raises(ConversionError, match="n-hat"):
        hf_config(ModelConfig(max_position_embeddings=256, rope_parameters=rope))


@pytest.mark.parametrize("arch,extra,refused", [
    ("MistralForCausalLM", {"sliding_window": 32}, True),
    ("MistralForCausalLM", {"sliding_window": None}, False),
    ("MistralForCausalLM", {"sliding_window": 4 * ORIG}, False),  # never narrower than max
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 32}, True),
    ("Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": 32}, False),
])
def test_sliding_window(arch, extra, refused):
    raw = hf_dict(ROPES["default"], arch=arch, **extra)
    if refused:
        with pytest.raises(ConversionError, match="sliding window"):
            model_config_from_hf(raw)
    else:
        model, _ = model_config_from_hf(raw)
        assert model.add_qkv_bias == (arch == "Qwen2ForCausalLM")


def test_exported_configs_disable_sliding_windows():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert hf_config(ModelConfig(), "mistral").sliding_window is None
        qwen = hf_config(ModelConfig(add_qkv_bias=True), "qwen2")
    assert qwen.sliding_window is None and not qwen.use_sliding_window


@pytest.mark.parametrize("raw,match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
    ({"attention_bias": True}, "o_proj bias"),
    ({"hidden_act": "gelu"}, "silu"),
    ({"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}}, "not supported"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0,
                          "beta_fast": 3}}, "do not apply"),
    ({"num_attention_heads": 3}, "invalid"),
])
def test_bad_configs(raw, match):
    with pytest.raises(ConversionError, match=match):
        model_config_from_hf({**hf_dict(ROPES["default"]), **raw})
