"""Pallas grouped_lora kernels (interpret mode on CPU, compiled by Triton on a GPU) vs the plain-XLA
reference.

Fresh random inputs every run: the seed comes from np.random.SeedSequence() and is printed in every
assertion message, so a failure can be replayed by setting SEED below.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from pallas_kernels import IMPLS, grouped_lora, grouped_lora_dense
from pallas_kernels.grouped_lora_pallas import default_config, grouped_lora_pallas

SEED = np.random.SeedSequence().entropy
INTERPRET = jax.default_backend() == "cpu"  # on a GPU the same cases run the compiled kernels
SMALL = dict(block_t=16, block_k=16, block_n=16, block_n_tgmm=16, block_k_decode=16, block_k_decode_grad=16,
             block_n_decode=16, block_n_decode_out=16,
             block_t_dense=16, block_c_dense=16, block_k_dense=16, block_t_combo=16, block_n_combo=16,
             # The plans from their XLA references: the Pallas plan kernels build the same arrays
             # (test_plan_kernels_match_reference) but take minutes to compile in interpret mode across
             # these cases; test_sorted_and_combo_default_blocks runs the paths with them.
             plan="xla")
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
BF16_SUM_TOL = 4e-3  # 2^-8: one bfloat16 rounding of each term, relative to the terms' magnitudes


def _salt(case) -> int:
    """A per-case salt that is the same in every process (str hashes are randomised per process)."""
    return zlib.crc32(repr(case).encode())


def _rng(*salt):
    return np.random.default_rng([SEED % 2**63, *salt])


def _inputs(salt, t, d_in, d_out, num_adapters, rank, k, dtype, routing="random"):
    rng = _rng(*salt)
    x = jnp.asarray(rng.standard_normal((t, d_in)), dtype)
    a = jnp.asarray(rng.standard_normal((num_adapters, d_in, rank)) / np.sqrt(d_in), dtype)
    b = jnp.asarray(rng.standard_normal((num_adapters, rank, d_out)) / np.sqrt(rank), dtype)
    s = jnp.asarray(rng.uniform(0.5, 2.0, num_adapters), jnp.float32)
    if routing == "random":
        idx = np.stack([rng.permutation(num_adapters)[:k] for _ in range(t)])
    elif routing == "one":  # every token's first choice on adapter 0, others elsewhere
        idx = np.stack([np.r_[0, 1 + rng.permutation(num_adapters - 1)[: k - 1]] for _ in range(t)])
    else:  # "few": only adapters 0..k used, most adapters get no token
        idx = np.stack([rng.permutation(k + 1)[:k] for _ in range(t)])
    w = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32)
    base = jnp.asarray(rng.standard_normal((t, d_out)), dtype)
    return x, a, b, s, jnp.asarray(idx, jnp.int32), w, base


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), "non-finite output (unwritten poisoned elements?)"
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _reference(x, a, b, s, idx, w):
    f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        return grouped_lora_dense(f32(x), f32(a), f32(b), s, idx, w)


# (T, d_in, d_out, L, r, k, routing): T, d_in and d_out not multiples of the 16-wide blocks.
CASES = [
    (37, 50, 70, 5, 3, 2, "random"),
    (1, 33, 20, 4, 8, 2, "random"),  # decode-sized, one token
    (23, 40, 17, 6, 1, 1, "random"),  # r = 1, k = 1
    (19, 24, 30, 4, 5, 4, "random"),  # k = L
    (29, 18, 21, 3, 128, 2, "random"),  # r = 128
    (45, 30, 26, 9, 4, 2, "few"),  # adapters with no token
    (40, 30, 26, 5, 6, 2, "one"),  # all tokens' first choice on one adapter
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("path", ["sorted", "combo", "decode", "dense"])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}_L{c[3]}_r{c[4]}_k{c[5]}_{c[6]}" for c in CASES])
def test_forward_matches_reference(case, path, dtype):
    t, d_in, d_out, num_adapters, rank, k, routing = case
    x, a, b, s, idx, w, base = _inputs((_salt(case), 0), t, d_in, d_out, num_adapters, rank, k, dtype,
                                       routing)
    ref = _reference(x, a, b, s, idx, w)
    fn = jax.jit(lambda *v: grouped_lora_pallas(*v, path=path, poison=True, interpret=INTERPRET, **SMALL))
    err = _rel(fn(x, a, b, s, idx, w), ref)
    assert err <= TOL[dtype], f"seed={SEED} case={case} path={path}: rel err {err:.2e}"
    fused = jax.jit(lambda *v: grouped_lora_pallas(*v[:-1], base=v[-1], path=path, interpret=INTERPRET, **SMALL))
    err = _rel(fused(x, a, b, s, idx, w, base), ref + base.astype(jnp.float32))
    assert err <= TOL[dtype], f"seed={SEED} case={case} path={path} (base fused): rel err {err:.2e}"


GRAD_CASES = [CASES[0], CASES[2], CASES[3], CASES[5], CASES[6]]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
# auto: the "concat" grad path here (small T); xla_concat: the XLA formulation with its own custom VJP
@pytest.mark.parametrize("path", ["sorted", "combo", "dense", "decode", "auto", "xla_concat"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=[f"T{c[0]}_L{c[3]}_r{c[4]}_k{c[5]}_{c[6]}" for c in GRAD_CASES])
def test_gradients_match_autodiff_of_reference(case, path, dtype):
    """Every gradient within TOL of the float32 reference's, relative to its norm. In bfloat16 the
    gradients of scaling and expert_weight are sums of many products that cancel (a scaling's over
    every token of its adapter), so their rounding error is bounded relative to the sum of the terms'
    magnitudes, not to the result: for those two, ||got - want|| <= BF16_SUM_TOL * ||magnitude||,
    where magnitude is the reference's gradient with every input and the cotangent made positive."""
    t, d_in, d_out, num_adapters, rank, k, routing = case
    x, a, b, s, idx, w, base = _inputs((_salt(case), 1), t, d_in, d_out, num_adapters, rank, k, dtype,
                                       routing)
    g = jnp.asarray(_rng(_salt(case), 2).standard_normal((t, d_out)), jnp.float32)
    f32 = lambda v: v.astype(jnp.float32)  # noqa: E731

    def loss(fn, cast):
        return lambda x, a, b, s, w, base: jnp.sum(f32(fn(cast(x), cast(a), cast(b), s, idx, w, cast(base))) * g)

    def ref_fn(x, a, b, s, idx, w, base):
        return grouped_lora_dense(x, a, b, s, idx, w) + base

    def pallas_fn(x, a, b, s, idx, w, base):
        if path.startswith("xla_"):
            return grouped_lora(x, a, b, s, idx, w, impl=path, base=base)
        return grouped_lora_pallas(x, a, b, s, idx, w, base=base, path=path, poison=True, interpret=INTERPRET,
                                   **SMALL)

    argnums = (0, 1, 2, 3, 4, 5)
    with jax.default_matmul_precision("highest"):
        want = jax.grad(loss(ref_fn, f32), argnums)(f32(x), f32(a), f32(b), s, w, f32(base))
        absolute = lambda v: jnp.abs(f32(v))  # noqa: E731
        magnitude = jax.grad(lambda *v: jnp.sum(ref_fn(*v[:4], idx, *v[4:]) * jnp.abs(g)), argnums)(
            absolute(x), absolute(a), absolute(b), s, w, absolute(base))
    got = jax.jit(jax.grad(loss(pallas_fn, lambda v: v), argnums))(x, a, b, s, w, base)
    for name, u, v, m in zip(("x", "lora_a", "lora_b", "scaling", "expert_weight", "base"), want, got, magnitude):
        if dtype == jnp.bfloat16 and name in ("scaling", "expert_weight"):
            err = np.linalg.norm(np.asarray(v, np.float64) - np.asarray(u, np.float64)) / np.linalg.norm(m)
            bound = BF16_SUM_TOL
        else:
            err, bound = _rel(v, u), TOL[dtype]
        assert err <= bound, f"seed={SEED} case={case} path={path}: d{name} rel err {err:.2e}"


