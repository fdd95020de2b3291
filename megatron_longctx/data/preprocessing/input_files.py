"""Input files of preprocessing: which files (``--input`` paths and globs), what they hold
(checked by their first bytes, not only their names), and their bytes, decompressed and read
to the end.

An ``InputFile`` may stand for part of a file, so that shards and partitions can split a corpus:
a byte range of a plain ``.jsonl`` file (a line belongs to the range holding its first byte, so
consecutive ranges hold every line exactly once), or a range of row groups of a Parquet file.
Compressed files are only ever read whole.

Compressed data must end where its format says it ends: gzip raises at a missing end-of-stream
marker, and ``_zstd_blocks`` checks that the last zstd frame is complete (zstandard's stream
reader returns a short read instead, which silently dropped most of a truncated corpus).
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PARQUET_MAGIC = b"PAR1"
UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_RAW_BLOCK = 1 << 16  # compressed bytes fed to the decompressor at a time (bounds its output)


class InputError(ValueError):
    """An input file or record that cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str  # "jsonl" | "gz" | "zst" | "parquet"
    size: int  # bytes on disk
    # part of the file: [start, end) bytes of a plain .jsonl, or row groups of a .parquet;
    # end None: to the end of the file
    start: int = 0
    end: int | None = None
    first_row: int = 1  # Parquet: 1-based number of the first row of row group ``start``

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end is None

    def location(self, line: int) -> str:
        if self.format == "parquet":
            return f"{self.path}: row {line}"
        if self.start:  # counting lines from the start of the file would mean reading it all
            return f"{self.path}: line {line} after byte {self.start:,}"
        return f"{self.path}:{line}"

    def describe(self) -> dict:
        """JSON-able description (shard summaries)."""
        out: dict = {"path": self.path, "format": self.format}
        if not self.whole:
            unit = "row_groups" if self.format == "parquet" else "bytes"
            out[unit] = [self.start, self.end]
        return out


def input_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(".gz"):
        return "gz"
    if lower.endswith((".zst", ".zstd")):
        return "zst"
    return "jsonl"  # Megatron-LM reads any other name as JSON lines too


def expand_inputs(patterns: Sequence[str]) -> list[InputFile]:
    """Files named by ``--input`` paths or globs, in the given order (each glob sorted)."""
    if not patterns:
        raise InputError("no --input given; pass one or more JSONL/Parquet files or globs.")
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [p for p in sorted(glob.glob(pattern, recursive=True))
                       if os.path.isfile(p)]
            if not matches:
                raise InputError(f"--input {pattern!r} matches no file; check the pattern (and "
                                 f"quote it so the shell passes it through unexpanded).")
            paths.extend(matches)
        elif os.path.isdir(pattern):
            raise InputError(f"--input {pattern} is a directory; pass files or a glob such as "
                             f"'{os.path.join(pattern, '*.jsonl')}'.")
        elif not os.path.exists(pattern):
            raise InputError(f"--input {pattern} does not exist.")
        else:
            paths.append(pattern)
    unique = list(dict.fromkeys(paths))  # a file named twice is read once
    return [InputFile(p, input_format(p), os.path.getsize(p)) for p in unique]


def check_inputs(files: Sequence[InputFile], keys: Sequence[str]) -> None:
    """Cheap up-front checks (readable, content matching the name, Parquet columns, optional
    packages) so a run fails in seconds instead of hours in."""
    for f in files:
        try:
            with open(f.path, "rb") as stream:
                magic = stream.read(4)
        except OSError as exc:
            raise InputError(f"cannot read --input {f.path}: {exc.strerror}.") from exc
        _check_magic(f, magic)
        if f.format == "zst":
            import_zstandard(f.path)
        if f.format == "parquet":
            pq = import_parquet(f.path)
            try:
                names = pq.read_schema(f.path).names
            except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
                raise InputError(f"{f.path} is not a readable Parquet file ({exc}).") from exc
            missing = [k for k in keys if k not in names]
            if missing:
                raise InputError(f"{f.path} has no column {', '.join(map(repr, missing))}; its "
                                 f"columns are {names}. Pass the text column with --json-keys.")


