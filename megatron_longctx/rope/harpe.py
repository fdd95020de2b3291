"""HARPE base sets (arXiv 2412.07171): one RoPE base per attention head (per KV group).

* ``uniform_ascending`` / ``uniform_descending``: ``b_h = b_min + h (b_max - b_min) / (N - 1)``.
* ``peak_valley``: the "Attention Buckets" search (Chen et al. 2023, arXiv 2312.04455) that the
  HARPE paper uses. Each base ``b`` has the attention waveform
  ``w_b(m) = (2 / sqrt(d)) sum_j cos(m b^(-2j/d))`` over relative positions ``m``; we want the
  peaks of one head's waveform to fall on the valleys of the others', so that some head always
  attends well at any distance. Candidates are ``b_min + i * stride`` up to ``b_max``; start
  with ``{b_min}`` and greedily add the unused candidate minimising
  ``sum_{s in selected} sum_k |P_c[k] - V_s[k]| + |V_c[k] - P_s[k]|`` where ``P``/``V`` are the
  positions of the first ``K`` local maxima/minima of each waveform over ``m`` in ``[0, M)``.

Neither paper gives ``M`` nor how peak lists of different lengths are paired, and no code
for the search is public. We pair the first ``K = min`` extrema in order and use ``M = 4096``
(Llama-2's pretraining length, where HARPE starts). For the paper's setting (32 heads, d=128,
1M-5M, stride 30k) this shares 6 of its 32 published bases (1.00, 2.65, 2.74, 3.01, 3.04, 3.46);
we also tried M in {8k, 16k, 32k, 64k} and nearest-extremum pairing, which share 4-11. Like the
paper, the set spans the range with clusters at stride spacing. The published list is
:data:`PAPER_BASES_LLAMA2_7B`; pass it as ``harpe_bases`` to reproduce the paper exactly.
"""

from __future__ import annotations

import numpy as np

WAVEFORM_POSITIONS = 4096

# HARPE paper, Llama-2-7B (32 heads, d=128), range 1M-5M, stride 30k (arXiv 2412.07171)
PAPER_BASES_LLAMA2_7B = [b * 1e6 for b in (
    1.00, 1.15, 1.30, 1.45, 2.17, 2.20, 2.23, 2.47, 2.50, 2.65, 2.68, 2.71, 2.74, 2.80, 2.83, 2.92,
    3.01, 3.04, 3.10, 3.13, 3.16, 3.22, 3.43, 3.46, 3.61, 3.88, 4.09, 4.15, 4.39, 4.45, 4.51, 4.54)]


def waveform(base: float, dim: int, positions: int = WAVEFORM_POSITIONS) -> np.ndarray:
    """``w_b(m)`` for m = 0..positions-1, float64."""
    theta = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)  # [d/2]
    m = np.arange(positions, dtype=np.float64)[:, None]
    return 2.0 / np.sqrt(dim) * np.cos(m * theta).sum(axis=1)


def extrema(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of interior local maxima (peaks) and minima (valleys); on a plateau the first
    sample counts."""
    left, mid, right = wave[:-2], wave[1:-1], wave[2:]
    peaks = np.nonzero((mid > left) & (mid >= right))[0] + 1
    valleys = np.nonzero((mid < left) & (mid <= right))[0] + 1
    return peaks, valleys


def _mismatch(a: np.ndarray, b: np.ndarray) -> float:
    k = min(len(a), len(b))
    return float(np.abs(a[:k] - b[:k]).sum())


def peak_valley_bases(count: int, base_min: float, base_max: float, stride: float, dim: int,
                      positions: int = WAVEFORM_POSITIONS) -> list[float]:
    """Greedy peak/valley-complementary base set of size ``count`` (ascending order)."""
    candidates = base_min + stride * np.arange(int((base_max - base_min) // stride) + 1)
    if len(candidates) < count:
        raise ValueError(f"only {len(candidates)} candidate bases for {count} heads")
    ext = [extrema(waveform(float(b), dim, positions)) for b in candidates]
    selected = [0]
    # cost[i] accumulates candidate i's mismatch against every selected base
    cost = np.zeros(len(candidates))
    while len(selected) < count:
        s = selected[-1]
        ps, vs = ext[s]
        for i, (pc, vc) in enumerate(ext):
            cost[i] += _mismatch(pc, vs) + _mismatch(vc, ps)
        order = np.argsort(cost, kind="stable")
        chosen = next(int(i) for i in order if i not in selected)
        selected.append(chosen)
    return sorted(float(candidates[i]) for i in selected)


def harpe_bases(scheme: str, count: int, base_min: float, base_max: float, stride: float,
                dim: int) -> list[float]:
    """``count`` bases (one per KV group) for ``scheme``."""
    if scheme == "peak_valley":
        return peak_valley_bases(count, base_min, base_max, stride, dim)
    if count == 1:
        uniform = [float(base_min)]
    else:
        uniform = [base_min + h * (base_max - base_min) / (count - 1) for h in range(count)]
    if scheme == "uniform_ascending":
        return uniform
    if scheme == "uniform_descending":
        return uniform[::-1]
    raise ValueError(f"unknown HARPE scheme {scheme!r}")
