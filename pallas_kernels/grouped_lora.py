"""`grouped_lora`: the routed low-rank product of DESIGN.md section 4, with implementation choice."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.grouped_lora_pallas import MAX_RANK, empty_product, grouped_lora_pallas
from pallas_kernels.grouped_lora_xla import XLA_FORMULATIONS, grouped_lora_dense

IMPLS = ("auto", "xla", "pallas", *(f"xla_{name}" for name in XLA_FORMULATIONS))


def as_arrays(*args):
    """The arguments as arrays (numpy arrays, lists and Python numbers too, for the shape checks);
    None stays None. Tracers pass through unchanged."""
    return tuple(None if a is None else jnp.asarray(a) for a in args)


def check_adapter_shapes(x, lora_a, lora_b, scaling):
    """x [T, d_in] floating, lora_a [L, d_in, r], lora_b [L, r, d_out], scaling [L], or a ValueError."""
    if x.ndim != 2:
        raise ValueError(f"x must be [T, d_in], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):  # an integer x came back as integer garbage
        raise ValueError(f"x must hold floating-point values, got dtype {x.dtype}")
    if lora_a.ndim != 3 or lora_b.ndim != 3:
        raise ValueError(f"lora_a must be [L, d_in, r] and lora_b [L, r, d_out], got {lora_a.shape} and {lora_b.shape}")
    num_adapters, d_in, rank = lora_a.shape
    if x.shape[1] != d_in:
        raise ValueError(f"x has d_in={x.shape[1]} but lora_a is {lora_a.shape} ([L, d_in, r])")
    if lora_b.shape[:2] != (num_adapters, rank):
        raise ValueError(f"lora_b {lora_b.shape} does not match lora_a {lora_a.shape}: want [L, r, d_out]")
    if scaling.shape != (num_adapters,):
        raise ValueError(f"scaling must be [L]=[{num_adapters}], got {scaling.shape}")


def check_base_shape(base, x, lora_b):
    """base is None or [T, d_out] (no broadcasting: a [1, d_out] base is a mistake, not a bias)."""
    if base is not None and base.shape != (x.shape[0], lora_b.shape[2]):
        raise ValueError(f"base must be [T, d_out]=[{x.shape[0]}, {lora_b.shape[2]}], got {base.shape}")


def _check_shapes(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base):
    check_adapter_shapes(x, lora_a, lora_b, scaling)
    if expert_idx.ndim != 2 or expert_idx.shape != expert_weight.shape or expert_idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"expert_idx {expert_idx.shape} and expert_weight {expert_weight.shape} must both be [T, k] "
            f"with T={x.shape[0]}"
        )
    if not jnp.issubdtype(expert_idx.dtype, jnp.integer):
        raise ValueError(f"expert_idx must hold integer adapter indices, got dtype {expert_idx.dtype}")
    # The range is checked where the indices are concrete; under jit an out-of-range index is not
    # caught, and each impl treats it differently (dropped, clamped or NaN).
    if not isinstance(expert_idx, jax.core.Tracer) and expert_idx.size:
        idx = np.asarray(expert_idx)
        if idx.min() < 0 or idx.max() >= lora_a.shape[0]:
            raise ValueError(f"expert_idx holds {idx.min() if idx.min() < 0 else idx.max()}, outside [0, L) for "
                             f"L={lora_a.shape[0]} adapters")
    check_base_shape(base, x, lora_b)


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
    (the XLA formulations), "pallas" (the kernels), "auto" (the fastest measured path for the backend,
    T and r: `_auto_impl`).
    base: optional [T, d_out] (the layer's `x @ kernel`); when given the result is `base + out`,
    and the Pallas kernel adds it in its epilogue instead of a separate pass over the output.
    expert_idx must hold indices in [0, L): checked when it is concrete, undefined under jit.
    Every adapter's weights must be finite, the unrouted ones too: the dense and concat formulations
    multiply their products by a weight of 0 (the converter refuses non-finite weights). An unrouted
    adapter's scaling is never read.
    Differentiable in x, expert_weight, base, scaling and (only when differentiated, e.g. MixLoRA)
    lora_a / lora_b: first-order reverse mode (`jax.grad`, `jax.vjp`), as the Pallas and concat
    paths are custom VJPs (no `jax.jvp`, no gradient of a gradient).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped_lora impl {impl!r}; choose one of {IMPLS}")
    x, lora_a, lora_b, scaling, expert_idx, expert_weight, base = as_arrays(
        x, lora_a, lora_b, scaling, expert_idx, expert_weight, base)
    _check_shapes(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base)
    expert_idx = expert_idx.astype(jnp.int32)  # (a narrower type wraps around in the impls' index arithmetic)
    empty = empty_product(x, lora_a, lora_b, expert_idx, base)  # (the XLA formulations divide by T * L)
    if empty is not None:
        return empty
    if impl == "auto":
        impl = _auto_impl(x.shape[0], lora_a.shape[2])
    if impl == "pallas":
        return grouped_lora_pallas(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base=base)
    fn = XLA_FORMULATIONS[impl.removeprefix("xla_")] if impl.startswith("xla_") else grouped_lora_dense
    out = fn(x, lora_a, lora_b, scaling, expert_idx, expert_weight)
    return out if base is None else (base + out).astype(x.dtype)


# Up to which T (exclusive) `grouped_lora(impl="auto")` runs the XLA concat formulation on a GPU, by
# rank (see `_auto_impl`); above rank 16 it never does.
CONCAT_MAX_TOKENS_RANK_8 = 4096
CONCAT_MAX_TOKENS_RANK_16 = 384


def _auto_impl(num_tokens: int, rank: int) -> str:
    """The fastest measured implementation for the default backend and shape (docs/benchmarks.md).

    CPU: the Pallas kernels only run in interpret mode there, so the XLA dense formulation.
    GPU (bf16, L = 28, k = 2, d 4096 -> 4096 / 14336; layer = base + delta, forward, ms):
      T <= 32: Pallas (decode forward; under differentiation `grouped_lora_pallas.auto_grad_path`).
        H100 v1 run, T = 16, d_out 4096: 0.026-0.031 vs XLA best 0.024-0.030, d_out 14336:
        0.056-0.069 vs 0.057-0.074; T = 1: 0.021-0.023 vs 0.024-0.034.
      Above, the XLA concat formulation (every adapter's columns side by side: its work grows with
      L * r, the Pallas paths' with k * R) while the rank is small and T below a bound, Pallas
      otherwise. H200, session 20, concat vs Pallas (d_out 4096 / 14336):
        r 8, concat below 4096 tokens: T 1536 0.0995 / 0.3066 vs 0.1076 / 0.3184, T 2048 0.1311 /
          0.3959 vs 0.1340 / 0.4009; T 4096 Pallas (combo) 0.2349 / 0.7045 vs 0.2409 / 0.7599;
        r 16, concat below 384 tokens: T 128 0.0322 / 0.0539 vs 0.0369 / 0.0573, T 256 0.0393 /
          0.0767 vs 0.0399 / 0.0746; T 384 is a tie (two runs: Pallas 0.0475 / 0.1023 vs 0.0486 /
          0.1039, then 0.0478 / 0.1053 vs 0.0475 / 0.1033); T 512 Pallas 0.0484 / 0.1294 vs 0.0498 /
          0.1317;
        r 32 and 64, Pallas from 40 tokens up: r 32, T 256 0.0417 / 0.0836 vs 0.0463 / 0.0849;
          r 64, T 40 0.0366 / 0.0683 vs 0.0420 / 0.0717, T 256 0.0483 / 0.0979 vs 0.0607 / 0.1054.
        (Before, concat for every rank from 33 to 1023 tokens, measured on an H100 at T = 256 against
        the Pallas paths of that time.)
      Under differentiation, wherever concat is chosen Pallas's own rule would also differentiate
      concat (T * L * r <= 3 * 2^20, `grouped_lora_pallas.auto_grad_path`). Where Pallas is chosen
      below 1024 tokens it differentiates concat too, except at r >= 64 from 256 tokens: sorted, f+b
      at T 256 0.0545 vs concat 0.0696 ms (d_out 4096); at d_out 14336 a tie (two runs: 0.0950 vs
      0.0933, then 0.0902 vs 0.0940).
    """
    if jax.default_backend() != "gpu" or rank > MAX_RANK:  # (the kernels take r <= MAX_RANK)
        return "xla"
    if num_tokens <= 32 or rank > 16:
        return "pallas"
    concat_max_tokens = CONCAT_MAX_TOKENS_RANK_8 if rank <= 8 else CONCAT_MAX_TOKENS_RANK_16
    return "xla_concat" if num_tokens < concat_max_tokens else "pallas"
