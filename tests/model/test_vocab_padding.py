"""Vocabulary padding as Megatron-LM's (``--make-vocab-size-divisible-by`` x TP); loading
across TP sizes: tests/training/test_megatron_compat.py."""

import pytest
import torch

from megatron_longctx.convert import hf_to_mcore
from megatron_longctx.model import load_model
from megatron_longctx.model.gpt import padded_vocab_size

from convert.hf_models import HF_ROPES, VOCAB, hf_logits, inputs, make_hf_model


def megatron_lm_padding(orig_vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's ``_vocab_size_with_padding`` (megatron/training/tokenizer), written out as
    its loop: the independent reference."""
    after = orig_vocab_size
    multiple = divisible_by * tp
    while after % multiple != 0:
        after += 1
    return after


@pytest.mark.parametrize("vocab,tp,expected", [
    (128256, 1, 128256), (128256, 2, 128256), (128256, 4, 128512), (128256, 8, 129024),
    (32000, 1, 32000), (32000, 8, 32768),
])
def test_padded_vocab_size_is_megatron_lms(vocab, tp, expected):
    assert padded_vocab_size(vocab, tp) == expected == megatron_lm_padding(vocab, 128, tp)


@pytest.mark.parametrize("vocab", [1, 258, 32001, 50257, 151665])
@pytest.mark.parametrize("divisible_by,tp", [(128, 1), (128, 3), (64, 8), (1, 2)])
def test_padded_vocab_size_matches_reference(vocab, divisible_by, tp):
    assert padded_vocab_size(vocab, tp, divisible_by) == megatron_lm_padding(vocab, divisible_by,
                                                                            tp)


def test_converter_takes_any_divisor(single_process_group, tmp_path):
    """--make-vocab-size-divisible-by 512: 250 tokens in 512 rows, stored with the checkpoint's
    args; the converted model still reproduces transformers' logits."""
    hf = make_hf_model(str(tmp_path / "hf"), "llama", HF_ROPES["default"])
    hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "ckpt"), make_vocab_size_divisible_by=512)
    model = load_model(str(tmp_path / "ckpt"))
    assert model.config.make_vocab_size_divisible_by == 512
    assert model.gpt.embedding.word_embeddings.weight.shape[0] == 512 > VOCAB
    tokens, positions = inputs()
    with torch.no_grad():
        ours = model(tokens, positions)
    torch.testing.assert_close(ours, hf_logits(hf, tokens, positions), atol=1e-4, rtol=1e-4)
