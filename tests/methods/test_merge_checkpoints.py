"""Checkpoint merging: identical inputs give the input back bit for bit; 0.5/0.5 is the
element-wise average (and runs like transformers on the averaged weights); inputs saved at TP=2,
PP=2 and TP=1 merge to the same tensors; bad weights and RoPE mismatches are refused."""

import json
import os

import pytest
import torch

from megatron_longctx.methods.merge import MergeError, merge_checkpoints, merge_weights

VOCAB = 300  # the tiny models' (tests/methods/conftest.py): 384 rows at TP=1, 512 at TP=2


def _state(ckpt: str) -> dict[str, torch.Tensor]:
    """The loaded model's tensors (an independent reader: megatron-core's load into our GPT)."""
    from megatron_longctx.model import load_model

    return {k: v.clone() for k, v in load_model(ckpt).gpt.state_dict().items()
            if torch.is_tensor(v) and "_extra_state" not in k}


def test_weights_must_sum_to_one_unless_normalized():
    assert merge_weights(None, 4, False) == [0.25] * 4
    assert merge_weights([0.3, 0.7], 2, False) == [0.3, 0.7]
    assert merge_weights([1, 3], 2, True) == [0.25, 0.75]
    for weights, match in (([0.5, 0.6], "sum to 1.1, not 1; .* --normalize"),
                           ([1.0], "1 values for 2 checkpoints"),
                           ([-0.5, 1.5], "finite and >= 0")):
        with pytest.raises(MergeError, match=match):
            merge_weights(weights, 2, False)


def test_identical_inputs_give_the_input_back(methods_models, tmp_path):
    a = methods_models["a"]
    merge_checkpoints([a, a], str(tmp_path / "two"), [0.5, 0.5])
    merge_checkpoints([a, a, a], str(tmp_path / "three"))  # 1/3 each: rounds back exactly
    original = _state(a)
    for name in ("two", "three"):
        merged = _state(str(tmp_path / name))
        assert merged.keys() == original.keys()
        for key, value in original.items():
            assert torch.equal(merged[key], value), (name, key)


def test_half_half_is_the_elementwise_average_and_equals_transformers(methods_models, tmp_path):
    from megatron_longctx.model import load_model
    from megatron_longctx.training.checkpoint import load_common, resolve_checkpoint

    from convert.hf_models import hf_logits

    a, b = methods_models["a"], methods_models["b"]
    out = str(tmp_path / "ab")
    # reads of 16 KiB: the embedding (300 rows of 256 bytes) and each layer's fc1 in pieces
    merge_checkpoints([a, b], out, [0.5, 0.5], chunk_bytes=16 * 1024)
    sa, sb, merged = _state(a), _state(b), _state(out)
    for key in sa:
        expected = ((sa[key].double() + sb[key].double()) / 2).to(sa[key].dtype)
        assert torch.equal(merged[key], expected), key
    assert not torch.equal(merged["decoder.final_layernorm.weight"],
                           sa["decoder.final_layernorm.weight"])
    # end to end: transformers on the average of the two HF models' weights
    hf = methods_models["hf_a"]
    hf_b = dict(methods_models["hf_b"].named_parameters())
    averaged = type(hf)(hf.config).eval()
    with torch.no_grad():
        for name, p in averaged.named_parameters():
            p.copy_((dict(hf.named_parameters())[name] + hf_b[name]) / 2)
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(40)[None]
    with torch.no_grad():
        ours = load_model(out)(tokens, positions)
    torch.testing.assert_close(ours, hf_logits(averaged, tokens, positions), atol=2e-4, rtol=1e-4)
    # the first input's metadata
    args = load_common(resolve_checkpoint(out))["args"]
    assert args["model"] == load_common(resolve_checkpoint(a))["args"]["model"]


