"""Greedy decoding with the KV cache equals greedy decoding by full forward passes (default,
HARPE and LongRoPE rotary, the last on both sides of its short/long switch), in one process and
at TP=2 and CP=2; the passkey prompt has the requested length and depth."""

import json
import os

import pytest
import torch
from generation_worker import prompts

from megatron_longctx.config import ModelConfig, RunConfig
from megatron_longctx.eval.generation import greedy_generate
from megatron_longctx.eval.passkey import (
    answer_is_correct,
    passkey_accuracy,
    passkey_prompt,
    trial_key,
)

from distributed import run_torchrun

ORIG = 48
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "harpe": {"rope_type": "harpe", "harpe_bases": [1e4, 3e5]},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0,
                 "short_factor": [1.0 + 0.02 * j for j in range(8)],
                 "long_factor": [1.0 + 0.4 * j for j in range(8)],
                 "original_max_position_embeddings": ORIG},
}
# (prompt, new tokens): LongRoPE's final length below (short factors) and above (long) ORIG
CASES = [(30, 10), (40, 20)]
WORKER = os.path.join(os.path.dirname(__file__), "generation_worker.py")


def model_config(rope) -> ModelConfig:
    # a large init std gives peaked, well-separated logits, so greedy choices are not ties
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                       num_query_groups=2, vocab_size=258, max_position_embeddings=4 * ORIG,
                       rope_parameters=rope, init_method_std=0.2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, single_process_group):
    from megatron_longctx.config import ParallelConfig
    from megatron_longctx.model.gpt import build_model
    from megatron_longctx.parallel.initialize import initialize_model_parallel
    from megatron_longctx.training.checkpoint import save_weights

    root = tmp_path_factory.mktemp("generation")
    paths = {}
    for name, rope in ROPES.items():
        initialize_model_parallel(ParallelConfig(), seed=7)
        cfg = RunConfig()
        cfg.model = model_config(rope)
        paths[name] = save_weights(build_model(cfg.model, cfg.parallel), cfg, str(root / name))
    return {name: os.path.dirname(path) for name, path in paths.items()}


def full_forward_greedy(model, prompt, new_tokens):
    """The reference: re-run the whole sequence for every token (same final RoPE length)."""
    final = prompt.shape[1] + new_tokens
    ids, logits = prompt, []
    for _ in range(new_tokens):
        step = model(ids, rope_seq_len=final)[:, -1]  # [b, vocab]
        logits.append(step)
        ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:], torch.stack(logits, dim=1)


@pytest.mark.parametrize("rope", list(ROPES))
def test_kv_cache_decoding_equals_full_forward(checkpoints, rope):
    from megatron_longctx.model import KVCache, load_model

    model = load_model(checkpoints[rope])
    for length, new in CASES:
        prompt = prompts(3, length, seed=length)
        expected, expected_logits = full_forward_greedy(model, prompt, new)
        assert torch.equal(greedy_generate(model, prompt, new), expected), (rope, length)
        # the cached logits themselves, step by step
        cache = KVCache(length + new)
        logits = [model.next_token_logits(prompt, cache, length + new)]
        for i in range(new - 1):
            logits.append(model.next_token_logits(expected[:, i:i + 1], cache, length + new))
        # float32, O(1) logits: the cached step reduces over keys in another order than the
        # full forward (seen: 1.1e-5), an error in the cache would be O(0.1)
        torch.testing.assert_close(torch.stack(logits, 1), expected_logits, rtol=1e-5,
                                   atol=5e-5)
        assert len(set(expected.flatten().tolist())) > 3  # not a degenerate constant output


def test_stop_ids_end_generation_and_cache_bounds(checkpoints):
    from megatron_longctx.model import KVCache, load_model

    model = load_model(checkpoints["default"])
    prompt = prompts(1, 20, seed=1)
    full = greedy_generate(model, prompt, 8)
    stopped = greedy_generate(model, prompt, 8, stop_ids=[int(full[0, 2])])
    assert torch.equal(stopped, full[:, :int((full[0] == full[0, 2]).nonzero()[0]) + 1])
    with pytest.raises(ValueError, match="KV cache holds 10 tokens"):
        model.next_token_logits(prompt, KVCache(10), 10)


