"""Kernels of the decode path of `grouped_lora_pallas` (few tokens, no sort), forward and backward.

`shrink_decode` computes each (token, slot) pair's x[t] @ lora_a[e] as a split-K vector product
(grid: pairs x splits); `expand_decode` sums the splits, applies the routing weight and multiplies
by the pair's rows of lora_b, summing the k slots in registers. The backward runs the same two
kernels with the weights read transposed.

Tried and dropped (docs/benchmarks.md, sessions 11 and 21): reading each chosen adapter once instead
of once per pair. A shrink with one program per (adapter, depth split), multiplying all T tokens by its
adapter's chunk, won only over a long depth (the g @ lora_b^T shrink at d_out 14336, r = 64, T = 16:
9.2 us, against 14.5 per pair then and 11.3 with today's DECODE_GRAD_MIN_PROGRAMS) and lost at d_in
4096; an expand with one program per column block looping over the 28 adapters took 14-20 us where
the per-pair expand takes 5-14 (T = 16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.grouped_lora_xla import routing_grads
from pallas_kernels.pallas_common import (
    cdiv,
    compiler_params,
    depth_splits,
    dot_precision,
    masked_load,
    masked_store,
    pow2_at_least,
)

# Split-K programs the decode shrink aims for: two per SM (128 was 4-14% slower at T = 16, r = 64).
DECODE_MIN_PROGRAMS = 256
# The backward's g @ lora_b^T shrink runs over a depth of d_out, with more, shorter parts: H200, T = 16,
# d_out 14336 (session 21, docs/benchmarks.md): 4.8 -> 3.9 us at r = 16, 14.4 -> 11.3 at r = 64 (with
# `Config.block_k_decode_grad` 256); at d_out 4096, r = 64: 5.0 -> 4.5.
DECODE_GRAD_MIN_PROGRAMS = 1024
DECODE_NUM_WARPS = 4


def _shrink_decode_kernel(idx_ref, x_ref, w_ref, out_ref, *, top_k, block_k, chunks, depth, rank, rank_p,
                          transpose_w):
    p = pl.program_id(0)
    split = pl.program_id(1)
    e = idx_ref[p]
    t = p // top_k
    rk = jnp.arange(rank_p, dtype=jnp.int32)

    def body(c, acc):
        cols = (split * chunks + c) * block_k + jnp.arange(block_k, dtype=jnp.int32)
        in_k = cols < depth
        xk = masked_load(x_ref, (t, cols), in_k).astype(jnp.float32)
        wmask = in_k[:, None] & (rk < rank)[None, :]
        if transpose_w:  # w_ref [L, r, depth]
            wk = masked_load(w_ref, (e, rk[None, :], cols[:, None]), wmask)
        else:  # w_ref [L, depth, r]
            wk = masked_load(w_ref, (e, cols[:, None], rk[None, :]), wmask)
        return acc + jnp.sum(xk[:, None] * wk.astype(jnp.float32), axis=0)

    acc = lax.fori_loop(0, chunks, body, jnp.zeros((rank_p,), jnp.float32))
    out_ref[split, p, :] = acc


def shrink_decode(x, w, idx_flat, *, top_k, rank, transpose_w, block_k, interpret,
                  min_programs=DECODE_MIN_PROGRAMS):
    """Each (token, slot) pair's x[t] @ w[e] as split-K vector products: x [T, D], w [L, D, r] (or
    [L, r, D] with transpose_w), idx_flat [T*k] -> partial sums [splits, T*k, R] float32."""
    depth = x.shape[1]
    rank_p = pow2_at_least(rank)
    pairs = idx_flat.shape[0]
    total_chunks = cdiv(depth, block_k)
    # Enough programs to cover the GPU while keeping each split at least one chunk long.
    splits = depth_splits(total_chunks, pairs, min_programs)
    chunks = cdiv(total_chunks, splits)
    return pl.pallas_call(
        functools.partial(_shrink_decode_kernel, top_k=top_k, block_k=block_k, chunks=chunks,
                          depth=depth, rank=rank, rank_p=rank_p, transpose_w=transpose_w),
        out_shape=jax.ShapeDtypeStruct((splits, pairs, rank_p), jnp.float32),
        grid=(pairs, splits),
        interpret=interpret,
        compiler_params=compiler_params(DECODE_NUM_WARPS, 2),
        name="grouped_lora_shrink_decode",
    )(idx_flat, x, w)


def _expand_decode_kernel(idx_ref, w_ref, s_ref, part_ref, b_ref, *rest, top_k, block_n, width, rank,
                          rank_p, has_base, has_dots, poisoned, transpose_w):
    base_ref = rest[0] if has_base else None
    xa_ref = rest[has_base] if has_dots else None
    out_ref, *dot_refs = rest[has_base + has_dots + poisoned:]
    t = pl.program_id(0)
    n = pl.program_id(1)
    cols = n * block_n + jnp.arange(block_n, dtype=jnp.int32)
    in_n = cols < width
    rk = jnp.arange(rank_p, dtype=jnp.int32)
    acc = jnp.zeros((block_n,), jnp.float32)
    for slot in range(top_k):
        p = t * top_k + slot
        e = idx_ref[p]
        scale = s_ref[e].astype(jnp.float32)
        part = jnp.sum(part_ref[:, p, :], axis=0)
        acc = add_adapter_row(acc, part * (w_ref[p].astype(jnp.float32) * scale), b_ref, e, rk, rank, cols,
                              in_n, transpose_w=transpose_w)
        if has_dots:  # the backward's <xa, gB> per pair (and s times it), written by the first column block
            raw = jnp.sum(jnp.sum(xa_ref[:, p, :], axis=0) * part)
            at_p = p + jnp.zeros((1,), jnp.int32)
            first = jnp.broadcast_to(n == 0, (1,))
            masked_store(dot_refs[0], (at_p,), jnp.broadcast_to(raw, (1,)), first)
            masked_store(dot_refs[1], (at_p,), jnp.broadcast_to(raw * scale, (1,)), first)
    store_row(out_ref, base_ref, t, cols, in_n, acc)


def add_adapter_row(acc, xa, b_ref, e, rk, rank, cols, in_n, transpose_w=False):
    """acc [bn] + xa [R] @ lora_b[e][:, cols] for one token (decode expands); with transpose_w, b_ref is
    a lora_a [L, width, r] read as lora_a[e][cols, :]^T. xa is rounded to the weight's dtype first, as
    the XLA reference rounds the scaled x @ A before its second product."""
    xa = xa.astype(b_ref.dtype).astype(jnp.float32)
    mask = (rk < rank)[:, None] & in_n[None, :]
    idx = (e, cols[None, :], rk[:, None]) if transpose_w else (e, rk[:, None], cols[None, :])
    bt = masked_load(b_ref, idx, mask)
    return acc + jnp.sum(xa[:, None] * bt.astype(jnp.float32), axis=0)


def store_row(out_ref, base_ref, t, cols, in_n, acc):
    """Writes acc [bn] (+ base[t, cols] when base_ref is given) to out[t, cols] in out's dtype."""
    if base_ref is not None:
        acc = acc + masked_load(base_ref, (t, cols), in_n).astype(jnp.float32)
    masked_store(out_ref, (t, cols), acc.astype(out_ref.dtype), in_n)


