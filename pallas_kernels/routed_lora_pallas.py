"""Pallas kernels for a MeteoRA projection's routing and routed low-rank product together, for
decoding (few tokens). Contract: `pallas_kernels.routed_lora.routed_lora_xla`.

    logits = x @ gate (float32);  e_j, w_j = top-k of logits, softmax(top-k logits / temperature)
    y[t] = base[t] + sum_j w_j * scaling[e_j] * (x[t] @ lora_a[e_j]) @ lora_b[e_j]

Done op by op, a decoded token pays ~10 launches per projection for this (the f32 gate GEMV, a sort
for top-k, the softmax, index copies, two product kernels), ~18 us on an H100 against a 0.1 us
weight read (docs/benchmarks.md, "Where a decode step goes"). Here it is two launches:

1. `_routed_shrink`, grid (token tiles, splits of d_in, L + G): program (i, s, e < L) computes
   x[tile, K_s] @ lora_a[e, K_s, :], program (i, s, L + g) 16 columns of the gate logits
   x[tile, K_s] @ gate[K_s, 16g:16g+16] (bf16 x as two bf16 dots of the gate's hi/lo halves).
   Every adapter's x @ A is computed (L/k times the flops of the chosen ones), so no program waits
   for the routing: at decode sizes that costs reading all of lora_a once (L*d_in*r*2 bytes, 1.8 MB
   at L = 28, r = 8, d_in = 4096), less than one launch. d_in is split until the grid has ~1000
   programs: a program's loads in a row, not bytes, bound this kernel. Partial sums per split go to
   a float32 buffer (no atomics, no zero-fill launch).
2. `_routed_expand`, grid (tokens, blocks of d_out): each program sums its token's split partials
   of the logits, picks the top k by k rounds of max (lowest index first on ties, as lax.top_k),
   takes the softmax with the temperature, sums the chosen adapters' x @ A partials, scales, and
   multiplies by their rows of lora_b for its output block, adding `base` (the layer's x @ kernel)
   in the epilogue. The programs of the first output block also write the summed logits.

Differentiable through the op-by-op composition (`routed_lora_xla.with_composition_vjp`): decode is
the fast path, gradients at these sizes are a convenience.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.grouped_lora_decode import add_adapter_row, store_row
from pallas_kernels.pallas_common import (
    cdiv,
    compiler_params,
    depth_splits,
    dot_precision,
    masked_load,
    masked_store,
    pow2_at_least,
)
from pallas_kernels.routed_lora_xla import with_composition_vjp

_NEG = -3.0e38  # below any real logit, finite so max - max stays NaN-free


def top_k_in_kernel(logits, lk, *, num_adapters, adapters_p, top_k, temperature, weight_dtype):
    """The routing inside a kernel: logits [..., Lp] float32 over the padded adapters lk (broadcast
    to the rank of logits: Triton's lowering broadcasts only between equal ranks) -> k pairs
    (adapter [...], weight [...] float32).

    k rounds of max, the lowest index winning a tie as in lax.top_k; the weights are the softmax of
    the chosen logits / temperature, rounded to weight_dtype as the separate layer passes them to
    grouped_lora. Padding columns (lk >= num_adapters) are never chosen; a NaN row, where no index
    equals its max, is clamped to the last adapter so that it still reads inside the weights."""
    # One row's maxima are scalars and broadcast as they are; a tile's get their trailing axis back.
    per_row = (lambda v: v) if logits.ndim == 1 else (lambda v: v[..., None])
    work = jnp.where(lk < num_adapters, logits, _NEG)
    chosen = []
    for _ in range(top_k):
        best = jnp.max(work, axis=-1)
        e = jnp.minimum(jnp.min(jnp.where(work == per_row(best), lk, adapters_p), axis=-1), num_adapters - 1)
        chosen.append((best, e))
        work = jnp.where(lk == per_row(e), _NEG, work)
    unnorm = [jnp.exp((best - chosen[0][0]) / temperature) for best, _ in chosen]
    total = sum(unnorm)
    return [(e, (u / total).astype(weight_dtype).astype(jnp.float32)) for (_, e), u in zip(chosen, unnorm)]


@dataclasses.dataclass(frozen=True)
class RoutedConfig:
    """Static choices (a `nondiff_argnums` argument of the custom VJP)."""

    top_k: int
    block_t: int  # token tile of the shrink (a power of two >= 16: Triton dot tiles)
    block_k: int  # d_in chunk of the shrink
    block_n: int  # widest output block of the expand
    min_programs: int  # the shrink splits d_in until it has this many programs
    num_warps: int  # of the shrink
    num_stages: int  # of the shrink
    interpret: bool
    has_base: bool
    grouped_impl: str  # grouped_lora impl of the composition the VJP differentiates


_GATE_COLUMNS = 16  # gate columns per gate program: as many bytes per program as an adapter's


def _routed_shrink_kernel(x_ref, gate_ref, a_ref, logit_ref, xa_ref, *, num_tokens, depth, num_adapters,
                          rank, rank_p, block_t, block_k, chunks, precision, split_gate):
    i, split, e = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = i * block_t + jnp.arange(block_t, dtype=jnp.int32)
    in_t = rows < num_tokens

    def x_chunk(c):
        cols = (split * chunks + c) * block_k + jnp.arange(block_k, dtype=jnp.int32)
        in_k = cols < depth
        return cols, in_k, masked_load(x_ref, (rows[:, None], cols[None, :]), in_t[:, None] & in_k[None, :])

    @pl.when(e < num_adapters)
    def _adapter():
        rk = jnp.arange(rank_p, dtype=jnp.int32)

        def body(c, acc):
            cols, in_k, xk = x_chunk(c)
            ak = masked_load(a_ref, (e, cols[:, None], rk[None, :]), in_k[:, None] & (rk < rank)[None, :])
            return acc + jnp.dot(xk, ak.astype(xk.dtype), preferred_element_type=jnp.float32, precision=precision)

        acc = lax.fori_loop(0, chunks, body, jnp.zeros((block_t, rank_p), jnp.float32))
        # Only the real tokens' rows are written (at T = 1 the tile is 1 row of 16).
        masked_store(xa_ref, (split, e, rows[:, None], rk[None, :]), acc, in_t[:, None] & (rk >= 0)[None, :])

    @pl.when(e >= num_adapters)
    def _gate():  # gate columns (e - L) * 16 ... + 15
        lk = (e - num_adapters) * _GATE_COLUMNS + jnp.arange(_GATE_COLUMNS, dtype=jnp.int32)

        def body(c, acc):
            cols, in_k, xk = x_chunk(c)
            gk = masked_load(gate_ref, (cols[:, None], lk[None, :]), in_k[:, None] & (lk < num_adapters)[None, :])
            if split_gate:
                # x is bf16, so x @ gate = x @ hi + x @ lo with gate = hi + lo (two bf16 halves) is
                # float32-accurate (error ~2^-17 of |gate|) on the tensor cores; a float32 FMA dot
                # was the slowest part of this kernel.
                hi = gk.astype(jnp.bfloat16)
                lo = (gk - hi.astype(jnp.float32)).astype(jnp.bfloat16)
                return (acc + jnp.dot(xk, hi, preferred_element_type=jnp.float32)
                        + jnp.dot(xk, lo, preferred_element_type=jnp.float32))
            # float32 x float32 at full precision: the logits decide the routing.
            return acc + jnp.dot(xk.astype(jnp.float32), gk.astype(jnp.float32),
                                 preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)

        acc = lax.fori_loop(0, chunks, body, jnp.zeros((block_t, _GATE_COLUMNS), jnp.float32))
        masked_store(logit_ref, (split, rows[:, None], lk[None, :]), acc, in_t[:, None] & (lk >= 0)[None, :])


def _routed_shrink(x, gate, lora_a, cfg):
    """-> logit_part [S, Tp, Lp], xa_part [S, L, Tp, R] float32: per-split partial sums of x @ gate
    and of every adapter's x @ lora_a (Tp, Lp, R: T, L, r padded to the tiles; rows >= T unwritten)."""
    num_tokens, depth = x.shape
    num_adapters, _, rank = lora_a.shape
    block_t = cfg.block_t
    token_tiles = cdiv(num_tokens, block_t)
    adapters_p, rank_p = pow2_at_least(num_adapters), pow2_at_least(rank)
    programs = num_adapters + adapters_p // _GATE_COLUMNS  # per token tile and split
    total = cdiv(depth, cfg.block_k)
    # Split d_in until the grid fills the GPU: fewer chunks per program, fewer dependent loads in a
    # row. The number of splits stays a power of two (the expand loads the [splits, ...] partials
    # as one Triton block); trailing splits may be empty (zeros).
    splits = depth_splits(total, token_tiles * programs, cfg.min_programs)
    chunks = cdiv(total, splits)
    kernel = functools.partial(
        _routed_shrink_kernel, num_tokens=num_tokens, depth=depth, num_adapters=num_adapters, rank=rank,
        rank_p=rank_p, block_t=block_t, block_k=cfg.block_k, chunks=chunks, precision=dot_precision(x.dtype),
        split_gate=x.dtype == jnp.bfloat16)
    padded_t = token_tiles * block_t
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((splits, padded_t, adapters_p), jnp.float32),
                   jax.ShapeDtypeStruct((splits, num_adapters, padded_t, rank_p), jnp.float32)),
        grid=(token_tiles, splits, programs),
        interpret=cfg.interpret,
        compiler_params=compiler_params(cfg.num_warps, cfg.num_stages),
        name="routed_lora_shrink",
    )(x, gate, lora_a)


