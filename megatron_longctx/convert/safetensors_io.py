"""Sharded safetensors (``model.safetensors.index.json``) read and written tensor by tensor.

The reader opens each shard lazily with ``safe_open`` and reads one tensor per call; shapes
come from the shard headers, so a checkpoint is checked before any tensor is read. The writer
holds at most one shard's worth of tensors (``max_shard_bytes``) and writes transformers'
naming: ``model.safetensors`` alone, or ``model-0000k-of-0000n.safetensors`` plus the index.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_longctx.convert.hf_config import ConversionError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


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
        self._handles = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            handle = self._open(name)
            for key in handle.keys():
                self._shapes[key] = tuple(handle.get_slice(key).get_shape())
        if self.file_of is None:
            self.file_of = dict.fromkeys(self._shapes, SINGLE)
        absent = sorted(k for k in self.file_of if k not in self._shapes)
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
        if name not in self.file_of:
            raise ConversionError(f"tensor {name} is not in {self.directory}")
        return self._open(self.file_of[name]).get_tensor(name)

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