def _check_magic(f: InputFile, magic: bytes) -> None:
    if not f.size:
        return
    if f.format == "gz" and magic[:2] != _GZIP_MAGIC:
        raise InputError(f"{f.path} ends in .gz but is not gzip data; rename it or recompress "
                         f"it with gzip.")
    if f.format == "zst" and not _is_zstd(magic):
        raise InputError(f"{f.path} ends in .zst but is not zstd data; rename it or recompress "
                         f"it with zstd.")
    if f.format != "jsonl":
        return
    for what, found, suffix in (("gzip", magic[:2] == _GZIP_MAGIC, ".gz"),
                                ("zstd", _is_zstd(magic), ".zst"),
                                ("Parquet", magic == _PARQUET_MAGIC, ".parquet")):
        if found:
            raise InputError(f"{f.path} holds {what} data but is named as plain JSON lines; "
                             f"rename it to {f.path}{suffix} so that it is read as {what}.")
    if magic[:2] in _UTF16_BOMS:
        raise InputError(f"{f.path} is UTF-16 text (it starts with a UTF-16 byte-order mark); "
                         f"re-encode it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8.")


def _is_zstd(magic: bytes) -> bool:
    """A zstd frame, or a skippable frame (pzstd starts its files with one)."""
    return magic == _ZSTD_MAGIC or (len(magic) == 4 and magic[0] & 0xF0 == 0x50
                                    and magic[1:] == b"\x2a\x4d\x18")


def iter_blocks(f: InputFile, block_bytes: int) -> Iterator[bytes]:
    """The file's (decompressed) bytes in blocks of about ``block_bytes``, without a leading
    UTF-8 byte-order mark. A plain file with a byte range yields exactly the lines whose first
    byte lies in the range. Raises ``OSError``/``EOFError`` on truncated or corrupt data."""
    if f.format == "gz":
        blocks = _stream_blocks(gzip.open(f.path, "rb"), block_bytes)
    elif f.format == "zst":
        blocks = _zstd_blocks(f.path, block_bytes)
    elif f.whole:
        blocks = _stream_blocks(open(f.path, "rb"), block_bytes)
    else:
        blocks = _range_blocks(f.path, f.start, f.end, block_bytes)
    first = True
    for block in blocks:
        if first and f.start == 0:
            block = block[len(UTF8_BOM):] if block.startswith(UTF8_BOM) else block
            first = False
        if block:
            yield block


def _stream_blocks(stream, block_bytes: int) -> Iterator[bytes]:
    with stream:
        while block := stream.read(block_bytes):
            yield block


def _zstd_blocks(path: str, block_bytes: int) -> Iterator[bytes]:
    """Every frame of a zstd file, decompressed; raises ``EOFError`` if the data ends inside
    a frame (a truncated file)."""
    dctx = import_zstandard(path).ZstdDecompressor()
    frame = None  # decompressor of the frame being read
    with open(path, "rb") as raw:
        while data := raw.read(min(block_bytes, _RAW_BLOCK)):
            while data:
                frame = frame or dctx.decompressobj()
                out = frame.decompress(data)
                if out:
                    yield out
                if not frame.eof:
                    break
                data, frame = frame.unused_data, None  # the next frame starts here
    if frame is not None:
        raise EOFError("the zstd data ends inside a frame")


def _range_blocks(path: str, start: int, end: int | None, block_bytes: int) -> Iterator[bytes]:
    """Lines of a plain file whose first byte is in [start, end)."""
    with open(path, "rb") as stream:
        pos = start
        if start > 0:  # skip the line that began before the range (unless one starts here)
            stream.seek(start - 1)
            pos = start - 1
            while True:
                block = stream.read(block_bytes)
                if not block:
                    return
                cut = block.find(b"\n")
                if cut >= 0:
                    pos += cut + 1
                    stream.seek(pos)
                    break
                pos += len(block)
        limit = end if end is not None else float("inf")
        block = b"\n"
        while pos < limit:
            block = stream.read(int(min(block_bytes, limit - pos)))
            if not block:
                return
            pos += len(block)
            yield block
        if not block.endswith(b"\n"):  # finish the last line begun
            while tail := stream.read(block_bytes):
                cut = tail.find(b"\n")
                if cut >= 0:
                    yield tail[:cut + 1]
                    return
                yield tail


def import_zstandard(path: str):
    try:
        import zstandard
    except ImportError as exc:
        raise InputError(f"reading {path} needs the zstandard package: pip install zstandard"
                         ) from exc
    return zstandard


def import_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError(f"reading {path} needs pyarrow: pip install pyarrow (or "
                         f"pip install 'megatron_longctx[parquet]')") from exc
    return pq
