"""Instruction and chat data as pretraining text (``preprocess_data.py --chat-template``).

A record's ``--json-keys`` value is a conversation: a list of ``{"role": ..., "content": ...}``
messages (the ``messages`` format of chat datasets), or, when the record has no such key, its
``prompt`` and ``response`` strings (a user and an assistant message). It is rendered to one
text with a Jinja chat template, exactly as transformers' ``apply_chat_template(messages,
tokenize=False)`` renders it (the same renderer, with the tokenizer's special tokens as
variables), then tokenized like any document:

* ``--chat-template auto``: the HuggingFace tokenizer's own template;
* ``--chat-template plain``: ``PLAIN_TEMPLATE``, for tokenizers without one (SentencePiece):
  each message as ``<|role|>`` on its own line, then its content and a newline;
* ``--chat-template FILE``: a Jinja template file.

The template's text (including any ``{{ bos_token }}``) is tokenized with special tokens
recognised, as ``apply_chat_template(tokenize=True)`` does. ``--mask-prompt-loss`` also records
which tokens are the assistant's replies (``chat_loss_mask``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# {% generation %} marks a reply's text (content and newline) for --mask-prompt-loss
# (chat_loss_mask) without changing what is rendered; it spares rendering every prefix
PLAIN_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n"
                  "{% if message['role'] == 'assistant' %}{% generation %}"
                  "{{ message['content'] }}\n{% endgeneration %}"
                  "{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def resolve_chat_template(option: str, tokenizer) -> tuple[str, dict[str, str]]:
    """(template text, variables) for ``--chat-template`` ``auto``/``plain``/file."""
    hf = getattr(tokenizer, "_tok", None)  # the transformers tokenizer of HuggingFaceTokenizer
    variables = {k: v for k, v in (getattr(hf, "special_tokens_map", None) or {}).items()
                 if isinstance(v, str)}
    if option == "auto":
        template = getattr(hf, "chat_template", None)
        if not isinstance(template, str) or not template:
            raise ValueError("--chat-template auto needs a HuggingFaceTokenizer whose "
                             "tokenizer_config.json has a chat_template; pass --chat-template "
                             "plain or a Jinja template file instead.")
        return template, variables
    if option == "plain":
        return PLAIN_TEMPLATE, variables
    if not os.path.isfile(option):
        raise ValueError(f"--chat-template {option} is neither auto, plain nor a template file.")
    with open(option, encoding="utf-8") as f:
        return f.read(), variables


def chat_renderer(template: str, variables: dict[str, str]) -> Callable[[list], str]:
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(messages: list) -> str:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                            **variables)
        return rendered[0]

    return render


def as_messages(value: Any, record: dict | None) -> tuple[list | None, str | None]:
    """The conversation of a record's value (or of its prompt/response keys); or a problem."""
    if value is None and record is not None:
        prompt, response = record.get("prompt"), record.get("response")
        if isinstance(prompt, str) and isinstance(response, str):
            return [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": response}], None
        return None, "no messages list and no prompt/response strings"
    if not isinstance(value, list) or not value:
        return None, "expected a non-empty list of {\"role\", \"content\"} messages"
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            return None, f"message {i} is not {{\"role\": str, \"content\": str}}"
    return value, None
