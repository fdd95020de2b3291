"""Validate and read Megatron indexed datasets (``{prefix}.bin`` + ``{prefix}.idx``).

megatron-core's ``IndexedDataset`` trusts its files: a truncated ``.idx`` fails with a bare
``assert`` or a numpy buffer error, and a ``.bin`` that is too short is only noticed when a
training step reads past its end. ``check_indexed_dataset`` checks everything the format
promises (header, sizes, document indices, pointers against lengths, ``.bin`` size) block by
block, with memory independent of the dataset size, and says which file is wrong and what to
do about it. The layout is described in :mod:`.indexed_format`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from megatron_longctx.data.formats.indexed_format import (
    CODE_DTYPES,
    HEADER_BYTES,
    INDEX_HEADER,
    INDEX_VERSION,
    bin_path,
    idx_path,
    temp_files,
)

_BLOCK = 1 << 20
_REGENERATE = "regenerate it (rerun preprocessing or the merge that wrote it)"


class IndexedDatasetError(ValueError):
    """A missing or corrupt ``.bin``/``.idx``; the message names the file and the fix."""


@dataclass(frozen=True)
class IndexedDatasetInfo:
    prefix: str
    idx_path: str
    bin_path: str
    dtype: np.dtype
    sequence_count: int
    document_count: int  # megatron's header field: number of document indices = documents + 1
    num_tokens: int
    multimodal: bool  # .idx carries an int8 mode per sequence after the document indices

    @property
    def num_documents(self) -> int:
        return self.document_count - 1

    def sequence_lengths(self) -> np.ndarray:
        """[sequences] int32 tokens per sequence (memory-mapped)."""
        return self._index_array(np.int32, self.sequence_count, HEADER_BYTES)

    def sequence_pointers(self) -> np.ndarray:
        """[sequences] int64 byte offset of each sequence in the .bin (memory-mapped)."""
        return self._index_array(np.int64, self.sequence_count,
                                 HEADER_BYTES + 4 * self.sequence_count)

    def document_indices(self) -> np.ndarray:
        """[documents + 1] int64: document j is sequences [d[j], d[j+1]) (memory-mapped)."""
        return self._index_array(np.int64, self.document_count,
                                 HEADER_BYTES + 12 * self.sequence_count)

    def iter_document_lengths(self, block: int = _BLOCK) -> Iterator[np.ndarray]:
        """[<= block] int64 tokens per document (sum of its sequences), block by block so
        memory does not grow with the dataset."""
        lengths, docidx = self.sequence_lengths(), self.document_indices()
        for j in range(0, self.num_documents, block):
            idx = np.asarray(docidx[j:j + block + 1], dtype=np.int64)
            first = int(idx[0])
            cum = np.zeros(int(idx[-1]) - first + 1, dtype=np.int64)
            np.cumsum(lengths[first:int(idx[-1])], dtype=np.int64, out=cum[1:])
            yield cum[idx[1:] - first] - cum[idx[:-1] - first]

    def read_document(self, index: int) -> np.ndarray:
        """Tokens of document ``index`` (all its sequences)."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} out of range: {self.prefix} has "
                             f"{self.num_documents} documents (0..{self.num_documents - 1}).")
        docidx = self.document_indices()
        first, last = int(docidx[index]), int(docidx[index + 1])
        if first == last:
            return np.zeros(0, dtype=self.dtype)
        pointer = int(self.sequence_pointers()[first])
        count = int(self.sequence_lengths()[first:last].sum(dtype=np.int64))
        with open(self.bin_path, "rb") as f:
            f.seek(pointer)
            return np.frombuffer(f.read(count * self.dtype.itemsize), dtype=self.dtype)

    def _index_array(self, dtype: type, count: int, offset: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.idx_path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def check_indexed_dataset(prefix: str, full: bool = True) -> IndexedDatasetInfo:
    """Check ``{prefix}.idx`` and ``{prefix}.bin`` and describe them.

    ``full=False`` stops after the O(1) checks (header, file sizes); the full check also reads
    every index entry once, in blocks.

    Raises:
        IndexedDatasetError: naming the file, what is wrong and how to fix it.
    """
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            raise IndexedDatasetError(
                f"{prefix!r} ends in {ext}; pass the path prefix without .bin/.idx "
                f"({prefix[:-len(ext)]!r}).")
    ipath, bpath = idx_path(prefix), bin_path(prefix)
    for path in (ipath, bpath):
        if not os.path.isfile(path):
            raise IndexedDatasetError(_missing_message(prefix, path))
    header = _read_header(ipath)
    code, n, d = header
    dtype = np.dtype(CODE_DTYPES[code])
    size = os.path.getsize(ipath)
    expected = HEADER_BYTES + 4 * n + 8 * n + 8 * d
    if size not in (expected, expected + n):
        raise IndexedDatasetError(
            f"{ipath} is {size:,} bytes but its header announces {n:,} sequences and {d:,} "
            f"document indices, which take {expected:,} bytes: the file is truncated or "
            f"corrupt; {_REGENERATE}.")
    if d < 1:
        raise IndexedDatasetError(f"{ipath} has no document indices (megatron's index starts "
                                  f"with a 0 entry); the file is corrupt; {_REGENERATE}.")
    info = IndexedDatasetInfo(prefix, ipath, bpath, dtype, n, d, 0, multimodal=size != expected)
    num_tokens = _check_arrays(info) if full else _sum_lengths(info)
    bin_size = os.path.getsize(bpath)
    want = num_tokens * dtype.itemsize
    if bin_size != want:
        raise IndexedDatasetError(
            f"{bpath} is {bin_size:,} bytes but {ipath} describes {num_tokens:,} {dtype} tokens "
            f"= {want:,} bytes: the .bin is "
            f"{'truncated' if bin_size < want else 'longer than its index'}, or the .bin and "
            f".idx come from different runs; {_REGENERATE}.")
    return IndexedDatasetInfo(prefix, ipath, bpath, dtype, n, d, num_tokens, info.multimodal)


def _missing_message(prefix: str, path: str) -> str:
    leftovers = temp_files(prefix)
    if leftovers:
        return (f"{path} does not exist, but temporary files of a run writing {prefix} do "
                f"({os.path.basename(leftovers[0])}, ...): that run is still going or was "
                f"interrupted. Wait for it, or rerun it (it clears the leftovers).")
    other = bin_path(prefix) if path.endswith(".idx") else idx_path(prefix)
    if os.path.exists(other):
        return (f"{path} does not exist although {other} does: the dataset is incomplete; "
                f"{_REGENERATE}.")
    directory = os.path.dirname(prefix) or "."
    base = os.path.basename(prefix)
    near = []
    if os.path.isdir(directory):
        near = sorted(f[:-4] for f in os.listdir(directory)
                      if f.endswith(".idx") and f.startswith(base[:max(1, len(base) // 2)]))
    hint = (f" Prefixes found nearby: {', '.join(os.path.join(directory, n) for n in near[:5])}."
            if near else "")
    return (f"{path} does not exist: no indexed dataset at prefix {prefix!r} (expected "
            f"{prefix}.bin and {prefix}.idx). Preprocessing writes "
            f"<output-prefix>_<json-key>_document.{{bin,idx}}.{hint}")


def _read_header(path: str) -> tuple[int, int, int]:
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise IndexedDatasetError(f"{path} is {len(raw)} bytes, shorter than the "
                                  f"{HEADER_BYTES}-byte index header: the file is truncated; "
                                  f"{_REGENERATE}.")
    if raw[:len(INDEX_HEADER)] != INDEX_HEADER:
        raise IndexedDatasetError(f"{path} does not start with {INDEX_HEADER!r} (found "
                                  f"{raw[:9]!r}): not a Megatron indexed-dataset index (mmap "
                                  f"format), or corrupt; {_REGENERATE}.")
    version, code, n, d = struct.unpack("<QBQQ", raw[len(INDEX_HEADER):])
    if version != INDEX_VERSION:
        raise IndexedDatasetError(f"{path} has index version {version}; only version "
                                  f"{INDEX_VERSION} exists, so the file is corrupt; "
                                  f"{_REGENERATE}.")
    if code not in CODE_DTYPES:
        raise IndexedDatasetError(f"{path} has dtype code {code}, not one of megatron's "
                                  f"{sorted(CODE_DTYPES)}; the file is corrupt; {_REGENERATE}.")
    return code, n, d


def _sum_lengths(info: IndexedDatasetInfo) -> int:
    lengths = info.sequence_lengths()
    return sum(int(lengths[s:s + _BLOCK].sum(dtype=np.int64))
               for s in range(0, lengths.size, _BLOCK))


def _check_arrays(info: IndexedDatasetInfo) -> int:
    """Lengths >= 0, pointers consecutive, document indices 0..n non-decreasing; returns the
    number of tokens."""
    ipath, n, itemsize = info.idx_path, info.sequence_count, info.dtype.itemsize
    lengths, pointers = info.sequence_lengths(), info.sequence_pointers()
    offset = 0
    for start in range(0, n, _BLOCK):
        block = lengths[start:start + _BLOCK].astype(np.int64)
        if (block < 0).any():
            bad = start + int(np.argmax(block < 0))
            raise IndexedDatasetError(f"{ipath}: sequence {bad} has negative length "
                                      f"{int(lengths[bad])}; the index is corrupt; "
                                      f"{_REGENERATE}.")
        ends = np.cumsum(block * itemsize) + offset
        expected = ends - block * itemsize
        actual = pointers[start:start + _BLOCK]
        if not np.array_equal(actual, expected):
            bad = start + int(np.argmax(actual != expected))
            raise IndexedDatasetError(
                f"{ipath}: sequence {bad} starts at byte {int(pointers[bad])} of the .bin but "
                f"the lengths before it put it at {int(expected[bad - start])}; the index is "
                f"corrupt; {_REGENERATE}.")
        offset = int(ends[-1])
    docidx = info.document_indices()
    if int(docidx[0]) != 0 or int(docidx[-1]) != n:
        raise IndexedDatasetError(
            f"{ipath}: document indices run from {int(docidx[0])} to {int(docidx[-1])}, "
            f"expected 0 to the sequence count {n}; the index is corrupt; {_REGENERATE}.")
    for start in range(0, docidx.size - 1, _BLOCK):
        block = docidx[start:start + _BLOCK + 1]
        if (np.diff(block) < 0).any():
            bad = start + int(np.argmax(np.diff(block) < 0))
            raise IndexedDatasetError(f"{ipath}: document indices decrease at document {bad}; "
                                      f"the index is corrupt; {_REGENERATE}.")
    return offset // itemsize
