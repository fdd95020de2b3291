#!/usr/bin/env python
"""One training step of a Llama-like ~1B model on one GPU: tokens/s and MFU side by side.

Llama-3.2-1B's shape (16 layers, hidden 2048, 32 heads / 8 KV groups, FFN 8192, vocabulary
128256, tied embeddings), bf16, micro-batch 1, at each sequence length (8k, 32k, 128k), for:

* ``ours``: ``Trainer.train_step()`` (megatron-core DDP and optimizer, fp32 main weights),
  plain causal attention, plain RoPE (θ = 500000);
* ``ours-docs``: the same on packed documents (the stdlib corpus' files, attention within
  each: FlexAttention without TE); MFU counts the document-masked attention FLOPs;
* ``ours-harpe``: plain causal with HARPE's per-head rotary (one base per KV group);
* ``stock``: megatron-core's own ``GPTModel`` with its local spec (``get_gpt_layer_local_spec``:
  its unfused ``DotProductAttention``, s x s scores) and its ``RotaryEmbedding``, under the
  same DDP and optimizer;
* ``stock-sdpa``: that model with SDPA as its core attention (megatron-core has no flash path
  without TE): the fair reference for ours' rotary, model and step code;
* ``transformers``: ``LlamaForCausalLM(attn_implementation="sdpa")``, AdamW, bf16 autocast
  (benchmarks.common.hf_train_step, as benchmarks/train_step.py).

Each configuration runs in its own process; an out-of-memory is reported as OOM. MFU divides
``training.flops`` FLOPs per second by the bf16 peak measured by 8192^3 matmuls at the start of
the run (the data-sheet peak is shown beside it). Goals (issue 16, on an H100): ours >= 0.95x
stock-sdpa tokens/s, HARPE <= 5% slower than plain RoPE, MFU >= 40% at 8k.

    python benchmarks/gpu_step.py [--seqs 8192 32768 131072] [--impls ours stock ...]
        [--steps 3] [--recompute none|selective|full]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IMPLS = ("ours", "ours-docs", "ours-harpe", "stock", "stock-sdpa", "transformers")
SEQS = (8192, 32768, 131072)
HARPE_BASES = [5e5 * (1 + 0.25 * g) for g in range(8)]  # one per KV group


def run_config(impl: str, seq: int, recompute: str = "none"):
    from megatron_longctx.config import RunConfig

    cfg = RunConfig()
    cfg.data.data_path = ["stdlib"]
    m, t = cfg.model, cfg.training
    m.num_layers, m.hidden_size, m.ffn_hidden_size = 16, 2048, 8192
    m.num_attention_heads, m.num_query_groups, m.vocab_size = 32, 8, 128256
    m.untie_embeddings_and_output_weights = False
    m.max_position_embeddings = seq
    m.rope_parameters = ({"rope_type": "harpe", "harpe_bases": HARPE_BASES}
                         if impl == "ours-harpe" else
                         {"rope_type": "default", "rope_theta": 500000.0})
    t.seq_length, t.micro_batch_size, t.global_batch_size = seq, 1, 1
    t.train_iters, t.bf16, t.lr, t.min_lr = 100, True, 3e-4, 0.0
    if recompute != "none":
        t.recompute_granularity = recompute
    cfg.data.reset_attention_mask = cfg.data.reset_position_ids = impl == "ours-docs"
    return cfg


def _stock_step(cfg, impl: str, dataset):
    """megatron-core's stock GPTModel under the DDP and optimizer our Trainer uses."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_longctx.model.attention import CoreAttention
    from megatron_longctx.model.gpt import padded_vocab_size, transformer_config
    from megatron_longctx.training.batches import GlobalBatchSampler, collate

    m, t = cfg.model, cfg.training
    m.transformer_impl = "local"
    config = transformer_config(m, cfg.parallel, bf16=True, recompute=t)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if impl == "stock-sdpa":  # its rotary applied, our core attention's SDPA branch
        spec.submodules.self_attention.submodules.core_attention = CoreAttention
    model = GPTModel(config, spec, vocab_size=padded_vocab_size(m.vocab_size, 1),
                     max_sequence_length=m.max_position_embeddings,
                     position_embedding_type="rope",
                     rotary_base=int(m.rope_parameters["rope_theta"]),
                     share_embeddings_and_output_weights=True).cuda()
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad, bf16=True,
        params_dtype=config.params_dtype), [ddp])
    sampler = GlobalBatchSampler(len(dataset), 1, 1, dp_rank=0, dp_size=1, seed=t.seed,
                                 shuffle=True)
    counter = iter(range(10**9))

    def step() -> float:
        batch = collate(dataset, sampler.micro_batches(next(counter))[0])
        tokens, positions, labels = (batch[k].cuda() for k in ("tokens", "position_ids",
                                                                "labels"))
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(tokens, positions, None, labels=labels).float().mean()  # [b, s] -> mean
        loss.backward()
        ddp.finish_grad_sync()
        ok, _, _ = optimizer.step()
        assert ok
        torch.cuda.synchronize()
        return float(loss)

    return step


