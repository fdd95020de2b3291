"""The commands ``pip install`` puts on PATH: ``longctx-<tool>`` runs what ``tools/<tool>.py``
runs (``longctx-pretrain`` = ``python tools/pretrain.py``, ``longctx-preprocess-data`` =
``python tools/preprocess_data.py``, …).

``TOOLS`` maps each tool to the module holding its ``main(argv)``; setup.py declares one console
script per entry (``longctx-`` + the name with dashes), bound to the function of the same name
below. Several ``main`` functions return a result for Python callers (the eval tools' results
dict, the converters' paths); as a command, only an int is an exit status.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

TOOLS = {
    "pretrain": "megatron_longctx.training.pretrain_tool",
    "preprocess_data": "megatron_longctx.data.preprocessing.preprocess_tool",
    "train_tokenizer": "megatron_longctx.data.tokenization.train_tokenizer_tool",
    "merge_datasets": "megatron_longctx.data.formats.merge_tool",
    "inspect_dataset": "megatron_longctx.data.formats.inspect_tool",
    "make_stdlib_corpus": "megatron_longctx.data.corpora.stdlib_corpus_tool",
    "make_retrieval_corpus": "megatron_longctx.data.corpora.retrieval_corpus_tool",
    "convert_hf_to_mcore": "megatron_longctx.convert.hf_to_mcore_tool",
    "convert_mcore_to_hf": "megatron_longctx.convert.mcore_to_hf_tool",
    "harpe_bases": "megatron_longctx.rope.harpe_tool",
    "longrope_search": "megatron_longctx.methods.longrope_tool",
    "analyze_impactful_tokens": "megatron_longctx.methods.impactful_tokens_tool",
    "merge_checkpoints": "megatron_longctx.methods.merge_tool",
    "select_long_samples": "megatron_longctx.methods.select_samples_tool",
    "eval_perplexity": "megatron_longctx.eval.perplexity_tool",
    "eval_passkey": "megatron_longctx.eval.passkey_tool",
    "eval_ruler": "megatron_longctx.eval.ruler_tool",
    "extension_report": "megatron_longctx.eval.extension_report_tool",
    "plan_layout": "megatron_longctx.training.planner",
}


def command_name(tool: str) -> str:
    """The console script of a tool: ``preprocess_data`` -> ``longctx-preprocess-data``."""
    return "longctx-" + tool.replace("_", "-")


def exit_status(result) -> int:
    """A tool's exit status from what its ``main`` returned (None or a result object: 0)."""
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def run(tool: str, argv: list[str] | None = None) -> int:
    """Run a tool's ``main(argv)`` (``argv=None``: the command line); its exit status."""
    return exit_status(importlib.import_module(TOOLS[tool]).main(argv))


def _command(tool: str) -> Callable[[], int]:
    def command() -> int:
        return run(tool)

    command.__name__ = command.__qualname__ = tool
    command.__doc__ = f"``{command_name(tool)}``: see {TOOLS[tool]}."
    return command


# The console scripts' targets (an entry point names a module attribute), one per TOOLS entry.
pretrain = _command("pretrain")
preprocess_data = _command("preprocess_data")
train_tokenizer = _command("train_tokenizer")
merge_datasets = _command("merge_datasets")
inspect_dataset = _command("inspect_dataset")
make_stdlib_corpus = _command("make_stdlib_corpus")
make_retrieval_corpus = _command("make_retrieval_corpus")
convert_hf_to_mcore = _command("convert_hf_to_mcore")
convert_mcore_to_hf = _command("convert_mcore_to_hf")
harpe_bases = _command("harpe_bases")
longrope_search = _command("longrope_search")
analyze_impactful_tokens = _command("analyze_impactful_tokens")
merge_checkpoints = _command("merge_checkpoints")
select_long_samples = _command("select_long_samples")
eval_perplexity = _command("eval_perplexity")
eval_passkey = _command("eval_passkey")
eval_ruler = _command("eval_ruler")
extension_report = _command("extension_report")
plan_layout = _command("plan_layout")
