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


def test_top_k_out_of_range_is_refused():
    with pytest.raises(ValueError, match="top_k=6"):
        _block(6).init(jax.random.key(0), jnp.zeros((2, D)))


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
