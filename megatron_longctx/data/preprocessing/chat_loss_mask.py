"""Which tokens of a rendered conversation are trained on (``preprocess_data.py
--mask-prompt-loss``), stored as side data ``loss_mask`` beside the dataset (DECISIONS.md 6).

The rule is the usual SFT one (transformers' ``return_assistant_tokens_mask``, Megatron-LM's
SFT ``tokenize_conversation``): only the assistant's replies are trained on; system, user and
tool messages, the BOS and the template's role markers (the assistant's own header included)
are masked.

* A template with ``{% generation %}`` blocks says itself what is trained on: exactly the text
  of those blocks, as ``return_assistant_tokens_mask`` takes it.
* Otherwise, for each message of role ``assistant`` at index ``i``, the text that rendering it
  adds after the assistant header: from the end of ``render(messages[:i],
  add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])``, i.e. its content
  plus whatever the template closes the turn with (``</s>``, ``<|im_end|>``, a newline), which
  the model must learn to emit. This needs a template that renders a conversation's prefixes as
  prefixes of the whole, as common templates do; a record where that fails is skipped as not a
  conversation, naming the fix (add ``{% generation %}`` blocks). A template without an
  ``add_generation_prompt`` branch has no header to subtract, so whatever it puts before a reply
  is trained on too (the space before a reply in Mistral's template, as Megatron-LM's SFT
  tokenizer does for it). Rendering every prefix costs two renders per reply (byte tokens,
  3-turn chats: 8.5 MB/s against 38 MB/s unmasked); the plain template has generation blocks.

Tokens: the text is tokenized whole, as without the flag (the ``.bin``/``.idx`` do not change);
a token is trained on when it overlaps trained text (transformers' rule). Token boundaries come
from tokenizing the text up to each span boundary, which needs no character offsets, so every
tokenizer type works. The EOD added by ``--append-eod`` is trained on (the model learns to end
the document, as in Megatron-LM's SFT dataset).

Values: one uint8 per token, 1 trained, 0 masked. The label of input position ``t`` is token
``t + 1``, so training multiplies its loss mask by the mask of ``tokens[1:]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from megatron_longctx.data.tokenization.tokenizers import Tokenizer

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


class RenderedChat(str):
    """A rendered conversation that carries its trained character spans: a ``str``, so the
    record checks and the tokenizer take it as any text while the spans ride along."""

    spans: tuple[tuple[int, int], ...]

    def __new__(cls, text: str, spans: Sequence[tuple[int, int]] = ()):
        obj = super().__new__(cls, text)
        obj.spans = tuple((int(a), int(b)) for a, b in spans)
        return obj


def masked_chat_renderer(template: str, variables: dict[str, str]
                         ) -> Callable[[list], RenderedChat]:
    """Like ``chat_render.chat_renderer`` (the same text) but returning ``RenderedChat``."""
    from transformers.utils.chat_template_utils import render_jinja_template

    generation = bool(_GENERATION.search(template))

    def render(messages: list, add_generation_prompt: bool = False):
        rendered, indices = render_jinja_template(
            conversations=[messages], chat_template=template,
            return_assistant_tokens_mask=generation,
            add_generation_prompt=add_generation_prompt, **variables)
        return rendered[0], (indices[0] if generation else None)

    def render_masked(messages: list) -> RenderedChat:
        text, spans = render(messages)
        if spans is None:
            spans = _assistant_spans(render, messages, text)
        return RenderedChat(text, [(a, b) for a, b in spans if b > a])

    return render_masked


def _assistant_spans(render, messages: list, text: str) -> list[tuple[int, int]]:
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, _ = render(messages[:i], add_generation_prompt=True)
        turn, _ = render(messages[:i + 1])
        if not (turn.startswith(head) and text.startswith(turn)):
            raise ValueError(f"the chat template does not render message {i} after the "
                             f"messages before it as it renders the whole conversation, so "
                             f"the reply's text cannot be told apart; wrap the assistant "
                             f"replies in {{% generation %}}...{{% endgeneration %}} blocks")
        spans.append((len(head), len(turn)))
    return spans


def token_masks(tokenizer: Tokenizer, texts: Sequence[str], ids: Sequence[np.ndarray]
                ) -> list[np.ndarray]:
    """uint8 ``[len(ids[i])]`` for each ``RenderedChat`` ``texts[i]`` tokenized whole as
    ``ids[i]``: 1 for the tokens overlapping its trained spans."""
    bounds = [sorted({b for span in t.spans for b in span} - {0, len(t)}) for t in texts]
    prefixes = [t[:b] for t, bs in zip(texts, bounds) for b in bs]
    encoded = iter(tokenizer.tokenize_batch_arrays(prefixes) if prefixes else [])
    masks = []
    for text, full, bs in zip(texts, ids, bounds):
        full = np.asarray(full)
        # boundary -> (tokens wholly before it, whether a token straddles it)
        where = {0: (0, False), len(text): (len(full), False)}
        for b in bs:
            where[b] = _common_prefix(next(encoded), full)
        mask = np.zeros(len(full), dtype=np.uint8)
        for start, end in text.spans:
            first = where[start][0]  # a token straddling the start overlaps the span
            last = where[end][0] + where[end][1]
            mask[first:last] = 1
        masks.append(mask)
    return masks


def _common_prefix(prefix: np.ndarray, full: np.ndarray) -> tuple[int, bool]:
    """How many leading tokens of ``full`` the tokens of a text prefix match, and whether they
    differ after that (the next token of ``full`` crosses the prefix's end)."""
    n = min(len(prefix), len(full))
    differ = np.flatnonzero(np.asarray(prefix[:n]) != full[:n])
    k = int(differ[0]) if differ.size else n
    return k, k < len(prefix)
