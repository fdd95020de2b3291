"""Long-context evaluation: the shared scorer (token negative log-likelihood, perplexity) and
perplexity by context length."""

from megatron_longctx.eval.perplexity import perplexity_by_length, sliding_window_nll
from megatron_longctx.eval.scoring import perplexity, token_nll

__all__ = ["perplexity", "perplexity_by_length", "sliding_window_nll", "token_nll"]
