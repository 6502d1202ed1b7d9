"""The routing plans of the sorted and combo paths (plain XLA): where every (token, slot) pair of a
routed grouped low-rank product goes in the kernels' tiles.

* `routing_plan`: the pairs laid out in k blocks, block c holding every token's c-th smallest adapter
  (its "canonical" slot c; ties by slot); inside a block the tokens sorted by adapter, every adapter's
  segment padded to a multiple of the token tile, so each tile belongs to one adapter.
* `combo_plan`: on top of it, the tokens ordered by the set of adapters they chose (smallest first,
  then the next, ...), so a tile of neighbouring tokens uses a few adapters (the combo expand's tiles).
  Ordering by the sets rather than by the slots puts tokens that chose {3, 7} and {7, 3} together.

Both are counting sorts built from cumulative sums of one-hots: no sort kernel. The kernels use the
Pallas versions (`grouped_lora_plan_pallas`: four launches where these take about twenty XLA
fusions); these are their references.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.pallas_common import cdiv


@dataclasses.dataclass(frozen=True)
class Plan:
    """Tile layout of the (token, slot) pairs; all arrays int32.

    rows        [k*nts*bt]  token of each padded row (T for padding)
    tile_expert [k*nts]     adapter of each tile (L for an empty tile)
    tile_start  [k, L]      first tile (global index) of adapter e in canonical slot c
    num_tiles   [k, L]      number of tiles of adapter e in canonical slot c
    pair_row    [k, T]      padded row of token t's slot j (expert_idx's slot: the inverse of rows)
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
    return cdiv(num_tokens, block_t) + min(num_adapters, num_tokens)


def _bucket_rank(digit, num_buckets):
    """Counting sort without a sort kernel (an XLA sort of T*k keys cost ~30 us on an H100), from a
    cumulative sum of one-hots over the last axis: digit [..., P] in [0, num_buckets) -> each
    element's rank among the earlier elements of its bucket [..., P] and the bucket sizes [..., B]."""
    one_hot = (digit[..., None] == jnp.arange(num_buckets, dtype=jnp.int32)).astype(jnp.int32)  # [..., P, B]
    running = jnp.cumsum(one_hot, axis=-2, dtype=jnp.int32)
    rank = jnp.take_along_axis(running, digit[..., None], axis=-1)[..., 0] - 1
    return rank, running[..., -1, :]


def canonical_slots(expert_idx):
    """expert_idx [T, k] -> order [T, k]: order[t, c] is the slot of token t's c-th smallest adapter (ties:
    the lower slot first)."""
    return jnp.argsort(expert_idx, axis=1, stable=True).astype(jnp.int32)


def routing_plan(expert_idx, num_adapters, block_t):  # expert_idx [T, k]
    num_tokens, top_k = expert_idx.shape
    nts = tiles_per_slot(num_tokens, num_adapters, block_t)
    order = canonical_slots(expert_idx)
    idx = jnp.take_along_axis(expert_idx.astype(jnp.int32), order, axis=1).T  # [k, T], canonical slots
    rank, sizes = _bucket_rank(idx, num_adapters)  # [k, T], [k, L]
    num_tiles = (sizes + block_t - 1) // block_t
    tile_end = jnp.cumsum(num_tiles, axis=1, dtype=jnp.int32)  # slot-local
    tile_start = tile_end - num_tiles
    slot = jnp.arange(top_k, dtype=jnp.int32)[:, None]
    pos = (slot * nts + jnp.take_along_axis(tile_start, idx, axis=1)) * block_t + rank  # [k, T], canonical
    tok = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (top_k, num_tokens))
    rows = jnp.full((top_k * nts * block_t,), num_tokens, jnp.int32)
    rows = rows.at[pos.reshape(-1)].set(tok.reshape(-1), unique_indices=True)
    local = jnp.arange(nts, dtype=jnp.int32)
    tile_expert = jnp.sum(tile_end[:, None, :] <= local[None, :, None], axis=-1, dtype=jnp.int32)
    pair_row = jnp.take_along_axis(pos, jnp.argsort(order, axis=1).T, axis=0)  # by expert_idx's slot
    return Plan(rows, tile_expert.reshape(-1), tile_start + slot * nts, num_tiles, pair_row)


