"""Pallas kernels for the routed grouped low-rank product (DESIGN.md section 4), forward and backward.

    out[t] = sum_j w[t, j] * scaling[e] * (x[t] @ lora_a[e]) @ lora_b[e],  e = expert_idx[t, j]

Four forward algorithms, all written for Pallas's Triton lowering (GPU) and run with
`interpret=True` on CPU:

* "sorted" (prefill, training). The T*k (token, slot) pairs are laid out slot by slot; inside a
  slot the tokens are sorted by adapter and every adapter's segment is padded to a multiple of the
  token tile `block_t`, so each tile belongs to one adapter (`_routing_plan`, plain XLA: one sort
  of T*k int32 keys and a few small fusions). Then
    1. `_shrink`: one program per tile, a grouped GEMM x[rows] @ lora_a[e] -> xa [tiles*bt, R]
       (float32, unscaled; R = rank padded to a power of two >= 16);
    2. `_expand`, once per slot j: one program per (tile, block of d_out), (xa * w * scaling) @
       lora_b[e], scattered by row into out[T, d_out]. In a slot every token occurs exactly once,
       so a launch writes each output row once and no atomics are needed; slot j > 0 reads the
       rows back and adds (the buffer is aliased from launch to launch).
  Extra memory: O(T*k*R) for xa and the plan; no [T, k, d_in, r] gather, no [T*k, d_out] buffer.
* "decode" (few tokens): no sort. `_shrink_decode` computes each pair's x[t] @ lora_a[e] as a
  split-K vector product (grid: pairs x splits), `_expand_decode` sums the splits, applies the
  weight and multiplies by the pair's rows of lora_b, summing the k slots in registers.
* "combo" (large T): the sorted path's plan and shrinks, but one expand pass for all k slots
  (`_combo_expand`): tokens ordered by the adapters they chose (`_combo_plan`, two counting passes
  on top of the sorted plan), so a tile of neighbouring tokens uses a few adapters and each
  program loops over them, gathering every slot's xa row from the pair layout. Each output row is
  written once, where the sorted expand reads, adds and writes it again for every slot after the
  first.
* "dense" (token order, no plan): `_dense_shrink` computes x @ A_flat over all L*r flat adapter
  columns (x read once for every slot; split-K with float32 atomics when there are few tokens), and
  `_dense_expand` combines all k slots of a token tile in one pass over the output: the routing
  coefficients are built in the kernel from expert_idx / expert_weight / scaling. L/k times the
  sorted path's flops. Chosen only explicitly (`path="dense"`): the "concat" grad path below does
  the same products faster.

Which path runs is chosen twice (`Config.path`, `Config.grad_path`): the primal path when the call is
not differentiated, and the path whose forward saves residuals for the backward when it is. Under
differentiation there is one more path, "concat" (`grouped_lora_xla.concat_forward` /
`concat_backward`): the dense products as four plain XLA GEMMs over every adapter's weights side
by side (A_cat [d_in, L*r], B_cat [L*r, d_out]), compute-dtype operands with float32 accumulation.
No Pallas kernel: the library GEMMs beat ours there. `auto_grad_path` picks decode for up to 16
tokens, then concat while T * L * r is small enough that its L/k-fold flops cost less than the sorted
path's plan and per-slot passes, then sorted, and combo from 8192 tokens up.

Backward of the sorted path (custom VJP, through the sorted plan): with g = d out,
    gB   = g[rows] @ lora_b[e]^T                (`_shrink` with the weight read transposed)
    dx   = sum_j (w s gB) @ lora_a[e]^T           (`_expand` with the weight read transposed;
                                                   the combo path: `_combo_expand`)
    dw   = s * <xa, gB>,  dscaling = sum w <xa, gB>   (XLA, on [T*k, R])
    dA[e] = x[rows]^T (w s gB),  dB[e] = (w s xa)^T g[rows]   (`_tgmm`, per adapter and block)
Backward of the decode path (`_decode_backward`): the same gB and dx per (token, slot) pair, with
the decode kernels reading the weight transposed; the dx kernel also returns <xa, gB> per pair, so
d expert_weight costs no launch of its own; dA / dB as two small XLA GEMMs when asked for.
Backward of the dense path (`_dense_backward`): gB = g @ B_flat^T (dense shrink, transposed weight),
dx = (coef gB) @ A_flat^T (dense expand), dw / dscaling from <xa, gB> per selected adapter (XLA, with
the forward's saved xa), dA / dB as two XLA GEMMs when asked for.
Each gradient is computed only when its input is perturbed: the VJP uses `symbolic_zeros=True`, so
the forward rule knows which of x / lora_a / lora_b / scaling / expert_weight are being
differentiated. In MeteoRA the LoRAs are frozen (not differentiated), so dA/dB are skipped; in
MixLoRA, differentiating w.r.t. lora_a/lora_b makes them appear. `jax.lax.stop_gradient` on an
input also switches its gradient off.

Out-of-range handling: every load and store inside the kernels is masked, with integer-array
indices (gather/scatter style) so that interpret mode drops out-of-range stores exactly like the
GPU does; padding rows carry the sentinel token index T.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.grouped_lora_xla import concat_backward, concat_forward, concat_weights, dense_routing_weights

_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")


def _compiler_params(num_warps, num_stages):
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _cdiv(a, b):
    return -(-a // b)


def _pow2_at_least(n, floor=16):
    return max(floor, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _load(ref, idx, mask):
    return plgpu.load(ref.at[idx], mask=mask, other=0)


def _store(ref, idx, val, mask):
    plgpu.store(ref.at[idx], val, mask=mask)


# ------------------------------------------------------------------------------------------------
# Routing plan (plain XLA)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """Tile layout of the (token, slot) pairs; all arrays int32.

    rows        [k*nts*bt]  token of each padded row (T for padding)
    tile_expert [k*nts]     adapter of each tile (L for an empty tile)
    tile_start  [k, L]      first tile (global index) of adapter e in slot j
    num_tiles   [k, L]      number of tiles of adapter e in slot j
    pair_row    [k, T]      padded row of token t's slot j (the inverse of rows)
    """

    rows: jax.Array
    tile_expert: jax.Array
    tile_start: jax.Array
    num_tiles: jax.Array
    pair_row: jax.Array


jax.tree_util.register_dataclass(
    Plan, data_fields=["rows", "tile_expert", "tile_start", "num_tiles", "pair_row"], meta_fields=[]
)


def tiles_per_slot(num_tokens, num_adapters, block_t):
    """Static bound on the tiles one slot needs: sum_e ceil(n_e / bt) <= ceil(T / bt) + min(L, T)."""
    return _cdiv(num_tokens, block_t) + min(num_adapters, num_tokens)


def _bucket_rank(digit, num_buckets):
    """Counting sort without a sort kernel (an XLA sort of T*k keys cost ~30 us on an H100), from a
    cumulative sum of one-hots over the last axis: digit [..., P] in [0, num_buckets) -> each
    element's rank among the earlier elements of its bucket [..., P] and the bucket sizes [..., B]."""
    one_hot = (digit[..., None] == jnp.arange(num_buckets, dtype=jnp.int32)).astype(jnp.int32)  # [..., P, B]
    running = jnp.cumsum(one_hot, axis=-2, dtype=jnp.int32)
    rank = jnp.take_along_axis(running, digit[..., None], axis=-1)[..., 0] - 1
    return rank, running[..., -1, :]


def _routing_plan(expert_idx, num_adapters, block_t):  # expert_idx [T, k]
    num_tokens, top_k = expert_idx.shape
    nts = tiles_per_slot(num_tokens, num_adapters, block_t)
    idx = expert_idx.T.astype(jnp.int32)  # [k, T]
    rank, sizes = _bucket_rank(idx, num_adapters)  # [k, T], [k, L]
    num_tiles = (sizes + block_t - 1) // block_t
    tile_end = jnp.cumsum(num_tiles, axis=1, dtype=jnp.int32)  # slot-local
    tile_start = tile_end - num_tiles
    slot = jnp.arange(top_k, dtype=jnp.int32)[:, None]
    pos = (slot * nts + jnp.take_along_axis(tile_start, idx, axis=1)) * block_t + rank
    tok = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (top_k, num_tokens))
    rows = jnp.full((top_k * nts * block_t,), num_tokens, jnp.int32)
    rows = rows.at[pos.reshape(-1)].set(tok.reshape(-1), unique_indices=True)
    local = jnp.arange(nts, dtype=jnp.int32)
    tile_expert = jnp.sum(tile_end[:, None, :] <= local[None, :, None], axis=-1, dtype=jnp.int32)
    return Plan(rows, tile_expert.reshape(-1), tile_start + slot * nts, num_tiles, pos)


