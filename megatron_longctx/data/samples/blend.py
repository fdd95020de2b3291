"""Which data a run trains and validates on, from Megatron-LM's data flags.

The rules are Megatron-LM's (``get_blend_and_blend_per_split`` in ``megatron.training.utils``,
``get_blend_from_list`` and ``BlendedMegatronDatasetBuilder`` in megatron-core):

* ``--data-path`` (or ``--data-args-path``: a file holding that list) with ``--split``: one
  blend; each source's documents are cut into train/valid/test ranges;
* ``--train-data-path`` / ``--valid-data-path`` / ``--test-data-path`` (or
  ``--per-split-data-args-path``, a JSON file): one blend per split, of whole datasets;
* a blend list is ``WEIGHT PREFIX`` pairs, or prefixes alone: then each source weighs its
  number of samples (one epoch of the documents it contributes), as megatron-core infers them.

``--mock-data`` is megatron-core's ``MockGPTDataset`` documents and ``--data-path stdlib`` the
built-in corpus. A run without any of these stops: it never trains on data nobody named.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from megatron_longctx.data.samples.packing import split_fractions

STDLIB = "stdlib"
DEFAULT_SPLIT = "969,30,1"  # Megatron-LM's legacy default with --data-path
MOCK_SPLIT = "1,1,1"  # megatron-core's split for mock data (it ignores --split)
SPLIT_NAMES = ("train", "valid", "test")


@dataclass(frozen=True)
class Blend:
    prefixes: tuple[str, ...]
    weights: tuple[float, ...] | None  # None: by the sources' sizes


@dataclass(frozen=True)
class DataSources:
    kind: str  # "blend" (--data-path + --split) | "per_split" | "mock" | "stdlib"
    blend: Blend | None = None
    per_split: tuple[Blend | None, ...] | None = None  # train, valid, test
    split: str | None = None

    def for_split(self, index: int) -> tuple[Blend, tuple[float, float]] | None:
        """Split ``index``'s (0 train, 1 valid, 2 test) blend and the fraction of each
        source's documents it reads; None when the split has no data."""
        if self.kind == "per_split":
            blend = self.per_split[index]
            return None if blend is None else (blend, (0.0, 1.0))
        bookends = split_fractions(self.split)[index]
        return None if bookends[1] <= bookends[0] else (self.blend, bookends)


def blend_from_list(values: list[str], flag: str = "--data-path") -> Blend:
    """megatron-core's ``get_blend_from_list``: an odd-length list or one whose first entries
    are not numbers is prefixes only; otherwise ``WEIGHT PREFIX`` pairs."""
    values = [str(v) for v in values]
    if not values:
        raise ValueError(f"{flag} is empty; give PREFIX [PREFIX ...] or WEIGHT PREFIX pairs")
    weights = None
    prefixes = values
    if len(values) % 2 == 0:
        parsed = [_number(w) for w in values[0::2]]
        if all(w is not None for w in parsed):
            weights, prefixes = parsed, values[1::2]
        elif any(w is not None for w in parsed):
            raise ValueError(f"{flag} {' '.join(values)}: mixes weights and prefixes; give "
                             f"WEIGHT PREFIX pairs for every source or prefixes only")
    if STDLIB in prefixes:
        raise ValueError(f"{flag}: the built-in corpus is used alone (--data-path {STDLIB}); it "
                         f"cannot be blended with other sources")
    if weights is not None and (min(weights) < 0 or sum(weights) <= 0):
        raise ValueError(f"{flag} {' '.join(values)}: weights must be non-negative with a "
                         f"positive sum")
    return Blend(tuple(prefixes), None if weights is None else tuple(weights))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _read_list(path: str, flag: str) -> list[str]:
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path} does not exist")
    with open(path) as f:
        return f.read().split()


def _read_per_split(path: str) -> tuple[Blend | None, ...]:
    flag = "--per-split-data-args-path"
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path} does not exist")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{flag} {path} is not JSON ({err})") from None
    if not isinstance(raw, dict) or set(raw) - set(SPLIT_NAMES):
        raise ValueError(f"{flag} {path}: expected an object with keys train, valid, test")
    blends = []
    for name in SPLIT_NAMES:
        value = raw.get(name)
        value = value.split() if isinstance(value, str) else value
        blends.append(blend_from_list(value, f"{flag} [{name}]") if value else None)
    return tuple(blends)


def resolve_data_sources(data) -> DataSources:
    """The data a :class:`~megatron_longctx.config.DataConfig` names, checked; raises
    ``ValueError`` saying what to give when it names none or contradicts itself."""
    per_split_lists = (data.train_data_path, data.valid_data_path, data.test_data_path)
    given = {
        "--data-path": data.data_path is not None,
        "--data-args-path": data.data_args_path is not None,
        "--train/valid/test-data-path": any(v is not None for v in per_split_lists),
        "--per-split-data-args-path": data.per_split_data_args_path is not None,
        "--mock-data": data.mock_data,
    }
    named = [flag for flag, on in given.items() if on]
    if not named:
        raise ValueError(
            "no training data: give --data-path PREFIX [PREFIX ...] (or WEIGHT PREFIX pairs), "
            "--train-data-path/--valid-data-path/--test-data-path, --data-args-path, or "
            f"--mock-data; the built-in corpus is --data-path {STDLIB}")
    if len(named) > 1:
        raise ValueError(f"{' and '.join(named)} exclude each other; give one of them")
    if data.mock_data:
        return DataSources("mock", split=MOCK_SPLIT)
    if data.data_path is not None or data.data_args_path is not None:
        values = (data.data_path if data.data_path is not None
                  else _read_list(data.data_args_path, "--data-args-path"))
        split = data.split or DEFAULT_SPLIT
        split_fractions(split)  # a malformed --split fails here
        if [str(v) for v in values] == [STDLIB]:
            return DataSources("stdlib", split=split)
        return DataSources("blend", blend=blend_from_list(values), split=split)
    if data.split is not None:
        raise ValueError("--split cuts --data-path sources into train/valid/test; with "
                         "per-split data paths each split has its own data: drop --split")
    if data.per_split_data_args_path is not None:
        blends = _read_per_split(data.per_split_data_args_path)
    else:
        blends = tuple(None if v is None else blend_from_list(v, f"--{name}-data-path")
                       for name, v in zip(SPLIT_NAMES, per_split_lists))
    if blends[0] is None:
        raise ValueError("per-split data without a training blend: give --train-data-path")
    return DataSources("per_split", per_split=blends)


def check_data_config(data) -> None:
    """``DataConfig.validate``: the sources and the loader settings, before any work."""
    resolve_data_sources(data)
    if data.dataloader_type not in ("single", "cyclic"):
        raise ValueError(f"--dataloader-type {data.dataloader_type!r}: use single (dataset "
                         f"order) or cyclic (reshuffled each epoch); 'external' needs a "
                         f"user-provided loader, which this trainer does not take")
    if data.tokenizer_type == "NullTokenizer" and not data.vocab_size:
        raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size N (token ids "
                         "0..N-1; N is the end-of-document id)")
    if data.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {data.num_workers}")


def samples_per_epoch(lengths: np.ndarray, doc_range: tuple[int, int], seq_length: int) -> int:
    """Samples of one pass over documents ``[doc_range)``: megatron-core's ``GPTDataset`` length
    without ``num_samples`` (each sample needs ``seq_length + 1`` tokens, consecutive samples
    share one), the weight of an unweighted source."""
    tokens = int(np.asarray(lengths[doc_range[0]:doc_range[1]], dtype=np.int64).sum())
    return max(tokens - 1, 0) // seq_length