def worker(impl: str, seq: int, steps: int, recompute: str, out: str) -> None:
    import torch

    from benchmarks.common import best_of, hf_train_step
    from megatron_longctx.data.samples.long_context_dataset import SampleOptions
    from megatron_longctx.data.samples.token_dataset import TokenStreamDataset, stdlib_token_stream
    from megatron_longctx.data.tokenization.tokenizers import ByteTokenizer
    from megatron_longctx.parallel.initialize import init_process_group, initialize_model_parallel

    cfg = run_config(impl, seq, recompute)
    t = cfg.training
    tokens = stdlib_token_stream(max_docs=60)  # 1.7M tokens: a dozen samples at 128k
    dataset = TokenStreamDataset(tokens, seq, SampleOptions(
        seq, eod=ByteTokenizer.eod, reset_position_ids=cfg.data.reset_position_ids))
    report: dict = {}
    try:
        if impl == "transformers":
            from transformers import LlamaForCausalLM

            from megatron_longctx.convert.hf_config import hf_config
            from megatron_longctx.training.batches import GlobalBatchSampler, collate

            model = LlamaForCausalLM._from_config(hf_config(cfg.model),
                                                  attn_implementation="sdpa").cuda().train()
            if recompute != "none":
                model.gradient_checkpointing_enable()
            sampler = GlobalBatchSampler(len(dataset), 1, 1, dp_rank=0, dp_size=1,
                                         seed=t.seed, shuffle=True)
            counter = iter(range(10**9))
            hf_step = hf_train_step(model, t, lambda: {
                k: v.cuda() for k, v in collate(
                    dataset, sampler.micro_batches(next(counter))[0]).items()
                if isinstance(v, torch.Tensor)})

            def step() -> float:
                loss = hf_step()
                torch.cuda.synchronize()  # the optimizer's kernels are part of the step
                return loss
        else:
            init_process_group()
            cfg.validate(1)
            initialize_model_parallel(cfg.parallel, t.seed)
            if impl.startswith("stock"):
                step = _stock_step(cfg, impl, dataset)
            else:
                from megatron_longctx.training.trainer import Trainer

                trainer = Trainer(cfg, dataset)

                def step() -> float:
                    metrics = trainer.train_step()
                    torch.cuda.synchronize()  # the optimizer's kernels are part of the step
                    report["squares"] = metrics.get("doc_length_squares")
                    return metrics["lm_loss"]
        losses: list[float] = []
        step_s = best_of(lambda: losses.append(step()), repeats=steps, warmup=1)
        result = {"step_s": step_s, "loss": losses[-1],
                  "peak_gib": torch.cuda.max_memory_allocated() / 2**30, **report}
    except torch.cuda.OutOfMemoryError:
        result = {"error": "OOM", "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    with open(out, "w") as f:
        json.dump(result, f)


def flops_of(impl: str, seq: int, squares: float | None) -> float:
    """Model FLOPs of one step: Megatron-LM's formula; packed documents count only the
    attention within documents (``sum n^2`` reported by the step)."""
    from megatron_longctx.training.flops import (
        attention_flops,
        effective_attention_flops,
        num_floating_point_operations,
    )

    model = run_config(impl, seq).model
    total = num_floating_point_operations(model, seq, 1)
    if impl == "ours-docs" and squares:
        total += attention_flops(model, squares) - effective_attention_flops(model, [[seq]])
    return total


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        impl, seq, steps, recompute, out = sys.argv[2:7]
        worker(impl, int(seq), int(steps), recompute, out)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=list(SEQS))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (best of), after "
                                                              "one warm-up step")
    parser.add_argument("--recompute", default="none", choices=["none", "selective", "full"],
                        help="activation recompute for all (transformers: gradient "
                             "checkpointing for selective and full)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per "
                                                                      "configuration")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                      "gpu_step.md"))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_step.py needs CUDA: it times one GPU (run it, with "
                         "tests/gpu, through tests/gpu/run.sh on a GPU machine)")
    from benchmarks.common import launch_worker
    from megatron_longctx.training.flops import known_peak_tflops, measure_matmul_peak_tflops

    peak = measure_matmul_peak_tflops(torch.bfloat16, size=8192, seconds=2.0)
    sheet = known_peak_tflops(torch.cuda.get_device_name())
    print(f"bf16 matmul peak {peak:.0f} TFLOP/s (data sheet: {sheet})", flush=True)
    results: dict[tuple[int, str], dict] = {}
    for seq in args.seqs:
        for impl in args.impls:
            r = launch_worker(__file__, [impl, str(seq), str(args.steps), args.recompute],
                              args.timeout)
            if "step_s" in r:
                r["tokens_s"] = seq / r["step_s"]
                r["mfu"] = flops_of(impl, seq, r.get("squares")) / r["step_s"] / (peak * 1e12)
            results[seq, impl] = r
            print(seq, impl, r, flush=True)
    write_table(args, results, peak, sheet)