def _routed_expand_kernel(temp_ref, s_ref, logit_ref, xa_ref, b_ref, *rest, top_k, num_adapters, adapters_p,
                          rank, rank_p, block_n, width, has_base):
    out_ref, logits_out_ref = rest[-2:]
    t = pl.program_id(0)
    cols = pl.program_id(1) * block_n + jnp.arange(block_n, dtype=jnp.int32)
    in_n = cols < width
    lk = jnp.arange(adapters_p, dtype=jnp.int32)
    rk = jnp.arange(rank_p, dtype=jnp.int32)
    logits = jnp.sum(logit_ref[:, t, :], axis=0)  # [Lp]: the splits' partial sums

    @pl.when(pl.program_id(1) == 0)
    def _write_logits():  # the layer returns them (gate loss, routing pictures)
        masked_store(logits_out_ref, (t, lk), logits, lk < num_adapters)

    chosen = top_k_in_kernel(logits, lk, num_adapters=num_adapters, adapters_p=adapters_p, top_k=top_k,
                             temperature=temp_ref[0], weight_dtype=b_ref.dtype)
    acc = jnp.zeros((block_n,), jnp.float32)
    for e, w in chosen:
        xa = jnp.sum(xa_ref[:, e, t, :], axis=0) * (w * s_ref[e])  # [R]
        acc = add_adapter_row(acc, xa, b_ref, e, rk, rank, cols, in_n)
    store_row(out_ref, rest[0] if has_base else None, t, cols, in_n, acc)


