"""Train a SentencePiece BPE tokenizer on JSONL/Parquet documents (``tools/train_tokenizer.py``).

Settings follow Llama's SentencePiece model, chosen so that encoding is lossless on code and
prose: identity normalization (no NFKC), whitespace kept as is (runs of spaces and indentation
are learnable pieces), digits split, and byte fallback so no character is ever ``<unk>``.
Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 (the EOS used as end of document), no padding piece.

SentencePiece trains on "sentences" of at most ``max_sentence_length`` bytes; whole documents
are far longer, so each document is fed line by line (newlines themselves are then encoded by
byte fallback, as in Llama). Memory is bounded twice: ``max_sentences`` stops reading input
after that many lines, and ``input_sentence_size`` makes SentencePiece keep a uniform random
sample of that many of the lines it is given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from megatron_longctx.data.preprocessing.jsonl_reader import DocumentReader

BYTE_PIECES = 256
BASE_PIECES = 3  # <unk>, <s>, </s>


@dataclass
class SentencePieceTrainConfig:
    inputs: list[str]
    output_prefix: str  # writes {output_prefix}.model and {output_prefix}.vocab
    vocab_size: int = 32000
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    byte_fallback: bool = True
    user_defined_symbols: list[str] = field(default_factory=list)
    max_sentences: int | None = None  # stop reading input after this many lines
    input_sentence_size: int = 10_000_000  # SentencePiece's random sample; 0 = keep all
    character_coverage: float = 0.9999
    max_sentence_length: int = 16384  # bytes; longer lines are dropped by SentencePiece
    num_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed_sentencepiece_size: int = 1_000_000

    def validate(self) -> None:
        minimum = BASE_PIECES + len(self.user_defined_symbols) + (
            BYTE_PIECES if self.byte_fallback else 0) + 1
        if self.vocab_size < minimum:
            raise ValueError(
                f"--vocab-size {self.vocab_size} is too small: the special pieces"
                f"{', the 256 byte pieces (--byte-fallback)' if self.byte_fallback else ''} and "
                f"{len(self.user_defined_symbols)} user-defined symbols alone take "
                f"{minimum - 1}; use at least {minimum} (plus room for the corpus characters)"
                f"{' or pass --no-byte-fallback' if self.byte_fallback else ''}.")
        if self.max_sentences is not None and self.max_sentences < 1:
            raise ValueError(f"--max-sentences must be >= 1, got {self.max_sentences}.")
        if self.input_sentence_size < 0:
            raise ValueError(f"--input-sentence-size must be >= 0 (0 = all), got "
                             f"{self.input_sentence_size}.")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(f"--character-coverage must be in (0, 1], got "
                             f"{self.character_coverage}.")
        for symbol in self.user_defined_symbols:
            if not symbol:
                raise ValueError("--user-defined-symbols has an empty entry (check for a "
                                 "doubled or trailing comma).")
        directory = os.path.dirname(os.path.abspath(self.output_prefix))
        if not os.path.isdir(directory):
            raise ValueError(f"--output-prefix {self.output_prefix}: directory {directory} "
                             f"does not exist; create it first.")


def iter_sentences(reader: DocumentReader, max_sentences: int | None, max_bytes: int
                   ) -> Iterator[str]:
    """Non-blank lines of every document (all keys), at most ``max_sentences`` of them.
    Lines longer than ``max_bytes`` are cut into pieces that SentencePiece accepts."""
    count = 0
    for texts in reader:
        for text in texts:
            for line in text.split("\n"):
                if not line or line.isspace():
                    continue
                # max_bytes counts UTF-8 bytes; a character is at most 4 of them
                step = max_bytes // 4
                for start in range(0, len(line), step) if len(line) > step else (0,):
                    yield line[start:start + step]
                    count += 1
                    if max_sentences is not None and count >= max_sentences:
                        return


def train_sentencepiece(cfg: SentencePieceTrainConfig,
                        log: Callable[[str], None] | None = None) -> str:
    """Train and write ``{output_prefix}.model``/``.vocab``; returns the ``.model`` path."""
    import sentencepiece as spm

    cfg.validate()
    reader = DocumentReader(cfg.inputs, cfg.json_keys, log=log)  # checks inputs first
    sentences = iter_sentences(reader, cfg.max_sentences, cfg.max_sentence_length)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_prefix=cfg.output_prefix,
            model_type="bpe",
            vocab_size=cfg.vocab_size,
            byte_fallback=cfg.byte_fallback,
            user_defined_symbols=cfg.user_defined_symbols,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=cfg.max_sentence_length,
            seed_sentencepiece_size=cfg.seed_sentencepiece_size,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            add_dummy_prefix=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=cfg.num_threads,
            minloglevel=2,  # SentencePiece logs every step at level 0
        )
    except RuntimeError as exc:
        reason = str(exc).rstrip(".")
        raise ValueError(f"SentencePiece training failed: {reason}. If the vocabulary does not "
                         f"fit the corpus, change --vocab-size (or --character-coverage); if no "
                         f"sentences were read, check --input and --json-keys.") from exc
    if log and reader.counter.total:
        log(reader.counter.format())
    return cfg.output_prefix + ".model"
