"""Scanned layers and rematerialisation: one traced layer body for any depth, same numbers with
every remat policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax import LlamaForCausalLM, MeteoRAConfig, ModelConfig, init_params
from meteora_jax.model import param_logical_axes

pytestmark = pytest.mark.usefixtures("float32_matmuls_module")  # float32 parity, also on a GPU (no TF32)

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=5,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    meteora=MeteoRAConfig(num_adapters=3, rank=2, top_k=2),
)


def test_layers_are_one_scan():
    """The decoder is traced once and scanned num_layers times, not unrolled."""
    params = init_params(CONFIG, jax.random.key(0))
    ids = jnp.zeros((1, 4), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: LlamaForCausalLM(CONFIG).apply({"params": p}, ids).logits)(params).jaxpr
    assert [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"] == [CONFIG.num_layers]
    assert params["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == CONFIG.num_layers


def _gate_loss_and_grads(config, params, ids):
    model = LlamaForCausalLM(config)

    def loss(p):
        out = model.apply({"params": p}, ids)
        gate_term = sum(jnp.mean(jax.nn.log_softmax(g)[..., 0]) for g in out.gate_logits.values())
        return jnp.mean(jax.nn.log_softmax(out.logits)[..., 1]) + gate_term

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_values_and_gradients(remat):
    params = init_params(CONFIG, jax.random.key(1))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 6)))
    want_value, want_grads = _gate_loss_and_grads(CONFIG, params, ids)
    value, grads = _gate_loss_and_grads(CONFIG.replace(remat=remat), params, ids)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    # Recomputation may reassociate float sums: compare each leaf by relative norm (fp32 level).
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads)):
        err = np.linalg.norm(np.asarray(got) - np.asarray(want)) / max(np.linalg.norm(np.asarray(want)), 1e-30)
        assert err <= 1e-5, (jax.tree_util.keystr(path), err)
    assert float(jnp.abs(grads["layers"]["mlp"]["down_proj"]["gate"]).max()) > 0  # gates get gradient


def test_every_param_has_logical_axes():
    specs = param_logical_axes(CONFIG)
    params = init_params(CONFIG, jax.random.key(0))
    flat_specs = dict(jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        spec = flat_specs[path]
        assert len(spec) == leaf.ndim, (path, spec, leaf.shape)
    assert tuple(specs["layers"]["self_attn"]["q_proj"]["lora_a"]) == ("layers", "adapters", "embed", "lora_rank")
