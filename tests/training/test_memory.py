"""The memory estimator: terms of a small config computed by hand, the activation term against
the tensors autograd really saves, and the layout planner on top of it."""

import pytest
import torch

from megatron_longctx.config import ModelConfig, ParallelConfig, RunConfig, TrainingConfig
from megatron_longctx.training.memory import stage_memory, stage_parameters, with_options
from megatron_longctx.training.planner import main as plan_main
from megatron_longctx.training.planner import plan_layouts, step_seconds, valid_layouts

# hidden 64, 4 heads of 16 / 2 KV groups, FFN 176, 2 layers, vocabulary 260 -> 384 rows
SMALL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                    num_query_groups=2, vocab_size=260)


def small_run(**training) -> RunConfig:
    return RunConfig(model=SMALL, training=TrainingConfig(
        seq_length=256, micro_batch_size=2, global_batch_size=4, train_iters=1, **training))


def test_terms_by_hand_fp32_one_rank():
    cfg = small_run()
    est = stage_memory(cfg, world_size=1, stage=0)
    # layer: QKV 64 x (4 + 2 x 2) x 16, output 64 x 64, SwiGLU 3 x 64 x 176, two norms of 64
    layer = 64 * 128 + 64 * 64 + 3 * 64 * 176 + 2 * 64
    params = 2 * layer + 2 * 384 * 64 + 64  # + embedding, output layer, final norm
    assert params == 141_632
    assert est["weights"] == params * 4 and est["gradients"] == params * 4
    assert est["optimizer"] == params * 8  # Adam moments, fp32 weights need no main copy
    tokens = 2 * 256
    # per token and layer: 2 norms x (fp32 input, normalised, output + rstd), QKV output
    # 64 + 2 x 32, rotated q 64 and k 32, output 64, lse 4 heads, SwiGLU 2 x 176 + 3 x 176
    per_layer = 2 * (3 * 64 * 4 + 4) + 4 * (128 + 64 + 32 + 64) + 4 * 4 + 4 * 5 * 176
    assert per_layer == 6232
    # cos/sin (8 pairs, one head), ids/positions/mask, final norm, per-token loss/lse/labels
    extra = 2 * 8 * 4 + 24 + (3 * 64 * 4 + 4) + 12
    assert est["activations"] == tokens * (2 * per_layer + extra)
    assert est["logits"] == tokens * 384 * 4  # small: full logits (automatic chunking is off)
    phases = {t.name: t.bytes for t in est.phases}
    loss_backward = 384 * 64 * 4 + tokens * 64 * 4  # the output layer's dW and dX
    assert phases["loss"] == est["activations"] + est["logits"] + loss_backward
    assert phases["gradient check"] == params * 7
    assert est.total == params * 16 + max(phases.values())


def test_terms_by_hand_bf16_tp2_sp_cp2_selective_distributed():
    cfg = small_run(bf16=True, recompute_granularity="selective")
    cfg.parallel = ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2,
                                  sequence_parallel=True, use_distributed_optimizer=True)
    est = stage_memory(cfg, world_size=8, stage=0)  # DP = 2
    layer = 64 * 64 + 32 * 64 + 3 * 64 * 88 + 2 * 64  # TP halves QKV, output and FFN
    params = 2 * layer + 2 * 256 * 64 + 64  # vocabulary padded to 2 x 128: 512 rows / 2
    assert est["weights"] == params * 2 and est["gradients"] == params * 4
    assert est["optimizer"] == params * 12 / 4  # sharded over DP x CP = 2 x 2
    tokens, norm_tokens = 2 * 256 // 2, 2 * 256 // 2 // 2  # CP splits; SP splits the norms
    # norms: fp32 input copy + bf16 normalised + bf16 output; attention (selective): query
    # copy 32, QKV output 32 + 2 x 16, output 32 in bf16
    per_layer = norm_tokens * 2 * ((4 + 2 + 2) * 64 + 4) + tokens * 2 * (3 * 32 + 2 * 16) \
        + tokens * 2 * 5 * 88
    extra = tokens * (2 * 8 * 2 + 24) + norm_tokens * ((4 + 4) * 64 + 4) + 12 * tokens
    assert est["activations"] == 2 * per_layer + extra


def test_pipeline_stages_and_recompute():
    cfg = small_run(recompute_granularity="full")
    cfg.parallel = ParallelConfig(pipeline_model_parallel_size=2)
    first, last = stage_memory(cfg, 2, 0), stage_memory(cfg, 2, 1)
    layer = 64 * 128 + 64 * 64 + 3 * 64 * 176 + 2 * 64
    assert stage_parameters(SMALL, cfg.parallel, 0) == layer + 384 * 64
    assert stage_parameters(SMALL, cfg.parallel, 1) == layer + 384 * 64 + 64
    tokens = 512
    # full recompute keeps each layer's input; stage 0 holds 2 micro-batches (1F1B), plus the
    # output it sent; the last stage one, plus its final norm and loss
    assert first["activations"] == 2 * tokens * (64 * 4 + 2 * 8 * 4 + 24 + 64 * 4)
    assert last["activations"] == tokens * (64 * 4 + 2 * 8 * 4 + 24 + 3 * 64 * 4 + 4 + 12)
    assert "logits" not in [t.name for t in first.terms]


@pytest.mark.parametrize("training", [
    {}, {"bf16": True}, {"recompute_granularity": "selective"},
    {"recompute_granularity": "full"}, {"bf16": True, "cross_entropy_chunk_size": 64}])
