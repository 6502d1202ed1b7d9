"""The MeteoRA layer against independent references.

- Routing forced to adapter i equals transformers' LLaMA with W + s_i * A_i @ B_i merged into
  every projection (fp32, relative error <= 1e-4).
- Top-k / temperature routing equals a per-token numpy computation of the formula (<= 1e-5).
- Zero-padding adapter ranks changes no output.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax import LlamaForCausalLM, MeteoRAConfig, ModelConfig, Routing, init_params
from meteora_jax.config import ConfigError
from meteora_jax.layers import MeteoRALinear
from torch_reference import hf_logits, merged_hf_model, relative_error


pytestmark = pytest.mark.usefixtures("float32_matmuls_module")  # float32 parity, also on a GPU (no TF32)


def _tiny_config(num_adapters=3, rank=4, top_k=2, targets=None, tie=False):
    meteora = MeteoRAConfig(num_adapters=num_adapters, rank=rank, top_k=top_k)
    if targets is not None:
        meteora = MeteoRAConfig(num_adapters=num_adapters, rank=rank, top_k=top_k, targets=targets)
    return ModelConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=12,
        tie_word_embeddings=tie,
        meteora=meteora,
    )


def _randomise_scalings(params, rng):
    """Scalings differ per layer and adapter, as converted PEFT adapters do (alpha / r varies)."""

    def visit(tree):
        for key, value in tree.items():
            if isinstance(value, dict):
                visit(value)
            elif key == "lora_scaling":
                tree[key] = jnp.asarray(rng.uniform(0.5, 2.0, value.shape), jnp.float32)

    visit(params)
    return params


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("targets", [None, ("q_proj", "v_proj", "down_proj")], ids=["all7", "subset"])
def test_forced_adapter_equals_merged_weights(top_k, targets):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    config = _tiny_config(top_k=top_k, targets=targets)
    params = _randomise_scalings(jax.tree.map(np.asarray, init_params(config, jax.random.key(seed))), rng)
    ids = rng.integers(0, config.vocab_size, (2, 11))
    model = LlamaForCausalLM(config)
    for adapter in range(config.meteora.num_adapters):
        got = model.apply({"params": params}, jnp.asarray(ids), routing=Routing.force_adapter(adapter, 3)).logits
        want = hf_logits(merged_hf_model(config, params, np.eye(3)[adapter]), ids)
        err = relative_error(got, want)
        assert err <= 1e-4, f"seed={seed} adapter={adapter}: relative error {err:.2e}"
    # Sanity: the adapters matter, so the test above could fail.
    base = hf_logits(merged_hf_model(config, params, None), ids)
    assert relative_error(got, base) > 1e-2


@pytest.mark.parametrize("top_k", [1, 2])
def test_forced_mixture_equals_weighted_merge(top_k):
    """A forced mixture uses every non-zero weight, even more adapters than the layer's top_k."""
    rng = np.random.default_rng(7)
    config = _tiny_config(top_k=top_k)
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(7)))
    ids = rng.integers(0, config.vocab_size, (2, 9))
    for mixture in (np.array([0.3, 0.0, 0.7], np.float32), np.array([0.2, 0.5, 0.3], np.float32)):
        got = LlamaForCausalLM(config).apply(
            {"params": params}, jnp.asarray(ids), routing=Routing(forced_weights=jnp.asarray(mixture))
        ).logits
        want = hf_logits(merged_hf_model(config, params, mixture), ids)
        assert relative_error(got, want) <= 1e-4, mixture


def test_replaced_forced_weights_are_counted_again():
    """`Routing.replace(forced_weights=...)` (flax.struct's) counts and checks the new mixture: it kept
    the old count, so one adapter of a two-adapter mixture was dropped, and negative weights passed.
    Under jit (traced weights) the count carried in the static field stays."""
    one = Routing.force_adapter(0, 3)
    mix = one.replace(forced_weights=jnp.array([0.5, 0.0, 0.5]))
    idx, w = mix.select(jnp.zeros((2, 3)), top_k=1)
    assert mix.forced_top_k == 2 and idx.tolist() == [[0, 2]] * 2 and w.tolist() == [[0.5, 0.5]] * 2
    with pytest.raises(ValueError, match="forced_weights must be"):
        one.replace(forced_weights=jnp.array([-1.0, 0.0, 0.0]))
    idx, _ = jax.jit(lambda r: r.select(jnp.zeros((2, 3)), top_k=1))(mix)
    assert idx.tolist() == [[0, 2]] * 2


