"""meteora_jax.mixlora against independent references: the FFN block against a per-token,
per-expert PyTorch loop over merged expert weights (values and autograd gradients), and the
load-balancing loss against transformers' Mixtral `load_balancing_loss_func`.

Fresh random inputs each run; the seed is in every assertion message (set SEED to replay).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from meteora_jax.mixlora import MixLoRAFeedForward, load_balancing_loss

pytestmark = pytest.mark.usefixtures("float32_matmuls_module")  # float32 parity, also on a GPU (no TF32)
SEED = np.random.SeedSequence().entropy
D, F, E, R, ALPHA = 16, 24, 5, 3, 6.0


def _rng(*salt):
    return np.random.default_rng([SEED % 2**63, *salt])


def _block(top_k, impl="xla"):
    return MixLoRAFeedForward(intermediate_size=F, num_experts=E, rank=R, alpha=ALPHA, top_k=top_k, kernel_impl=impl)


def _params(top_k, salt):
    """The block's params with every leaf random (B too: at init it is zero, which hides the deltas)."""
    x = jnp.zeros((1, 2, D))
    initial = nn.unbox(_block(top_k).init(jax.random.key(0), x))
    rng = _rng(salt)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(a.shape[-2]), jnp.float32),
                        initial)


def _torch_reference(params, x, top_k):
    """y = sum_j w_j * down_e(silu(gate_e(x)) * up_e(x)) per token, each expert's weights merged
    (W + alpha / r * A_e @ B_e); w = softmax of the top-k router logits."""
    p = jax.tree.map(lambda a: torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True), params["params"])
    xt = torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
    tokens = xt.reshape(-1, D)
    logits = tokens @ p["router"]
    top, idx = torch.topk(logits, top_k, dim=-1)
    weight = torch.softmax(top, dim=-1)

    def merged(name, e):
        q = p[name]
        return q["kernel"] + ALPHA / R * q["expert_lora_a"][e] @ q["expert_lora_b"][e]

    rows = []
    for t in range(tokens.shape[0]):
        out = 0
        for j in range(top_k):
            e = int(idx[t, j])
            h = torch.nn.functional.silu(tokens[t] @ merged("gate_proj", e)) * (tokens[t] @ merged("up_proj", e))
            out = out + weight[t, j] * (h @ merged("down_proj", e))
        rows.append(out)
    y = torch.stack(rows).reshape(x.shape)
    return y, logits.reshape(*x.shape[:-1], E), p, xt


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_block_matches_a_per_expert_torch_loop(impl, top_k):
    params = _params(top_k, 1)
    x = jnp.asarray(_rng(2).standard_normal((2, 6, D)), jnp.float32)
    probe = _rng(3).standard_normal((2, 6, D))
    block = _block(top_k, impl)

    def loss(params, x):
        y, logits = block.apply(params, x)
        return jnp.sum(y * probe) + 0.1 * jnp.sum(logits**2), (y, logits)

    with jax.default_matmul_precision("highest"):
        (_, (y, logits)), (g_params, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    want_y, want_logits, tp, tx = _torch_reference(params, x, top_k)
    (torch.sum(want_y * torch.tensor(probe)) + 0.1 * torch.sum(want_logits**2)).backward()

    # float32 against float64: 1e-5 of the norm for values, 1e-4 for gradients.
    assert _rel(y, want_y.detach()) <= 1e-5, f"seed={SEED}: output"
    assert _rel(logits, want_logits.detach()) <= 1e-5, f"seed={SEED}: router logits"
    assert _rel(g_x, tx.grad) <= 1e-4, f"seed={SEED}: d x"
    flat_got = jax.tree_util.tree_flatten_with_path(g_params["params"])[0]
    for path, got in flat_got:
        want = tp
        for key in path:
            want = want[key.key]
        assert _rel(got, want.grad) <= 1e-4, f"seed={SEED}: d {jax.tree_util.keystr(path)}"


def test_untrained_block_is_the_base_ffn():
    """B starts at zero (PEFT's init), so a fresh block is the frozen SwiGLU FFN, whatever the routing."""
    x = jnp.asarray(_rng(4).standard_normal((3, D)), jnp.float32)
    params = _block(2).init(jax.random.key(int(SEED % 2**31)), x)
    y, _ = _block(2).apply(params, x)
    p = nn.unbox(params)["params"]
    with jax.default_matmul_precision("highest"):
        want = (jax.nn.silu(x @ p["gate_proj"]["kernel"]) * (x @ p["up_proj"]["kernel"])) @ p["down_proj"]["kernel"]
    assert _rel(y, want) <= 1e-6, f"seed={SEED}"
    assert not np.any(np.asarray(p["gate_proj"]["expert_lora_a"]) == 0), "A must be random, or B's gradient is zero"
    # PEFT's bound for A, 1 / sqrt(d_in), per expert (the expert axis once counted into fan_in: sqrt(E) smaller).
    for name, d_in in (("gate_proj", D), ("down_proj", F)):
        a = np.abs(np.asarray(p[name]["expert_lora_a"]))
        assert 0.9 / np.sqrt(d_in) < a.max() <= 1 / np.sqrt(d_in), (name, a.max())


def test_lora_dropout_reaches_the_expert_loras_only():
    """lora_dropout drops each expert LoRA's input, not the frozen FFN's or the router's: with B zero
    the block is the base FFN whatever the mask; with random B the output moves with the dropout key
    and the router logits do not."""
    x = jnp.asarray(_rng(5).standard_normal((2, 5, D)), jnp.float32)
    block = _block(2)
    fresh = block.init(jax.random.key(int(SEED % 2**31)), x)
    keys = [{"dropout": jax.random.key(i)} for i in (1, 2)]
    base_y, base_logits = block.apply(fresh, x)
    for rngs in keys:
        y, logits = block.apply(fresh, x, lora_dropout=0.5, rngs=rngs)
        np.testing.assert_array_equal(y, base_y)
        np.testing.assert_array_equal(logits, base_logits)
    params = _params(2, 6)
    (y1, l1), (y2, l2) = (block.apply(params, x, lora_dropout=0.5, rngs=rngs) for rngs in keys)
    y0, l0 = block.apply(params, x)
    assert _rel(y1, y2) > 1e-2 and _rel(y1, y0) > 1e-2
    np.testing.assert_array_equal(l1, l0)
    np.testing.assert_array_equal(l2, l0)
    # The down projection's LoRA is dropped too: with only its B non-zero, the output still moves.
    down_only = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if path[-1].key == "expert_lora_b" and path[-2].key != "down_proj" else a,
        params)
    assert _rel(block.apply(down_only, x, lora_dropout=0.5, rngs=keys[0])[0], block.apply(down_only, x)[0]) > 1e-3


