"""The fused inference layout (`meteora_jax.fused_layout`, `layers.FusedProjections`) against the
separate-projection model it is converted from, and its Pallas kernels (interpret mode on CPU)
against their XLA references: the routing step (`fill_lora_columns_pallas` vs `fill_lora_columns`)
and the side GEMM (`side_products_pallas` vs `side_products` and a float64 product).

Fresh random inputs every run (the seed is printed in every assertion message). Tolerances: relative
error <= 1e-5 in float32 (logits of the whole model, gate logits, also the bfloat16 side GEMM's gate
logits against float64), <= 1e-2 in bfloat16 (the kernel's h columns, which are rounded to bfloat16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax import LlamaForCausalLM, MeteoRAConfig, ModelConfig, Routing, init_params
from meteora_jax.fused_layout import fuse_layer, fuse_projections
from meteora_jax.generate import Generator
from meteora_jax.model import unstack_layers
from pallas_kernels.lora_columns import (
    extended_width,
    fill_lora_columns,
    side_products,
    side_weight,
    split_side_products,
)
from pallas_kernels.lora_columns_pallas import fill_lora_columns_pallas, side_kernel_splits, side_products_pallas

SEED = np.random.SeedSequence().entropy


def _config(dtype="float32", impl="xla", targets=None, num_adapters=3, top_k=2):
    meteora = MeteoRAConfig(num_adapters=num_adapters, rank=4, top_k=top_k, kernel_impl=impl,
                            **({} if targets is None else dict(targets=targets)))
    return ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, dtype=dtype, param_dtype=dtype, meteora=meteora)


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _both_layouts(config, seed):
    """(separate unrolled params, fused params) of one random model; scalings made distinct."""
    params = unstack_layers(init_params(config, jax.random.key(seed)), config.num_layers)
    rng = np.random.default_rng(seed)

    def distinct_scaling(path, leaf):
        if path[-1].key == "lora_scaling":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
        return leaf

    params = jax.tree_util.tree_map_with_path(distinct_scaling, params)
    return params, fuse_projections(params, config)


# Both kernel implementations on the default shape (k = 2) and with no adapters; the adapter subset
# with k = 1 on XLA and k = L on the Pallas kernels (interpret mode: 1-2 minutes per case on a CPU).
@pytest.mark.parametrize(
    "impl, targets, num_adapters, top_k",
    [("xla", None, 3, 2), ("pallas", None, 3, 2), ("xla", ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"), 3, 1),
     ("pallas", None, 4, 4), ("xla", None, 0, 2), ("pallas", None, 0, 2)],
)
def test_fused_model_matches_separate_projections(impl, targets, num_adapters, top_k):
    """Whole-model logits and every gate's logits, gate routing with a temperature and forced
    routing, float32: the fused model equals the separate one within 1e-5."""
    config = _config(impl=impl, targets=targets, num_adapters=num_adapters, top_k=top_k)
    seed = SEED % 2**31
    separate, fused = _both_layouts(config, seed)
    ids = jax.random.randint(jax.random.key(seed + 1), (2, 7), 0, config.vocab_size)
    mask = jnp.ones(ids.shape, bool).at[0, :2].set(False)  # a left-padded row
    routings = [Routing(temperature=jnp.float32(1.7))]
    if num_adapters:
        routings.append(Routing.force_adapter(num_adapters - 1, num_adapters))
    for routing in routings:
        # Float32 products everywhere (a GPU would otherwise run the reference's matmuls in TF32).
        with jax.default_matmul_precision("highest"):
            want = LlamaForCausalLM(config, scan_layers=False).apply({"params": separate}, ids, mask, routing=routing)
            got = LlamaForCausalLM(config, scan_layers=False, fused_projections=True).apply(
                {"params": fused}, ids, mask, routing=routing)
        assert _rel(got.logits, want.logits) < 1e-5, f"seed {SEED}, {routing}"
        assert sorted(got.gate_logits) == sorted(want.gate_logits)
        for name in want.gate_logits:
            assert _rel(got.gate_logits[name], want.gate_logits[name]) < 1e-5, f"seed {SEED}, {name}"


def test_bad_routing_temperature_is_refused_by_every_layout():
    """A temperature of 0 (NaN logits) or below 0 (favours the lowest-scoring adapters): the fused
    layout never reached routed_lora's check, and neither did the jitted token_routing."""
    from meteora_jax.generate import token_routing

    config = _config()
    separate, fused = _both_layouts(config, 0)
    ids = jnp.ones((1, 3), jnp.int32)
    for temperature in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="routing temperature must be a finite number > 0"):
            LlamaForCausalLM(config, scan_layers=False, fused_projections=True).apply(
                {"params": fused}, ids, routing=Routing(temperature=temperature))
        with pytest.raises(ValueError, match="routing temperature must be a finite number > 0"):
            token_routing(config, init_params(config, jax.random.key(0)), [1, 2, 3], Routing(temperature=temperature))


