"""Tokenize JSONL/Parquet corpora into Megatron indexed datasets (``tools/preprocess_data.py``).

Same inputs, flags and output names as Megatron-LM's ``tools/preprocess_data.py``
(``{output_prefix}_{key}_document.{bin,idx}``, one dataset per JSON key), with three
differences that matter at terabyte scale:

* memory stays flat: files are streamed in chunks, and the index is written by the streaming
  ``IndexedDatasetWriter`` instead of megatron-core's list-based builder;
* bad records are skipped and counted by reason (or stop the run with ``strict``), instead of
  crashing the run hours in;
* outputs appear atomically at the end, so an interrupted run leaves nothing that loads.

Work split: the main process reads files into chunks of whole lines and writes the outputs;
``workers`` processes (each with its own tokenizer) parse, validate and tokenize a chunk and
return token arrays already in the on-disk dtype. Chunks come back in input order (``imap``),
so the output does not depend on the number of workers.

A record is kept only if every ``--json-keys`` key holds usable text, so document ``i`` of
every output dataset comes from the same input record.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing import Pool

import numpy as np

from megatron_longctx.data.doc_stats import LengthStats
from megatron_longctx.data.indexed_writer import (
    IndexedDatasetWriter,
    optimal_dtype,
    remove_stale_temp_files,
)
from megatron_longctx.data.jsonl_reader import (
    Chunk,
    InputFile,
    Skip,
    SkipCounter,
    check_inputs,
    expand_inputs,
    iter_chunks,
    parse_chunk,
)
from megatron_longctx.data.tokenizers import Tokenizer, build_tokenizer


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: str | None = None
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1
    strict: bool = False
    log_interval: int = 1000  # documents between progress-bar updates
    chunk_bytes: int = 1 << 20  # input bytes per unit of work sent to a worker
    progress: bool = True

    def output_prefixes(self) -> dict[str, str]:
        """JSON key -> output path prefix, named as Megatron-LM names them."""
        return {key: f"{self.output_prefix}_{key}_document" for key in self.json_keys}


@dataclass
class PreprocessSummary:
    outputs: dict[str, str]  # key -> prefix
    stats: dict[str, LengthStats]  # key -> document lengths as written (EOD included)
    skips: SkipCounter
    records: int  # records kept (= documents per output)
    input_bytes: int
    seconds: float

    def format(self) -> str:
        secs = max(self.seconds, 1e-9)
        tokens = sum(s.tokens for s in self.stats.values())
        lines = [f"processed {self.records:,} records, {self.input_bytes / 1e6:,.1f} MB of input "
                 f"in {self.seconds:,.1f} s ({self.records / secs:,.0f} docs/s, "
                 f"{tokens / secs:,.0f} tokens/s, {self.input_bytes / 1e6 / secs:,.2f} MB/s)"]
        for key, prefix in self.outputs.items():
            lines += ["", f"[{key}] {prefix}.bin / {prefix}.idx", self.stats[key].format()]
        lines += ["", self.skips.format()]
        return "\n".join(lines)


def validate(cfg: PreprocessConfig) -> tuple[list[InputFile], Tokenizer]:
    """Everything that can fail before tokenizing: flags, inputs, tokenizer, output directory.
    Raises ``ValueError`` (or its subclass ``InputError``) saying what to change."""
    if cfg.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {cfg.workers}.")
    if cfg.log_interval < 1:
        raise ValueError(f"--log-interval must be >= 1, got {cfg.log_interval}.")
    if cfg.chunk_bytes < 1:
        raise ValueError(f"chunk size must be >= 1 byte, got {cfg.chunk_bytes}.")
    if not cfg.json_keys or len(set(cfg.json_keys)) != len(cfg.json_keys):
        raise ValueError(f"--json-keys must name distinct keys, got {cfg.json_keys}.")
    files = expand_inputs(cfg.inputs)
    check_inputs(files, cfg.json_keys)
    tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model)
    if cfg.append_eod:
        _ = tokenizer.eod  # raises if the tokenizer has no EOS
    _check_output_dir(cfg.output_prefix)
    for prefix in cfg.output_prefixes().values():
        remove_stale_temp_files(prefix)  # refuses if a live run writes the same prefix
    return files, tokenizer


def _check_output_dir(output_prefix: str) -> None:
    directory = os.path.dirname(os.path.abspath(output_prefix))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"--output-prefix {output_prefix}: {directory} is a file, not a "
                         f"directory.")
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write to the output directory {directory} ({exc.strerror});"
                         f" pick a writable --output-prefix.") from exc


@dataclass
class EncodedChunk:
    file_index: int
    records: int  # records kept
    nbytes: int
    skips: list[Skip]
    tokens: list[np.ndarray]  # per key: [sum(lengths)] ids in the output dtype
    lengths: list[np.ndarray]  # per key: [records] int32 tokens per document


class ChunkEncoder:
    """Chunk -> token arrays. Built once per worker process (tokenizer loading is slow)."""

    def __init__(self, tokenizer_type: str, tokenizer_model: str | None, keys: Sequence[str],
                 append_eod: bool, dtype: str):
        self.tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
        self.keys = list(keys)
        self.dtype = np.dtype(dtype)
        self.eod = np.array([self.tokenizer.eod], dtype=np.int32) if append_eod else None

    def __call__(self, chunk: Chunk) -> EncodedChunk:
        parsed = parse_chunk(chunk, self.keys)
        skips = parsed.skips
        arrays = [self.tokenizer.tokenize_batch_arrays(texts) for texts in parsed.texts]
        count = len(parsed.lines)
        if self.eod is None and count:
            # text that encodes to nothing would be a zero-length document; drop the record
            empty = np.zeros(count, dtype=bool)
            for per_key in arrays:
                empty |= np.fromiter((a.size == 0 for a in per_key), bool, count)
            if empty.any():
                for i in np.nonzero(empty)[0]:
                    skips.append(Skip("empty", parsed.lines[i], "text encodes to no tokens"))
                skips.sort(key=lambda s: s.line)
                keep = np.nonzero(~empty)[0]
                arrays = [[per_key[i] for i in keep] for per_key in arrays]
                count = keep.size
        tokens, lengths = [], []
        for per_key in arrays:
            lens = np.fromiter((a.size for a in per_key), np.int64, len(per_key))
            if self.eod is not None:
                per_key = [part for a in per_key for part in (a, self.eod)]
                lens += 1
            flat = np.concatenate(per_key) if per_key else np.zeros(0, np.int32)
            if flat.size and (int(flat.max()) >= self.tokenizer.vocab_size or flat.min() < 0):
                bad = int(flat.min()) if flat.min() < 0 else int(flat.max())
                raise ValueError(f"the tokenizer produced id {bad} outside its "
                                 f"vocab_size {self.tokenizer.vocab_size}; the output dtype "
                                 f"{self.dtype} is chosen from vocab_size, so it must be right.")
            tokens.append(flat.astype(self.dtype))
            lengths.append(lens.astype(np.int32))
        return EncodedChunk(chunk.file_index, count, chunk.nbytes, skips, tokens, lengths)


_worker_encoder: ChunkEncoder | None = None


def _init_worker(*args) -> None:
    global _worker_encoder
    # parallelism comes from the worker processes; a Rust thread pool per worker would
    # oversubscribe the cores (HuggingFace tokenizers only)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker_encoder = ChunkEncoder(*args)


def _encode_in_worker(chunk: Chunk) -> EncodedChunk:
    assert _worker_encoder is not None, "worker not initialised"
    return _worker_encoder(chunk)


def _encoded_chunks(cfg: PreprocessConfig, files: Sequence[InputFile], dtype: np.dtype,
                    stack: ExitStack) -> Iterator[EncodedChunk]:
    args = (cfg.tokenizer_type, cfg.tokenizer_model, cfg.json_keys, cfg.append_eod, dtype.str)
    chunks = iter_chunks(files, cfg.json_keys, cfg.chunk_bytes)
    if cfg.workers == 1:
        return map(ChunkEncoder(*args), chunks)
    pool = stack.enter_context(Pool(cfg.workers, initializer=_init_worker, initargs=args))
    # imap keeps input order; the pipe to the workers bounds how far reading runs ahead
    return pool.imap(_encode_in_worker, chunks, chunksize=1)


def run_preprocess(cfg: PreprocessConfig, log: Callable[[str], None] | None = None
                   ) -> PreprocessSummary:
    """Validate, tokenize every input record, and publish one dataset per JSON key."""
    from tqdm import tqdm

    files, tokenizer = validate(cfg)
    dtype = optimal_dtype(tokenizer.vocab_size)
    outputs = cfg.output_prefixes()
    stats = {key: LengthStats() for key in cfg.json_keys}
    plain = all(f.format == "jsonl" for f in files)
    tty = sys.stderr.isatty()
    bar = tqdm(total=sum(f.size for f in files) if plain else None, unit="B", unit_scale=True,
               unit_divisor=1000, desc="preprocess", disable=not cfg.progress,
               mininterval=0.5 if tty else 30.0, file=sys.stderr, dynamic_ncols=True)
    skips = SkipCounter(files, strict=cfg.strict,
                        log=log or (lambda msg: bar.write(msg, file=sys.stderr)))
    start = time.perf_counter()
    records = input_bytes = pending_bytes = pending_docs = 0
    with bar, ExitStack() as stack:
        writers = {key: stack.enter_context(IndexedDatasetWriter(prefix, dtype))
                   for key, prefix in outputs.items()}
        for encoded in _encoded_chunks(cfg, files, dtype, stack):
            skips.add(encoded.file_index, encoded.skips)
            for key, tokens, lengths in zip(cfg.json_keys, encoded.tokens, encoded.lengths):
                writers[key].add_documents(tokens, lengths)
                stats[key].update(lengths)
            records += encoded.records
            input_bytes += encoded.nbytes
            pending_bytes += encoded.nbytes
            pending_docs += encoded.records
            if pending_docs >= cfg.log_interval:
                _show_rates(bar, records, stats, start)
                bar.update(pending_bytes)
                pending_bytes = pending_docs = 0
        _show_rates(bar, records, stats, start)
        bar.update(pending_bytes)
        for writer in writers.values():
            writer.finalize()
    return PreprocessSummary(outputs, stats, skips, records, input_bytes,
                             time.perf_counter() - start)


def _show_rates(bar, records: int, stats: dict[str, LengthStats], start: float) -> None:
    secs = max(time.perf_counter() - start, 1e-9)
    tokens = sum(s.tokens for s in stats.values())
    bar.set_postfix_str(f"{records / secs:,.0f} docs/s, {tokens / secs / 1e3:,.1f}k tok/s",
                        refresh=False)

