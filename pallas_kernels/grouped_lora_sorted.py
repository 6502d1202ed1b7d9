"""Kernels of the sorted and combo paths of `grouped_lora_pallas` (module docstring there), over the
tiles of `grouped_lora_plan`:

* `shrink`: one program per tile (and part of the depth, with few tiles), x[rows] @ lora_a[e] (or
  g[rows] @ lora_b[e]^T) -> the pairs' low-rank rows [tiles*bt, R] float32;
* `expand`: once per slot, (xa * coef) @ lora_b[e] scattered by row into the output;
* `combo_expand`: one pass over the output for all k slots (for dx, also each pair's <xa, gB>);
* `tgmm`: the per-adapter transposed products of dA / dB (MixLoRA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.pallas_common import (
    OUT_OF_RANGE,
    cdiv,
    compiler_params,
    depth_splits,
    dot_precision,
    masked_load,
    masked_store,
    pow2_at_least,
    without_aliased_input,
)


# The shrink's programs stream the whole depth. With fewer tiles than SMs (T = 256: 88 tiles, about
# 60 of them non-empty) a program's chain of depth chunks is the launch's time, so the depth is split
# until the grid holds SHRINK_MIN_PROGRAMS programs; XLA adds the splits' float32 partial sums
# afterwards (deterministic, unlike atomics). Session 19, H200, f+b of the sorted path at T = 256,
# 4 splits: d_out 4096, r 64 61.2 -> 52.8 us, r 8 47.9 -> 38.8; d_out 14336, r 64 130.9 -> 94.2 (the
# shrink over g, depth 14336: 56.3 -> 22.9), r 16 73.6 -> 52.8. From one wave of tiles up, only at
# R <= 16: at T = 4096 (184 tiles) 2 splits took the r 16 combo f+b from 98.1 to 92.0 us but the r 64
# one from 177.8 to 186.5 (its two shrinks took 31.5 + 29.3 against 28.9 + 28.6, and the sum 5.5).
# The expands adding the parts as they load them, with no sum launch (session 20): every expand program
# then loads S tiles of parts, f+b at T 256, r 64, d_out 4096 54.1 -> 61.1 us, T 1024 78.4 -> 102.4. So
# only two parts, and only into a combo expand over at most COMBO_PARTS_MAX_COLUMN_BLOCKS column blocks
# (`keep_parts`; session 25, H200, T 4096, r 16: f+b at d_out 4096 88.5 -> 86.2 us; at d_out 14336 the
# forward expand, 56 column blocks, took 2.9 us more, the sum it saved 2.0).
# Tried and dropped (session 23): from one wave of tiles up, a tile's rows split over two programs
# instead of its depth, so no sum: at T 4096, r 16 the shrinks took 23.7 / 19.3 us against 17.9 + 1.8 /
# 13.6 + 1.9 (d_out 4096) and 23.3 / 66.8 against 17.9 + 1.8 / 49.4 + 1.7 (14336); f+b 1.585 -> 1.766 of
# LoRA's at d_out 14336. And (session 24) two parts added atomically into one zeroed output (still
# deterministic with two): XLA's zero fill (1.5-1.9 us) and the atomic stores cost more than the two
# sums saved (f+b at T 4096, r 16, d_out 14336: 164-166 -> 167 us).
SHRINK_MIN_PROGRAMS = 264  # two per SM of an H100 / H200
SHRINK_ONE_WAVE = 132  # SMs of an H100 / H200
SHRINK_SPLIT_MAX_RANK = 16  # from one wave of tiles up, split only up to this R
COMBO_PARTS_MAX_COLUMN_BLOCKS = 16  # a combo expand adds two kept parts itself up to this many (see above)


def combo_expand_adds_parts(width, block_n):
    """Whether a combo expand over `width` columns (in blocks of block_n) adds a shrink's two depth parts
    itself, so the shrink keeps them (`shrink`'s keep_parts; see above)."""
    return cdiv(width, block_n) <= COMBO_PARTS_MAX_COLUMN_BLOCKS


def shrink_splits(num_tiles, depth, block_k, rank_p):
    """How many parts the shrink splits the depth into: doubled while the grid holds fewer than
    SHRINK_MIN_PROGRAMS programs and every part keeps at least one depth chunk (see above)."""
    if num_tiles >= SHRINK_ONE_WAVE and rank_p > SHRINK_SPLIT_MAX_RANK:
        return 1
    chunks = cdiv(depth, block_k)
    return cdiv(chunks, cdiv(chunks, depth_splits(chunks, num_tiles, SHRINK_MIN_PROGRAMS)))  # no empty part


# Tried and dropped four times (H200, docs/benchmarks.md, sessions 13, 20, 22 and 23): a shrink over the
# combo plan's token tiles that reads each token's row once for all its k slots. This shrink is not
# bound by reading x twice: at T 16384, d 4096, r 16 it covers both slots in 51 us, 256 MiB of rows at
# 5.3 TB/s (part of the second read comes from L2). Session 13, one program per (tile, group of 4 of
# its adapters), M accumulators: 70 us. Session 20, one program per tile looping over all its
# adapters, one accumulator per slot, the pairs' rows scattered into this layout: 200-219 us (and
# 47.7-56.2 against 18.0 at T 4096). Session 22, 64-token tiles split over the depth, each depth step
# multiplying the token rows by a group of the tile's adapters: correct, and slower again (T 4096,
# r 16; x @ A / g @ B^T at d_out 14336 in us, against the sorted shrink's 18.2 / 47.6). The group as
# one [64, chunk] x [chunk, 128] product, its weight columns gathered by a per-column adapter index:
# 245 / 277 (at r 64 the f+b took 4.6 ms). Four scalar-indexed [chunk, 16] tiles and four products:
# 34.7 / 90.9; eight: 38.9 / 104.3. Session 23: the group's scalar-indexed tiles put side by side in
# registers (pairs joined on a new minor axis, `jnp.stack`, and reshaped; the one join Triton has), one
# product per step: 4 tiles 74.4 / 216.1, 8 tiles 219.9 / 374.7. Session 26 bounded the other way, an
# L2 hit on the second read: at d_out 14336, T 4096, r 16 g @ B^T takes 47.1 us (34.4 for one slot's
# tiles); even with a routing that puts the same tokens in slot 0's and slot 1's tile j, and the slots'
# tiles interleaved, it takes 41.5.


def _shrink_kernel(tile_expert_ref, rows_ref, x_ref, w_ref, out_ref, *, block_t, block_k, chunks, num_rows,
                   num_tokens, num_adapters, depth, rank, rank_p, transpose_w, precision):
    i, split = pl.program_id(0), pl.program_id(1)
    e = tile_expert_ref[i]
    at = pl.ds(split * num_rows + i * block_t, block_t)

    @pl.when(e < num_adapters)
    def _compute():
        rows = rows_ref[pl.ds(i * block_t, block_t)]
        valid = rows < num_tokens
        rk = jnp.arange(rank_p, dtype=jnp.int32)

        def body(kk, acc):
            cols = (split * chunks + kk) * block_k + jnp.arange(block_k, dtype=jnp.int32)
            in_k = cols < depth
            xk = masked_load(x_ref, (rows[:, None], cols[None, :]), valid[:, None] & in_k[None, :])
            wmask = in_k[:, None] & (rk < rank)[None, :]
            if transpose_w:  # w_ref [L, r, depth]
                wk = masked_load(w_ref, (e, rk[None, :], cols[:, None]), wmask)
            else:  # w_ref [L, depth, r]
                wk = masked_load(w_ref, (e, cols[:, None], rk[None, :]), wmask)
            return acc + jnp.dot(xk, wk.astype(xk.dtype), preferred_element_type=jnp.float32,
                                 precision=precision)

        acc = lax.fori_loop(0, chunks, body, jnp.zeros((block_t, rank_p), jnp.float32))
        out_ref[at, :] = acc

    @pl.when(e >= num_adapters)
    def _empty():
        out_ref[at, :] = jnp.zeros((block_t, rank_p), jnp.float32)


def shrink(plan, x, w, *, rank, transpose_w, block_t, block_k, interpret, num_warps=4, num_stages=3, splits=None,
           keep_parts=False):
    """x [T, D] and w [L, D, r] (or [L, r, D] with transpose_w) -> [k*nts*bt, R] float32. splits: parts of
    the depth (default `shrink_splits`). keep_parts: a depth split in two comes back as its two parts,
    [2*k*nts*bt, R], unsummed, for a `combo_expand` that adds them as it loads them (see above)."""
    num_tokens, depth = x.shape
    num_adapters = w.shape[0]
    rank_p = pow2_at_least(rank)
    num_rows = plan.rows.shape[0]
    if splits is None:
        splits = shrink_splits(num_rows // block_t, depth, block_k, rank_p)
    chunks = cdiv(cdiv(depth, block_k), splits)
    kernel = functools.partial(
        _shrink_kernel, block_t=block_t, block_k=block_k, chunks=chunks, num_rows=num_rows, num_tokens=num_tokens,
        num_adapters=num_adapters, depth=depth, rank=rank, rank_p=rank_p, transpose_w=transpose_w,
        precision=dot_precision(x.dtype))
    parts = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits * num_rows, rank_p), jnp.float32),
        grid=(num_rows // block_t, splits),
        interpret=interpret,
        compiler_params=compiler_params(num_warps, num_stages),
        name="grouped_lora_shrink",
    )(plan.tile_expert, plan.rows, x, w)
    return parts if keep_parts and splits == 2 else summed_parts(parts, num_rows)