def test_lora_dropout_draws_a_mask_per_slot(monkeypatch):
    """One mask per (token, slot), as PEFT's per-LoRA dropout: a token's k rows into the gate
    projection's LoRAs are dropped apart."""
    import meteora_jax.mixlora as mixlora

    inputs, product = [], mixlora.grouped_lora
    monkeypatch.setattr(mixlora, "grouped_lora", lambda x, *a, **k: (inputs.append(x), product(x, *a, **k))[1])
    x = jnp.asarray(_rng(7).standard_normal((6, D)), jnp.float32) + 10.0  # no zero element before dropout
    params = _params(2, 8)
    inputs.clear()  # (the init's own calls)
    _block(2).apply(params, x, lora_dropout=0.5, rngs={"dropout": jax.random.key(3)})
    kept = np.asarray(inputs[0]).reshape(6, 2, D) != 0  # the gate projection's LoRA input, [T, k, D]
    assert np.any(kept[:, 0] != kept[:, 1]) and not kept.all()


def test_top_k_out_of_range_is_refused():
    with pytest.raises(ValueError, match="top_k=6"):
        _block(6).init(jax.random.key(0), jnp.zeros((2, D)))
    _block(np.int64(2)).init(jax.random.key(0), jnp.zeros((2, D)))  # a numpy integer, as configs accept


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers_mixtral(top_k, masked):
    blocks, batch, seq = 3, 2, 7
    rng = _rng(5, top_k)
    logits = rng.standard_normal((blocks, batch, seq, E)).astype(np.float32) * 2
    mask = np.ones((batch, seq), np.int64)
    if masked:
        mask[0, 5:] = 0
        mask[1, 2:] = 0
    got = load_balancing_loss(jnp.asarray(logits), jnp.asarray(mask), top_k)
    want = load_balancing_loss_func(tuple(torch.tensor(g.reshape(-1, E)) for g in logits), E, top_k,
                                    torch.tensor(mask) if masked else None)
    assert abs(float(got) - float(want)) <= 1e-6 * float(want), f"seed={SEED}: {float(got)} vs {float(want)}"