def _row_coef(plan, expert_weight, scaling, block_t):
    """w[t, j] * scaling[e] for every padded row; 0 for padding rows. [k*nts*bt] float32."""
    num_tokens, top_k = expert_weight.shape
    num_rows = plan.rows.shape[0]
    slot = jnp.arange(num_rows, dtype=jnp.int32) // (num_rows // top_k)
    valid = plan.rows < num_tokens
    tok = jnp.minimum(plan.rows, num_tokens - 1)
    w = expert_weight.astype(jnp.float32)[tok, slot]
    e = jnp.repeat(jnp.minimum(plan.tile_expert, scaling.shape[0] - 1), block_t)
    return jnp.where(valid, w * scaling.astype(jnp.float32)[e], 0.0)


# ------------------------------------------------------------------------------------------------
# Sorted path kernels
# ------------------------------------------------------------------------------------------------


def _shrink_kernel(tile_expert_ref, rows_ref, x_ref, w_ref, out_ref, *, block_t, block_k, num_tokens,
                   num_adapters, depth, rank, rank_p, transpose_w, precision):
    i = pl.program_id(0)
    e = tile_expert_ref[i]

    @pl.when(e < num_adapters)
    def _compute():
        rows = rows_ref[pl.ds(i * block_t, block_t)]
        valid = rows < num_tokens
        rk = jnp.arange(rank_p, dtype=jnp.int32)

        def body(kk, acc):
            cols = kk * block_k + jnp.arange(block_k, dtype=jnp.int32)
            in_k = cols < depth
            xk = _load(x_ref, (rows[:, None], cols[None, :]), valid[:, None] & in_k[None, :])
            wmask = in_k[:, None] & (rk < rank)[None, :]
            if transpose_w:  # w_ref [L, r, depth]
                wk = _load(w_ref, (e, rk[None, :], cols[:, None]), wmask)
            else:  # w_ref [L, depth, r]
                wk = _load(w_ref, (e, cols[:, None], rk[None, :]), wmask)
            return acc + jnp.dot(xk, wk.astype(xk.dtype), preferred_element_type=jnp.float32,
                                 precision=precision)

        acc = lax.fori_loop(0, _cdiv(depth, block_k), body, jnp.zeros((block_t, rank_p), jnp.float32))
        out_ref[pl.ds(i * block_t, block_t), :] = acc

    @pl.when(e >= num_adapters)
    def _empty():
        out_ref[pl.ds(i * block_t, block_t), :] = jnp.zeros((block_t, rank_p), jnp.float32)


def _shrink(plan, x, w, *, rank, transpose_w, block_t, block_k, interpret, num_warps=4, num_stages=3):
    """x [T, D] and w [L, D, r] (or [L, r, D] with transpose_w) -> [k*nts*bt, R] float32."""
    num_tokens, depth = x.shape
    num_adapters = w.shape[0]
    rank_p = _pow2_at_least(rank)
    num_rows = plan.rows.shape[0]
    kernel = functools.partial(
        _shrink_kernel, block_t=block_t, block_k=block_k, num_tokens=num_tokens,
        num_adapters=num_adapters, depth=depth, rank=rank, rank_p=rank_p, transpose_w=transpose_w,
        precision=_precision(x.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, rank_p), jnp.float32),
        grid=(num_rows // block_t,),
        interpret=interpret,
        compiler_params=_compiler_params(num_warps, num_stages),
        name="grouped_lora_shrink",
    )(plan.tile_expert, plan.rows, x, w)


def _expand_kernel(tile_expert_ref, rows_ref, coef_ref, xa_ref, w_ref, *rest, slot, tiles_slot,
                   block_t, block_n, num_tokens, num_adapters, width, rank, rank_p, transpose_w,
                   accumulate, precision):
    out_ref = rest[-1]
    prev_ref = rest[0] if accumulate else None
    tile = slot * tiles_slot + pl.program_id(0)
    n = pl.program_id(1)  # program ids are read outside pl.when (interpret mode needs that)
    e = tile_expert_ref[tile]

    @pl.when(e < num_adapters)
    def _compute():
        rows = rows_ref[pl.ds(tile * block_t, block_t)]
        valid = rows < num_tokens
        coef = coef_ref[pl.ds(tile * block_t, block_t)]
        xa = (xa_ref[pl.ds(tile * block_t, block_t), :] * coef[:, None]).astype(w_ref.dtype)
        rk = jnp.arange(rank_p, dtype=jnp.int32)
        cols = n * block_n + jnp.arange(block_n, dtype=jnp.int32)
        in_n = cols < width
        wmask = (rk < rank)[:, None] & in_n[None, :]
        if transpose_w:  # w_ref [L, width, r]
            wt = _load(w_ref, (e, cols[None, :], rk[:, None]), wmask)
        else:  # w_ref [L, r, width]
            wt = _load(w_ref, (e, rk[:, None], cols[None, :]), wmask)
        y = jnp.dot(xa, wt, preferred_element_type=jnp.float32, precision=precision)
        idx = (rows[:, None], cols[None, :])
        mask = valid[:, None] & in_n[None, :]
        if accumulate:
            y = y + _load(prev_ref, idx, mask).astype(jnp.float32)
        _store(out_ref, idx, y.astype(out_ref.dtype), mask)


def _expand(plan, coef, xa, w, *, num_tokens, width, rank, transpose_w, out_dtype, block_t, block_n,
            interpret, base=None, poison=False, num_warps=4, num_stages=2):
    """[base +] sum over slots of (xa * coef) @ w[e] scattered to rows -> [T, width]; a launch per slot."""
    num_adapters = w.shape[0]
    rank_p = xa.shape[1]
    top_k = plan.tile_start.shape[0]
    tiles_slot = plan.tile_expert.shape[0] // top_k
    out = base
    if poison and base is None:
        out = jnp.full((num_tokens, width), jnp.nan, out_dtype)
    for slot in range(top_k):
        accumulate = slot > 0 or base is not None
        kernel = functools.partial(
            _expand_kernel, slot=slot, tiles_slot=tiles_slot, block_t=block_t, block_n=block_n,
            num_tokens=num_tokens, num_adapters=num_adapters, width=width, rank=rank, rank_p=rank_p,
            transpose_w=transpose_w, accumulate=accumulate, precision=_precision(w.dtype))
        args = [plan.tile_expert, plan.rows, coef, xa, w]
        aliases = {}
        if out is not None:  # previous slot's sum (read when accumulating), or the poisoned buffer
            args.append(out)
            aliases = {len(args) - 1: 0}
            if not accumulate:
                kernel = _drop_arg(kernel)
        out = pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((num_tokens, width), out_dtype),
            grid=(tiles_slot, _cdiv(width, block_n)),
            input_output_aliases=aliases,
            interpret=interpret,
            compiler_params=_compiler_params(num_warps, num_stages),
            name="grouped_lora_expand",
        )(*args)
    return out


def _drop_arg(kernel):
    """Kernel wrapper ignoring the aliased (poisoned) input of a non-accumulating launch."""

    def wrapped(*refs):
        return kernel(*refs[:-2], refs[-1])

    return wrapped


