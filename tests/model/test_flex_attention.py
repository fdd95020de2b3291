"""FlexAttention with our block-level document/CP BlockMask: its blocks agree with the dense
document-causal mask (full blocks entirely visible, skipped blocks entirely hidden), and its
output equals the blockwise flash path and a float64 reference (forward; torch has no CPU
backward for FlexAttention, the GPU checks cover it)."""

import shutil

import pytest
import torch

from megatron_longctx.model.blockwise_attention import document_causal_attention
from megatron_longctx.model.context_parallel import local_query_chunks
from megatron_longctx.model.flex_attention import (
    BLOCK,
    _compiled_kernel,
    document_block_mask,
    flex_attention_available,
    flex_document_attention,
    global_rows,
)

pytestmark = pytest.mark.skipif(not flex_attention_available(), reason="torch has no FlexAttention")

CASES = {  # name -> (sequence length, document starts per sample or None)
    "causal": (384, None),
    "documents": (384, [[0, 100, 130, 300], [0, 256]]),
    "ragged": (200, [[0, 7, 150], [0]]),
}


def dense_visible(rows: torch.Tensor, starts, sk: int) -> torch.Tensor:
    """``[sq, sk]`` bool: float64-reference visibility for one sample."""
    doc = torch.zeros(sk, dtype=torch.long)
    for s in (starts or [])[1:]:
        doc[s:] += 1
    keys = torch.arange(sk)
    return (keys[None, :] <= rows[:, None]) & (doc[rows][:, None] == doc[None, :])


