"""Streaming writer of Megatron's indexed dataset (``{prefix}.bin`` + ``{prefix}.idx``).

The output is byte-identical to megatron-core's ``IndexedDatasetBuilder`` for the same
documents, so ``megatron.core.datasets.indexed_dataset.IndexedDataset`` (and Megatron-LM's
training) reads it; the layout is described in :mod:`.indexed_format`.

Why not megatron-core's builder: it keeps every length in Python lists (~30 bytes per document
per list) and builds the pointers in a Python loop, so memory grows with the corpus. Here
lengths and document indices go to temporary files in numpy blocks, and ``finalize`` streams
them into the ``.idx``, computing pointers block by block: memory stays flat.

Atomic output: everything is written under ``{prefix}.{bin,idx,...}.tmp-{host}-{pid}`` and
renamed at the very end (old ``.idx`` removed first, then ``.bin``, then ``.idx``), so an
interrupted run never leaves a ``.bin``/``.idx`` pair that loads, and an existing dataset stays
intact until its replacement is complete. Temporary files left by a killed run on this host are
removed when the prefix is next written. Once published, the dataset gets its check record
(:mod:`.dataset_check`: the token range seen while writing, the files' fingerprints), so
training never has to scan a fresh dataset.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
from collections.abc import Iterator, Sequence
from types import TracebackType

import numpy as np

from megatron_longctx.data.formats import dataset_check
from megatron_longctx.data.formats.indexed_format import (
    DTYPE_CODES,
    INDEX_HEADER,
    INDEX_VERSION,
    TEMP_PARTS,
    bin_path,
    idx_path,
    temp_files,
)
from megatron_longctx.data.formats.indexed_reader import check_indexed_dataset

_BLOCK = 1 << 20  # entries per block when appending another dataset's index (8 MiB of int64)
_COPY_BUFFER = 1 << 20  # bytes


def optimal_dtype(vocab_size: int | None) -> np.dtype:
    """megatron-core's ``DType.optimal_dtype``: uint16 when every id fits, else int32."""
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32)


class OutputInUseError(RuntimeError):
    """Another run (live, or on another host) holds temporary files of the same prefix."""


def _temp_owner(path: str) -> tuple[str, int] | None:
    """(host, pid) encoded in a temp file name, or None if it is not one of ours."""
    tag = path.rsplit(".tmp-", 1)[-1]
    host, _, pid = tag.rpartition("-")
    return (host, int(pid)) if host and pid.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(prefix: str) -> list[str]:
    """Delete temp files of dead runs on this host; refuse if a live run writes ``prefix``.

    Files from other hosts (shared filesystems) cannot be checked, so they stop the run and
    the message says how to clear them.
    """
    host = socket.gethostname()
    removed = []
    for path in temp_files(prefix):
        owner = _temp_owner(path)
        if owner is None:
            continue
        owner_host, pid = owner
        if owner_host != host:
            raise OutputInUseError(
                f"{path} was left by a run on host {owner_host} writing the same output prefix "
                f"{prefix}. If that run is finished or dead, delete {prefix}.*.tmp-* and rerun; "
                f"otherwise wait for it or choose another output prefix.")
        if pid != os.getpid() and _pid_alive(pid):
            raise OutputInUseError(
                f"process {pid} is writing the same output prefix {prefix} ({path}); wait for "
                f"it to finish or kill it, or choose another output prefix. If no such run "
                f"exists (pid reused), delete {prefix}.*.tmp-* and rerun.")
        os.remove(path)
        removed.append(path)
    return removed