def test_activation_term_equals_saved_tensors(model_parallel, training):
    """Independent reference: the bytes of the distinct storages autograd saves during a real
    forward pass (weights excluded) equal activations + logits to 0.5%."""
    from megatron_longctx.model import build_model

    cfg = small_run(**training)
    cfg.model = with_options(cfg, model__vocab_size=1000).model  # logits worth counting
    model = build_model(cfg.model, cfg.parallel, cfg.training.bf16, cfg.training)
    assert sum(p.numel() for p in model.parameters()) == stage_parameters(cfg.model,
                                                                          cfg.parallel, 0)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    tokens, positions = torch.randint(0, 1000, (2, 256)), torch.arange(256).expand(2, -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, positions, None, labels=tokens)
    # outside the graph: 24 B/token of ids, positions and loss mask; with full recompute the
    # rotary tables too (held by the checkpointed layers' arguments, not saved tensors)
    outside = 24 * 512
    if training.get("recompute_granularity") == "full":
        tables = model.rotary(positions, dtype=torch.float32)
        outside += tables.cos_q.nbytes + tables.sin_q.nbytes
    est = stage_memory(cfg, 1, 0)
    expected = est["activations"] + (est["logits"] if not training.get(
        "cross_entropy_chunk_size") else 0)  # the chunk buffer is a temporary, not saved
    assert abs(sum(saved.values()) + outside - expected) <= 0.005 * expected


def test_planner_layouts_fit_then_speed():
    cfg = small_run()
    cfg.training.global_batch_size = 8
    layouts = valid_layouts(cfg, gpus=8, micro_batch_sizes=[1, 2], gpus_per_node=8)
    # TP must divide the 2 KV groups, PP the 2 layers, CP 2 x CP the 256 tokens
    assert {lo.tp for lo in layouts} == {1, 2} and {lo.pp for lo in layouts} == {1, 2}
    assert all(lo.tp * lo.pp * lo.cp * lo.dp == 8 for lo in layouts)
    assert all(8 % (lo.micro_batch_size * lo.dp) == 0 for lo in layouts)
    plans = plan_layouts(cfg, gpus=8, gpu_memory_gib=0.004, micro_batch_sizes=[1, 2])
    assert len(plans) == len(layouts)
    fits = [p.fits for p in plans]
    assert fits == sorted(fits, reverse=True) and any(fits) and not all(fits)
    fitting = [p.step_seconds for p in plans if p.fits]
    assert all(b >= a * 0.99 for a, b in zip(fitting, fitting[1:]))
    for p in plans:  # the chosen options are the cheapest that fit, else the smallest
        assert (p.estimate.total <= 0.004 * 0.9 * 2**30) == p.fits
        assert p.distributed_optimizer == (p.layout.dp * p.layout.cp > 1)


def test_step_seconds_by_hand():
    from megatron_longctx.training.flops import num_floating_point_operations

    cfg = small_run()
    cfg.parallel = ParallelConfig(pipeline_model_parallel_size=2)
    flops = num_floating_point_operations(SMALL, 256, 4)
    # 2 micro-batches on DP=1: bubble (2 - 1) / 2
    assert step_seconds(cfg, 2, 100.0) == pytest.approx(flops / 200e12 * 1.5)
    cfg.training.recompute_granularity = "full"
    logits = 6 * 64 * 384 * 256 * 4
    assert step_seconds(cfg, 2, 100.0) == pytest.approx(
        (flops + (flops - logits) / 3) / 200e12 * 1.5)


def test_plan_layout_cli(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {num_layers: 2, hidden_size: 64, ffn_hidden_size: 176, "
                      "num_attention_heads: 4, num_query_groups: 2, vocab_size: 260}\n"
                      "training: {seq_length: 256, global_batch_size: 4, train_iters: 1}\n")
    assert plan_main(["--model", str(recipe), "--gpus", "4", "--gpu-memory", "1",
                      "--explain"]) == 0
    out = capsys.readouterr().out
    assert "TP  PP  CP  DP" in out and "peak candidates" in out
    with pytest.raises(SystemExit, match="--stage 3: .* has 1 stage"):
        plan_main(["--model", str(recipe), "--gpus", "4", "--gpu-memory", "1", "--stage", "3"])


@pytest.mark.parametrize("recipe,stage,gpus", [
    ("examples/llama2_7b_harpe_128k.yaml", None, 32),
    ("examples/llama2_7b_abf_3stage.yaml", 3, 32),
    ("examples/llama3_8b_longrecipe_128k.yaml", 1, 8),
    ("examples/llama3_8b_longrecipe_128k.yaml", 2, 8),
    ("examples/llama3_8b_pose_128k.yaml", None, 8)])
def test_example_128k_layouts_are_the_planners_first_choice(recipe, stage, gpus):
    """The recipes' comments quote the planner: their layout must stay its first choice on
    their nodes of 8 x 80 GiB, fit, and need sequence parallelism."""
    import os

    from megatron_longctx.training.planner import load_recipe

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_recipe(os.path.join(root, recipe), stage)
    p = cfg.parallel
    best = plan_layouts(cfg, gpus=gpus, gpu_memory_gib=80, micro_batch_sizes=[1])[0]
    assert best.fits and p.sequence_parallel
    assert (best.layout.tp, best.layout.pp, best.layout.cp) == (
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size)
    assert best.recompute == cfg.training.recompute_granularity