def _tgmm_kernel(tile_start_ref, num_tiles_ref, rows_ref, mat_ref, cmp_ref, out_ref, *, top_k, block_t,
                 block_n, num_tokens, width, rank, rank_p, precision):
    e = pl.program_id(0)
    cols = pl.program_id(1) * block_n + jnp.arange(block_n, dtype=jnp.int32)
    in_n = cols < width
    rk = jnp.arange(rank_p, dtype=jnp.int32)
    acc = jnp.zeros((block_n, rank_p), jnp.float32)
    for slot in range(top_k):
        first = tile_start_ref[slot, e]

        def body(t, acc):
            tile = first + t
            rows = rows_ref[pl.ds(tile * block_t, block_t)]
            valid = rows < num_tokens
            m = _load(mat_ref, (rows[None, :], cols[:, None]), valid[None, :] & in_n[:, None])  # [bn, bt]
            c = cmp_ref[pl.ds(tile * block_t, block_t), :].astype(m.dtype)  # [bt, R]
            return acc + jnp.dot(m, c, preferred_element_type=jnp.float32, precision=precision)

        acc = lax.fori_loop(0, num_tiles_ref[slot, e], body, acc)
    _store(out_ref, (e, cols[:, None], rk[None, :]), acc.astype(out_ref.dtype),
           in_n[:, None] & (rk < rank)[None, :])


def _tgmm(plan, mat, cmp, *, num_adapters, rank, out_dtype, block_t, block_n, interpret, poison=False,
          num_warps=4, num_stages=2):
    """out[e] = mat[rows of e]^T @ cmp[rows of e]: mat [T, W], cmp [k*nts*bt, R] -> [L, W, r]."""
    num_tokens, width = mat.shape
    top_k = plan.tile_start.shape[0]
    kernel = functools.partial(
        _tgmm_kernel, top_k=top_k, block_t=block_t, block_n=block_n, num_tokens=num_tokens, width=width,
        rank=rank, rank_p=cmp.shape[1], precision=_precision(mat.dtype))
    args = [plan.tile_start, plan.num_tiles, plan.rows, mat, cmp]
    aliases = {}
    if poison:
        args.append(jnp.full((num_adapters, width, rank), jnp.nan, out_dtype))
        aliases = {len(args) - 1: 0}
        kernel = _drop_arg(kernel)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_adapters, width, rank), out_dtype),
        grid=(num_adapters, _cdiv(width, block_n)),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=_compiler_params(num_warps, num_stages),
        name="grouped_lora_tgmm",
    )(*args)


# ------------------------------------------------------------------------------------------------
# Decode path kernels
# ------------------------------------------------------------------------------------------------


# Split-K programs the decode shrink aims for: two per SM (128 was 4-14% slower at T = 16, r = 64).
DECODE_MIN_PROGRAMS = 256
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
        xk = _load(x_ref, (t, cols), in_k).astype(jnp.float32)
        wmask = in_k[:, None] & (rk < rank)[None, :]
        if transpose_w:  # w_ref [L, r, depth]
            wk = _load(w_ref, (e, rk[None, :], cols[:, None]), wmask)
        else:  # w_ref [L, depth, r]
            wk = _load(w_ref, (e, cols[:, None], rk[None, :]), wmask)
        return acc + jnp.sum(xk[:, None] * wk.astype(jnp.float32), axis=0)

    acc = lax.fori_loop(0, chunks, body, jnp.zeros((rank_p,), jnp.float32))
    out_ref[split, p, :] = acc


