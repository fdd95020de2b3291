"""Every attention path on CUDA, forward and backward, against the float64 reference of the CPU
tests (``dense_reference``, tests/model/test_blockwise_attention.py), on packed documents and
on context-parallel query chunks (rank 0 and 1 of CP=2, keys in global order):

* SDPA: ``CoreAttention`` with ``--attention-backend auto``, plain causal (flash/cuDNN/efficient);
* FlexAttention with our document/CP ``BlockMask`` (compiled), fp32 and bf16;
* blockwise flash attention (the path with TE present), bf16 (CUDA's flash kernel has no fp32);
* unfused (explicit softmax), fp32 and bf16;

and FlexAttention against blockwise on the same documents and chunks. Tolerances:
gpu_helpers.py (relative to the largest reference value; fp32 2e-4, bf16 2e-2 / 3e-2).
"""

from __future__ import annotations

import functools

import pytest
import torch
from gpu_helpers import REASON, TOLERANCE, rel
from megatron.core.transformer.enums import AttnBackend, AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from test_blockwise_attention import dense_reference

from megatron_longctx.model.attention import AttentionContext, CoreAttention
from megatron_longctx.model.blockwise_attention import document_causal_attention
from megatron_longctx.model.context_parallel import local_query_chunks
from megatron_longctx.model.flex_attention import flex_document_attention, global_rows
from megatron_longctx.model.unfused_attention import unfused_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=REASON)

S, B, HEADS, GROUPS, DIM = 1024, 2, 8, 2, 64
SCALE = DIM ** -0.5
DOCS = [[0, 100, 130, 700], [0, 512]]  # a 30-token document, one across the CP chunk seams
LAYOUTS = ("cp1", "cp2_rank0", "cp2_rank1")


def layout(name: str) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
    """This rank's query chunks ``(local_start, local_end, global_start)`` and rows."""
    if name == "cp1":
        return [(0, S, 0)], torch.arange(S)
    chunks = local_query_chunks(int(name[-1]), 2, S // 2)  # chunks r and 3 - r of four
    return chunks, global_rows(chunks, S // 2, "cpu")


def core_attention(backend: str) -> CoreAttention:
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=DIM,
                               attention_dropout=0.0, transformer_impl="local",
                               attention_backend=AttnBackend[backend])
    config.flex_attention_backend = False
    return CoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                         attention_type="self")


def sdpa(q, k, v, chunks, starts):
    assert chunks == [(0, S, 0)] and starts is None  # the plain causal path
    core = core_attention("auto")
    assert not core.unfused and core.te_attention is None
    return core(q, k, v, None, packed_seq_params=AttentionContext(qkv_format="sbhd"))


PATHS = {  # name -> (function, dtypes)
    "sdpa": (sdpa, (torch.float32, torch.bfloat16)),
    "flex": (lambda q, k, v, c, d: flex_document_attention(q, k, v, SCALE, c, d),
             (torch.float32, torch.bfloat16)),
    "blockwise": (lambda q, k, v, c, d: document_causal_attention(q, k, v, SCALE, c, d),
                  (torch.bfloat16,)),
    "unfused": (lambda q, k, v, c, d: unfused_attention(q, k, v, SCALE, c, d),
                (torch.float32, torch.bfloat16)),
}


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, HEADS, DIM, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(S, B, GROUPS, DIM, generator=gen, dtype=torch.float64)
            for _ in range(2))
    grad = torch.randn(S, B, HEADS * DIM, generator=gen, dtype=torch.float64)
    return q, k, v, grad


@functools.cache
def reference(dtype: torch.dtype, name: str, docs: bool) -> tuple[torch.Tensor, ...]:
    """float64 output and gradients (dq of this rank's rows, dk, dv) on the inputs rounded to
    ``dtype`` (what the kernel sees), on the CPU."""
    _, rows = layout(name)
    q, k, v, grad = (t.to(dtype).double() for t in inputs())
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = dense_reference(*leaves, SCALE, DOCS if docs else [[0]] * B)[rows]
    out.backward(grad[rows])
    return out.detach(), q.grad[rows], k.grad, v.grad


