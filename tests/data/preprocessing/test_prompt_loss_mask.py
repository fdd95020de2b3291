"""--mask-prompt-loss: the side data loss_mask of chat data equals independent computations
(transformers' assistant_masks, Megatron-LM's per-turn rule, SentencePiece's piece offsets),
leaves the tokens unchanged, follows shards, partitions and merges byte for byte, and training
takes no loss on masked tokens."""

import filecmp
import os

import numpy as np
import pytest
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import IndexedDataset
from pipeline_helpers import documents, load_tool, write_jsonl

from megatron_longctx.data.formats.side_data import has_side_data, side_prefix

CHATS = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "user", "content": "Name a\nprime."}, {"role": "assistant", "content": "7"},
     {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "11, and then 13."}],
    [{"role": "user", "content": "Only a question, no reply."}],
]
PROMPT_RESPONSE = {"prompt": "Say hi.", "response": "hi there"}
ALL_CHATS = CHATS + [[{"role": "user", "content": "Say hi."},
                      {"role": "assistant", "content": "hi there"}]]
# ChatML-like, with {% generation %} blocks: transformers' return_assistant_tokens_mask works
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# Mistral-like, without generation blocks nor a generation prompt (Megatron-LM's mistral one)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "[INST] {{ message['content'] }} [/INST]{% else %} {{ message['content'] }}"
    "{{ eos_token }}{% endif %}{% endfor %}")


