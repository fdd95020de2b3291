"""HF -> ours -> HF on tiny random Llama / Mistral / Qwen2 models for every RoPE type: our
logits equal transformers' (fp32, past original_max_position_embeddings), the exported files
are the source tensors bit for bit and load strictly in transformers; models of ours (HARPE,
YaRN without factor, q/k/v biases) export correctly; bad inputs are refused before anything is
written."""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_longctx.config import ModelConfig, ParallelConfig, RunConfig
from megatron_longctx.convert import ConversionError, hf_to_mcore, mcore_to_hf
from megatron_longctx.model import build_model, load_model
from megatron_longctx.parallel.initialize import initialize_model_parallel
from megatron_longctx.training.checkpoint import save_weights
from megatron_longctx.training.pretrained import check_checkpoint_shapes

from convert.hf_models import (
    FAMILIES,
    HF_ROPES,
    ORIG,
    SEQ,
    hf_logits,
    inputs,
    make_hf_model,
    safetensors_state,
    write_tokenizer,
)

TOL = 1e-4
CASES = [(f, r, False) for f in FAMILIES for r in HF_ROPES] + [
    ("llama", "default", True), ("qwen2", "llama3", True), ("mistral", "yarn", True)]


def our_logits(ckpt, tokens, positions):
    with torch.no_grad():
        return load_model(ckpt)(tokens, positions)


def assert_positions_matter(ckpt, tokens, positions, expected):
    """Control: scaled positions change the logits by far more than TOL, so equal logits
    really test the RoPE."""
    assert (our_logits(ckpt, tokens, positions * 3 // 2) - expected).abs().max() > 100 * TOL


def strict_load(hf_dir):
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


@pytest.mark.parametrize("family,rope,tied", CASES,
                         ids=[f"{f}-{r}{'-tied' if t else ''}" for f, r, t in CASES])
def test_round_trip(single_process_group, tmp_path, family, rope, tied):
    src, ckpt, out = str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(tmp_path / "out")
    hf = make_hf_model(src, family, HF_ROPES[rope], tied=tied)
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))  # sharded input
    tokens, positions = inputs()
    assert SEQ > ORIG
    expected = hf_logits(hf, tokens, positions)

    hf_to_mcore(src, ckpt)
    ours = our_logits(ckpt, tokens, positions)
    assert ours.shape == expected.shape  # no vocabulary padding
    diff = (ours - expected).abs().max().item()
    print(f"{family}-{rope}{'-tied' if tied else ''}: import max|diff| {diff:.2e}")
    assert diff <= TOL
    assert_positions_matter(ckpt, tokens, positions, expected)

    mcore_to_hf(ckpt, out, max_shard_bytes=60_000)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    source, exported = safetensors_state(src), safetensors_state(out)
    assert set(exported) == set(source)
    for name, tensor in source.items():
        assert torch.equal(exported[name], tensor), name
    back = strict_load(out)
    assert type(back) is type(hf)
    rope_parameters = dict(hf.config.rope_parameters)
    if rope in ("yarn", "longrope"):  # an implicit factor is written explicitly
        rope_parameters.setdefault("factor", hf.config.max_position_embeddings / ORIG)
    assert back.config.rope_parameters == rope_parameters
    assert back.config.max_position_embeddings == hf.config.max_position_embeddings
    assert (hf_logits(back, tokens, positions) - expected).abs().max().item() <= TOL


def test_files_carried_and_legacy_rope_spelling(single_process_group, tmp_path):
    """Older config.json spelling (rope_theta + rope_scaling with "type"); tokenizer and
    generation config kept in <checkpoint>/tokenizer/ and written back; the checkpoint fits a
    training run's model (what --pretrained-checkpoint / --load check)."""
    src, ckpt, out = str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(tmp_path / "out")
    hf = make_hf_model(src, "llama", HF_ROPES["llama3"])
    write_tokenizer(src)
    with open(os.path.join(src, "config.json")) as f:
        raw = json.load(f)
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(raw, f)
    hf_to_mcore(src, ckpt)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(
        os.listdir(os.path.join(ckpt, "tokenizer")))
    tokens, positions = inputs()
    assert (our_logits(ckpt, tokens, positions) - hf_logits(hf, tokens, positions)).abs().max() \
        <= TOL
    model = load_model(ckpt)
    check_checkpoint_shapes(build_model(model.config, ParallelConfig()),
                            os.path.join(ckpt, "iter_0000000"))
    mcore_to_hf(os.path.join(ckpt, "iter_0000000"), out)  # an iter_* directory works too
    assert AutoTokenizer.from_pretrained(out)("w1 w2")["input_ids"][-2:] == [4, 5]
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    strict_load(out)


def save_ours(root, model_cfg: ModelConfig) -> None:
    """A checkpoint of ours with random weights (norms randomised too)."""
    initialize_model_parallel(ParallelConfig(), seed=5)
    model = build_model(model_cfg, ParallelConfig())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    save_weights(model, RunConfig(model=model_cfg), str(root))


