"""RoPE frequency methods: one pure function per ``rope_type``, registered by name.

Every method rescales the base frequencies ``theta_j = base^(-2j/d)`` and may return an
attention factor ``m`` that multiplies cos and sin (logits scale by ``m^2``). Parameters use
HF ``rope_parameters`` names; each type has a typed parameter class whose ``validate()`` raises
``ValueError`` naming the key. Functions return ``(inv_freq [rows, d/2], attention_factor)``
with one row for shared bases or one row per KV group (HARPE); :func:`compute_inv_freq` expands
rows to one per attention head.

References: PI (Chen et al. 2023, arXiv 2306.15595); NTK-aware (bloc97, 2023); dynamic NTK
(emozilla, 2023); YaRN (Peng et al. 2023, arXiv 2309.00071); Llama 3.1 (Meta 2024); LongRoPE
(Ding et al. 2024, arXiv 2402.13753); HARPE (arXiv 2412.07171). Constants in
``../shared/METHODS.md`` section 1.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from megatron_longctx.rope.harpe import harpe_bases


@dataclass(frozen=True)
class RopeContext:
    """What a method may need besides its parameters."""

    dim: int  # rotary dim = head_dim * rotary_percent
    num_query_groups: int
    seq_len: int | None = None  # current sequence length (dynamic NTK, LongRoPE switch)
    max_position_embeddings: int | None = None  # target length (YaRN/LongRoPE default factor)


def _require_positive(key: str, value: float | None) -> None:
    if value is None or not value > 0:
        raise ValueError(f"rope_parameters['{key}'] must be positive, got {value!r}")


@dataclass(frozen=True)
class DefaultParams:
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    rope_theta: float = 10000.0

    def validate(self, ctx: RopeContext) -> None:
        _require_positive("rope_theta", self.rope_theta)


@dataclass(frozen=True)
class ScaledParams(DefaultParams):
    REQUIRED: ClassVar[tuple[str, ...]] = ("factor",)
    factor: float = 1.0

    def validate(self, ctx: RopeContext) -> None:
        super().validate(ctx)
        _require_positive("factor", self.factor)


@dataclass(frozen=True)
class DynamicParams(ScaledParams):
    REQUIRED: ClassVar[tuple[str, ...]] = ("factor", "original_max_position_embeddings")
    original_max_position_embeddings: int | None = None

    def validate(self, ctx: RopeContext) -> None:
        super().validate(ctx)
        _require_positive("original_max_position_embeddings",
                          self.original_max_position_embeddings)


@dataclass(frozen=True)
class YarnParams(DynamicParams):
    REQUIRED: ClassVar[tuple[str, ...]] = ("original_max_position_embeddings",)
    factor: float | None = None  # None: max_position_embeddings / original
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None  # DeepSeek-V2/V3 variant of the attention factor
    mscale_all_dim: float | None = None
    truncate: bool = True

    def validate(self, ctx: RopeContext) -> None:
        DefaultParams.validate(self, ctx)
        _require_positive("original_max_position_embeddings",
                          self.original_max_position_embeddings)
        _require_positive("factor", _target_factor(self, ctx))
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"rope_parameters['beta_fast']={self.beta_fast} must exceed "
                             f"'beta_slow'={self.beta_slow}")


@dataclass(frozen=True)
class Llama3Params(DynamicParams):
    REQUIRED: ClassVar[tuple[str, ...]] = ("factor", "low_freq_factor", "high_freq_factor",
                                           "original_max_position_embeddings")
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def validate(self, ctx: RopeContext) -> None:
        super().validate(ctx)
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"rope_parameters needs 0 < 'low_freq_factor' < 'high_freq_factor', got "
                f"{self.low_freq_factor} and {self.high_freq_factor}")


@dataclass(frozen=True)
class LongRopeParams(DefaultParams):
    REQUIRED: ClassVar[tuple[str, ...]] = ("short_factor", "long_factor",
                                           "original_max_position_embeddings")
    short_factor: Sequence[float] = ()
    long_factor: Sequence[float] = ()
    original_max_position_embeddings: int | None = None
    factor: float | None = None  # None: max_position_embeddings / original
    attention_factor: float | None = None
    longrope_start_tokens: int = 0  # n-hat: first positions keep original angles, no factor

    def validate(self, ctx: RopeContext) -> None:
        super().validate(ctx)
        _require_positive("original_max_position_embeddings",
                          self.original_max_position_embeddings)
        if self.attention_factor is None:
            _require_positive("factor", _target_factor(self, ctx))
        for key in ("short_factor", "long_factor"):
            values = list(getattr(self, key))
            if len(values) != ctx.dim // 2:
                raise ValueError(f"rope_parameters['{key}'] has {len(values)} values; rotary "
                                 f"dim {ctx.dim} needs {ctx.dim // 2} (one per frequency pair)")
            if min(values) <= 0:
                raise ValueError(f"rope_parameters['{key}'] must be positive")
            if any(b < a for a, b in zip(values, values[1:])):
                warnings.warn(f"rope_parameters['{key}'] is not monotone non-decreasing; "
                              f"LongRoPE's search constrains it to be", stacklevel=4)
        if self.longrope_start_tokens < 0:
            raise ValueError("rope_parameters['longrope_start_tokens'] must be >= 0")


HARPE_SCHEMES = ("uniform_ascending", "uniform_descending", "peak_valley")


@dataclass(frozen=True)
class HarpeParams:
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    harpe_bases: Sequence[float] | None = None
    harpe_scheme: str | None = None
    harpe_base_min: float = 1e6
    harpe_base_max: float = 5e6
    harpe_stride: float = 3e4
    rope_theta: float | None = None  # unused: each KV group has its own base

    def validate(self, ctx: RopeContext) -> None:
        if (self.harpe_bases is None) == (self.harpe_scheme is None):
            raise ValueError("rope_parameters for 'harpe' need exactly one of 'harpe_bases' "
                             f"(a list) or 'harpe_scheme' (one of {HARPE_SCHEMES})")
        if self.harpe_bases is not None:
            if len(self.harpe_bases) != ctx.num_query_groups:
                raise ValueError(
                    f"rope_parameters['harpe_bases'] has {len(self.harpe_bases)} bases; give one "
                    f"per KV group ({ctx.num_query_groups}): query heads sharing a KV head must "
                    f"share its base to keep q.k a function of relative position")
            if min(self.harpe_bases) <= 0:
                raise ValueError(f"rope_parameters['harpe_bases'] must all be positive, got "
                                 f"{min(self.harpe_bases)}")
            return
        if self.harpe_scheme not in HARPE_SCHEMES:
            raise ValueError(f"rope_parameters['harpe_scheme']={self.harpe_scheme!r}; choose "
                             f"one of {HARPE_SCHEMES}")
        _require_positive("harpe_base_min", self.harpe_base_min)
        if self.harpe_base_max < self.harpe_base_min:
            raise ValueError(f"rope_parameters['harpe_base_max']={self.harpe_base_max} is below "
                             f"'harpe_base_min'={self.harpe_base_min}")
        if self.harpe_scheme == "peak_valley":
            _require_positive("harpe_stride", self.harpe_stride)
            candidates = int((self.harpe_base_max - self.harpe_base_min) // self.harpe_stride) + 1
            if candidates < ctx.num_query_groups:
                raise ValueError(
                    f"HARPE peak_valley: only {candidates} candidate bases in "
                    f"[{self.harpe_base_min}, {self.harpe_base_max}] at stride "
                    f"{self.harpe_stride} for {ctx.num_query_groups} KV groups; widen the range "
                    f"or lower 'harpe_stride'")


# -- shared helpers -------------------------------------------------------------------------


def base_inv_freq(base: float | Tensor, dim: int) -> Tensor:
    """``1 / base^(2j/d)``, j = 0..d/2-1, in float32; a 1-D tensor of bases gives one row each."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim  # [d/2]
    base = torch.as_tensor(base, dtype=torch.float32)
    return 1.0 / (base[..., None] ** exponent)


