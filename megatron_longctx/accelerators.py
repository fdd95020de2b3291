"""Optional GPU libraries (Transformer Engine, apex, flash-attention), imported in one place.

Each flag is true only when the library imports *and* CUDA is present, so CPU runs never touch
them and never warn about them.
"""

from __future__ import annotations

import importlib.util

import torch

CUDA = torch.cuda.is_available()


def _importable(name: str) -> bool:
    if not CUDA:
        return False
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAVE_TE = _importable("transformer_engine")
HAVE_APEX = _importable("apex")
HAVE_FLASH_ATTN = _importable("flash_attn")