def summed_parts(xa, num_rows):
    """A shrink's output, xa [S*num_rows, R] (S depth parts, S = 1 when summed) -> [num_rows, R]."""
    splits = xa.shape[0] // num_rows
    return xa if splits == 1 else jnp.sum(xa.reshape(splits, num_rows, xa.shape[1]), axis=0)


def _pair_dots_inputs(dots_with, scaling):
    """The dots mode of an expand asked for each pair's <xa, dots_with> (None, "raw" or "scaled" by
    scaling[e]) and the two inputs its kernel takes for them: dots_with and the scalings (a one-element
    placeholder when raw, never read)."""
    if dots_with is None:
        return None, []
    scale = jnp.ones((1,), jnp.float32) if scaling is None else scaling.astype(jnp.float32)
    return ("raw" if scaling is None else "scaled"), [dots_with, scale]


def _expand_kernel(tile_expert_ref, rows_ref, coef_ref, xa_ref, w_ref, *rest, slot, tiles_slot, top_k,
                   block_t, block_n, num_tokens, num_adapters, width, rank, rank_p, transpose_w,
                   accumulate, dots, precision):
    # rest: [expert_idx, the other rows, the scalings] (dots), [the buffer out starts as], [the one dots
    # start as], then out [and dots]. The buffers are aliased to the outputs; only a previous sum is read.
    outs = rest[-1:] if dots is None else rest[-2:]
    ins = rest[:len(rest) - len(outs)]
    if dots is not None:
        idx_ref, other_ref, scale_ref, *ins = ins
    prev_ref = ins[0] if accumulate else None
    out_ref, dots_ref = outs[0], (None if dots is None else outs[1])
    tile = slot * tiles_slot + pl.program_id(0)
    n = pl.program_id(1)  # program ids are read outside pl.when (interpret mode needs that)
    e = tile_expert_ref[tile]

    @pl.when(e < num_adapters)
    def _compute():
        rows = rows_ref[pl.ds(tile * block_t, block_t)]
        valid = rows < num_tokens
        coef = coef_ref[pl.ds(tile * block_t, block_t)]
        raw = xa_ref[pl.ds(tile * block_t, block_t), :]
        xa = (raw * coef[:, None]).astype(w_ref.dtype)
        if dots is not None:
            @pl.when(n == 0)
            def _pair_dots():  # <xa, other> of the tile's pairs, times scaling[e] if asked, into [T, k]
                dot = jnp.sum(raw * other_ref[pl.ds(tile * block_t, block_t), :], axis=1)
                if dots == "scaled":
                    dot = dot * scale_ref[e]
                # The plan's blocks hold each token's adapters in ascending order, not expert_idx's slot
                # order: a row goes to every slot j that chose e (an adapter in two slots gets the same
                # value in both). Rows not stored point past the end (OUT_OF_RANGE).
                for j in range(top_k):
                    at = rows * top_k + j
                    mine = valid & (masked_load(idx_ref, (at,), valid) == e)
                    masked_store(dots_ref, jnp.where(mine, at, OUT_OF_RANGE), dot, mine)
        rk = jnp.arange(rank_p, dtype=jnp.int32)
        cols = n * block_n + jnp.arange(block_n, dtype=jnp.int32)
        in_n = cols < width
        wmask = (rk < rank)[:, None] & in_n[None, :]
        if transpose_w:  # w_ref [L, width, r]
            wt = masked_load(w_ref, (e, cols[None, :], rk[:, None]), wmask)
        else:  # w_ref [L, r, width]
            wt = masked_load(w_ref, (e, rk[:, None], cols[None, :]), wmask)
        y = jnp.dot(xa, wt, preferred_element_type=jnp.float32, precision=precision)
        idx = (rows[:, None], cols[None, :])
        mask = valid[:, None] & in_n[None, :]
        if accumulate:
            y = y + masked_load(prev_ref, idx, mask).astype(jnp.float32)
        masked_store(out_ref, idx, y.astype(out_ref.dtype), mask)


