"""One process's preprocessing pipeline: read a list of inputs, tokenize in worker processes,
write one indexed dataset per JSON key.

The main process reads files into chunks of whole lines (``jsonl_reader.iter_chunks``) and
writes the outputs; ``workers`` processes (each with its own tokenizer) parse, validate and
tokenize a chunk and return token arrays already in the on-disk dtype. Results come back in
input order, so the output does not depend on the number of workers.

Workers run in a ``concurrent.futures.ProcessPoolExecutor``: when one dies (``kill -9``, the
out-of-memory killer) the pool breaks and the run stops at once with a message, instead of
``multiprocessing.Pool``'s silent wait for a result that never comes.

A record is kept only if every ``--json-keys`` key holds usable text, so document ``i`` of
every output dataset comes from the same input record. With ``--split-sentences`` each sentence
is one sequence of its document (Megatron-LM's ``_sentence`` datasets).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np

from megatron_longctx.data.formats.doc_stats import LengthStats
from megatron_longctx.data.formats.indexed_writer import IndexedDatasetWriter
from megatron_longctx.data.formats.side_data import publish_with_side_data, side_writer
from megatron_longctx.data.preprocessing.jsonl_reader import (
    Chunk,
    InputError,
    InputFile,
    Skip,
    SkipCounter,
    iter_chunks,
    parse_chunk,
)
from megatron_longctx.data.tokenization.tokenizers import TokenizerSpec


class PreprocessError(RuntimeError):
    """The run cannot go on (a worker or partition process died); nothing was published."""


class RecordError(ValueError):
    """A record the tokenizer cannot encode (raised in a worker; the main process names the
    file)."""

    def __init__(self, file_index: int, line: int, message: str):
        super().__init__(file_index, line, message)
        self.file_index, self.line, self.message = file_index, line, message


@dataclass(frozen=True)
class EncodeOptions:
    """What a worker needs to turn a chunk into tokens (picklable)."""

    tokenizer: TokenizerSpec
    keys: tuple[str, ...]
    append_eod: bool
    dtype: str  # numpy dtype string of the outputs
    split_sentences: bool = False
    lang: str = "english"
    keep_newlines: bool = False
    chat_template: str | None = None  # Jinja text: values are conversations (chat_render)
    chat_variables: tuple[tuple[str, str], ...] = ()  # the tokenizer's special tokens
    mask_prompt_loss: bool = False  # also write side data loss_mask (chat_loss_mask)


@dataclass
class EncodedChunk:
    file_index: int
    records: int  # records kept
    nbytes: int
    skips: list[Skip]
    tokens: list[np.ndarray]  # per key: [sum(lengths)] ids in the output dtype
    lengths: list[np.ndarray]  # per key: [sequences] int32 tokens per sequence
    sequences: list[np.ndarray | None]  # per key: [records] sequences per document (None: 1)
    masks: list[np.ndarray] | None = None  # per key: [sum(lengths)] uint8 loss mask


class ChunkEncoder:
    """Chunk -> token arrays. Built once per worker process (tokenizer loading is slow)."""

    def __init__(self, options: EncodeOptions):
        self.tokenizer = options.tokenizer.build()
        self.keys = list(options.keys)
        self.dtype = np.dtype(options.dtype)
        self.eod = np.array([self.tokenizer.eod], dtype=np.int32) if options.append_eod else None
        self.render = None
        self.mask_prompt_loss = options.mask_prompt_loss
        if options.chat_template is not None and options.mask_prompt_loss:
            from megatron_longctx.data.preprocessing.chat_loss_mask import masked_chat_renderer

            self.render = masked_chat_renderer(options.chat_template,
                                               dict(options.chat_variables))
        elif options.chat_template is not None:
            from megatron_longctx.data.preprocessing.chat_render import chat_renderer

            self.render = chat_renderer(options.chat_template, dict(options.chat_variables))
        self.splitter = None
        if options.split_sentences:
            from megatron_longctx.data.preprocessing.sentence_split import SentenceSplitter

            self.splitter = SentenceSplitter(options.lang, options.keep_newlines)

    def __call__(self, chunk: Chunk) -> EncodedChunk:
        self._file_index = chunk.file_index  # for RecordError
        parsed = parse_chunk(chunk, self.keys, self.render)
        skips, lines = parsed.skips, parsed.lines
        # per key, per record: token arrays of its sentences (one "sentence" without splitting)
        docs = [self._encode_texts(texts, lines) for texts in parsed.texts]
        keep = np.ones(len(lines), dtype=bool)
        if self.eod is None:
            # text that encodes to nothing would be a zero-length document; drop the record
            for per_key in docs:
                keep &= np.fromiter((len(d) > 0 for d in per_key), bool, len(lines))
            for i in np.nonzero(~keep)[0]:
                skips.append(Skip("empty", lines[i], "text encodes to no tokens"))
            skips.sort(key=lambda s: s.line)
        kept = [i for i in range(len(lines)) if keep[i]]
        masks = [self._masks(texts, per_key, kept) for texts, per_key in
                 zip(parsed.texts, docs)] if self.mask_prompt_loss else None
        tokens, lengths, sequences = [], [], []
        for per_key in docs:
            flat, lens, counts = self._assemble([per_key[i] for i in kept])
            if flat.size and (int(flat.max()) >= self.tokenizer.vocab_size or flat.min() < 0):
                self._raise_out_of_vocab(per_key, kept, lines)
            tokens.append(flat.astype(self.dtype))
            lengths.append(lens)
            sequences.append(counts)
        return EncodedChunk(chunk.file_index, len(kept), chunk.nbytes, skips, tokens, lengths,
                            sequences, masks)

    def _masks(self, texts: list, docs: list[list[np.ndarray]], kept: list[int]) -> np.ndarray:
        """The kept records' loss masks, concatenated as ``_assemble`` lays out their tokens
        (one sequence each: --mask-prompt-loss goes without --split-sentences)."""
        from megatron_longctx.data.preprocessing.chat_loss_mask import token_masks

        empty = np.zeros(0, np.int32)
        ids = [docs[i][0] if docs[i] else empty for i in kept]
        parts = token_masks(self.tokenizer, [texts[i] for i in kept], ids)
        if self.eod is not None:  # the EOD is trained on
            parts = [np.append(m, np.uint8(1)) for m in parts]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)

    def _encode_texts(self, texts: list[str], lines: list[int]) -> list[list[np.ndarray]]:
        if self.splitter is None:
            pieces, owners = texts, None
        else:
            split = [self.splitter.split(t) for t in texts]
            pieces = [s for sentences in split for s in sentences]
            owners = np.repeat(np.arange(len(texts)), [len(s) for s in split])
        try:
            arrays = self.tokenizer.tokenize_batch_arrays(pieces) if pieces else []
        except ValueError:  # find the record and say which (NullTokenizer's non-numbers, ...)
            for line, text in zip(lines, texts):
                try:
                    self.tokenizer.tokenize(text)
                except ValueError as exc:
                    raise RecordError(self._file_index, line, str(exc)) from None
            raise
        if owners is None:
            return [[a] if a.size else [] for a in arrays]
        docs: list[list[np.ndarray]] = [[] for _ in texts]
        for owner, a in zip(owners, arrays):
            if a.size:  # Megatron-LM drops sentences without tokens
                docs[owner].append(a)
        return docs

    def _assemble(self, docs: list[list[np.ndarray]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Concatenate documents (EOD after each if asked); per-sequence lengths; sequences
        per document (None when every document is one sequence)."""
        parts, lens, counts = [], [], []
        for sentences in docs:
            if self.eod is not None:
                sentences = sentences[:-1] + [np.concatenate([sentences[-1], self.eod])] \
                    if sentences else [self.eod]
            parts += sentences
            lens += [s.size for s in sentences]
            counts.append(len(sentences))
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        counts_array = np.asarray(counts, dtype=np.int64)
        one_each = counts_array.size == 0 or bool((counts_array == 1).all())
        return flat, np.asarray(lens, dtype=np.int32), None if one_each else counts_array

    def _raise_out_of_vocab(self, per_key, kept, lines) -> None:
        for i in kept:
            for a in per_key[i]:
                if a.size and (int(a.max()) >= self.tokenizer.vocab_size or a.min() < 0):
                    bad = int(a.min()) if a.min() < 0 else int(a.max())
                    raise RecordError(self._file_index, lines[i],
                                      f"token id {bad} is outside the tokenizer's vocabulary "
                                      f"of {self.tokenizer.vocab_size}")
        raise RecordError(self._file_index, lines[kept[0]],
                          "the end-of-document id is outside the vocabulary")