@pytest.mark.parametrize("path,rank", [("sorted", 6), ("combo", 6), ("combo", 20)])
def test_sorted_and_combo_default_blocks(path, rank):
    """The sorted and combo paths as the GPU runs them: default tiles (depth tile 128 over d_in = 200, not
    a multiple of it; token tile 32; combo tile 32 x 256, or 64 x 256 at r = 20; lora_a padded to rank
    16 or 32) and the Pallas plan kernels. Output and the gradients of x and expert_weight against the
    float32 reference."""
    case = (100, 200, 90, 5, rank, 2)
    x, a, b, s, idx, w, _ = _inputs((_salt(case), 6), *case, jnp.float32)
    g = jnp.asarray(_rng(_salt(case), 7).standard_normal((case[0], case[2])), jnp.float32)
    pallas = lambda x, w: grouped_lora_pallas(x, a, b, s, idx, w, path=path, poison=True)  # noqa: E731
    reference = lambda x, w: grouped_lora_dense(x, a, b, s, idx, w)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        want = reference(x, w)
        want_grads = jax.grad(lambda x, w: jnp.sum(reference(x, w) * g), (0, 1))(x, w)
    err = _rel(jax.jit(pallas)(x, w), want)
    assert err <= TOL[jnp.float32], f"seed={SEED} path={path} r={rank}: rel err {err:.2e}"
    got = jax.jit(jax.grad(lambda x, w: jnp.sum(pallas(x, w) * g), (0, 1)))(x, w)
    for name, u, v in zip(("x", "expert_weight"), want_grads, got):
        err = _rel(v, u)
        assert err <= TOL[jnp.float32], f"seed={SEED} path={path} r={rank}: d{name} rel err {err:.2e}"


PLAN_CASES = [  # (T, L, k, block_t, block_t_combo, routing)
    (37, 5, 2, 16, 16, "random"),
    (1, 4, 2, 16, 16, "random"),
    (23, 6, 1, 16, 32, "random"),  # k = 1: the combo order is slot 0's sorted rows without padding
    (19, 4, 4, 16, 16, "random"),  # k = L: three radix passes
    (90, 40, 3, 32, 16, "few"),  # L > 32 buckets, most adapters empty
    (70, 9, 2, 16, 64, "one"),  # one adapter takes every token's first slot
]


PLAN_BLOCKS = {
    "default_blocks": {},
    "many_blocks": dict(SORTED_PLAN_BLOCK=16, RADIX_BLOCK=16, HIST_CHUNK=2, FILL_TILES=2),
    "doubled_blocks": dict(SORTED_PLAN_BLOCK=16, RADIX_BLOCK=16, SORT_PROGRAMS_MAX=4),
}


