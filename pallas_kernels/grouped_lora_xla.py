"""Plain-XLA formulations of the routed grouped low-rank product.

Every function here computes the contract of DESIGN.md section 4:

    out[t] = sum_j expert_weight[t, j] * scaling[e] * (x[t] @ lora_a[e]) @ lora_b[e],
    e = expert_idx[t, j]

`grouped_lora_dense` is the reference that kernels are tested against and the default XLA path:
it multiplies every token by every adapter and masks with the dense routing weights, so it costs
L times the flops of one LoRA but never materialises per-token adapter weights. The other
formulations are baselines for the benchmark.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_routing(
    gate_logits: jax.Array,  # [T, L] float32
    top_k: int,
    temperature: jax.Array | float = 1.0,
) -> tuple[jax.Array, jax.Array]:  # expert_idx [T, k] int32, expert_weight [T, k] float32
    """Top-k adapters per token, weighted by softmax(top-k logits / temperature).

    With k = 1 the softmax of one logit is 1, which is the original's "weight 1" rule.
    """
    top_logits, expert_idx = jax.lax.top_k(gate_logits.astype(jnp.float32), top_k)
    expert_weight = jax.nn.softmax(top_logits / temperature, axis=-1)
    return expert_idx.astype(jnp.int32), expert_weight


def dense_routing_weights(
    expert_idx: jax.Array,  # [T, k] int32
    expert_weight: jax.Array,  # [T, k]
    scaling: jax.Array,  # [L]
) -> jax.Array:
    """Scatters the top-k weights into a dense `[T, L]` float32 matrix, times the adapter scaling.

    A masked sum over the k slots (no scatter), so it is differentiable in `expert_weight` and
    fuses into one elementwise-reduce kernel.
    """
    num_adapters = scaling.shape[0]
    hit = expert_idx[:, :, None] == jnp.arange(num_adapters, dtype=expert_idx.dtype)  # [T, k, L]
    dense = jnp.sum(jnp.where(hit, expert_weight.astype(jnp.float32)[:, :, None], 0.0), axis=1)
    return dense * scaling.astype(jnp.float32)[None, :]


def grouped_lora_dense(
    x: jax.Array,  # [T, d_in]
    lora_a: jax.Array,  # [L, d_in, r]
    lora_b: jax.Array,  # [L, r, d_out]
    scaling: jax.Array,  # [L]
    expert_idx: jax.Array,  # [T, k] int32
    expert_weight: jax.Array,  # [T, k]
) -> jax.Array:  # [T, d_out], x.dtype
    """Dense-masked formulation: all adapters for every token, weighted by a dense `[T, L]`."""
    weights = dense_routing_weights(expert_idx, expert_weight, scaling)  # [T, L]
    xa = jnp.einsum("td,ldr->tlr", x, lora_a, preferred_element_type=jnp.float32)  # [T, L, r]
    xa = (xa * weights[:, :, None]).astype(x.dtype)
    out = jnp.einsum("tlr,lro->to", xa, lora_b, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def grouped_lora_gather(
    x: jax.Array,  # [T, d_in]
    lora_a: jax.Array,  # [L, d_in, r]
    lora_b: jax.Array,  # [L, r, d_out]
    scaling: jax.Array,  # [L]
    expert_idx: jax.Array,  # [T, k] int32
    expert_weight: jax.Array,  # [T, k]
) -> jax.Array:  # [T, d_out]
    """Gather-bmm formulation (the original's `bmm-torch` path).

    Materialises `lora_a[expert_idx]` of shape `[T, k, d_in, r]`: the memory wall the kernel
    exists to avoid. Kept only as a benchmark baseline.
    """
    a = lora_a[expert_idx]  # [T, k, d_in, r]
    b = lora_b[expert_idx]  # [T, k, r, d_out]
    coef = (expert_weight.astype(jnp.float32) * scaling.astype(jnp.float32)[expert_idx])
    xa = jnp.einsum("td,tkdr->tkr", x, a, preferred_element_type=jnp.float32)
    xa = (xa * coef[:, :, None]).astype(x.dtype)
    out = jnp.einsum("tkr,tkro->to", xa, b, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def grouped_lora_ragged(
    x: jax.Array,  # [T, d_in]
    lora_a: jax.Array,  # [L, d_in, r]
    lora_b: jax.Array,  # [L, r, d_out]
    scaling: jax.Array,  # [L]
    expert_idx: jax.Array,  # [T, k] int32
    expert_weight: jax.Array,  # [T, k]
) -> jax.Array:  # [T, d_out]
    """Sorted formulation: (token, slot) pairs sorted by adapter, two `jax.lax.ragged_dot`s."""
    num_tokens, top_k = expert_idx.shape
    num_adapters = lora_a.shape[0]
    flat_idx = expert_idx.reshape(-1)  # [T*k]
    order = jnp.argsort(flat_idx, stable=True)
    token_of_pair = order // top_k
    group_sizes = jnp.bincount(flat_idx, length=num_adapters).astype(jnp.int32)
    xs = x[token_of_pair]  # [T*k, d_in]
    xa = jax.lax.ragged_dot(xs, lora_a, group_sizes, preferred_element_type=jnp.float32)
    coef = expert_weight.reshape(-1).astype(jnp.float32) * scaling.astype(jnp.float32)[flat_idx]
    xa = (xa * coef[order][:, None]).astype(x.dtype)
    ys = jax.lax.ragged_dot(xa, lora_b, group_sizes, preferred_element_type=jnp.float32)
    out = jnp.zeros((num_tokens, lora_b.shape[-1]), jnp.float32).at[token_of_pair].add(ys)
    return out.astype(x.dtype)


XLA_FORMULATIONS = {
    "dense": grouped_lora_dense,
    "gather": grouped_lora_gather,
    "ragged": grouped_lora_ragged,
}
