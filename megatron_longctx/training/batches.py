"""Which samples each rank sees: deterministic in (seed, step), independent of the layout.

Global batch ``t`` is ``G`` consecutive entries of a seeded permutation of the dataset; DP rank
``r`` takes its contiguous ``G / dp`` slice, cut into micro-batches. Any DP size therefore trains
on exactly the same global batches, which is what makes layouts comparable and resumable.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch


class GlobalBatchSampler:
    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self._orders: dict[int, np.ndarray] = {}  # the epochs in use (a step spans <= 2)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = (
                np.random.default_rng((self.seed, epoch)).permutation(self.num_samples)
                if self.shuffle else np.arange(self.num_samples))
        return self._orders[epoch]

    def global_batch(self, step: int) -> np.ndarray:
        start = step * self.global_batch_size
        idx = np.arange(start, start + self.global_batch_size)
        epochs, offsets = np.divmod(idx, self.num_samples)
        orders = {e: self._epoch_order(int(e)) for e in np.unique(epochs)}
        return np.array([orders[e][o] for e, o in zip(epochs, offsets)])

    def micro_batches(self, step: int) -> list[np.ndarray]:
        local = self.global_batch_size // self.dp_size
        mine = self.global_batch(step)[self.dp_rank * local:(self.dp_rank + 1) * local]
        return [mine[i:i + self.micro_batch_size] for i in range(0, local, self.micro_batch_size)]


def stack_samples(samples: list[dict]) -> dict:
    """Stack samples; per-sample lists (``doc_starts``) stay lists."""
    return {k: [s[k] for s in samples] if isinstance(samples[0][k], list)
            else torch.stack([s[k] for s in samples]) for k in samples[0]}


def collate(dataset, indices, prepare: Callable[[dict], dict] | None = None) -> dict:
    """Samples ``indices`` stacked; ``prepare``: what the rank keeps of them
    (:meth:`.batch_broadcast.StageBatches.prepare`)."""
    return _stack_and_prepare(prepare, [dataset[int(i)] for i in indices])


def _stack_and_prepare(prepare: Callable[[dict], dict] | None, samples: list[dict]) -> dict:
    batch = stack_samples(samples)
    return prepare(batch) if prepare is not None else batch


class _StepIndices:
    """The micro-batch index lists of steps ``first, first + 1, ...``, endlessly."""

    def __init__(self, sampler: GlobalBatchSampler, first: int):
        self.sampler, self.first = sampler, first

    def __iter__(self):
        step = self.first
        while True:
            for indices in self.sampler.micro_batches(step):
                yield [int(i) for i in indices]
            step += 1


class PrefetchingLoader:
    """``--num-workers N``: N worker processes (torch's DataLoader, as Megatron-LM's) read and
    collate the micro-batches of the coming steps while the current step trains. Steps are
    consumed in order; asking for another step (a resume) restarts the workers there.
    ``prepare`` runs in the workers too, so the main process receives only what it keeps."""

    def __init__(self, dataset, sampler: GlobalBatchSampler, num_workers: int,
                 prepare: Callable[[dict], dict] | None = None):
        self.dataset, self.sampler, self.num_workers = dataset, sampler, num_workers
        self.prepare = prepare
        self._batches, self._next_step = None, None

    def micro_batches(self, step: int) -> list[dict]:
        if step != self._next_step:
            self.close()
            self._batches = iter(torch.utils.data.DataLoader(
                self.dataset, batch_sampler=_StepIndices(self.sampler, step),
                num_workers=self.num_workers,
                collate_fn=partial(_stack_and_prepare, self.prepare)))
        count = len(self.sampler.micro_batches(step))
        self._next_step = step + 1
        return [next(self._batches) for _ in range(count)]

    def close(self) -> None:
        """End the worker processes (also when the loader is garbage-collected)."""
        if self._batches is not None:
            self._batches._shutdown_workers()
        self._batches = self._next_step = None
