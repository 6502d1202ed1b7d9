"""KV-cache decoding gives the logits of recomputing the full sequence, step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax import KVCache, LlamaForCausalLM, MeteoRAConfig, ModelConfig, init_params
from meteora_jax.model import unstack_layers
from torch_reference import relative_error

pytestmark = pytest.mark.usefixtures("float32_matmuls_module")  # float32 parity, also on a GPU (no TF32)

CONFIG = ModelConfig(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=72,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    head_dim=8,
    meteora=MeteoRAConfig(num_adapters=4, rank=3, top_k=2),
)


@pytest.mark.parametrize("left_pad", [0, 3])
def test_prefill_then_decode_matches_full_recompute(left_pad):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    params = init_params(CONFIG, jax.random.key(seed))
    model = LlamaForCausalLM(CONFIG)
    batch, prompt_len, new_tokens = 2, 6, 5
    total = prompt_len + new_tokens
    ids = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (batch, total)))
    mask = np.ones((batch, total), np.int32)
    mask[1, :left_pad] = 0  # row 1 is left-padded, as batched generation pads prompts
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    mask, positions = jnp.asarray(mask), jnp.asarray(positions)

    full = model.apply({"params": params}, ids, mask, positions)
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))

    cache = KVCache.init(CONFIG, batch, max_length=16)
    out = apply(params, ids[:, :prompt_len], mask[:, :prompt_len], positions[:, :prompt_len], cache)
    got_logits, got_gates = [out.logits], [out.gate_logits]
    cache = out.cache
    for step in range(prompt_len, total):
        sl = slice(step, step + 1)
        out = apply(params, ids[:, sl], mask[:, sl], positions[:, sl], cache)
        got_logits.append(out.logits)
        got_gates.append(out.gate_logits)
        cache = out.cache
    assert int(cache.index) == total

    valid = np.asarray(mask, bool)
    err = relative_error(jnp.concatenate(got_logits, axis=1), full.logits, valid)
    assert err <= 1e-5, f"seed={seed}: relative error {err:.2e}"
    for name, want in full.gate_logits.items():
        got = jnp.concatenate([g[name] for g in got_gates], axis=2)  # [layers, B, S, L]
        layer_valid = np.broadcast_to(valid[None, :, :, None], want.shape)
        assert relative_error(got, want, layer_valid) <= 1e-5, name


@pytest.mark.parametrize("per_layer", [False, True])
def test_decode_never_sees_future_or_padding_slots(per_layer):
    """Garbage in unwritten slots and in padded slots must not change the logits (the scanned model
    on a stacked cache, the unrolled one on per-layer arrays). The padded case had no padding, so
    the causal mask alone passed it."""
    rng = np.random.default_rng(0)
    params = init_params(CONFIG, jax.random.key(0))
    model = LlamaForCausalLM(CONFIG, scan_layers=not per_layer)
    if per_layer:
        params = unstack_layers(params, CONFIG.num_layers)
    ids = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (1, 5)))
    clean = KVCache.init(CONFIG, 1, 12, per_layer=per_layer)
    if per_layer:
        noisy = tuple(c + 1e3 * jax.random.normal(jax.random.key(i), c.shape) for i, c in enumerate(clean.k))
        dirty = clean.replace(k=noisy, v=tuple(c - 7.0 for c in clean.v))
    else:
        dirty = clean.replace(k=clean.k + 1e3 * jax.random.normal(jax.random.key(1), clean.k.shape), v=clean.v - 7.0)
    a = model.apply({"params": params}, ids, cache=clean)
    b = model.apply({"params": params}, ids, cache=dirty)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6, atol=1e-6)

    # Padded slots: row 1 is left-padded by 3 slots; after its prefill, garbage is written into
    # those slots (valid stays False) and must not reach the next decode step's logits.
    rows = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 5)))
    mask = jnp.asarray([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    prefill = model.apply({"params": params}, rows, attention_mask=mask, cache=KVCache.init(CONFIG, 2, 12,
                                                                                              per_layer=per_layer))
    def spoil(c):  # [(layers,) B, H_kv, S, hd]: row 1's slots 0-2
        return c.at[..., 1, :, :3, :].set(1e3 * jax.random.normal(jax.random.key(2), c[..., 1, :, :3, :].shape))
    spoiled = prefill.cache.replace(k=jax.tree.map(spoil, prefill.cache.k), v=jax.tree.map(spoil, prefill.cache.v))
    assert not bool(spoiled.valid[1, :3].any())
    step = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (2, 1)))
    a = model.apply({"params": params}, step, cache=prefill.cache)
    b = model.apply({"params": params}, step, cache=spoiled)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6, atol=1e-6)


def test_scanned_model_refuses_a_per_layer_cache():
    params = init_params(CONFIG, jax.random.key(0))
    cache = KVCache.init(CONFIG, 1, 8, per_layer=True)
    with pytest.raises(ValueError, match="stacked KV cache"):
        LlamaForCausalLM(CONFIG).apply({"params": params}, jnp.ones((1, 3), jnp.int32), cache=cache)


def test_cache_overflow_is_refused():
    """A write past the cache's last slot was clamped onto earlier slots by dynamic_update_slice:
    wrong logits and an index past max_length, without an error."""
    params = init_params(CONFIG, jax.random.key(0))
    model = LlamaForCausalLM(CONFIG)
    ids = jnp.asarray(np.random.default_rng().integers(0, CONFIG.vocab_size, (1, 7)))
    out = model.apply({"params": params}, ids[:, :6], cache=KVCache.init(CONFIG, 1, 8))
    step = model.apply({"params": params}, ids[:, 6:], cache=out.cache)  # slot 7 of 8: fits
    with pytest.raises(ValueError, match="the KV cache holds 8 slots; 7 are used and 2 more do not fit"):
        model.apply({"params": params}, ids[:, :2], cache=step.cache)
    with pytest.raises(ValueError, match="0 are used and 9 more do not fit"):
        model.apply({"params": params}, jnp.zeros((1, 9), jnp.int32), cache=KVCache.init(CONFIG, 1, 8))
