"""The unrolled decoder layout (inference) against the scanned one (training, checkpoints): the
same logits, gate logits and KV cache from the same weights, lossless conversion between the two
layouts, and remat in the unrolled layout.

Tolerances: both layouts run the same fp32 operations in the same order, but XLA fuses a scanned
body and an unrolled chain of layers differently, so the results may differ in the last bits:
relative error (norm of the difference / norm of the reference) <= 1e-5, about 80 float32 ulps.
Measured on CPU over 1176 comparisons (12 fresh seeds of the decode test): median 1.9e-7, 99th
percentile 6.5e-7, max 1.03e-6: the earlier bound of 1e-6 failed once in those 1176, about one
CI run in twelve (a run makes 98 comparisons). A real layout bug (a wrong layer, cache slot or
mask) moves the logits by orders of magnitude more.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from meteora_jax import KVCache, LlamaForCausalLM, MeteoRAConfig, ModelConfig, init_params
from meteora_jax.model import param_logical_axes, stack_layers, unstack_layers
from torch_reference import relative_error

pytestmark = pytest.mark.usefixtures("float32_matmuls_module")  # float32 parity, also on a GPU (no TF32)

_BASE = dict(
    vocab_size=101, hidden_size=48, intermediate_size=72, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=8
)
CONFIGS = {
    "meteora": ModelConfig(**_BASE, meteora=MeteoRAConfig(num_adapters=4, rank=3, top_k=2)),
    "plain": ModelConfig(**_BASE, meteora=MeteoRAConfig(num_adapters=0)),
}
RTOL = 1e-5


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def _apply(config, scan_layers):
    model = LlamaForCausalLM(config, scan_layers=scan_layers)
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a))


def _assert_same_outputs(got, want, valid, context):
    """got/want: ModelOutput; valid: [B, S] bool (padding rows are excluded)."""
    assert relative_error(got.logits, want.logits, valid) <= RTOL, context
    assert set(got.gate_logits) == set(want.gate_logits), context
    for name, w in want.gate_logits.items():
        g = got.gate_logits[name]
        assert g.shape == w.shape, (context, name, g.shape, w.shape)  # [num_layers, B, S, L]
        assert relative_error(g, w, np.broadcast_to(valid[None, :, :, None], w.shape)) <= RTOL, (context, name)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stack_of_unstack_is_exact(name):
    config = CONFIGS[name]
    params = init_params(config, jax.random.key(_fresh_seed()))
    unrolled = unstack_layers(params, config.num_layers)
    # The converted tree is exactly the one the unrolled model declares.
    declared = jax.eval_shape(
        lambda: LlamaForCausalLM(config, scan_layers=False).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    )
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert shapes(nn.unbox(declared["params"])) == shapes(unrolled)
    assert "layers" not in unrolled and f"layers_{config.num_layers - 1}" in unrolled

    for tree in (params, jax.device_get(params)):  # jax and numpy leaves
        back = stack_layers(unstack_layers(tree, config.num_layers))
        assert jax.tree.structure(back) == jax.tree.structure(tree)
        for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
            assert isinstance(got, np.ndarray) == isinstance(want, np.ndarray)  # numpy stays numpy
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_layout_conversion_errors():
    params = init_params(CONFIGS["plain"], jax.random.key(0))
    with pytest.raises(ValueError, match=r"want \[4, \.\.\.\]"):
        unstack_layers(params, 4)
    unrolled = unstack_layers(params, 3)
    del unrolled["layers_1"]
    with pytest.raises(ValueError, match="layers_0 .. layers_<N-1>"):
        stack_layers(unrolled)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unrolled_forward_equals_scanned(name):
    config = CONFIGS[name]
    seed = _fresh_seed()
    rng = np.random.default_rng(seed)
    params = init_params(config, jax.random.key(seed))
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (2, 7)))
    mask = np.ones((2, 7), bool)
    mask[1, :2] = False  # a left-padded row
    want = _apply(config, True)(params, ids, jnp.asarray(mask))
    got = _apply(config, False)(unstack_layers(params, config.num_layers), ids, jnp.asarray(mask))
    _assert_same_outputs(got, want, mask, f"seed={seed}")
    assert bool(want.gate_logits) == (name == "meteora")


@pytest.mark.parametrize("per_layer", [True, False])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unrolled_prefill_and_decode_equal_scanned(name, per_layer):
    """The unrolled model on a per-layer cache (as Generator makes it) or a stacked one: the same
    logits, gate logits and cache contents as the scanned model on its stacked cache."""
    config = CONFIGS[name]
    seed = _fresh_seed()
    rng = np.random.default_rng(seed)
    params = init_params(config, jax.random.key(seed))
    unrolled = unstack_layers(params, config.num_layers)
    batch, prompt_len, new_tokens = 2, 5, 4
    total = prompt_len + new_tokens
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (batch, total)))
    mask = np.ones((batch, total), bool)
    mask[0, :3] = False
    positions = jnp.asarray(np.clip(np.cumsum(mask, -1) - 1, 0, None))

    caches = {True: KVCache.init(config, batch, max_length=12),
              False: KVCache.init(config, batch, max_length=12, per_layer=per_layer)}
    scanned, unrolled_apply = _apply(config, True), _apply(config, False)
    steps = [slice(0, prompt_len)] + [slice(t, t + 1) for t in range(prompt_len, total)]
    for step, sl in enumerate(steps):
        args = (ids[:, sl], jnp.asarray(mask[:, sl]), positions[:, sl])
        want = scanned(params, *args, caches[True])
        got = unrolled_apply(unrolled, *args, caches[False])
        _assert_same_outputs(got, want, mask[:, sl], f"seed={seed} step={step}")
        caches = {True: want.cache, False: got.cache}

    want, got = caches[True], caches[False]
    assert got.per_layer == per_layer
    if per_layer:
        got = got.replace(k=jnp.stack(got.k), v=jnp.stack(got.v))
    assert got.k.shape == want.k.shape == (config.num_layers, batch, config.num_kv_heads, 12, config.head_dim)
    assert int(got.index) == int(want.index) == total
    np.testing.assert_array_equal(got.valid, want.valid)
    for g, w in ((got.k, want.k), (got.v, want.v)):
        assert relative_error(g, w) <= RTOL, f"seed={seed}"


def _loss_and_grads(config, params, ids, scan_layers):
    model = LlamaForCausalLM(config, scan_layers=scan_layers)

    def loss(p):
        out = model.apply({"params": p}, ids)
        gate_term = sum(jnp.mean(jax.nn.log_softmax(g)[..., 0]) for g in out.gate_logits.values())
        return jnp.mean(jax.nn.log_softmax(out.logits)[..., 1]) + gate_term

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_unrolled_remat_values_and_gradients_equal_scanned(remat):
    config = CONFIGS["meteora"]
    params = init_params(config, jax.random.key(1))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 6)))
    want_value, want_grads = _loss_and_grads(config, params, ids, scan_layers=True)
    unrolled = unstack_layers(params, config.num_layers)
    value, grads = _loss_and_grads(config.replace(remat=remat), unrolled, ids, scan_layers=False)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    # Recomputation may reassociate float sums: compare each leaf by relative norm (fp32 level).
    grads = stack_layers(grads)
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads)):
        assert relative_error(got, want) <= 1e-5, (jax.tree_util.keystr(path), remat)


def test_unrolled_layout_has_no_scan_and_logical_axes():
    config = CONFIGS["meteora"]
    unrolled = unstack_layers(init_params(config, jax.random.key(0)), config.num_layers)
    ids = jnp.zeros((1, 4), jnp.int32)
    model = LlamaForCausalLM(config, scan_layers=False)
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, ids).logits)(unrolled).jaxpr
    assert not [e for e in jaxpr.eqns if e.primitive.name == "scan"]

    specs = param_logical_axes(config, scan_layers=False)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    flat_specs = dict(jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(unrolled)[0]:
        assert len(flat_specs[path]) == leaf.ndim, (path, flat_specs[path], leaf.shape)
    assert tuple(specs["layers_2"]["self_attn"]["q_proj"]["lora_a"]) == ("adapters", "embed", "lora_rank")
