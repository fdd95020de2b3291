"""Convert a Hugging Face Llama / Mistral / Qwen2 checkpoint to a megatron_longctx checkpoint.

Example:
    python tools/convert_hf_to_mcore.py --hf-dir Llama-3.1-8B --save ckpt/llama31_8b \
        --tensor-model-parallel-size 2
    torchrun --nproc_per_node 2 tools/pretrain.py --pretrained-checkpoint ckpt/llama31_8b ...
The output (``iter_0000000`` + tracker, tokenizer files in ``<save>/tokenizer/``) is what
``--pretrained-checkpoint`` and ``--load`` read; it reshards to any TP/PP on load, so one
process converts for every power-of-two TP (other sizes: run this under torchrun).
"""

import argparse
import ctypes
import logging

from megatron_longctx.convert import ConversionError, hf_to_mcore


def bound_heap_memory(threshold: int = 2**20) -> None:
    """Serve every block of ``threshold`` bytes or more from its own mapping (glibc), so that
    the converted layers' temporaries go back to the system when freed. By default glibc
    raises this threshold after the first large free (up to 32 MB) and serves such blocks from
    its heap, whose free space fragments and stays resident: a few layers' worth of memory."""
    try:
        ctypes.CDLL(None).mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (AttributeError, OSError):  # not glibc
        pass


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="transformers save_pretrained directory")
    parser.add_argument("--save", required=True, help="checkpoint root to write")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bound_heap_memory()
    try:
        path = hf_to_mcore(args.hf_dir, args.save, tp=args.tensor_model_parallel_size,
                           pp=args.pipeline_model_parallel_size,
                           make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    except ConversionError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {path}")
    return path

