"""Reading a checkpoint directory safely: its files are checked against its own index before
anything is loaded, and a failed read becomes one line naming the file and the fix.

A megatron-core ``torch_dist`` checkpoint is ``metadata.json`` (megatron-core's marker),
``common.pt`` (the common state: ``args``, ``iteration``...), ``.metadata`` (the index of
torch.distributed.checkpoint: for every item its ``.distcp`` file, offset and length) and the
``__<rank>_<k>.distcp`` shards. The index lets a missing or truncated shard be found with one
``stat`` per file, before any tensor is read. Corrupted bytes are found where torch's reader
notices them (each item is a zip record), and for the weights by a finiteness check after
loading: a bit flip that leaves finite values is not detectable without checksums, which
megatron-core does not write.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from contextlib import contextmanager

import torch
import torch.distributed as dist

REQUIRED = ("metadata.json", "common.pt", ".metadata")


def _fix(path: str) -> str:
    """How to get past a damaged checkpoint: another complete one of the same run, or a copy."""
    from megatron_longctx.training.checkpoint import completed_steps, step_dir

    root, name = os.path.split(os.path.normpath(path))
    if re.fullmatch(r"iter_\d+", name):
        others = [s for s in completed_steps(root) if step_dir(root, s) != os.path.normpath(path)]
        if others:
            return (f"resume from another checkpoint of {root} with --ckpt-step N (complete: "
                    f"{', '.join(map(str, others))}), or restore {path} from a copy")
    return f"restore {path} from a copy"


def _reason(err: BaseException) -> str:
    """The first line of an error message, short: torch's read errors add paragraphs."""
    if hasattr(err, "failures"):  # torch.distributed.checkpoint's CheckpointException
        err = next(iter(err.failures.values()))[0]
    text = (str(err).strip().splitlines() or [""])[0]
    text = text.split(". ")[0][:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def verify_files(path: str) -> None:
    """Raise ``ValueError`` naming the file when one of ``path``'s files is missing, unreadable
    or shorter than its index says (a copy cut short, a disk that filled up)."""
    for name in REQUIRED:
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"{os.path.join(path, name)} is missing: the checkpoint {path} is "
                             f"incomplete; {_fix(path)}")
    from torch.distributed.checkpoint import FileSystemReader

    index = os.path.join(path, ".metadata")
    try:
        metadata = FileSystemReader(path).read_metadata()
    except (EOFError, OSError, RuntimeError, pickle.UnpicklingError, AttributeError,
            ValueError) as err:
        raise ValueError(f"{index} is unreadable ({_reason(err)}): the checkpoint {path} is "
                         f"damaged; {_fix(path)}") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for relative, size in sorted(needed.items()):
        shard = os.path.join(path, relative)
        if not os.path.isfile(shard):
            raise ValueError(f"{shard} is missing (listed in {index}): the checkpoint is "
                             f"incomplete; {_fix(path)}")
        have = os.path.getsize(shard)
        if have < size:
            raise ValueError(f"{shard} is truncated ({have} bytes, its index needs {size}): "
                             f"the checkpoint is incomplete; {_fix(path)}")


class _Window(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file, as a seekable file of their own."""

    def __init__(self, f, offset: int, length: int):
        self._f, self._start, self._length, self._pos = f, offset, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self._pos = pos + (0, self._pos, self._length)[whence]
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(min(len(buffer), self._length - self._pos), 0)
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def damaged_shard(path: str) -> str | None:
    """The first ``.distcp`` file of ``path`` holding an item whose zip structure (each item is
    one ``torch.save`` archive) is broken; None if all look intact. Reads only the archives'
    directories, not the tensor bytes: called after a load failed, to name the file."""
    from torch.distributed.checkpoint import FileSystemReader

    by_file: dict[str, list] = {}
    for info in FileSystemReader(path).read_metadata().storage_data.values():
        by_file.setdefault(info.relative_path, []).append(info)
    for relative, items in sorted(by_file.items()):
        with open(os.path.join(path, relative), "rb") as f:
            for info in items:
                try:
                    with zipfile.ZipFile(_Window(f, info.offset, info.length)) as archive:
                        archive.infolist()
                except (zipfile.BadZipFile, OSError, ValueError, EOFError):
                    return os.path.join(path, relative)
    return None


@contextmanager
def read_errors(path: str, file: str | None = None):
    """Turn the errors of reading checkpoint ``path`` (torch's zip reader, unpickling,
    megatron-core's ``CheckpointingException``, torch's ``CheckpointException``) into one
    ``ValueError`` line naming the file (``file`` when only that one is read) and the fix."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (EOFError, RuntimeError, OSError, pickle.UnpicklingError, CheckpointingException,
            CheckpointException) as err:
        # torch.distributed.checkpoint drops the traceback that held the file being read
        where = file
        if where is None:
            try:
                where = damaged_shard(path) or path
            except Exception:  # noqa: BLE001 - only looking for a better name
                where = path
        raise ValueError(f"cannot read {where} ({_reason(err)}): the checkpoint is damaged; "
                         f"{_fix(path)}") from None


def check_finite(model, path: str) -> None:
    """Loaded weights that are NaN or infinite come from corrupted bytes (training never saves
    them: a non-finite loss stops the run first). Every rank agrees, so none trains alone."""
    bad = next((name for name, p in model.named_parameters()
                if not torch.isfinite(p).all()), None)
    if dist.is_initialized():
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, bad)
        bad = next((n for n in names if n), None)
    if bad:
        raise ValueError(f"{_shards_of(path, bad)}: the loaded weight {bad} holds NaN or "
                         f"infinite values (a corrupted shard); {_fix(path)}")


def _shards_of(path: str, name: str) -> str:
    """The shard files holding parameter ``name`` (its checkpoint key has no layer number:
    layers are stacked), or ``path`` when it cannot be told."""
    from torch.distributed.checkpoint import FileSystemReader

    key = re.sub(r"\.layers\.\d+\.", ".layers.", name.removeprefix("module."))
    try:
        storage = FileSystemReader(path).read_metadata().storage_data
    except Exception:  # noqa: BLE001 - only looking for a better name
        return path
    files = sorted({os.path.join(path, info.relative_path) for index, info in storage.items()
                    if index.fqn == key})
    return ", ".join(files) or path
