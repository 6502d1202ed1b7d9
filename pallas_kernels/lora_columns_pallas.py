"""The fused inference layout's two steps before the group's GEMM as Pallas kernels: the routing
step (`fill_lora_columns_pallas`) and the side GEMM for few tokens (`side_products_pallas`).
Contracts and references: `pallas_kernels.lora_columns` (`fill_lora_columns`, `side_products`), with
routing by the gate (top-k, softmax with the temperature); forced routing stays with the reference.

Routing. Done in XLA, the step between the side GEMM and the group's GEMM is several small kernels
(the pad that makes x_ext, the logit sum, the top-k sort, the softmax and weights, the weighted
columns); at prefill and decode sizes each is a launch of a few microseconds. Here it is one launch,
grid (token tiles, n + copy programs). Program (i, j < n) sums the side GEMM's partial products of
its tokens, with projection j's gate logits as the sum of their hi and lo halves, picks the top k
by k rounds of max (lowest index first on ties, as lax.top_k), takes the softmax with the
temperature, and writes x @ A_flat times each adapter's weight and scaling into projection j's h
columns of x_ext. Program (i, n + c) copies the c-th COPY_BLOCK columns of x, and the last program
writes the zero tail.

Side GEMM. At one token XLA runs x @ S as a GEMV in its reduction emitter, which reads the weight
far below the memory's speed (docs/benchmarks.md, session 9). `side_products_pallas` splits the
contracting dimension and the columns over many programs, each a small tensor-core dot over a
16-row token tile, and writes the same [P, T, C] partial products as `side_products`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.lora_columns import EXTENDED_ALIGN, extended_width
from pallas_kernels.pallas_common import cdiv, compiler_params, dot_precision, masked_load, masked_store, pow2_at_least
from pallas_kernels.routed_lora_pallas import top_k_in_kernel


def _fill_kernel(temp_ref, scaling_ref, side_ref, x_ref, out_ref, logits_ref, *, num_tokens, depth, width,
                 num_projections, num_adapters, adapters_p, rank, rank_p, parts, splits, top_k, block_t):
    """Program (i, j): for j < n projection j's routing of token tile i, written as its h columns of
    x_ext and its gate logits; for j >= n a copy of x (or zeros) into x_ext's other columns."""
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * block_t + jnp.arange(block_t, dtype=jnp.int32)
    in_t = rows < num_tokens
    columns = num_projections * num_adapters * rank

    copy_x = cdiv(depth, COPY_BLOCK)  # programs n .. n + copy_x - 1 copy x; the one after, the tail

    @pl.when(j >= num_projections + copy_x)
    def _tail():  # the zero columns after the h columns (fewer than EXTENDED_ALIGN)
        cols = depth + columns + jnp.arange(EXTENDED_ALIGN, dtype=jnp.int32)
        masked_store(out_ref, (rows[:, None], cols[None, :]), jnp.zeros((block_t, EXTENDED_ALIGN), out_ref.dtype),
                     in_t[:, None] & (cols < width)[None, :])

    @pl.when((j >= num_projections) & (j < num_projections + copy_x))
    def _copy():  # x's columns (j - n) * COPY_BLOCK ... (j - n + 1) * COPY_BLOCK - 1
        cols = (j - num_projections) * COPY_BLOCK + jnp.arange(COPY_BLOCK, dtype=jnp.int32)
        mask = in_t[:, None] & (cols < depth)[None, :]
        masked_store(out_ref, (rows[:, None], cols[None, :]),
                     masked_load(x_ref, (rows[:, None], cols[None, :]), mask), mask)

    @pl.when(j < num_projections)
    def _route():
        lk = jnp.arange(adapters_p, dtype=jnp.int32)
        in_l = lk < num_adapters
        mask2 = in_t[:, None] & in_l[None, :]

        def summed(cols, mask):
            """side[:, rows, cols] summed over the P partial products, loaded up to
            FILL_ROWS_PER_PROGRAM partial rows at a time as one block. (Against one load per
            partial: the same within 0.3 us at P = 16 on an H200, 0.3 us slower to 1.9 us faster at
            P = 64; docs/benchmarks.md, session 9.)"""
            group = max(1, FILL_ROWS_PER_PROGRAM // block_t)
            # Every operand gets the leading partial axis: Triton's lowering broadcasts only
            # between equal ranks.
            cols, mask = [c[None] for c in cols], mask[None]
            total = 0.0
            for first in range(0, splits, group):
                part = first + jnp.arange(pow2_at_least(min(group, splits - first), floor=1), dtype=jnp.int32)
                part = part.reshape(-1, *([1] * (mask.ndim - 1)))
                block = masked_load(side_ref, (part, *cols), (part < splits) & mask)
                total = total + jnp.sum(block, axis=0)
            return total

        logits = jnp.zeros((block_t, adapters_p), jnp.float32)
        for p in range(parts):  # the gate's hi and lo halves (one part in float32)
            cols = columns + (p * num_projections + j) * num_adapters + lk
            logits = logits + summed((rows[:, None], cols[None, :]), mask2)
        masked_store(logits_ref, (rows[:, None], j, lk[None, :]), logits, mask2)

        chosen = top_k_in_kernel(logits, lk[None, :], num_adapters=num_adapters, adapters_p=adapters_p,
                                 top_k=top_k, temperature=temp_ref[0], weight_dtype=out_ref.dtype)
        weights = jnp.zeros((block_t, adapters_p), jnp.float32)
        for e, w in chosen:  # e, w: [bt]
            weights = weights + jnp.where(lk[None, :] == e[:, None], w[:, None], 0.0)
        weights = weights * masked_load(scaling_ref, (j, lk), in_l)[None, :]

        rk = jnp.arange(rank_p, dtype=jnp.int32)
        col3 = j * num_adapters * rank + lk[None, :, None] * rank + rk[None, None, :]  # [1, Lp, Rp]
        mask3 = in_t[:, None, None] & in_l[None, :, None] & (rk < rank)[None, None, :]
        xa = summed((rows[:, None, None], col3), mask3)  # [bt, Lp, Rp]
        h = (xa * weights[:, :, None]).astype(out_ref.dtype)
        masked_store(out_ref, (rows[:, None, None], depth + col3), h, mask3)


# Columns of x one copy program writes per token of its tile.
COPY_BLOCK = 512


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
    return max(1, min(32, pow2_at_least(num_tokens, floor=1), FILL_ROWS_PER_PROGRAM // splits))


def fill_lora_columns_pallas(
    x: jax.Array,  # [T, d_in]
    side: jax.Array,  # [T, n*L*r + parts*n*L] float32: x @ S, or [P, T, ...]: `side_products`
    scaling: jax.Array,  # [n, L]
    temperature: jax.Array | float,  # [] routing temperature
    *,
    rank: int,
    top_k: int,
    interpret: bool | None = None,
    block_t: int | None = None,
) -> tuple[jax.Array, jax.Array]:  # x_ext [T, extended_width(d_in, n*L*r)], gate logits [T, n, L] float32
    """The routing step as one launch that writes all of x_ext (module docstring). Not
    differentiable: inference only. block_t: token tile (default: `fill_block_t`)."""
    num_projections, num_adapters = scaling.shape
    num_tokens, depth = x.shape
    columns = num_projections * num_adapters * rank
    side = side[None] if side.ndim == 2 else side
    parts, rest = divmod(side.shape[2] - columns, num_projections * num_adapters)
    if side.shape[1] != num_tokens or rest or parts not in (1, 2):
        raise ValueError(f"side {side.shape} does not fit x {x.shape}, n={num_projections}, L={num_adapters}, r={rank}")
    if not 1 <= top_k <= num_adapters:
        raise ValueError(f"top_k={top_k} must be in [1, L={num_adapters}]")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    width = extended_width(depth, columns)
    block_t = block_t or fill_block_t(num_tokens, side.shape[0])
    kernel = functools.partial(
        _fill_kernel, num_tokens=num_tokens, depth=depth, width=width, num_projections=num_projections,
        num_adapters=num_adapters, adapters_p=pow2_at_least(num_adapters, floor=2), rank=rank,
        rank_p=pow2_at_least(rank, floor=2), parts=parts, splits=side.shape[0], top_k=top_k, block_t=block_t)
    temperature = jnp.asarray(temperature, jnp.float32).reshape(1)
    copy_programs = cdiv(depth, COPY_BLOCK) + (width > depth + columns)  # x's blocks, then the zero tail
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((num_tokens, width), x.dtype),
                   jax.ShapeDtypeStruct((num_tokens, num_projections, num_adapters), jnp.float32)),
        grid=(cdiv(num_tokens, block_t), num_projections + copy_programs),
        interpret=bool(interpret),
        compiler_params=compiler_params(4, 1),
        name="fill_lora_columns",
    )(temperature, scaling.astype(jnp.float32), side.astype(jnp.float32), x)


def _side_kernel(x_ref, w_ref, out_ref, *, num_tokens, depth, columns, block_t, block_c, block_k, chunks,
                 precision):
    """Program (i, s, c): token tile i's partial product over split s of d_in, for column block c."""
    i, split, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = i * block_t + jnp.arange(block_t, dtype=jnp.int32)
    in_t = rows < num_tokens
    cols = c * block_c + jnp.arange(block_c, dtype=jnp.int32)
    in_c = cols < columns

    def body(chunk, acc):
        ks = (split * chunks + chunk) * block_k + jnp.arange(block_k, dtype=jnp.int32)
        in_k = ks < depth
        xk = masked_load(x_ref, (rows[:, None], ks[None, :]), in_t[:, None] & in_k[None, :])
        wk = masked_load(w_ref, (ks[:, None], cols[None, :]), in_k[:, None] & in_c[None, :])
        return acc + jnp.dot(xk, wk.astype(xk.dtype), preferred_element_type=jnp.float32, precision=precision)

    acc = jax.lax.fori_loop(0, chunks, body, jnp.zeros((block_t, block_c), jnp.float32))
    # Trailing splits past d_in write zeros: every element of the output is written.
    masked_store(out_ref, (split, rows[:, None], cols[None, :]), acc, in_t[:, None] & in_c[None, :])


# d_in chunks one program of `side_products_pallas` multiplies at most, by default. Swept on an H200
# at T = 1 (docs/benchmarks.md, session 9): the kernel's time fell as the chunks per program fell
# (down group, d_in 14336: 12.3 us at 14 chunks of 64, 5.7 at 4), while every split adds a partial
# product for the routing step to sum (side kernel and routing together, the down group took
# 10.3-10.4 us at P = 32 and 11.7-13.3 at P = 64; the q/k/v group 7.1-7.4 at P = 16, 8.1-8.5 at 32).
SIDE_CHUNKS_PER_PROGRAM = 2
SIDE_MAX_SPLITS = 32


def side_kernel_splits(depth: int, block_k: int) -> int:
    """Default P of `side_products_pallas`: a power of two, at most SIDE_MAX_SPLITS, giving each
    program at most SIDE_CHUNKS_PER_PROGRAM chunks of block_k."""
    return min(SIDE_MAX_SPLITS, pow2_at_least(cdiv(cdiv(depth, block_k), SIDE_CHUNKS_PER_PROGRAM), floor=1))


def side_products_pallas(
    x: jax.Array,  # [T, d_in]
    weight: jax.Array,  # [d_in, C]: `lora_columns.side_weight`
    *,
    splits: int | None = None,
    block_c: int = 64,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
) -> jax.Array:  # [P, T, C] float32, summing to x @ weight (as `lora_columns.side_products`)
    """The side GEMM as P partial products over splits of d_in (module docstring), for few tokens.
    splits: P (default `side_kernel_splits`); block_c, block_k: column block and d_in chunk of a
    program (powers of two >= 16)."""
    num_tokens, depth = x.shape
    if weight.shape[0] != depth:
        raise ValueError(f"side weight {weight.shape} does not fit x {x.shape}: it needs d_in={depth} rows")
    for name, value in (("block_c", block_c), ("block_k", block_k)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}={value} must be a power of two >= 16 (Triton dot tiles)")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    splits = splits or side_kernel_splits(depth, block_k)
    columns = weight.shape[1]
    block_t = 16 if num_tokens <= 16 else 32
    chunks = cdiv(cdiv(depth, block_k), splits)
    kernel = functools.partial(_side_kernel, num_tokens=num_tokens, depth=depth, columns=columns, block_t=block_t,
                               block_c=block_c, block_k=block_k, chunks=chunks, precision=dot_precision(x.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, num_tokens, columns), jnp.float32),
        grid=(cdiv(num_tokens, block_t), splits, cdiv(columns, block_c)),
        interpret=bool(interpret),
        compiler_params=compiler_params(num_warps, num_stages),
        name="lora_columns_side",
    )(x, weight)