def _shrink_decode(x, w, idx_flat, *, top_k, rank, transpose_w, block_k, interpret):
    """Each (token, slot) pair's x[t] @ w[e] as split-K vector products: x [T, D], w [L, D, r] (or
    [L, r, D] with transpose_w), idx_flat [T*k] -> partial sums [splits, T*k, R] float32."""
    depth = x.shape[1]
    rank_p = _pow2_at_least(rank)
    pairs = idx_flat.shape[0]
    total_chunks = _cdiv(depth, block_k)
    # Enough programs to cover the GPU while keeping each split at least one chunk long.
    splits = 1
    while splits * 2 <= total_chunks and pairs * splits < DECODE_MIN_PROGRAMS:
        splits *= 2
    chunks = _cdiv(total_chunks, splits)
    return pl.pallas_call(
        functools.partial(_shrink_decode_kernel, top_k=top_k, block_k=block_k, chunks=chunks,
                          depth=depth, rank=rank, rank_p=rank_p, transpose_w=transpose_w),
        out_shape=jax.ShapeDtypeStruct((splits, pairs, rank_p), jnp.float32),
        grid=(pairs, splits),
        interpret=interpret,
        compiler_params=_compiler_params(DECODE_NUM_WARPS, 2),
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
            _store(dot_refs[0], (at_p,), jnp.broadcast_to(raw, (1,)), first)
            _store(dot_refs[1], (at_p,), jnp.broadcast_to(raw * scale, (1,)), first)
    store_row(out_ref, base_ref, t, cols, in_n, acc)


def add_adapter_row(acc, xa, b_ref, e, rk, rank, cols, in_n, transpose_w=False):
    """acc [bn] + xa [R] @ lora_b[e][:, cols] for one token (decode expands); with transpose_w, b_ref is
    a lora_a [L, width, r] read as lora_a[e][cols, :]^T. xa is rounded to the weight's dtype first, as
    the XLA reference rounds the scaled x @ A before its second product."""
    xa = xa.astype(b_ref.dtype).astype(jnp.float32)
    mask = (rk < rank)[:, None] & in_n[None, :]
    idx = (e, cols[None, :], rk[:, None]) if transpose_w else (e, rk[:, None], cols[None, :])
    bt = _load(b_ref, idx, mask)
    return acc + jnp.sum(xa[:, None] * bt.astype(jnp.float32), axis=0)


def store_row(out_ref, base_ref, t, cols, in_n, acc):
    """Writes acc [bn] (+ base[t, cols] when base_ref is given) to out[t, cols] in out's dtype."""
    if base_ref is not None:
        acc = acc + _load(base_ref, (t, cols), in_n).astype(jnp.float32)
    _store(out_ref, (t, cols), acc.astype(out_ref.dtype), in_n)


def _expand_decode(idx_flat, expert_weight, scaling, part, w, *, num_tokens, rank, transpose_w, out_dtype,
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
        grid=(num_tokens, _cdiv(width, block_n)),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=_compiler_params(DECODE_NUM_WARPS, 2),
        name="grouped_lora_expand_decode",
    )(*args)
    return outs[0] if dots_with is None else tuple(outs)


def _forward_decode(x, lora_a, lora_b, scaling, expert_idx, expert_weight, *, block_k, block_n, interpret,
                    base=None, poison=False):
    """The decode path's output [T, d_out] and its shrink's partial sums [splits, T*k, R] float32
    (unscaled x @ lora_a[e] per pair once summed: what the backward needs for d expert_weight)."""
    top_k = expert_idx.shape[1]
    rank = lora_a.shape[2]
    idx_flat = expert_idx.reshape(-1).astype(jnp.int32)
    part = _shrink_decode(x, lora_a, idx_flat, top_k=top_k, rank=rank, transpose_w=False, block_k=block_k,
                          interpret=interpret)
    out = _expand_decode(idx_flat, expert_weight, scaling, part, lora_b, num_tokens=x.shape[0], rank=rank,
                         transpose_w=False, out_dtype=x.dtype, block_n=block_n, interpret=interpret, base=base,
                         poison=poison)
    return out, part


def _decode_backward(cfg, res, g, need):
    """Backward of the decode path, per (token, slot) pair like its forward:
        gB = g[t] @ lora_b[e]^T      (`_shrink_decode`, weight read transposed)
        dx = sum_j (w s gB) @ lora_a[e]^T   (`_expand_decode`, weight read transposed)
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
        gb_part = _shrink_decode(g, lora_b, idx_flat, top_k=top_k, rank=rank, transpose_w=True,
                                 block_k=cfg.block_k_decode, interpret=cfg.interpret)
        raw = scaled = None  # [T*k]: <xa, gB> per pair, and s[e] times it
        if "x" in need:
            dx = _expand_decode(idx_flat, expert_weight, scaling, gb_part, lora_a, num_tokens=num_tokens,
                                rank=rank, transpose_w=True, out_dtype=dtype, block_n=cfg.block_n_decode,
                                interpret=cfg.interpret, poison=cfg.poison,
                                dots_with=res["part"] if need & {"s", "w"} else None)
            if need & {"s", "w"}:
                dx, raw, scaled = dx
        gb = jnp.sum(gb_part, axis=0)[:, :rank]  # [T*k, r]
        if "a" in need:
            da = jnp.einsum("td,tlr->ldr", res["x"], one_hot_layout(gb * coef[:, None]),
                            preferred_element_type=jnp.float32, precision=_precision(dtype)).astype(dtype)
        if need & {"s", "w"}:
            if raw is None:
                raw = jnp.sum(jnp.sum(res["part"], axis=0)[:, :rank] * gb, axis=-1)
            raw = raw.reshape(num_tokens, top_k)
            if "w" in need and scaled is not None:  # s[e] <xa, gB> is d expert_weight, from the kernel
                dw = scaled.reshape(num_tokens, top_k).astype(expert_weight.dtype)
                ds = _routing_grads(raw, expert_idx, expert_weight, scaling, need - {"w"})[0]
            else:
                ds, dw = _routing_grads(raw, expert_idx, expert_weight, scaling, need)
    if "b" in need:
        xa = jnp.sum(res["part"], axis=0)[:, :rank]  # [T*k, r] float32, unscaled
        db = jnp.einsum("tlr,to->lro", one_hot_layout(xa * coef[:, None]), g,
                        preferred_element_type=jnp.float32, precision=_precision(dtype)).astype(dtype)
    return dx, da, db, ds, dw


# ------------------------------------------------------------------------------------------------
# Dense path kernels (token order, no sort: every token against the flat [L*r] adapter axis)
# ------------------------------------------------------------------------------------------------
#
# C = L*r flat adapter columns; column c is rank row c % r of adapter c // r.
#   shrink:  xa[T, C] = x @ A_flat  (A_flat[d, c] = lora_a[c // r, d, c % r]), x read once for all k
#            slots; float32, unscaled (the backward reuses it for d expert_weight). Split-K over the
#            depth with float32 atomics when the token/column tiles alone cannot fill the GPU.
#   expand:  out[T, W] = base + (xa * coef[t, c // r]).astype(dtype) @ B_flat  (B_flat[c, n] =
#            lora_b[c // r, c % r, n]), coef[t, e] = sum_j w[t, j] [idx[t, j] = e] scaling[e]: all k
#            slots combined in one pass that reads base and writes the output once.
# Costs T*d*L*r flops per product (L/k times the sorted path's): cheap for small L*r, and at small T
# (where reading every adapter once is the floor anyway since k*T pairs touch most adapters).


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
        xk = _load(x_ref, (rows[:, None], ks[None, :]), in_t[:, None] & in_k[None, :])
        wk = _load(w_ref, _flat_w_index(w_is_b, adapter[None, :], rr[None, :], ks[:, None]),
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


def _dense_shrink(x, w, *, w_is_b, block_t, block_c, block_k, interpret, min_programs=264):
    """x [T, D] @ flat adapters of w (lora_a [L, D, r], or lora_b [L, r, D] transposed) -> [T, L*r] f32,
    padded to whole tiles: [cdiv(T, bt) * bt, cdiv(L*r, bc) * bc] (the padding holds zeros)."""
    num_tokens, depth = x.shape
    num_adapters = w.shape[0]
    rank = w.shape[1] if w_is_b else w.shape[2]
    cat = num_adapters * rank
    block_c = min(block_c, _pow2_at_least(cat))
    tiles = _cdiv(num_tokens, block_t) * _cdiv(cat, block_c)
    total = _cdiv(depth, block_k)
    splits = 1
    while splits * 2 <= total and tiles * splits < min_programs:
        splits *= 2
    chunks = _cdiv(total, splits)
    splits = _cdiv(total, chunks)
    padded = (_cdiv(num_tokens, block_t) * block_t, _cdiv(cat, block_c) * block_c)
    kernel = functools.partial(
        _dense_shrink_kernel, block_t=block_t, block_c=block_c, block_k=block_k, chunks=chunks,
        num_tokens=num_tokens, depth=depth, rank=rank, cat=cat, w_is_b=w_is_b, atomic=splits > 1,
        precision=_precision(x.dtype))
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
        compiler_params=_compiler_params(8 if block_t * block_c >= 16384 else 4, 3),
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
    sel = [(_load(idx_ref, (rows * top_k + j,), in_t),
            _load(wt_ref, (rows * top_k + j,), in_t).astype(jnp.float32)) for j in range(top_k)]

    def body(kk, acc):
        ks = kk * block_k + jnp.arange(block_k, dtype=jnp.int32)  # over C = L*r
        in_k = ks < cat
        adapter, rr = ks // rank, ks % rank
        coef = jnp.zeros((block_t, block_k), jnp.float32)
        for e, w in sel:  # coef[t, c] = scaling[e] * sum_j w[t, j] [idx[t, j] = c // r]
            coef = coef + jnp.where(e[:, None] == adapter[None, :], w[:, None], 0.0)
        coef = coef * _load(s_ref, (adapter,), in_k).astype(jnp.float32)[None, :]
        xa = _load(xa_ref, (rows[:, None], ks[None, :]), in_t[:, None] & in_k[None, :])
        xa = (xa * coef).astype(w_ref.dtype)
        if w_is_b:  # B_flat [C, W]
            wk = _load(w_ref, (adapter[:, None], rr[:, None], cols[None, :]), in_k[:, None] & in_n[None, :])
        else:  # A_flat^T [C, W]: lora_a [L, W, r]
            wk = _load(w_ref, (adapter[:, None], cols[None, :], rr[:, None]), in_k[:, None] & in_n[None, :])
        return acc + jnp.dot(xa, wk, preferred_element_type=jnp.float32, precision=precision)

    acc = lax.fori_loop(0, _cdiv(cat, block_k), body, jnp.zeros((block_t, block_n), jnp.float32))
    idx = (rows[:, None], cols[None, :])
    mask = in_t[:, None] & in_n[None, :]
    if has_base:
        acc = acc + _load(rest[0], idx, mask).astype(jnp.float32)
    _store(out_ref, idx, acc.astype(out_ref.dtype), mask)


def _dense_expand(expert_idx, expert_weight, scaling, xa, w, *, w_is_b, out_dtype, block_t, block_n, block_k,
                  interpret, base=None, poison=False):
    """[base +] (xa * coef) @ flat adapters of w (lora_b [L, r, W], or lora_a [L, W, r] transposed) -> [T, W];
    coef[t, c] = scaling[e] sum_j w[t, j] [idx[t, j] = e], e = c // r, computed in the kernel.
    xa [>= T, >= L*r] float32 (padding ignored)."""
    num_tokens, top_k = expert_idx.shape
    num_adapters = w.shape[0]
    rank = w.shape[1] if w_is_b else w.shape[2]
    cat = num_adapters * rank
    width = w.shape[2] if w_is_b else w.shape[1]
    block_k = min(block_k, _pow2_at_least(cat))
    # Small T: narrower output tiles for enough programs.
    while block_n > 32 and _cdiv(num_tokens, block_t) * _cdiv(width, block_n) < 132:
        block_n //= 2
    kernel = functools.partial(
        _dense_expand_kernel, top_k=top_k, block_t=block_t, block_n=block_n, block_k=block_k,
        num_tokens=num_tokens, num_adapters=num_adapters, rank=rank, cat=cat, width=width, w_is_b=w_is_b,
        has_base=base is not None, precision=_precision(w.dtype))
    args = [expert_idx.reshape(-1), expert_weight.reshape(-1), scaling, xa, w]
    aliases = {}
    if base is not None:
        args.append(base)
        aliases = {5: 0}
    elif poison:
        args.append(jnp.full((num_tokens, width), jnp.nan, out_dtype))
        aliases = {5: 0}
        kernel = _drop_arg(kernel)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_tokens, width), out_dtype),
        grid=(_cdiv(num_tokens, block_t), _cdiv(width, block_n)),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=_compiler_params(4, 3),
        name="grouped_lora_dense_expand",
    )(*args)


def _dense_block_t(num_tokens, cfg):
    return min(cfg.block_t_dense, _pow2_at_least(num_tokens))


def _dense_forward(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg):
    block_t = _dense_block_t(x.shape[0], cfg)
    xa = _dense_shrink(x, lora_a, w_is_b=False, block_t=block_t, block_c=cfg.block_c_dense,
                       block_k=cfg.block_k, interpret=cfg.interpret)
    out = _dense_expand(expert_idx, expert_weight, scaling, xa, lora_b, w_is_b=True, out_dtype=x.dtype,
                        block_t=block_t, block_n=cfg.block_n,
                        block_k=cfg.block_k_dense, interpret=cfg.interpret,
                        base=base if cfg.has_base else None, poison=cfg.poison)
    return out, xa


def _dense_backward(cfg, res, g, need):
    lora_a, lora_b, scaling, expert_idx, expert_weight = res["a"], res["b"], res["s"], res["idx"], res["w"]
    num_adapters, depth, rank = lora_a.shape
    num_tokens = expert_idx.shape[0]
    xa = res["xa"][:num_tokens, :num_adapters * rank]
    block_t = _dense_block_t(num_tokens, cfg)
    dtype = lora_a.dtype
    dx = da = db = ds = dw = None
    if need & {"x", "a", "s", "w"}:
        gb = _dense_shrink(g, lora_b, w_is_b=True, block_t=block_t, block_c=cfg.block_c_dense,
                           block_k=cfg.block_k, interpret=cfg.interpret)  # g @ B_flat^T (padded) f32
        if "x" in need:
            dx = _dense_expand(expert_idx, expert_weight, scaling, gb, lora_a, w_is_b=False, out_dtype=dtype,
                               block_t=block_t,
                               block_n=cfg.block_n, block_k=cfg.block_k_dense, interpret=cfg.interpret,
                               poison=cfg.poison)
        gb = gb[:num_tokens, :num_adapters * rank]
        if "a" in need:
            coef = dense_routing_weights(expert_idx, expert_weight, scaling)
            gbs = (gb.reshape(num_tokens, num_adapters, rank) * coef[:, :, None]).astype(dtype)
            da = jnp.einsum("td,tlr->ldr", res["x"], gbs, preferred_element_type=jnp.float32,
                            precision=_precision(dtype)).astype(dtype)
        if need & {"s", "w"}:
            raw_all = jnp.sum((xa * gb).reshape(num_tokens, num_adapters, rank), axis=-1)  # [T, L]
            ds, dw = _routing_grads(jnp.take_along_axis(raw_all, expert_idx, axis=1), expert_idx, expert_weight,
                                    scaling, need)
    if "b" in need:
        coef = dense_routing_weights(expert_idx, expert_weight, scaling)
        xas = (xa.reshape(num_tokens, num_adapters, rank) * coef[:, :, None]).astype(dtype)
        db = jnp.einsum("tlr,to->lro", xas, g, preferred_element_type=jnp.float32,
                        precision=_precision(dtype)).astype(dtype)
    return dx, da, db, ds, dw


# ------------------------------------------------------------------------------------------------
# Combo expand (the sorted path's shrinks, one output pass for all k slots)
# ------------------------------------------------------------------------------------------------
#
# The sorted expand runs once per slot, so every slot after the first reads, adds to and writes the
# whole [T, W] output again: at T = 16384, d_out 4096 the second slot's pass takes 85 us against the
# first's 51 (session 11). The combo expand writes each output row once. Tokens are ordered by the
# adapters they chose (slot 0's, then slot 1's, ...), so a tile of bt neighbouring tokens uses only a
# few of the L adapters (at T = 16384, L = 28, k = 2, bt = 64: about five). Each program loops over its
# tile's adapters e:
#   out[t] = [base[t] +] sum_e (sum_j [idx[t, j] = e] coef[t, j] xa[pair(t, j)]) @ w[e]
# reading the low-rank rows xa that the sorted shrink left in its (token, slot) pair layout.


@dataclasses.dataclass(frozen=True)
class ComboPlan:
    """Token tiles of the combo expand; all arrays int32 but coef (float32).

    rows      [nc*bc]     token of each row, tokens ordered by their adapters (T for padding)
    pair      [k*nc*bc]   each (slot, row)'s row in the sorted plan's pair layout (0 for padding)
    idx       [k*nc*bc]   each (slot, row)'s adapter (L for padding)
    coef      [k*nc*bc]   each (slot, row)'s w[t, j] * scaling[e] (0 for padding)
    adapters  [nc*L]      the adapters tile i uses, ascending, at [i*L, i*L + count[i])
    count     [nc]        how many adapters tile i uses
    """

    rows: jax.Array
    pair: jax.Array
    idx: jax.Array
    coef: jax.Array
    adapters: jax.Array
    count: jax.Array


jax.tree_util.register_dataclass(
    ComboPlan, data_fields=["rows", "pair", "idx", "coef", "adapters", "count"], meta_fields=[])


def _stable_bucket_sort(seq, digit, num_buckets):
    """seq [P] reordered stably by digit [P] in [0, num_buckets), by `_bucket_rank` (XLA's sort of
    16384 keys took 32 us on an H200)."""
    rank, sizes = _bucket_rank(digit, num_buckets)
    start = jnp.cumsum(sizes, dtype=jnp.int32) - sizes
    return jnp.zeros_like(seq).at[start[digit] + rank].set(seq, unique_indices=True)


def _combo_plan(plan, coef, expert_idx, num_adapters, block_t):
    """The combo expand's tiles from the sorted plan (pair rows, coefficients) and expert_idx [T, k].

    Token order: a least-significant-digit radix sort by (slot 0's adapter, slot 1's, ...). The sorted
    plan's last slot already lists the tokens stably by that slot's adapter; counting passes over
    slots k-2 .. 0 finish the order (padding rows go to an extra last bucket and are cut; with k = 1
    one pass over slot 0 does only that)."""
    num_tokens, top_k = expert_idx.shape
    num_rows = plan.rows.shape[0] // top_k
    seq = plan.rows[(top_k - 1) * num_rows:]  # [nts*bt]
    for slot in range(max(top_k - 2, 0), -1, -1):
        digit = jnp.where(seq < num_tokens, expert_idx[jnp.minimum(seq, num_tokens - 1), slot], num_adapters)
        seq = _stable_bucket_sort(seq, digit, num_adapters + 1)
    num_tiles = _cdiv(num_tokens, block_t)
    pad = num_tiles * block_t - num_tokens
    rows = jnp.concatenate([seq[:num_tokens], jnp.full((pad,), num_tokens, jnp.int32)])
    valid = rows < num_tokens
    tok = jnp.minimum(rows, num_tokens - 1)
    pair = jnp.where(valid, plan.pair_row[:, tok], 0)  # [k, nc*bc]
    idx = jnp.where(valid, expert_idx.T[:, tok], num_adapters)
    row_coef = jnp.where(valid, coef[pair], 0.0)
    tile = jnp.arange(num_tiles * block_t, dtype=jnp.int32) // block_t
    present = jnp.zeros((num_tiles, num_adapters + 1), jnp.bool_).at[tile[None, :], idx].set(True)
    present = present[:, :num_adapters]
    place = jnp.where(present, jnp.cumsum(present, axis=1, dtype=jnp.int32) - 1, num_adapters)
    adapters = jnp.full((num_tiles, num_adapters), num_adapters, jnp.int32).at[
        jnp.arange(num_tiles)[:, None], place].set(jnp.arange(num_adapters, dtype=jnp.int32)[None, :], mode="drop")
    count = jnp.sum(present, axis=1, dtype=jnp.int32)
    return ComboPlan(rows, pair.reshape(-1), idx.reshape(-1), row_coef.reshape(-1), adapters.reshape(-1), count)


def _combo_expand_kernel(adapters_ref, count_ref, rows_ref, pair_ref, idx_ref, coef_ref, xa_ref, w_ref, *rest,
                         top_k, block_t, block_n, num_tokens, num_adapters, width, rank, rank_p, transpose_w,
                         has_base, precision):
    out_ref = rest[-1]
    i = pl.program_id(0)
    n = pl.program_id(1)
    num_rows = rows_ref.shape[0]
    rows = rows_ref[pl.ds(i * block_t, block_t)]
    valid = rows < num_tokens
    rk = jnp.arange(rank_p, dtype=jnp.int32)
    cols = n * block_n + jnp.arange(block_n, dtype=jnp.int32)
    in_n = cols < width
    slots = []  # per slot: its adapter [bt] and its scaled low-rank row [bt, R] (float32)
    for j in range(top_k):
        at = pl.ds(j * num_rows + i * block_t, block_t)
        pair = pair_ref[at]
        xa = _load(xa_ref, (pair[:, None], rk[None, :]), valid[:, None]) * coef_ref[at][:, None]
        slots.append((idx_ref[at], xa))
    wmask = (rk < rank)[:, None] & in_n[None, :]

    def body(u, acc):
        e = adapters_ref[i * num_adapters + u]
        # A token's slots hold distinct adapters, so at most one term is non-zero: the same bf16
        # rounding of xa * coef as the sorted expand.
        h = sum(jnp.where((sel == e)[:, None], xa, 0.0) for sel, xa in slots).astype(w_ref.dtype)
        if transpose_w:  # w_ref [L, width, r]
            wt = _load(w_ref, (e, cols[None, :], rk[:, None]), wmask)
        else:  # w_ref [L, r, width]
            wt = _load(w_ref, (e, rk[:, None], cols[None, :]), wmask)
        return acc + jnp.dot(h, wt, preferred_element_type=jnp.float32, precision=precision)

    acc = lax.fori_loop(0, count_ref[i], body, jnp.zeros((block_t, block_n), jnp.float32))
    idx = (rows[:, None], cols[None, :])
    mask = valid[:, None] & in_n[None, :]
    if has_base:
        acc = acc + _load(rest[0], idx, mask).astype(jnp.float32)
    _store(out_ref, idx, acc.astype(out_ref.dtype), mask)


def _combo_expand(cplan, xa, w, *, num_tokens, width, rank, transpose_w, out_dtype, block_t, block_n,
                  interpret, base=None, poison=False, num_warps=4, num_stages=3):
    """[base +] sum_j coef[t, j] xa[pair(t, j)] @ w[idx[t, j]] -> [T, width], one pass over the output:
    xa [pair rows, R] float32 (the sorted shrink's), w [L, r, width] (or [L, width, r] with
    transpose_w); every output row is written once."""
    num_adapters = w.shape[0]
    num_rows = cplan.rows.shape[0]
    kernel = functools.partial(
        _combo_expand_kernel, top_k=cplan.idx.shape[0] // num_rows, block_t=block_t, block_n=block_n,
        num_tokens=num_tokens, num_adapters=num_adapters, width=width, rank=rank, rank_p=xa.shape[1],
        transpose_w=transpose_w, has_base=base is not None, precision=_precision(w.dtype))
    args = [cplan.adapters, cplan.count, cplan.rows, cplan.pair, cplan.idx, cplan.coef, xa, w]
    aliases = {}
    if base is not None:
        args.append(base)
        aliases = {len(args) - 1: 0}
    elif poison:
        args.append(jnp.full((num_tokens, width), jnp.nan, out_dtype))
        aliases = {len(args) - 1: 0}
        kernel = _drop_arg(kernel)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_tokens, width), out_dtype),
        grid=(num_rows // block_t, _cdiv(width, block_n)),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=_compiler_params(num_warps, num_stages),
        name="grouped_lora_combo_expand",
    )(*args)


def _routing_grads(raw, expert_idx, expert_weight, scaling, need):
    """d scaling [L] and d expert_weight [T, k] (None unless in need) from raw [T, k] float32, each
    pair's <x @ lora_a[e], g @ lora_b[e]^T> (the gradient of its unscaled routing weight)."""
    dw = ds = None
    if "w" in need:
        dw = (raw * scaling.astype(jnp.float32)[expert_idx]).astype(expert_weight.dtype)
    if "s" in need:
        ds = jnp.zeros(scaling.shape, jnp.float32).at[expert_idx].add(
            raw * expert_weight.astype(jnp.float32)).astype(scaling.dtype)
    return ds, dw


def _concat_fwd(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg, need):
    """Forward of the "concat" grad path: `grouped_lora_xla.concat_forward`, two XLA GEMMs over
    every adapter side by side."""
    weights = dense_routing_weights(expert_idx, expert_weight, scaling)
    a_cat, b_cat = concat_weights(lora_a, lora_b)
    out, h = concat_forward(x, a_cat, b_cat, weights, base if cfg.has_base else None)
    res = dict(a_cat=a_cat, b_cat=b_cat, weights=weights, h=h, s=scaling, idx=expert_idx,
               w=expert_weight, need=need)
    if "a" in need:
        res["x"] = x
    return out, res


def _concat_bwd(res, g, need):
    a_cat, b_cat, scaling = res["a_cat"], res["b_cat"], res["s"]
    num_adapters = scaling.shape[0]
    depth, rank, width = a_cat.shape[0], a_cat.shape[1] // num_adapters, b_cat.shape[1]
    want = (need & {"x", "a", "b"}) | ({"weights"} if need & {"s", "w"} else set())
    dx, da, db, raw_all = concat_backward(g.astype(a_cat.dtype), res.get("x"), a_cat, b_cat, res["weights"],
                                          res["h"], want)
    if da is not None:
        da = da.reshape(depth, num_adapters, rank).transpose(1, 0, 2)
    if db is not None:
        db = db.reshape(num_adapters, rank, width)
    ds = dw = None
    if raw_all is not None:
        ds, dw = _routing_grads(jnp.take_along_axis(raw_all, res["idx"], axis=1), res["idx"], res["w"], scaling,
                                need)
    return dx, da, db, ds, dw


# ------------------------------------------------------------------------------------------------
# Forward / backward with custom VJP
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """Static kernel choices (hashable; a `nondiff_argnums` argument of the custom VJP)."""

    path: str  # forward path when not differentiated: "sorted", "combo", "dense" or "decode"
    grad_path: str  # forward + backward path under differentiation: "concat", "sorted", "combo", "dense", "decode"
    block_t: int
    block_k: int
    block_n: int
    block_n_tgmm: int
    block_k_decode: int
    block_n_decode: int
    block_t_dense: int
    block_c_dense: int
    block_k_dense: int
    block_t_combo: int
    block_n_combo: int
    interpret: bool
    poison: bool
    has_base: bool


def _sorted_forward(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg, combo):
    """The sorted (combo=False) or combo path's output [T, d_out] and the backward's residuals: the
    plan, the pair rows' coefficients, the unscaled xa [pair rows, R] and the combo plan (or None)."""
    num_tokens = x.shape[0]
    num_adapters, _, rank = lora_a.shape
    plan = _routing_plan(expert_idx, num_adapters, cfg.block_t)
    coef = _row_coef(plan, expert_weight, scaling, cfg.block_t)
    xa = _shrink(plan, x, lora_a, rank=rank, transpose_w=False, block_t=cfg.block_t, block_k=cfg.block_k,
                 interpret=cfg.interpret)
    cplan = _combo_plan(plan, coef, expert_idx, num_adapters, cfg.block_t_combo) if combo else None
    out = _expand_any(plan, cplan, coef, xa, lora_b, num_tokens=num_tokens, width=lora_b.shape[2], rank=rank,
                      transpose_w=False, out_dtype=x.dtype, cfg=cfg, base=base if cfg.has_base else None)
    return out, plan, coef, xa, cplan


def _expand_any(plan, cplan, coef, xa, w, *, cfg, **kw):
    """The sorted expand (a pass per slot) or, with a combo plan, the combo expand (one pass)."""
    if cplan is None:
        return _expand(plan, coef, xa, w, block_t=cfg.block_t, block_n=cfg.block_n, interpret=cfg.interpret,
                       poison=cfg.poison, **kw)
    return _combo_expand(cplan, xa, w, block_t=cfg.block_t_combo, block_n=cfg.block_n_combo,
                         interpret=cfg.interpret, poison=cfg.poison, **kw)


def _primal(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg):
    kw = dict(interpret=cfg.interpret, base=base if cfg.has_base else None, poison=cfg.poison)
    if cfg.path == "decode":
        return _forward_decode(x, lora_a, lora_b, scaling, expert_idx, expert_weight,
                               block_k=cfg.block_k_decode, block_n=cfg.block_n_decode, **kw)[0]
    if cfg.path == "dense":
        return _dense_forward(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg)[0]
    return _sorted_forward(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg,
                           combo=cfg.path == "combo")[0]


_grouped_lora = jax.custom_vjp(_primal, nondiff_argnums=(7,))


def _fwd(x, lora_a, lora_b, scaling, expert_idx, expert_weight, base, cfg):
    # symbolic_zeros=True: every argument arrives as CustomVJPPrimal(value, perturbed). Which
    # gradients are needed is kept in the residuals' tree structure (dict keys), not as data.
    perturbed = {"x": x.perturbed, "a": lora_a.perturbed, "b": lora_b.perturbed,
                 "s": scaling.perturbed, "w": expert_weight.perturbed,
                 "base": base.perturbed and cfg.has_base}
    xv, av, bv, sv, iv, wv, basev = (arg.value for arg in
                                     (x, lora_a, lora_b, scaling, expert_idx, expert_weight, base))
    need = {name: None for name, p in perturbed.items() if p}
    if cfg.grad_path == "concat":
        return _concat_fwd(xv, av, bv, sv, iv, wv, basev, cfg, need)
    if cfg.grad_path == "dense":
        out, xa = _dense_forward(xv, av, bv, sv, iv, wv, basev, cfg)
        res = dict(xa=xa, a=av, b=bv, s=sv, idx=iv, w=wv, need=need)
    elif cfg.grad_path == "decode":
        out, part = _forward_decode(xv, av, bv, sv, iv, wv, block_k=cfg.block_k_decode,
                                    block_n=cfg.block_n_decode, interpret=cfg.interpret,
                                    base=basev if cfg.has_base else None, poison=cfg.poison)
        res = dict(part=part, a=av, b=bv, s=sv, idx=iv, w=wv, need=need)
    else:  # sorted or combo
        out, plan, coef, xa, cplan = _sorted_forward(xv, av, bv, sv, iv, wv, basev, cfg,
                                                     combo=cfg.grad_path == "combo")
        res = dict(plan=plan, coef=coef, xa=xa, cplan=cplan, a=av, b=bv, s=sv, idx=iv, w=wv, need=need)
    if perturbed["a"]:
        res["x"] = xv
    return out, res


def _bwd(cfg, res, g):
    need = set(res["need"])
    if isinstance(g, SymbolicZero) or not need:
        return (None,) * 7
    if cfg.grad_path == "concat":
        dx, da, db, ds, dw = _concat_bwd(res, g, need)
        return dx, da, db, ds, None, dw, (g.astype(res["a_cat"].dtype) if "base" in need else None)
    dtype = res["a"].dtype  # == x.dtype (the wrapper casts the LoRAs to x's dtype)
    g = g.astype(dtype)
    if cfg.grad_path in ("dense", "decode"):
        backward = _dense_backward if cfg.grad_path == "dense" else _decode_backward
        dx, da, db, ds, dw = backward(cfg, res, g, need)
        return dx, da, db, ds, None, dw, (g if "base" in need else None)
    lora_a, lora_b, scaling, expert_idx, expert_weight = res["a"], res["b"], res["s"], res["idx"], res["w"]
    plan, coef, xa = res["plan"], res["coef"], res["xa"]
    num_adapters, depth, rank = lora_a.shape
    num_tokens, top_k = expert_idx.shape
    dx = da = db = ds = dw = None
    if need & {"x", "a", "s", "w"}:
        gb = _shrink(plan, g, lora_b, rank=rank, transpose_w=True, block_t=cfg.block_t, block_k=cfg.block_k,
                     interpret=cfg.interpret)  # [rows, R] f32: g[rows] @ B[e]^T
        if "x" in need:
            dx = _expand_any(plan, res["cplan"], coef, gb, lora_a, num_tokens=num_tokens, width=depth,
                             rank=rank, transpose_w=True, out_dtype=dtype, cfg=cfg)
        if "a" in need:
            da = _tgmm(plan, res["x"], gb * coef[:, None], num_adapters=num_adapters, rank=rank,
                       out_dtype=dtype, block_t=cfg.block_t, block_n=cfg.block_n_tgmm,
                       interpret=cfg.interpret, poison=cfg.poison)
        if need & {"s", "w"}:
            raw = jnp.sum(xa * gb, axis=-1)  # [rows]: <xa, gB> per padded row
            num_rows = plan.rows.shape[0]
            slot = jnp.arange(num_rows, dtype=jnp.int32) // (num_rows // top_k)
            raw = jnp.zeros((num_tokens, top_k), jnp.float32).at[plan.rows, slot].set(raw, mode="drop")
            ds, dw = _routing_grads(raw, expert_idx, expert_weight, scaling, need)
    if "b" in need:
        dbt = _tgmm(plan, g, xa * coef[:, None], num_adapters=num_adapters, rank=rank, out_dtype=dtype,
                    block_t=cfg.block_t, block_n=cfg.block_n_tgmm, interpret=cfg.interpret,
                    poison=cfg.poison)  # [L, d_out, r]
        db = jnp.swapaxes(dbt, 1, 2)
    dbase = g if "base" in need else None
    return dx, da, db, ds, None, dw, dbase


_grouped_lora.defvjp(_fwd, _bwd, symbolic_zeros=True)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------

# Path choice, measured on an H100 (docs/benchmarks.md, "## grouped_lora kernel": bf16, L = 28, k = 2,
# d 4096 -> 4096 and 4096 -> 14336; v1 run and the v2 run of the dense path).
# * Forward (layer with the base fused, not differentiated): decode for T <= 32, sorted above.
#   v2 run, T = 16: decode 0.0259 / 0.0312 / 0.0554 / 0.0686 ms vs dense 0.0306 / 0.0541 / 0.0602 /
#   0.0917 vs sorted 0.0483 / 0.0560 / 0.0796 / 0.0939 (d_out 4096 r 8, 4096 r 64, 14336 r 8,
#   14336 r 64). T = 256: sorted 0.0643 / 0.0765 / 0.1028 / 0.1317 vs dense 0.0660 / 0.1514 / 0.1044 /
#   0.2147 vs decode 0.0672 / 0.1074 / 0.1264 / 0.2257. T >= 4096: sorted, dense 1.2-4.2x slower.
# * Under differentiation (forward + backward of the delta, gradients for x and expert_weight), measured
#   on an H200 (docs/benchmarks.md, "H200 run (session 10)"): "concat" (four
#   XLA GEMMs over every adapter side by side, bf16 operands) while T * L * r <= 2^22, sorted above.
#   Its flops grow with L*r where the sorted path's grow with k*r, so the crossover falls with r:
#   concat won every row up to T * L * r = 16384 * 224 = 3.7M (r 8, T 16384: 0.266 / 0.515 ms vs
#   sorted 0.399 / 0.823 at d_out 4096 / 14336; r 16, T 4096: 0.123 / 0.233 vs 0.154 / 0.315; r 64,
#   T 256: 0.069 / 0.095 vs 0.083 / 0.184), sorted every row from 7.3M up (r 16, T 16384: 0.395 /
#   0.830 vs 0.427 / 0.860; r 64, T 4096: 0.209 / 0.402 vs 0.380 / 0.807). One exception below the
#   bound: T = 1, r = 64, d_out 4096 (sorted 0.042 vs 0.052; at d_out 14336 concat won, 0.062 vs 0.072).
#   Up to 16 tokens the decode path's own backward beats concat (session 11, H200, f+b in ms, d_out 4096
#   / 14336; docs/benchmarks.md, "H200 run (session 11)"): T = 1, r = 8: 0.0075 / 0.0081 vs 0.0138 /
#   0.0149; r = 64: 0.0101 / 0.0113 vs 0.0521 / 0.0623; T = 16, r = 8: 0.0096 / 0.0137 vs 0.0163 /
#   0.0189; r = 64: 0.0235 / 0.0416 vs 0.0389 / 0.0577 (decode with 128 shrink programs; 256, as
#   committed: 0.0192 / 0.0381). At T = 32 it won at d_out 4096 and lost at
#   14336 (0.0275 vs 0.0264 at r = 16, 0.0763 vs 0.0615 at r = 64); at T = 256 it lost by 1.4-2.4x:
#   each (token, slot) pair reads its adapter's weights again.
# * Decode tiles (`decode_block_k`): with 16 or more pairs, 512-wide depth chunks (fewer serial
#   chunks per program); T = 16, d_out 4096, r = 8: layer 0.0186 vs 0.0225 ms at 128, f+b 0.0096 vs
#   0.0138. At one token, chunks of at most 8192 elements: r = 64 at 128 (layer 0.0178 vs 0.0193 at 512).
# * Combo (session 12, H200, docs/benchmarks.md "H200 run (session 12)"; ms, d_out 4096 / 14336):
#   T = 16384, f+b: r 16: 0.304 / 0.597 vs sorted 0.394 / 0.826; r 64: 0.494 / 0.994 vs 0.532 / 1.127
#   (r 8: concat stays, 0.267 / 0.515 vs 0.331 / 0.608). Layer: r 8: 0.885 / 2.813 vs sorted 0.903 /
#   2.993; r 16: 0.873 / 2.807 vs 0.896 / 2.999; r 64: 0.961 / 3.019 vs 0.961 / 3.135. At T = 4096
#   the combo plan's XLA passes (~10 us) outweigh the saved slot pass: f+b r 64 0.225 vs sorted
#   0.208, layer r 8 / 16 / 64 0.286 / 0.287 / 0.311 vs 0.267 / 0.268 / 0.289 (d_out 4096; at d_out
#   14336, r 16 combo won the layer, 0.787 vs 0.807). The 8192 crossover lies between the measured
#   4096 and 16384. Blocks: 64 tokens x 256 columns (r 64 f+b: 0.494 vs 0.541 at 32 x 128).
# * Launch parameters (session 13, H200, docs/benchmarks.md "H200 run (session 13)"; ms, d_out 4096 /
#   14336). The sorted shrink's depth tile `block_k`: 128 below COMBO_MIN_TOKENS, 64 from there up.
#   At T = 4096 its grid holds 2 * (64 + 28) tiles, under two waves, and the longer tile keeps more
#   bytes in flight: r = 64 f+b 0.1945 / 0.368 vs 0.2127 / 0.4063; layer r = 8 0.2579 / 0.7914 vs
#   0.2684 / 0.8037, r = 64 0.2833 / 0.8455 vs 0.2912 / 0.8537; T = 256 layer r = 16 0.0524 vs 0.0598.
#   At T = 16384 (568 tiles) it lost: combo f+b r = 16 0.3262 vs 0.2981 (shrink 64 vs 51 us).
#   The combo expand pipelines 3 stages (2 before): f+b r = 16 0.2896 / 0.5569 vs 0.2997 / 0.5797,
#   layer 0.867 / 2.7935 vs 0.8754 / 2.816 at T = 16384.
DECODE_MAX_TOKENS = 32
DECODE_GRAD_MAX_TOKENS = 16
CONCAT_GRAD_MAX_WORK = 1 << 22  # T * L * r
COMBO_MIN_TOKENS = 8192


def auto_path(num_tokens, rank, num_adapters=28):
    """Forward path when not differentiated."""
    del rank, num_adapters  # no measured dependence on them
    if num_tokens <= DECODE_MAX_TOKENS:
        return "decode"
    return "combo" if num_tokens >= COMBO_MIN_TOKENS else "sorted"


def auto_grad_path(num_tokens, rank, num_adapters=28):
    """Forward + backward path under differentiation."""
    if num_tokens <= DECODE_GRAD_MAX_TOKENS:
        return "decode"
    if num_tokens * num_adapters * rank <= CONCAT_GRAD_MAX_WORK:
        return "concat"
    return "combo" if num_tokens >= COMBO_MIN_TOKENS else "sorted"


def decode_block_k(num_tokens, top_k, rank):
    """Depth chunk of the decode kernels' split-K vector products (see the measurements above)."""
    if num_tokens * top_k >= 16:
        return min(512, 32768 // _pow2_at_least(rank))  # r = 128 (never timed): 256, as a register bound
    return min(512, max(128, 8192 // _pow2_at_least(rank)))


def default_config(num_tokens, top_k, num_adapters, rank, *, path="auto", interpret=None, poison=False,
                   has_base=False, **blocks):
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if path == "auto":
        path, grad_path = auto_path(num_tokens, rank, num_adapters), auto_grad_path(num_tokens, rank, num_adapters)
    elif path not in ("sorted", "combo", "decode", "dense"):
        raise ValueError(f"path must be 'auto', 'sorted', 'combo', 'dense' or 'decode', got {path!r}")
    else:  # an explicit path is also the path differentiated through
        grad_path = path
    # Token tile: 64 when adapters average >= 64 pairs, else smaller to cut padding (>= 16 for dots).
    per_adapter = num_tokens * top_k / max(num_adapters, 1)
    block_t = 64 if per_adapter >= 64 else (32 if per_adapter >= 24 else 16)
    # Depth tile of the sorted shrink: 128 below the combo range, where its grid is small (see above).
    block_k = 64 if num_tokens >= COMBO_MIN_TOKENS or path == "dense" else 128
    cfg = dict(path=path, grad_path=grad_path, block_t=block_t, block_k=block_k, block_n=128, block_n_tgmm=64,
               block_k_decode=decode_block_k(num_tokens, top_k, rank),
               block_n_decode=256, block_t_dense=64, block_c_dense=256, block_k_dense=64,
               block_t_combo=64, block_n_combo=256,
               interpret=bool(interpret),
               poison=bool(poison), has_base=bool(has_base))
    unknown = set(blocks) - set(cfg)
    if unknown:
        raise ValueError(f"unknown kernel options {sorted(unknown)}")
    cfg.update(blocks)
    for name in ("block_t", "block_k", "block_n", "block_n_tgmm", "block_t_dense", "block_c_dense",
                 "block_k_dense", "block_t_combo", "block_n_combo"):
        if cfg[name] < 16 or cfg[name] & (cfg[name] - 1):
            raise ValueError(f"{name}={cfg[name]} must be a power of two >= 16 (Triton dot tiles)")
    return Config(**cfg)


def grouped_lora_pallas(
    x: jax.Array,  # [T, d_in]
    lora_a: jax.Array,  # [L, d_in, r]
    lora_b: jax.Array,  # [L, r, d_out]
    scaling: jax.Array,  # [L]
    expert_idx: jax.Array,  # [T, k] int32
    expert_weight: jax.Array,  # [T, k]
    *,
    path: str = "auto",
    base: jax.Array | None = None,  # [T, d_out]
    interpret: bool | None = None,
    poison: bool = False,
    **blocks,
) -> jax.Array:  # [T, d_out], x.dtype
    """Pallas routed grouped low-rank product; differentiable (custom VJP, see module docstring).

    base: optional [T, d_out] added in the kernel's epilogue (out = base + delta; the layer's
    x @ kernel), which saves a separate read-add-write pass over the output.
    path: "sorted", "combo", "dense", "decode" or "auto" (`auto_path` when not differentiated, `auto_grad_path`
    under differentiation); an explicit path is also the one differentiated through. interpret:
    defaults to True on CPU. poison (tests): outputs start as NaN so unwritten elements show.
    blocks: block_t, block_k, block_n, block_n_tgmm, block_k_decode, block_n_decode, block_t_dense,
    block_c_dense, block_k_dense, block_t_combo, block_n_combo.
    """
    num_tokens = x.shape[0]
    num_adapters, _, rank = lora_a.shape
    if not 1 <= rank <= 128:
        raise ValueError(f"rank r={rank} must be in [1, 128]")
    if num_tokens == 0 or num_adapters == 0 or expert_idx.shape[1] == 0:
        delta = jnp.zeros((num_tokens, lora_b.shape[2]), x.dtype)
        return delta if base is None else (base + delta).astype(x.dtype)
    if base is not None and base.shape != (num_tokens, lora_b.shape[2]):
        raise ValueError(f"base must be [T, d_out]=[{num_tokens}, {lora_b.shape[2]}], got {base.shape}")
    lora_a = lora_a.astype(x.dtype)
    lora_b = lora_b.astype(x.dtype)
    cfg = default_config(num_tokens, expert_idx.shape[1], num_adapters, rank, path=path, interpret=interpret,
                         poison=poison, has_base=base is not None, **blocks)
    base_arg = jnp.zeros((0,), x.dtype) if base is None else base.astype(x.dtype)
    return _grouped_lora(x, lora_a, lora_b, scaling, expert_idx.astype(jnp.int32), expert_weight, base_arg, cfg)
