"""Stream documents out of JSONL (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``) and Parquet files.

Reading is split in two so that preprocessing can spread the work over processes:

* the main process cuts each file into ``Chunk``s of whole lines (``iter_chunks``: a block read,
  a search for the last newline and a newline count for line numbers; no per-line Python), and
* workers turn a chunk into documents (``parse_chunk``: UTF-8 decoding, JSON parsing and
  validation of each line).

No file is ever loaded whole; memory is a few chunks regardless of corpus size. Which files,
what they hold and how their bytes are read (decompressed, checked, split into ranges) is
``megatron_longctx.data.preprocessing.input_files``.

A bad record is skipped and counted by reason (``SKIP_REASONS``); ``SkipCounter`` keeps the
counts and the first few locations as ``file:line``, or raises ``InputError`` at the first
malformed record in strict mode. Empty documents are not malformed (real corpora have them), so
they are skipped and counted even in strict mode.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_longctx.data.preprocessing.input_files import (  # noqa: F401  (re-exported)
    InputError,
    InputFile,
    check_inputs,
    expand_inputs,
    import_parquet,
    import_zstandard,
    input_format,
    iter_blocks,
)

# reason -> what the summary calls it
SKIP_REASONS = {
    "invalid_json": "invalid JSON",
    "missing_key": "missing key",
    "non_string": "value is not a string",
    "undecodable": "undecodable bytes / invalid Unicode",
    "empty": "empty or whitespace-only document",
    "bad_chat": "not a conversation (--chat-template)",
}
STRICT_REASONS = frozenset(SKIP_REASONS) - {"empty"}

@dataclass
class Chunk:
    """Whole records of one file: the unit of work sent to a worker."""

    file_index: int
    format: str
    first_line: int  # 1-based line (JSONL) or row (Parquet) of the first record
    num_lines: int
    nbytes: int  # uncompressed input bytes covered (for MB/s)
    payload: Any  # bytes of complete lines (JSONL) or a pyarrow.RecordBatch (Parquet)


@dataclass
class Skip:
    reason: str  # a key of SKIP_REASONS
    line: int  # 1-based line or row in its file
    detail: str  # what is wrong with this record


@dataclass
class ParsedChunk:
    texts: list[list[str]]  # [key][record]: records whose every key holds usable text
    lines: list[int]  # line of each kept record
    skips: list[Skip] = field(default_factory=list)


def iter_chunks(files: Sequence[InputFile], keys: Sequence[str],
                chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """Cut every file into chunks of about ``chunk_bytes`` uncompressed bytes of whole records.

    A chunk never spans two files, so each record keeps its own file and line number.
    """
    for index, f in enumerate(files):
        if f.format == "parquet":
            yield from _parquet_chunks(index, f, keys, chunk_bytes)
        else:
            yield from _jsonl_chunks(index, f, chunk_bytes)


def _jsonl_chunks(index: int, f: InputFile, chunk_bytes: int) -> Iterator[Chunk]:
    line = 1
    rest = b""
    try:
        for block in iter_blocks(f, chunk_bytes):
            buf = rest + block if rest else block
            cut = buf.rfind(b"\n") + 1
            if cut == 0:  # a line longer than chunk_bytes: keep reading
                rest = buf
                continue
            payload, rest = buf[:cut], buf[cut:]
            n = payload.count(b"\n")
            yield Chunk(index, f.format, line, n, len(payload), payload)
            line += n
    except _read_errors(f) as exc:
        raise InputError(f"cannot read {f.path} after line {line - 1}: {exc}; the file is "
                         f"truncated or corrupt. Re-create it, or leave it out of --input."
                         ) from exc
    if rest:  # last line without a trailing newline
        yield Chunk(index, f.format, line, 1, len(rest), rest)


def _read_errors(f: InputFile) -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    if f.format == "zst":
        errors += (import_zstandard(f.path).ZstdError,)
    return errors


def _parquet_chunks(index: int, f: InputFile, keys: Sequence[str],
                    chunk_bytes: int) -> Iterator[Chunk]:
    pq = import_parquet(f.path)
    parquet = pq.ParquetFile(f.path)
    meta = parquet.metadata
    groups = list(range(f.start, meta.num_row_groups if f.end is None else f.end))
    if not groups:
        return
    # rows per batch from the file's own statistics, so a batch is about chunk_bytes of text
    total = sum(meta.row_group(g).total_byte_size for g in groups)
    num_rows = sum(meta.row_group(g).num_rows for g in groups)
    rows = max(1, int(chunk_bytes * max(num_rows, 1) / max(total, 1)))
    row = f.first_row
    for batch in parquet.iter_batches(batch_size=rows, row_groups=groups, columns=list(keys)):
        yield Chunk(index, f.format, row, batch.num_rows, batch.nbytes, batch)
        row += batch.num_rows


def parse_chunk(chunk: Chunk, keys: Sequence[str],
                render: Callable[[list], str] | None = None) -> ParsedChunk:
    """Validate the records of a chunk; runs in the workers. ``render``: values are
    conversations, rendered to text by it (``chat_render``)."""
    if chunk.format == "parquet":
        columns = [chunk.payload.column(k).to_pylist() for k in keys]
        records: Iterator[tuple[int, Any]] = (
            (i, [col[i] for col in columns]) for i in range(chunk.num_lines))
        return _validate(records, chunk.first_line, keys, from_json=False, render=render)
    lines = chunk.payload.split(b"\n")
    if lines[-1] == b"":  # the payload's final newline
        lines.pop()
    return _validate(enumerate(lines), chunk.first_line, keys, from_json=True, render=render)


def _validate(records: Iterator[tuple[int, Any]], first_line: int, keys: Sequence[str],
              from_json: bool, render: Callable[[list], str] | None = None) -> ParsedChunk:
    out = ParsedChunk(texts=[[] for _ in keys], lines=[])
    for i, record in records:
        line = first_line + i
        if from_json:
            record, problem = _parse_json_line(record, keys, chat=render is not None)
            if problem:
                out.skips.append(Skip(problem[0], line, problem[1]))
                continue
        if render is not None:
            record, problem = _render_chats(keys, record, render)
            if problem:
                out.skips.append(Skip(problem[0], line, problem[1]))
                continue
        problem = None
        for key, value in zip(keys, record):
            problem = _check_text(key, value, from_json)
            if problem:
                break
        if problem:
            out.skips.append(Skip(problem[0], line, problem[1]))
            continue
        for texts, value in zip(out.texts, record):
            texts.append(value)
        out.lines.append(line)
    return out


def _render_chats(keys: Sequence[str], record: list, render: Callable[[list], str]
                  ) -> tuple[list, tuple[str, str] | None]:
    from megatron_longctx.data.preprocessing.chat_render import as_messages

    texts = []
    for key, value in zip(keys, record):
        messages, why = as_messages(value, None)
        if why:
            return record, ("bad_chat", f"key {key!r}: {why}")
        try:
            texts.append(render(messages))
        except Exception as exc:  # the template's raise_exception(), undefined variables, ...
            return record, ("bad_chat", f"key {key!r}: the chat template failed: {exc}")
    return texts, None


def _parse_json_line(raw: bytes, keys: Sequence[str], chat: bool = False
                     ) -> tuple[list[Any] | None, tuple[str, str] | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, ("undecodable", f"line is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at "
                                     f"column {exc.start + 1}); re-encode the file as UTF-8")
    if not text or text.isspace():
        return None, ("empty", "blank line")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        where = (f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "")
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        return None, ("invalid_json", f"invalid JSON: {msg}{where}")
    if not isinstance(obj, dict):
        return None, ("invalid_json", f"expected a JSON object like {{\"{keys[0]}\": \"...\"}}, "
                                      f"got a JSON {_json_type(obj)}")
    values = []
    for key in keys:
        if key not in obj and chat:
            from megatron_longctx.data.preprocessing.chat_render import as_messages

            messages, _ = as_messages(None, obj)  # prompt/response keys instead
            if messages is not None:
                values.append(messages)
                continue
        if key not in obj:
            shown = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            alternative = " (or prompt and response strings)" if chat else ""
            return None, ("missing_key", f"no key {key!r}{alternative} (keys present: "
                                         f"{shown}); choose the text key with --json-keys")
        values.append(obj[key])
    return values, None


def _check_text(key: str, value: Any, from_json: bool) -> tuple[str, str] | None:
    if not isinstance(value, str):
        kind = _json_type(value) if from_json else type(value).__name__
        if value is None:
            return "non_string", f"key {key!r} is null, expected a string"
        hint = (" (lists of sentences, Megatron-LM's --split-sentences input, are not "
                "supported: join them into one string)" if isinstance(value, list) else "")
        return "non_string", f"key {key!r} holds a {kind}, expected a string{hint}"
    if not value.isascii():  # O(1) for CPython's compact strings: only non-ASCII text pays
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return "undecodable", (f"key {key!r} contains a lone surrogate "
                                   f"(\\u{ord(value[exc.start]):04x} at character {exc.start}), "
                                   f"which is not valid Unicode text")
    if not value or value.isspace():
        return "empty", f"key {key!r} is empty or whitespace-only"
    return None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class SkipCounter:
    """Counts skipped records by reason and keeps the first few locations.

    ``strict``: raise ``InputError`` at the first malformed record (``STRICT_REASONS``).
    ``log``: called with a one-line report for each of the first ``max_examples`` skips per
    reason (e.g. ``tqdm.write``), so problems show up while a long run is still going.
    """

    def __init__(self, files: Sequence[InputFile], strict: bool = False, max_examples: int = 3,
                 log: Callable[[str], None] | None = None):
        self.files = files
        self.strict = strict
        self.max_examples = max_examples
        self.log = log
        self.counts = {reason: 0 for reason in SKIP_REASONS}
        self.examples: dict[str, list[str]] = {reason: [] for reason in SKIP_REASONS}

    def add(self, file_index: int, skips: Sequence[Skip]) -> None:
        f = self.files[file_index]
        for skip in skips:
            where = f.location(skip.line)
            if self.strict and skip.reason in STRICT_REASONS:
                raise InputError(
                    f"{where}: {skip.detail}. --strict stops at the first bad record; fix the "
                    f"input, or run without --strict to skip bad records (they are counted by "
                    f"reason and the first few are reported).")
            self.counts[skip.reason] += 1
            if len(self.examples[skip.reason]) < self.max_examples:
                message = f"{where}: {skip.detail}"
                self.examples[skip.reason].append(message)
                if self.log:
                    self.log(f"skipped {message}")

    def absorb(self, counts: dict[str, int], examples: dict[str, list[str]]) -> None:
        """Add the counts and examples of another counter (a partition's)."""
        for reason, count in counts.items():
            self.counts[reason] += count
            room = self.max_examples - len(self.examples[reason])
            self.examples[reason] += examples.get(reason, [])[:max(0, room)]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def format(self) -> str:
        lines = [f"skipped records: {self.total:,}"]
        for reason, label in SKIP_REASONS.items():
            lines.append(f"  {label:<38s} {self.counts[reason]:>12,}")
            lines += [f"      e.g. {example}" for example in self.examples[reason]]
        return "\n".join(lines)


def iter_records(files: Sequence[InputFile], keys: Sequence[str], counter: SkipCounter,
                 chunk_bytes: int = 1 << 20) -> Iterator[list[str]]:
    """Texts (one per key) of each valid record, in order, in this process."""
    for chunk in iter_chunks(files, keys, chunk_bytes):
        parsed = parse_chunk(chunk, keys)
        counter.add(chunk.file_index, parsed.skips)
        yield from (list(texts) for texts in zip(*parsed.texts))


class DocumentReader:
    """Iterate the valid records of ``inputs`` (paths or globs) in this process, as lists of
    texts (one per key). Inputs are checked on construction; skips land in ``.counter``."""

    def __init__(self, inputs: Sequence[str], keys: Sequence[str] = ("text",),
                 strict: bool = False, log: Callable[[str], None] | None = None,
                 chunk_bytes: int = 1 << 20):
        self.files = expand_inputs(inputs)
        self.keys = list(keys)
        check_inputs(self.files, self.keys)
        self.counter = SkipCounter(self.files, strict=strict, log=log)
        self.chunk_bytes = chunk_bytes

    def __iter__(self) -> Iterator[list[str]]:
        return iter_records(self.files, self.keys, self.counter, self.chunk_bytes)