def _layer_reference(x, kernel, lora_a, lora_b, lora_scaling, gate, top_k, temperature):
    """Per-token numpy evaluation of DESIGN.md section 3, in float64."""
    x, kernel, lora_a, lora_b, scaling, gate = (
        np.asarray(a, np.float64) for a in (x, kernel, lora_a, lora_b, lora_scaling, gate)
    )
    out = x @ kernel
    for t in range(x.shape[0]):
        logits = x[t] @ gate
        chosen = np.argsort(-logits, kind="stable")[:top_k]
        weights = np.exp((logits[chosen] - logits[chosen].max()) / temperature)
        weights /= weights.sum()
        for e, w in zip(chosen, weights):
            out[t] += w * scaling[e] * (x[t] @ lora_a[e]) @ lora_b[e]
    return out


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 1.0), (2, 15.0), (4, 3.0)])
@pytest.mark.parametrize("impl", ["auto", "pallas"])  # on CPU: the op-by-op XLA path / the fused routed kernel
def test_routing_matches_hand_computation(top_k, temperature, impl):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    d_in, d_out, num_adapters, rank, tokens = 24, 40, 5, 6, 17
    layer = MeteoRALinear(features=d_out, axes=("embed", "mlp"), num_adapters=num_adapters, rank=rank, top_k=top_k,
                          kernel_impl=impl)
    x = rng.normal(size=(tokens, d_in)).astype(np.float32)
    params = {
        "kernel": rng.normal(size=(d_in, d_out)).astype(np.float32) / 5,
        "lora_a": rng.normal(size=(num_adapters, d_in, rank)).astype(np.float32) / 5,
        "lora_b": rng.normal(size=(num_adapters, rank, d_out)).astype(np.float32) / 5,
        "lora_scaling": rng.uniform(0.5, 2, num_adapters).astype(np.float32),
        "gate": rng.normal(size=(d_in, num_adapters)).astype(np.float32),
    }
    y, gate_logits = layer.apply({"params": params}, jnp.asarray(x), Routing(temperature=temperature))
    want = _layer_reference(x, top_k=top_k, temperature=temperature, **params)
    err = relative_error(y, want)
    assert err <= 1e-5, f"seed={seed}: relative error {err:.2e}"
    np.testing.assert_allclose(gate_logits, x.astype(np.float64) @ params["gate"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["auto", "pallas"])
def test_lora_dropout_drops_the_adapters_input_only(impl):
    """Routing.lora_dropout = p: the adapters see x with a share ~p of its elements zeroed and the
    rest scaled by 1 / (1 - p), one mask per token for its k adapters; the base product and the gate
    see the whole x. With lora_a = lora_b = identity, the delta shows the dropped input exactly
    (relative 1e-5); the dropped share is within 0.03 of p (5 standard deviations of 5120 draws)."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    d, num_adapters, tokens, p = 32, 3, 160, 0.25
    layer = MeteoRALinear(features=d, axes=("embed", "mlp"), num_adapters=num_adapters, rank=d, top_k=2,
                          kernel_impl=impl)
    x = rng.normal(size=(tokens, d)).astype(np.float32)
    eye = np.broadcast_to(np.eye(d, dtype=np.float32), (num_adapters, d, d))
    params = {"kernel": rng.normal(size=(d, d)).astype(np.float32) / 5, "lora_a": eye, "lora_b": eye,
              "lora_scaling": np.array([0.5, 1.0, 2.0], np.float32),
              "gate": rng.normal(size=(d, num_adapters)).astype(np.float32)}

    def run(rate, key=0):
        return layer.apply({"params": params}, jnp.asarray(x), Routing(lora_dropout=rate),
                           rngs={"dropout": jax.random.key(key)} if rate else None)

    y, gate_logits = run(p, seed)
    np.testing.assert_allclose(gate_logits, x.astype(np.float64) @ params["gate"], rtol=1e-5, atol=1e-5)
    logits = x.astype(np.float64) @ params["gate"]
    chosen = np.argsort(-logits, axis=-1, kind="stable")[:, :2]
    top = np.take_along_axis(logits, chosen, -1)
    weights = np.exp(top - top.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    mixed_scaling = (weights * params["lora_scaling"][chosen]).sum(-1)  # [T]: the delta is this * x_dropped
    x_dropped = (np.asarray(y, np.float64) - x.astype(np.float64) @ params["kernel"]) / mixed_scaling[:, None]
    kept = np.abs(x_dropped) > np.abs(x) / (2 * (1 - p))
    np.testing.assert_allclose(x_dropped, np.where(kept, x / (1 - p), 0.0), rtol=1e-5, atol=1e-5,
                               err_msg=f"seed {seed}")
    assert abs((1 - kept.mean()) - p) < 0.03, f"seed {seed}: dropped share {1 - kept.mean():.3f}"

    np.testing.assert_array_equal(run(p, seed)[0], y)  # the key decides the mask
    assert not np.array_equal(run(p, seed + 1)[0], y)
    want = _layer_reference(x, top_k=2, temperature=1.0, **params)
    assert relative_error(run(0.0)[0], want) <= 1e-5  # no dropout: no key needed, the layer as before
    with pytest.raises(ValueError, match=r"lora_dropout must be a number in \[0, 1\), got 1.0"):
        Routing(lora_dropout=1.0)


def test_k1_weight_is_one():
    """k = 1: the argmax adapter's delta enters with weight exactly 1, whatever the temperature."""
    rng = np.random.default_rng(0)
    layer = MeteoRALinear(features=8, axes=("embed", "mlp"), num_adapters=3, rank=2, top_k=1)
    x = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    p = jax.tree.map(np.asarray, nn.unbox(layer.init(jax.random.key(0), x, Routing())["params"]))
    p["lora_scaling"] = np.array([0.5, 1.5, 2.0], np.float32)
    xs = np.asarray(x, np.float64)
    chosen = np.argmax(xs @ p["gate"], axis=-1)
    want = np.stack(
        [xs[t] @ p["kernel"] + p["lora_scaling"][e] * (xs[t] @ p["lora_a"][e]) @ p["lora_b"][e] for t, e in enumerate(chosen)]
    )
    for temperature in (0.01, 1.0, 100.0):
        y, _ = layer.apply({"params": p}, x, Routing(temperature=temperature))
        assert relative_error(y, want) <= 1e-5, temperature


def test_zero_padded_ranks_change_nothing():
    rng = np.random.default_rng(11)
    config = _tiny_config(rank=3)
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(11)))
    padded_config = config.replace(meteora=MeteoRAConfig(num_adapters=3, rank=8, top_k=2))

    def pad(tree):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out[key] = pad(value)
            elif key == "lora_a":
                out[key] = np.pad(value, [(0, 0)] * 3 + [(0, 5)])
            elif key == "lora_b":
                out[key] = np.pad(value, [(0, 0), (0, 0), (0, 5), (0, 0)])
            else:
                out[key] = value
        return out

    ids = jnp.asarray(rng.integers(0, config.vocab_size, (2, 10)))
    want = LlamaForCausalLM(config).apply({"params": params}, ids)
    got = LlamaForCausalLM(padded_config).apply({"params": pad(params)}, ids)
    # Only float reassociation differs (the rank reduction is longer): fp32 rounding level.
    assert relative_error(got.logits, want.logits) <= 1e-6
    for name in want.gate_logits:
        np.testing.assert_allclose(got.gate_logits[name], want.gate_logits[name], rtol=1e-5, atol=1e-5)


