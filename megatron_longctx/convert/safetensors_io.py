"""Sharded safetensors (``model.safetensors.index.json``) read and written tensor by tensor.

The reader maps each shard (private, copy-on-write) and returns tensors that are views of the
mapping: their bytes are the file's pages in the page cache, never copied into process memory
until someone transforms them. Shapes come from the shard headers, so a checkpoint is checked
before any tensor is read. The writer
holds at most one shard's worth of tensors (``max_shard_bytes``) and writes transformers'
naming: ``model.safetensors`` alone, or ``model-0000k-of-0000n.safetensors`` plus the index.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_longctx.convert.hf_config import ConversionError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def map_file(path: str) -> torch.Tensor:
    """The bytes of ``path`` as a uint8 tensor over a private mapping: reads come from the page
    cache (file-backed, reclaimable), writes copy the page and never reach the file."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY),
                                dtype=torch.uint8)


def _header(path: str) -> tuple[int, dict]:
    """(offset of the data, header) of a safetensors file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return 8 + size, json.loads(f.read(size))


class SafetensorsReader:
    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.file_of = dict(json.load(f)["weight_map"])
        elif os.path.isfile(os.path.join(directory, SINGLE)):
            self.file_of = None
        else:
            raise ConversionError(f"{directory} holds neither {INDEX} nor {SINGLE} (only "
                                  f"safetensors checkpoints are supported)")
        files = sorted(set(self.file_of.values())) if self.file_of else [SINGLE]
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise ConversionError(f"{directory}: shard(s) {missing} listed in {INDEX} are "
                                  f"missing")
        self._handles, self._maps = {}, {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._entries: dict[tuple[str, str], tuple[int, dict]] = {}  # (file, name) -> header
        for name in files:
            start, header = _header(os.path.join(directory, name))
            for key, entry in header.items():
                if key != "__metadata__":
                    self._shapes[key] = tuple(entry["shape"])
                    self._entries[name, key] = (start, entry)
        if self.file_of is None:
            self.file_of = dict.fromkeys(self._shapes, SINGLE)
        absent = sorted(k for k, f in self.file_of.items() if (f, k) not in self._entries)
        if absent:
            raise ConversionError(f"{INDEX} lists {absent[:3]} but their shards do not hold them")

    def _open(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.directory, file), framework="pt")
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``, a view of its shard's mapping (a copy only for dtypes or offsets
        a view cannot express)."""
        if name not in self.file_of:
            raise ConversionError(f"tensor {name} is not in {self.directory}")
        file = self.file_of[name]
        start, entry = self._entries[file, name]
        dtype = _DTYPES.get(entry["dtype"])
        begin, end = entry["data_offsets"]
        if dtype is None or (start + begin) % dtype.itemsize:
            return self._open(file).get_tensor(name)
        if file not in self._maps:
            self._maps[file] = map_file(os.path.join(self.directory, file))
        return self._maps[file][start + begin:start + end].view(dtype).reshape(entry["shape"])

    def check(self, expected: dict[str, tuple[int, ...]], ignore: tuple[str, ...] = ()) -> None:
        """Every expected tensor present with its shape; nothing else but ``ignore`` matches."""
        problems = [f"{n}: missing (expected shape {s})" for n, s in expected.items()
                    if n not in self._shapes]
        problems += [f"{n}: shape {self._shapes[n]}, config implies {s}"
                     for n, s in expected.items() if n in self._shapes and self._shapes[n] != s]
        problems += [f"{n}: unexpected tensor" for n in self._shapes
                     if n not in expected and not n.endswith(ignore)]
        if problems:
            raise ConversionError(f"{self.directory} does not match its config.json:\n  "
                                  + "\n  ".join(problems[:10])
                                  + ("\n  ..." if len(problems) > 10 else ""))


class SafetensorsWriter:
    """``add`` tensors one at a time; ``close`` names the shards and writes the index."""

    def __init__(self, directory: str, max_shard_bytes: int = 5 * 2**30):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = os.path.join(self.directory, f".shard-{len(self._shards)}.tmp")
        save_file(self._buffer, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard and the index; returns the shard file names."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        names = [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                                         for k in range(n)]
        weight_map = {}
        for (tmp, tensors), name in zip(self._shards, names):
            os.replace(tmp, os.path.join(self.directory, name))
            weight_map.update(dict.fromkeys(tensors, name))
        if n > 1:
            with open(os.path.join(self.directory, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": self.total_bytes},
                           "weight_map": weight_map}, f, indent=2)
        return names
