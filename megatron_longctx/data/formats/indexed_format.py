"""Megatron's indexed-dataset format: the ``.idx`` header constants and the file names.

Shared by the writer (:mod:`.indexed_writer`), the reader (:mod:`.indexed_reader`) and the
validation cache (:mod:`.dataset_check`), so none of them imports another for its constants.
``.idx`` layout, little-endian::

    b"MMIDIDX\\x00\\x00" | <Q version=1 | <B dtype code | <Q sequence count n | <Q document count d
    int32[n] sequence lengths (tokens) | int64[n] byte offsets into .bin | int64[d] document
    indices (d = documents + 1; document j is sequences [idx[j], idx[j+1]))
"""

from __future__ import annotations

import glob

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # = 34
# megatron.core.datasets.indexed_dataset.DType codes
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3,
               np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.float64): 6,
               np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
# the writer's temporary files are ``{prefix}.{part}.tmp-{host}-{pid}``
TEMP_PARTS = ("bin", "idx", "lengths", "docidx")


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def temp_files(prefix: str) -> list[str]:
    """Temporary files of runs writing ``prefix`` (any host, any pid)."""
    found = []
    for part in TEMP_PARTS:
        found += glob.glob(f"{glob.escape(prefix)}.{part}.tmp-*")
    return sorted(found)
