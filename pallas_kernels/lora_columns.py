"""The extended-input form of routed LoRA, for inference: the routed delta folded into the base GEMM.

For n projections that share their input x [T, d_in] (q/k/v, or gate/up), with L adapters of rank r
each:

    x_ext = [x | h_1 | ... | h_n | 0]                    [T, extended_width(d_in, n*L*r)]
    y     = x_ext @ [[W_1 ... W_n], [B_1 0 ..], .., [0]]  [T, sum d_out]   one GEMM for base + delta

where h_j [T, L*r] is projection j's x @ A_flat_j (every adapter's x @ lora_a side by side), each
adapter's r columns times its routing weight and scaling (zero unless the adapter is among the
token's top k), and B_j its lora_b as one [L*r, d_out_j] block. The zero columns round the width up
to a multiple of EXTENDED_ALIGN. The routing needs the gate logits
x @ gate_j; both come from one "side" GEMM over the shared input:

    side = x @ S   (float32),   S = [A_flat_1 .. A_flat_n | gate_1 .. gate_n (| gate_lo ...)]   [d_in, C]

Its output is narrow (C = n*L*(r + parts) columns), so it needs a split-K to fill the GPU: it runs
as P partial products over slices of the contracting dimension (`side_products`, [P, T, C]), which
the routing step sums. Split this way it is one kernel, where XLA's own split-K added a reduction
kernel and pads. In bfloat16 the float32 gates are stored as two bfloat16 halves (hi + lo,
float32-accurate logits on the tensor cores, as in the decode kernel); in float32 as themselves.

`fill_lora_columns` (this module, plain XLA) takes x and the side products and builds x_ext. It
computes the same routing as `routed_lora_xla` (`Routing.select`: top-k and softmax with
the temperature, or forced weights) and the same product as `grouped_lora_dense`, with the delta
rounded once (inside the GEMM) instead of twice (delta, then base + delta). The Pallas kernels
(`lora_columns_pallas`) compute the same: the routing step, which writes all of x_ext (x, the h
columns and the zero tail) in one launch, and the side GEMM for few tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_lora_xla import dense_routing_weights
from pallas_kernels.pallas_common import gate_halves

# The extended width is a multiple of this. Otherwise XLA pads the GEMMs' contracting dimension to
# one on an H100, which copies the weights at every call (seen as [4352, 4096] copies of the
# [4320, 4096] o_proj kernel in a decode step).
EXTENDED_ALIGN = 64


def extended_width(depth: int, columns: int) -> int:
    """Width of x_ext for d_in = depth and n*L*r = columns."""
    return -(-(depth + columns) // EXTENDED_ALIGN) * EXTENDED_ALIGN


def side_splits(num_tokens: int, columns: int, depth: int) -> int:
    """How many partial products `side_products` computes for T = num_tokens, C = columns and
    d_in = depth (a divisor of depth).

    The side GEMM alone has ceil(T/128) * ceil(C/128) output tiles of 128 x 128, too few for the
    132 SMs of an H100 below a few thousand tokens; P partials multiply them. Measured on an H100 at
    the LLaMA-3-8B group shapes (docs/benchmarks.md, session 6): the best P kept tiles * P within
    about 128, P = 2 lost (XLA split it again, with a reduction kernel), and a single token lost with
    any split (XLA transposed x first). Hence the largest of 16, 8, 4 that divides d_in with
    tiles * P <= 128, else 1. Re-measured on an H200 (session 27, 49 shapes, T = 32-512, side GEMM
    and routing kernel): 5.3% above each shape's best P in total (571.5 vs 542.6 us); tiles * P <= 64
    or 96, P * T <= 2048 and P <= 8 from 129 tokens were slower, as XLA re-splits deep slices."""
    if num_tokens == 1:
        return 1
    tiles = -(-num_tokens // 128) * -(-columns // 128)
    return next((splits for splits in (16, 8, 4) if tiles * splits <= 128 and depth % splits == 0), 1)


def side_products(
    x: jax.Array,  # [T, d_in]
    weight: jax.Array,  # [d_in, C]: side_weight
    splits: int,  # P, a divisor of d_in
    precision=None,
) -> jax.Array:  # [P, T, C] float32: x[:, slice p] @ weight[slice p, :], summing to x @ weight
    """The side GEMM as P partial products over equal slices of the contracting dimension (one
    batched GEMM: both reshapes are free)."""
    (num_tokens, depth), columns = x.shape, weight.shape[1]
    if weight.shape[0] != depth:
        raise ValueError(f"side weight {weight.shape} does not fit x {x.shape}: it needs d_in={depth} rows")
    if depth % splits:
        raise ValueError(f"d_in={depth} is not a multiple of splits={splits}")
    return jnp.einsum("tpk,pkc->ptc", x.reshape(num_tokens, splits, depth // splits),
                      weight.reshape(splits, depth // splits, columns), preferred_element_type=jnp.float32,
                      precision=precision)


def split_side_products(
    side: jax.Array,  # [T, n*L*r + parts*n*L] float32, or [P, T, ...] partial products (summed here)
    num_projections: int,
    num_adapters: int,
    rank: int,
) -> tuple[jax.Array, jax.Array]:  # xa [T, n, L, r] float32, gate logits [T, n, L] float32
    """The side GEMM's output as every adapter's x @ lora_a and the gate logits (the hi and lo
    halves summed when the gate was stored as two)."""
    if side.ndim == 3:
        side = side.sum(axis=0)
    num_tokens = side.shape[0]
    columns = num_projections * num_adapters * rank
    xa = side[:, :columns].reshape(num_tokens, num_projections, num_adapters, rank)
    parts = (side.shape[1] - columns) // (num_projections * num_adapters)
    logits = side[:, columns:].reshape(num_tokens, parts, num_projections, num_adapters).sum(axis=1)
    return xa, logits


def fill_lora_columns(
    x: jax.Array,  # [T, d_in]
    side: jax.Array,  # [T, n*L*r + parts*n*L] float32: x @ S, or [P, T, ...]: `side_products`
    scaling: jax.Array,  # [n, L]
    select,  # (gate logits [T*n, L], top_k) -> expert_idx [T*n, k], expert_weight [T*n, k]: Routing.select
    *,
    rank: int,
    top_k: int,
) -> tuple[jax.Array, jax.Array]:  # x_ext [T, extended_width(d_in, n*L*r)], gate logits [T, n, L] float32
    """Routes every token for every projection and builds x_ext = [x | h_1 .. h_n | 0] (module docstring)."""
    num_projections, num_adapters = scaling.shape
    num_tokens, depth = x.shape
    columns = num_projections * num_adapters * rank
    xa, logits = split_side_products(side, num_projections, num_adapters, rank)
    expert_idx, expert_weight = select(logits.reshape(num_tokens * num_projections, num_adapters), top_k)
    # The weight is rounded to the compute dtype, as the separate layer passes it to grouped_lora.
    weights = dense_routing_weights(expert_idx, expert_weight.astype(x.dtype), jnp.ones((num_adapters,)))
    weights = weights.reshape(num_tokens, num_projections, num_adapters) * scaling.astype(jnp.float32)[None]
    h = (xa * weights[..., None]).reshape(num_tokens, columns).astype(x.dtype)
    tail = jnp.zeros((num_tokens, extended_width(depth, columns) - depth - columns), x.dtype)
    return jnp.concatenate([x, h, tail], axis=1), logits


def side_weight(
    lora_as: list[jax.Array],  # n x [L, d_in, r]
    gates: list[jax.Array],  # n x [d_in, L] float32
    dtype,  # the compute dtype: float32 keeps the gates whole, others store hi + lo halves
) -> jax.Array:  # S [d_in, n*L*r + parts*n*L]
    """The side GEMM's weight for n projections that share their input (module docstring)."""
    depth = lora_as[0].shape[1]
    a_flat = [a.transpose(1, 0, 2).reshape(depth, -1).astype(dtype) for a in lora_as]
    gates = [g.astype(jnp.float32) for g in gates]
    if jnp.dtype(dtype) == jnp.float32:
        parts = gates
    else:
        hi, lo = zip(*(gate_halves(g, dtype) for g in gates))
        parts = [*hi, *lo]
    return jnp.concatenate(a_flat + parts, axis=1)