def test_parallel_layouts_generate_like_one_process(checkpoints, tmp_path):
    """TP=2 and CP=2 (prefill split across ranks, odd prompt length: padded) give the
    single-process logits within 1e-4 and its tokens wherever the top-2 margin > 1e-3;
    perplexity scoring at CP=2 equals one process."""
    from megatron_longctx.eval import token_nll
    from megatron_longctx.model import load_model

    out = str(tmp_path / "results.json")
    run_torchrun(WORKER, 2, json.dumps(checkpoints), out)
    with open(out) as f:
        results = json.load(f)
    for rope, ckpt in checkpoints.items():
        model = load_model(ckpt)
        prompt = prompts(2, 37, seed=5)
        tokens, logits = full_forward_greedy(model, prompt, 9)
        top2 = logits.topk(2, dim=-1).values
        sure = (top2[..., 0] - top2[..., 1]) > 1e-3  # [b, n]
        nll = token_nll(model, prompts(2, 45, seed=6))
        for layout in ("tp2", "cp2"):
            got = results[layout][rope]
            torch.testing.assert_close(torch.tensor(got["logits"]), logits, rtol=0, atol=1e-4)
            got_tokens = torch.tensor(got["tokens"])
            assert torch.equal(got_tokens[sure], tokens[sure]), (layout, rope)
            torch.testing.assert_close(torch.tensor(got["nll"]), nll, rtol=0, atol=1e-4)


class WordTokenizer:
    """Whitespace words and punctuation as tokens, over a growing vocabulary."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def tokenize(self, text):
        import re

        return [self.vocab.setdefault(w, len(self.vocab))
                for w in re.findall(r"\d+|\w+|[^\w\s]", text)]

    def detokenize(self, ids):
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids)


@pytest.mark.parametrize("length", [120, 333, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.77, 1.0])
def test_passkey_prompt_length_and_depth(length, depth):
    tok = WordTokenizer()
    prompt = passkey_prompt(tok, length, depth, key=4321)
    assert abs(len(prompt.ids) - length) <= 0.01 * length
    # find the needle independently: the key's token, then count filler tokens before it
    needle = tok.tokenize(" The pass key is 4321")
    start = next(i for i in range(len(prompt.ids)) if prompt.ids[i:i + len(needle)] == needle)
    intro = len(tok.tokenize(
        "There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about the important information there."))
    needle_len = len(tok.tokenize(" The pass key is 4321. Remember it. 4321 is the pass key."))
    filler = length - intro - needle_len - len(tok.tokenize(" What is the pass key? The pass "
                                                            "key is"))
    assert abs((start - intro) / filler - depth) <= 0.01
    assert tok.detokenize(prompt.ids[-6:]).endswith("The pass key is")
    with pytest.raises(ValueError, match="needs more than"):
        passkey_prompt(tok, 40, 0.5, key=1)


def test_passkey_answer_scoring():
    assert answer_is_correct(" 4321. Remember", 4321)
    assert answer_is_correct("4321", 4321)
    assert not answer_is_correct(" 43210.", 4321)  # near miss: an extra digit
    assert not answer_is_correct(" 432.", 4321)
    assert not answer_is_correct(" 1234 4321", 4321)  # the first number counts
    assert not answer_is_correct(" the key", 4321)
    assert trial_key(0, 512, 0.5, 3) == trial_key(0, 512, 0.5, 3) != trial_key(1, 512, 0.5, 3)


class Copycat(torch.nn.Module):
    """Answers every step with the token ``shift`` places after the first "key is": the key
    itself for ``shift=0`` (a perfect passkey model), the "." after it for ``shift=1``."""

    def __init__(self, tok, shift=0):
        super().__init__()
        self.tok, self.shift = tok, shift
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def next_token_logits(self, ids, cache, rope_seq_len):
        self.history = ids if cache.offset == 0 else torch.cat([self.history, ids], dim=1)
        cache.offset += ids.shape[1]
        key, is_ = self.tok.vocab["key"], self.tok.vocab["is"]
        row = self.history[0]
        at = next(i for i in range(len(row) - 1) if row[i] == key and row[i + 1] == is_)
        logits = torch.zeros(ids.shape[0], 1000)
        logits[torch.arange(ids.shape[0]), self.history[:, at + 2 + self.shift]] = 1.0
        return logits


def test_passkey_accuracy_counts_correct_answers():
    tok = WordTokenizer()
    for shift, accuracy in ((0, 1.0), (1, 0.0)):
        result = passkey_accuracy(Copycat(tok, shift), tok, [200], [0.0, 1.0], trials=3)
        assert result == {200: {0.0: accuracy, 1.0: accuracy}}
