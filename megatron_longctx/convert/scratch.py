"""File-backed scratch tensors: conversion and merging hold whole models' worth of tensors
without holding them in the process's memory."""

from __future__ import annotations

import mmap
import os

import torch


class ScratchFiles:
    """Tensors backed by files in ``directory`` (shared mappings): what is written to them is
    page cache, written back and reclaimable, never the process's anonymous memory."""

    def __init__(self, directory: str):
        self.directory, self.count = directory, 0
        os.makedirs(directory, exist_ok=True)

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        path = os.path.join(self.directory, f"{self.count}.bin")
        self.count += 1
        nbytes = shape.numel() * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        with open(path, "w+b") as f:
            f.truncate(nbytes)
            buffer = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_WRITE)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)

    def __call__(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A file-backed copy of ``tensor`` (cast to ``dtype`` while copying)."""
        out = self.empty(tensor.shape, dtype or tensor.dtype)
        out.copy_(tensor)
        return out