def expand_decode(idx_flat, expert_weight, scaling, part, w, *, num_tokens, rank, transpose_w, out_dtype,
                  block_n, interpret, base=None, dots_with=None, poison=False):
    """[base +] sum_j expert_weight[t, j] s[e] (sum of part's splits) @ w[e] per token: part
    [splits, T*k, R], w [L, r, width] (or [L, width, r] with transpose_w) -> [T, width], the k slots
    summed in registers.

    dots_with: the forward's partial sums [splits, T*k, R]; given, the kernel also returns each pair's
    <xa, part> and s[e] * <xa, part> ([T*k] float32 each: the backward's d scaling and d expert_weight
    terms), which saves the backward two small launches."""
    top_k = idx_flat.shape[0] // num_tokens
    width = w.shape[1] if transpose_w else w.shape[2]
    args = [idx_flat, expert_weight.reshape(-1), scaling, part, w]
    out_shape = [jax.ShapeDtypeStruct((num_tokens, width), out_dtype)]
    aliases = {}  # the output starts as base (added in the kernel) or as the poisoned buffer
    if base is not None:
        args.append(base)
        aliases = {len(args) - 1: 0}
    if dots_with is not None:
        args.append(dots_with)
        out_shape += [jax.ShapeDtypeStruct((idx_flat.shape[0],), jnp.float32)] * 2
    poisoned = base is None and poison
    if poisoned:
        args.append(jnp.full((num_tokens, width), jnp.nan, out_dtype))
        aliases = {len(args) - 1: 0}
    kernel = functools.partial(_expand_decode_kernel, top_k=top_k, block_n=block_n, width=width, rank=rank,
                               rank_p=part.shape[2], has_base=base is not None, has_dots=dots_with is not None,
                               poisoned=poisoned, transpose_w=transpose_w)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_tokens, cdiv(width, block_n)),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=compiler_params(DECODE_NUM_WARPS, 2),
        name="grouped_lora_expand_decode",
    )(*args)
    return outs[0] if dots_with is None else tuple(outs)