@pytest.mark.parametrize("blocks", list(PLAN_BLOCKS))
@pytest.mark.parametrize("case", PLAN_CASES, ids=[f"T{c[0]}_L{c[1]}_k{c[2]}_{c[5]}" for c in PLAN_CASES])
def test_plan_kernels_match_reference(case, blocks, monkeypatch):
    """The Pallas plan kernels (interpret mode) give exactly the XLA reference's plan, coefficients and
    combo plan. many_blocks: 16 elements per count / place program, two blocks' histograms per step
    and two tiles per padding-fill program, so the cross-block offsets, the histogram loop and the
    fill programs all see several iterations. doubled_blocks: at most 4 programs per count / place
    launch, so `sort_block` doubles its block several times (to 32-128 elements here)."""
    from pallas_kernels import grouped_lora_plan_pallas as plan_pallas
    from pallas_kernels.grouped_lora_plan import combo_plan, routing_plan, row_coef

    for name, value in PLAN_BLOCKS[blocks].items():
        monkeypatch.setattr(plan_pallas, name, value)
    t, num_adapters, k, block_t, block_c, routing = case
    _, _, _, s, idx, w, _ = _inputs((_salt(case), 8), t, 2, 2, num_adapters, 1, k, jnp.float32, routing)
    w = w.astype(jnp.bfloat16)  # the weight's dtype is the model's; coef is float32 either way
    if k > 1:  # a token whose two slots hold the same adapter: canonical ties go to the lower slot
        idx = idx.at[0, 1].set(idx[0, 0])
    want = routing_plan(idx, num_adapters, block_t)
    want_coef = row_coef(want, idx, w, s)
    got, coef = jax.jit(lambda i, w, s: plan_pallas.routing_plan_pallas(i, w, s, num_adapters, block_t,
                                                                          interpret=INTERPRET))(idx, w, s)
    for name in ("rows", "tile_expert", "tile_start", "num_tiles", "pair_row"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=f"seed={SEED} {name}")
    np.testing.assert_array_equal(coef, want_coef, err_msg=f"seed={SEED} coef")
    got = jax.jit(lambda p, c, i: plan_pallas.combo_plan_pallas(p, c, i, num_adapters, block_c, interpret=INTERPRET))(
        want, want_coef, idx)
    want = combo_plan(want, want_coef, idx, num_adapters, block_c)
    for name in ("rows", "pair", "idx", "coef", "present"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name),
                                      err_msg=f"seed={SEED} combo plan {name}")


