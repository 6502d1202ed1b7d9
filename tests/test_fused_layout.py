"""The fused inference layout (`meteora_jax.fused_layout`, `layers.FusedProjections`) against the
separate-projection model it is converted from, and the Pallas routing kernel
(`fill_lora_columns_pallas`, interpret mode on CPU) against its XLA reference (`fill_lora_columns`).

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
from pallas_kernels.lora_columns_pallas import fill_lora_columns_pallas

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


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize(
    "targets, num_adapters, top_k",
    [(None, 3, 2), (("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"), 3, 1), (None, 4, 4), (None, 0, 2)],
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
    x_ext = jnp.pad(x, ((0, 0), (0, weight.shape[0] - depth)))
    xa, logits = split_side_products(jnp.dot(x_ext, weight, preferred_element_type=jnp.float32), n,
                                     num_adapters, rank)
    x64 = np.asarray(x, np.float64)
    for j in range(n):
        want_logits = x64 @ np.asarray(gates[j], np.float64)
        want_xa = np.einsum("td,ldr->tlr", x64, np.asarray(lora_as[j], np.float64))
        assert _rel(logits[:, j], want_logits) < 1e-5, f"seed {SEED}, projection {j}"
        assert _rel(xa[:, j], want_xa) < 1e-6, f"seed {SEED}, projection {j}"


@pytest.mark.parametrize("splits", [1, 4, 16])
def test_side_products_sum_to_the_side_gemm(splits):
    """The partial products over slices of the contracting dimension sum to x_ext @ S (float32,
    exact products: 1e-5 for the summation order)."""
    rng = np.random.default_rng([SEED % 2**63, splits])
    t, width, columns = 9, 128, 40
    x_ext = jnp.asarray(rng.standard_normal((t, width)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((width, columns)), jnp.float32)
    got = side_products(x_ext, weight, splits, precision=jax.lax.Precision.HIGHEST)
    assert got.shape == (splits, t, columns)
    want = np.asarray(x_ext, np.float64) @ np.asarray(weight, np.float64)
    assert _rel(got.sum(axis=0), want) < 1e-5, f"seed {SEED}"
    with pytest.raises(ValueError, match="multiple of splits=3"):
        side_products(x_ext, weight, 3)


def _fill_inputs(case, dtype, *, t, n, num_adapters, rank, parts, depth, splits=None):
    """x_ext with poisoned h columns, side products ([t, C], or [splits, t, C] partials), scaling."""
    rng = np.random.default_rng([SEED % 2**63, *case])
    columns = n * num_adapters * rank
    shape = (t, columns + parts * n * num_adapters)
    side = jnp.asarray(rng.standard_normal(shape if splits is None else (splits, *shape)), jnp.float32)
    scaling = jnp.asarray(rng.uniform(0.5, 2.0, (n, num_adapters)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((t, depth)), dtype)
    x_ext = jnp.pad(x, ((0, 0), (0, extended_width(depth, columns) - depth)))
    # The h columns are poisoned: the kernel must write every one of them.
    x_ext = x_ext.at[:, depth:depth + columns].set(jnp.nan)
    return x_ext, side, scaling


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "t, n, num_adapters, rank, top_k, splits",
    [(1, 3, 28, 8, 2, None), (5, 1, 6, 4, 1, 16), (40, 2, 5, 3, 5, None), (33, 3, 4, 1, 2, 3)],
)
def test_fill_kernel_matches_reference(dtype, t, n, num_adapters, rank, top_k, splits):
    """splits: the side products as that many partials, which kernel and reference sum."""
    parts = 1 if dtype == jnp.float32 else 2
    depth = 24
    x_ext, side, scaling = _fill_inputs((t, n, num_adapters, rank, top_k), dtype, t=t, n=n,
                                        num_adapters=num_adapters, rank=rank, parts=parts, depth=depth,
                                        splits=splits)
    temperature = jnp.float32(1.7)
    want, want_logits = fill_lora_columns(x_ext, side, scaling, Routing(temperature=temperature).select,
                                          depth=depth, rank=rank, top_k=top_k)
    got, got_logits = jax.jit(
        lambda *a: fill_lora_columns_pallas(*a, depth=depth, rank=rank, top_k=top_k, block_t=8 if t > 8 else None)
    )(x_ext, side, scaling, temperature)
    assert not np.isnan(np.asarray(got, np.float32)).any(), f"seed {SEED}: unwritten h columns"
    np.testing.assert_array_equal(np.asarray(got[:, :depth]), np.asarray(x_ext[:, :depth]))
    assert _rel(got, want) < (1e-5 if dtype == jnp.float32 else 1e-2), f"seed {SEED}"
    assert _rel(got_logits, want_logits) < 1e-6, f"seed {SEED}"


def test_fill_kernel_ties_and_nan_rows():
    """Equal logits go to the lowest adapter index (as lax.top_k); a NaN token's row is NaN in its
    own columns and leaves the other tokens alone."""
    depth, n, num_adapters, rank = 16, 2, 5, 2
    x_ext, side, scaling = _fill_inputs((7,), jnp.float32, t=4, n=n, num_adapters=num_adapters, rank=rank,
                                        parts=1, depth=depth)
    columns = n * num_adapters * rank
    side = side.at[0, columns:].set(0.25)  # token 0: every gate logit equal
    side = side.at[3, :].set(jnp.nan)
    want, _ = fill_lora_columns(x_ext, side, scaling, Routing().select, depth=depth, rank=rank, top_k=2)
    got, _ = fill_lora_columns_pallas(x_ext, side, scaling, 1.0, depth=depth, rank=rank, top_k=2)
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