def _routed_expand(temperature, scaling, logit_part, xa_part, lora_b, base, cfg, *, num_tokens, out_dtype):
    """-> y [T, d_out] (base + routed delta), gate logits [T, L] float32."""
    num_adapters, rank, width = lora_b.shape
    block_n = cfg.block_n
    while block_n > 32 and num_tokens * cdiv(width, block_n) < 132:  # enough programs for the GPU
        block_n //= 2
    kernel = functools.partial(
        _routed_expand_kernel, top_k=cfg.top_k, num_adapters=num_adapters, adapters_p=logit_part.shape[2],
        rank=rank, rank_p=xa_part.shape[3], block_n=block_n, width=width, has_base=base is not None)
    args = [temperature, scaling, logit_part, xa_part, lora_b]
    aliases = {}
    if base is not None:
        args.append(base)
        aliases = {len(args) - 1: 0}
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((num_tokens, width), out_dtype),
                   jax.ShapeDtypeStruct((num_tokens, num_adapters), jnp.float32)),
        grid=(num_tokens, cdiv(width, block_n)),
        input_output_aliases=aliases,
        interpret=cfg.interpret,
        compiler_params=compiler_params(4 if block_n <= 256 else 8, 2),  # wide blocks: more warps
        name="routed_lora_expand",
    )(*args)


def _primal(x, gate, lora_a, lora_b, scaling, temperature, base, cfg):
    num_tokens = x.shape[0]
    logit_part, xa_part = _routed_shrink(x, gate, lora_a, cfg)
    return _routed_expand(temperature, scaling, logit_part, xa_part, lora_b, base if cfg.has_base else None, cfg,
                          num_tokens=num_tokens, out_dtype=x.dtype)


_routed_lora = with_composition_vjp(_primal)


# Block options, measured on an H100 in LLaMA-3-8B decode steps (docs/benchmarks.md).
DEFAULT_BLOCKS = dict(block_k=64, block_n=1024, min_programs=1024, num_warps=2, num_stages=2)


def routed_lora_pallas(
    x: jax.Array,  # [T, d_in]
    gate: jax.Array,  # [d_in, L] float32
    lora_a: jax.Array,  # [L, d_in, r]
    lora_b: jax.Array,  # [L, r, d_out]
    scaling: jax.Array,  # [L]
    temperature: jax.Array | float,  # [] routing temperature
    *,
    top_k: int,
    base: jax.Array | None = None,  # [T, d_out]
    interpret: bool | None = None,
    grouped_impl: str = "auto",
    **blocks,
) -> tuple[jax.Array, jax.Array]:  # y [T, d_out] x.dtype, gate_logits [T, L] float32
    """The two-launch routed product (module docstring). Any T works; it is meant for T <= 32.

    blocks: overrides of DEFAULT_BLOCKS (block_k: d_in chunk of the shrink; block_n: widest output
    block of the expand; min_programs: the shrink splits d_in until its grid has this many programs;
    num_warps / num_stages: of the shrink).
    """
    unknown = set(blocks) - set(DEFAULT_BLOCKS)
    if unknown:
        raise ValueError(f"unknown routed_lora block options {sorted(unknown)}; choose from {sorted(DEFAULT_BLOCKS)}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    cfg = RoutedConfig(top_k=top_k, block_t=min(32, pow2_at_least(x.shape[0])), interpret=bool(interpret),
                       has_base=base is not None, grouped_impl=grouped_impl, **{**DEFAULT_BLOCKS, **blocks})
    return _routed_lora(x, gate, lora_a, lora_b, scaling, temperature, base, cfg)