_worker_encoder: ChunkEncoder | None = None


@contextmanager
def process_pool(workers: int, **kwargs) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` whose processes are killed, not waited for, when the block
    fails (a bad record in strict mode, Ctrl-C, a dead sibling)."""
    pool = ProcessPoolExecutor(workers, **kwargs)
    try:
        yield pool
    except BaseException:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (a ``kill -9`` of the main process
    must not leave tokenizer workers behind)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _init_worker(options: EncodeOptions) -> None:
    global _worker_encoder
    die_with_parent()
    # parallelism comes from the worker processes; a Rust thread pool per worker would
    # oversubscribe the cores (HuggingFace tokenizers only)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops the run
    _worker_encoder = ChunkEncoder(options)


def _encode_in_worker(chunk: Chunk) -> EncodedChunk:
    assert _worker_encoder is not None, "worker not initialised"
    return _worker_encoder(chunk)


def ordered_results(executor: ProcessPoolExecutor, fn: Callable, items: Iterable,
                    ahead: int) -> Iterator:
    """``fn(item)`` for each item in the executor, results in input order, at most ``ahead``
    items in flight (so reading does not run away from tokenizing). A dead worker process
    raises ``PreprocessError``."""
    pending: deque = deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise PreprocessError(f"a worker process died ({_death_cause(executor)}); the run "
                              f"stopped and published nothing. If memory ran out, rerun with "
                              f"fewer --workers or a smaller --chunk-mb.") from None
    finally:
        for future in pending:
            future.cancel()


def _death_cause(executor: ProcessPoolExecutor) -> str:
    # a broken pool SIGTERMs its surviving workers: a SIGTERM status names no culprit
    processes = getattr(executor, "_processes", None) or {}
    for process in list(processes.values()):
        code = process.exitcode
        if code is not None and code < 0 and code != -signal.SIGTERM:
            name = signal.Signals(-code).name
            hint = ": often the out-of-memory killer" if name == "SIGKILL" else ""
            return f"pid {process.pid} was killed by {name}{hint}"
        if code is not None and code > 0:
            return f"pid {process.pid} exited with status {code}"
    return "killed"


@dataclass
class EncodeResult:
    """What one pipeline run produced (picklable: partitions send it back)."""

    records: int = 0  # documents written per key
    seen: int = 0  # records read, kept or skipped
    input_bytes: int = 0
    stats: dict[str, LengthStats] = field(default_factory=dict)
    skip_counts: dict[str, int] = field(default_factory=dict)
    skip_examples: dict[str, list[str]] = field(default_factory=dict)
    published: bool = False


def encode_to_datasets(options: EncodeOptions, files: Sequence[InputFile],
                       outputs: dict[str, str], workers: int, chunk_bytes: int,
                       strict: bool = False, progress: bool = True, desc: str = "preprocess",
                       log_interval: int = 1000, log: Callable[[str], None] | None = None,
                       on_empty: Callable[[EncodeResult, SkipCounter], None] | None = None
                       ) -> EncodeResult:
    """Tokenize ``files`` into ``outputs`` (key -> prefix). Before anything is published,
    ``on_empty(result, skips)`` is called when no record was kept: it raises to fail the run;
    if it returns, nothing is written and ``result.published`` is False."""
    from tqdm import tqdm

    dtype = np.dtype(options.dtype)
    stats = {key: LengthStats() for key in options.keys}
    plain = all(f.format == "jsonl" for f in files)
    total = sum((f.end if f.end is not None else f.size) - f.start for f in files)
    tty = sys.stderr.isatty()
    bar = tqdm(total=total if plain else None, unit="B", unit_scale=True, unit_divisor=1000,
               desc=desc, disable=not progress, mininterval=0.5 if tty else 30.0,
               file=sys.stderr, dynamic_ncols=True)
    skips = SkipCounter(files, strict=strict,
                        log=log or (lambda msg: bar.write(msg, file=sys.stderr)))
    result = EncodeResult(stats=stats)
    start = time.perf_counter()
    pending_bytes = pending_docs = 0
    with bar, ExitStack() as stack:
        writers = {key: stack.enter_context(IndexedDatasetWriter(prefix, dtype))
                   for key, prefix in outputs.items()}
        masks = {key: stack.enter_context(side_writer(prefix, "loss_mask"))
                 for key, prefix in outputs.items()} if options.mask_prompt_loss else {}
        chunks = iter_chunks(files, options.keys, chunk_bytes)
        if workers == 1:
            encoded_chunks: Iterator[EncodedChunk] = map(ChunkEncoder(options), chunks)
        else:
            pool = stack.enter_context(process_pool(workers, initializer=_init_worker,
                                                    initargs=(options,)))
            encoded_chunks = ordered_results(pool, _encode_in_worker, chunks, 2 * workers + 2)
        try:
            for encoded in encoded_chunks:
                skips.add(encoded.file_index, encoded.skips)
                for k, (key, tokens, lengths, counts) in enumerate(zip(
                        options.keys, encoded.tokens, encoded.lengths, encoded.sequences)):
                    writers[key].add_documents(tokens, lengths, counts)
                    if masks:
                        masks[key].add_documents(encoded.masks[k], lengths, counts)
                    stats[key].update(lengths if counts is None
                                      else np.add.reduceat(lengths, _starts(counts)))
                result.records += encoded.records
                result.seen += encoded.records + len(encoded.skips)
                result.input_bytes += encoded.nbytes
                pending_bytes += encoded.nbytes
                pending_docs += encoded.records
                if pending_docs >= log_interval:
                    _show_rates(bar, result.records, stats, start)
                    bar.update(pending_bytes)
                    pending_bytes = pending_docs = 0
        except RecordError as exc:
            where = files[exc.file_index].location(exc.line)
            raise InputError(f"{where}: {exc.message}; fix or remove that record.") from None
        _show_rates(bar, result.records, stats, start)
        bar.update(pending_bytes)
        result.skip_counts, result.skip_examples = skips.counts, skips.examples
        if result.records == 0 and on_empty is not None:
            on_empty(result, skips)
        if result.records:
            publish_with_side_data(writers, {"loss_mask": masks} if masks else {})
            result.published = True
    return result


def _starts(counts: np.ndarray) -> np.ndarray:
    """First sequence of each document, for ``np.add.reduceat`` (documents have >= 1)."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _show_rates(bar, records: int, stats: dict[str, LengthStats], start: float) -> None:
    secs = max(time.perf_counter() - start, 1e-9)
    tokens = sum(s.tokens for s in stats.values())
    bar.set_postfix_str(f"{records / secs:,.0f} docs/s, {tokens / secs / 1e3:,.1f}k tok/s",
                        refresh=False)