def write_table(args, results: dict, peak: float, sheet: float | None) -> None:
    from benchmarks.common import goal, write_markdown

    rows = []
    for seq in args.seqs:
        for impl in args.impls:
            r = results[seq, impl]
            if "error" in r:
                rows.append([seq, impl, r["error"], "", f"{r.get('peak_gib', 0):.1f}", ""])
                continue
            rows.append([seq, impl, f"{r['tokens_s']:.0f}", f"{100 * r['mfu']:.1f}%",
                         f"{r['peak_gib']:.1f}", f"{r['loss']:.3f}"])
        for a, b, target in (("ours", "stock-sdpa", 0.95), ("ours-harpe", "ours", 0.95),
                             ("ours", "stock", None), ("ours", "transformers", None)):
            ra, rb = results.get((seq, a), {}), results.get((seq, b), {})
            value = ra["tokens_s"] / rb["tokens_s"] if "tokens_s" in ra and "tokens_s" in rb \
                else None
            if value is not None:
                rows.append([seq, f"{a} / {b}", goal(value, target, True) if target
                             else f"{value:.2f}", "", "", ""])
        ours = results.get((seq, "ours"), {})
        if seq == 8192 and "mfu" in ours:
            rows.append([seq, "ours MFU", goal(100 * ours["mfu"], 40, True), "", "", ""])
    text = write_markdown(
        args.out, "Training step on one GPU: ours vs megatron-core and transformers",
        ["seq", "implementation", "tokens/s", "MFU", "peak GiB", "loss"], rows,
        "Llama-3.2-1B shape (16 layers, hidden 2048, 32 heads / 8 KV groups, FFN 8192, "
        "vocabulary 128256, tied embeddings), bf16 (fp32 main weights and gradient buffers; "
        "transformers: autocast over fp32 weights), micro-batch 1, forward + backward + Adam "
        f"step, recompute {args.recompute}. tokens/s: the fastest of {args.steps} steps after "
        "one warm-up, each configuration in its own process; peak GiB: "
        "`torch.cuda.max_memory_allocated`. MFU: `training.flops` model FLOPs (causal "
        "attention halved; ours-docs: attention within documents only) per second over the "
        f"bf16 peak measured in this run by 8192^3 matmuls: {peak:.0f} TFLOP/s (data sheet: "
        f"{sheet or 'unknown'}). stock: megatron-core's local spec as shipped (unfused "
        "attention); stock-sdpa: with SDPA as its core attention. Losses differ: each model "
        "draws its own initial weights. Command: `python benchmarks/gpu_step.py` (or "
        "`tests/gpu/run.sh`).")
    print(text)


if __name__ == "__main__":
    main()
