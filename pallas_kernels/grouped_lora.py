"""`grouped_lora`: the routed low-rank product of DESIGN.md section 4, with implementation choice."""

from __future__ import annotations

import functools

import jax

from pallas_kernels.grouped_lora_xla import XLA_FORMULATIONS, grouped_lora_dense

IMPLS = ("auto", "xla", "pallas", *(f"xla_{name}" for name in XLA_FORMULATIONS))


def _check_shapes(x, lora_a, lora_b, scaling, expert_idx, expert_weight):
    if x.ndim != 2:
        raise ValueError(f"x must be [T, d_in], got shape {x.shape}")
    num_adapters, d_in, rank = lora_a.shape
    if x.shape[1] != d_in:
        raise ValueError(f"x has d_in={x.shape[1]} but lora_a is {lora_a.shape} ([L, d_in, r])")
    if lora_b.shape[:2] != (num_adapters, rank):
        raise ValueError(f"lora_b {lora_b.shape} does not match lora_a {lora_a.shape}: want [L, r, d_out]")
    if scaling.shape != (num_adapters,):
        raise ValueError(f"scaling must be [L]=[{num_adapters}], got {scaling.shape}")
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
) -> jax.Array:  # [T, d_out]
    """out[t] = sum_j w[t, j] * scaling[e] * (x[t] @ lora_a[e]) @ lora_b[e], e = expert_idx[t, j].

    impl: "xla" (dense-masked reference), "xla_dense" / "xla_gather" / "xla_ragged" (the XLA
    formulations), "pallas" (the kernel), "auto" (the fastest measured path for the backend).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped_lora impl {impl!r}; choose one of {IMPLS}")
    _check_shapes(x, lora_a, lora_b, scaling, expert_idx, expert_weight)
    if impl == "pallas":
        raise NotImplementedError("the Pallas grouped_lora kernel is not built yet; use impl='xla'")
    if impl.startswith("xla_"):
        return XLA_FORMULATIONS[impl.removeprefix("xla_")](x, lora_a, lora_b, scaling, expert_idx, expert_weight)
    return grouped_lora_dense(x, lora_a, lora_b, scaling, expert_idx, expert_weight)
