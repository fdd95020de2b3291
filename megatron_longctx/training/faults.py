"""Deterministic fault injection for preemption tests (not for users).

``MEGATRON_LONGCTX_FAULT=POINT:ITERATION`` kills the process with SIGKILL at ``POINT``
(``iteration``: after that iteration's update and any save; ``save``: while saving that
iteration's checkpoint, after the shards are written and before it is renamed into place).
``nan:N`` puts a NaN in a weight before iteration N (see ``maybe_poison_weights``).
An environment variable, not a timer, so a test kills every rank at the same place.
"""

from __future__ import annotations

import os
import signal


def maybe_fault(point: str, iteration: int) -> None:
    spec = os.environ.get("MEGATRON_LONGCTX_FAULT")
    if spec and spec == f"{point}:{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_poison_weights(model, iteration: int) -> None:
    """``MEGATRON_LONGCTX_FAULT=nan:N``: a NaN in one weight before iteration N, as a bad
    update or a hardware fault would leave it."""
    if os.environ.get("MEGATRON_LONGCTX_FAULT") == f"nan:{iteration}":
        import torch

        weight = next(p for n, p in model.named_parameters() if "linear_qkv" in n)
        with torch.no_grad():  # a weight every token passes through, on every stage
            weight.view(-1)[0] = float("nan")
