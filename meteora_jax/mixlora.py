"""MixLoRA (arXiv 2404.15159): trainable LoRA experts inside the FFN, a top-k router, and the
load-balancing loss that keeps the router from favouring a few experts.

Expert e is the frozen SwiGLU FFN with its own LoRA on each of gate, up and down:

    expert_e(x) = down_e(silu(gate_e(x)) * up_e(x)),   proj_e(z) = z @ W_proj + s * (z @ A_e) @ B_e
    y = sum_j w_j * expert_{e_j}(x)                    (e_j, w_j): the router's top-k for x

with w = softmax of the top-k router logits (k = 1: w = 1), as MeteoRA routes. Unlike MeteoRA, the
nonlinearity sits between an expert's projections, so each (token, slot) pair is a row of its own
(`grouped_lora` with one slot per row). The frozen GEMMs still run once per token: x @ W_gate and
x @ W_up are shared by the slots, and W_down is linear, so sum_j w_j (h_j @ W_down) is
(sum_j w_j h_j) @ W_down.

The model builds this block in every decoder layer when `ModelConfig.mixlora` has experts;
`scripts/train.py` trains the router and the experts (docs/mixlora.md).
"""

from __future__ import annotations

import math
import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.grouped_lora import grouped_lora
from pallas_kernels.grouped_lora_xla import top_k_routing


class ExpertProjection(nn.Module):
    """One FFN projection's frozen kernel [d_in, d_out] and its experts' LoRAs, expert_lora_a
    [E, d_in, r] and expert_lora_b [E, r, d_out] (PEFT's init: A kaiming-uniform, B zero). Named
    apart from MeteoRA's frozen lora_a / lora_b, so trainability can follow the leaf name alone, as
    it does for the gates (`gates.is_trainable`). Returns the three arrays."""

    features: int
    axes: tuple[str, str]  # logical names of [d_in, d_out]
    num_experts: int
    rank: int
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, d_in: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        E, r, (in_axis, out_axis) = self.num_experts, self.rank, self.axes
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.axes),
                            (d_in, self.features), self.param_dtype)
        # (batch_axis: each expert is its own [d_in, r] matrix; without it fan_in counted E * d_in.)
        a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=1, out_axis=2, batch_axis=(0,))
        lora_a = self.param("expert_lora_a", nn.with_logical_partitioning(a_init, ("adapters", in_axis, "lora_rank")),
                            (E, d_in, r), self.param_dtype)
        lora_b = self.param("expert_lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                   ("adapters", "lora_rank", out_axis)),
                            (E, r, self.features), self.param_dtype)
        return kernel, lora_a, lora_b