@pytest.mark.parametrize("case", PLAN_CASES, ids=[f"T{c[0]}_L{c[1]}_k{c[2]}_{c[5]}" for c in PLAN_CASES])
def test_plan_layout(case):
    """The XLA reference plans against a plain-Python construction of the layout they promise: block c
    of the sorted plan holds every token's c-th smallest adapter (ties by slot), tokens grouped by
    adapter in ascending order, each adapter's segment padded to whole tiles; the combo plan orders the
    tokens by their sorted adapter tuples (ties by token), so {3, 7} and {7, 3} sit together."""
    from pallas_kernels.grouped_lora_plan import combo_plan, routing_plan, row_coef, tiles_per_slot

    t, num_adapters, k, block_t, block_c, routing = case
    _, _, _, s, idx, w, _ = _inputs((_salt(case), 9), t, 2, 2, num_adapters, 1, k, jnp.float32, routing)
    if k > 1:  # also a token whose two slots hold the same adapter (ties go to the lower slot)
        idx = idx.at[0, 1].set(idx[0, 0])
    plan = routing_plan(idx, num_adapters, block_t)
    coef = row_coef(plan, idx, w, s)
    idx_np, w_np, s_np = np.asarray(idx), np.asarray(w), np.asarray(s)
    nts = tiles_per_slot(t, num_adapters, block_t)
    rows = np.full(k * nts * block_t, t)
    want_coef = np.zeros(k * nts * block_t, np.float32)
    pair_row = np.zeros((k, t), np.int64)
    tile_expert = np.full(k * nts, num_adapters)
    for c in range(k):
        tile = c * nts
        for e in range(num_adapters):
            pairs = [(tok, j) for tok in range(t) for j in [sorted(range(k), key=lambda j: (idx_np[tok, j], j))[c]]
                     if idx_np[tok, j] == e]
            for n, (tok, j) in enumerate(pairs):
                row = tile * block_t + n
                rows[row], pair_row[j, tok] = tok, row
                want_coef[row] = w_np[tok, j] * s_np[e]
            used = -(-len(pairs) // block_t)
            tile_expert[tile:tile + used] = e
            tile += used
    msg = f"seed={SEED} case={case}"
    np.testing.assert_array_equal(plan.rows, rows, err_msg=msg)
    np.testing.assert_array_equal(plan.pair_row, pair_row, err_msg=msg)
    np.testing.assert_array_equal(plan.tile_expert, tile_expert, err_msg=msg)
    np.testing.assert_allclose(coef, want_coef, rtol=1e-6, err_msg=msg)

    cplan = combo_plan(plan, coef, idx, num_adapters, block_c)
    order = sorted(range(t), key=lambda tok: tuple(sorted(idx_np[tok])))
    np.testing.assert_array_equal(np.asarray(cplan.rows)[:t], order, err_msg=msg)
    for i in range(-(-t // block_c)):
        used = np.zeros(num_adapters, np.int32)
        used[[int(e) for tok in order[i * block_c:(i + 1) * block_c] for e in idx_np[tok]]] = 1
        np.testing.assert_array_equal(np.asarray(cplan.present)[i * num_adapters:(i + 1) * num_adapters], used,
                                      err_msg=msg)


def test_shrink_depth_splits():
    """The sorted shrink split over the depth (partial sums added afterwards) against a plain-NumPy
    grouped product, for no split, an uneven split (7 depth chunks in 3 parts) and the default; and
    the default's split counts at the measured shapes."""
    from pallas_kernels.grouped_lora_plan import routing_plan
    from pallas_kernels.grouped_lora_sorted import shrink, shrink_splits

    case = (45, 100, 1, 6, 5, 2)
    x, a, _, _, idx, _, _ = _inputs((_salt(case), 10), *case, jnp.float32)
    block_t = 16
    plan = routing_plan(idx, case[3], block_t)
    rows, tile_expert = np.asarray(plan.rows), np.asarray(plan.tile_expert)
    want = np.zeros((rows.shape[0], 16), np.float32)
    x64, a64 = np.asarray(x, np.float64), np.asarray(a, np.float64)
    for row, tok in enumerate(rows):
        if tok < case[0]:
            want[row, :case[4]] = x64[tok] @ a64[tile_expert[row // block_t]]
    for splits in (1, 3, None):
        got = shrink(plan, x, a, rank=case[4], transpose_w=False, block_t=block_t, block_k=16, interpret=INTERPRET,
                     splits=splits)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"seed={SEED} splits={splits}")
    # (tiles, depth, block_k, R) -> parts: below one wave of tiles split to two programs per SM; from one
    # wave up only at R <= 16; never more parts than depth chunks.
    assert [shrink_splits(*shape) for shape in ((88, 4096, 128, 16), (88, 14336, 128, 64), (184, 4096, 128, 16),
                                                (184, 4096, 128, 64), (568, 4096, 64, 16), (10, 48, 16, 16))] == \
        [4, 4, 2, 1, 1, 2]


@pytest.mark.parametrize("dx_dots", [True, False])
def test_combo_expand_adds_kept_shrink_parts(monkeypatch, dx_dots):
    """Where both shrinks split their depth in two (d_in 40 and d_out 30 in 16-wide chunks), the combo
    path keeps the two parts for its expands to add (`keep_parts`). Output and every gradient (the
    expands' dots, the XLA dots, dA / dB from summed parts) against the float32 reference, with the parts
    kept and with them summed by XLA; and in gate training, with the dots from the dx expand, the kept
    program has two fewer sums."""
    import pallas_kernels.grouped_lora_sorted as sorted_kernels

    case = (45, 40, 30, 6, 5, 2)
    x, a, b, s, idx, w, _ = _inputs((_salt(case), 11), *case, jnp.float32)
    g = jnp.asarray(_rng(_salt(case), 12).standard_normal((case[0], case[2])), jnp.float32)

    def loss(fn):
        return lambda x, w, s, a, b: jnp.sum(fn(x, a, b, s, idx, w) * g)

    pallas = lambda *v: grouped_lora_pallas(  # noqa: E731
        *v, path="combo", poison=True, interpret=INTERPRET, **{**SMALL, "dx_dots": dx_dots})
    with jax.default_matmul_precision("highest"):
        want_out = grouped_lora_dense(x, a, b, s, idx, w)
        want = jax.grad(loss(grouped_lora_dense), argnums=(0, 1, 2, 3, 4))(x, w, s, a, b)
    sums = {}
    for kept, max_blocks in ((True, 16), (False, 0)):
        monkeypatch.setattr(sorted_kernels, "COMBO_PARTS_MAX_COLUMN_BLOCKS", max_blocks)
        msg = f"seed={SEED} kept={kept} dx_dots={dx_dots}"
        assert _rel(pallas(x, a, b, s, idx, w), want_out) <= TOL[jnp.float32], msg
        for argnums in ((0, 1), (0, 1, 2), (1,), (0, 1, 2, 3, 4)):
            got = jax.grad(loss(pallas), argnums=argnums)(x, w, s, a, b)
            for i, v in zip(argnums, got):
                err = _rel(v, want[i])
                assert err <= TOL[jnp.float32], f"{msg} argnums={argnums}: d{'x w s a b'.split()[i]} rel err {err:.2e}"
        jaxpr = str(jax.make_jaxpr(jax.grad(loss(pallas), argnums=(0, 1)))(x, w, s, a, b))
        sums[kept] = jaxpr.count("reduce_sum")
    if dx_dots:
        assert sums[True] == sums[False] - 2, sums


def test_decode_routing_gradients_without_dx():
    """The decode path computes d expert_weight / d scaling inside its dx kernel; asked for them alone
    (x not differentiated) it takes them from XLA ops instead. Both against the float32 reference."""
    case = (9, 40, 33, 6, 5, 2)
    x, a, b, s, idx, w, _ = _inputs((_salt(case), 3), *case, jnp.float32)
    g = jnp.asarray(_rng(_salt(case), 4).standard_normal((case[0], case[2])), jnp.float32)

    def loss(fn):
        return lambda x, s, w: jnp.sum(fn(x, a, b, s, idx, w) * g)

    pallas = lambda *v: grouped_lora_pallas(  # noqa: E731
        *v, path="decode", poison=True, interpret=INTERPRET, **SMALL)
    with jax.default_matmul_precision("highest"):
        want = jax.grad(loss(grouped_lora_dense), argnums=(1, 2))(x, s, w)
    for argnums in ((1, 2), (0, 1, 2)):
        got = jax.jit(jax.grad(loss(pallas), argnums=argnums))(x, s, w)[-2:]
        for name, u, v in zip(("scaling", "expert_weight"), want, got):
            err = _rel(v, u)
            assert err <= TOL[jnp.float32], f"seed={SEED} argnums={argnums}: d{name} rel err {err:.2e}"


@pytest.mark.parametrize("gather_from", [1, 1 << 30], ids=["gathered", "full_reduction"])
def test_concat_routing_gradients(gather_from, monkeypatch):
    """The concat grad path's d expert_weight / d scaling, computed at the chosen adapters only (from
    ROUTING_GRAD_GATHER_MIN_TOKENS up) or from the reduction over all L*r columns, against the float32
    reference; one token's two slots hold the same adapter."""
    from pallas_kernels import grouped_lora_xla

    monkeypatch.setattr(grouped_lora_xla, "ROUTING_GRAD_GATHER_MIN_TOKENS", gather_from)
    case = (40, 24, 30, 7, 3, 2)
    x, a, b, s, idx, w, _ = _inputs((_salt(case), 5), *case, jnp.float32)
    idx = idx.at[0, 1].set(idx[0, 0])
    g = jnp.asarray(_rng(_salt(case), 6).standard_normal((case[0], case[2])), jnp.float32)

    def loss(fn):
        return lambda x, s, w: jnp.sum(fn(x, a, b, s, idx, w) * g)

    concat = lambda *v: grouped_lora_pallas(*v, path="auto", interpret=INTERPRET)  # noqa: E731
    assert default_config(case[0], 2, case[3], case[4]).grad_path == "concat"
    with jax.default_matmul_precision("highest"):
        want = jax.grad(loss(grouped_lora_dense), argnums=(0, 1, 2))(x, s, w)
    # with d scaling, and without it (gate training: scaling times <xa, gB> inside the reduction)
    for argnums in ((0, 1, 2), (0, 2)):
        got = jax.jit(jax.grad(loss(concat), argnums=argnums))(x, s, w)
        for name, u, v in zip(("x", "scaling", "expert_weight"), [want[i] for i in argnums], got):
            err = _rel(v, u)
            assert err <= TOL[jnp.float32], (f"seed={SEED} gather_from={gather_from} argnums={argnums}: d{name} "
                                             f"rel err {err:.2e}")


def test_routing_grads_match_a_loop_without_a_scatter():
    """`routing_grads` (every path's d scaling / d expert_weight from the pairs' <xa, gB>) against a
    float64 loop over the pairs, with a token whose two slots hold the same adapter and adapters with no
    pair. d scaling is a sum over a one-hot, not a scatter-add: XLA's GPU scatter adds in no fixed order
    and gave different bits on identical calls (H200, session 24), so the lowered program has none."""
    from pallas_kernels.grouped_lora_xla import routing_grads

    rng = _rng(7)
    t, k, num_adapters = 50, 3, 9
    raw = rng.standard_normal((t, k)).astype(np.float32)
    idx = np.stack([rng.permutation(num_adapters - 2)[:k] for _ in range(t)]).astype(np.int32)  # 7, 8 unused
    idx[0, 2] = idx[0, 0]
    w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, num_adapters).astype(np.float32)
    want_ds, want_dw = np.zeros(num_adapters), np.zeros((t, k))
    for i in range(t):
        for j in range(k):
            want_ds[idx[i, j]] += np.float64(raw[i, j]) * w[i, j]
            want_dw[i, j] = np.float64(raw[i, j]) * s[idx[i, j]]
    fn = jax.jit(lambda *v: routing_grads(*v, {"s", "w"}))
    ds, dw = fn(raw, idx, w, s)
    assert _rel(ds, want_ds) <= TOL[jnp.float32] and _rel(dw, want_dw) <= TOL[jnp.float32], f"seed={SEED}"
    assert np.all(np.asarray(ds)[7:] == 0), f"seed={SEED}: d scaling of adapters with no pair"
    assert "scatter" not in fn.lower(raw, idx, w, s).as_text(), "d scaling through a scatter-add"


@pytest.mark.parametrize("path", ["sorted", "combo"])
def test_sorted_routing_gradients_from_dx_expand(path):
    """The sorted and combo backward take <xa, gB> per (token, slot) pair from their dx expand: raw with
    d scaling, times scaling[e] in gate training (x and expert_weight only). Both against the float32
    reference, with k = 3 (the sorted plan's blocks hold a token's adapters in ascending order, not in
    expert_idx's slot order) and one token whose first and last slots hold the same adapter."""
    case = (37, 24, 30, 6, 5, 3)
    x, a, b, s, idx, w, _ = _inputs((_salt(case), 7), *case, jnp.float32)
    idx = idx.at[0, 2].set(idx[0, 0])
    g = jnp.asarray(_rng(_salt(case), 8).standard_normal((case[0], case[2])), jnp.float32)

    def loss(fn):
        return lambda x, s, w: jnp.sum(fn(x, a, b, s, idx, w) * g)

    pallas = lambda *v: grouped_lora_pallas(*v, path=path, poison=True, interpret=INTERPRET, **SMALL)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        want = jax.grad(loss(grouped_lora_dense), argnums=(0, 1, 2))(x, s, w)
    for argnums in ((0, 2), (0, 1, 2)):
        got = jax.jit(jax.grad(loss(pallas), argnums=argnums))(x, s, w)
        for name, u, v in zip(("x", "scaling", "expert_weight"), [want[i] for i in argnums], got):
            err = _rel(v, u)
            assert err <= TOL[jnp.float32], f"seed={SEED} path={path} argnums={argnums}: d{name} rel err {err:.2e}"


def _dot_precisions(jaxpr):
    """The precision of every dot_general / ragged_dot in a jaxpr, sub-jaxprs (custom VJPs) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "ragged_dot", "ragged_dot_general"):
            found.append(eqn.params["precision"])
        for sub in jaxprs_in_params(eqn.params):
            found += _dot_precisions(sub)
    return found


@pytest.mark.parametrize("impl", ["xla_dense", "xla_concat", "xla_gather", "xla_ragged", "pallas"])
def test_xla_products_take_float32_precision(impl):
    """float32 operands are multiplied at HIGHEST precision (on a GPU XLA's default may use TF32: the
    concat gradient path measured 3e-4 relative error on an H200 before), bfloat16 ones at the default."""
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for dtype in (jnp.float32, jnp.bfloat16):
        x, a, b, s, idx, w, _ = _inputs((9,), 40, 24, 30, 7, 3, 2, dtype)

        def loss(x, w, a, b, s, idx):
            out = grouped_lora(x, a, b, s, idx, w, impl=impl) if impl != "pallas" else grouped_lora_pallas(
                x, a, b, s, idx, w, path="auto", interpret=INTERPRET)  # the concat grad path at this size
            return jnp.sum(out.astype(jnp.float32))

        precisions = _dot_precisions(
            jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w, a, b, s, idx).jaxpr)
        assert precisions, impl
        want = highest if dtype == jnp.float32 else None
        assert all(p == want for p in precisions), (impl, jnp.dtype(dtype).name, precisions)


def test_lora_gradients_only_when_asked():
    x, a, b, s, idx, w, _ = _inputs((7,), 21, 20, 18, 4, 3, 2, jnp.float32)

    def loss(x, w, a, b, path="sorted"):
        return jnp.sum(grouped_lora_pallas(x, a, b, s, idx, w, path=path, interpret=INTERPRET, **SMALL) ** 2)

    gate_only = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w, a, b))
    mixlora = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w, a, b))
    assert "grouped_lora_tgmm" not in gate_only  # frozen LoRAs: no dA / dB kernels
    assert "grouped_lora_tgmm" in mixlora
    frozen = str(jax.make_jaxpr(jax.grad(
        lambda x, w, a, b: loss(x, w, jax.lax.stop_gradient(a), b), argnums=(0, 1, 2, 3)))(x, w, a, b))
    assert 0 < frozen.count("grouped_lora_tgmm") < mixlora.count("grouped_lora_tgmm")  # dB only
    # dA / dB are two extra XLA dot_generals. Without them the dense path has the 4 in its kernels'
    # bodies (shrink and expand, forward and backward), the concat grad path (auto here) 4 XLA GEMMs,
    # the decode path none (its kernels multiply and sum per token).
    # The XLA concat formulation's own VJP likewise: 4 GEMMs for gate training, 6 for MixLoRA.
    def xla_concat(x, w, a, b):
        return jnp.sum(grouped_lora(x, a, b, s, idx, w, impl="xla_concat") ** 2)

    for name, fn, gate_only_dots in (("dense", functools.partial(loss, path="dense"), 4),
                                     ("auto", functools.partial(loss, path="auto"), 4),
                                     ("decode", functools.partial(loss, path="decode"), 0),
                                     ("xla_concat", xla_concat, 4)):
        gate_only = str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(x, w, a, b)).count("dot_general")
        mixlora = str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2, 3)))(x, w, a, b)).count("dot_general")
        assert (gate_only, mixlora) == (gate_only_dots, gate_only_dots + 2), name


def test_auto_paths():
    cases = [(16, 8), (16, 64), (32, 8), (256, 64), (16384, 8), (2048, 16), (4096, 16), (16384, 16), (4096, 32),
             (4096, 64), (8192, 64), (4096, 8), (8192, 8), (2048, 64), (16384, 128), (4096, 128), (16384, 65),
             (128, 64), (256, 32)]
    paths = {(t, r): (c.path, c.grad_path) for t, r in cases for c in [default_config(t, 2, 28, r)]}
    assert paths == {(16, 8): ("decode", "decode"), (16, 64): ("decode", "decode"), (32, 8): ("decode", "concat"),
                     (256, 64): ("sorted", "sorted"), (16384, 8): ("combo", "combo"), (8192, 8): ("combo", "concat"),
                     (2048, 16): ("sorted", "concat"), (4096, 16): ("combo", "combo"),
                     (16384, 16): ("combo", "combo"), (4096, 32): ("combo", "combo"),
                     (4096, 64): ("sorted", "combo"), (8192, 64): ("combo", "combo"), (4096, 8): ("combo", "concat"),
                     (2048, 64): ("sorted", "sorted"), (16384, 128): ("sorted", "sorted"),
                     (4096, 128): ("sorted", "sorted"), (16384, 65): ("sorted", "sorted"),
                     (128, 64): ("sorted", "concat"), (256, 32): ("sorted", "concat")}
    assert default_config(4096, 2, 28, 8, path="dense").grad_path == "dense"
    # The sorted shrink's depth tile: 128 below the combo range, 64 in it and for the dense path.
    assert [default_config(t, 2, 28, 16, path=p).block_k for t, p in
            ((256, "auto"), (4096, "sorted"), (8192, "auto"), (4096, "dense"))] == [128, 128, 64, 64]
    # The combo expand's token tile: 32 up to rank 16, else 64.
    assert [default_config(16384, 2, 28, r).block_t_combo for r in (4, 8, 16, 17, 64)] == [32, 32, 32, 64, 64]
    assert default_config(16, 2, 28, 8, path="decode").grad_path == "decode"
    # decode depth chunks: from 16 pairs up 512 (256 at r = 128); below, at most 8192 elements of lora_a
    # per chunk
    assert [default_config(t, 2, 28, r).block_k_decode
            for t, r in ((16, 64), (16, 128), (1, 8), (1, 64), (1, 128))] == [512, 256, 512, 128, 128]
    # the backward's g @ lora_b^T shrink: at most 256-wide chunks
    assert [default_config(t, 2, 28, r).block_k_decode_grad
            for t, r in ((16, 64), (16, 128), (1, 8), (1, 64), (1, 128))] == [256, 256, 256, 128, 128]
    # the forward expand: 512 columns over d_out >= 8192 at r <= 16 from 16 pairs up, else 256
    assert [default_config(t, 2, 28, r, d_out=d).block_n_decode_out
            for t, r, d in ((16, 16, 14336), (8, 8, 8192), (16, 64, 14336), (16, 16, 4096), (1, 16, 14336),
                            (7, 16, 14336))] == [512, 512, 256, 256, 256, 256]


def test_under_scan_and_remat():
    """The model calls the kernel inside nn.scan and remat: grads through lax.scan + checkpoint."""
    x, a, b, s, idx, w, _ = _inputs((11,), 26, 24, 24, 5, 4, 2, jnp.float32)
    stack = lambda v: jnp.stack([v, v * 0.5])  # noqa: E731

    def model(impl, x, w):
        def layer(h, params):
            a_l, b_l = params
            return h + grouped_lora(h, a_l, b_l, s, idx, w, impl=impl), None

        def run(x, w):
            return jnp.sum(jax.lax.scan(jax.checkpoint(layer), x, (stack(a), stack(b)))[0] ** 2)

        return run(x, w)

    with jax.default_matmul_precision("highest"):
        want = jax.grad(lambda x, w: model("xla", x, w), argnums=(0, 1))(x, w)
    got = jax.jit(jax.grad(lambda x, w: model("pallas", x, w), argnums=(0, 1)))(x, w)
    for u, v in zip(want, got):
        assert _rel(v, u) <= 1e-5, f"seed={SEED}"


@pytest.mark.parametrize("impl", IMPLS)
def test_dispatcher(impl):
    x, a, b, s, idx, w, base = _inputs((3,), 9, 16, 12, 4, 2, 2, jnp.float32)
    ref = _reference(x, a, b, s, idx, w)
    assert _rel(grouped_lora(x, a, b, s, idx, w, impl=impl), ref) <= 1e-5
    assert _rel(grouped_lora(x, a, b, s, idx, w, impl=impl, base=base), ref + base) <= 1e-5


def test_dispatcher_auto_rule(monkeypatch):
    """impl="auto": XLA dense on a CPU; on a GPU (the backend faked here) the measured rule of
    `_auto_impl`: Pallas up to 32 tokens and above rank 16, XLA concat below 4096 tokens at r <= 8 and
    below 384 at r <= 16."""
    from pallas_kernels.grouped_lora import _auto_impl

    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # (the suite also runs on a GPU)
    assert _auto_impl(256, 8) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    want = {(1, 8): "pallas", (32, 64): "pallas", (33, 8): "xla_concat", (2048, 8): "xla_concat",
            (4095, 8): "xla_concat", (4096, 8): "pallas", (383, 16): "xla_concat", (384, 16): "pallas",
            (256, 12): "xla_concat", (33, 17): "pallas", (256, 64): "pallas", (16384, 16): "pallas",
            (5, 128): "pallas", (5, 200): "xla", (100, 200): "xla"}  # the kernels refuse r > 128
    assert {shape: _auto_impl(*shape) for shape in want} == want


@pytest.mark.parametrize("impl", IMPLS)
def test_no_tokens_and_integer_inputs(impl):
    """T = 0 gives [0, d_out] (base, when given) on every impl (xla_concat divided by zero); an
    integer x is refused (it came back as integer garbage)."""
    x, a, b, s, idx, w, _ = _inputs((5,), 4, 16, 12, 3, 2, 2, jnp.float32)
    base = jnp.zeros((0, 12), jnp.float32)
    assert grouped_lora(x[:0], a, b, s, idx[:0], w[:0], impl=impl).shape == (0, 12)
    assert grouped_lora(x[:0], a, b, s, idx[:0], w[:0], impl=impl, base=base).shape == (0, 12)
    with pytest.raises(ValueError, match="x must hold floating-point values, got dtype int32"):
        grouped_lora(x.astype(jnp.int32), a, b, s, idx, w, impl=impl)


def _loop(x, a, b, s, idx, w):
    """The contract by hand, in float64: out[t] = sum_j w[t, j] * s[e] * (x[t] @ a[e]) @ b[e]."""
    x, a, b, s, w = (np.asarray(v, np.float64) for v in (x, a, b, s, w))
    out = np.zeros((x.shape[0], b.shape[2]))
    for t, j in np.ndindex(*np.shape(idx)):
        e = int(idx[t, j])
        out[t] += w[t, j] * s[e] * (x[t] @ a[e]) @ b[e]
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_an_unchosen_adapters_scaling_is_not_read(impl):
    """Only the chosen adapters' scaling enters a token's output, as the contract says: an infinite
    scaling on an adapter no token chose gave NaN in every row (and NaN gradients) on the dense and
    concat formulations, which scaled the dense [T, L] weights after building them."""
    x, a, b, s, idx, w, _ = _inputs((14,), 20, 16, 12, 5, 2, 2, jnp.float32, routing="few")  # adapters 3, 4 unused
    assert not np.isin(np.asarray(idx), [3, 4]).any()
    inf = s.at[4].set(jnp.inf)
    got = grouped_lora(x, a, b, inf, idx, w, impl=impl)
    assert _rel(got, _loop(x, a, b, s, idx, w)) <= 1e-5, f"seed={SEED}"
    loss = lambda s, x, w: jnp.sum(grouped_lora(x, a, b, s, idx, w, impl=impl) ** 2)  # noqa: E731
    for argnums in ((1,), (1, 2)):  # d x alone (gate training's other paths) and with d expert_weight
        grad = jax.grad(loss, argnums=argnums)
        for got, want in zip(grad(inf, x, w), grad(s, x, w)):
            assert _rel(got, want) <= 1e-5, f"seed={SEED}, argnums {argnums}"


@pytest.mark.parametrize("impl", IMPLS)
def test_narrow_index_types_and_empty_feature_dims(impl):
    """uint8 indices with more than 256 adapters (the dense and concat formulations compared them
    with a uint8 range of adapters, which wraps around: index 1 also matched adapter 257); d_in = 0
    or d_out = 0 (a zero or empty product; the Pallas paths raised gather or division errors)."""
    x, a, b, s, idx, w, base = _inputs((15,), 7, 8, 6, 260, 2, 2, jnp.float32)
    idx = jnp.asarray(_rng(15, 1).integers(0, 256, idx.shape), jnp.int32).at[0].set(jnp.array([1, 2]))  # 257, 258 wrapped
    want = grouped_lora(x, a, b, s, idx, w, impl=impl)
    assert _rel(want, _loop(x, a, b, s, idx, w)) <= 1e-5, f"seed={SEED}"
    np.testing.assert_array_equal(grouped_lora(x, a, b, s, idx.astype(jnp.uint8), w, impl=impl), want)
    np.testing.assert_array_equal(grouped_lora(x[:, :0], a[:, :0], b, s, idx, w, impl=impl, base=base), base)
    assert grouped_lora(x, a, b[:, :, :0], s, idx, w, impl=impl).shape == (7, 0)


@pytest.mark.parametrize("path", ["sorted", "combo"])
def test_plan_kernels_with_x64_on(path):
    """With jax_enable_x64 on (a user's setting), the Pallas plan kernels keep their integer sums in
    int32: an int64 sum stored into an int32 buffer failed to trace ("Invalid dtype for swap")."""
    x, a, b, s, idx, w, _ = _inputs((16,), 33, 16, 12, 3, 2, 2, jnp.float32)
    with jax.enable_x64(True):
        got = grouped_lora_pallas(x, a, b, s, idx, w, path=path, interpret=INTERPRET)  # plan="pallas", the default
    assert _rel(got, _loop(x, a, b, s, idx, w)) <= 1e-5, f"seed={SEED}"


def test_rejects_bad_arguments():
    x, a, b, s, idx, w, _ = _inputs((5,), 4, 16, 12, 3, 2, 2, jnp.float32)
    with pytest.raises(ValueError, match="impl"):
        grouped_lora(x, a, b, s, idx, w, impl="cuda")
    with pytest.raises(ValueError, match="power of two"):
        grouped_lora_pallas(x, a, b, s, idx, w, block_t=24)
    with pytest.raises(ValueError, match="plan must be"):
        grouped_lora_pallas(x, a, b, s, idx, w, path="sorted", plan="sort")
    with pytest.raises(ValueError, match="rank"):
        grouped_lora_pallas(x, jnp.zeros((3, 16, 129)), jnp.zeros((3, 129, 12)), s, idx, w)


@pytest.mark.parametrize("impl", IMPLS)
def test_rejects_bad_inputs_for_every_impl(impl):
    """Inputs that some impls would take silently (a broadcast base, float or out-of-range indices) or
    that fail deep inside an impl: one ValueError naming the argument, whatever the impl."""
    x, a, b, s, idx, w, base = _inputs((6,), 4, 16, 12, 3, 2, 2, jnp.float32)
    call = functools.partial(grouped_lora, impl=impl)
    for args, kwargs, message in (
        ((x, a[0], b, s, idx, w), {}, r"lora_a must be \[L, d_in, r\]"),
        ((x, a, b[0], s, idx, w), {}, r"lora_b \[L, r, d_out\]"),
        ((x, a, b, s, idx[:, 0], w[:, 0]), {}, r"must both be \[T, k\]"),
        ((x, a, b, s, idx.astype(jnp.float32), w), {}, "expert_idx must hold integer adapter indices"),
        ((x, a, b, s, idx.at[1, 0].set(3), w), {}, r"expert_idx holds 3, outside \[0, L\) for L=3"),
        ((x, a, b, s, idx.at[2, 1].set(-1), w), {}, r"expert_idx holds -1, outside \[0, L\)"),
        ((x, a, b, s, idx, w), {"base": base[:1]}, r"base must be \[T, d_out\]=\[4, 12\], got \(1, 12\)"),
        ((x, a, b, 2.0, idx, w), {}, r"scaling must be \[L\]=\[3\], got \(\)"),  # a number, not [L]
    ):
        with pytest.raises(ValueError, match=message):
            call(*args, **kwargs)
    # numpy arrays and lists are arrays too (they were AttributeErrors): the same result as jax arrays
    as_numpy = [np.asarray(v) for v in (x, a, b, s, idx, w)]
    want = call(x, a, b, s, idx, w)
    np.testing.assert_array_equal(call(*as_numpy[:3], as_numpy[3].tolist(), *as_numpy[4:]), want)


def test_rank_padded():
    """lora_a padded to rank R = pow2_at_least(r) (>= 16) with zero columns; unchanged when r == R."""
    from pallas_kernels.grouped_lora_pallas import rank_padded

    for rank, padded in ((1, 16), (8, 16), (16, 16), (20, 32), (64, 64)):
        a = jnp.asarray(_rng(rank, 11).standard_normal((3, 40, rank)), jnp.bfloat16)
        got = rank_padded(a)
        assert got.shape == (3, 40, padded) and got.dtype == a.dtype
        assert bool(jnp.array_equal(got[:, :, :rank], a)) and not bool(jnp.any(got[:, :, rank:]))
