"""Fixed-length training samples cut from one stream of documents joined by EOD.

Sample ``i`` holds tokens ``[i*s, (i+1)*s]`` (``s+1`` tokens: inputs and shifted labels). This is
the zero-setup source (stdlib corpus); ``megatron_longctx.data.samples.long_context_dataset``
builds document-aware samples from Megatron ``.bin/.idx`` data.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_longctx.data.corpora.stdlib_corpus import stdlib_documents
from megatron_longctx.data.samples.long_context_dataset import SampleOptions, build_sample
from megatron_longctx.data.tokenization.tokenizers import ByteTokenizer


def stdlib_token_stream(tokenizer: ByteTokenizer | None = None, max_docs: int | None = None
                        ) -> np.ndarray:
    tokenizer = tokenizer or ByteTokenizer()
    parts = []
    for text in stdlib_documents(max_docs=max_docs):
        parts.append(np.asarray(tokenizer.tokenize(text), dtype=np.int32))
        parts.append(np.array([tokenizer.eod], dtype=np.int32))
    return np.concatenate(parts)


class TokenStreamDataset(torch.utils.data.Dataset):
    """Samples of a flat token stream; documents end at EOD tokens."""

    def __init__(self, tokens: np.ndarray, seq_length: int, options: SampleOptions | None = None):
        self.tokens = tokens
        self.seq_length = seq_length
        self.options = options or SampleOptions(seq_length, eod=ByteTokenizer.eod)
        self.num_samples = (len(tokens) - 1) // seq_length
        if self.num_samples < 1:
            raise ValueError(f"token stream of {len(tokens)} tokens is shorter than one sample "
                             f"of --seq-length {seq_length}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        start = (idx % self.num_samples) * self.seq_length
        chunk = self.tokens[start:start + self.seq_length + 1].astype(np.int64)
        doc_starts = np.concatenate([[0], np.nonzero(chunk[:-1] == self.options.eod)[0] + 1])
        return build_sample(chunk, doc_starts, self.options)