def test_rope_mismatch_is_refused_unless_allowed(methods_models, tmp_path):
    from megatron_longctx.methods.merge_tool import main
    from megatron_longctx.training.checkpoint import load_common, resolve_checkpoint

    a, c = methods_models["a"], methods_models["c"]
    with pytest.raises(SystemExit, match="another RoPE .*rope_theta.*--allow-rope-mismatch"):
        main(["--load", a, c, "--save", str(tmp_path / "refused")])
    with pytest.raises(SystemExit, match="sum to 0.9, not 1"):
        main(["--load", a, c, "--weights", "0.5", "0.4", "--save", str(tmp_path / "refused")])
    assert not os.path.exists(tmp_path / "refused")  # refused before anything is written
    main(["--load", c, a, "--weights", "1", "3", "--normalize", "--allow-rope-mismatch",
          "--save", str(tmp_path / "ca")])
    args = load_common(resolve_checkpoint(str(tmp_path / "ca")))["args"]
    assert args["model"]["rope_parameters"]["rope_theta"] == 500000.0  # the first input's
    # and its tokenizer files, which the merged checkpoint's args now point at
    assert args["data"]["tokenizer_model"] == str(tmp_path / "ca" / "tokenizer")
    assert (tmp_path / "ca" / "tokenizer" / "tokenizer.json").is_file()


def test_tp2_pp2_and_tp1_inputs_merge_to_the_same_tensors(methods_models, methods_tp2, tmp_path):
    from megatron.core import dist_checkpointing

    from megatron_longctx.methods.merge import _Piece, _read, open_input
    from megatron_longctx.methods.merge_tool import main
    from megatron_longctx.model import load_model

    a, b = methods_models["a"], methods_models["b"]
    a2, b2, a_pp2 = methods_tp2["ckpt_a_tp2"], methods_tp2["ckpt_b_tp2"], methods_tp2["ckpt_a_pp2"]
    assert open_input(a2).tensors["output_layer.weight"].global_shape[0] == 512  # TP=2 padding
    assert open_input(a).tensors["output_layer.weight"].global_shape[0] == 384
    merge_checkpoints([a, b], str(tmp_path / "tp1"), [0.25, 0.75])
    merge_checkpoints([a2, b2], str(tmp_path / "tp2"), [0.25, 0.75])
    merge_checkpoints([a_pp2, b2], str(tmp_path / "mixed"), [0.25, 0.75])
    reference = _state(str(tmp_path / "tp1"))
    for name in ("tp2", "mixed"):
        merged = _state(str(tmp_path / name))
        for key, value in reference.items():
            assert torch.equal(merged[key], value), (name, key)
    # written for TP=2: Megatron-LM's padding for TP=2, the same real rows, zero padding
    main(["--load", a2, b, "--weights", "0.25", "0.75", "--save", str(tmp_path / "out_tp2"),
          "--tensor-model-parallel-size", "2"])
    path = os.path.join(tmp_path, "out_tp2", "iter_0000000")
    args = dist_checkpointing.load_common_state_dict(path)["args"]  # as Megatron-LM reads it
    assert args.tensor_model_parallel_size == 2 and args.padded_vocab_size == 512
    assert args.megatron_longctx["parallel"]["tensor_model_parallel_size"] == 2
    written = open_input(path)
    for key in ("output_layer.weight", "embedding.word_embeddings.weight"):
        assert tuple(written.tensors[key].global_shape) == (512, 64)
        rows = _read(written, _Piece(key, None, 512), 0, 512)
        assert torch.equal(rows[:VOCAB], reference[key][:VOCAB]), key
        assert not rows[VOCAB:].any()
    with open(os.path.join(tmp_path, "out_tp2", "latest_checkpointed_iteration.txt")) as f:
        assert json.load(f) == 0
    # and it loads in one process (padding trimmed on load) with the TP=1 merge's logits
    tokens = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "out_tp2"))(tokens),
                                   load_model(str(tmp_path / "tp1"))(tokens), atol=0, rtol=0)
