"""Tokenizers behind one small interface, built by Megatron-LM's ``--tokenizer-type`` names.

Preprocessing, training and inspection only need: ``vocab_size`` (picks the on-disk token
dtype), ``eod`` (the EOS id appended by ``--append-eod`` to end each document), ``tokenize``
(never adds BOS/EOS: document boundaries are the data pipeline's job), a batch path
(``tokenize_batch``) because per-call overhead dominates on short documents, and
``detokenize``. Nothing here downloads: every model is a local file or directory.

Which special tokens ``tokenize`` adds follows Megatron-LM's tokenizer of the same
``--tokenizer-type`` (core_v0.16.1, whose preprocessing builds megatron-core's tokenizers): none,
for every type. With ``legacy=True`` (Megatron-LM's ``--legacy-tokenizer``, its older
``megatron.training.tokenizer`` classes) ``Llama2Tokenizer`` prepends BOS and
``HuggingFaceTokenizer`` adds what the tokenizer's own post-processor adds (BOS for Llama
tokenizers), as there; ``hf_include_special_tokens`` (``--tokenizer-hf-include-special-tokens``)
does the latter alone.

``tokenize_batch_arrays`` returns one int32 array per text. The preprocessing workers use it
so token ids travel from the C++/Rust encoder to the ``.bin`` file without a Python ``int``
per token.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# EOS spellings of common tokenizer families; used only for a bare ``tokenizer.json``, which
# (unlike a saved tokenizer directory) cannot say which of its special tokens is the EOS.
_KNOWN_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")


class Tokenizer(ABC):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int

    @property
    @abstractmethod
    def eod(self) -> int:
        """Id that ends a document (the tokenizer's EOS)."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS."""

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(t) for t in texts]

    def tokenize_batch_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Like ``tokenize_batch`` but one int32 array per text."""
        return [np.asarray(ids, dtype=np.int32) for ids in self.tokenize_batch(texts)]

    @abstractmethod
    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids``."""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0-255 are bytes, then BOS and EOD. The zero-setup default."""

    vocab_size = 258
    bos = 256
    eod = 257  # a class attribute: training code reads ``ByteTokenizer.eod`` without an instance

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def tokenize_batch_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [self.tokenize_array(t) for t in texts]

    def detokenize(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file (e.g. written by ``tools/train_tokenizer.py``).

    Encoding runs on one thread: preprocessing parallelises over ``--workers`` processes, and a
    per-process thread pool on top would oversubscribe the cores.
    """

    def __init__(self, model_path: str, add_bos: bool = False):
        import sentencepiece as spm

        self.add_bos = add_bos  # Megatron-LM's legacy Llama2Tokenizer: BOS before every text
        _require_path(model_path, "SentencePieceTokenizer",
                      "a SentencePiece .model file (tools/train_tokenizer.py writes one)")
        if os.path.isdir(model_path):
            raise ValueError(f"--tokenizer-model {model_path} is a directory; "
                             f"SentencePieceTokenizer needs the .model file inside it.")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_path, num_threads=1)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"--tokenizer-model {model_path} is not a SentencePiece model "
                             f"({exc}); pass the .model file, not the .vocab file.") from exc
        self.model_path = model_path
        self.vocab_size = self._sp.vocab_size()

    @property
    def eod(self) -> int:
        eos = self._sp.eos_id()
        if eos < 0:
            raise ValueError(f"SentencePiece model {self.model_path} has no EOS piece "
                             f"(eos_id=-1), so there is no end-of-document id; retrain it "
                             f"with an EOS (tools/train_tokenizer.py keeps eos_id=2).")
        return eos

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int, add_bos=self.add_bos)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int, num_threads=1, add_bos=self.add_bos)

    def tokenize_batch_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return self._sp.encode(texts, return_type="numpy", num_threads=1, add_bos=self.add_bos)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    """A local transformers tokenizer: a ``save_pretrained`` directory or a ``tokenizer.json``.

    Fast tokenizers encode through their Rust backend directly (what ``tokenizer(texts)`` does
    inside, minus building a ``BatchEncoding`` per document and the too-long-sequence warning).
    Truncation and padding stored in the file are switched off: documents are kept whole.
    """

    def __init__(self, model_path: str, add_special_tokens: bool = False, tokenizer=None):
        self.add_special_tokens = add_special_tokens  # BOS etc. as tokenizer(text) adds them
        if tokenizer is not None:  # built from other files (GPT2BPETokenizer)
            tok = tokenizer
        else:
            tok = _load_hf_tokenizer(model_path)
        self._tok = tok
        self.model_path = model_path
        self.vocab_size = len(tok)  # includes added tokens, as Megatron-LM counts it
        self._backend = getattr(tok, "backend_tokenizer", None) if tok.is_fast else None
        if self._backend is not None:
            self._backend.no_truncation()
            self._backend.no_padding()
            encode_batch = getattr(self._backend, "encode_batch_fast", None)  # no offsets
            self._encode_batch: Callable = encode_batch or self._backend.encode_batch

    @property
    def eod(self) -> int:
        if self._tok.eos_token_id is not None:
            return int(self._tok.eos_token_id)
        vocab = self._tok.get_vocab()
        for token in _KNOWN_EOS_TOKENS:
            if token in vocab:
                return vocab[token]
        raise ValueError(f"tokenizer {self.model_path} defines no EOS token, so there is no "
                         f"end-of-document id; save it with eos_token set (tokenizer_config.json"
                         f" \"eos_token\") or preprocess without --append-eod.")

    def tokenize(self, text: str) -> list[int]:
        specials = self.add_special_tokens
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=specials).ids
        return self._tok.encode(text, add_special_tokens=specials)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        specials = self.add_special_tokens
        if self._backend is not None:
            return [e.ids for e in self._encode_batch(texts, add_special_tokens=specials)]
        return self._tok(texts, add_special_tokens=specials)["input_ids"]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def _load_hf_tokenizer(model_path: str):
    _require_path(model_path, "HuggingFaceTokenizer",
                  "a local tokenizer directory (save_pretrained) or a tokenizer.json; "
                  "nothing is downloaded")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if os.path.isdir(model_path):
            return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        return PreTrainedTokenizerFast(tokenizer_file=model_path)
    except Exception as exc:  # transformers raises OSError, ValueError, JSON errors, ...
        raise ValueError(f"cannot load HuggingFaceTokenizer from --tokenizer-model "
                         f"{model_path}: {exc}. Pass a directory written by "
                         f"save_pretrained or a tokenizer.json file.") from exc