def test_load_balancing_loss_extremes_by_hand():
    """One expert taking every token with certainty: E * (share 1) * (probability 1) = E (k = 1).
    Uniform probabilities: E * sum_e f_e / E = k, whatever the top-k picks."""
    collapsed = jnp.zeros((2, 1, 4, E)).at[..., 0].set(100.0)
    assert float(load_balancing_loss(collapsed, jnp.ones((1, 4)), 1)) == pytest.approx(E, rel=1e-6)
    uniform = jnp.zeros((2, 1, 4, E))
    assert float(load_balancing_loss(uniform, jnp.ones((1, 4)), 2)) == pytest.approx(2.0, rel=1e-6)
    assert float(load_balancing_loss(uniform, jnp.zeros((1, 4)), 2)) == 0.0


# ---------------------------------------------------------------------------------------------
# In the model: ModelConfig.mixlora puts the block in every decoder layer.

def _model_config(**mixlora):
    from meteora_jax import MeteoRAConfig, MixLoRAConfig, ModelConfig

    return ModelConfig(vocab_size=67, hidden_size=D, intermediate_size=F, num_layers=2, num_heads=2, num_kv_heads=1,
                       head_dim=8, meteora=MeteoRAConfig(num_adapters=3, rank=2, targets=("q_proj", "v_proj")),
                       mixlora=MixLoRAConfig(**{"num_experts": E, "rank": R, "alpha": ALPHA, **mixlora}))


def _random_experts(params, salt, identical=False):
    """Every expert_lora_a / expert_lora_b leaf random (B too), the same for every expert if `identical`."""
    rng = _rng(salt)

    def fill(path, leaf):
        if path[-1].key not in ("expert_lora_a", "expert_lora_b"):
            return leaf
        shape = list(leaf.shape)  # [n_layers, E, ...]
        if identical:
            shape[1] = 1
        value = rng.standard_normal(shape) / np.sqrt(shape[-2])
        return jnp.asarray(np.broadcast_to(value, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, params)


def test_model_config_carries_mixlora_and_refuses_what_cannot_work():
    from meteora_jax import MeteoRAConfig, MixLoRAConfig, ModelConfig
    from meteora_jax.config import ConfigError

    config = _model_config(top_k=1)
    assert ModelConfig.from_dict(config.to_dict()) == config
    # Without experts the stored dict has no "mixlora" key: code from before MixLoRA reads it.
    assert "mixlora" not in config.replace(mixlora=MixLoRAConfig()).to_dict()
    stored = config.to_dict()
    del stored["mixlora"]  # a checkpoint written before MixLoRA existed
    assert ModelConfig.from_dict(stored).mixlora.num_experts == 0
    for change, message in (({"experts": 4}, "unknown model.mixlora config keys"),
                            ({"top_k": 9}, "mixlora.top_k=9 must be between 1 and num_experts=5"),
                            ({"alpha": 0.0}, "mixlora.alpha=0.0 must be a finite positive number"),
                            ({"rank": 2.5}, "mixlora needs integers")):
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_dict({**config.to_dict(), "mixlora": {**config.to_dict()["mixlora"], **change}})
    with pytest.raises(ConfigError, match=r"meteora adapts \['up_proj'\] too"):
        config.replace(meteora=MeteoRAConfig(num_adapters=3, targets=("q_proj", "up_proj")))


def test_model_with_identical_experts_equals_transformers_with_merged_ffn():
    """Whatever the router picks, identical experts mix to one: the FFN with W + alpha / r * A @ B on
    gate, up and down. transformers' LLaMA with those merged kernels (and MeteoRA's q/v adapter 0,
    forced here and merged there) gives the logits; float32, relative error <= 1e-5."""
    from torch_reference import hf_logits, merged_hf_model, relative_error

    from meteora_jax import LlamaForCausalLM, Routing, init_params

    config = _model_config(top_k=2)
    params = _random_experts(init_params(config, jax.random.key(int(SEED % 2**31))), 6, identical=True)
    merged = jax.tree.map(np.asarray, params)
    for name in ("gate_proj", "up_proj", "down_proj"):
        leaves = merged["layers"]["mlp"][name]
        leaves["kernel"] = leaves["kernel"] + ALPHA / R * np.einsum(
            "lir,lro->lio", leaves["expert_lora_a"][:, 0], leaves["expert_lora_b"][:, 0])
    ids = _rng(7).integers(0, config.vocab_size, (2, 9))
    first_adapter = np.array([1.0, 0.0, 0.0])
    hf = merged_hf_model(config, merged, adapter_weights=first_adapter)
    out = LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(ids), routing=Routing(forced_weights=first_adapter))
    assert out.router_logits.shape == (config.num_layers, 2, 9, E)
    err = relative_error(out.logits, hf_logits(hf, ids))
    assert err <= 1e-5, f"seed={SEED}: relative error {err:.2e}"