def forward_decode(x, lora_a, lora_b, scaling, expert_idx, expert_weight, *, block_k, block_n, interpret,
                   base=None, poison=False):
    """The decode path's output [T, d_out] and its shrink's partial sums [splits, T*k, R] float32
    (unscaled x @ lora_a[e] per pair once summed: what the backward needs for d expert_weight)."""
    top_k = expert_idx.shape[1]
    rank = lora_a.shape[2]
    idx_flat = expert_idx.reshape(-1).astype(jnp.int32)
    part = shrink_decode(x, lora_a, idx_flat, top_k=top_k, rank=rank, transpose_w=False, block_k=block_k,
                         interpret=interpret)
    out = expand_decode(idx_flat, expert_weight, scaling, part, lora_b, num_tokens=x.shape[0], rank=rank,
                        transpose_w=False, out_dtype=x.dtype, block_n=block_n, interpret=interpret, base=base,
                        poison=poison)
    return out, part


def decode_backward(cfg, res, g, need):
    """Backward of the decode path, per (token, slot) pair like its forward:
        gB = g[t] @ lora_b[e]^T      (`shrink_decode`, weight read transposed)
        dx = sum_j (w s gB) @ lora_a[e]^T   (`expand_decode`, weight read transposed)
        d expert_weight = s <xa, gB>, d scaling = sum w <xa, gB>   (<xa, gB> in the dx kernel)
    dA / dB (MixLoRA), when asked for, as two XLA GEMMs over the [T, L*r] one-hot layout (few tokens)."""
    lora_a, lora_b, scaling, expert_idx, expert_weight = res["a"], res["b"], res["s"], res["idx"], res["w"]
    num_adapters, depth, rank = lora_a.shape
    num_tokens, top_k = expert_idx.shape
    dtype = lora_a.dtype
    idx_flat = expert_idx.reshape(-1)
    coef = expert_weight.reshape(-1).astype(jnp.float32) * scaling.astype(jnp.float32)[idx_flat]  # [T*k]
    dx = da = db = ds = dw = None

    def one_hot_layout(rows):  # rows [T*k, r] -> [T, L, r] in dtype, each pair's row at its adapter
        dense = jnp.zeros((num_tokens, num_adapters, rank), jnp.float32)
        tok = jnp.arange(num_tokens * top_k, dtype=jnp.int32) // top_k
        return dense.at[tok, idx_flat].add(rows).astype(dtype)

    if need & {"x", "a", "s", "w"}:
        gb_part = shrink_decode(g, lora_b, idx_flat, top_k=top_k, rank=rank, transpose_w=True,
                                block_k=cfg.block_k_decode_grad, interpret=cfg.interpret,
                                min_programs=DECODE_GRAD_MIN_PROGRAMS)
        raw = scaled = None  # [T*k]: <xa, gB> per pair, and s[e] times it
        if "x" in need:
            dx = expand_decode(idx_flat, expert_weight, scaling, gb_part, lora_a, num_tokens=num_tokens,
                               rank=rank, transpose_w=True, out_dtype=dtype, block_n=cfg.block_n_decode,
                               interpret=cfg.interpret, poison=cfg.poison,
                               dots_with=res["part"] if need & {"s", "w"} else None)
            if need & {"s", "w"}:
                dx, raw, scaled = dx
        gb = jnp.sum(gb_part, axis=0)[:, :rank]  # [T*k, r]
        if "a" in need:
            da = jnp.einsum("td,tlr->ldr", res["x"], one_hot_layout(gb * coef[:, None]),
                            preferred_element_type=jnp.float32, precision=dot_precision(dtype)).astype(dtype)
        if need & {"s", "w"}:
            if raw is None:
                raw = jnp.sum(jnp.sum(res["part"], axis=0)[:, :rank] * gb, axis=-1)
            raw = raw.reshape(num_tokens, top_k)
            if "w" in need and scaled is not None:  # s[e] <xa, gB> is d expert_weight, from the kernel
                dw = scaled.reshape(num_tokens, top_k).astype(expert_weight.dtype)
                ds = routing_grads(raw, expert_idx, expert_weight, scaling, need - {"w"})[0]
            else:
                ds, dw = routing_grads(raw, expert_idx, expert_weight, scaling, need)
    if "b" in need:
        xa = jnp.sum(res["part"], axis=0)[:, :rank]  # [T*k, r] float32, unscaled
        db = jnp.einsum("tlr,to->lro", one_hot_layout(xa * coef[:, None]), g,
                        preferred_element_type=jnp.float32, precision=dot_precision(dtype)).astype(dtype)
    return dx, da, db, ds, dw
