"""`fill_lora_columns` as one Pallas kernel (the routing step of the fused inference layout).
Contract and reference: `pallas_kernels.lora_columns.fill_lora_columns`, with routing by the gate
(top-k, softmax with the temperature); forced routing stays with the reference.

Done in XLA, the step between the side GEMM and the group's GEMM is several small kernels (the
logit sum, the top-k sort, the softmax and weights, the weighted columns); at prefill and decode
sizes each is a launch of a few microseconds. Here it is one launch, grid (token tiles, projections):
program (i, j) sums the side GEMM's partial products of its tokens (`lora_columns.side_products`),
with projection j's gate logits as the sum of their hi and lo halves, picks the top k
by k rounds of max (lowest index first on ties, as lax.top_k), takes the softmax with the
temperature, and writes x @ A_flat times each adapter's weight and scaling into projection j's
columns of x_ext, in place (x_ext is aliased to the output; its other columns are not touched).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.grouped_lora_pallas import _cdiv, _compiler_params, _load, _pow2_at_least, _store
from pallas_kernels.lora_columns import extended_width
from pallas_kernels.routed_lora_pallas import _NEG  # below any real logit, finite: max - max stays NaN-free


def _fill_kernel(temp_ref, scaling_ref, side_ref, x_ref, out_ref, logits_ref, *, num_tokens, num_projections,
                 num_adapters, adapters_p, rank, rank_p, parts, splits, depth, top_k, block_t):
    """Program (i, j): projection j's routing of token tile i, written as its h columns of x_ext
    (in place) and its gate logits."""
    del x_ref  # aliased to out_ref: only the h columns are written
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * block_t + jnp.arange(block_t, dtype=jnp.int32)
    in_t = rows < num_tokens
    lk = jnp.arange(adapters_p, dtype=jnp.int32)
    in_l = lk < num_adapters
    columns = num_projections * num_adapters * rank
    mask2 = in_t[:, None] & in_l[None, :]

    def summed(cols, mask):  # side[:, rows, cols] summed over the partial products
        return sum(_load(side_ref, (s, *cols), mask) for s in range(splits))

    logits = jnp.zeros((block_t, adapters_p), jnp.float32)
    for p in range(parts):  # the gate's hi and lo halves (one part in float32)
        cols = columns + (p * num_projections + j) * num_adapters + lk
        logits = logits + summed((rows[:, None], cols[None, :]), mask2)
    _store(logits_ref, (rows[:, None], j, lk[None, :]), logits, mask2)

    work = jnp.where(in_l[None, :], logits, _NEG)
    chosen = []
    for _ in range(top_k):
        best = jnp.max(work, axis=1)  # [bt]
        # Clamped so that a NaN row (no index equals its max) still names an adapter.
        e = jnp.minimum(jnp.min(jnp.where(work == best[:, None], lk[None, :], adapters_p), axis=1), num_adapters - 1)
        chosen.append((best, e))
        work = jnp.where(lk[None, :] == e[:, None], _NEG, work)
    temperature = temp_ref[0]
    unnorm = [jnp.exp((best - chosen[0][0]) / temperature) for best, _ in chosen]
    total = sum(unnorm)
    weights = jnp.zeros((block_t, adapters_p), jnp.float32)
    for (_, e), u in zip(chosen, unnorm):
        # The weight is rounded to the compute dtype, as the separate layer passes it to grouped_lora.
        w = (u / total).astype(out_ref.dtype).astype(jnp.float32)
        weights = weights + jnp.where(lk[None, :] == e[:, None], w[:, None], 0.0)
    weights = weights * _load(scaling_ref, (j, lk), in_l)[None, :]

    rk = jnp.arange(rank_p, dtype=jnp.int32)
    col3 = j * num_adapters * rank + lk[None, :, None] * rank + rk[None, None, :]  # [1, Lp, Rp]
    mask3 = in_t[:, None, None] & in_l[None, :, None] & (rk < rank)[None, None, :]
    xa = summed((rows[:, None, None], col3), mask3)  # [bt, Lp, Rp]
    h = (xa * weights[:, :, None]).astype(out_ref.dtype)
    _store(out_ref, (rows[:, None, None], depth + col3), h, mask3)


# Partial-product rows one program sums at most (block_t * splits). A program sums its tokens' P
# partials one after another; with the whole T = 32 decode batch in one tile and P = 16 this made the
# launch 17 us on an H200 (1 program per projection; session 5's P = 1 kernel took 2.6 us on an H100).
# Swept on an H200 (docs/benchmarks.md, session 8): 1 token per program was best at P = 16 (12.4 vs
# 26.9 us for the q/k/v group's side GEMM and routing); at T = 512 tiles of 1-8 tokens tied and 32 was
# the slowest, at P = 4 and 8 as at P = 1 (the P = 1 default, 16 tokens, was not itself measured).
FILL_ROWS_PER_PROGRAM = 16


def fill_block_t(num_tokens: int, splits: int) -> int:
    """Default token tile of `fill_lora_columns_pallas`: a power of two, at most 32, with at most
    FILL_ROWS_PER_PROGRAM partial-product rows per program."""
    return max(1, min(32, _pow2_at_least(num_tokens, floor=1), FILL_ROWS_PER_PROGRAM // splits))


def fill_lora_columns_pallas(
    x_ext: jax.Array,  # [T, extended_width(d_in, n*L*r)]: x, then zeros
    side: jax.Array,  # [T, n*L*r + parts*n*L] float32: x_ext @ S, or [P, T, ...]: `side_products`
    scaling: jax.Array,  # [n, L]
    temperature: jax.Array | float,  # [] routing temperature
    *,
    depth: int,  # d_in: where the h columns start
    rank: int,
    top_k: int,
    interpret: bool | None = None,
    block_t: int | None = None,
) -> tuple[jax.Array, jax.Array]:  # x_ext with its h columns written, gate logits [T, n, L] float32
    """The routing step as one launch (module docstring). Not differentiable: inference only.
    block_t: token tile (default: `fill_block_t`)."""
    num_projections, num_adapters = scaling.shape
    num_tokens, width = x_ext.shape
    columns = num_projections * num_adapters * rank
    side = side[None] if side.ndim == 2 else side
    parts, rest = divmod(side.shape[2] - columns, num_projections * num_adapters)
    if width != extended_width(depth, columns) or side.shape[1] != num_tokens or rest or parts not in (1, 2):
        raise ValueError(f"x_ext {x_ext.shape} and side {side.shape} do not fit d_in={depth}, n={num_projections}, "
                         f"L={num_adapters}, r={rank}")
    if not 1 <= top_k <= num_adapters:
        raise ValueError(f"top_k={top_k} must be in [1, L={num_adapters}]")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    block_t = block_t or fill_block_t(num_tokens, side.shape[0])
    kernel = functools.partial(
        _fill_kernel, num_tokens=num_tokens, num_projections=num_projections, num_adapters=num_adapters,
        adapters_p=_pow2_at_least(num_adapters, floor=2), rank=rank, rank_p=_pow2_at_least(rank, floor=2),
        parts=parts, splits=side.shape[0], depth=depth, top_k=top_k, block_t=block_t)
    temperature = jnp.asarray(temperature, jnp.float32).reshape(1)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(x_ext.shape, x_ext.dtype),
                   jax.ShapeDtypeStruct((num_tokens, num_projections, num_adapters), jnp.float32)),
        grid=(_cdiv(num_tokens, block_t), num_projections),
        input_output_aliases={3: 0},
        interpret=bool(interpret),
        compiler_params=_compiler_params(4, 1),
        name="fill_lora_columns",
    )(temperature, scaling.astype(jnp.float32), side.astype(jnp.float32), x_ext)