def layouts(s):
    yield "cp1", [(0, s, 0)], slice(None)
    for rank in range(2):  # CP=2: rank r's chunks r and 3 - r of four
        chunks = local_query_chunks(rank, 2, s // 2)
        yield f"cp2_rank{rank}", chunks, global_rows(chunks, s // 2, "cpu")


@pytest.mark.parametrize("case", list(CASES))
def test_block_mask_matches_the_dense_mask(case):
    s, starts = CASES[case]
    batch = len(starts) if starts else 1
    for name, chunks, _ in layouts(s):
        sq = chunks[-1][1]
        mask = document_block_mask(chunks, starts, batch, sq, s, "cpu")
        rows = global_rows(chunks, sq, "cpu")
        counts, indices = mask.kv_num_blocks, mask.kv_indices  # partial blocks
        full_counts, full_indices = mask.full_kv_num_blocks, mask.full_kv_indices
        for b in range(batch):
            visible = dense_visible(rows, starts[b] if starts else None, s)
            for qb in range(-(-sq // BLOCK)):
                q = slice(qb * BLOCK, min(sq, (qb + 1) * BLOCK))
                partial = set(indices[b, 0, qb, :counts[b, 0, qb]].tolist())
                full = set(full_indices[b, 0, qb, :full_counts[b, 0, qb]].tolist())
                assert not partial & full
                for kb in range(-(-s // BLOCK)):
                    block = visible[q, kb * BLOCK:(kb + 1) * BLOCK]
                    if kb in full:
                        assert block.all()
                    elif kb not in partial:
                        assert not block.any()  # skipped: nothing visible there
        if case != "ragged" and name == "cp1":  # blocks above the diagonal are skipped
            assert counts.sum() + full_counts.sum() < counts.numel() * (-(-s // BLOCK))


@pytest.mark.parametrize("case", list(CASES))
def test_flex_equals_blockwise_and_float64(case):
    torch.manual_seed(0)
    s, starts = CASES[case]
    batch, heads, groups, dim, scale = (len(starts) if starts else 1), 4, 2, 16, 0.25
    q_full = torch.randn(s, batch, heads, dim)
    key, value = torch.randn(s, batch, groups, dim), torch.randn(s, batch, groups, dim)
    for name, chunks, rows in layouts(s):
        rows = torch.arange(s) if name == "cp1" else rows
        query = q_full[rows]  # this rank's rows
        with torch.no_grad():
            flex = flex_document_attention(query, key, value, scale, chunks, starts)
            blockwise = document_causal_attention(query, key, value, scale, chunks, starts,
                                                  block_size=64)
        ref = torch.empty(len(rows), batch, heads, dim, dtype=torch.float64)
        for b in range(batch):
            visible = dense_visible(rows, starts[b] if starts else None, s)
            k = key[:, b].double().repeat_interleave(heads // groups, dim=1)  # [s, np, hn]
            v = value[:, b].double().repeat_interleave(heads // groups, dim=1)
            scores = torch.einsum("qhd,khd->hqk", query[:, b].double(), k) * scale
            probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
            ref[:, b] = torch.einsum("hqk,khd->qhd", probs, v)
        ref = ref.reshape(len(rows), batch, heads * dim)
        torch.testing.assert_close(flex.double(), ref, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(flex, blockwise, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_the_compiled_kernel_compiles_once_for_every_document_mask():
    """The kernel CUDA runs (``torch.compile(flex_attention)``, compiled on the CPU here): a
    new ``BlockMask`` per micro-batch (other documents, a per-document CP layout's many
    chunks) reuses the one graph, and equals the eager kernel (fp32 1e-5)."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    from megatron_longctx.model.document_partition import partition_documents

    torch.manual_seed(0)
    s, heads, groups, dim = 256, 4, 2, 16
    q = torch.randn(1, heads, s // 2, dim)  # a CP=2 rank's rows
    k, v = torch.randn(1, groups, s, dim), torch.randn(1, groups, s, dim)
    per_document = partition_documents([0, 30, 31, 140], s, 2)
    masks = [(local_query_chunks(0, 2, s // 2), [[0, 100, 130]]),
             (local_query_chunks(1, 2, s // 2), [[0, 7]]),
             (per_document.rank_chunks(1), [per_document.mask_starts()])]
    masks = [document_block_mask(chunks, starts, 1, s // 2, s, "cpu")
             for chunks, starts in masks]
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        compiled = [_compiled_kernel()(q, k, v, block_mask=m, enable_gqa=True) for m in masks]
        # (eager flex_attention traces a graph of its own: counted apart)
        assert counters["stats"]["unique_graphs"] - graphs == 1
        for mask, out in zip(masks, compiled):
            eager = flex_attention(q, k, v, block_mask=mask, enable_gqa=True)
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_cpu_training_through_flex_is_refused():
    q = torch.randn(128, 1, 2, 8, requires_grad=True)
    k, v = torch.randn(128, 1, 2, 8), torch.randn(128, 1, 2, 8)
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        flex_document_attention(q, k, v, 0.3, [(0, 128, 0)], None)


def test_model_with_flex_backend_equals_the_default(model_parallel):
    """``--attention-backend flex`` (evaluation on CPU) gives the default model's logits on
    packed documents and plain causal input (HARPE rotary, GQA)."""
    from megatron_longctx.config import RunConfig
    from megatron_longctx.model import build_model
    from megatron_longctx.model.sharding import full_tensors

    cfg = RunConfig()
    cfg.model.num_query_groups = 2
    cfg.model.rope_parameters = {"rope_type": "harpe", "harpe_bases": [1e4, 3e5]}
    default = build_model(cfg.model, cfg.parallel).eval()
    cfg.model.attention_backend = "flex"
    flex = build_model(cfg.model, cfg.parallel).eval()
    flex.load_state_dict(default.state_dict())
    from megatron_longctx.model.attention import CoreAttention

    cores = [m for m in flex.modules() if isinstance(m, CoreAttention)]
    assert len(cores) == cfg.model.num_layers and all(c.flex_everywhere for c in cores)
    assert not any(c.flex for c in default.modules() if isinstance(c, CoreAttention))
    assert all(torch.equal(a, b) for a, b in zip(full_tensors(flex).values(),
                                                 full_tensors(default).values()))
    tokens, positions = torch.randint(0, 256, (1, 300)), torch.arange(300)[None]
    with torch.no_grad():
        for starts in (None, [[0, 40, 41, 200]]):
            torch.testing.assert_close(flex(tokens, positions, None, doc_starts=starts),
                                       default(tokens, positions, None, doc_starts=starts),
                                       rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no FlexAttention backward on CPU"):
        cfg.data.data_path = ["stdlib"]
        cfg.training.train_iters = 1
        cfg.validate(1)
