"""Building blocks of the LLaMA decoder: RMSNorm, rotary embeddings, the MeteoRA projection,
grouped-query attention with a KV cache, the SwiGLU MLP and one decoder layer.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); the rules that map
them onto mesh axes live in `meteora_jax.sharding`, so sharding is configuration, not code.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from meteora_jax.config import ModelConfig, RopeScaling
from meteora_jax.mixlora import MixLoRAFeedForward
from meteora_jax.routing import Routing
from pallas_kernels import grouped_lora, routed_lora
from pallas_kernels.lora_columns import extended_width, fill_lora_columns, side_products, side_splits
from pallas_kernels.lora_columns_pallas import fill_lora_columns_pallas, side_products_pallas
from pallas_kernels.pallas_common import dot_precision  # float32 inputs: float32 products, not TF32
from pallas_kernels.routed_lora_xla import gate_logits as routed_gate_logits

# Logical axis names of each projection's kernel [d_in, d_out].
PROJECTION_AXES = {
    "q_proj": ("embed", "q_heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("q_heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}

# The fused layout's side GEMM runs as `side_products_pallas` up to this many tokens (on a GPU), as
# XLA's partial products above. Measured on an H200 (docs/benchmarks.md, session 9): at one token XLA
# runs a GEMV in its reduction emitter (q/k/v group 15.1 us, the kernel 4.8); at 32 tokens XLA's
# partials with the routing kernel took 7.8 us, the kernel's 9.5. Between 2 and 31: not measured.
SIDE_KERNEL_MAX_TOKENS = 1
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite, so fully-masked rows stay NaN-free


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., D]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # As transformers: cast back to the input dtype before the scale.
        return (scale.astype(self.dtype) * normed.astype(x.dtype)).astype(self.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """inv_freq [head_dim / 2] float32, with the llama3 frequency-dependent scaling if given."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if scaling is None:
        return inv_freq.astype(np.float32)
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(
    x: jax.Array,  # [B, S, H, hd]
    positions: jax.Array,  # [B, S] int
    inv_freq: np.ndarray,  # [hd / 2]
) -> jax.Array:  # [B, S, H, hd]
    """Rotary embedding in the "rotate half" layout that HF LLaMA checkpoints use."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, S, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class MeteoRALinear(nn.Module):
    """A frozen linear projection plus L routed low-rank adapters (DESIGN.md section 3).

    y = x @ kernel + grouped_lora(x, lora_a, lora_b, lora_scaling, top_k(x @ gate))

    computed by `routed_lora` (routing and product as one op), or, when the routing is forced or
    the adapters' input dropped out (`Routing.lora_dropout`, training), by `Routing.select` and
    `grouped_lora`.

    With num_adapters = 0 it is a plain bias-free linear layer and returns no gate logits.
    """

    features: int
    axes: tuple[str, str]  # logical names of [d_in, d_out]
    num_adapters: int = 0
    rank: int = 8
    top_k: int = 2
    kernel_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [..., d_in]
        routing: Routing,
    ) -> tuple[jax.Array, Optional[jax.Array]]:  # y [..., d_out], gate_logits [..., L] float32 or None
        d_in, in_axis, out_axis = x.shape[-1], self.axes[0], self.axes[1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.axes),
            (d_in, self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.num_adapters == 0:
            return y, None

        L, r = self.num_adapters, self.rank
        lora_a = self.param(
            "lora_a",
            nn.with_logical_partitioning(nn.initializers.normal(1.0 / math.sqrt(d_in)), ("adapters", in_axis, "lora_rank")),
            (L, d_in, r),
            self.param_dtype,
        )
        # Random (not zero) B so that a randomly initialised model exercises the adapters.
        lora_b = self.param(
            "lora_b",
            nn.with_logical_partitioning(nn.initializers.normal(1.0 / math.sqrt(r)), ("adapters", "lora_rank", out_axis)),
            (L, r, self.features),
            self.param_dtype,
        )
        lora_scaling = self.param(
            "lora_scaling", nn.with_logical_partitioning(nn.initializers.ones, ("adapters",)), (L,), jnp.float32
        )
        gate = self.param(
            "gate",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), (in_axis, "adapters")),
            (d_in, L),
            jnp.float32,
        )
        tokens = x.reshape(-1, d_in)  # [T, d_in]
        lora_a, lora_b = lora_a.astype(self.dtype), lora_b.astype(self.dtype)
        # The base output goes in as `base=` so the kernels add it in their epilogue (one pass less).
        base = y.reshape(-1, self.features)
        if routing.forced_weights is None and not routing.lora_dropout:
            # Gate logits, top-k and the routed product in one op (two launches when decoding).
            y, gate_logits = routed_lora(tokens, gate, lora_a, lora_b, lora_scaling, routing.temperature,
                                         top_k=self.top_k, impl=self.kernel_impl, base=base)
        else:
            gate_logits = routed_gate_logits(tokens, gate)  # [T, L] float32, as the routed kernels
            expert_idx, expert_weight = routing.select(gate_logits, self.top_k)
            # Dropout (training) reaches the adapters' input only: the gate routes on the whole token.
            lora_x = nn.Dropout(routing.lora_dropout, deterministic=not routing.lora_dropout)(tokens)
            y = grouped_lora(lora_x, lora_a, lora_b, lora_scaling, expert_idx, expert_weight.astype(self.dtype),
                             impl=self.kernel_impl, base=base)
        return y.reshape(*x.shape[:-1], self.features), gate_logits.reshape(*x.shape[:-1], L)


class FusedProjections(nn.Module):
    """n MeteoRA projections that share their input (q/k/v, gate/up, or one alone), in the fused
    inference layout of `meteora_jax.fused_layout`: the base GEMMs and the routed deltas as one GEMM
    over an extended input (`pallas_kernels.lora_columns`), after one side GEMM for every adapter's
    x @ lora_a and the gate logits. Same outputs as the n `MeteoRALinear`s, within rounding.

    adapted: which projections carry adapters (the others are plain columns of the kernel).
    kernel_impl: "auto" routes with the Pallas kernel (`fill_lora_columns_pallas`) on a GPU and with
    XLA (`fill_lora_columns`) elsewhere; "pallas" always with the kernel (interpret mode on CPU);
    the "xla*" impls with XLA. Forced routing always takes XLA.
    """

    features: tuple[int, ...]  # d_out of each projection
    adapted: tuple[bool, ...]
    num_adapters: int = 0
    rank: int = 8
    top_k: int = 2
    kernel_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [..., d_in]
        routing: Routing,
    ) -> tuple[list[jax.Array], list[Optional[jax.Array]]]:  # n x [..., d_out_j], n x gate logits [..., L] or None
        d_in, width = x.shape[-1], sum(self.features)
        n_adapted = sum(self.adapted) if self.num_adapters else 0
        L, r = self.num_adapters, self.rank
        columns = n_adapted * L * r
        tail = extended_width(d_in, columns) - d_in if n_adapted else 0
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (d_in + tail, width), self.param_dtype)
        tokens = x.reshape(-1, d_in).astype(self.dtype)  # [T, d_in]
        if n_adapted:
            parts = 1 if jnp.dtype(self.dtype) == jnp.float32 else 2  # gates whole, or as hi + lo halves
            side_weight = self.param("side", nn.initializers.lecun_normal(),
                                     (d_in, columns + parts * n_adapted * L), self.dtype)
            scaling = self.param("lora_scaling", nn.initializers.ones, (n_adapted, L), jnp.float32)
            pallas = self.kernel_impl == "pallas" or (self.kernel_impl == "auto" and jax.default_backend() == "gpu")
            # The side GEMM as partial products (summed by the routing step) where its few output
            # tiles would leave the GPU idle; for few tokens as our kernel, not XLA's GEMV.
            if pallas and tokens.shape[0] <= SIDE_KERNEL_MAX_TOKENS:
                side = side_products_pallas(tokens, side_weight)
            else:
                splits = side_splits(tokens.shape[0], side_weight.shape[1], d_in) if pallas else 1
                side = side_products(tokens, side_weight, splits, precision=dot_precision(self.dtype))
            # The routing step writes x_ext = [x | h | 0] whole (the kernel: in one launch).
            if pallas and routing.forced_weights is None:
                x_ext, logits = fill_lora_columns_pallas(tokens, side, scaling, routing.temperature, rank=r,
                                                         top_k=self.top_k)
            else:
                x_ext, logits = fill_lora_columns(tokens, side, scaling, routing.select, rank=r, top_k=self.top_k)
        else:
            x_ext = tokens
        y = jnp.dot(x_ext, kernel.astype(self.dtype))  # [T, sum d_out]: base + routed delta
        outs, gate_logits, start, j = [], [], 0, 0
        for features, adapted in zip(self.features, self.adapted):
            outs.append(y[:, start:start + features].reshape(*x.shape[:-1], features))
            start += features
            if adapted and n_adapted:
                gate_logits.append(logits[:, j].reshape(*x.shape[:-1], L))
                j += 1
            else:
                gate_logits.append(None)
        return outs, gate_logits


def _project(config: ModelConfig, routing: Routing, gate_logits: dict, name: str, x: jax.Array, features: int):
    """Applies the projection `name` (a submodule of the calling module) to x: [B, S, d_in] and
    records its gate logits in `gate_logits` when it carries adapters. Returns [B, S, features]."""
    meteora = config.meteora
    layer = MeteoRALinear(
        features=features,
        axes=PROJECTION_AXES[name],
        num_adapters=meteora.num_adapters if meteora.adapts(name) else 0,
        rank=meteora.rank,
        top_k=meteora.top_k,
        kernel_impl=meteora.kernel_impl,
        dtype=config.compute_dtype,
        param_dtype=config.weight_dtype,
        name=name,
    )
    out, logits = layer(x, routing)
    if logits is not None:
        gate_logits[name] = logits
    return out


# The fused inference layout's groups: projections that share their input (meteora_jax.fused_layout).
FUSED_GROUPS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def _project_group(config: ModelConfig, routing: Routing, gate_logits: dict, fused: bool, group: str,
                   x: jax.Array, features: tuple[int, ...]) -> list[jax.Array]:
    """The projections of FUSED_GROUPS[group] applied to their shared input x: [B, S, d_in], as one
    `FusedProjections` submodule (fused layout) or one `MeteoRALinear` each. Returns their outputs."""
    names = FUSED_GROUPS[group]
    if not fused:
        return [_project(config, routing, gate_logits, name, x, f) for name, f in zip(names, features)]
    meteora = config.meteora
    outs, logits = FusedProjections(
        features=features,
        adapted=tuple(meteora.adapts(name) for name in names),
        num_adapters=meteora.num_adapters,
        rank=meteora.rank,
        top_k=meteora.top_k,
        kernel_impl=meteora.kernel_impl,
        dtype=config.compute_dtype,
        param_dtype=config.weight_dtype,
        name=group,
    )(x, routing)
    gate_logits.update({name: lg for name, lg in zip(names, logits) if lg is not None})
    return outs


def attention_weights_mask(
    query_slots: jax.Array,  # [S] int: cache slot of each query
    key_valid: jax.Array,  # [B, S_kv] bool: the slot holds a real (non-padding) token
) -> jax.Array:  # [B, 1, 1, S, S_kv] bool
    """Causal (by slot) and padding mask for grouped-query attention scores."""
    key_slots = jnp.arange(key_valid.shape[-1])
    causal = key_slots[None, :] <= query_slots[:, None]  # [S, S_kv]
    return (causal[None] & key_valid[:, None, :])[:, None, None]


class Attention(nn.Module):
    """Grouped-query attention (MHA when num_kv_heads == num_heads) with rotary embeddings."""

    config: ModelConfig
    fused: bool = False  # the fused inference layout (FUSED_GROUPS)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, S, D]
        positions: jax.Array,  # [B, S]
        query_slots: jax.Array,  # [S]
        key_valid: jax.Array,  # [B, S_kv]
        # k, v of all layers [n_layers, B, H_kv, S_max, hd], or of this layer alone [B, H_kv, S_max, hd]
        cache: Optional[tuple[jax.Array, jax.Array]],
        layer_index: int | jax.Array,  # this layer's row of a stacked cache: [] int32 (scanned) or a static int
        cache_index: jax.Array,  # [] int32: first slot written by these tokens
        routing: Routing,
    ):
        cfg = self.config
        batch, seq, _ = x.shape
        heads, kv_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        gate_logits = {}
        project = functools.partial(_project_group, cfg, routing, gate_logits, self.fused)

        q, k, v = project("qkv_proj", x, (heads * hd, kv_heads * hd, kv_heads * hd))
        q = q.reshape(batch, seq, heads, hd)
        k = k.reshape(batch, seq, kv_heads, hd)
        v = v.reshape(batch, seq, kv_heads, hd)
        inv_freq = rope_inverse_frequencies(hd, cfg.rope_theta, cfg.rope_scaling)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

        # Heads-major [B, H_kv, S, hd], as the cache holds them: the batched GEMMs below read the
        # cache where it lies.
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if cache is not None and cache[0].ndim == 5:
            # The stacked cache travels in the scan carry and is updated in place: a scan output
            # would be a fresh [n_layers, ...] buffer, rewritten whole at every decode step.
            start = (layer_index, 0, 0, cache_index, 0)
            cache = tuple(
                jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype), start) for c, new in zip(cache, (k, v))
            )
            k, v = (jax.lax.dynamic_index_in_dim(c, layer_index, keepdims=False) for c in cache)
        elif cache is not None:  # this layer's own arrays, updated in place
            start = (0, 0, cache_index, 0)
            cache = tuple(jax.lax.dynamic_update_slice(c, new.astype(c.dtype), start) for c, new in zip(cache, (k, v)))
            k, v = cache

        groups = heads // kv_heads
        q = q.reshape(batch, seq, kv_heads, groups, hd)
        scores = jnp.einsum("bskgd,bktd->bkgst", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(hd)
        scores = jnp.where(attention_weights_mask(query_slots, key_valid), scores, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.compute_dtype)
        out = jnp.einsum("bkgst,bktd->bskgd", probs, v.astype(cfg.compute_dtype))
        (out,) = project("o_proj", out.reshape(batch, seq, heads * hd), (cfg.hidden_size,))
        return out, cache, gate_logits


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig
    fused: bool = False  # the fused inference layout (FUSED_GROUPS)

    @nn.compact
    def __call__(self, x: jax.Array, routing: Routing):  # x: [B, S, D]
        cfg = self.config
        gate_logits = {}
        project = functools.partial(_project_group, cfg, routing, gate_logits, self.fused)

        gate, up = project("gate_up_proj", x, (cfg.intermediate_size, cfg.intermediate_size))
        (out,) = project("down_proj", jax.nn.silu(gate) * up, (cfg.hidden_size,))
        return out, gate_logits


class DecoderLayer(nn.Module):
    """Pre-norm attention + pre-norm MLP with residuals. Shaped for `nn.scan` (and called the same
    way, with a static int layer index, when unrolled):
    (carry=(h, cache), layer index, broadcast inputs...) -> ((h, cache), (gate logits, router logits)).

    With `config.mixlora` on, the MLP is MixLoRA's (`meteora_jax.mixlora.MixLoRAFeedForward`, the
    same in every layout: its experts do not fold into the fused layout's GEMMs) and the router
    logits are [B, S, E] float32; otherwise they are None."""

    config: ModelConfig
    collect_gate_logits: bool = True
    fused: bool = False  # the fused inference layout (FUSED_GROUPS)

    @nn.compact
    def __call__(self, carry, layer_index, positions, query_slots, key_valid, cache_index, routing):
        cfg = self.config
        h, cache = carry
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype, name=name)
        attn_out, cache, attn_logits = Attention(cfg, self.fused, name="self_attn")(
            norm("input_layernorm")(h), positions, query_slots, key_valid, cache, layer_index, cache_index, routing
        )
        h = h + attn_out
        mlp_in, router_logits = norm("post_attention_layernorm")(h), None
        if cfg.mixlora.num_experts:
            mix = cfg.mixlora
            mlp_out, router_logits = MixLoRAFeedForward(
                intermediate_size=cfg.intermediate_size, num_experts=mix.num_experts, rank=mix.rank, alpha=mix.alpha,
                top_k=mix.top_k, kernel_impl=mix.kernel_impl, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                name="mlp")(mlp_in, lora_dropout=routing.lora_dropout)
            mlp_logits = {}
        else:
            mlp_out, mlp_logits = MLP(cfg, self.fused, name="mlp")(mlp_in, routing)
        h = h + mlp_out
        h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        gate_logits = {**attn_logits, **mlp_logits} if self.collect_gate_logits else {}
        return (h, cache), (gate_logits, router_logits)