def test_gate_logits_shapes_and_untargeted_projections():
    config = _tiny_config(targets=("q_proj", "up_proj"))
    params = init_params(config, jax.random.key(0))
    assert "gate" not in params["layers"]["self_attn"]["k_proj"]
    out = LlamaForCausalLM(config).apply({"params": params}, jnp.zeros((2, 5), jnp.int32) + 3)
    assert set(out.gate_logits) == {"q_proj", "up_proj"}
    assert out.gate_logits["q_proj"].shape == (config.num_layers, 2, 5, 3)
    assert out.gate_logits["q_proj"].dtype == jnp.float32


def test_no_adapters_is_plain_llama():
    config = _tiny_config(num_adapters=0)
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(4)))
    assert all("lora_a" not in leaves for leaves in params["layers"]["mlp"].values())
    ids = np.random.default_rng(4).integers(0, config.vocab_size, (2, 6))
    got = LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(ids)).logits
    assert relative_error(got, hf_logits(merged_hf_model(config, params), ids)) <= 1e-4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_adapters=2, top_k=3), "top_k=3"),
        (dict(num_adapters=2, targets=("q_proj", "qkv")), "unknown projections"),
        (dict(num_adapters=2, rank=0), "rank >= 1"),
        (dict(num_adapters=2, kernel_impl="palas"), "kernel_impl='palas'"),
        (dict(num_adapters=2, kernel_impl="xla_gather"), "kernel_impl='xla_gather'"),
    ],
)
def test_bad_meteora_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MeteoRAConfig(**kwargs)


