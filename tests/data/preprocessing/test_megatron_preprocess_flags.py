"""Megatron-LM's preprocessing flags and tokenizer types on the stdlib corpus: each dataset
equals the reference library's ids (plus BOS/EOD exactly where Megatron-LM's tokenizer of that
type puts them); --split-sentences writes one sequence per sentence on hand-made cases."""

import base64
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDataset
from pipeline_helpers import documents, write_jsonl


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (its vocab.json spells bytes this way)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory, hf_tokenizer_dir):
    """vocab.json + merges.txt of the session's byte-level BPE, with GPT-2's <|endoftext|>."""
    model = json.load(open(os.path.join(hf_tokenizer_dir, "tokenizer.json")))["model"]
    vocab = dict(model["vocab"])
    vocab["<|endoftext|>"] = len(vocab)
    d = tmp_path_factory.mktemp("gpt2")
    json.dump(vocab, open(d / "vocab.json", "w"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(d / "vocab.json"), str(d / "merges.txt")


def test_gpt2_bpe_from_vocab_and_merges(tmp_path, preprocess, corpus_jsonl, corpus_texts,
                                        gpt2_files):
    from tokenizers import ByteLevelBPETokenizer

    vocab, merges = gpt2_files
    assert preprocess("--input", corpus_jsonl, "--output-prefix", tmp_path / "g",
                      "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                      "--merge-file", merges, "--append-eod") == 0
    ref = ByteLevelBPETokenizer(vocab, merges)
    eod = json.load(open(vocab))["<|endoftext|>"]
    assert documents(tmp_path / "g_text_document") == [ref.encode(t).ids + [eod]
                                                       for t in corpus_texts]


def test_sentencepiece_types_and_legacy_llama2_bos(tmp_path, preprocess, corpus_jsonl,
                                                   corpus_texts, sp_model):
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    outputs = {}
    for kind, extra in (("SentencePieceTokenizer", []), ("GPTSentencePieceTokenizer", []),
                        ("Llama2Tokenizer", []), ("Llama2Tokenizer", ["--legacy-tokenizer"])):
        out = tmp_path / f"{kind}{len(extra)}"
        assert preprocess("--input", corpus_jsonl, "--output-prefix", out, "--tokenizer-type",
                          kind, "--tokenizer-model", sp_model, "--append-eod", *extra) == 0
        outputs[kind, len(extra)] = documents(f"{out}_text_document")
    plain = [sp.encode(t) + [sp.eos_id()] for t in corpus_texts]
    # megatron-core 0.16.1's SentencePiece library (Megatron-LM's default): no BOS for any type
    assert outputs["SentencePieceTokenizer", 0] == plain
    assert outputs["GPTSentencePieceTokenizer", 0] == plain
    assert outputs["Llama2Tokenizer", 0] == plain
    # the legacy _Llama2Tokenizer.tokenize(bos=True)
    assert outputs["Llama2Tokenizer", 1] == [[sp.bos_id()] + ids for ids in plain]
    assert preprocess("--input", corpus_jsonl, "--output-prefix", tmp_path / "x",
                      "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                      sp_model, "--legacy-tokenizer") == 1


def test_huggingface_special_tokens_as_megatron_adds_them(tmp_path, preprocess, corpus_jsonl,
                                                         corpus_texts, hf_tokenizer_dir):
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    rust = Tokenizer.from_file(os.path.join(hf_tokenizer_dir, "tokenizer.json"))
    rust.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", rust.token_to_id("<s>"))])  # as Llama's
    directory = str(tmp_path / "bos_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)
    ref = AutoTokenizer.from_pretrained(directory)
    runs = {"default": [], "include": ["--tokenizer-hf-include-special-tokens"],
            "legacy": ["--legacy-tokenizer"]}
    for name, extra in runs.items():
        assert preprocess("--input", corpus_jsonl, "--output-prefix", tmp_path / name,
                          "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                          directory, "--append-eod", *extra) == 0
    eos = ref.eos_token_id
    assert documents(tmp_path / "default_text_document") == [
        ref(t, add_special_tokens=False).input_ids + [eos] for t in corpus_texts]
    with_bos = [ref(t).input_ids + [eos] for t in corpus_texts]
    assert all(ids[0] == ref.bos_token_id for ids in with_bos)
    assert documents(tmp_path / "include_text_document") == with_bos
    assert documents(tmp_path / "legacy_text_document") == with_bos


@pytest.fixture(scope="module")
def tiktoken_vocab(tmp_path_factory, gpt2_files):
    """Megatron-LM's tiktoken vocabulary format, made from the session's byte-level BPE: the
    256 single bytes first, then the merged tokens in rank order."""
    pytest.importorskip("tiktoken")
    vocab = json.load(open(gpt2_files[0]))
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    merged = [bytes(to_byte[c] for c in token) for token, _ in sorted(vocab.items(),
                                                                      key=lambda kv: kv[1])
              if not token.startswith("<") and len(token) > 1]
    tokens = [bytes([b]) for b in range(256)] + merged
    path = tmp_path_factory.mktemp("tiktoken") / "vocab.json"
    json.dump([{"rank": i, "token_bytes": base64.b64encode(t).decode(),
                "token_str": t.decode("utf-8", "replace")} for i, t in enumerate(tokens)],
              open(path, "w"))
    return str(path), len(tokens)


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_tiktokenizer_matches_megatron_core(tmp_path, preprocess, corpus_jsonl, corpus_texts,
                                            tiktoken_vocab, pattern):
    from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import TikTokenTokenizer

    path, entries = tiktoken_vocab
    assert preprocess("--input", corpus_jsonl, "--output-prefix", tmp_path / "t",
                      "--tokenizer-type", "TikTokenizer", "--tokenizer-model", path,
                      "--tiktoken-pattern", pattern, "--append-eod") == 0
    ref = TikTokenTokenizer(path, pattern=pattern, vocab_size=entries + 1000)
    docs = documents(tmp_path / "t_text_document")
    assert docs == [ref.text_to_ids(t) + [ref.eod] for t in corpus_texts]
    assert ref.eod == 2 and min(min(d[:-1]) for d in docs) >= 1000  # ranks shifted past specials
    assert IndexedDataset(str(tmp_path / "t_text_document")).index.dtype == np.uint16


def test_null_tokenizer_reads_ids(tmp_path, preprocess):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"text": "3 1 4"}, {"text": "1 5\n9 2"}])
    assert preprocess("--input", path, "--output-prefix", tmp_path / "n", "--tokenizer-type",
                      "NullTokenizer", "--vocab-size", "10", "--append-eod") == 0
    assert documents(tmp_path / "n_text_document") == [[3, 1, 4, 10], [1, 5, 9, 2, 10]]


SENTENCE_CASES = [
    ("Hello there. How are you? I am fine.", ["Hello there.", "How are you?", "I am fine."]),
    ("Dr. Smith arrived at 5 p.m. on Monday. He left!",
     ["Dr. Smith arrived at 5 p.m. on Monday.", "He left!"]),
    ("One.\n\nTwo.  Three", ["One.", "Two.", "Three"]),
    ("no end mark at all", ["no end mark at all"]),
]


def test_split_sentences_one_sequence_per_sentence(tmp_path, preprocess):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": t} for t, _ in SENTENCE_CASES])
    for name, extra in (("plain", []), ("newlines", ["--keep-newlines"])):
        assert preprocess("--input", path, "--output-prefix", tmp_path / name,
                          "--tokenizer-type", "ByteTokenizer", "--split-sentences", "--lang",
                          "english", "--append-eod", *extra) == 0
        dataset = IndexedDataset(str(tmp_path / f"{name}_text_sentence"))
        docidx = dataset.document_indices
        assert len(docidx) - 1 == len(SENTENCE_CASES)
        for j, (text, expected) in enumerate(SENTENCE_CASES):
            sequences = [dataset[i].tolist() for i in range(docidx[j], docidx[j + 1])]
            assert sequences[-1][-1] == 257  # EOD ends the document's last sentence
            wanted = expected if name == "plain" else _with_whitespace(text, expected)
            assert sequences[:-1] + [sequences[-1][:-1]] == [list(s.encode()) for s in wanted]


def _with_whitespace(text: str, sentences: list[str]) -> list[str]:
    """The sentences with the whitespace that follows each in ``text`` (--keep-newlines)."""
    out, pos = [], 0
    for i, s in enumerate(sentences):
        start = text.index(s, pos)
        end = text.index(sentences[i + 1], start + len(s)) if i + 1 < len(sentences) \
            else len(text)
        out.append(text[start:end])
        pos = end
    return out


CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                 "[INST] {{ message['content'] }} [/INST]{% else %} {{ message['content'] }}"
                 "{{ eos_token }}{% endif %}{% endfor %}")
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "user", "content": "Name a\nprime."}, {"role": "assistant", "content": "7"},
     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "11"}],
]