def expand(plan, coef, xa, w, *, num_tokens, width, rank, transpose_w, out_dtype, block_t, block_n,
           interpret, base=None, poison=False, dots_with=None, expert_idx=None, scaling=None, num_warps=4,
           num_stages=2):
    """[base +] sum over slots of (xa * coef) @ w[e] scattered to rows -> [T, width]; a launch per slot.

    dots_with [rows, R] float32 (and expert_idx [T, k]): also return each (token, slot) pair's
    <xa, dots_with> [T, k] float32 (with scaling [L], times scaling[e]), from each slot launch's first
    column block, as `combo_expand` does. In the backward this replaced XLA's gather + reduction and
    multiply (H200, session 23, r 64: f+b 52.6 -> 49.2 us at T 256, d_out 4096; 91.0 -> 87.1 at d_out
    14336; 111.6 -> 108.5 at T 2048)."""
    num_adapters = w.shape[0]
    rank_p = xa.shape[1]
    top_k = plan.tile_start.shape[0]
    tiles_slot = plan.tile_expert.shape[0] // top_k
    dots, dots_inputs = _pair_dots_inputs(dots_with, scaling)
    out = base
    if poison and base is None:
        out = jnp.full((num_tokens, width), jnp.nan, out_dtype)
    pair_dots = jnp.full((num_tokens * top_k,), jnp.nan, jnp.float32) if poison and dots is not None else None
    for slot in range(top_k):
        accumulate = slot > 0 or base is not None
        kernel = functools.partial(
            _expand_kernel, slot=slot, tiles_slot=tiles_slot, top_k=top_k, block_t=block_t, block_n=block_n,
            num_tokens=num_tokens, num_adapters=num_adapters, width=width, rank=rank, rank_p=rank_p,
            transpose_w=transpose_w, accumulate=accumulate, dots=dots, precision=dot_precision(w.dtype))
        args = [plan.tile_expert, plan.rows, coef, xa, w]
        if dots is not None:
            args += [expert_idx.reshape(-1), *dots_inputs]
        out_shape = jax.ShapeDtypeStruct((num_tokens, width), out_dtype)
        aliases = {}
        if out is not None:  # previous slot's sum (read when accumulating), or the poisoned buffer
            args.append(out)
            aliases[len(args) - 1] = 0
        if dots is not None:
            out_shape = (out_shape, jax.ShapeDtypeStruct((num_tokens * top_k,), jnp.float32))
            if pair_dots is not None:  # earlier slots' columns (or the poisoned buffer), kept in place
                args.append(pair_dots)
                aliases[len(args) - 1] = 1
        result = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(tiles_slot, cdiv(width, block_n)),
            input_output_aliases=aliases,
            interpret=interpret,
            compiler_params=compiler_params(num_warps, num_stages),
            name="grouped_lora_expand",
        )(*args)
        out, pair_dots = (result, None) if dots is None else result
    return out if dots is None else (out, pair_dots.reshape(num_tokens, top_k))


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
            m = masked_load(mat_ref, (rows[None, :], cols[:, None]), valid[None, :] & in_n[:, None])  # [bn, bt]
            c = cmp_ref[pl.ds(tile * block_t, block_t), :].astype(m.dtype)  # [bt, R]
            return acc + jnp.dot(m, c, preferred_element_type=jnp.float32, precision=precision)

        acc = lax.fori_loop(0, num_tiles_ref[slot, e], body, acc)
    masked_store(out_ref, (e, cols[:, None], rk[None, :]), acc.astype(out_ref.dtype),
                 in_n[:, None] & (rk < rank)[None, :])