def test_lora_dropout_is_refused_by_the_fused_layout():
    """The inference layout has no dropout step: a Routing with lora_dropout (a training option) is
    named, not ignored; the separate layout drops out, scanned or unrolled."""
    config = _config()
    separate, fused = _both_layouts(config, 0)
    ids = jnp.ones((1, 5), jnp.int32)
    with pytest.raises(ValueError, match="lora_dropout is a training option: the fused inference layout"):
        LlamaForCausalLM(config, scan_layers=False, fused_projections=True).apply(
            {"params": fused}, ids, routing=Routing(lora_dropout=0.1), rngs={"dropout": jax.random.key(0)})
    plain = LlamaForCausalLM(config, scan_layers=False).apply({"params": separate}, ids).logits
    dropped = LlamaForCausalLM(config, scan_layers=False).apply(
        {"params": separate}, ids, routing=Routing(lora_dropout=0.5), rngs={"dropout": jax.random.key(0)}).logits
    assert np.isfinite(np.asarray(dropped)).all() and not np.allclose(dropped, plain)
    stacked = init_params(config, jax.random.key(0))
    scanned = LlamaForCausalLM(config).apply(
        {"params": stacked}, ids, routing=Routing(lora_dropout=0.5), rngs={"dropout": jax.random.key(0)}).logits
    assert np.isfinite(np.asarray(scanned)).all()
    assert not np.allclose(scanned, LlamaForCausalLM(config).apply({"params": stacked}, ids).logits)


def test_fused_single_token_matches_separate():
    """One token (a B = 1 decode step's shape, where the side GEMM runs as `side_products_pallas`):
    the fused model with the Pallas kernels equals the separate one within 1e-5 in float32."""
    config = _config(impl="pallas")
    seed = SEED % 2**31
    separate, fused = _both_layouts(config, seed)
    ids = jax.random.randint(jax.random.key(seed + 1), (1, 1), 0, config.vocab_size)
    routing = Routing(temperature=jnp.float32(0.8))
    with jax.default_matmul_precision("highest"):
        want = LlamaForCausalLM(config, scan_layers=False).apply({"params": separate}, ids, routing=routing)
        got = LlamaForCausalLM(config, scan_layers=False, fused_projections=True).apply(
            {"params": fused}, ids, routing=routing)
    assert _rel(got.logits, want.logits) < 1e-5, f"seed {SEED}"
    for name in want.gate_logits:
        assert _rel(got.gate_logits[name], want.gate_logits[name]) < 1e-5, f"seed {SEED}, {name}"


@pytest.mark.parametrize("n", [1, 3])
def test_bfloat16_side_logits_are_float32_accurate(n):
    """In bfloat16 the gates are stored as two bfloat16 halves: the side GEMM's gate logits agree with
    x @ gate computed in float64 within 1e-5 (the halves leave ~2^-17 of |gate|), and its x @ lora_a
    columns with float64 within bfloat16 input rounding of lora_a (exact products, float32 sums)."""
    rng = np.random.default_rng([SEED % 2**63, n])
    depth, num_adapters, rank, t = 96, 5, 4, 7
    x = jnp.asarray(rng.standard_normal((t, depth)), jnp.bfloat16)
    gates = [jnp.asarray(rng.standard_normal((depth, num_adapters)), jnp.float32) for _ in range(n)]
    lora_as = [jnp.asarray(rng.standard_normal((num_adapters, depth, rank)), jnp.bfloat16) for _ in range(n)]
    weight = side_weight(lora_as, gates, jnp.bfloat16)
    assert weight.shape == (depth, n * num_adapters * (rank + 2))
    xa, logits = split_side_products(jnp.dot(x, weight, preferred_element_type=jnp.float32), n,
                                     num_adapters, rank)
    x64 = np.asarray(x, np.float64)
    for j in range(n):
        want_logits = x64 @ np.asarray(gates[j], np.float64)
        want_xa = np.einsum("td,ldr->tlr", x64, np.asarray(lora_as[j], np.float64))
        assert _rel(logits[:, j], want_logits) < 1e-5, f"seed {SEED}, projection {j}"
        assert _rel(xa[:, j], want_xa) < 1e-6, f"seed {SEED}, projection {j}"


