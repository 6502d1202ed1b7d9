"""Plain-XLA formulations of the routed grouped low-rank product.

Every function here computes the contract of DESIGN.md section 4:

    out[t] = sum_j expert_weight[t, j] * scaling[e] * (x[t] @ lora_a[e]) @ lora_b[e],
    e = expert_idx[t, j]

`grouped_lora_dense` is the reference that kernels are tested against and the default XLA path:
it multiplies every token by every adapter and masks with the dense routing weights, so it costs
L times the flops of one LoRA but never materialises per-token adapter weights.
`grouped_lora_concat` computes the same value as two GEMMs over the adapters laid side by side,
with a custom VJP that keeps the backward's GEMM operands in the compute dtype; its forward and
backward (`concat_forward`, `concat_backward`) are also the Pallas wrapper's gradient path where
they are fastest. The other formulations are baselines for the benchmark.

Every product takes float32 operands at float32 precision (`dot_precision`: not the TF32 that XLA's
default precision allows on a GPU) and bfloat16 operands with float32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from pallas_kernels.pallas_common import dot_precision


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
    """Scatters the top-k weights, each times its adapter's scaling, into a dense `[T, L]` float32
    matrix.

    A masked sum over the k slots (no scatter), so it is differentiable in `expert_weight` and
    fuses into one elementwise-reduce kernel. Scaled per slot, so an adapter no token chose leaves
    exact zeros whatever its scaling (scaling the dense matrix turned an infinite one into NaN rows).
    """
    per_slot = expert_weight.astype(jnp.float32) * scaling.astype(jnp.float32)[expert_idx]
    return _slots_by_adapter(expert_idx, per_slot, scaling.shape[0])


def _slots_by_adapter(
    expert_idx: jax.Array,  # [T, k] int32
    values: jax.Array,  # [T, k]
    num_adapters: int,
) -> jax.Array:  # [T, L] float32
    """Each (token, slot) value at its adapter's column, summed where a token's slots repeat an adapter:
    a masked sum over the k slots, not a scatter (XLA's GPU scatter adds in no fixed order)."""
    hit = expert_idx[:, :, None] == jnp.arange(num_adapters, dtype=jnp.int32)  # [T, k, L]
    return jnp.sum(jnp.where(hit, values.astype(jnp.float32)[:, :, None], 0.0), axis=1)


def routing_grads(raw, expert_idx, expert_weight, scaling, need):
    """d scaling [L] and d expert_weight [T, k] (None unless in need) from raw [T, k] float32, each
    pair's <x @ lora_a[e], g @ lora_b[e]^T> (the gradient of its unscaled routing weight)."""
    dw = ds = None
    if "w" in need:
        dw = (raw * scaling.astype(jnp.float32)[expert_idx]).astype(expert_weight.dtype)
    if "s" in need:
        # Not a scatter-add: that gave different bits on identical calls (H200, session 24).
        per_pair = raw * expert_weight.astype(jnp.float32)
        ds = jnp.sum(_slots_by_adapter(expert_idx, per_pair, scaling.shape[0]), axis=0).astype(scaling.dtype)
    return ds, dw


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
    precision = dot_precision(x.dtype)
    xa = jnp.einsum("td,ldr->tlr", x, lora_a, preferred_element_type=jnp.float32, precision=precision)  # [T, L, r]
    xa = (xa * weights[:, :, None]).astype(x.dtype)
    out = jnp.einsum("tlr,lro->to", xa, lora_b, preferred_element_type=jnp.float32, precision=precision)
    return out.astype(x.dtype)


def grouped_lora_concat(
    x: jax.Array,  # [T, d_in]
    lora_a: jax.Array,  # [L, d_in, r]
    lora_b: jax.Array,  # [L, r, d_out]
    scaling: jax.Array,  # [L]
    expert_idx: jax.Array,  # [T, k] int32
    expert_weight: jax.Array,  # [T, k]
) -> jax.Array:  # [T, d_out], x.dtype
    """The dense-masked product over the adapters laid side by side: two plain GEMMs, x @ A_cat and
    (masked) h @ B_cat (`concat_weights`).

    Same value as `grouped_lora_dense`; the difference is the backward. Autodiff of the dense form
    runs its backward GEMMs on float32 operands (the float32 cotangent of a
    `preferred_element_type=float32` product meets the weights converted to float32); this custom
    VJP keeps every GEMM operand in the compute dtype and accumulates in float32.
    """
    a_cat, b_cat = concat_weights(lora_a.astype(x.dtype), lora_b.astype(x.dtype))
    weights = dense_routing_weights(expert_idx, expert_weight, scaling)  # [T, L]
    return _concat_product(x, a_cat, b_cat, weights)


def concat_weights(
    lora_a: jax.Array,  # [L, d_in, r]
    lora_b: jax.Array,  # [L, r, d_out]
) -> tuple[jax.Array, jax.Array]:  # A_cat [d_in, L*r], B_cat [L*r, d_out]
    """Every adapter's weights side by side, as one GEMM operand each (A_cat is a copy: in the stored
    [L, d_in, r] layout only r elements of a row are contiguous)."""
    num_adapters, depth, rank = lora_a.shape
    return (lora_a.transpose(1, 0, 2).reshape(depth, num_adapters * rank),
            lora_b.reshape(num_adapters * rank, lora_b.shape[-1]))


def _mask(h: jax.Array, weights: jax.Array) -> jax.Array:
    """h [T, L*r] times each adapter's routing weight (weights [T, L]), float32."""
    num_tokens, num_adapters = weights.shape
    return (h.reshape(num_tokens, num_adapters, -1) * weights[:, :, None]).reshape(h.shape)


def concat_forward(
    x: jax.Array,  # [T, d_in]
    a_cat: jax.Array,  # [d_in, L*r], x.dtype
    b_cat: jax.Array,  # [L*r, d_out], x.dtype
    weights: jax.Array,  # [T, L] float32: dense_routing_weights
    base: jax.Array | None = None,  # [T, d_out], added before the output is rounded
) -> tuple[jax.Array, jax.Array]:  # out [T, d_out], h [T, L*r] in x.dtype
    """The concat formulation's forward, with what its backward needs: h = x @ A_cat rounded to x.dtype
    (the only residual: [T, L*r] is L/k times the routed product's own h)."""
    # A float32 product, masked before rounding: XLA runs it on cuBLAS (asking for a bf16 output made
    # it a slower Triton GEMM, 55 vs 50 us at T = 16384, d 4096, r 8 on an H200), and the mask
    # kernel writes both the masked operand and the rounded residual. The output product (K = L*r) is
    # XLA's: jax's Hopper matmul (Mosaic GPU) and a Pallas product keeping its rows of h in registers
    # were no faster, and einsums over lora_a's stored [L, d_in, r] layout made XLA transpose it twice
    # (H200, session 24, docs/benchmarks.md).
    precision = dot_precision(x.dtype)
    h = jnp.dot(x, a_cat, preferred_element_type=jnp.float32, precision=precision)
    out = jnp.dot(_mask(h, weights).astype(x.dtype), b_cat, preferred_element_type=jnp.float32, precision=precision)
    if base is not None:
        out = out + base.astype(jnp.float32)
    return out.astype(x.dtype), h.astype(x.dtype)


# From this many tokens `concat_backward` computes d weights only at the chosen adapters when it is
# given them. Below, XLA fuses the reduction over all L*r columns with the masking of dh into one launch,
# and a gather splits it again (H200, session 21, f+b: T 256, r 16: 35.3 -> 39.6 us at d_out 4096, 40.1
# -> 44.6 at 14336); from 1024 tokens the reduction runs on its own and the gather saves 0.9-2.1 us
# (T 1024, r 16: 51.5 -> 50.6; T 4096, r 8: 86.6 -> 84.8 and 157.8 -> 156.0 at d_out 14336; T 8192:
# 148.4 -> 146.5). docs/benchmarks.md, "H200 run (session 21)".
ROUTING_GRAD_GATHER_MIN_TOKENS = 1024


def concat_backward(
    g: jax.Array,  # [T, d_out], x.dtype
    x: jax.Array | None,  # [T, d_in]; needed only for d a_cat
    a_cat: jax.Array,
    b_cat: jax.Array,
    weights: jax.Array,  # [T, L] float32
    h: jax.Array,  # [T, L*r], from concat_forward
    need: frozenset | set,  # which of "x", "a", "b", "weights" to compute
    expert_idx: jax.Array | None = None,  # [T, k]: d weights only at these adapters
    adapter_scale: jax.Array | None = None,  # [L]: d weights times this, inside the reduction
) -> tuple:  # d x [T, d_in], d a_cat, d b_cat, d weights [T, L] (or [T, k]) float32 (None where not needed)
    """The concat formulation's backward: compute-dtype GEMM operands, float32 accumulation.

    With expert_idx, d weights is returned only where the routing put weight, [T, k] (d weights[t, j]
    is that of weights[t, expert_idx[t, j]]); from ROUTING_GRAD_GATHER_MIN_TOKENS up it is computed
    only there too, from k of the L adapters' r columns. adapter_scale multiplies each adapter's d
    weights within the same reduction (d expert_weight = scaling * d weights without a launch of its
    own)."""
    num_tokens, num_adapters = weights.shape
    dx = da = db = d_weights = None
    precision = dot_precision(g.dtype)
    if need & {"x", "a", "weights"}:
        dh_masked = jnp.dot(g, b_cat.T, preferred_element_type=jnp.float32, precision=precision)  # [T, L*r]
        if "weights" in need:
            gather = expert_idx is not None and num_tokens >= ROUTING_GRAD_GATHER_MIN_TOKENS

            def per_adapter(v):  # [T, L*r] -> [T, L, r], or [T, k, r] at expert_idx
                v = v.reshape(num_tokens, num_adapters, -1)
                return jnp.take_along_axis(v, expert_idx[:, :, None], axis=1) if gather else v

            prod = per_adapter(dh_masked) * per_adapter(h).astype(jnp.float32)
            if adapter_scale is not None:
                scale = adapter_scale.astype(jnp.float32)
                prod = prod * (scale[expert_idx] if gather else scale[None, :])[:, :, None]
            d_weights = jnp.sum(prod, axis=-1)
            if expert_idx is not None and not gather:
                d_weights = jnp.take_along_axis(d_weights, expert_idx, axis=1)
        dh = _mask(dh_masked, weights).astype(g.dtype)
        if "x" in need:
            dx = jnp.dot(dh, a_cat.T, preferred_element_type=jnp.float32, precision=precision).astype(g.dtype)
        if "a" in need:
            da = jnp.dot(x.T, dh, preferred_element_type=jnp.float32, precision=precision).astype(a_cat.dtype)
    if "b" in need:
        h_masked = _mask(h, weights).astype(g.dtype)
        db = jnp.dot(h_masked.T, g, preferred_element_type=jnp.float32, precision=precision).astype(b_cat.dtype)
    return dx, da, db, d_weights


@jax.custom_vjp
def _concat_product(x, a_cat, b_cat, weights):  # [T, d_in], [d_in, L*r], [L*r, d_out], [T, L] f32
    return concat_forward(x, a_cat, b_cat, weights)[0]


def _concat_product_fwd(x, a_cat, b_cat, weights):
    # symbolic_zeros=True: each argument arrives as CustomVJPPrimal(value, perturbed), so only the
    # gradients being taken are built, and x is kept only for d A_cat (MixLoRA). Which ones is kept
    # in the residuals' tree structure (dict keys), not as data.
    need = {name: None for name, arg in (("x", x), ("a", a_cat), ("b", b_cat), ("weights", weights))
            if arg.perturbed}
    out, h = concat_forward(x.value, a_cat.value, b_cat.value, weights.value)
    res = dict(a_cat=a_cat.value, b_cat=b_cat.value, weights=weights.value, h=h, need=need)
    if "a" in need:
        res["x"] = x.value
    return out, res


def _concat_product_bwd(res, g):
    need = frozenset(res["need"])
    if isinstance(g, SymbolicZero) or not need:
        return None, None, None, None
    return concat_backward(g.astype(res["a_cat"].dtype), res.get("x"), res["a_cat"], res["b_cat"], res["weights"],
                           res["h"], need)


_concat_product.defvjp(_concat_product_fwd, _concat_product_bwd, symbolic_zeros=True)


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
    precision = dot_precision(x.dtype)
    xa = jnp.einsum("td,tkdr->tkr", x, a, preferred_element_type=jnp.float32, precision=precision)
    xa = (xa * coef[:, :, None]).astype(x.dtype)
    out = jnp.einsum("tkr,tkro->to", xa, b, preferred_element_type=jnp.float32, precision=precision)
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
    precision = dot_precision(x.dtype)
    xa = jax.lax.ragged_dot(xs, lora_a, group_sizes, preferred_element_type=jnp.float32, precision=precision)
    coef = expert_weight.reshape(-1).astype(jnp.float32) * scaling.astype(jnp.float32)[flat_idx]
    xa = (xa * coef[order][:, None]).astype(x.dtype)
    ys = jax.lax.ragged_dot(xa, lora_b, group_sizes, preferred_element_type=jnp.float32, precision=precision)
    out = jnp.zeros((num_tokens, lora_b.shape[-1]), jnp.float32).at[token_of_pair].add(ys)
    return out.astype(x.dtype)


XLA_FORMULATIONS = {
    "dense": grouped_lora_dense,
    "concat": grouped_lora_concat,
    "gather": grouped_lora_gather,
    "ragged": grouped_lora_ragged,
}