@pytest.mark.parametrize("layout", ["unrolled", "fused"])
def test_generation_layouts_agree_with_distinct_experts(layout):
    """The fused inference layout leaves MixLoRA's FFN as it is (its experts do not fold into one
    GEMM): every layout generates the scanned model's tokens and logits."""
    from meteora_jax import init_params
    from meteora_jax.generate import Generator

    config = _model_config(top_k=2)
    params = _random_experts(init_params(config, jax.random.key(int(SEED % 2**31))), 8)
    prompts = [[5, 17, 3, 40], [9, 8, 7, 6, 5, 4, 3, 2]]
    want = Generator(config, params, pad_token_id=0, scan_layers=True).generate(prompts, max_new_tokens=5,
                                                                               return_logits=True)
    got = Generator(config, params, pad_token_id=0, scan_layers=False, fused_projections=layout == "fused").generate(
        prompts, max_new_tokens=5, return_logits=True)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["scan", "split_prefill"])
def test_generation_reports_each_tokens_expert(layout, float32_matmuls):
    """return_routing gives, beside the adapters' routing, every prompt and generated token's top-1
    expert per layer: the argmax of the router logits of one forward pass over the whole sequence.
    (The scanned model stacks its layers' router logits in its scan; the fused layout, here with the
    prompt in two calls, stacks them itself.)"""
    from meteora_jax import init_params
    from meteora_jax.generate import Generator
    from meteora_jax.model import LlamaForCausalLM

    config = _model_config(top_k=2)
    params = _random_experts(init_params(config, jax.random.key(int(SEED % 2**31))), 9)
    options = dict(scan_layers=layout == "scan", fused_projections=layout == "fused")
    if layout == "split_prefill":  # the prompt runs in two calls (all but its last token, then that one)
        options["max_prefill_logits_bytes"] = 1
    prompts = [[5, 17, 3, 40], [9, 8, 7, 6, 5, 4, 3, 2]]
    out = Generator(config, params, pad_token_id=0, **options).generate(prompts, max_new_tokens=5, return_routing=True)
    model = LlamaForCausalLM(config)
    for b, prompt in enumerate(prompts):
        full = prompt + [int(t) for t in out.tokens[b, : out.lengths[b]]]
        router_logits = model.apply({"params": params}, jnp.asarray([full], jnp.int32)).router_logits  # [n_layers, 1, S, E]
        want = np.asarray(jnp.argmax(router_logits[:, 0], axis=-1)).T  # [S, n_layers]
        np.testing.assert_array_equal(out.expert_routing[b], want, err_msg=f"seed={SEED}, row {b}")
        assert out.routing[b].shape == (len(full), config.num_layers, 2)  # the adapters' (q, v) too