def tgmm(plan, mat, cmp, *, num_adapters, rank, out_dtype, block_t, block_n, interpret, poison=False,
         num_warps=4, num_stages=2):
    """out[e] = mat[rows of e]^T @ cmp[rows of e]: mat [T, W], cmp [k*nts*bt, R] -> [L, W, r]."""
    num_tokens, width = mat.shape
    top_k = plan.tile_start.shape[0]
    kernel = functools.partial(
        _tgmm_kernel, top_k=top_k, block_t=block_t, block_n=block_n, num_tokens=num_tokens, width=width,
        rank=rank, rank_p=cmp.shape[1], precision=dot_precision(mat.dtype))
    args = [plan.tile_start, plan.num_tiles, plan.rows, mat, cmp]
    aliases = {}
    if poison:
        args.append(jnp.full((num_adapters, width, rank), jnp.nan, out_dtype))
        aliases = {len(args) - 1: 0}
        kernel = without_aliased_input(kernel)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_adapters, width, rank), out_dtype),
        grid=(num_adapters, cdiv(width, block_n)),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=compiler_params(num_warps, num_stages),
        name="grouped_lora_tgmm",
    )(*args)


# ------------------------------------------------------------------------------------------------
# Combo expand (the sorted path's shrinks, one output pass for all k slots)
# ------------------------------------------------------------------------------------------------
#
# The sorted expand runs once per slot, so every slot after the first reads, adds to and writes the
# whole [T, W] output again: at T = 16384, d_out 4096 the second slot's pass takes 85 us against the
# first's 51 (session 11). The combo expand writes each output row once. Tokens are ordered by the
# set of adapters they chose (smallest, then the next, ...), so a tile of bt neighbouring tokens uses
# only a few of the L adapters. Ordered by slot instead (slot 0's adapter, then slot 1's), a tile
# spread {3, 7} and {7, 3} apart: session 19, H200, d_out 4096, r 16, 32-token tiles, adapters per
# tile / expand time, by slot -> by set: T 16384 2.60 -> 2.36, 62.5 -> 59.6 us; T 4096 5.34 -> 4.02,
# 23.9 -> 21.3 us; r 64, 64-token tiles, T 4096: 7.52 -> 5.47, 64.6 -> 52.4 us. Each program loops
# over its tile's adapters e:
#   out[t] = [base[t] +] sum_e (sum_j [idx[t, j] = e] coef[t, j] xa[pair(t, j)]) @ w[e]
# reading the low-rank rows xa that the sorted shrink left in its (token, slot) pair layout.
# Tried and dropped (session 16, H200, docs/benchmarks.md): stacking G of the tile's adapters into one
# product per step ([bt, G*R] x [G*R, bn], the weight rows gathered by a per-row adapter index, xa
# gathered per step). Even G = 1 took the two expands from 68 + 68 to 104 + 176 us (d_out 4096, r 16,
# T 16384), G = 4 to 276 + 650. Not profiled; the likely cause is the per-row index, which makes each
# weight tile a gather instead of a block load behind one scalar adapter index.
# Where the time goes (session 18, H200, r 16, T 16384, d_out 4096, 32-token tiles, 2.37 adapters per
# tile): 33.5 us with the loop cut to no step (the prologue and the stores alone), 51.2 with one step,
# 62.5 with all; stores to the tile's own rows instead of scattered ones saved 1 us. So each loop step
# costs about the same, whatever it computes: two steps' weight tiles loaded before their products took
# 67 us, three 79. Loading the step's weight tile once outside the loop (a wrong result, timing only)
# saved only 7 us, except where lora_a at r = 8 was read transposed (100 -> 56 us; `rank_padded` fixes
# that read). The adapter ids as one vector, below, saved 1-3 us.
# Tried and dropped (session 25, H200): each program finding its tile's adapters from its rows' adapters
# (a one-hot over the tile and a cumulative sum), instead of the combo plan's tiles launch (1.8-2.1 us).
# The expands got slower by more than that: at T 4096, r 16, d_out 14336 64.8 / 21.9 -> 68.6 / 22.5 us,
# at T 16384 218.9 -> 249.2; f+b +0.4 to +45 us on six rows. Since session 28 the plan's final radix
# pass marks each tile's adapters (`ComboPlan.present`) and each program takes its step's adapter from
# the marks in registers: that launch is gone and the expands' times stayed within their noise.