def attend(fn, dtype, name, docs, device="cuda") -> tuple[torch.Tensor, ...]:
    """Output and gradients (dq of this rank's rows, dk, dv) of ``fn`` in ``dtype``."""
    chunks, rows = layout(name)
    q, k, v, grad = inputs()
    leaves = [t.to(device, dtype).requires_grad_() for t in (q[rows], k, v)]
    out = fn(*leaves, chunks, DOCS if docs else None)
    out.backward(grad[rows].to(device, dtype))
    return (out, *(t.grad for t in leaves))


CASES = [(path, dtype, name, docs) for path, (_, dtypes) in PATHS.items() for dtype in dtypes
         for name in LAYOUTS for docs in (False, True)
         if path != "sdpa" or (name == "cp1" and not docs)]


@pytest.mark.parametrize("path,dtype,name,docs", CASES,
                         ids=[f"{p}-{str(d)[6:]}-{n}-{'docs' if o else 'causal'}"
                              for p, d, n, o in CASES])
def test_path_matches_float64_forward_and_backward(path, dtype, name, docs):
    got, ref = attend(PATHS[path][0], dtype, name, docs), reference(dtype, name, docs)
    tol_out, tol_grad = TOLERANCE[dtype]
    errors = {what: rel(g, r) for what, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    print(path, dtype, name, docs, errors)
    assert errors["out"] <= tol_out and max(errors.values()) <= tol_grad, errors


@pytest.mark.parametrize("name", LAYOUTS)
def test_flex_equals_blockwise_on_documents_and_cp_chunks(name):
    flex = attend(PATHS["flex"][0], torch.bfloat16, name, True)
    blockwise = attend(PATHS["blockwise"][0], torch.bfloat16, name, True)
    ref = reference(torch.bfloat16, name, True)
    _, tol = TOLERANCE[torch.bfloat16]
    for what, a, b, r in zip(("out", "dq", "dk", "dv"), flex, blockwise, ref):
        # two bf16 kernels: each within tol of float64, so within 2 tol of each other
        assert rel(a, b.double().cpu()) <= 2 * tol, what
        assert rel(a, r) <= tol and rel(b, r) <= tol, what


def test_core_attention_picks_flex_for_documents_without_te():
    """On CUDA without Transformer Engine, ``auto`` sends documents (and CP) to FlexAttention
    and its result is the flex function's."""
    from megatron_longctx.model.gpu_kernels import transformer_engine_attention

    if transformer_engine_attention() is not None:
        pytest.skip("Transformer Engine is installed: documents go to its THD format")
    core = core_attention("auto")
    assert core.flex and not core.flex_everywhere
    q, k, v, _ = (t.cuda().to(torch.bfloat16) for t in inputs())
    with torch.no_grad():
        out = core(q, k, v, None, packed_seq_params=AttentionContext(qkv_format="sbhd",
                                                                     doc_starts=DOCS))
        direct = flex_document_attention(q, k, v, SCALE, [(0, S, 0)], DOCS)
    assert torch.equal(out, direct)


def test_te_thd_packed_documents_match_float64():
    """With Transformer Engine, packed documents go to its attention in the THD format (the
    micro-batch as one pack, ``cu_seqlens`` from the document starts), bf16 forward and
    backward against the float64 reference."""
    from megatron_longctx.model.gpu_kernels import transformer_engine_attention

    if transformer_engine_attention() is None:
        pytest.skip("Transformer Engine is not installed")
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=DIM, attention_dropout=0.0,
                               transformer_impl="transformer_engine", bf16=True,
                               params_dtype=torch.bfloat16)
    core = CoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                         attention_type="self").cuda()
    assert core.te_attention is not None
    context = AttentionContext(qkv_format="sbhd", doc_starts=DOCS)
    got = attend(lambda q, k, v, c, d: core(q, k, v, None, packed_seq_params=context),
                 torch.bfloat16, "cp1", True)
    tol_out, tol_grad = TOLERANCE[torch.bfloat16]
    errors = {what: rel(g, r) for what, g, r in
              zip(("out", "dq", "dk", "dv"), got, reference(torch.bfloat16, "cp1", True))}
    assert errors["out"] <= tol_out and max(errors.values()) <= tol_grad, errors