def row_coef(plan, expert_idx, expert_weight, scaling):
    """w[t, j] * scaling[idx[t, j]] for every padded row; 0 for padding rows. [k*nts*bt] float32."""
    coef = expert_weight.astype(jnp.float32) * scaling.astype(jnp.float32)[expert_idx]  # [T, k]
    return jnp.zeros(plan.rows.shape, jnp.float32).at[plan.pair_row.reshape(-1)].set(
        coef.T.reshape(-1), unique_indices=True)


@dataclasses.dataclass(frozen=True)
class ComboPlan:
    """Token tiles of the combo expand; all arrays int32 but coef (float32).

    rows      [nc*bc]     token of each row, tokens ordered by their adapters (T for padding)
    pair      [k*nc*bc]   each (slot, row)'s row in the sorted plan's pair layout (0 for padding)
    idx       [k*nc*bc]   each (slot, row)'s adapter (L for padding)
    coef      [k*nc*bc]   each (slot, row)'s w[t, j] * scaling[e] (0 for padding)
    present   [nc*L]      1 where tile i uses adapter e (at i*L + e), else 0
    """

    rows: jax.Array
    pair: jax.Array
    idx: jax.Array
    coef: jax.Array
    present: jax.Array


jax.tree_util.register_dataclass(ComboPlan, data_fields=["rows", "pair", "idx", "coef", "present"], meta_fields=[])


def _stable_bucket_sort(seq, digit, num_buckets):
    """seq [P] reordered stably by digit [P] in [0, num_buckets), by `_bucket_rank` (XLA's sort of
    16384 keys took 32 us on an H200)."""
    rank, sizes = _bucket_rank(digit, num_buckets)
    start = jnp.cumsum(sizes, dtype=jnp.int32) - sizes
    return jnp.zeros_like(seq).at[start[digit] + rank].set(seq, unique_indices=True)


def combo_plan(plan, coef, expert_idx, num_adapters, block_t):
    """The combo expand's tiles from the sorted plan (pair rows, coefficients) and expert_idx [T, k].

    Token order: a least-significant-digit radix sort by (smallest adapter, next smallest, ...). The
    sorted plan's last block already lists the tokens stably by their largest adapter; counting passes
    over canonical slots k-2 .. 0 finish the order (padding rows go to an extra last bucket and are
    cut; with k = 1 one pass over slot 0 does only that)."""
    num_tokens, top_k = expert_idx.shape
    num_rows = plan.rows.shape[0] // top_k
    canonical = jnp.sort(expert_idx, axis=1)
    seq = plan.rows[(top_k - 1) * num_rows:]  # [nts*bt]
    for slot in range(max(top_k - 2, 0), -1, -1):
        digit = jnp.where(seq < num_tokens, canonical[jnp.minimum(seq, num_tokens - 1), slot], num_adapters)
        seq = _stable_bucket_sort(seq, digit, num_adapters + 1)
    num_tiles = cdiv(num_tokens, block_t)
    pad = num_tiles * block_t - num_tokens
    rows = jnp.concatenate([seq[:num_tokens], jnp.full((pad,), num_tokens, jnp.int32)])
    valid = rows < num_tokens
    tok = jnp.minimum(rows, num_tokens - 1)
    pair = jnp.where(valid, plan.pair_row[:, tok], 0)  # [k, nc*bc]
    idx = jnp.where(valid, expert_idx.T[:, tok], num_adapters)
    row_coef = jnp.where(valid, coef[pair], 0.0)
    tile = jnp.arange(num_tiles * block_t, dtype=jnp.int32) // block_t
    present = jnp.zeros((num_tiles, num_adapters + 1), jnp.int32).at[tile[None, :], idx].set(1)
    return ComboPlan(rows, pair.reshape(-1), idx.reshape(-1), row_coef.reshape(-1),
                     present[:, :num_adapters].reshape(-1))
