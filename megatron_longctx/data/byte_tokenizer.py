"""UTF-8 byte tokenizer: the zero-setup default (ids 0-255 are bytes, then special tokens)."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    vocab_size = 258
    bos = 256
    eod = 257

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")
