"""Tokenize JSONL/Parquet corpora into Megatron indexed datasets (``tools/preprocess_data.py``).

Same inputs, flags and output names as Megatron-LM's ``tools/preprocess_data.py``
(``{output_prefix}_{key}_{document|sentence}.{bin,idx}``, one dataset per JSON key), with the
differences that matter at terabyte scale:

* memory stays flat: files are streamed in chunks, and the index is written by the streaming
  ``IndexedDatasetWriter`` instead of megatron-core's list-based builder;
* bad records are skipped and counted by reason (or stop the run with ``strict``), instead of
  crashing the run hours in; an input that yields no document at all is an error, not an empty
  dataset;
* outputs appear atomically at the end, so an interrupted or failed run leaves nothing that
  loads;
* the corpus can be split over machines: ``num_shards``/``shard_index`` (or a Slurm job array)
  make this run one shard, resumable, whose outputs merge (``tools/merge_datasets.py``) into
  the dataset of a one-process run, byte for byte (``megatron_longctx.data.preprocessing.shards``);
* ``partitions`` (Megatron-LM's ``--partitions``) run parallel readers on one node; unlike
  Megatron-LM, which deals lines round-robin to partitions unless ``--keep-sequential-samples``,
  the input order is always kept, so the output equals a one-partition run.

The pipeline of one process is ``megatron_longctx.data.preprocessing.tokenize_pipeline``.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from megatron_longctx.data.formats.doc_stats import LengthStats
from megatron_longctx.data.formats.indexed_writer import (
    IndexedDatasetWriter,
    _pid_alive,
    _temp_owner,
    optimal_dtype,
    remove_stale_temp_files,
)
from megatron_longctx.data.formats.side_data import (
    has_side_data,
    publish_with_side_data,
    side_prefix,
    side_writer,
)
from megatron_longctx.data.preprocessing.jsonl_reader import (
    SKIP_REASONS,
    InputError,
    InputFile,
    SkipCounter,
    check_inputs,
    expand_inputs,
)
from megatron_longctx.data.preprocessing.shards import (
    ShardSummary,
    fingerprint,
    output_record,
    resolve_shard,
    shard_prefix,
    split_inputs,
    summary_path,
)
from megatron_longctx.data.preprocessing.tokenize_pipeline import (
    EncodeOptions,
    EncodeResult,
    PreprocessError,
    die_with_parent,
    encode_to_datasets,
    ordered_results,
    process_pool,
)
from megatron_longctx.data.tokenization.tokenizers import Tokenizer, TokenizerSpec


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
    # Megatron-LM's tokenizer flags (TokenizerSpec)
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None
    tiktoken_pattern: str | None = None
    tiktoken_num_special_tokens: int = 1000
    legacy_tokenizer: bool = False
    hf_include_special_tokens: bool = False
    # Megatron-LM's sentence splitting
    split_sentences: bool = False
    keep_newlines: bool = False
    lang: str = "english"
    # instruction/chat data: values are conversations rendered with this template
    chat_template: str | None = None  # "auto" | "plain" | a Jinja file
    mask_prompt_loss: bool = False  # side data loss_mask: only assistant replies are trained
    # parallel parts: on this node (partitions) and across nodes (shards)
    partitions: int = 1
    keep_sequential_samples: bool = False  # accepted; the input order is always kept
    num_shards: int | None = None
    shard_index: int | None = None

    @property
    def level(self) -> str:
        return "sentence" if self.split_sentences else "document"

    def output_prefixes(self, prefix: str | None = None) -> dict[str, str]:
        """JSON key -> output path prefix, named as Megatron-LM names them."""
        prefix = self.output_prefix if prefix is None else prefix
        return {key: f"{prefix}_{key}_{self.level}" for key in self.json_keys}

    def tokenizer_spec(self) -> TokenizerSpec:
        return TokenizerSpec(self.tokenizer_type, self.tokenizer_model, self.vocab_size,
                             self.vocab_file, self.merge_file, self.tiktoken_pattern,
                             self.tiktoken_num_special_tokens, self.legacy_tokenizer,
                             self.hf_include_special_tokens)


@dataclass
class PreprocessSummary:
    outputs: dict[str, str]  # key -> prefix
    stats: dict[str, LengthStats]  # key -> document lengths as written (EOD included)
    skips: SkipCounter
    records: int  # records kept (= documents per output)
    input_bytes: int
    seconds: float
    note: str = ""  # e.g. which shard, or that it was already finished

    def format(self) -> str:
        secs = max(self.seconds, 1e-9)
        tokens = sum(s.tokens for s in self.stats.values())
        lines = [self.note] if self.note else []
        lines += [f"processed {self.records:,} records, {self.input_bytes / 1e6:,.1f} MB of "
                  f"input in {self.seconds:,.1f} s ({self.records / secs:,.0f} docs/s, "
                  f"{tokens / secs:,.0f} tokens/s, {self.input_bytes / 1e6 / secs:,.2f} MB/s)"]
        for key, prefix in self.outputs.items():
            lines += ["", f"[{key}] {prefix}.bin / {prefix}.idx", self.stats[key].format()]
            if has_side_data(prefix, "loss_mask"):
                lines.insert(-1, f"prompt loss mask: {side_prefix(prefix, 'loss_mask')}.bin/.idx")
        lines += ["", self.skips.format()]
        return "\n".join(lines)


def validate(cfg: PreprocessConfig, env: Mapping[str, str] = os.environ
             ) -> tuple[list[InputFile], Tokenizer, tuple[int, int] | None]:
    """Everything that can fail before tokenizing: flags, inputs, tokenizer, output directory.
    Raises ``ValueError`` (or its subclass ``InputError``) saying what to change."""
    if cfg.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {cfg.workers}.")
    if cfg.partitions < 1:
        raise ValueError(f"--partitions must be >= 1, got {cfg.partitions}.")
    if cfg.workers % cfg.partitions:
        raise ValueError(f"--workers {cfg.workers} must be a multiple of --partitions "
                         f"{cfg.partitions} (each partition gets workers/partitions; "
                         f"as in Megatron-LM).")
    if cfg.log_interval < 1:
        raise ValueError(f"--log-interval must be >= 1, got {cfg.log_interval}.")
    if cfg.chunk_bytes < 1:
        raise ValueError(f"chunk size must be >= 1 byte, got {cfg.chunk_bytes}.")
    if not cfg.json_keys or len(set(cfg.json_keys)) != len(cfg.json_keys):
        raise ValueError(f"--json-keys must name distinct keys, got {cfg.json_keys}.")
    if cfg.keep_newlines and not cfg.split_sentences:
        raise ValueError("--keep-newlines only applies with --split-sentences.")
    if cfg.mask_prompt_loss and cfg.chat_template is None:
        raise ValueError("--mask-prompt-loss needs --chat-template: it masks the prompt turns "
                         "of conversations.")
    if cfg.mask_prompt_loss and cfg.split_sentences:
        raise ValueError("--mask-prompt-loss and --split-sentences do not go together: a "
                         "conversation is not prose to split into sentences.")
    shard = resolve_shard(cfg.num_shards, cfg.shard_index, env)
    files = expand_inputs(cfg.inputs)
    check_inputs(files, cfg.json_keys)
    tokenizer = cfg.tokenizer_spec().build()
    if cfg.append_eod:
        _ = tokenizer.eod  # raises if the tokenizer has no EOS
    if cfg.split_sentences:
        from megatron_longctx.data.preprocessing.sentence_split import pysbd_language

        pysbd_language(cfg.lang)
    _chat_template(cfg, tokenizer)
    _check_output_dir(cfg.output_prefix)
    prefix = cfg.output_prefix if shard is None else shard_prefix(cfg.output_prefix, shard[0])
    for out in cfg.output_prefixes(prefix).values():
        remove_stale_temp_files(out)  # refuses if a live run writes the same prefix
    return files, tokenizer, shard


def _chat_template(cfg: PreprocessConfig, tokenizer: Tokenizer
                   ) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """The resolved ``--chat-template`` and its variables; a template that does not compile
    fails here, before any work."""
    if cfg.chat_template is None:
        return None, ()
    from megatron_longctx.data.preprocessing.chat_render import chat_renderer, resolve_chat_template

    template, variables = resolve_chat_template(cfg.chat_template, tokenizer)
    try:
        chat_renderer(template, variables)([{"role": "user", "content": "test"}])
    except Exception as exc:
        if type(exc).__name__ == "TemplateSyntaxError":
            raise ValueError(f"--chat-template {cfg.chat_template}: not a valid Jinja template "
                             f"({exc}).") from exc
    return template, tuple(sorted(variables.items()))


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


def run_preprocess(cfg: PreprocessConfig, log: Callable[[str], None] | None = None,
                   env: Mapping[str, str] = os.environ) -> PreprocessSummary:
    """Validate, tokenize every input record (of this shard), and publish one dataset per
    JSON key (and, for a shard, its summary)."""
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    files, tokenizer, shard = validate(cfg, env)
    options = EncodeOptions(cfg.tokenizer_spec(), tuple(cfg.json_keys), cfg.append_eod,
                            optimal_dtype(tokenizer.vocab_size).str, cfg.split_sentences,
                            cfg.lang, cfg.keep_newlines, *_chat_template(cfg, tokenizer),
                            cfg.mask_prompt_loss)
    if shard is None:
        portion, prefix, desc, note = files, cfg.output_prefix, "preprocess", ""
    else:
        index, count = shard
        portion = split_inputs(files, count)[index]
        prefix, desc = shard_prefix(cfg.output_prefix, index), f"shard {index}/{count}"
        if cfg.num_shards is None:  # inside a job array: say so, it changes what is read
            say(f"shard {index} of {count}, from the Slurm job array (SLURM_ARRAY_TASK_ID="
                f"{env.get('SLURM_ARRAY_TASK_ID')}); writing {prefix}_*. Outside a sharded "
                f"run, pass --num-shards 1 --shard-index 0.")
        note = f"shard {index} of {count} ({len(portion)} input part(s)) -> {prefix}_*"
        settings = _settings(cfg, files, count, options.chat_template)
        finished = _finished_shard(cfg, index, settings, say)
        if finished is not None:
            return finished
    start = time.perf_counter()
    outputs = cfg.output_prefixes(prefix)
    what = desc if shard is not None else ", ".join(cfg.inputs)

    def on_empty(result: EncodeResult, skips: SkipCounter) -> None:
        if shard is not None and result.seen == 0:
            return  # a shard whose part of the input holds no record: nothing to publish
        raise InputError(_no_document_message(what, result, skips, cfg.json_keys))

    if cfg.partitions == 1:
        result = encode_to_datasets(options, portion, outputs, cfg.workers, cfg.chunk_bytes,
                                    cfg.strict, cfg.progress, desc, cfg.log_interval, log,
                                    on_empty)
        skips = SkipCounter(portion)
        skips.counts, skips.examples = result.skip_counts, result.skip_examples
    else:
        result, skips = _run_partitions(cfg, options, portion, outputs, desc, on_empty)
    seconds = time.perf_counter() - start
    published = outputs if result.published else {}
    if shard is not None:
        index, count = shard
        if not result.published:
            say(f"shard {index} of {count}: its part of the input holds no record; it is "
                f"finished with no dataset")
        ShardSummary(
            index, count, fingerprint(settings), [f.describe() for f in portion],
            {key: output_record(p, result.stats[key].documents, result.stats[key].tokens)
             for key, p in published.items()},
            result.records, sum(s.tokens for s in result.stats.values()), result.input_bytes,
            dict(result.skip_counts), round(seconds, 3)).write(summary_path(cfg.output_prefix,
                                                                            index))
    return PreprocessSummary(published, {k: result.stats[k] for k in published}, skips,
                             result.records, result.input_bytes, seconds, note)


def _settings(cfg: PreprocessConfig, files: Sequence[InputFile], num_shards: int,
              chat_template: str | None) -> dict:
    """What decides a shard's output: equal settings, equal bytes."""
    spec = cfg.tokenizer_spec()
    model_files = [p for p in (spec.tokenizer_model, spec.vocab_file, spec.merge_file) if p]
    return {"inputs": [[f.path, f.size] for f in files], "num_shards": num_shards,
            "keys": cfg.json_keys, "append_eod": cfg.append_eod, "tokenizer": repr(spec),
            "tokenizer_files": [[p, _size(p)] for p in model_files],
            "sentences": [cfg.split_sentences, cfg.lang, cfg.keep_newlines],
            "chat_template": chat_template, "mask_prompt_loss": cfg.mask_prompt_loss}


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path))
                   if os.path.isfile(os.path.join(path, f)))
    return os.path.getsize(path)