def chat_tokenizer(directory, hf_tokenizer_dir, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    tok.chat_template = template
    tok.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    return write_jsonl(d / "chat.jsonl", [{"messages": c} for c in CHATS] + [PROMPT_RESPONSE])


def hf_args(directory):
    return ["--json-keys", "messages", "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", directory, "--chat-template", "auto", "--append-eod"]


def test_mask_equals_transformers_assistant_masks(tmp_path, preprocess, hf_tokenizer_dir,
                                                  chat_jsonl):
    ref = chat_tokenizer(tmp_path / "tok", hf_tokenizer_dir, GENERATION_TEMPLATE)
    args = ["--input", chat_jsonl, *hf_args(tmp_path / "tok")]
    assert preprocess(*args, "--output-prefix", tmp_path / "m", "--mask-prompt-loss") == 0
    assert preprocess(*args, "--output-prefix", tmp_path / "u") == 0
    out = tmp_path / "m_messages_document"
    # the flag adds side data and changes nothing else
    for ext in ("bin", "idx"):
        assert filecmp.cmp(f"{out}.{ext}", f"{tmp_path}/u_messages_document.{ext}",
                           shallow=False)
    assert not has_side_data(str(tmp_path / "u_messages_document"), "loss_mask")
    expected_tokens, expected_masks = [], []
    for chat in ALL_CHATS:
        enc = ref.apply_chat_template(chat, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        expected_tokens.append(list(enc["input_ids"]) + [ref.eos_token_id])
        expected_masks.append(list(enc["assistant_masks"]) + [1])  # the EOD is trained on
    assert documents(out) == expected_tokens
    masks = documents(side_prefix(str(out), "loss_mask"))
    assert masks == expected_masks
    assert all(0 in m and 1 in m[:-1] for m in masks[:2])
    assert masks[2] == [0] * (len(masks[2]) - 1) + [1]  # no reply: only the EOD is trained
    # the trained text is the replies and their </s>, nothing of the prompts or role markers
    trained = ref.decode([t for t, m in zip(expected_tokens[1], masks[1]) if m][:-1])
    assert trained == "7</s>11, and then 13.</s>"


def test_mask_without_generation_blocks_is_megatron_lm_per_turn_rule(tmp_path, preprocess,
                                                                     hf_tokenizer_dir,
                                                                     chat_jsonl):
    """A template without {% generation %}: Megatron-LM's SFT rule for its mistral format
    (system/user turns masked, assistant turns trained; each turn rendered alone, the BOS
    only before the first)."""
    ref = chat_tokenizer(tmp_path / "tok", hf_tokenizer_dir, MISTRAL_TEMPLATE)
    assert preprocess("--input", chat_jsonl, *hf_args(tmp_path / "tok"), "--output-prefix",
                      tmp_path / "m", "--mask-prompt-loss") == 0
    out = str(tmp_path / "m_messages_document")
    masks = documents(side_prefix(out, "loss_mask"))
    expected_tokens, expected_masks = [], []
    for chat in ALL_CHATS:
        tokens, mask = [], []
        for i, turn in enumerate(chat):
            ids = ref.apply_chat_template([turn], tokenize=True, return_dict=True)["input_ids"]
            ids = ids if i == 0 else ids[1:]
            tokens += ids
            mask += [int(turn["role"] == "assistant")] * len(ids)
        expected_tokens.append(tokens + [ref.eos_token_id])
        expected_masks.append(mask + [1])
    assert documents(out) == expected_tokens  # turns tokenize alone as in the whole
    assert masks == expected_masks


def test_plain_template_masks_role_lines(tmp_path, preprocess, sp_model, chat_jsonl):
    """SentencePiece with the plain template: trained are each reply's content and newline;
    the independent reference maps characters to tokens by SentencePiece's piece offsets."""
    assert preprocess("--input", chat_jsonl, "--json-keys", "messages", "--tokenizer-type",
                      "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                      "--chat-template", "plain", "--output-prefix", tmp_path / "p",
                      "--mask-prompt-loss") == 0
    out = str(tmp_path / "p_messages_document")
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    masks = documents(side_prefix(out, "loss_mask"))
    tokens = documents(out)
    for chat, doc, mask in zip(ALL_CHATS, tokens, masks):
        text, spans = "", []
        for m in chat:
            text += f"<|{m['role']}|>\n"
            start = len(text.encode())
            text += f"{m['content']}\n"
            if m["role"] == "assistant":
                spans.append((start, len(text.encode())))
        pieces = sp.encode(text, return_type="proto").pieces
        assert [p.id for p in pieces] == doc
        expected = [int(any(p.end > a and p.begin < b for a, b in spans)) for p in pieces]
        assert mask == expected
        trained = "".join(p.surface for p, m in zip(pieces, mask) if m)
        replies = "".join(f"{m['content']}\n" for m in chat if m["role"] == "assistant")
        assert trained == replies
    assert sum(masks[0]) > 0 and 0 in masks[0]


def test_flag_needs_a_chat_template(tmp_path, preprocess, sp_model, chat_jsonl, capsys):
    assert preprocess("--input", chat_jsonl, "--json-keys", "messages", "--tokenizer-type",
                      "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                      "--output-prefix", tmp_path / "x", "--mask-prompt-loss") == 1
    assert "--mask-prompt-loss needs --chat-template" in capsys.readouterr().err


def _files(prefix) -> list[str]:
    """The dataset's and its loss mask's four files."""
    side = side_prefix(str(prefix), "loss_mask")
    return [f"{p}.{ext}" for p in (prefix, side) for ext in ("bin", "idx")]


@pytest.fixture(scope="module")
def many_chats(tmp_path_factory):
    d = tmp_path_factory.mktemp("many_chats")
    records = [{"messages": [{**m, "content": f"{m['content']} ({i})"} for m in c]}
               for i in range(30) for c in CHATS] + [PROMPT_RESPONSE]
    return write_jsonl(d / "chats.jsonl", records)


def test_shards_partitions_and_merge_keep_the_masks(tmp_path, preprocess, sp_model, many_chats,
                                                    capsys):
    from megatron_longctx.data.samples.blended_dataset import build_blended_dataset
    from megatron_longctx.data.samples.long_context_dataset import SampleOptions

    tool = load_tool("merge_datasets")

    def merge(*args):
        return tool.main(list(map(str, args)))
    common = ["--input", many_chats, "--json-keys", "messages", "--tokenizer-type",
              "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--chat-template",
              "plain", "--append-eod", "--mask-prompt-loss", "--chunk-mb", "0.002"]
    assert preprocess(*common, "--output-prefix", tmp_path / "one") == 0
    one = tmp_path / "one_messages_document"
    for i in range(3):
        assert preprocess(*common, "--output-prefix", tmp_path / "sh", "--num-shards", 3,
                          "--shard-index", i) == 0
        assert has_side_data(str(tmp_path / f"sh_shard{i:05d}_messages_document"), "loss_mask")
    shards = str(tmp_path / "sh_shard*_messages_document")
    assert merge("--input", shards, "--output-prefix", tmp_path / "merged") == 0
    assert preprocess(*common, "--output-prefix", tmp_path / "part", "--partitions", 2,
                      "--workers", 2) == 0
    for other in (tmp_path / "merged", tmp_path / "part_messages_document"):
        for mine, theirs in zip(_files(one), _files(other)):
            assert filecmp.cmp(mine, theirs, shallow=False), theirs
    # training reads the unmerged shards' masks as the merged dataset's
    options = SampleOptions(32, eod=2)
    merged = build_blended_dataset([str(tmp_path / "merged")], "1", 20, options, seed=1)
    direct = build_blended_dataset([shards], "1", 20, options, seed=1)
    assert direct.loss_masks is not None
    for i in range(20):
        assert (merged[i]["loss_mask"] == direct[i]["loss_mask"]).all()
        assert (merged[i]["tokens"] == direct[i]["tokens"]).all()
    assert sum(float(merged[i]["loss_mask"].sum()) for i in range(20)) < 20 * 32
    # a merge of masked and unmasked data is refused
    assert preprocess(*[a for a in common if a != "--mask-prompt-loss"], "--output-prefix",
                      tmp_path / "plain") == 0
    capsys.readouterr()
    assert merge("--input", one, tmp_path / "plain_messages_document", "--output-prefix",
                 tmp_path / "mix") == 1
    assert "with and without loss_mask side data" in capsys.readouterr().err
    assert not os.path.exists(f"{tmp_path}/mix.idx")


def test_failed_run_leaves_neither_and_unmasked_rewrite_drops_the_mask(tmp_path, preprocess,
                                                                       sp_model, chat_jsonl):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(chat_jsonl).read() + "{not json\n")
    common = ["--json-keys", "messages", "--tokenizer-type", "SentencePieceTokenizer",
              "--tokenizer-model", sp_model, "--chat-template", "plain", "--output-prefix",
              tmp_path / "out"]
    assert preprocess("--input", bad, *common, "--mask-prompt-loss", "--strict") == 1
    assert [f for f in os.listdir(tmp_path) if f.startswith("out")] == []
    assert preprocess("--input", chat_jsonl, *common, "--mask-prompt-loss") == 0
    prefix = str(tmp_path / "out_messages_document")
    assert all(os.path.exists(f) for f in _files(prefix))
    # the same prefix rewritten without the flag: no stale mask is left to be applied
    assert preprocess("--input", chat_jsonl, *common) == 0
    assert not has_side_data(prefix, "loss_mask")
    assert not os.path.exists(side_prefix(prefix, "loss_mask") + ".bin")


def test_masked_prompt_tokens_contribute_no_loss(model_parallel, tmp_path, preprocess,
                                                 hf_tokenizer_dir, many_chats):
    import torch

    from megatron_longctx.config import RunConfig
    from megatron_longctx.data.formats.side_data import SideData
    from megatron_longctx.data.samples import packing
    from megatron_longctx.data.samples.blended_dataset import build_blended_dataset
    from megatron_longctx.data.samples.long_context_dataset import SampleOptions
    from megatron_longctx.training.batches import collate
    from megatron_longctx.training.trainer import Trainer

    ref = chat_tokenizer(tmp_path / "tok", hf_tokenizer_dir, GENERATION_TEMPLATE)
    assert preprocess("--input", many_chats, *hf_args(tmp_path / "tok"), "--output-prefix",
                      tmp_path / "c", "--mask-prompt-loss") == 0
    prefix = str(tmp_path / "c_messages_document")
    cfg = RunConfig()
    t = cfg.training
    t.seq_length, t.micro_batch_size, t.global_batch_size, t.train_iters = 64, 2, 4, 1
    cfg.model.vocab_size = len(ref)
    data = build_blended_dataset([prefix], "100,0,0", 4, SampleOptions(64, eod=-1), seed=2)
    # the loss mask is the side mask of each label token (tokens[1:] of the sample's pieces)
    written = IndexedDataset(prefix)  # kept: its lengths are a view of its memory map
    side = SideData(prefix, "loss_mask", np.asarray(written.sequence_lengths))
    for i in range(4):
        pieces = packing.sample_documents(data.order, data.ordered_lengths, data.index, i, 64)
        mask = np.concatenate([side.get(d, offset=o, length=n) for d, o, n in pieces])
        assert data[i]["loss_mask"].tolist() == mask[1:].astype(float).tolist()
    trainer = Trainer(cfg, data)
    report = trainer.forward_backward(0, forward_only=True)
    masked_sum = masked_count = all_sum = 0.0
    with torch.no_grad():
        for idx in trainer.sampler.micro_batches(0):
            batch = collate(data, idx)
            losses = trainer.model(batch["tokens"], batch["position_ids"], None,
                                   labels=batch["labels"]).double()  # [b, s]
            masked_sum += float((losses * batch["loss_mask"]).sum())
            masked_count += float(batch["loss_mask"].sum())
            all_sum += float(losses.sum())
    assert 0 < masked_count < 4 * 64
    assert report["lm_loss"] == pytest.approx(masked_sum / masked_count, rel=1e-6)
    assert report["lm_loss"] != pytest.approx(all_sum / (4 * 64), rel=1e-3)


def test_position_transform_windows_apply_the_mask(tmp_path, preprocess, sp_model, many_chats):
    from megatron_longctx.data.formats.side_data import SideData
    from megatron_longctx.data.samples.blended_dataset import build_blended_dataset
    from megatron_longctx.data.samples.long_context_dataset import SampleOptions

    assert preprocess("--input", many_chats, "--json-keys", "messages", "--tokenizer-type",
                      "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                      "--chat-template", "plain", "--mask-prompt-loss", "--output-prefix",
                      tmp_path / "w") == 0
    prefix = str(tmp_path / "w_messages_document")
    s = 8
    options = SampleOptions(s, eod=2, position_transform=lambda tokens, i: np.arange(s))
    windows = build_blended_dataset([prefix], "1", 40, options, seed=0)
    written = IndexedDataset(prefix)  # kept: its lengths are a view of its memory map
    side = SideData(prefix, "loss_mask", np.asarray(written.sequence_lengths))
    for i in range(40):
        doc = int(np.searchsorted(windows.first, i, side="right")) - 1
        offset = (i - int(windows.first[doc])) * s
        mask = side.get(int(windows.documents[doc]), offset=offset, length=s + 1)
        assert windows[i]["loss_mask"].tolist() == mask[1:].astype(float).tolist()
    assert 0 < sum(float(windows[i]["loss_mask"].sum()) for i in range(40)) < 40 * s
