"""Perplexity by context length, with a sliding window over long documents.

Every token of a document but the first is scored exactly once, with a window of at most
``L`` tokens ending at it: the tokens are scored ``stride`` at a time (default ``L - 1``), each
span with the ``L`` tokens ending at its last one as input. So at every length the same tokens
are scored and only the context differs. Positions restart at 0 in each window: a window is
what the model sees at that context length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from megatron_longctx.eval.scoring import perplexity, token_nll


def sliding_window_nll(model, tokens: Tensor, length: int, stride: int | None = None
                       ) -> tuple[float, int]:
    """Sum of token NLLs and the number of tokens scored (``n - 1``), over one document
    ``[n]``, with windows of ``length`` tokens advancing by ``stride``."""
    stride = stride or length - 1
    if not 0 < stride < length:
        raise ValueError(f"--stride must be in [1, length - 1 = {length - 1}], got {stride}")
    total, count, position = 0.0, 0, 1  # next token to score (token 0 has no context)
    while position < len(tokens):
        end = min(position + stride, len(tokens))  # score tokens position .. end-1
        begin = max(0, end - length)
        nll = token_nll(model, tokens[None, begin:end])[0]  # tokens begin+1 .. end-1
        new = nll[position - begin - 1:]
        total += float(new.double().sum())
        count += new.numel()
        position = end
    return total, count


def perplexity_by_length(model, documents: Iterable[Tensor], lengths: Sequence[int],
                         stride: int | None = None, progress: Callable | None = None
                         ) -> dict[int, dict]:
    """``{L: {"ppl", "tokens", "documents"}}`` over the documents of at least ``max(lengths)``
    tokens, each cut to that many: every length scores the same tokens, with windows of ``L``
    (so only the context differs)."""
    longest = max(lengths)
    docs = [d[:longest] for d in documents if len(d) >= longest]
    if not docs:
        raise ValueError(f"no document has {longest} tokens (the longest --lengths); give "
                         f"longer documents or shorter lengths")
    results = {}
    for length in lengths:
        total, count = 0.0, 0
        for doc in docs:
            nll, n = sliding_window_nll(model, doc, length, stride)
            total, count = total + nll, count + n
            if progress:
                progress(length, n)
        results[length] = {"ppl": perplexity(total, count), "tokens": count,
                           "documents": len(docs)}
    return results


def long_documents(dataset, min_length: int, count: int, start: int = 0,
                   end: int | None = None) -> list[Tensor]:
    """The first ``count`` documents of an indexed dataset (megatron-core's ``IndexedDataset``)
    in ``[start, end)`` with at least ``min_length`` tokens."""
    lengths = dataset.sequence_lengths
    picked = []
    for i in range(start, len(lengths) if end is None else end):
        if len(picked) == count:
            break
        if lengths[i] >= min_length:
            picked.append(torch.from_numpy(dataset.get(i).astype("int64")))
    return picked
