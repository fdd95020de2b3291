"""Memory of one training rank: the project's one estimator (``--dry-run``, the layout planner).

Counts the bytes this codebase keeps during a training step, term by term, for one pipeline
stage (``stage_memory``) or the most loaded one (``estimate_memory``):

* **weights**: this rank's parameters (TP shard of its PP stage's layers; the embedding on the
  first stage, the output layer, or a copy of the tied embedding, on the last) in the model
  dtype;
* **gradients**: megatron-core DDP's gradient buffer, fp32 (``grad_reduce_in_fp32``; bf16
  with ``--grad-reduce-in-bf16``);
* **optimizer**: Adam moments (8 bytes) or SGD momentum (4) plus, with bf16, fp32 main weights
  (4); the distributed optimizer shards them over DP x CP;
* **activations**: the tensors autograd saves for backward, per micro-batch in flight (1F1B
  keeps ``pp - stage`` of them on stage ``stage``). Per layer and token they were read off the
  model (``saved_tensors_hooks``): each RMSNorm keeps its fp32 input, normalised copy and output,
  the attention its queries, keys, the fused QKV output (pinned by the value view) and output,
  the SwiGLU MLP its ``fc1`` output and three ``ffn``-wide tensors. Selective recompute keeps
  the attention inputs instead (under CP: the local keys/values, not the gathered ones); full
  recompute keeps each chunk's input and rebuilds one chunk during backward;
* **logits**: full fp32 logits (kept as the softmax by megatron-core's cross entropy) or, with
  ``--cross-entropy-chunk-size``, one chunk of them (``chunked_loss.logits_chunk_tokens``);
* **transients**: the largest short-lived allocation at the peak (the loss backward with its
  fp32 weight gradient, or one layer's activation gradients).

Token counts follow the layout: ``micro_batch_size x seq_length / cp`` per rank, divided by TP
again for the norms and residuals with sequence parallelism. The estimate is checked against
measured peaks in ``benchmarks/plan_layout_accuracy.py`` (CPU); on GPUs add the CUDA context,
communication buffers and allocator slack (the planner keeps a headroom for them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_longctx.config import ModelConfig, ParallelConfig, RunConfig, TrainingConfig
from megatron_longctx.model.chunked_loss import logits_chunk_tokens
from megatron_longctx.model.gpt import padded_vocab_size

GIB = 2**30


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    formula: str  # how it was computed, for --explain


@dataclass
class MemoryEstimate:
    """``terms``: what the rank holds (weights, gradients, optimizer, activations, logits);
    ``phases``: bytes above weights + gradients + optimizer at each candidate peak moment of a
    step (the activations and logits alive then, plus that moment's temporaries)."""

    stage: int  # pipeline stage the terms are for
    terms: list[Term]
    phases: list[Term]

    def __getitem__(self, name: str) -> float:
        return next(t.bytes for t in self.terms if t.name == name)

    @property
    def static(self) -> float:
        return sum(self[name] for name in ("weights", "gradients", "optimizer"))

    @property
    def peak_phase(self) -> Term:
        return max(self.phases, key=lambda t: t.bytes)

    @property
    def total(self) -> float:
        """The peak: weights + gradients + optimizer + the largest phase."""
        return self.static + self.peak_phase.bytes

    def explain(self) -> str:
        lines = [f"{t.name:>19}: {t.bytes / GIB:8.3f} GiB  {t.formula}" for t in self.terms]
        lines.append("  peak candidates (on top of weights + gradients + optimizer):")
        lines += [f"{'*' if t is self.peak_phase else ' '}{t.name:>18}: {t.bytes / GIB:8.3f} GiB"
                  f"  {t.formula}" for t in self.phases]
        lines.append(f"{'total':>19}: {self.total / GIB:8.3f} GiB  (pipeline stage "
                     f"{self.stage}, peak at {self.peak_phase.name})")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Shape:
    """The per-rank sizes every term is built from."""

    h: int  # hidden size
    a: int  # query width on this rank: heads / tp * head_dim
    kv: int  # key (= value) width on this rank
    heads: int  # query heads on this rank
    f: int  # FFN width on this rank
    vocab: int  # padded vocabulary rows on this rank
    e: int  # bytes per element of the model dtype
    tokens: int  # tokens of one micro-batch on this rank (after the CP split)
    norm_tokens: int  # tokens the norms and residuals see (/ tp with sequence parallelism)


def _shape(m: ModelConfig, p: ParallelConfig, t: TrainingConfig) -> _Shape:
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    tokens = t.micro_batch_size * t.seq_length // cp
    return _Shape(h=m.hidden_size, a=m.num_attention_heads * m.head_dim // tp,
                  kv=m.query_groups * m.head_dim // tp, heads=m.num_attention_heads // tp,
                  f=m.ffn_hidden_size // tp,
                  vocab=padded_vocab_size(m.vocab_size, tp, m.make_vocab_size_divisible_by) // tp,
                  e=2 if t.bf16 else 4, tokens=tokens,
                  norm_tokens=tokens // tp if p.sequence_parallel else tokens)


def stage_parameters(m: ModelConfig, p: ParallelConfig, stage: int) -> int:
    """Parameters held by one rank of pipeline stage ``stage`` (its TP shard)."""
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    h, d = m.hidden_size, m.head_dim
    qkv = (m.num_attention_heads + 2 * m.query_groups) * d // tp
    layer = (h * qkv + (qkv if m.add_qkv_bias else 0)  # fused QKV (+ Qwen2 biases)
             + m.num_attention_heads * d // tp * h  # attention output
             + 3 * h * (m.ffn_hidden_size // tp)  # SwiGLU fc1 (gate, up) and fc2
             + 2 * h)  # the two RMSNorm weights (replicated)
    params = layer * (m.num_layers // pp)
    embedding = padded_vocab_size(m.vocab_size, tp, m.make_vocab_size_divisible_by) // tp * h
    if stage == 0:
        params += embedding
    if stage == pp - 1:
        params += h  # final norm
        if m.untie_embeddings_and_output_weights or pp > 1:  # tied: a copy on the last stage
            params += embedding
    return params


def _optimizer_bytes_per_parameter(t: TrainingConfig) -> int:
    optimizer = getattr(t, "optimizer", "adam")
    states = 8 if optimizer == "adam" else (4 if getattr(t, "sgd_momentum", 0.0) else 0)
    return states + (4 if t.bf16 else 0)  # fp32 main weights next to bf16 model weights


def layer_activation_bytes(s: _Shape, cp: int, granularity: str | None) -> float:
    """Bytes one transformer layer saves for backward, for one micro-batch on this rank."""
    norms = 2 * s.norm_tokens * ((4 + 2 * s.e) * s.h + 4)  # fp32 input, normalised, out, rstd
    mlp = s.tokens * s.e * 5 * s.f  # fc1 output (2f), SiLU, gate + 0, product
    if granularity == "selective":  # attention inputs: query copy, QKV output, + the output
        attention = s.tokens * s.e * (3 * s.a + 2 * s.kv)
    elif cp > 1:  # rotated query, all-gathered keys and values, output, log-sum-exp
        attention = s.tokens * (s.e * (2 * s.a + 2 * cp * s.kv) + 4 * s.heads)
    else:  # rotated query and key, QKV output (pinned by the value view), output, lse
        attention = s.tokens * (s.e * (3 * s.a + 3 * s.kv) + 4 * s.heads)
    return norms + attention + mlp


def _logits_chunk(s: _Shape, t: TrainingConfig) -> int:
    return logits_chunk_tokens(t.cross_entropy_chunk_size, s.tokens, s.vocab)


def stage_memory(cfg: RunConfig, world_size: int, stage: int) -> MemoryEstimate:
    """Bytes one rank of pipeline stage ``stage`` holds, term by term, and at its peak."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    pp, cp = p.pipeline_model_parallel_size, p.context_parallel_size
    s = _shape(m, p, t)
    first, last = stage == 0, stage == pp - 1
    params = stage_parameters(m, p, stage)
    shard = p.data_parallel_size(world_size) * cp if p.use_distributed_optimizer else 1
    opt_per_param = _optimizer_bytes_per_parameter(t)
    grad_bytes = 2 if t.bf16 and p.grad_reduce_in_bf16 else 4  # megatron-core DDP's buffer
    terms = [
        Term("weights", params * s.e, f"{params:,} parameters x {s.e} B"),
        Term("gradients", params * grad_bytes, f"{params:,} x {grad_bytes} B (grad buffer)"),
        Term("optimizer", params * opt_per_param / shard,
             f"{params:,} x {opt_per_param} B" + (f" / {shard} (distributed over DP x CP)"
                                                  if shard > 1 else "")),
    ]

    # -- activations: saved tensors of every micro-batch in flight -----------------------------
    layers = m.num_layers // pp
    granularity = t.recompute_granularity
    per_layer = layer_activation_bytes(s, cp, None if granularity == "full" else granularity)
    if granularity == "full":
        chunk = t.recompute_num_layers
        if t.recompute_method == "block":  # the first `chunk` layers recomputed, one by one
            recomputed = min(chunk, layers)
            saved = recomputed * s.norm_tokens * s.h * s.e + (layers - recomputed) * per_layer
            rebuilt = per_layer if recomputed else 0.0
        else:  # uniform: the input of every chunk of `chunk` layers
            saved = -(-layers // chunk) * s.norm_tokens * s.h * s.e
            rebuilt = min(chunk, layers) * per_layer
        how = f"full recompute ({t.recompute_method}, {chunk})"
    else:
        saved, rebuilt = layers * per_layer, 0.0
        how = f"{granularity} recompute" if granularity else "no recompute"
    # cos and sin, shared by every layer: one head, or (HARPE) every local query head and group
    pairs = int(m.head_dim * m.rotary_percent) // 2
    table_heads = (s.heads + s.kv // m.head_dim if m.rope_parameters.get("rope_type") == "harpe"
                   else 1)
    extra = s.tokens * (2 * table_heads * pairs * s.e + 24)  # + token ids, positions, mask
    if pp > 1 and not last:
        extra += s.norm_tokens * s.h * s.e  # the stage's output, kept for its backward
    if pp > 1 and not first and s.e != 4:
        extra += s.norm_tokens * s.h * s.e  # the received input (fp32: saved by the norm)
    if last:
        extra += s.norm_tokens * ((4 + 2 * s.e) * s.h + 4) + 12 * s.tokens  # final norm, loss
    one = saved + extra  # one micro-batch
    in_flight = min(pp - stage, _micro_batches(cfg, world_size)) if pp > 1 else 1
    activations = in_flight * one
    terms.append(Term("activations", activations,
                      f"{in_flight} micro-batch(es) x ({layers} layers x "
                      f"{per_layer / GIB:.3f} GiB, {how}; "
                      f"{s.tokens:,} tokens{', SP' if p.sequence_parallel else ''})"))

    # -- the candidate peaks -------------------------------------------------------------------
    phases = []
    logits = 0.0
    if last:
        chunk = _logits_chunk(s, t)
        gathered = s.tokens * s.h * s.e if p.sequence_parallel else 0.0
        grad_x = s.tokens * s.h * s.e
        if chunk:  # one chunk's fp32 logits; backward adds the fp32 weight gradient and dX
            rows = min(chunk, s.tokens)
            logits = rows * s.vocab * 4
            # bf16: each chunk's weight-gradient product (vocab x h) and logits gradient are
            # bf16 tensors beside the fp32 sum
            low = (s.vocab * s.h + rows * s.vocab) * s.e if s.e != 4 else 0
            loss_temporaries = s.vocab * s.h * 4 + low + grad_x + gathered
            how = f"chunks of {chunk:,} tokens x {s.vocab:,} vocab x 4 B"
        else:  # the fp32 softmax is kept; bf16 logits sit beside their fp32 copy while made
            logits = s.tokens * s.vocab * 4
            loss_temporaries = ((s.tokens * s.vocab * s.e if s.e != 4 else 0.0)
                                + s.vocab * s.h * s.e + grad_x)
            how = f"{s.tokens:,} tokens x {s.vocab:,} vocab x 4 B (full logits)"
        terms.append(Term("logits", logits, how))
        phases.append(Term("loss", activations + logits + loss_temporaries,
                           "activations + logits + the loss backward's weight gradient and dX"))
    # the first layer to run backward: all activations (the loss's freed), its gradients
    # (fc1-wide) and, with full recompute, its rebuilt activations
    phases.append(Term("layer backward", activations + s.tokens * s.e * 4 * s.f + rebuilt,
                       "activations + one layer's activation gradients"
                       + (" + its recomputed activations" if rebuilt else "")))
    if first:  # the embedding's dense weight gradient, other micro-batches still in flight
        embedding = s.vocab * s.h * s.e
        phases.append(Term("embedding backward", activations - one + embedding,
                           "the other in-flight micro-batches + the embedding gradient"))
    if t.check_for_nan_in_loss_and_grad:  # torch.isfinite over the grad buffer: abs + 3 masks
        phases.append(Term("gradient check", params * 7,
                           f"{params:,} x 7 B (--check-for-nan-in-loss-and-grad)"))
    return MemoryEstimate(stage, terms, phases)


def _micro_batches(cfg: RunConfig, world_size: int) -> int:
    t = cfg.training
    return max(1, t.global_batch_size // (t.micro_batch_size
                                          * cfg.parallel.data_parallel_size(world_size)))


def estimate_memory(cfg: RunConfig, world_size: int) -> MemoryEstimate:
    """The pipeline stage with the largest total (every stage for PP = 1 is stage 0)."""
    stages = [stage_memory(cfg, world_size, k)
              for k in range(cfg.parallel.pipeline_model_parallel_size)]
    return max(stages, key=lambda e: e.total)


def with_options(cfg: RunConfig, **changes) -> RunConfig:
    """A copy of ``cfg`` with fields of its sections replaced: ``parallel__sequence_parallel=
    True``, ``training__recompute_granularity='full'``."""
    sections = {}
    for key, value in changes.items():
        section, name = key.split("__")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(cfg, **{
        section: dataclasses.replace(getattr(cfg, section), **values)
        for section, values in sections.items()})
