"""Validate each indexed dataset once, keep the result, and check it fits the tokenizer.

Why: megatron-core's reader trusts its files, and the model's padded vocabulary hides ids
beyond the tokenizer's (a 400-token tokenizer pads to 512 rows and trains on ids up to 511
without a word). So before training, every dataset is validated once in full (lengths against
pointers, every sequence inside the ``.bin``, the ``.bin`` size) and its token range is read;
the result is a small JSON *check record* kept beside the data:

    {data dir}/.dataset_check/{basename}.json

in a hidden directory because Megatron-LM's ``tools/merge_datasets.py`` refuses a data
directory holding any other *file* than ``.bin``/``.idx`` pairs (it skips directories), and our
shard globs (``*.idx``) never look inside it. When the data directory is read-only the record
goes to ``--data-cache-path``, or nowhere (the check then runs again next time).

The preprocessing writer writes the record itself (it knows the token range for free), so a
fresh dataset is never scanned. A record is trusted while both files keep the size and mtime it
recorded; otherwise each file's *fingerprint* (its size and 64 KiB from its start, middle and
end) tells a dataset that was copied or rebuilt (validated again) from a pair that was mixed
up: one file unchanged and its partner replaced (refused, naming both files and, when another
record in the directory knows the replacement, the dataset it came from).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from megatron_longctx.data.formats.indexed_format import bin_path, idx_path
from megatron_longctx.data.formats.indexed_reader import IndexedDatasetError, check_indexed_dataset

RECORD_DIR = ".dataset_check"
RECORD_VERSION = 1
_SAMPLE_BYTES = 1 << 16  # read at the start, middle and end of a file for its fingerprint
_SCAN_BYTES = 1 << 23  # tokens read per block when scanning for the token range

logger = logging.getLogger("megatron_longctx")


class DatasetMismatchError(IndexedDatasetError):
    """The ``.bin`` and ``.idx`` of a prefix were not written together, or the data does not
    fit the tokenizer; the message names the files and the fix."""


@dataclass(frozen=True)
class DatasetCheck:
    """What the full validation of ``{prefix}.bin/.idx`` found."""

    prefix: str
    dtype: str
    num_documents: int
    num_sequences: int
    num_tokens: int
    min_token_id: int | None  # None: no token, or floating-point tokens
    max_token_id: int | None
    record: str | None  # the file keeping this result; None when it could not be kept


# (absolute prefix, (idx size, mtime), (bin size, mtime)) -> DatasetCheck: one process (and,
# through ``check_training_data``, every rank) validates a dataset once even when no record
# can be written
_validated: dict[tuple, DatasetCheck] = {}


# -- record files -----------------------------------------------------------------------------
def record_path(prefix: str, cache_dir: str | None = None) -> str:
    """Where the check record of ``prefix`` lives: beside the data, or (``cache_dir``) in the
    sample-index cache, named with a digest of the data's path so datasets never collide."""
    prefix = os.path.abspath(prefix)
    name = os.path.basename(prefix)
    if cache_dir is None:
        return os.path.join(os.path.dirname(prefix), RECORD_DIR, name + ".json")
    digest = hashlib.sha1(prefix.encode()).hexdigest()[:12]
    return os.path.join(os.path.abspath(cache_dir), RECORD_DIR, f"{name}-{digest}.json")


def _candidate_paths(prefix: str, cache_dir: str | None) -> list[str]:
    paths = [record_path(prefix)]
    if cache_dir is not None and record_path(prefix, cache_dir) not in paths:
        paths.append(record_path(prefix, cache_dir))
    return paths


