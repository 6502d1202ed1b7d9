"""The routing plans of the sorted and combo paths as Pallas kernels: the same arrays as the plain-XLA
references in `grouped_lora_plan` (`routing_plan` + `row_coef`, `combo_plan`), in four launches
(k = 2) instead of about twenty small XLA fusions (session 12, H200, T = 16384: 47 µs of the combo
f+b's 301 µs went to those fusions, most of them 1-2 µs each).

Both plans are stable counting sorts in two launches:

1. `_count_kernel`, one program per block of elements (`sort_block`): the block's bucket sizes (a
   one-hot [block, B] summed over the block) -> hist [S, nb, B] (S sorts side by side, nb blocks).
2. A place kernel, one program per block: every element's destination = its bucket's start + the
   sizes of its bucket in the earlier blocks (both from hist) + its rank among the earlier elements
   of its bucket in this block (a cumulative sum of the one-hot over the block).

Both work on canonical slots: canonical slot c of a token is its c-th smallest adapter (ties by
expert_idx slot), found in registers from the token's k adapters (`_canonical`). The sorted plan
sorts the tokens of each canonical slot by adapter, every adapter's segment padded to a multiple of
the token tile (`routing_plan_pallas`); extra programs of its place launch write the padding rows
and each tile's adapter. The combo plan (`combo_plan_pallas`) sorts the tokens of the last
canonical slot's sorted rows stably by canonical slot k-2's adapter, then by k-3's, ..., 0's (a
least-significant-digit radix sort), a count and a place launch per pass; the last place launch also
gathers each row's pair row, adapter and coefficient, and marks each tile's adapters with plain stores
of 1 into zeros that the pass's count launch wrote (no atomics: Pallas interpret mode has no masked
ones; no launch of its own for the tiles' adapter lists).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.grouped_lora_plan import ComboPlan, Plan, tiles_per_slot
from pallas_kernels.pallas_common import (
    OUT_OF_RANGE,
    cdiv,
    compiler_params,
    masked_load,
    masked_store,
    pow2_at_least,
)

# Elements per program of the count and place launches: at least SORTED_PLAN_BLOCK (the sorted plan,
# k sorts of T tokens side by side) or RADIX_BLOCK (a combo radix pass, one sort of ~T + L*bt rows),
# doubled while a launch would have more than SORT_PROGRAMS_MAX programs. Each place program's time is
# its own chain of loads and its sum over all blocks' histograms, so fewer elements per program help
# until that sum grows (session 28, H200, k = 2, L = 28, docs/benchmarks.md): the sorted plan's place
# launch at T 256 / 4096 / 16384 took 1.63 / 2.82 / 4.61 us with these rules (blocks of 16 / 32 / 128),
# against 2.82 / 3.58 / 4.61 with session 15's 128 everywhere, and 10.24 at T 8192 with 16; the final
# radix pass at T 4096 took 2.8 with 64, 4.8 with 128 and 3.7 with 32, at T 16384 6.3 with 64 or 128
# and 8.1 with 256.
SORTED_PLAN_BLOCK = 16
RADIX_BLOCK = 64
SORT_PROGRAMS_MAX = 256
HIST_CHUNK = 128  # blocks' histograms read per step by a place program
FILL_TILES = 16  # tiles per padding-fill program of the sorted plan


def sort_block(length, num_sorts, smallest):
    """Elements per count / place program of num_sorts sorts of `length` elements each."""
    block = smallest
    while num_sorts * cdiv(length, block) > SORT_PROGRAMS_MAX:
        block *= 2
    return block


def _one_hot(digit, valid, num_buckets_p):
    """digit [n] int32, valid [n] -> one-hot [n, B] int32, zero rows where not valid."""
    buckets = jnp.arange(num_buckets_p, dtype=jnp.int32)
    return ((digit[:, None] == buckets[None, :]) & valid[:, None]).astype(jnp.int32)


def _one_hot_rank(digit, valid, num_buckets_p):
    """`_one_hot`, and each valid element's rank among the earlier valid elements of its bucket [n] (a
    large positive number where not valid, so a masked-off store indexed by it stays out of range:
    interpret mode would wrap -1)."""
    one_hot = _one_hot(digit, valid, num_buckets_p)
    running = jnp.cumsum(one_hot, axis=0, dtype=jnp.int32)
    return one_hot, jnp.where(valid, jnp.sum(running * one_hot, axis=1, dtype=jnp.int32) - 1, OUT_OF_RANGE)


def _bucket_totals(hist_ref, sort, block, num_blocks, num_buckets_p):
    """From hist [S, nb, B]: sort `sort`'s bucket sizes [B] and the sizes in the blocks before
    `block` [B]."""
    buckets = jnp.arange(num_buckets_p, dtype=jnp.int32)

    def body(c, carry):
        sizes, before = carry
        blocks = c * HIST_CHUNK + jnp.arange(HIST_CHUNK, dtype=jnp.int32)
        h = masked_load(hist_ref, (sort, blocks[:, None], buckets[None, :]), (blocks < num_blocks)[:, None])
        sizes = sizes + jnp.sum(h, axis=0, dtype=jnp.int32)
        return sizes, before + jnp.sum(jnp.where((blocks < block)[:, None], h, 0), axis=0, dtype=jnp.int32)

    zeros = jnp.zeros((num_buckets_p,), jnp.int32)
    return lax.fori_loop(0, cdiv(num_blocks, HIST_CHUNK), body, (zeros, zeros))


def _pick(vec, idx):
    """vec [B] at idx [n] (a gather from a register vector): [n]."""
    hit = idx[:, None] == jnp.arange(vec.shape[0], dtype=jnp.int32)[None, :]
    return jnp.sum(jnp.where(hit, vec[None, :], 0), axis=1, dtype=jnp.int32)


def _canonical(idx_ref, tok, valid, position, top_k):
    """Each token's adapter at canonical slot `position` (its adapters in ascending order, ties by
    slot) and the expert_idx slot holding it: ([n], [n]). position: static or a program id."""
    adapters = [masked_load(idx_ref, (tok, j), valid) for j in range(top_k)]
    expert, slot = jnp.zeros_like(tok), jnp.zeros_like(tok)
    for j, a in enumerate(adapters):
        # a's canonical slot: the adapters below it, and the equal ones in lower slots
        rank = sum(((b <= a) if i < j else (b < a)).astype(jnp.int32) for i, b in enumerate(adapters) if i != j)
        hit = rank == position
        expert, slot = jnp.where(hit, a, expert), jnp.where(hit, j, slot)
    return expert, slot


def _digits(seq_ref, idx_ref, sort, block, *, size, length, num_tokens, slot, top_k, start=0):
    """The tokens of block `block` (of `size` elements) of the sequence (seq_ref[start:start + length],
    or 0..T-1 when seq_ref is None), their adapter in canonical slot `slot` (program axis 0 when None)
    with the expert_idx slot holding it, and whether each is a token (not padding). [size]."""
    pos = block * size + jnp.arange(size, dtype=jnp.int32)
    in_range = pos < length
    tok = pos if seq_ref is None else masked_load(seq_ref, start + pos, in_range)
    valid = in_range & (tok < num_tokens)
    digit, source = _canonical(idx_ref, tok, valid, sort if slot is None else slot, top_k)
    return tok, digit, source, valid


def _count_kernel(*refs, size, length, num_tokens, num_buckets_p, slot, top_k, start=0, zeros=0):
    if zeros:  # the last output: a buffer of `zeros` int32 zeros, a slice per program
        refs, zeros_ref = refs[:-1], refs[-1]
        share = cdiv(zeros, pl.num_programs(0) * pl.num_programs(1))
        at = (pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)) * share
        lane = jnp.arange(pow2_at_least(share), dtype=jnp.int32)
        masked_store(zeros_ref, at + lane, jnp.zeros(lane.shape, jnp.int32), (lane < share) & (at + lane < zeros))
    seq_ref = refs[0] if slot is not None else None
    idx_ref, hist_ref = refs[-2], refs[-1]
    sort, block = pl.program_id(0), pl.program_id(1)
    _, digit, _, valid = _digits(seq_ref, idx_ref, sort, block, size=size, length=length, num_tokens=num_tokens,
                                 slot=slot, top_k=top_k, start=start)
    buckets = jnp.arange(num_buckets_p, dtype=jnp.int32)
    every_bucket = buckets >= 0
    sizes = jnp.sum(_one_hot(digit, valid, num_buckets_p), axis=0, dtype=jnp.int32)
    masked_store(hist_ref, (sort, block, buckets), sizes, every_bucket)


def _count(seq, expert_idx, *, size, num_sorts, length, num_buckets, slot, interpret, start=0, zeros=0):
    """Bucket sizes per block of `size` elements of seq[start:start + length] (0..T-1 when seq is None):
    [S, nb, B] int32 (B = num_buckets rounded up to a power of two). zeros > 0: also a buffer of that many int32 zeros,
    for a later launch to mark into (no launch of its own for the fill)."""
    num_tokens, top_k = expert_idx.shape
    num_buckets_p = pow2_at_least(num_buckets)
    num_blocks = cdiv(length, size)
    kernel = functools.partial(_count_kernel, size=size, length=length, num_tokens=num_tokens,
                               num_buckets_p=num_buckets_p, slot=slot, top_k=top_k, start=start, zeros=zeros)
    args = [expert_idx] if seq is None else [seq, expert_idx]
    out_shape = jax.ShapeDtypeStruct((num_sorts, num_blocks, num_buckets_p), jnp.int32)
    if zeros:
        out_shape = (out_shape, jax.ShapeDtypeStruct((zeros,), jnp.int32))
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_sorts, num_blocks),
        interpret=interpret,
        compiler_params=compiler_params(4, 1),
        name="grouped_lora_plan_count",
    )(*args)


# ------------------------------------------------------------------------------------------------
# The sorted plan
# ------------------------------------------------------------------------------------------------


def _place_sorted_kernel(hist_ref, idx_ref, weight_ref, scaling_ref, rows_ref, pair_ref, coef_ref, tile_expert_ref,
                         tile_start_ref, num_tiles_ref, *, size, num_tokens, num_adapters, num_blocks,
                         num_buckets_p, tiles_slot, block_t, top_k):
    slot, block = pl.program_id(0), pl.program_id(1)
    # The block's own loads first, so they are in flight while the histograms are summed (the
    # programs of a launch fit in one wave, so each program's chain of loads is the launch's time).
    tok, expert, source, valid = _digits(None, idx_ref, slot, block, size=size, length=num_tokens,
                                         num_tokens=num_tokens, slot=None, top_k=top_k)
    coef = (masked_load(weight_ref, (tok, source), valid).astype(jnp.float32)
            * masked_load(scaling_ref, expert, valid).astype(jnp.float32))
    sizes, before = _bucket_totals(hist_ref, slot, block, num_blocks, num_buckets_p)
    num_tiles = (sizes + block_t - 1) // block_t  # [B]; 0 past the last adapter
    tile_end = jnp.cumsum(num_tiles, dtype=jnp.int32)  # slot-local
    tile_start = tile_end - num_tiles
    first_row = slot * tiles_slot * block_t
    buckets = jnp.arange(num_buckets_p, dtype=jnp.int32)

    @pl.when(block == 0)
    def _tile_ranges():
        real = buckets < num_adapters
        masked_store(tile_start_ref, (slot, buckets), tile_start + slot * tiles_slot, real)
        masked_store(num_tiles_ref, (slot, buckets), num_tiles, real)

    @pl.when(block < num_blocks)
    def _place():
        one_hot, rank = _one_hot_rank(expert, valid, num_buckets_p)
        start = jnp.sum(one_hot * (tile_start * block_t + before)[None, :], axis=1, dtype=jnp.int32)
        row = first_row + start + rank
        masked_store(rows_ref, row, tok, valid)
        masked_store(pair_ref, (source, tok), row, valid)
        masked_store(coef_ref, row, coef, valid)

    @pl.when(block >= num_blocks)
    def _fill_padding():  # each tile's adapter; the padding rows' sentinel token T and coefficient 0
        tiles = (block - num_blocks) * FILL_TILES + jnp.arange(FILL_TILES, dtype=jnp.int32)
        in_slot = tiles < tiles_slot
        expert = jnp.minimum(jnp.sum(tile_end[None, :] <= tiles[:, None], axis=1, dtype=jnp.int32),
                             num_adapters)
        used = jnp.where(expert < num_adapters,
                         _pick(sizes, expert) - (tiles - _pick(tile_start, expert)) * block_t, 0)
        masked_store(tile_expert_ref, slot * tiles_slot + tiles, expert, in_slot)
        lane = jnp.arange(block_t, dtype=jnp.int32)
        row = first_row + tiles[:, None] * block_t + lane[None, :]
        pad = in_slot[:, None] & (lane[None, :] >= used[:, None])
        masked_store(rows_ref, row, jnp.full(row.shape, num_tokens, jnp.int32), pad)
        masked_store(coef_ref, row, jnp.zeros(row.shape, jnp.float32), pad)


def routing_plan_pallas(expert_idx, expert_weight, scaling, num_adapters, block_t, *, interpret):
    """`grouped_lora_plan.routing_plan` and `row_coef` in two launches: (Plan, coef [k*nts*bt] float32).

    expert_idx [T, k] int32, expert_weight [T, k], scaling [L]."""
    num_tokens, top_k = expert_idx.shape
    tiles_slot = tiles_per_slot(num_tokens, num_adapters, block_t)
    size = sort_block(num_tokens, top_k, SORTED_PLAN_BLOCK)
    hist = _count(None, expert_idx, size=size, num_sorts=top_k, length=num_tokens, num_buckets=num_adapters,
                  slot=None, interpret=interpret)
    num_blocks = hist.shape[1]
    kernel = functools.partial(
        _place_sorted_kernel, size=size, num_tokens=num_tokens, num_adapters=num_adapters, num_blocks=num_blocks,
        num_buckets_p=hist.shape[2], tiles_slot=tiles_slot, block_t=block_t, top_k=top_k)
    num_rows = top_k * tiles_slot * block_t
    i32 = jnp.int32
    rows, pair_row, coef, tile_expert, tile_start, num_tiles = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((num_rows,), i32), jax.ShapeDtypeStruct((top_k, num_tokens), i32),
                   jax.ShapeDtypeStruct((num_rows,), jnp.float32), jax.ShapeDtypeStruct((top_k * tiles_slot,), i32),
                   jax.ShapeDtypeStruct((top_k, num_adapters), i32),
                   jax.ShapeDtypeStruct((top_k, num_adapters), i32)),
        grid=(top_k, num_blocks + cdiv(tiles_slot, FILL_TILES)),
        interpret=interpret,
        compiler_params=compiler_params(4, 1),
        name="grouped_lora_plan_place",
    )(hist, expert_idx, expert_weight, scaling)
    return Plan(rows, tile_expert, tile_start, num_tiles, pair_row), coef


# ------------------------------------------------------------------------------------------------
# The combo plan
# ------------------------------------------------------------------------------------------------


def _place_order_kernel(*refs, size, length, start, num_tokens, num_adapters, num_blocks, num_buckets_p, slot, top_k,
                        padded, block_t, final):
    """A radix pass: the tokens of seq stably by their adapter in canonical slot `slot`. The final pass
    also writes each (expert_idx slot, row)'s pair row, adapter and coefficient, the padding rows past
    the last token, and a 1 at present[tile * L + e] for each adapter e a row of a tile uses (into the
    zeros of its count launch: several rows may mark the same entry, all with the same value)."""
    if final:
        (hist_ref, seq_ref, idx_ref, pair_row_ref, coef_ref, _, out_ref, pair_ref, expert_ref, row_coef_ref,
         present_ref) = refs
    else:
        hist_ref, seq_ref, idx_ref, out_ref = refs
    block = pl.program_id(1)
    # The block's own loads (and the final pass's gathers) first, in flight while the histograms are
    # summed (see `_place_sorted_kernel`).
    tok, digit, _, valid = _digits(seq_ref, idx_ref, 0, block, size=size, length=length, num_tokens=num_tokens,
                                   slot=slot, top_k=top_k, start=start)
    gathered = []  # per slot: the pair row, adapter and coefficient of each element's token
    for j in range(top_k if final else 0):
        pair = masked_load(pair_row_ref, (j, tok), valid)
        gathered.append((pair, masked_load(idx_ref, (tok, j), valid), masked_load(coef_ref, pair, valid)))
    sizes, before = _bucket_totals(hist_ref, 0, block, num_blocks, num_buckets_p)
    start = jnp.cumsum(sizes, dtype=jnp.int32) - sizes
    one_hot, rank = _one_hot_rank(digit, valid, num_buckets_p)
    row = jnp.sum(one_hot * (start + before)[None, :], axis=1, dtype=jnp.int32) + rank
    masked_store(out_ref, row, tok, valid)
    if not final:
        return
    for j, (pair, expert, coef) in enumerate(gathered):
        masked_store(pair_ref, j * padded + row, pair, valid)
        masked_store(expert_ref, j * padded + row, expert, valid)
        masked_store(row_coef_ref, j * padded + row, coef, valid)
        mark = jnp.where(valid, (row // block_t) * num_adapters + expert, OUT_OF_RANGE)
        masked_store(present_ref, mark, jnp.ones_like(expert), valid)
    tail = padded - num_tokens
    if tail:  # the rows past the last token: token T, pair row 0, adapter L, coefficient 0
        lane = jnp.arange(pow2_at_least(tail), dtype=jnp.int32)
        pad = (lane < tail) & (block == 0)
        fill = lambda value, dtype: jnp.full(lane.shape, value, dtype)  # noqa: E731
        masked_store(out_ref, num_tokens + lane, fill(num_tokens, jnp.int32), pad)
        for j in range(top_k):
            at = j * padded + num_tokens + lane
            masked_store(pair_ref, at, fill(0, jnp.int32), pad)
            masked_store(expert_ref, at, fill(num_adapters, jnp.int32), pad)
            masked_store(row_coef_ref, at, fill(0, jnp.float32), pad)


def _radix_pass(seq, expert_idx, slot, num_adapters, interpret, final=None, start=0):
    """The tokens of seq[start:] (padding entries >= T dropped) reordered stably by their adapter in
    canonical slot `slot`: [T]. final = (plan, coef, block_t): the last pass, which returns the combo
    plan's rows, pair, idx, coef and present (the rows padded to whole tiles of block_t with T). The
    kernels read from `start` themselves: a slice of seq taken here would be a copy launch of its own."""
    num_tokens, top_k = expert_idx.shape
    length = seq.shape[0] - start
    plan, coef, block_t = final if final is not None else (None, None, 0)
    num_tiles = cdiv(num_tokens, block_t) if final is not None else 0
    size = sort_block(length, 1, RADIX_BLOCK)
    hist = _count(seq, expert_idx, size=size, num_sorts=1, length=length, num_buckets=num_adapters, slot=slot,
                  interpret=interpret, start=start, zeros=num_tiles * num_adapters)
    if final is not None:
        hist, present = hist
    padded = num_tokens if final is None else num_tiles * block_t
    kernel = functools.partial(
        _place_order_kernel, size=size, length=length, start=start, num_tokens=num_tokens, num_adapters=num_adapters,
        num_blocks=hist.shape[1], num_buckets_p=hist.shape[2], slot=slot, top_k=top_k, padded=padded,
        block_t=block_t, final=final is not None)
    i32 = jnp.int32
    out_shape = jax.ShapeDtypeStruct((padded,), i32)
    args = [hist, seq, expert_idx]
    aliases = {}
    if final is not None:
        per_pair = top_k * padded
        out_shape = (out_shape, jax.ShapeDtypeStruct((per_pair,), i32), jax.ShapeDtypeStruct((per_pair,), i32),
                     jax.ShapeDtypeStruct((per_pair,), jnp.float32), jax.ShapeDtypeStruct(present.shape, i32))
        args += [plan.pair_row, coef, present]
        aliases = {len(args) - 1: len(out_shape) - 1}
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        input_output_aliases=aliases,
        grid=(1, hist.shape[1]),
        interpret=interpret,
        compiler_params=compiler_params(4, 1),
        name="grouped_lora_plan_order",
    )(*args)


# Tried and dropped (session 26, H200, docs/benchmarks.md): at k = 2, both plans from one count launch
# that also counts each block's tokens per adapter pair ([B, B]) and one place launch that also writes
# the combo rows (pair start + earlier blocks' count + rank in the block) and the tiles' adapter lists.
# Exact on the GPU, but at T = 4096 the place launch took 19.4 us (13.0 with no rank at all) against
# 12.5 us for the five launches the plans took then: every program reads all blocks' pair histograms.
def combo_plan_pallas(plan, coef, expert_idx, num_adapters, block_t, *, interpret):
    """`grouped_lora_plan.combo_plan`: a count and a place launch per radix pass (canonical slots
    k-2 .. 0; slot 0 alone when k = 1), the last count also zero-filling the tiles' adapter marks and
    the last place also gathering each row's pair row, adapter and coefficient and marking its tile's
    adapters."""
    num_tokens, top_k = expert_idx.shape
    # The first pass reads the sorted plan's last block: plan.rows from `start` on.
    seq, start = plan.rows, (top_k - 1) * (plan.rows.shape[0] // top_k)
    for slot in range(max(top_k - 2, 0), 0, -1):
        seq, start = _radix_pass(seq, expert_idx, slot, num_adapters, interpret, start=start), 0
    return ComboPlan(*_radix_pass(seq, expert_idx, 0, num_adapters, interpret, final=(plan, coef, block_t),
                                  start=start))