class IndexedDatasetWriter:
    """Write documents to ``{prefix}.bin/.idx``; call ``finalize()`` to publish them.

    Use as a context manager: leaving the block without ``finalize()`` (e.g. on an exception)
    deletes the temporary files.

    Args:
        prefix: output path without ``.bin``/``.idx``.
        dtype: token dtype on disk; use ``optimal_dtype(vocab_size)`` as Megatron-LM does.
        block_entries: index entries held in memory at a time (buffered before they go to the
            temp files, and per block when ``finalize`` streams them into the ``.idx``).
    """

    def __init__(self, prefix: str, dtype: np.dtype | type = np.int32,
                 block_entries: int = 1 << 16):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} cannot be stored in an indexed dataset; use "
                             f"one of {sorted(str(d) for d in DTYPE_CODES)}.")
        self._max_id = (np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None)
        self.block_entries = block_entries
        directory = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(directory):
            raise ValueError(f"output directory {directory} does not exist; create it first.")
        remove_stale_temp_files(prefix)
        tag = f"tmp-{socket.gethostname()}-{os.getpid()}"
        self._tmp = {part: f"{prefix}.{part}.{tag}" for part in TEMP_PARTS}
        self._bin = open(self._tmp["bin"], "wb")
        self._lengths_file = open(self._tmp["lengths"], "wb")
        self._docidx_file = open(self._tmp["docidx"], "wb")
        self._lengths: list[np.ndarray] = []  # pending int32 blocks
        self._docidx: list[np.ndarray] = []  # pending int64 blocks (end index of each doc)
        self._pending = 0
        self.sequence_count = 0
        self.document_count = 0  # documents, not counting megatron's leading 0 index
        self.token_count = 0
        # smallest and largest token id written, for the check record (dataset_check): a
        # fresh dataset is never scanned before training
        self.token_range: tuple[int, int] | None = None
        self._prepared = False
        self._closed = False

    # -- adding data -------------------------------------------------------------------------
    def add_document(self, tokens: Sequence[int] | np.ndarray,
                     lengths: Sequence[int] | None = None) -> None:
        """One document; ``lengths`` splits it into several sequences (default: one)."""
        array = self._as_dtype(np.asarray(tokens))
        if lengths is None:
            seq = np.array([array.size], dtype=np.int32)
        else:
            seq = np.asarray(lengths, dtype=np.int64)
            if seq.sum() != array.size or (seq < 0).any():
                raise ValueError(f"sequence lengths {list(seq)} do not add up to the "
                                 f"document's {array.size} tokens.")
            seq = seq.astype(np.int32)
        self._bin.write(array.tobytes())
        self._note_ids(array)
        self.sequence_count += seq.size
        self.document_count += 1
        self.token_count += array.size
        self._push(seq, np.array([self.sequence_count], dtype=np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray,
                      sequences_per_document: np.ndarray | None = None) -> None:
        """Many documents at once (the fast path of preprocessing): ``tokens`` [sum(lengths)]
        concatenated, ``lengths`` [sequences] tokens per sequence; ``sequences_per_document``
        [documents] (default: one sequence per document, ``lengths`` per document)."""
        lengths = np.asarray(lengths)
        if lengths.size == 0:
            return
        if (lengths < 0).any() or lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("document lengths must be in [0, 2**31) tokens.")
        tokens = self._as_dtype(np.asarray(tokens))
        if tokens.size != int(lengths.sum(dtype=np.int64)):
            raise ValueError(f"{tokens.size} tokens given but lengths add up to "
                             f"{int(lengths.sum())}.")
        if sequences_per_document is None:
            ends = self.sequence_count + np.arange(1, lengths.size + 1, dtype=np.int64)
        else:
            counts = np.asarray(sequences_per_document, dtype=np.int64)
            if counts.sum() != lengths.size or (counts < 0).any():
                raise ValueError(f"sequences per document add up to {int(counts.sum())}, not "
                                 f"the {lengths.size} sequence lengths given.")
            ends = self.sequence_count + np.cumsum(counts)
        self._bin.write(tokens.tobytes() if not tokens.flags.c_contiguous else tokens.data)
        self._note_ids(tokens)
        self.sequence_count += lengths.size
        self.document_count += ends.size
        self.token_count += tokens.size
        self._push(lengths.astype(np.int32, copy=False), ends)

    def add_index(self, prefix: str, info=None) -> None:
        """Append a whole existing dataset (streaming; like ``IndexedDatasetBuilder.add_index``).

        ``info``: the result of ``check_indexed_dataset(prefix)`` if the caller already has it.
        """
        info = info or check_indexed_dataset(prefix)
        if info.dtype != self.dtype:
            raise ValueError(f"{info.idx_path} stores {info.dtype} tokens but this dataset "
                             f"stores {self.dtype}; datasets can only be merged with the same "
                             f"token dtype (same tokenizer vocabulary size).")
        self._flush()
        lengths, docidx = info.sequence_lengths(), info.document_indices()
        for start in range(0, lengths.size, _BLOCK):
            self._lengths_file.write(np.ascontiguousarray(lengths[start:start + _BLOCK]).data)
        for start in range(1, docidx.size, _BLOCK):
            block = docidx[start:start + _BLOCK].astype(np.int64) + self.sequence_count
            self._docidx_file.write(block.data)
        with open(info.bin_path, "rb") as src:  # copied in blocks, noting the token range
            while chunk := src.read(_COPY_BUFFER):  # a multiple of every token size
                self._bin.write(chunk)
                self._note_ids(np.frombuffer(chunk, dtype=self.dtype))
        self.sequence_count += info.sequence_count
        self.document_count += info.num_documents
        self.token_count += info.num_tokens

    # -- publishing --------------------------------------------------------------------------
    def finalize(self) -> None:
        """Write the ``.idx`` and atomically publish ``{prefix}.bin`` / ``{prefix}.idx``."""
        self.prepare()
        self.publish()

    def prepare(self) -> None:
        """Write and sync everything under temporary names (``publish`` renames it); several
        writers prepare first and then publish together, so a failure in one leaves none."""
        if self._closed or self._prepared:
            raise RuntimeError(f"writer for {self.prefix} is already finalized or aborted.")
        self._flush()
        for f in (self._bin, self._lengths_file, self._docidx_file):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._write_index(self._tmp["idx"])
        self._prepared = True

    def publish(self) -> None:
        if not self._prepared or self._closed:
            raise RuntimeError(f"writer for {self.prefix}: publish() needs prepare() first.")
        final_bin, final_idx = bin_path(self.prefix), idx_path(self.prefix)
        # The old check record and .idx go first: a kill between the renames leaves a .bin
        # without .idx (does not load), never a new .bin beside an old .idx or record.
        dataset_check.remove_record(self.prefix)
        if os.path.exists(final_idx):
            os.remove(final_idx)
        os.replace(self._tmp["bin"], final_bin)
        os.replace(self._tmp["idx"], final_idx)
        for part in ("lengths", "docidx"):
            os.remove(self._tmp[part])
        _fsync_dir(os.path.dirname(os.path.abspath(self.prefix)))
        self._closed = True
        low, high = self.token_range or (None, None)
        dataset_check.write_record(self.prefix, self.dtype, self.document_count,
                                   self.sequence_count, self.token_count, low, high)

    def abort(self) -> None:
        """Close and delete the temporary files (idempotent)."""
        if self._closed:
            return
        for f in (self._bin, self._lengths_file, self._docidx_file):
            f.close()  # no-op when prepare() closed them
        for path in self._tmp.values():
            if os.path.exists(path):
                os.remove(path)
        self._closed = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()  # no-op after finalize()

    # -- internals ---------------------------------------------------------------------------
    def _as_dtype(self, array: np.ndarray) -> np.ndarray:
        if array.dtype == self.dtype:
            return array
        if array.size and self._max_id is not None and (
                int(array.max()) > self._max_id or int(array.min()) < 0):
            raise ValueError(f"token ids in [{int(array.min())}, {int(array.max())}] do not fit "
                             f"the dataset dtype {self.dtype} (chosen from the vocabulary "
                             f"size); build the writer with optimal_dtype(true vocab size).")
        return array.astype(self.dtype)

    def _note_ids(self, tokens: np.ndarray) -> None:
        if tokens.size and self.dtype.kind in "iu":
            low, high = int(tokens.min()), int(tokens.max())
            if self.token_range is not None:
                low, high = min(low, self.token_range[0]), max(high, self.token_range[1])
            self.token_range = (low, high)

    def _push(self, lengths: np.ndarray, ends: np.ndarray) -> None:
        self._lengths.append(lengths)
        self._docidx.append(ends)
        self._pending += lengths.size
        if self._pending >= self.block_entries:
            self._flush()

    def _flush(self) -> None:
        if self._lengths:
            self._lengths_file.write(np.concatenate(self._lengths).astype(np.int32).data)
            self._docidx_file.write(np.concatenate(self._docidx).astype(np.int64).data)
        self._lengths, self._docidx, self._pending = [], [], 0

    def _write_index(self, path: str) -> None:
        itemsize = self.dtype.itemsize
        with open(path, "wb") as out:
            out.write(INDEX_HEADER)
            out.write(struct.pack("<Q", INDEX_VERSION))
            out.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            out.write(struct.pack("<Q", self.sequence_count))
            out.write(struct.pack("<Q", self.document_count + 1))
            with open(self._tmp["lengths"], "rb") as src:  # int32[n] lengths
                shutil.copyfileobj(src, out, _COPY_BUFFER)
            offset = 0  # int64[n] byte pointers, block by block
            for block in _blocks(self._tmp["lengths"], np.int32, self.sequence_count,
                                 self.block_entries):
                bytes_ = block.astype(np.int64) * itemsize
                ends = np.cumsum(bytes_) + offset
                out.write((ends - bytes_).data)
                offset = int(ends[-1])
            out.write(np.zeros(1, dtype=np.int64).data)  # int64[d] document indices
            with open(self._tmp["docidx"], "rb") as src:
                shutil.copyfileobj(src, out, _COPY_BUFFER)
            out.flush()
            os.fsync(out.fileno())


def _blocks(path: str, dtype: type, count: int, block: int) -> Iterator[np.ndarray]:
    if count == 0:
        return
    data = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
    for start in range(0, count, block):
        yield np.array(data[start:start + block])
    del data


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> None:
    """Concatenate datasets (documents in the given order) into ``output_prefix``, streaming."""
    if not prefixes:
        raise ValueError("nothing to merge: pass at least one input prefix.")
    infos = [check_indexed_dataset(p) for p in prefixes]
    dtypes = {str(i.dtype) for i in infos}
    if len(dtypes) > 1:
        listing = ", ".join(f"{i.prefix} ({i.dtype})" for i in infos)
        raise ValueError(f"cannot merge datasets with different token dtypes: {listing}; "
                         f"they come from tokenizers of different vocabulary sizes.")
    # side data (prompt loss masks, recorded positions) are merged along, when every input has
    # them: a merge of some inputs with and some without would misalign them
    from contextlib import ExitStack

    from megatron_longctx.data.formats.side_data import (
        SIDE_DTYPES,
        has_side_data,
        publish_with_side_data,
        side_prefix,
        side_writer,
    )

    kinds = []
    for name in SIDE_DTYPES:
        have = [has_side_data(p, name) for p in prefixes]
        if any(have) and not all(have):
            raise ValueError(f"cannot merge datasets with and without {name} side data "
                             f"({prefixes[have.index(True)]} has it, "
                             f"{prefixes[have.index(False)]} has not); preprocess them all "
                             f"the same way (e.g. all with --mask-prompt-loss).")
        if all(have):
            kinds.append(name)
    with IndexedDatasetWriter(output_prefix, infos[0].dtype) as writer, ExitStack() as stack:
        sides = {name: stack.enter_context(side_writer(output_prefix, name)) for name in kinds}
        for info in infos:
            writer.add_index(info.prefix, info)
            for name, side in sides.items():
                side.add_index(side_prefix(info.prefix, name))
        publish_with_side_data({"": writer}, {name: {"": side} for name, side in sides.items()})