def export_matches(tmp_path, model_cfg, **kwargs):
    save_ours(tmp_path / "ours", model_cfg)
    mcore_to_hf(str(tmp_path / "ours"), str(tmp_path / "hf"), **kwargs)
    hf = strict_load(str(tmp_path / "hf"))
    tokens, positions = inputs()
    diff = (our_logits(str(tmp_path / "ours"), tokens, positions)
            - hf_logits(hf, tokens, positions)).abs().max().item()
    assert diff <= TOL
    return hf


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                num_query_groups=2, vocab_size=250, max_position_embeddings=4 * ORIG)
    return ModelConfig(**{**base, **kw})


def test_export_qkv_bias_model_as_qwen2(single_process_group, tmp_path):
    """Defect 3: an --add-qkv-bias model exported as Llama failed transformers' strict load
    (o_proj.bias missing); it is Qwen2."""
    hf = export_matches(tmp_path, tiny(add_qkv_bias=True))
    assert type(hf).__name__ == "Qwen2ForCausalLM"


def test_export_yarn_without_factor(single_process_group, tmp_path):
    """Defect 2: a YaRN model with the implicit factor (max / original) exports with it."""
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": ORIG}
    hf = export_matches(tmp_path, tiny(rope_parameters=rope), architecture="mistral")
    assert hf.config.rope_parameters["factor"] == 4.0
    assert type(hf).__name__ == "MistralForCausalLM"


def test_export_harpe_writes_bases(single_process_group, tmp_path):
    rope = {"rope_type": "harpe", "harpe_bases": [1e4, 1e6]}
    save_ours(tmp_path / "ours", tiny(rope_parameters=rope))
    with pytest.warns(UserWarning, match="HARPE"):
        mcore_to_hf(str(tmp_path / "ours"), str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        config = json.load(f)
    assert config["harpe_bases"] == [1e4, 1e6]
    assert config["rope_parameters"]["rope_theta"] == 1e4
    strict_load(str(tmp_path / "hf"))


@pytest.mark.parametrize("model_kw,match", [
    (dict(rotary_percent=0.5), "rotary_percent"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                           "long_factor": [2.0] * 8, "original_max_position_embeddings": ORIG,
                           "longrope_start_tokens": 4}), "n-hat"),
])
def test_export_refusals_write_nothing(single_process_group, tmp_path, model_kw, match):
    """Defect 1 (partial rotary) and LongRoPE n-hat: refused before anything is written."""
    save_ours(tmp_path / "ours", tiny(**model_kw))
    with pytest.raises(ConversionError, match=match):
        mcore_to_hf(str(tmp_path / "ours"), str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")


def _edit_config(src, **changes):
    path = os.path.join(src, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
        json.dump(raw, f)


@pytest.fixture(scope="module")
def source_model(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("src") / "hf")
    make_hf_model(src, "mistral", HF_ROPES["default"])
    return src


@pytest.mark.parametrize("bad,match", [
    ("architecture", "unsupported architecture"),
    ("missing_shard", "missing"),
    ("shape", "does not match its config"),
    ("partial_rotary", "partial rotary"),
    ("sliding_window", "sliding window"),
    ("vocab_divisor", "make-vocab-size-divisible-by"),
])
def test_bad_inputs_write_nothing(single_process_group, source_model, tmp_path, bad, match):
    src = str(tmp_path / "hf")
    shutil.copytree(source_model, src)
    kwargs = {}
    if bad == "architecture":
        _edit_config(src, architectures=["GPTNeoXForCausalLM"])
    elif bad == "missing_shard":
        with open(os.path.join(src, "model.safetensors.index.json")) as f:
            shard = sorted(set(json.load(f)["weight_map"].values()))[1]
        os.remove(os.path.join(src, shard))
    elif bad == "shape":
        _edit_config(src, intermediate_size=128)
    elif bad == "partial_rotary":
        _edit_config(src, partial_rotary_factor=0.5)
    elif bad == "sliding_window":
        _edit_config(src, sliding_window=32)
    else:
        kwargs["make_vocab_size_divisible_by"] = 0
    with pytest.raises(ConversionError, match=match):
        hf_to_mcore(src, str(tmp_path / "ckpt"), **kwargs)
    assert not os.path.exists(tmp_path / "ckpt")


def _tool(name):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_tools(single_process_group, source_model, tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    _tool("convert_hf_to_mcore").main(["--hf-dir", source_model, "--save", ckpt,
                                       "--tensor-model-parallel-size", "2"])
    _tool("convert_mcore_to_hf").main(["--load", ckpt, "--ckpt-step", "0", "--save", out,
                                       "--architecture", "mistral"])
    assert type(strict_load(out)).__name__ == "MistralForCausalLM"
    with pytest.raises(SystemExit, match="error: .*already holds a model"):
        _tool("convert_mcore_to_hf").main(["--load", ckpt, "--save", out])