def _combo_expand_kernel(present_ref, rows_ref, pair_ref, idx_ref, coef_ref, xa_ref, w_ref, *rest,
                         top_k, block_t, block_n, num_tokens, num_adapters, width, rank, rank_p, transpose_w,
                         has_base, dots, precision, pair_rows):
    if dots is None:
        out_ref = rest[-1]
    else:  # rest: [base], the other rows, the pairs' scalings, out, dots
        other_ref, scale_ref, out_ref, dots_ref = rest[-4:]
    i = pl.program_id(0)
    n = pl.program_id(1)
    num_rows = rows_ref.shape[0]
    rows = rows_ref[pl.ds(i * block_t, block_t)]
    valid = rows < num_tokens
    rk = jnp.arange(rank_p, dtype=jnp.int32)
    cols = n * block_n + jnp.arange(block_n, dtype=jnp.int32)
    in_n = cols < width

    def pair_rows_of(ref, pair):  # the pairs' low-rank rows [bt, R]: the sum of ref's depth parts
        return sum(masked_load(ref, (part * pair_rows + pair[:, None], rk[None, :]), valid[:, None])
                   for part in range(ref.shape[0] // pair_rows))

    slots = []  # per slot: its adapter [bt], its pair row and its low-rank row [bt, R] (float32, unscaled)
    for j in range(top_k):
        at = pl.ds(j * num_rows + i * block_t, block_t)
        pair = pair_ref[at]
        xa = pair_rows_of(xa_ref, pair)
        slots.append((idx_ref[at], pair, coef_ref[at], xa))
    if dots is not None:
        @pl.when(n == 0)
        def _pair_dots():  # <xa, other> of each (token, slot) pair, times scaling[e] if asked: [T, k]
            for j, (sel, pair, _, xa) in enumerate(slots):
                other = pair_rows_of(other_ref, pair)
                dot = jnp.sum(xa * other, axis=1)
                if dots == "scaled":
                    dot = dot * masked_load(scale_ref, sel, valid)
                # Padding rows point past the end (OUT_OF_RANGE).
                masked_store(dots_ref, jnp.where(valid, rows * top_k + j, OUT_OF_RANGE), dot, valid)
    wmask = (rk < rank)[:, None] & in_n[None, :]
    # The tile's adapter marks as one vector, loaded with the prologue's other loads, so that no global
    # load sits between loop steps (the weight tile's address depends only on registers). Step u takes
    # the u-th marked adapter.
    lane = jnp.arange(pow2_at_least(num_adapters), dtype=jnp.int32)
    marked = masked_load(present_ref, (i * num_adapters + lane,), lane < num_adapters) > 0
    step_of = jnp.where(marked, jnp.cumsum(marked.astype(jnp.int32)) - 1, -1)  # [Lp]: -1 where unmarked
    weighted = [(sel, xa * coef[:, None]) for sel, _, coef, xa in slots]

    def body(u, acc):
        e = jnp.sum(jnp.where(step_of == u, lane, 0))
        # A token's slots hold distinct adapters, so at most one term is non-zero: the same bf16
        # rounding of xa * coef as the sorted expand.
        h = sum(jnp.where((sel == e)[:, None], xa, 0.0) for sel, xa in weighted).astype(w_ref.dtype)
        if transpose_w:  # w_ref [L, width, r]
            wt = masked_load(w_ref, (e, cols[None, :], rk[:, None]), wmask)
        else:  # w_ref [L, r, width]
            wt = masked_load(w_ref, (e, rk[:, None], cols[None, :]), wmask)
        return acc + jnp.dot(h, wt, preferred_element_type=jnp.float32, precision=precision)

    acc = lax.fori_loop(0, jnp.sum(marked.astype(jnp.int32)), body, jnp.zeros((block_t, block_n), jnp.float32))
    idx = (rows[:, None], cols[None, :])
    mask = valid[:, None] & in_n[None, :]
    if has_base:
        acc = acc + masked_load(rest[0], idx, mask).astype(jnp.float32)
    masked_store(out_ref, idx, acc.astype(out_ref.dtype), mask)


def combo_expand(cplan, xa, w, *, pair_rows, num_tokens, width, rank, transpose_w, out_dtype, block_t, block_n,
                 interpret, base=None, poison=False, dots_with=None, scaling=None, num_warps=4, num_stages=3):
    """[base +] sum_j coef[t, j] xa[pair(t, j)] @ w[idx[t, j]] -> [T, width], one pass over the output:
    xa [S*pair_rows, R] float32 (the sorted shrink's, its S depth parts summed here, S = 1 when summed
    already), w [L, r, width] (or [L, width, r] with transpose_w); every output row is written once.

    dots_with [S*pair_rows, R] float32 (parts as xa's): also return each (token, slot) pair's <xa, dots_with> [T, k]
    float32 (the backward's d expert_weight before scaling; with scaling [L], times scaling[e]),
    computed by the first column block's programs from the rows they load anyway. In the backward this
    replaced XLA's gather + reduction and multiply (2.4 + 1.6 us; H200, session 22, T 4096-16384: f+b
    3.8-4.0 us less, the dx expand's own time unchanged)."""
    num_adapters = w.shape[0]
    num_rows = cplan.rows.shape[0]
    top_k = cplan.idx.shape[0] // num_rows
    dots, dots_inputs = _pair_dots_inputs(dots_with, scaling)
    kernel = functools.partial(
        _combo_expand_kernel, top_k=top_k, block_t=block_t, block_n=block_n, num_tokens=num_tokens,
        num_adapters=num_adapters, width=width, rank=rank, rank_p=xa.shape[1], transpose_w=transpose_w,
        has_base=base is not None, dots=dots, precision=dot_precision(w.dtype), pair_rows=pair_rows)
    args = [cplan.present, cplan.rows, cplan.pair, cplan.idx, cplan.coef, xa, w]
    out_shape = jax.ShapeDtypeStruct((num_tokens, width), out_dtype)
    aliases = {}
    if base is not None:
        args.append(base)
        aliases = {len(args) - 1: 0}
    elif poison:  # the buffer the output starts as (not read: has_base is False)
        args.append(jnp.full((num_tokens, width), jnp.nan, out_dtype))
        aliases = {len(args) - 1: 0}
    if dots is not None:
        args += dots_inputs
        out_shape = (out_shape, jax.ShapeDtypeStruct((num_tokens * top_k,), jnp.float32))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_rows // block_t, cdiv(width, block_n)),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=compiler_params(num_warps, num_stages),
        name="grouped_lora_combo_expand",
    )(*args)
    return out if dots is None else (out[0], out[1].reshape(num_tokens, top_k))