def extended_kernel(
    kernels: list[jax.Array],  # n x [d_in, d_out_j]
    lora_bs: list[jax.Array | None],  # n x [L, r, d_out_j], None for a projection without adapters
) -> jax.Array:  # [extended_width(d_in, n_a*L*r), sum d_out_j]
    """[[W_1 .. W_n], then one row block per adapted projection with its lora_b as [L*r, d_out_j]
    under its own output columns and zeros elsewhere, then zero rows]: x_ext @ it is base + delta
    for all n."""
    widths = [k.shape[1] for k in kernels]
    offsets = [sum(widths[:j]) for j in range(len(widths))]
    blocks = [jnp.concatenate(kernels, axis=1)]
    for b, offset, width in zip(lora_bs, offsets, widths):
        if b is not None:
            flat = b.reshape(-1, width).astype(kernels[0].dtype)
            blocks.append(jnp.pad(flat, ((0, 0), (offset, sum(widths) - offset - width))))
    kernel = jnp.concatenate(blocks, axis=0)
    depth = kernels[0].shape[0]
    if len(blocks) == 1:
        return kernel  # no adapters: x itself is the input
    return jnp.pad(kernel, ((0, extended_width(depth, kernel.shape[0] - depth) - kernel.shape[0]), (0, 0)))
