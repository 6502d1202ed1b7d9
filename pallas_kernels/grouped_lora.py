"""`grouped_lora`: the routed low-rank product of DESIGN.md section 4, with implementation choice."""

from __future__ import annotations

import functools

import jax

from pallas_kernels.grouped_lora_pallas import grouped_lora_pallas
from pallas_kernels.grouped_lora_xla import XLA_FORMULATIONS, grouped_lora_dense

IMPLS = ("auto", "xla", "pallas", *(f"xla_{name}" for name in XLA_FORMULATIONS))


def check_adapter_shapes(x, lora_a, lora_b, scaling):
    """x [T, d_in], lora_a [L, d_in, r], lora_b [L, r, d_out], scaling [L], or a ValueError."""
    if x.ndim != 2:
        raise ValueError(f"x must be [T, d_in], got shape {x.shape}")
    num_adapters, d_in, rank = lora_a.shape
    if x.shape[1] != d_in:
        raise ValueError(f"x has d_in={x.shape[1]} but lora_a is {lora_a.shape} ([L, d_in, r])")
    if lora_b.shape[:2] != (num_adapters, rank):
        raise ValueError(f"lora_b {lora_b.shape} does not match lora_a {lora_a.shape}: want [L, r, d_out]")
    if scaling.shape != (num_adapters,):
        raise ValueError(f"scaling must be [L]=[{num_adapters}], got {scaling.shape}")


def _check_shapes(x, lora_a, lora_b, scaling, expert_idx, expert_weight):
    check_adapter_shapes(x, lora_a, lora_b, scaling)
    if expert_idx.shape != expert_weight.shape or expert_idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"expert_idx {expert_idx.shape} and expert_weight {expert_weight.shape} must both be [T, k] "
            f"with T={x.shape[0]}"
        )


@functools.partial(jax.named_call, name="grouped_lora")
def grouped_lora(
    x: jax.Array,  # [T, d_in]
    lora_a: jax.Array,  # [L, d_in, r]
    lora_b: jax.Array,  # [L, r, d_out]
    scaling: jax.Array,  # [L]
    expert_idx: jax.Array,  # [T, k] int32
    expert_weight: jax.Array,  # [T, k]
    *,
    impl: str = "auto",
    base: jax.Array | None = None,  # [T, d_out]
) -> jax.Array:  # [T, d_out]
    """out[t] = sum_j w[t, j] * scaling[e] * (x[t] @ lora_a[e]) @ lora_b[e], e = expert_idx[t, j].

    impl: "xla" (dense-masked reference), "xla_dense" / "xla_concat" / "xla_gather" / "xla_ragged"
    (the XLA formulations), "pallas" (the kernels), "auto" (the fastest measured path for the backend
    and T).
    base: optional [T, d_out] (the layer's `x @ kernel`); when given the result is `base + out`,
    and the Pallas kernel adds it in its epilogue instead of a separate pass over the output.
    Differentiable in x, expert_weight, base, scaling and (only when differentiated, e.g. MixLoRA)
    lora_a / lora_b.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped_lora impl {impl!r}; choose one of {IMPLS}")
    _check_shapes(x, lora_a, lora_b, scaling, expert_idx, expert_weight)
    if impl == "auto":
        impl = _auto_impl(x.shape[0])
    if impl == "pallas":
        return grouped_lora_pallas(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base=base)
    fn = XLA_FORMULATIONS[impl.removeprefix("xla_")] if impl.startswith("xla_") else grouped_lora_dense
    out = fn(x, lora_a, lora_b, scaling, expert_idx, expert_weight)
    return out if base is None else (base + out).astype(x.dtype)


def _auto_impl(num_tokens: int) -> str:
    """The fastest measured implementation for the default backend (docs/benchmarks.md).

    CPU: the Pallas kernels only run in interpret mode there, so the XLA dense formulation.
    GPU (bf16, L = 28, k = 2, d 4096 -> 4096 / 14336, r 8-64; layer = base + delta, ms):
      T <= 32: Pallas (decode forward; under differentiation `grouped_lora_pallas.auto_grad_path`).
        H100 v1 run, T = 16, d_out 4096: 0.026-0.031 vs XLA best 0.024-0.030, d_out 14336:
        0.056-0.069 vs 0.057-0.074; T = 1: 0.021-0.023 vs 0.024-0.034.
      32 < T < 1024: the XLA concat formulation. Its forward is XLA dense's (H200, session 10,
        T = 256: 0.0465 vs 0.0462 ms), which beat every Pallas path at T = 256 in both H100 runs:
        v2 run, d_out 4096: 0.054 (r 8) / 0.059 (r 16) / 0.061 (r 64) vs Pallas best 0.064 /
        0.065 / 0.077; d_out 14336: 0.085 / 0.129 vs 0.103 / 0.132 (r 8 / 64). Its backward
        beats autodiff of XLA dense (H200, T = 256, f+b: 0.0295 vs 0.0364 ms at d_out 4096, r 8;
        0.094 vs 0.168 at d_out 14336, r 64). (XLA gather was faster still at r = 8, 0.039 / 0.084,
        but it materialises [T, k, d_in, r], which the contract rules out.)
      T >= 1024: Pallas (sorted forward). H100 v1 run, T = 4096: 0.286-0.311 vs XLA best
        0.290-0.447 (d_out 4096), 0.966-1.019 vs 0.940-1.32 (d_out 14336); T = 16384: 1.03-1.08 vs
        1.05-1.58 and 3.67-3.81 vs 3.66-5.17; the v2 run repeated T = 4096 within 2%. The 1024
        crossover lies between measured points (256 and 4096). From 8192 tokens (4096 up to r = 32)
        the Pallas wrapper takes its combo path (one output pass for all slots), up to r = 64
        (`grouped_lora_pallas.auto_path`).
    """
    if jax.default_backend() != "gpu":
        return "xla"
    if num_tokens <= 32 or num_tokens >= 1024:
        return "pallas"
    return "xla_concat"
