"""Tokenizer wrappers agree with the libraries they wrap, and fail clearly on bad setups."""

import numpy as np
import pytest
import sentencepiece as spm
from pipeline_helpers import load_tool, write_jsonl

from megatron_longctx.data.tokenization.tokenizers import ByteTokenizer, build_tokenizer


def test_sentencepiece_matches_library(sp_model, corpus_texts):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    ref = spm.SentencePieceProcessor(model_file=sp_model)
    expected = [ref.encode(t) for t in corpus_texts]
    assert [tok.tokenize(t) for t in corpus_texts] == expected
    assert tok.tokenize_batch(corpus_texts) == expected
    assert [a.tolist() for a in tok.tokenize_batch_arrays(corpus_texts)] == expected
    assert tok.vocab_size == ref.vocab_size() == 400
    assert tok.eod == ref.eos_id() == 2
    assert 1 not in expected[0] and 2 not in expected[0]  # no BOS/EOS added
    # trained lossless (identity normalization, whitespace kept, byte fallback)
    assert [tok.detokenize(ids) for ids in expected] == corpus_texts


def test_huggingface_matches_transformers(hf_tokenizer_dir, corpus_texts):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    expected = [ref.encode(t, add_special_tokens=False) for t in corpus_texts]
    for path in (hf_tokenizer_dir, f"{hf_tokenizer_dir}/tokenizer.json"):
        tok = build_tokenizer("HuggingFaceTokenizer", path)
        assert [tok.tokenize(t) for t in corpus_texts] == expected
        assert tok.tokenize_batch(corpus_texts) == expected
        assert [a.tolist() for a in tok.tokenize_batch_arrays(corpus_texts)] == expected
        assert tok.vocab_size == len(ref)
        assert tok.eod == ref.eos_token_id == ref.convert_tokens_to_ids("</s>")
        assert tok.detokenize(expected[-3]) == corpus_texts[-3]


def test_byte_tokenizer_round_trips_utf8():
    tok = build_tokenizer("ByteTokenizer", None)
    text = "héllo"
    assert tok.tokenize(text) == list(text.encode()) == tok.tokenize_batch([text])[0]
    assert np.array_equal(tok.tokenize_batch_arrays([text])[0], tok.tokenize_array(text))
    assert (tok.vocab_size, tok.eod) == (258, 257)
    assert tok.detokenize(tok.tokenize(text) + [tok.eod]) == text


@pytest.mark.parametrize("kind, model, match", [
    ("BertWordPieceCase", None, "unknown --tokenizer-type 'BertWordPieceCase'; choose one of"),
    ("GPT2BPETokenizer", None, "needs --vocab-file \\(vocab.json\\) and --merge-file"),
    ("TikTokenizer", None, "needs --tokenizer-model"),
    ("NullTokenizer", None, "needs --vocab-size"),
    ("SentencePieceTokenizer", None, "needs --tokenizer-model"),
    ("SentencePieceTokenizer", "/no/such/file.model", "does not exist"),
    ("HuggingFaceTokenizer", "/no/such/dir", "nothing is downloaded"),
    ("ByteTokenizer", "some.model", "takes no --tokenizer-model"),
])
def test_bad_tokenizer_arguments(kind, model, match):
    with pytest.raises(ValueError, match=match):
        build_tokenizer(kind, model)


def test_not_a_sentencepiece_model(tmp_path):
    bad = tmp_path / "spm.vocab"
    bad.write_text("<unk>\t0\n")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", str(bad))


def test_huggingface_without_eos_says_how_to_fix(tmp_path, hf_tokenizer_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    wrapped = build_tokenizer("HuggingFaceTokenizer", str(path))
    with pytest.raises(ValueError, match="defines no EOS token.*eos_token"):
        _ = wrapped.eod


def test_train_tokenizer_cli(tmp_path, corpus_jsonl):
    tool = load_tool("train_tokenizer")
    prefix = str(tmp_path / "tok")
    assert tool.main(["--input", corpus_jsonl, "--vocab-size", "400", "--output-prefix", prefix,
                      "--user-defined-symbols", "<fim>,<tab4>", "--max-sentences", "2000",
                      "--num-threads", "2"]) == 0
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    assert sp.vocab_size() == 400
    assert sp.encode("a<fim>b", out_type=str)[-2:] == ["<fim>", "b"]
    assert sp.piece_to_id("<0x0A>") != sp.unk_id()  # byte fallback on by default
    assert tool.main(["--input", corpus_jsonl, "--vocab-size", "300", "--output-prefix",
                      prefix + "_nb", "--no-byte-fallback", "--max-sentences", "2000"]) == 0
    sp = spm.SentencePieceProcessor(model_file=prefix + "_nb.model")
    assert sp.piece_to_id("<0x0A>") == sp.unk_id()


def test_train_tokenizer_errors(tmp_path, corpus_jsonl, capsys):
    tool = load_tool("train_tokenizer")
    assert tool.main(["--input", corpus_jsonl, "--vocab-size", "200", "--output-prefix",
                      str(tmp_path / "t")]) == 1
    assert "--vocab-size 200 is too small" in capsys.readouterr().err
    assert tool.main(["--input", str(tmp_path / "missing*.jsonl"), "--vocab-size", "400",
                      "--output-prefix", str(tmp_path / "t")]) == 1
    assert "matches no file" in capsys.readouterr().err
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": " "}])
    assert tool.main(["--input", empty, "--vocab-size", "400", "--output-prefix",
                      str(tmp_path / "t")]) == 1
    assert "SentencePiece training failed" in capsys.readouterr().err


def test_byte_tokenizer_eod_is_readable_from_the_class():
    assert ByteTokenizer.eod == 257  # token_dataset/layout tests use it without an instance
