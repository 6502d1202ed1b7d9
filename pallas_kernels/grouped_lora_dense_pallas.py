"""Kernels of the dense path of `grouped_lora_pallas` (`path="dense"`): tokens in their own order,
no plan, every token against the flat [L*r] adapter axis; forward and backward.

C = L*r flat adapter columns; column c is rank row c % r of adapter c // r.
  shrink:  xa[T, C] = x @ A_flat  (A_flat[d, c] = lora_a[c // r, d, c % r]), x read once for all k
           slots; float32, unscaled (the backward reuses it for d expert_weight). Split-K over the
           depth with float32 atomics when the token/column tiles alone cannot fill the GPU.
  expand:  out[T, W] = base + (xa * coef[t, c // r]).astype(dtype) @ B_flat  (B_flat[c, n] =
           lora_b[c // r, c % r, n]), coef[t, e] = sum_j w[t, j] [idx[t, j] = e] scaling[e]: all k
           slots combined in one pass that reads base and writes the output once.
Costs T*d*L*r flops per product (L/k times the sorted path's): cheap for small L*r, and at small T
(where reading every adapter once is the floor anyway since k*T pairs touch most adapters).
`impl="auto"` never picks this path: at T = 256 even a variant with depth parts in place of the atomics
lost to the concat path (H200, session 27, docs/benchmarks.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.grouped_lora_xla import dense_routing_weights, routing_grads
from pallas_kernels.pallas_common import (
    cdiv,
    compiler_params,
    depth_splits,
    dot_precision,
    masked_load,
    masked_store,
    pow2_at_least,
    without_aliased_input,
)


def _flat_w_index(w_is_b, adapter, rr, depth_idx):
    """Index tuple into lora_a [L, D, r] (w_is_b=False) or lora_b [L, r, D] (w_is_b=True)."""
    if w_is_b:
        return (adapter, rr, depth_idx)
    return (adapter, depth_idx, rr)


def _dense_shrink_kernel(x_ref, w_ref, *rest, block_t, block_c, block_k, chunks, num_tokens, depth, rank,
                         cat, w_is_b, atomic, precision):
    out_ref = rest[-1]
    rows = pl.program_id(0) * block_t + jnp.arange(block_t, dtype=jnp.int32)
    cols = pl.program_id(1) * block_c + jnp.arange(block_c, dtype=jnp.int32)  # over C = L*r
    split = pl.program_id(2)
    in_t = rows < num_tokens
    in_c = cols < cat
    adapter, rr = cols // rank, cols % rank

    def body(c, acc):
        ks = (split * chunks + c) * block_k + jnp.arange(block_k, dtype=jnp.int32)
        in_k = ks < depth
        xk = masked_load(x_ref, (rows[:, None], ks[None, :]), in_t[:, None] & in_k[None, :])
        wk = masked_load(w_ref, _flat_w_index(w_is_b, adapter[None, :], rr[None, :], ks[:, None]),
                         in_k[:, None] & in_c[None, :])
        return acc + jnp.dot(xk, wk.astype(xk.dtype), preferred_element_type=jnp.float32, precision=precision)

    acc = lax.fori_loop(0, chunks, body, jnp.zeros((block_t, block_c), jnp.float32))
    # The output is padded to whole tiles (rows/columns past T / C get zeros), so whole-tile,
    # unmasked stores: interpret mode implements atomics only for unmasked slices.
    tile = (pl.ds(pl.program_id(0) * block_t, block_t), pl.ds(pl.program_id(1) * block_c, block_c))
    if atomic:
        plgpu.atomic_add(out_ref, tile, acc)
    else:
        out_ref[tile] = acc


def dense_shrink(x, w, *, w_is_b, block_t, block_c, block_k, interpret, min_programs=264):
    """x [T, D] @ flat adapters of w (lora_a [L, D, r], or lora_b [L, r, D] transposed) -> [T, L*r] f32,
    padded to whole tiles: [cdiv(T, bt) * bt, cdiv(L*r, bc) * bc] (the padding holds zeros)."""
    num_tokens, depth = x.shape
    num_adapters = w.shape[0]
    rank = w.shape[1] if w_is_b else w.shape[2]
    cat = num_adapters * rank
    block_c = min(block_c, pow2_at_least(cat))
    tiles = cdiv(num_tokens, block_t) * cdiv(cat, block_c)
    total = cdiv(depth, block_k)
    chunks = cdiv(total, depth_splits(total, tiles, min_programs))
    splits = cdiv(total, chunks)
    padded = (cdiv(num_tokens, block_t) * block_t, cdiv(cat, block_c) * block_c)
    kernel = functools.partial(
        _dense_shrink_kernel, block_t=block_t, block_c=block_c, block_k=block_k, chunks=chunks,
        num_tokens=num_tokens, depth=depth, rank=rank, cat=cat, w_is_b=w_is_b, atomic=splits > 1,
        precision=dot_precision(x.dtype))
    args = [x, w]
    aliases = {}
    if splits > 1:  # float32 atomics into a zeroed buffer
        args.append(jnp.zeros(padded, jnp.float32))
        aliases = {2: 0}
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(padded, jnp.float32),
        grid=(padded[0] // block_t, padded[1] // block_c, splits),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=compiler_params(8 if block_t * block_c >= 16384 else 4, 3),
        name="grouped_lora_dense_shrink",
    )(*args)


def _dense_expand_kernel(idx_ref, wt_ref, s_ref, xa_ref, w_ref, *rest, top_k, block_t, block_n, block_k,
                         num_tokens, num_adapters, rank, cat, width, w_is_b, has_base, precision):
    out_ref = rest[-1]
    rows = pl.program_id(0) * block_t + jnp.arange(block_t, dtype=jnp.int32)
    cols = pl.program_id(1) * block_n + jnp.arange(block_n, dtype=jnp.int32)
    in_t = rows < num_tokens
    in_n = cols < width
    # The tile's routing, read once: adapter and weight of each (token, slot).
    sel = [(masked_load(idx_ref, (rows * top_k + j,), in_t),
            masked_load(wt_ref, (rows * top_k + j,), in_t).astype(jnp.float32)) for j in range(top_k)]

    def body(kk, acc):
        ks = kk * block_k + jnp.arange(block_k, dtype=jnp.int32)  # over C = L*r
        in_k = ks < cat
        adapter, rr = ks // rank, ks % rank
        coef = jnp.zeros((block_t, block_k), jnp.float32)
        for e, w in sel:  # coef[t, c] = scaling[e] * sum_j w[t, j] [idx[t, j] = c // r]
            coef = coef + jnp.where(e[:, None] == adapter[None, :], w[:, None], 0.0)
        coef = coef * masked_load(s_ref, (adapter,), in_k).astype(jnp.float32)[None, :]
        xa = masked_load(xa_ref, (rows[:, None], ks[None, :]), in_t[:, None] & in_k[None, :])
        xa = (xa * coef).astype(w_ref.dtype)
        if w_is_b:  # B_flat [C, W]
            wk = masked_load(w_ref, (adapter[:, None], rr[:, None], cols[None, :]), in_k[:, None] & in_n[None, :])
        else:  # A_flat^T [C, W]: lora_a [L, W, r]
            wk = masked_load(w_ref, (adapter[:, None], cols[None, :], rr[:, None]), in_k[:, None] & in_n[None, :])
        return acc + jnp.dot(xa, wk, preferred_element_type=jnp.float32, precision=precision)

    acc = lax.fori_loop(0, cdiv(cat, block_k), body, jnp.zeros((block_t, block_n), jnp.float32))
    idx = (rows[:, None], cols[None, :])
    mask = in_t[:, None] & in_n[None, :]
    if has_base:
        acc = acc + masked_load(rest[0], idx, mask).astype(jnp.float32)
    masked_store(out_ref, idx, acc.astype(out_ref.dtype), mask)


def dense_expand(expert_idx, expert_weight, scaling, xa, w, *, w_is_b, out_dtype, block_t, block_n, block_k,
                 interpret, base=None, poison=False):
    """[base +] (xa * coef) @ flat adapters of w (lora_b [L, r, W], or lora_a [L, W, r] transposed) -> [T, W];
    coef[t, c] = scaling[e] sum_j w[t, j] [idx[t, j] = e], e = c // r, computed in the kernel.
    xa [>= T, >= L*r] float32 (padding ignored)."""
    num_tokens, top_k = expert_idx.shape
    num_adapters = w.shape[0]
    rank = w.shape[1] if w_is_b else w.shape[2]
    cat = num_adapters * rank
    width = w.shape[2] if w_is_b else w.shape[1]
    block_k = min(block_k, pow2_at_least(cat))
    # Small T: narrower output tiles for enough programs.
    while block_n > 32 and cdiv(num_tokens, block_t) * cdiv(width, block_n) < 132:
        block_n //= 2
    kernel = functools.partial(
        _dense_expand_kernel, top_k=top_k, block_t=block_t, block_n=block_n, block_k=block_k,
        num_tokens=num_tokens, num_adapters=num_adapters, rank=rank, cat=cat, width=width, w_is_b=w_is_b,
        has_base=base is not None, precision=dot_precision(w.dtype))
    args = [expert_idx.reshape(-1), expert_weight.reshape(-1), scaling, xa, w]
    aliases = {}
    if base is not None:
        args.append(base)
        aliases = {5: 0}
    elif poison:
        args.append(jnp.full((num_tokens, width), jnp.nan, out_dtype))
        aliases = {5: 0}
        kernel = without_aliased_input(kernel)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_tokens, width), out_dtype),
        grid=(cdiv(num_tokens, block_t), cdiv(width, block_n)),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=compiler_params(4, 3),
        name="grouped_lora_dense_expand",
    )(*args)


def _dense_block_t(num_tokens, cfg):
    return min(cfg.block_t_dense, pow2_at_least(num_tokens))


def dense_forward(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg):
    block_t = _dense_block_t(x.shape[0], cfg)
    xa = dense_shrink(x, lora_a, w_is_b=False, block_t=block_t, block_c=cfg.block_c_dense,
                      block_k=cfg.block_k, interpret=cfg.interpret)
    out = dense_expand(expert_idx, expert_weight, scaling, xa, lora_b, w_is_b=True, out_dtype=x.dtype,
                       block_t=block_t, block_n=cfg.block_n,
                       block_k=cfg.block_k_dense, interpret=cfg.interpret,
                       base=base if cfg.has_base else None, poison=cfg.poison)
    return out, xa


def dense_backward(cfg, res, g, need):
    lora_a, lora_b, scaling, expert_idx, expert_weight = res["a"], res["b"], res["s"], res["idx"], res["w"]
    num_adapters, depth, rank = lora_a.shape
    num_tokens = expert_idx.shape[0]
    xa = res["xa"][:num_tokens, :num_adapters * rank]
    block_t = _dense_block_t(num_tokens, cfg)
    dtype = lora_a.dtype
    dx = da = db = ds = dw = None
    if need & {"x", "a", "s", "w"}:
        gb = dense_shrink(g, lora_b, w_is_b=True, block_t=block_t, block_c=cfg.block_c_dense,
                          block_k=cfg.block_k, interpret=cfg.interpret)  # g @ B_flat^T (padded) f32
        if "x" in need:
            dx = dense_expand(expert_idx, expert_weight, scaling, gb, lora_a, w_is_b=False, out_dtype=dtype,
                              block_t=block_t,
                              block_n=cfg.block_n, block_k=cfg.block_k_dense, interpret=cfg.interpret,
                              poison=cfg.poison)
        gb = gb[:num_tokens, :num_adapters * rank]
        if "a" in need:
            coef = dense_routing_weights(expert_idx, expert_weight, scaling)
            gbs = (gb.reshape(num_tokens, num_adapters, rank) * coef[:, :, None]).astype(dtype)
            da = jnp.einsum("td,tlr->ldr", res["x"], gbs, preferred_element_type=jnp.float32,
                            precision=dot_precision(dtype)).astype(dtype)
        if need & {"s", "w"}:
            raw_all = jnp.sum((xa * gb).reshape(num_tokens, num_adapters, rank), axis=-1)  # [T, L]
            ds, dw = routing_grads(jnp.take_along_axis(raw_all, expert_idx, axis=1), expert_idx, expert_weight,
                                   scaling, need)
    if "b" in need:
        coef = dense_routing_weights(expert_idx, expert_weight, scaling)
        xas = (xa.reshape(num_tokens, num_adapters, rank) * coef[:, :, None]).astype(dtype)
        db = jnp.einsum("tlr,to->lro", xas, g, preferred_element_type=jnp.float32,
                        precision=dot_precision(dtype)).astype(dtype)
    return dx, da, db, ds, dw