def test_unknown_config_key():
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({"vocab_size": 10, "hiden_size": 4})


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(num_kv_heads=0), "num_kv_heads=0 must be a positive integer"),  # was a ZeroDivisionError
        (dict(hidden_size=-1), "hidden_size=-1 must be a positive integer"),
        (dict(vocab_size=True), "vocab_size=True must be a positive integer"),
        (dict(head_dim=8.0), "head_dim=8.0 must be a positive integer"),
        (dict(rms_norm_eps=-1.0), "rms_norm_eps=-1.0 must be a finite positive number"),  # trained to NaN before
        (dict(rope_theta=float("inf")), "rope_theta=inf must be a finite positive number"),
        (dict(tie_word_embeddings="false"), "tie_word_embeddings='false' must be True or False"),
        # rope_scaling's values (its keys were checked, not its values): a factor of 0 gave NaN logits,
        # {} an AttributeError at the first call
        (dict(rope_scaling=dict(factor=0.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
         "rope_scaling.factor=0.0 must be a finite positive number"),
        (dict(rope_scaling=dict(factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
         "rope_scaling.high_freq_factor=4.0 must exceed low_freq_factor=4.0"),
        (dict(rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=6.4)),
         "rope_scaling.original_max_position_embeddings=6.4 must be a positive integer"),
        (dict(rope_scaling={}), "rope_scaling has keys []; want exactly"),
        # meteora sizes that are not integers failed at init, inside jax's shape checks
        (dict(meteora=dict(num_adapters=2, rank=2.5)), "meteora needs integers num_adapters >= 0 and rank >= 1, got 2, 2.5"),
        (dict(meteora=dict(num_adapters=2.0)), "meteora needs integers num_adapters >= 0 and rank >= 1, got 2.0, 8"),
    ],
)
def test_bad_model_config_values(change, message):
    values = _tiny_config(num_adapters=2).to_dict()
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_dict({**values, **change})


def test_model_config_missing_or_foreign_keys():
    values = _tiny_config(num_adapters=2).to_dict()
    del values["vocab_size"]
    with pytest.raises(ConfigError, match=re.escape("model config lacks keys ['vocab_size']")):
        ModelConfig.from_dict(values)
    hf_rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)  # as HF writes it
    with pytest.raises(ConfigError, match=r"rope_scaling has keys \[.*'rope_type'\]; want exactly"):
        ModelConfig.from_dict({**_tiny_config(num_adapters=2).to_dict(), "rope_scaling": hf_rope})
