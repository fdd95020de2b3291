"""Export a megatron_longctx checkpoint as a Hugging Face model (sharded safetensors).

Example:
    python tools/convert_mcore_to_hf.py --load runs/stage_3 --save hf/llama2_7b_128k
    # then: AutoModelForCausalLM.from_pretrained("hf/llama2_7b_128k")
``--architecture auto`` keeps the architecture the checkpoint was converted from, else Qwen2
for q/k/v biases and Llama otherwise. HARPE bases are written as ``harpe_bases`` in
config.json (stock transformers ignores them); partial rotary and LongRoPE with n-hat > 0 are
refused.
"""

import argparse
import logging

from megatron_longctx.convert import ConversionError, mcore_to_hf


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint root or iter_* directory")
    parser.add_argument("--ckpt-step", type=int, default=None, help="default: the latest")
    parser.add_argument("--save", required=True, help="directory for the transformers model")
    parser.add_argument("--architecture", default="auto",
                        choices=["auto", "llama", "mistral", "qwen2"])
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        files = mcore_to_hf(args.load, args.save, architecture=args.architecture,
                            step=args.ckpt_step,
                            max_shard_bytes=int(args.max_shard_size_gb * 2**30))
    except ConversionError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {len(files)} shard(s) to {args.save}")
    return files