def _finished_shard(cfg: PreprocessConfig, index: int, settings: dict,
                    say: Callable[[str], None]) -> PreprocessSummary | None:
    path = summary_path(cfg.output_prefix, index)
    summary = ShardSummary.read(path)
    if summary is None:
        return None
    problem = summary.problem(fingerprint(settings))
    if problem:
        say(f"shard {index}: redoing it, the finished one is not usable ({problem})")
        os.remove(path)  # first, so that a crash now cannot leave old marker + new files
        return None
    say(f"shard {index} of {summary.num_shards} already finished ({path}); skipping it")
    skips = SkipCounter([])
    skips.counts.update(summary.skipped)
    stats = {}
    for key, info in summary.outputs.items():
        stats[key] = LengthStats()
        stats[key].documents, stats[key].tokens = info["documents"], info["tokens"]
    return PreprocessSummary({k: v["prefix"] for k, v in summary.outputs.items()}, stats, skips,
                             summary.documents, summary.input_bytes, summary.seconds,
                             f"shard {index} of {summary.num_shards}: already finished")


def _no_document_message(what: str, result: EncodeResult, skips: SkipCounter,
                         keys: Sequence[str]) -> str:
    if result.seen == 0:
        return (f"no document in {what}: the input holds no record (empty files?); nothing "
                f"was written.")
    reason = max(skips.counts, key=skips.counts.get)
    example = skips.examples[reason][0] if skips.examples[reason] else ""
    hint = {"missing_key": f" Check --json-keys ({' '.join(keys)}).",
            "invalid_json": " Is this JSON lines, uncompressed?",
            "undecodable": " Is the file UTF-8 text?"}.get(reason, "")
    return (f"no document in {what}: all {result.seen:,} records were skipped, "
            f"{skips.counts[reason]:,} for {SKIP_REASONS[reason]} (e.g. {example}).{hint} "
            f"Nothing was written.")


