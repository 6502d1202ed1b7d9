"""`routed_lora` for many tokens (prefill): the routed product as two plain 2-D GEMMs.
Contract: `pallas_kernels.routed_lora_xla.routed_lora_xla`.

1. `side_products`: x @ [A_flat | gate_hi | gate_lo], one GEMM with float32 output, where A_flat
   [d_in, L*r] is every adapter's lora_a side by side and gate = gate_hi + gate_lo are the float32
   gate's two bf16 halves (float32-accurate logits on the tensor cores, as in the decode kernel:
   4e-7 of |x| @ |gate| on an H200, docs/benchmarks.md, session 31).
   Every adapter's x @ A is computed: at L * r = 224 that is a few percent of the base GEMM's flops,
   and no product waits for the routing.
2. Top-k and softmax of the logits (`top_k_routing`), each column of x @ A_flat weighted by its
   adapter's routing weight (zero unless chosen), times lora_b as one [L*r, d_out] matrix, plus base.

The composition instead computes the same logits in a GEMM of its own (`gate_logits`) and, above 1024
tokens, the sorted Pallas product. On an H100 (LLaMA-3-8B projections, L = 28, r = 8, T = 64 / 512 / 16384) this
formulation's cost over the base GEMM was 0.45-0.87x the composition's (docs/benchmarks.md,
"Prefill (session 4)").
A Pallas kernel that fused the routing, the second GEMM and the base add (token tiles x output
blocks) lost to it at d_out = 14336 (Triton's MMA at K = 224) and was dropped.

Differentiable through the composition (`routed_lora_xla.with_composition_vjp`): training's
gradients run exactly the op-by-op path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_lora_xla import dense_routing_weights, top_k_routing
from pallas_kernels.pallas_common import dot_precision, gate_halves  # float32 inputs: float32 products, not TF32
from pallas_kernels.routed_lora_xla import gate_logits, with_composition_vjp


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    """Static choices (a `nondiff_argnums` argument of the custom VJP)."""

    top_k: int
    has_base: bool
    grouped_impl: str  # grouped_lora impl of the composition the VJP differentiates


def side_products(x: jax.Array, gate: jax.Array, lora_a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """xa [T, L*r] float32 (column e*r + j: adapter e's j-th of x @ lora_a[e]), gate logits [T, L]
    float32. x [T, d_in], gate [d_in, L] float32, lora_a [L, d_in, r]."""
    num_adapters, depth, rank = lora_a.shape
    columns = num_adapters * rank
    a_flat = lora_a.transpose(1, 0, 2).reshape(depth, columns).astype(x.dtype)
    if x.dtype == jnp.bfloat16:
        # x is bf16, so x @ gate = x @ hi + x @ lo (gate_halves).
        hi, lo = gate_halves(gate, jnp.bfloat16)
        side = jnp.dot(x, jnp.concatenate([a_flat, hi, lo], axis=1), preferred_element_type=jnp.float32)
        return side[:, :columns], side[:, columns:columns + num_adapters] + side[:, columns + num_adapters:]
    xa = jnp.dot(x, a_flat, preferred_element_type=jnp.float32, precision=dot_precision(x.dtype))
    return xa, gate_logits(x, gate)


def _prefill_two_gemms(x, gate, lora_a, lora_b, scaling, temperature, base, cfg):
    num_tokens = x.shape[0]
    num_adapters, rank, width = lora_b.shape
    xa, logits = side_products(x, gate, lora_a)
    expert_idx, expert_weight = top_k_routing(logits, cfg.top_k, temperature[0])
    # The weight is rounded to the compute dtype, as the composition passes it to grouped_lora.
    weights = dense_routing_weights(expert_idx, expert_weight.astype(x.dtype), scaling)  # [T, L]
    xa = (xa.reshape(num_tokens, num_adapters, rank) * weights[:, :, None]).reshape(num_tokens, -1)
    delta = jnp.dot(xa.astype(x.dtype), lora_b.reshape(num_adapters * rank, width),
                    preferred_element_type=jnp.float32, precision=dot_precision(x.dtype)).astype(x.dtype)
    return (base + delta if cfg.has_base else delta), logits


_routed_lora_prefill = with_composition_vjp(_prefill_two_gemms)


def routed_lora_prefill(
    x: jax.Array,  # [T, d_in]
    gate: jax.Array,  # [d_in, L] float32
    lora_a: jax.Array,  # [L, d_in, r]
    lora_b: jax.Array,  # [L, r, d_out]
    scaling: jax.Array,  # [L]
    temperature: jax.Array | float,  # [] routing temperature
    *,
    top_k: int,
    base: jax.Array | None = None,  # [T, d_out]
    grouped_impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:  # y [T, d_out] x.dtype, gate_logits [T, L] float32
    """The two-GEMM routed product (module docstring). Any T works; it is meant for prefill."""
    cfg = PrefillConfig(top_k=top_k, has_base=base is not None, grouped_impl=grouped_impl)
    return _routed_lora_prefill(x, gate, lora_a, lora_b, scaling, temperature, base, cfg)
