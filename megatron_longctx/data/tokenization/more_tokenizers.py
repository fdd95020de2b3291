"""Megatron-LM's other ``--tokenizer-type``s, from local files only.

* ``GPTSentencePieceTokenizer``: a SentencePiece ``.model``; no BOS, EOD = its EOS.
* ``Llama2Tokenizer``: the same (megatron-core's SentencePiece library); with ``--legacy-tokenizer``
  BOS before every text, as Megatron-LM's ``_Llama2Tokenizer.tokenize(bos=True)``.
* ``GPT2BPETokenizer``: ``--vocab-file`` vocab.json + ``--merge-file`` merges.txt (byte-level BPE,
  the pipeline of GPT-2's own ``tokenizer.json``: byte-level pre-tokenizer without a prefix
  space, BPE, ``<|endoftext|>`` a special token); EOD = ``<|endoftext|>``. Megatron-LM downloads
  the files when they are not given; here they must be.
* ``TikTokenizer``: Megatron-LM's tiktoken vocabulary (a JSON list of ``{rank, token_bytes,
  token_str}``), ``--tiktoken-pattern v1|v2``, the first ``--tiktoken-num-special-tokens`` ids
  reserved for special tokens (``<unk>``, ``<s>``, ``</s>``, ...: EOD is ``</s>`` = 2) and every
  rank shifted past them. Built by megatron-core's own ``TikTokenTokenizer``; needs ``tiktoken``.
  ``--vocab-size`` defaults to the file's size plus the special tokens, at most 2**17
  (megatron-core's default; it refuses any other size that the file does not fill).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from megatron_longctx.data.tokenization.tokenizers import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    _require_path,
)

if TYPE_CHECKING:
    from megatron_longctx.data.tokenization.tokenizers import TokenizerSpec

_GPT2_EOD = "<|endoftext|>"
_TIKTOKEN_MAX_VOCAB = 2**17  # megatron-core's DEFAULT_TIKTOKEN_MAX_VOCAB


def build(spec: TokenizerSpec) -> Tokenizer:
    kind = spec.tokenizer_type
    if kind == "GPTSentencePieceTokenizer":
        return SentencePieceTokenizer(spec.tokenizer_model)
    if kind == "Llama2Tokenizer":
        return SentencePieceTokenizer(spec.tokenizer_model, add_bos=spec.legacy)
    if kind == "GPT2BPETokenizer":
        return gpt2_bpe_tokenizer(spec.vocab_file, spec.merge_file)
    if kind == "TikTokenizer":
        return TikTokenizer(spec.tokenizer_model, spec.tiktoken_pattern or "v2",
                            spec.vocab_size, spec.tiktoken_num_special_tokens, spec.legacy)
    raise ValueError(f"unknown --tokenizer-type {kind!r}")


def gpt2_bpe_tokenizer(vocab_file: str | None, merge_file: str | None) -> HuggingFaceTokenizer:
    for flag, path, what in (("--vocab-file", vocab_file, "vocab.json"),
                             ("--merge-file", merge_file, "merges.txt")):
        if not path:
            raise ValueError(f"--tokenizer-type GPT2BPETokenizer needs --vocab-file (vocab.json) "
                             f"and --merge-file (merges.txt); {flag} is missing. Nothing is "
                             f"downloaded.")
        if not os.path.isfile(path):
            raise ValueError(f"{flag} {path} does not exist (GPT2BPETokenizer's {what}).")
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    try:
        bpe = RustTokenizer(models.BPE.from_file(vocab_file, merge_file))
    except Exception as exc:  # JSON errors, bad merges lines, ...
        raise ValueError(f"cannot build GPT2BPETokenizer from --vocab-file {vocab_file} and "
                         f"--merge-file {merge_file}: {exc}") from exc
    if bpe.token_to_id(_GPT2_EOD) is None:
        raise ValueError(f"--vocab-file {vocab_file} has no {_GPT2_EOD} token, GPT-2's end of "
                         f"document; is it a GPT-2 vocab.json?")
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=_GPT2_EOD,
                                  bos_token=_GPT2_EOD, unk_token=_GPT2_EOD)
    return HuggingFaceTokenizer(vocab_file, tokenizer=tok)


class TikTokenizer(Tokenizer):
    """Megatron-LM's TikTokenizer (see the module docstring)."""

    def __init__(self, vocab_path: str | None, pattern: str, vocab_size: int | None,
                 num_special_tokens: int, legacy: bool = False):
        try:
            import tiktoken  # noqa: F401
        except ImportError as exc:
            raise ValueError("--tokenizer-type TikTokenizer needs the tiktoken package: "
                             "pip install tiktoken") from exc
        _require_path(vocab_path, "TikTokenizer",
                      "Megatron-LM's tiktoken vocabulary (a JSON list of rank/token_bytes/"
                      "token_str entries)")
        if pattern not in ("v1", "v2"):
            raise ValueError(f"--tiktoken-pattern must be v1 or v2, got {pattern!r}.")
        try:
            with open(vocab_path, encoding="utf-8") as f:
                entries = len(json.load(f))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"--tokenizer-model {vocab_path} is not a JSON tiktoken vocabulary "
                             f"({exc}).") from exc
        if vocab_size is None:
            vocab_size = min(_TIKTOKEN_MAX_VOCAB, entries + num_special_tokens)
        if not num_special_tokens < vocab_size <= entries + num_special_tokens:
            raise ValueError(f"--vocab-size {vocab_size} does not fit {vocab_path}: it must be "
                             f"more than --tiktoken-num-special-tokens {num_special_tokens} and "
                             f"at most {entries + num_special_tokens} (the file's {entries} "
                             f"entries after the special tokens).")
        from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import TikTokenTokenizer

        try:
            self._mcore = TikTokenTokenizer(vocab_path, pattern=pattern, vocab_size=vocab_size,
                                            num_special_tokens=num_special_tokens)
        except (AssertionError, KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"--tokenizer-model {vocab_path} is not a valid Megatron-LM "
                             f"tiktoken vocabulary (entries must be {{rank, token_bytes, "
                             f"token_str}}, rank i at position i, the first 256 the single "
                             f"bytes): {exc!r}") from exc
        self._enc = self._mcore.tokenizer
        self.vocab_size = vocab_size
        self.legacy = legacy  # the legacy class encodes special-token text as ordinary text

    @property
    def eod(self) -> int:
        return self._mcore.eod

    def tokenize(self, text: str) -> list[int]:
        if self.legacy:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special="all")

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        if self.legacy:
            return self._enc.encode_ordinary_batch(texts, num_threads=1)
        return self._enc.encode_batch(texts, num_threads=1, allowed_special="all")

    def tokenize_batch_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.tokenize_batch(texts)]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._mcore.ids_to_text([int(i) for i in ids])