class NullTokenizer(Tokenizer):
    """Megatron-LM's ``NullTokenizer``: text is whitespace-separated token ids, ids ``0..N-1``
    are tokens and ``N`` is the EOD (so the vocabulary holds ``N + 1``); with ``--mock-data``
    or data preprocessed elsewhere."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size + 1
        self._eod = vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        try:
            return [int(t) for t in text.split()]
        except ValueError:
            bad = next(t for t in text.split() if not t.lstrip("-").isdigit())
            raise ValueError(f"NullTokenizer reads whitespace-separated integer token ids, got "
                             f"{bad[:40]!r}") from None

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def _null_tokenizer(model_path: str | None, vocab_size: int | None) -> NullTokenizer:
    if vocab_size is None or vocab_size < 1:
        raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size N (token ids 0..N-1; "
                         "N is the end-of-document id).")
    if model_path:
        raise ValueError(f"--tokenizer-type NullTokenizer takes no --tokenizer-model (got "
                         f"{model_path}).")
    return NullTokenizer(vocab_size)


def _require_path(path: str | None, tokenizer_type: str, what: str) -> None:
    if not path:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model: {what}.")
    if not os.path.exists(path):
        raise ValueError(f"--tokenizer-model {path} does not exist; {tokenizer_type} needs "
                         f"{what}.")


def _byte_tokenizer(model_path: str | None) -> ByteTokenizer:
    if model_path:
        raise ValueError(f"--tokenizer-type ByteTokenizer takes no --tokenizer-model (got "
                         f"{model_path}); drop the flag or pick the tokenizer type the model "
                         f"file belongs to.")
    return ByteTokenizer()


TOKENIZERS: dict[str, Callable[[str | None], Tokenizer]] = {
    "SentencePieceTokenizer": SentencePieceTokenizer,
    "HuggingFaceTokenizer": HuggingFaceTokenizer,
    "ByteTokenizer": _byte_tokenizer,
}
# Megatron-LM's types built from other files or options (more_tokenizers.py)
OTHER_TYPES = ("GPTSentencePieceTokenizer", "Llama2Tokenizer", "GPT2BPETokenizer",
               "TikTokenizer", "NullTokenizer")


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything that picks a tokenizer: Megatron-LM's tokenizer flags. Picklable, so that
    preprocessing workers build their own copy."""

    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_size: int | None = None  # NullTokenizer's ids; TikTokenizer's size
    vocab_file: str | None = None  # GPT2BPETokenizer: vocab.json
    merge_file: str | None = None  # GPT2BPETokenizer: merges.txt
    tiktoken_pattern: str | None = None  # TikTokenizer: "v1" | "v2" (default)
    tiktoken_num_special_tokens: int = 1000
    legacy: bool = False  # Megatron-LM's --legacy-tokenizer
    hf_include_special_tokens: bool = False  # --tokenizer-hf-include-special-tokens

    def build(self) -> Tokenizer:
        kind = self.tokenizer_type
        if kind not in TOKENIZERS and kind not in OTHER_TYPES:
            raise ValueError(f"unknown --tokenizer-type {kind!r}; choose one of "
                             f"{', '.join(tokenizer_types())}.")
        if kind == "HuggingFaceTokenizer":
            return HuggingFaceTokenizer(
                self.tokenizer_model,
                add_special_tokens=self.legacy or self.hf_include_special_tokens)
        if kind == "SentencePieceTokenizer" and self.legacy:
            raise ValueError("--legacy-tokenizer with SentencePieceTokenizer (Megatron-LM's "
                             "legacy class adds <CLS>/<SEP>/<EOD>/<MASK> tokens) is not "
                             "supported; use GPTSentencePieceTokenizer or Llama2Tokenizer.")
        if kind == "NullTokenizer":
            return _null_tokenizer(self.tokenizer_model, self.vocab_size)
        if kind in TOKENIZERS:
            return TOKENIZERS[kind](self.tokenizer_model)
        from megatron_longctx.data.tokenization import more_tokenizers

        return more_tokenizers.build(self)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None,
                    vocab_size: int | None = None, **options) -> Tokenizer:
    """The tokenizer named by Megatron-LM's ``--tokenizer-type``, loaded from local files;
    ``vocab_size``: NullTokenizer's ``--vocab-size``; ``options``: the other
    ``TokenizerSpec`` fields."""
    return TokenizerSpec(tokenizer_type, tokenizer_model, vocab_size, **options).build()


def tokenizer_types() -> Sequence[str]:
    return (*TOKENIZERS, *OTHER_TYPES)