def test_chat_records_render_as_transformers_apply_chat_template(tmp_path, preprocess,
                                                                 hf_tokenizer_dir, sp_model,
                                                                 capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    tok.chat_template = CHAT_TEMPLATE
    directory = str(tmp_path / "chat_tokenizer")
    tok.save_pretrained(directory)
    ref = AutoTokenizer.from_pretrained(directory)
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": CHATS[0]}, {"messages": CHATS[1]},
        {"prompt": "Say hi.", "response": "hi"},  # instruction data without a messages list
        {"messages": "not a list"}, {"messages": [{"role": "user"}]}])
    assert preprocess("--input", path, "--output-prefix", tmp_path / "c", "--json-keys",
                      "messages", "--tokenizer-type", "HuggingFaceTokenizer",
                      "--tokenizer-model", directory, "--chat-template", "auto",
                      "--append-eod") == 0
    chats = CHATS + [[{"role": "user", "content": "Say hi."},
                      {"role": "assistant", "content": "hi"}]]
    rendered = [ref.apply_chat_template(c, tokenize=False) for c in chats]
    assert rendered[0].startswith("<s>[INST] What is 2+2? [/INST] 4.</s>")
    assert documents(tmp_path / "c_messages_document") == [
        ref.encode(r, add_special_tokens=False) + [ref.eos_token_id] for r in rendered]
    assert "not a conversation (--chat-template)" in capsys.readouterr().out
    # a SentencePiece tokenizer has no template: the documented plain one
    assert preprocess("--input", path, "--output-prefix", tmp_path / "p", "--json-keys",
                      "messages", "--tokenizer-type", "SentencePieceTokenizer",
                      "--tokenizer-model", sp_model, "--chat-template", "plain") == 0
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    plain = ["".join(f"<|{m['role']}|>\n{m['content']}\n" for m in c) for c in chats]
    assert documents(tmp_path / "p_messages_document") == [sp.encode(t) for t in plain]
    assert preprocess("--input", path, "--output-prefix", tmp_path / "x", "--json-keys",
                      "messages", "--tokenizer-type", "SentencePieceTokenizer",
                      "--tokenizer-model", sp_model, "--chat-template", "auto") == 1
    assert "--chat-template auto needs a HuggingFaceTokenizer" in capsys.readouterr().err