@pytest.mark.parametrize("splits", [1, 4, 16])
def test_side_products_sum_to_the_side_gemm(splits):
    """The partial products over slices of the contracting dimension sum to x @ S (float32,
    exact products: 1e-5 for the summation order)."""
    rng = np.random.default_rng([SEED % 2**63, splits])
    t, depth, columns = 9, 128, 40
    x = jnp.asarray(rng.standard_normal((t, depth)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((depth, columns)), jnp.float32)
    got = side_products(x, weight, splits, precision=jax.lax.Precision.HIGHEST)
    assert got.shape == (splits, t, columns)
    want = np.asarray(x, np.float64) @ np.asarray(weight, np.float64)
    assert _rel(got.sum(axis=0), want) < 1e-5, f"seed {SEED}"
    with pytest.raises(ValueError, match="multiple of splits=3"):
        side_products(x, weight, 3)
    with pytest.raises(ValueError, match="d_in=128 rows"):
        side_products(x, weight[:100], 1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "t, depth, columns, splits, block_c, block_k",
    [(1, 4096, 840, None, 64, 128), (3, 100, 37, 4, 16, 16), (20, 72, 130, 3, 32, 16), (33, 64, 16, 8, 16, 32)],
)
def test_side_kernel_matches_reference(dtype, t, depth, columns, splits, block_c, block_k):
    """Partials of the side kernel sum to x @ S in float64 (1e-5 in float32; in bfloat16 the
    products of bf16 inputs are exact and summed in float32, so 1e-5 holds too), for T, d_in and C
    off the tiles and more splits than d_in has chunks (the trailing partials are zeros)."""
    rng = np.random.default_rng([SEED % 2**63, t, depth, columns])
    x = jnp.asarray(rng.standard_normal((t, depth)), dtype)
    weight = jnp.asarray(rng.standard_normal((depth, columns)), dtype)
    got = jax.jit(lambda x, w: side_products_pallas(x, w, splits=splits, block_c=block_c, block_k=block_k))(x, weight)
    assert got.shape == (splits or side_kernel_splits(depth, block_k), t, columns) and got.dtype == jnp.float32
    assert not np.isnan(np.asarray(got)).any(), f"seed {SEED}: unwritten partials"
    want = np.asarray(x, np.float64) @ np.asarray(weight, np.float64)
    assert _rel(got.sum(axis=0), want) < 1e-5, f"seed {SEED}"
    with pytest.raises(ValueError, match="power of two"):
        side_products_pallas(x, weight, block_c=48)


def _fill_inputs(case, dtype, *, t, n, num_adapters, rank, parts, depth, splits=None):
    """x, side products ([t, C], or [splits, t, C] partials), scaling."""
    rng = np.random.default_rng([SEED % 2**63, *case])
    shape = (t, n * num_adapters * rank + parts * n * num_adapters)
    side = jnp.asarray(rng.standard_normal(shape if splits is None else (splits, *shape)), jnp.float32)
    scaling = jnp.asarray(rng.uniform(0.5, 2.0, (n, num_adapters)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((t, depth)), dtype)
    return x, side, scaling


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "t, n, num_adapters, rank, top_k, splits, depth",
    [(1, 3, 28, 8, 2, None, 24), (5, 1, 6, 4, 1, 16, 24), (40, 2, 5, 3, 5, None, 600), (33, 3, 4, 1, 2, 3, 1100),
     (2, 1, 6, 8, 2, 40, 520)],
)
def test_fill_kernel_matches_reference(dtype, t, n, num_adapters, rank, top_k, splits, depth):
    """splits: the side products as that many partials, which kernel and reference sum. depth: d_in,
    below and above one copy block. Interpret mode starts the output as NaN, so an element the
    kernel does not write shows."""
    parts = 1 if dtype == jnp.float32 else 2
    x, side, scaling = _fill_inputs((t, n, num_adapters, rank, top_k), dtype, t=t, n=n,
                                    num_adapters=num_adapters, rank=rank, parts=parts, depth=depth, splits=splits)
    temperature = jnp.float32(1.7)
    want, want_logits = fill_lora_columns(x, side, scaling, Routing(temperature=temperature).select,
                                          rank=rank, top_k=top_k)
    got, got_logits = jax.jit(
        lambda *a: fill_lora_columns_pallas(*a, rank=rank, top_k=top_k, block_t=8 if t > 8 else None)
    )(x, side, scaling, temperature)
    columns = n * num_adapters * rank
    assert got.shape == (t, extended_width(depth, columns)) == want.shape
    assert not np.isnan(np.asarray(got, np.float32)).any(), f"seed {SEED}: unwritten columns"
    np.testing.assert_array_equal(np.asarray(got[:, :depth]), np.asarray(x))
    assert not np.asarray(got[:, depth + columns:], np.float32).any(), "the tail must be zeros"
    assert _rel(got, want) < (1e-5 if dtype == jnp.float32 else 1e-2), f"seed {SEED}"
    assert _rel(got_logits, want_logits) < 1e-6, f"seed {SEED}"


@pytest.mark.parametrize("t, splits", [(1, 1), (1, 16), (1, 40), (32, 16), (512, 4), (16384, 1)])
def test_kernels_lower_to_triton(t, splits):
    """Both kernels lower to Triton IR for a CUDA GPU at the model's shapes (q/k/v group of
    LLaMA-3-8B, bf16), here on the CPU: a GPU-only lowering error shows in CI."""
    x = jax.ShapeDtypeStruct((t, 4096), jnp.bfloat16)
    side = jax.ShapeDtypeStruct((splits, t, 3 * 28 * 10), jnp.float32)
    scaling = jax.ShapeDtypeStruct((3, 28), jnp.float32)
    fill = jax.jit(lambda x, s, c: fill_lora_columns_pallas(x, s, c, 1.0, rank=8, top_k=2, interpret=False))
    weight = jax.ShapeDtypeStruct((4096, 3 * 28 * 10), jnp.bfloat16)
    side_gemm = jax.jit(lambda x, w: side_products_pallas(x, w, interpret=False))
    for lowered in (fill.trace(x, side, scaling).lower(lowering_platforms=("cuda",)),
                    side_gemm.trace(x, weight).lower(lowering_platforms=("cuda",))):
        assert "xla.gpu.triton" in lowered.as_text(), "no Triton kernel in the lowered program"


def test_fill_kernel_ties_and_nan_rows():
    """Equal logits go to the lowest adapter index (as lax.top_k); a NaN token's row is NaN in its
    own columns and leaves the other tokens alone."""
    depth, n, num_adapters, rank = 16, 2, 5, 2
    x, side, scaling = _fill_inputs((7,), jnp.float32, t=4, n=n, num_adapters=num_adapters, rank=rank,
                                    parts=1, depth=depth)
    columns = n * num_adapters * rank
    side = side.at[0, columns:].set(0.25)  # token 0: every gate logit equal
    side = side.at[3, :].set(jnp.nan)
    want, _ = fill_lora_columns(x, side, scaling, Routing().select, rank=rank, top_k=2)
    got, _ = fill_lora_columns_pallas(x, side, scaling, 1.0, rank=rank, top_k=2)
    h = np.asarray(got[:, depth:depth + columns]).reshape(4, n, num_adapters, rank)
    assert np.all(h[0, :, 2:] == 0) and np.all(h[0, :, :2] != 0), "ties must pick adapters 0 and 1"
    assert _rel(got[:3], want[:3]) < 1e-5, f"seed {SEED}"
    assert np.isnan(h[3]).any()


def test_fuse_projections_rejects_other_layouts():
    config = _config()
    scanned = init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="layers_0"):
        fuse_projections(scanned, config)
    layer = unstack_layers(scanned, config.num_layers)["layers_0"]
    plain = _config(num_adapters=0)
    with pytest.raises(ValueError, match="q_proj: adapters present"):
        fuse_layer(layer, plain, where="layers_0")
    broken = {**layer, "mlp": {k: v for k, v in layer["mlp"].items() if k != "up_proj"}}
    with pytest.raises(ValueError, match="no 'up_proj'"):
        fuse_layer(broken, config, where="layers_0")


def test_generator_layouts_agree():
    """The default (fused) generator, the unrolled one and the scanned one generate the same greedy
    tokens from the same float32 weights; fused projections need the unrolled layout."""
    config = _config()
    params = init_params(config, jax.random.key(SEED % 2**31))
    prompts = [[5, 17, 3, 40], [9, 8, 7, 6, 5, 4, 3, 2]]
    fused = Generator(config, params)
    assert fused.fused_projections and "qkv_proj" in fused.params["layers_0"]["self_attn"]
    others = (Generator(config, params, fused_projections=False), Generator(config, params, scan_layers=True))
    outs = [g.generate(prompts, max_new_tokens=6).tokens.tolist() for g in (fused, *others)]
    assert outs[0] == outs[1] == outs[2], f"seed {SEED}"
    with pytest.raises(ValueError, match="unrolled"):
        Generator(config, params, scan_layers=True, fused_projections=True)