def file_fingerprint(path: str) -> str:
    """The size and three 64 KiB samples (start, middle, end), hashed: tells two different
    files of equal size apart without reading a multi-GB ``.bin``."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE_BYTES // 2),
                              max(0, size - _SAMPLE_BYTES)}):
            f.seek(offset)
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _stats(prefix: str) -> dict[str, dict]:
    out = {}
    for ext, path in (("idx", idx_path(prefix)), ("bin", bin_path(prefix))):
        st = os.stat(path)
        out[ext] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def _memo_key(prefix: str, stats: dict) -> tuple:
    return (os.path.abspath(prefix),) + tuple(
        (stats[e]["bytes"], stats[e]["mtime_ns"]) for e in ("idx", "bin"))


def _read_record(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None  # absent, or unreadable: validate again (and replace it)
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        return None
    return record


def _write_record(paths: list[str], record: dict) -> str | None:
    """Atomically write ``record`` to the first of ``paths`` that can be written."""
    for path in paths:
        tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
            return path
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
    return None


def _record_of(check: DatasetCheck, files: dict, checked_by: str) -> dict:
    fields = {k: v for k, v in asdict(check).items() if k not in ("prefix", "record")}
    return {"version": RECORD_VERSION, "prefix": os.path.abspath(check.prefix),
            "checked_by": checked_by, **files, **fields}


def _check_of(prefix: str, record: dict, path: str | None) -> DatasetCheck:
    return DatasetCheck(prefix, record["dtype"], record["num_documents"],
                        record["num_sequences"], record["num_tokens"], record["min_token_id"],
                        record["max_token_id"], path)


def write_record(prefix: str, dtype: np.dtype, num_documents: int, num_sequences: int,
                 num_tokens: int, min_token_id: int | None, max_token_id: int | None,
                 checked_by: str = "writer") -> str | None:
    """The writer's record of a dataset it has just published (the pair is consistent by
    construction); returns its path, or None when it could not be written."""
    check = DatasetCheck(prefix, str(np.dtype(dtype)), num_documents, num_sequences,
                         num_tokens, min_token_id, max_token_id, None)
    stats = _stats(prefix)
    for ext, path in (("idx", idx_path(prefix)), ("bin", bin_path(prefix))):
        stats[ext]["fingerprint"] = file_fingerprint(path)
    return _write_record([record_path(prefix)], _record_of(check, stats, checked_by))


def remove_record(prefix: str) -> None:
    """Drop the record beside ``prefix`` (the writer does, before replacing the dataset)."""
    try:
        os.remove(record_path(prefix))
    except FileNotFoundError:
        pass


# -- validation -------------------------------------------------------------------------------
def token_range(path: str, dtype: np.dtype) -> tuple[int | None, int | None]:
    """Smallest and largest token id in a ``.bin``, block by block (flat memory)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        return None, None
    low = high = None
    with open(path, "rb") as f:
        while True:
            block = np.fromfile(f, dtype=dtype, count=_SCAN_BYTES // dtype.itemsize)
            if block.size == 0:
                return low, high
            lo, hi = int(block.min()), int(block.max())
            low = lo if low is None else min(low, lo)
            high = hi if high is None else max(high, hi)


def scan_dataset(prefix: str) -> DatasetCheck:
    """The full validation (``check_indexed_dataset``) and the token range: one pass over the
    ``.idx`` and one over the ``.bin``."""
    info = check_indexed_dataset(prefix, full=True)
    low, high = token_range(info.bin_path, info.dtype)
    return DatasetCheck(prefix, str(info.dtype), info.num_documents, info.sequence_count,
                        info.num_tokens, low, high, None)


def validated_dataset_info(prefix: str, cache_dir: str | None = None) -> DatasetCheck:
    """``prefix`` validated in full, from its check record when that still describes the files,
    else by a scan whose result is then recorded (beside the data, or in ``cache_dir``).

    Raises:
        IndexedDatasetError: a missing or corrupt file, naming it and the fix.
        DatasetMismatchError: the ``.bin`` and ``.idx`` were not written together.
    """
    try:
        stats = _stats(prefix)
    except OSError:
        check_indexed_dataset(prefix, full=False)  # names the missing file and the fix
        raise
    key = _memo_key(prefix, stats)
    if key in _validated:
        return _validated[key]
    records = [(p, r) for p in _candidate_paths(prefix, cache_dir)
               if (r := _read_record(p)) is not None]
    for path, record in records:
        if all(record.get(e, {}).get(k) == stats[e][k] for e in stats for k in stats[e]):
            _validated[key] = check = _check_of(prefix, record, path)
            return check
    for ext, path in (("idx", idx_path(prefix)), ("bin", bin_path(prefix))):
        stats[ext]["fingerprint"] = file_fingerprint(path)
    for path, record in records:
        mixed = _mixed_pair(prefix, path, record, stats, cache_dir)
        if mixed is not None:
            check_indexed_dataset(prefix, full=True)  # a corrupt file: the precise error first
            raise mixed
    why = "its check record is out of date" if records else "it has no check record yet"
    logger.info("validating %s (%s): reading the whole .idx and .bin once", prefix, why)
    started = time.perf_counter()
    check = scan_dataset(prefix)
    path = _write_record(_candidate_paths(prefix, cache_dir), _record_of(check, stats, "scan"))
    logger.info("validated %s in %.1f s: %d documents, %d tokens, ids %s..%s%s", prefix,
                time.perf_counter() - started, check.num_documents, check.num_tokens,
                check.min_token_id, check.max_token_id,
                f"; recorded in {path}" if path else "")
    if path is None:
        logger.warning("could not write the check record of %s (read-only directory?): the "
                       "validation runs again next time; --data-cache-path DIR keeps it",
                       prefix)
    _validated[key] = check = replace(check, record=path)
    return check


def _mixed_pair(prefix: str, path: str, record: dict, stats: dict,
                cache_dir: str | None) -> DatasetMismatchError | None:
    """The error when one file of the pair is unchanged since ``record`` and the other was
    replaced; None when both are unchanged (a copy, a touch) or both replaced (a new dataset),
    which are validated again."""
    same = {e: record.get(e, {}).get("fingerprint") == stats[e]["fingerprint"]
            for e in ("idx", "bin")}
    if same["idx"] == same["bin"]:
        return None
    changed, kept = ("bin", "idx") if same["idx"] else ("idx", "bin")
    changed_path, kept_path = f"{prefix}.{changed}", f"{prefix}.{kept}"
    source = _owner(stats[changed]["fingerprint"], changed, prefix, cache_dir)
    if source is not None:
        return DatasetMismatchError(
            f"{changed_path} does not belong with {kept_path}: it is {source}.{changed} (same "
            f"fingerprint), so the .bin/.idx files of {prefix} and {source} are swapped or "
            f"mixed up; put each dataset's .bin and .idx back together (or regenerate "
            f"{prefix}).")
    return DatasetMismatchError(
        f"{changed_path} has been replaced since {kept_path} was written with it (its "
        f"fingerprint differs from the one in {path}, the .{kept}'s does not): the pair comes "
        f"from different datasets; put the matching .{changed} back or regenerate {prefix}. If "
        f"you replaced it on purpose with a consistent file, delete {path}.")


def _owner(fingerprint: str, ext: str, prefix: str, cache_dir: str | None) -> str | None:
    """The dataset another record in the same directories says this file belongs to."""
    own = os.path.abspath(prefix)
    directories = {os.path.dirname(p) for p in _candidate_paths(prefix, cache_dir)}
    for directory in sorted(directories):
        for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*.json"))):
            record = _read_record(path)
            if (record and record.get("prefix") != own
                    and record.get(ext, {}).get("fingerprint") == fingerprint):
                return record["prefix"]
    return None


# -- before training --------------------------------------------------------------------------
def check_vocabulary(check: DatasetCheck, vocab_size: int) -> None:
    """Every token id of the dataset is a token of the (unpadded) vocabulary."""
    if check.max_token_id is not None and check.max_token_id >= vocab_size:
        raise DatasetMismatchError(
            f"{check.prefix}: token ids go up to {check.max_token_id} but the tokenizer has "
            f"{vocab_size} tokens (ids 0..{vocab_size - 1}); the data was made with another "
            f"tokenizer. Train with the tokenizer that preprocessed it (--tokenizer-type/"
            f"--tokenizer-model; --vocab-size for NullTokenizer), or preprocess the data again "
            f"with this one.")
    if check.min_token_id is not None and check.min_token_id < 0:
        raise DatasetMismatchError(
            f"{check.prefix}: holds negative token ids (down to {check.min_token_id}); it is "
            f"not tokenized text: preprocess the data again.")


def check_training_data(prefixes: list[str], vocab_size: int,
                        cache_dir: str | None = None) -> list[DatasetCheck]:
    """Validate each dataset (once, recorded) and check it fits a ``vocab_size`` tokenizer.

    In a distributed run rank 0 does the work and every rank gets its result, or raises its
    error: no rank waits on one that failed, and no dataset is scanned by every rank.
    """
    import torch.distributed as dist

    from megatron_longctx.data.formats.shard_concat import expand_entry, names_several

    # a directory or glob entry stands for its datasets (DECISIONS.md 5)
    prefixes = list(dict.fromkeys(q for p in prefixes
                                  for q in (expand_entry(p) if names_several(p) else [p])))
    distributed = dist.is_available() and dist.is_initialized()
    outcome: list[DatasetCheck] | Exception | None = None
    if not distributed or dist.get_rank() == 0:
        try:
            outcome = [validated_dataset_info(p, cache_dir) for p in prefixes]
            for check in outcome:
                check_vocabulary(check, vocab_size)
        except (ValueError, OSError) as err:
            outcome = err
    if distributed:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
        if isinstance(outcome, list) and dist.get_rank() != 0:
            for check in outcome:  # so that opening the dataset later does not scan it again
                _validated[_memo_key(check.prefix, _stats(check.prefix))] = check
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
