"""Splitting a corpus into shards (``--num-shards``/``--shard-index``, one Slurm array task each)
and partitions (``--partitions``, parallel parts on one node), and finding finished shards.

**The split** is a pure function of the input list (files in ``--input`` order, each glob
sorted) and the number of parts: every file contributes a weight (bytes on disk; a Parquet row
group its compressed bytes), the total is cut into equal spans, and

* a plain ``.jsonl`` file is cut at those byte offsets; a line belongs to the part holding its
  first byte, so each line is read by exactly one part;
* a ``.gz``/``.zst`` file (it cannot be entered in the middle) and a Parquet row group go whole
  to the part holding their middle.

Parts are contiguous in input order, so concatenating the parts' datasets in part order gives
the documents of a one-process run in the same order, byte for byte.

**Shard outputs** are ``{prefix}_shard{i:05d}_{key}_{level}.{bin,idx}`` (each published
atomically) and then ``{prefix}_shard{i:05d}_summary.json``: the shard's documents, tokens,
input bytes, skipped records by reason and seconds, the part of the input it read, and a
fingerprint of the run's settings. The summary is written last, so it marks the shard as
finished: a rerun skips a shard whose summary matches its settings and whose files have the
recorded sizes, and redoes any other.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from megatron_longctx.data.formats.side_data import is_side_data
from megatron_longctx.data.preprocessing.input_files import InputFile, import_parquet

SHARD_RE = re.compile(
    r"^(?P<run>.*)_shard(?P<index>\d{5})_(?P<key>.+)_(?P<level>document|sentence)$")
SUMMARY_VERSION = 1


def shard_prefix(output_prefix: str, index: int) -> str:
    return f"{output_prefix}_shard{index:05d}"


def summary_path(output_prefix: str, index: int) -> str:
    return f"{shard_prefix(output_prefix, index)}_summary.json"


# -- which shard am I ---------------------------------------------------------------------------
def resolve_shard(num_shards: int | None, shard_index: int | None,
                  env: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """``(index, count)`` of this shard, or None for an unsharded run.

    Flags win; otherwise inside a Slurm job array the task's position in the array
    (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``).
    """
    if num_shards is None and shard_index is None:
        if "SLURM_ARRAY_TASK_ID" not in env:
            return None
        try:
            task, low = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_MIN"])
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
            step = int(env.get("SLURM_ARRAY_TASK_STEP", "1"))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"inside a Slurm job array but SLURM_ARRAY_TASK_ID/_MIN/_COUNT are "
                             f"unusable ({exc}); pass --num-shards and --shard-index.") from None
        index = task - low
        if step != 1 or not 0 <= index < count:
            raise ValueError(f"Slurm array task {task} (min {low}, count {count}, step {step}) "
                             f"is not one of consecutive shards 0..{count - 1}: submit the "
                             f"array as --array=0-{count - 1} (no step, no gaps) or pass "
                             f"--num-shards and --shard-index.")
        num_shards, shard_index = count, index
    if num_shards is None or shard_index is None:
        raise ValueError("--num-shards and --shard-index go together (or neither, inside a "
                         "Slurm job array).")
    if num_shards < 1:
        raise ValueError(f"--num-shards must be >= 1, got {num_shards}.")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must be in 0..{num_shards - 1} (--num-shards "
                         f"{num_shards}), got {shard_index}.")
    return shard_index, num_shards


# -- the split ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Unit:
    file: InputFile
    weight: int
    splittable: bool


def _units(files: Sequence[InputFile]) -> list[_Unit]:
    units = []
    for f in files:
        if f.format == "parquet":
            units += _row_group_units(f)
        elif f.format == "jsonl":
            end = f.size if f.end is None else f.end
            units.append(_Unit(f, max(0, end - f.start), True))
        else:
            units.append(_Unit(f, f.size, False))
    return units


def _row_group_units(f: InputFile) -> list[_Unit]:
    meta = import_parquet(f.path).ParquetFile(f.path).metadata
    row = 1
    units = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        if g >= f.start and (f.end is None or g < f.end):
            weight = sum(group.column(c).total_compressed_size for c in range(group.num_columns))
            units.append(_Unit(InputFile(f.path, f.format, f.size, g, g + 1, row), weight, False))
        row += group.num_rows
    return units


def split_inputs(files: Sequence[InputFile], parts: int) -> list[list[InputFile]]:
    """``parts`` contiguous lists of (parts of) files; see the module docstring."""
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts")
    units = _units(files)
    total = sum(u.weight for u in units)
    bounds = [k * total // parts for k in range(parts + 1)]
    out: list[list[InputFile]] = [[] for _ in range(parts)]
    offset = 0
    for unit in units:
        low, high = offset, offset + unit.weight
        offset = high
        if unit.splittable and unit.weight > 0:
            for k in range(parts):
                a, b = max(bounds[k], low), min(bounds[k + 1], high)
                if a < b:
                    start = unit.file.start + (a - low)
                    end = unit.file.start + (b - low)
                    _append(out[k], _byte_range(unit.file, start, end))
        else:
            middle = low + unit.weight // 2
            k = next((k for k in range(parts) if middle < bounds[k + 1]), parts - 1)
            _append(out[k], unit.file)
    return out


def _byte_range(f: InputFile, start: int, end: int) -> InputFile:
    whole = start == 0 and end >= f.size
    return InputFile(f.path, f.format, f.size, start, None if whole else end)


def _append(part: list[InputFile], f: InputFile) -> None:
    """Add ``f`` to a part, joining it with the part's last piece when they are adjacent
    ranges of the same Parquet file."""
    last = part[-1] if part else None
    if (last is not None and f.format == "parquet" and last.path == f.path
            and last.end == f.start):
        part[-1] = InputFile(f.path, f.format, f.size, last.start, f.end, last.first_row)
    else:
        part.append(f)


# -- summaries ----------------------------------------------------------------------------------
@dataclass
class ShardSummary:
    shard_index: int
    num_shards: int
    fingerprint: str  # of the run's settings: equal across the shards of one run
    inputs: list[dict]  # the part of the input this shard read
    outputs: dict[str, dict] = field(default_factory=dict)  # key -> prefix, documents, ...
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    version: int = SUMMARY_VERSION

    def write(self, path: str) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: str) -> ShardSummary | None:
        """The summary at ``path``; None if there is none or it is not one of ours."""
        try:
            with open(path) as f:
                data = json.load(f)
            return cls(**data) if data.get("version") == SUMMARY_VERSION else None
        except (OSError, ValueError, TypeError):
            return None

    def problem(self, fingerprint: str | None = None) -> str | None:
        """Why this finished shard cannot be used (None: it can)."""
        if fingerprint is not None and self.fingerprint != fingerprint:
            return "it was made with other settings or inputs"
        for info in self.outputs.values():
            for ext in ("bin", "idx"):
                path = f"{info['prefix']}.{ext}"
                if not os.path.isfile(path) or os.path.getsize(path) != info[f"{ext}_bytes"]:
                    return f"{path} is missing or has changed since"
        return None


def output_record(prefix: str, documents: int, tokens: int) -> dict:
    return {"prefix": prefix, "documents": documents, "tokens": tokens,
            "bin_bytes": os.path.getsize(f"{prefix}.bin"),
            "idx_bytes": os.path.getsize(f"{prefix}.idx")}


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# -- finding the shards of a run ----------------------------------------------------------------
def resolve_prefixes(entries: Sequence[str]) -> list[str]:
    """Dataset prefixes named by prefixes, directories (every dataset in it, sorted, as
    Megatron-LM's merge tool reads one) or globs of prefixes (sorted)."""
    prefixes: list[str] = []
    for entry in entries:
        if entry.endswith((".bin", ".idx")):
            entry = entry[:-4]
        if os.path.isdir(entry):
            found = sorted(p[:-4] for p in glob.glob(os.path.join(glob.escape(entry), "*.idx"))
                           if not is_side_data(p[:-4]))
            if not found:
                raise ValueError(f"--input {entry} is a directory without any .idx file.")
            prefixes += found
        elif glob.has_magic(entry):
            found = sorted(p[:-4] for p in glob.glob(entry + ".idx") if not is_side_data(p[:-4]))
            if not found:
                raise ValueError(f"--input {entry!r} matches no dataset ({entry}.idx); check the "
                                 f"pattern.")
            prefixes += found
        else:
            prefixes.append(entry)
    return prefixes


def check_shard_set(prefixes: Sequence[str]) -> None:
    """For the inputs of a merge that are shards of a preprocessing run (their summaries
    exist): every shard of each run has finished, with the same settings, and each shard holding
    documents is in ``prefixes`` exactly once. Raises ``ValueError`` naming what is missing."""
    runs: dict[tuple[str, str, str], list[int]] = {}
    for prefix in prefixes:
        match = SHARD_RE.match(prefix)
        if match and os.path.exists(summary_path(match["run"], int(match["index"]))):
            key = (match["run"], match["key"], match["level"])
            runs.setdefault(key, []).append(int(match["index"]))
    for (run, key, level), given in runs.items():
        if len(set(given)) != len(given):
            raise ValueError(f"a shard of {run} is listed twice among the inputs.")
        summaries = {}
        for path in glob.glob(f"{glob.escape(run)}_shard[0-9][0-9][0-9][0-9][0-9]_summary.json"):
            summary = ShardSummary.read(path)
            if summary is not None:
                summaries[summary.shard_index] = summary
        counts = {s.num_shards for s in summaries.values()}
        fingerprints = {s.fingerprint for s in summaries.values()}
        if len(counts) > 1 or len(fingerprints) > 1:
            raise ValueError(f"the shard summaries of {run} come from different runs (numbers "
                             f"of shards {sorted(counts)}); rerun every shard with the same "
                             f"flags.")
        count = counts.pop()
        missing = [i for i in range(count) if i not in summaries]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise ValueError(f"shard(s) {shown} of {count} of {run} have not finished (no "
                             f"{os.path.basename(summary_path(run, missing[0]))}); rerun "
                             f"them (the same command with --shard-index, or the array task), "
                             f"then merge.")
        for i, summary in sorted(summaries.items()):
            problem = summary.problem()
            if problem:
                raise ValueError(f"shard {i} of {run} is not usable: {problem}; rerun it.")
            holds = key in summary.outputs
            if holds and i not in given:
                raise ValueError(f"{shard_prefix(run, i)}_{key}_{level} (shard {i} of {count}) "
                                 f"is missing from the inputs of the merge.")
