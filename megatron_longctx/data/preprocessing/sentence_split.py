"""Sentence splitting for ``--split-sentences`` (``--lang``, ``--keep-newlines``).

Megatron-LM splits with NLTK's punkt, an unsupervised statistical model per language whose
pickles it downloads at run time. Here the splitter is pysbd (``pip install pysbd``): rule-based
("Golden Rules" of sentence boundaries for 20+ languages), shipped whole in its package, so
nothing is downloaded. The two agree on ordinary prose; they differ on abbreviations and
numbering that punkt learned from its training text or pysbd's rules cover differently. pysbd is
slow (about 25 kB/s per core on 8 kB of prose) and its time grows with the square of a text's
length, so text is first cut at blank lines (paragraph ends, which no sentence crosses).
Whitespace follows Megatron-LM: without ``--keep-newlines`` each sentence is stripped (the
whitespace and newlines between sentences are dropped); with it, the whitespace after a
sentence stays with that sentence, so the sentences joined give back the text. Like Megatron-LM,
text is split in slices of 10**6 characters.

Each sentence becomes one sequence of the document in the ``.idx`` (Megatron-LM's
``{prefix}_{key}_sentence`` datasets); the document is still the training unit.
"""

from __future__ import annotations

import re

_PARAGRAPH_END = re.compile(r"\n[ \t]*\n\s*")  # a blank line: no sentence continues past it
_MAX_SLICE = 1_000_000  # Megatron-LM's max_len

# NLTK punkt's language names (Megatron-LM's --lang values) -> pysbd's ISO 639-1 codes
NLTK_TO_ISO = {
    "english": "en", "german": "de", "french": "fr", "spanish": "es", "italian": "it",
    "dutch": "nl", "danish": "da", "greek": "el", "polish": "pl", "russian": "ru",
}


def pysbd_language(lang: str) -> str:
    """pysbd's code for ``--lang`` (an NLTK name such as ``english`` or an ISO code)."""
    try:
        from pysbd.languages import LANGUAGE_CODES
    except ImportError as exc:
        raise ValueError("--split-sentences needs the pysbd package: pip install pysbd (or "
                         "pip install 'megatron_longctx[sentences]')") from exc
    code = NLTK_TO_ISO.get(lang.lower(), lang.lower())
    if code not in LANGUAGE_CODES:
        names = sorted(set(LANGUAGE_CODES) | set(NLTK_TO_ISO))
        raise ValueError(f"--lang {lang!r} has no sentence splitter; choose one of "
                         f"{', '.join(names)}.")
    return code


class SentenceSplitter:
    def __init__(self, lang: str = "english", keep_newlines: bool = False):
        import pysbd

        self._segmenter = pysbd.Segmenter(language=pysbd_language(lang), clean=False)
        self.keep_newlines = keep_newlines

    def split(self, text: str) -> list[str]:
        sentences = []
        for start in range(0, len(text), _MAX_SLICE):
            piece = text[start:start + _MAX_SLICE]
            begin = 0
            for end in [m.end() for m in _PARAGRAPH_END.finditer(piece)] + [len(piece)]:
                if end > begin:
                    sentences += self._segmenter.segment(piece[begin:end])
                begin = end
        if self.keep_newlines:
            return [s for s in sentences if s]
        return [s for s in (s.strip() for s in sentences) if s]
