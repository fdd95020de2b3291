"""Document-length statistics: counts, a power-of-two histogram, long-document counts.

For long-context training what matters is how many documents reach the target lengths, so the
histogram buckets are powers of two (bucket k holds lengths in [2**(k-1), 2**k)) and the
summary counts documents of at least 32k, 64k and 128k tokens. Updating is vectorised per
batch of lengths; memory is a fixed 64-bucket array.
"""

from __future__ import annotations

import numpy as np

LONG_THRESHOLDS = (32768, 65536, 131072)  # powers of two: read off the histogram exactly


class LengthStats:
    def __init__(self) -> None:
        self.buckets = np.zeros(65, dtype=np.int64)  # index = bit length of the token count
        self.documents = 0
        self.tokens = 0
        self.max_length = 0

    def update(self, lengths: np.ndarray) -> None:
        """Add documents; ``lengths`` [documents] tokens each."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size == 0:
            return
        # frexp's exponent of n > 0 is its bit length (exact below 2**53); 0 -> bucket 0
        bits = np.frexp(lengths.astype(np.float64))[1]
        self.buckets += np.bincount(bits, minlength=self.buckets.size)[:self.buckets.size]
        self.documents += lengths.size
        self.tokens += int(lengths.sum())
        self.max_length = max(self.max_length, int(lengths.max()))

    def merge(self, other: LengthStats) -> None:
        """Add another run's documents (shards, partitions)."""
        self.buckets += other.buckets
        self.documents += other.documents
        self.tokens += other.tokens
        self.max_length = max(self.max_length, other.max_length)

    def at_least(self, threshold: int) -> int:
        """Documents with >= ``threshold`` tokens (``threshold`` a power of two)."""
        if threshold & (threshold - 1):
            raise ValueError(f"threshold {threshold} is not a power of two.")
        return int(self.buckets[threshold.bit_length():].sum())

    def format(self, width: int = 40) -> str:
        mean = self.tokens / self.documents if self.documents else 0.0
        lines = [f"documents: {self.documents:,}",
                 f"tokens: {self.tokens:,} (mean {mean:,.1f} per document, max "
                 f"{self.max_length:,})"]
        nonzero = np.nonzero(self.buckets)[0]
        if nonzero.size:
            lines.append("document length histogram (tokens):")
            peak = int(self.buckets.max())
            for k in range(int(nonzero[0]), int(nonzero[-1]) + 1):
                low, high = (0, 1) if k == 0 else (1 << (k - 1), 1 << k)
                count = int(self.buckets[k])
                bar = "#" * (round(width * count / peak) if count else 0)
                lines.append(f"  [{_short(low):>6s}, {_short(high):>6s})  {count:>12,}  "
                             f"{100 * count / self.documents:5.1f}%  {bar}")
        for threshold in LONG_THRESHOLDS:
            count = self.at_least(threshold)
            share = 100 * count / self.documents if self.documents else 0.0
            lines.append(f"documents >= {_short(threshold):>4s} tokens: {count:,} ({share:.2f}%)")
        return "\n".join(lines)


def _short(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("k", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