class MixLoRAFeedForward(nn.Module):
    """A SwiGLU FFN with `num_experts` LoRA experts and a top-k router.

    Params: `{gate,up,down}_proj/kernel` (frozen; named as `layers.MLP`'s, so a base checkpoint's
    kernels fit them), `{gate,up,down}_proj/expert_lora_a [E, d_in, r]` and `expert_lora_b [E, r, d_out]`
    (trainable; B starts at zero, so an untrained block is the base FFN), and `router [D, E]`
    float32 (trainable).
    lora_dropout (training): dropout on each expert LoRA's input, one mask per (token, slot) and
    projection, as PEFT's per-LoRA dropout; the router and the frozen GEMMs see the whole input.
    Needs a "dropout" rng in `apply`.
    Returns (y [..., D], router_logits [..., E] float32).
    """

    intermediate_size: int
    num_experts: int
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    kernel_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, lora_dropout: float = 0.0) -> tuple[jax.Array, jax.Array]:  # x: [..., D]
        if not (isinstance(self.top_k, numbers.Integral) and 1 <= self.top_k <= self.num_experts):
            raise ValueError(f"MixLoRA top_k={self.top_k!r} must be an integer in [1, num_experts={self.num_experts}]")
        D, F, E, k = x.shape[-1], self.intermediate_size, int(self.num_experts), int(self.top_k)

        def projection(name, d_in, d_out, axes):
            arrays = ExpertProjection(d_out, axes, E, self.rank, self.param_dtype, name=name)(d_in)
            return (a.astype(self.dtype) for a in arrays)

        w_gate, a_gate, b_gate = projection("gate_proj", D, F, ("embed", "mlp"))
        w_up, a_up, b_up = projection("up_proj", D, F, ("embed", "mlp"))
        w_down, a_down, b_down = projection("down_proj", F, D, ("mlp", "embed"))
        router = self.param("router", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "adapters")),
                            (D, E), jnp.float32)
        scaling = jnp.full((E,), mixlora_scaling(self.alpha, self.rank), jnp.float32)

        tokens = x.reshape(-1, D).astype(self.dtype)  # [T, D]
        router_logits = jnp.dot(tokens.astype(jnp.float32), router)  # [T, E]
        expert_idx, expert_weight = top_k_routing(router_logits, k)  # [T, k], [T, k]

        # One row per (token, slot): row t * k + j is token t through expert expert_idx[t, j].
        pairs = expert_idx.reshape(-1, 1)  # [T*k, 1]
        ones = jnp.ones(pairs.shape, self.dtype)
        rows = jnp.repeat(tokens, k, axis=0)  # [T*k, D]

        def dropped(z):  # a LoRA's input; each call draws its own mask
            return nn.Dropout(lora_dropout, deterministic=not lora_dropout)(z)

        def expert_in(w, a, b):  # the shared base GEMM once per token, each pair's delta on top
            base = jnp.repeat(jnp.dot(tokens, w), k, axis=0)  # [T*k, F]
            return grouped_lora(dropped(rows), a, b, scaling, pairs, ones, impl=self.kernel_impl, base=base)

        hidden = jax.nn.silu(expert_in(w_gate, a_gate, b_gate)) * expert_in(w_up, a_up, b_up)  # [T*k, F]
        pair_weight = expert_weight.astype(self.dtype).reshape(-1, 1)  # [T*k, 1]
        mixed_hidden = jnp.sum((hidden * pair_weight).reshape(-1, k, F), axis=1)  # [T, F]
        deltas = grouped_lora(dropped(hidden), a_down, b_down, scaling, pairs, pair_weight, impl=self.kernel_impl)  # [T*k, D]
        y = jnp.dot(mixed_hidden, w_down) + jnp.sum(deltas.reshape(-1, k, D), axis=1)
        return y.reshape(x.shape), router_logits.reshape(*x.shape[:-1], E)


def load_balancing_loss(
    router_logits: jax.Array,  # [G, B, S, E]: every MixLoRA block's router logits (G blocks)
    mask: jax.Array,  # [B, S]: 1 on tokens that count (not padding)
    top_k: int,
) -> jax.Array:  # [] float32
    """Switch Transformer's auxiliary loss in Mixtral's top-k form, as MixLoRA trains with it:

        E * sum_e f_e * P_e,   f_e = share of the (token, block) rows whose top-k holds e (summed over
                               the k slots), P_e = mean router probability of e (softmax over all E),

    both averaged over every block's unmasked tokens. 1 * k when balanced; up to E * k when one
    expert takes everything. A batch with no unmasked token gives 0.
    """
    num_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [G, B, S, E]
    weight = jnp.broadcast_to(mask.astype(jnp.float32)[None, :, :, None], probs.shape[:-1] + (1,))
    rows = jnp.maximum(jnp.sum(weight), 1.0)
    tokens_per_expert = expert_counts(router_logits, mask, top_k) / rows  # [E]
    prob_per_expert = jnp.sum(probs * weight, axis=(0, 1, 2)) / rows  # [E]
    return num_experts * jnp.sum(tokens_per_expert * prob_per_expert)


def expert_counts(
    router_logits: jax.Array,  # [G, B, S, E]
    mask: jax.Array,  # [B, S]: 1 on tokens that count
    top_k: int,
) -> jax.Array:  # [E] float32
    """How many (block, unmasked token) rows chose each expert among their top-k: the experts'
    loads, summing to k x the rows (a collapsed router puts them all on a few experts)."""
    num_experts = router_logits.shape[-1]
    _, chosen = jax.lax.top_k(router_logits.astype(jnp.float32), top_k)  # [G, B, S, k]
    chosen_share = jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32), axis=-2)  # [G, B, S, E]
    return jnp.einsum("gbse,bs->e", chosen_share, mask.astype(jnp.float32))


def mixlora_scaling(alpha: float, rank: int) -> float:
    """alpha / r, PEFT's (non-rs) LoRA scaling, which MixLoRA's experts use."""
    if not (math.isfinite(alpha) and alpha > 0 and rank >= 1):
        raise ValueError(f"MixLoRA needs a finite alpha > 0 and rank >= 1, got {alpha!r}, {rank!r}")
    return alpha / rank