# -- partitions ---------------------------------------------------------------------------------
def _run_partitions(cfg: PreprocessConfig, options: EncodeOptions, portion: list[InputFile],
                    outputs: dict[str, str], desc: str, on_empty
                    ) -> tuple[EncodeResult, SkipCounter]:
    """``cfg.partitions`` processes, each tokenizing a contiguous part with
    workers/partitions workers into a temporary directory; their datasets are then
    concatenated in order into ``outputs``."""
    parts = split_inputs(portion, cfg.partitions)
    first = next(iter(outputs.values()))
    _remove_stale_partition_dirs(first)
    scratch = f"{first}.partitions.tmp-{socket.gethostname()}-{os.getpid()}"
    os.makedirs(scratch)
    try:
        jobs = [(options, part, {k: os.path.join(scratch, f"part{p:05d}_{k}")
                                 for k in outputs},
                 cfg.workers // cfg.partitions, cfg.chunk_bytes, cfg.strict, cfg.progress,
                 f"{desc} part {p}/{cfg.partitions}", cfg.log_interval)
                for p, part in enumerate(parts)]
        with process_pool(cfg.partitions, initializer=die_with_parent) as pool:
            results = list(ordered_results(pool, _run_partition, jobs, cfg.partitions))
        total = EncodeResult(stats={k: LengthStats() for k in outputs})
        skips = SkipCounter(portion)
        for part in results:
            total.records += part.records
            total.seen += part.seen
            total.input_bytes += part.input_bytes
            for key in outputs:
                total.stats[key].merge(part.stats[key])
            skips.absorb(part.skip_counts, part.skip_examples)
        total.skip_counts, total.skip_examples = skips.counts, skips.examples
        if total.records == 0:
            on_empty(total, skips)
            return total, skips
        writers = {k: IndexedDatasetWriter(p, np.dtype(options.dtype))
                   for k, p in outputs.items()}
        masks = {k: side_writer(p, "loss_mask") for k, p in outputs.items()} \
            if options.mask_prompt_loss else {}
        try:
            for (_, _, part_outputs, *_), part in zip(jobs, results):
                if part.published:
                    for key, writer in writers.items():
                        writer.add_index(part_outputs[key])
                        if masks:
                            masks[key].add_index(side_prefix(part_outputs[key], "loss_mask"))
            publish_with_side_data(writers, {"loss_mask": masks} if masks else {})
        finally:
            for writer in [*writers.values(), *masks.values()]:
                writer.abort()
        total.published = True
        return total, skips
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_partition(job) -> EncodeResult:
    options, files, outputs, workers, chunk_bytes, strict, progress, desc, interval = job
    return encode_to_datasets(options, files, outputs, workers, chunk_bytes, strict, progress,
                              desc, interval, on_empty=lambda result, skips: None)


def _remove_stale_partition_dirs(prefix: str) -> None:
    import glob

    for path in glob.glob(f"{glob.escape(prefix)}.partitions.tmp-*"):
        owner = _temp_owner(path)
        if owner and owner[0] == socket.gethostname() and not _pid_alive(owner[1]):
            shutil.rmtree(path, ignore_errors=True)


__all__ = ["PreprocessConfig", "PreprocessError", "PreprocessSummary", "run_preprocess",
           "validate"]