def _target_factor(p, ctx: RopeContext) -> float | None:
    if p.factor is not None:
        return p.factor
    if ctx.max_position_embeddings and p.original_max_position_embeddings:
        return ctx.max_position_embeddings / p.original_max_position_embeddings
    return None


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          original_length: int, truncate: bool = True) -> tuple[float, float]:
    """Pair indices where the YaRN ramp starts/ends: ``corr_dim(r) = d ln(L/(2 pi r)) / 2 ln b``."""

    def corr_dim(rotations: float) -> float:
        return dim * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_ramp(low: float, high: float, num_pairs: int) -> Tensor:
    """0 below ``low`` (keep), 1 above ``high`` (interpolate), linear between."""
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    return ((torch.arange(num_pairs, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# -- methods -------------------------------------------------------------------------------

RopeFn = Callable[[Any, RopeContext], tuple[Tensor, float]]
ROPE_METHODS: dict[str, tuple[type, RopeFn]] = {}
LENGTH_DEPENDENT = {"dynamic", "longrope"}  # recomputed from the current sequence length


def register(name: str, params_cls: type):
    def wrap(fn: RopeFn) -> RopeFn:
        ROPE_METHODS[name] = (params_cls, fn)
        return fn

    return wrap


@register("default", DefaultParams)
def default_rope(p: DefaultParams, ctx: RopeContext) -> tuple[Tensor, float]:
    """Plain RoPE; ABF (Code Llama: 1e4 -> 1e6) is a larger ``rope_theta``."""
    return base_inv_freq(p.rope_theta, ctx.dim)[None], 1.0


@register("linear", ScaledParams)
def linear_rope(p: ScaledParams, ctx: RopeContext) -> tuple[Tensor, float]:
    """Position interpolation: ``theta_j / s``."""
    return base_inv_freq(p.rope_theta, ctx.dim)[None] / p.factor, 1.0


def ntk_base(base: float, factor: float, dim: int) -> float:
    """NTK-aware base: ``b' = b * s^(d/(d-2))`` (s=8, d=128, b=1e4 -> b'=82684.62)."""
    return base * factor ** (dim / (dim - 2))


@register("ntk", ScaledParams)
def ntk_rope(p: ScaledParams, ctx: RopeContext) -> tuple[Tensor, float]:
    """NTK-aware scaling: a larger base, see :func:`ntk_base`."""
    return base_inv_freq(ntk_base(p.rope_theta, p.factor, ctx.dim), ctx.dim)[None], 1.0


@register("dynamic", DynamicParams)
def dynamic_ntk_rope(p: DynamicParams, ctx: RopeContext) -> tuple[Tensor, float]:
    """Dynamic NTK: ``b' = b (s * seq/L - (s-1))^(d/(d-2))``, ``seq = max(cur_len, L)``.

    Stateless: the base depends only on the current length (HF additionally keeps a grown base
    cached while later inputs stay longer than L; the two agree on every fresh input).
    """
    d, length = ctx.dim, p.original_max_position_embeddings
    seq = max(ctx.seq_len or length, length)
    base = p.rope_theta * (p.factor * seq / length - (p.factor - 1)) ** (d / (d - 2))
    return base_inv_freq(base, d)[None], 1.0


@register("yarn", YarnParams)
def yarn_rope(p: YarnParams, ctx: RopeContext) -> tuple[Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; ``m = 0.1 ln s + 1``."""
    d, factor = ctx.dim, _target_factor(p, ctx)
    if p.attention_factor is not None:
        attention_factor = p.attention_factor
    elif p.mscale and p.mscale_all_dim:
        attention_factor = yarn_mscale(factor, p.mscale) / yarn_mscale(factor, p.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    theta = base_inv_freq(p.rope_theta, d)
    low, high = yarn_correction_range(p.beta_fast, p.beta_slow, d, p.rope_theta,
                                      p.original_max_position_embeddings, p.truncate)
    ramp = yarn_ramp(low, high, d // 2)  # 0: keep theta_j, 1: interpolate theta_j / s
    inv_freq = (theta / factor) * ramp + theta * (1 - ramp)
    return inv_freq[None], float(attention_factor)


@register("llama3", Llama3Params)
def llama3_rope(p: Llama3Params, ctx: RopeContext) -> tuple[Tensor, float]:
    """Llama 3.1: keep short wavelengths, divide long ones by ``factor``, smooth between."""
    theta = base_inv_freq(p.rope_theta, ctx.dim)
    length = p.original_max_position_embeddings
    low_wavelen, high_wavelen = length / p.low_freq_factor, length / p.high_freq_factor
    wavelen = 2 * math.pi / theta
    scaled = torch.where(wavelen > low_wavelen, theta / p.factor, theta)
    smooth = (length / wavelen - p.low_freq_factor) / (p.high_freq_factor - p.low_freq_factor)
    smoothed = (1 - smooth) * scaled / p.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)[None], 1.0


@register("longrope", LongRopeParams)
def longrope(p: LongRopeParams, ctx: RopeContext) -> tuple[Tensor, float]:
    """LongRoPE: per-pair factors, ``long_factor`` once the sequence exceeds the original length.

    ``m = sqrt(1 + ln(s) / ln(L))`` for both factor sets (Phi-3 4k->128k: 1.19024). The first
    ``longrope_start_tokens`` positions are handled by :class:`~.module.RotaryEmbedding`.
    """
    length = p.original_max_position_embeddings
    factor = _target_factor(p, ctx)
    if p.attention_factor is not None:
        attention_factor = p.attention_factor
    elif factor <= 1.0:
        attention_factor = 1.0
    else:
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(length))
    use_long = ctx.seq_len is not None and ctx.seq_len > length
    rescale = torch.tensor(p.long_factor if use_long else p.short_factor, dtype=torch.float32)
    return (base_inv_freq(p.rope_theta, ctx.dim) / rescale)[None], float(attention_factor)


@register("harpe", HarpeParams)
def harpe_rope(p: HarpeParams, ctx: RopeContext) -> tuple[Tensor, float]:
    """HARPE: one base per KV group (heads of a group share it), ``[groups, d/2]``."""
    if p.harpe_bases is not None:
        bases = [float(b) for b in p.harpe_bases]
    else:
        bases = harpe_bases(p.harpe_scheme, ctx.num_query_groups, p.harpe_base_min,
                            p.harpe_base_max, p.harpe_stride, ctx.dim)
    return base_inv_freq(torch.tensor(bases), ctx.dim), 1.0


# -- entry point ---------------------------------------------------------------------------


def parse_rope_parameters(rope_parameters: dict[str, Any], ctx: RopeContext):
    """The typed, validated parameters of ``rope_parameters`` (errors name the key)."""
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in ROPE_METHODS:
        raise ValueError(f"rope_parameters['rope_type']={rope_type!r} is unknown; choose one of "
                         f"{sorted(ROPE_METHODS)}")
    params_cls, _ = ROPE_METHODS[rope_type]
    names = {f.name for f in dataclasses.fields(params_cls)}
    given = {k: v for k, v in rope_parameters.items() if k != "rope_type"}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"rope_parameters key(s) {unknown} do not apply to rope_type "
                         f"{rope_type!r}; it takes {sorted(names)}")
    missing = sorted(set(params_cls.REQUIRED) - set(given))
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs rope_parameters {missing}")
    params = params_cls(**given)
    params.validate(ctx)
    return rope_type, params


def compute_inv_freq(
    rope_parameters: dict[str, Any],
    head_dim: int,
    num_attention_heads: int,
    num_query_groups: int,
    rotary_percent: float = 1.0,
    *,
    seq_len: int | None = None,
    max_position_embeddings: int | None = None,
) -> tuple[Tensor, float]:
    """Per-head inverse frequencies ``[num_attention_heads, rotary_dim // 2]`` (float32) and the
    attention factor. ``seq_len`` is the current length (used by ``dynamic`` and ``longrope``)."""
    if num_attention_heads % num_query_groups:
        raise ValueError(f"num_attention_heads {num_attention_heads} is not divisible by "
                         f"num_query_groups {num_query_groups}")
    dim = int(head_dim * rotary_percent)
    if dim % 2 or dim <= 0:
        raise ValueError(f"rotary dim head_dim*rotary_percent = {dim} must be positive and even")
    ctx = RopeContext(dim, num_query_groups, seq_len, max_position_embeddings)
    rope_type, params = parse_rope_parameters(rope_parameters, ctx)
    inv_freq, attention_factor = ROPE_METHODS[rope_type][1](params, ctx)
    inv_freq = inv_freq.to(torch.float32)
    # one row per KV group (or one shared row): a group's query heads share its row
    return inv_freq.repeat_interleave(num_attention_heads // inv_freq.shape[0], dim=0), float(
        attention_factor)
