"""The LLaMA causal language model with MeteoRA projections, its decoder layers scanned or unrolled.

    model = LlamaForCausalLM(config)                     # scanned: params["layers"] stacked
    model = LlamaForCausalLM(config, scan_layers=False)  # unrolled: params["layers_0"], ... (inference)
    out = model.apply({"params": params}, input_ids, attention_mask)
    out.logits       # [B, S, V] float32
    out.gate_logits  # {projection: [num_layers, B, S, L] float32}, for the gate loss
    out.cache        # the updated KVCache when one was passed in
    out.router_logits  # [num_layers, B, S, E] float32 with MixLoRA experts (config.mixlora), else None

A KV cache holds `S_max` slots per sequence. A call writes its `S` tokens into slots
`cache.index .. cache.index + S - 1`; each query attends to the valid slots at or before its own.
Prefill is a call with the prompt, decode a call with one token. Its keys and values are stacked
over the layers (`KVCache.init`, what the scanned model carries) or one array per layer
(`per_layer=True`, for the unrolled model: attention then reads each layer's cache where it lies,
where a stacked one has a cache-sized copy of the layer's slice made at every step).

Two parameter layouts hold the same weights. The scanned one (training, checkpoints) stacks every
decoder-layer leaf on a leading [num_layers] axis under "layers"; the unrolled one keeps each
layer's leaves whole under "layers_<i>" and applies the layers in a Python loop. Under `nn.scan`
XLA copies each layer's slice out of every stacked weight before using it (an H100 decode step
read about 3x the weight bytes, and MeteoRA added a copy kernel per adapter tensor); unrolled,
each weight is its own jit argument, read in place. `unstack_layers` / `stack_layers` convert between the two.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from meteora_jax.config import ModelConfig
from meteora_jax.layers import DecoderLayer, RMSNorm
from meteora_jax.routing import Routing
from pallas_kernels.routed_lora import check_routing_temperature

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, heads-major (the order attention's batched GEMMs read):
    k, v: [num_layers, B, H_kv, S_max, hd] stacked, or a tuple of num_layers [B, H_kv, S_max, hd]
    arrays (per layer); valid: [B, S_max]."""

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array  # the slot holds a real (non-padding) token
    index: jax.Array  # [] int32: the next slot to write

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_length: int, dtype=None,
             per_layer: bool = False) -> "KVCache":
        """An empty cache; per_layer: one array per layer (the unrolled model only)."""
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        dtype = dtype or config.compute_dtype
        def empty():
            if per_layer:
                return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
            return jnp.zeros((config.num_layers, *shape), dtype)

        valid = jnp.zeros((batch_size, max_length), bool)
        return cls(k=empty(), v=empty(), valid=valid, index=jnp.zeros((), jnp.int32))

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array  # [B, S, V] float32
    gate_logits: dict  # {projection: [num_layers, B, S, L] float32}; empty for a plain LLaMA
    cache: Optional[KVCache] = None
    router_logits: Optional[jax.Array] = None  # [num_layers, B, S, E] float32 with MixLoRA experts, else None


def _check_inputs(input_ids, attention_mask, positions, vocab_size: int) -> None:
    """Shapes always; token ids where they are concrete (an id past the embedding reads NaN, silently;
    under jit it is not caught)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {input_ids.shape}")
    for name, array in (("attention_mask", attention_mask), ("positions", positions)):
        if array is not None and array.shape != input_ids.shape:
            raise ValueError(f"{name} must have input_ids' shape {input_ids.shape}, got {array.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
        ids = np.asarray(input_ids)
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"input_ids holds {ids.min() if ids.min() < 0 else ids.max()}, outside the vocabulary "
                             f"[0, {vocab_size})")


class LlamaForCausalLM(nn.Module):
    config: ModelConfig
    collect_gate_logits: bool = True
    # False: one submodule per decoder layer ("layers_<i>", unrolled), the inference layout.
    scan_layers: bool = True
    # True: the fused projection layout (`meteora_jax.fused_layout`), for inference.
    fused_projections: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,  # [B, S] int
        attention_mask: Optional[jax.Array] = None,  # [B, S]: 1 for real tokens, 0 for padding
        positions: Optional[jax.Array] = None,  # [B, S] int; default: slot index (cache.index + arange(S))
        cache: Optional[KVCache] = None,
        routing: Routing = Routing(),
    ) -> ModelOutput:
        cfg = self.config
        _check_inputs(input_ids, attention_mask, positions, cfg.vocab_size)
        check_routing_temperature(routing.temperature)  # (the fused layout does not reach routed_lora's check)
        if routing.lora_dropout and self.fused_projections:
            raise ValueError("lora_dropout is a training option: the fused inference layout does not take it")
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq), bool)
        attention_mask = attention_mask.astype(bool)
        cache_index = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if cache is not None and not isinstance(cache_index, jax.core.Tracer):
            # Past its end, dynamic_update_slice would clamp the write onto earlier slots: wrong
            # logits, no error. (Under jit the caller sizes the cache, as `Generator` does.)
            if int(cache_index) + seq > cache.max_length:
                raise ValueError(f"the KV cache holds {cache.max_length} slots; {int(cache_index)} are used and "
                                 f"{seq} more do not fit (KVCache.init with a larger max_length)")
        query_slots = cache_index + jnp.arange(seq, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(query_slots, (batch, seq))

        if cache is None:
            key_valid, layer_caches = attention_mask, None
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache_index))
            layer_caches = (cache.k, cache.v)

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
            name="embed_tokens",
        )
        h = embed(input_ids)

        broadcast = (positions, query_slots, key_valid, cache_index, routing)
        if self.scan_layers and cache is not None and cache.per_layer:
            raise ValueError("the scanned model carries a stacked KV cache: KVCache.init(..., per_layer=False)")
        if self.scan_layers:
            h, new_layer_caches, (gate_logits, router_logits) = self._scanned_layers(h, layer_caches, broadcast)
        else:
            per_layer = cache is not None and cache.per_layer
            h, new_layer_caches, (gate_logits, router_logits) = self._unrolled_layers(h, layer_caches, per_layer,
                                                                                      broadcast)

        h = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.weight_dtype, name="norm")(h)
        if cfg.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab")),
                dtype=cfg.compute_dtype,
                param_dtype=cfg.weight_dtype,
                name="lm_head",
            )(h)

        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                k=new_layer_caches[0], v=new_layer_caches[1], valid=key_valid, index=cache_index + seq
            )
        return ModelOutput(logits=logits.astype(jnp.float32), gate_logits=gate_logits, cache=new_cache,
                           router_logits=router_logits)

    def _scanned_layers(self, h, layer_caches, broadcast):
        """One traced layer body scanned over params["layers"] (leaves [num_layers, ...])."""
        cfg = self.config
        block = DecoderLayer
        if cfg.remat != "none":
            # Inside a scan XLA cannot CSE the recomputation away, so no barrier is needed.
            block = nn.remat(block, prevent_cse=False, policy=_REMAT_POLICIES[cfg.remat])
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.collect_gate_logits, self.fused_projections, name="layers")
        layer_indices = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (h, layer_caches), logits = layers((h, layer_caches), layer_indices, *broadcast)
        return h, layer_caches, logits  # logits: (gate logits, router logits), stacked over layers

    def _unrolled_layers(self, h, layer_caches, per_layer, broadcast):
        """params["layers_<i>"] applied in a Python loop; gate logits stacked as the scan stacks them.
        layer_caches: None, stacked (k, v) (each layer updates its row), or per-layer (k, v) tuples
        when per_layer (layer i gets and returns its own pair)."""
        cfg = self.config
        block = DecoderLayer
        if cfg.remat != "none":
            # The layer index (argument 2, counting the module) stays a Python int: static slices.
            block = nn.remat(block, static_argnums=(2,), policy=_REMAT_POLICIES[cfg.remat])
        new_ks, new_vs, layer_logits = [], [], []
        for i in range(cfg.num_layers):
            layer = block(cfg, self.collect_gate_logits, self.fused_projections, name=f"layers_{i}")
            if per_layer:
                (h, (k, v)), logits = layer((h, (layer_caches[0][i], layer_caches[1][i])), i, *broadcast)
                new_ks.append(k)
                new_vs.append(v)
            else:  # a static index: the cache row is written (dynamic_update_slice) and read in place
                (h, layer_caches), logits = layer((h, layer_caches), i, *broadcast)
            layer_logits.append(logits)
        if per_layer:
            layer_caches = (tuple(new_ks), tuple(new_vs))
        # ({proj: [num_layers, B, S, L]}, [num_layers, B, S, E] or None), as the scan stacks them
        logits = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_logits)
        return h, layer_caches, logits


def init_params(config: ModelConfig, rng: jax.Array, batch: int = 1, seq: int = 8) -> dict:
    """Randomly initialised parameters in the scanned layout (unboxed arrays;
    `param_logical_axes` gives their logical axes)."""
    model = LlamaForCausalLM(config)
    variables = model.init(rng, jnp.zeros((batch, seq), jnp.int32))
    return nn.unbox(variables["params"])


def param_logical_axes(config: ModelConfig, scan_layers: bool = True) -> dict:
    """The logical axis names of every parameter, as a pytree of `PartitionSpec`s, in the scanned
    (leading "layers" axis) or the unrolled layout."""
    model = LlamaForCausalLM(config, scan_layers=scan_layers)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.get_partition_spec(abstract)["params"]


_UNROLLED_LAYER = re.compile(r"layers_(\d+)")


def unstack_layers(params: Mapping, num_layers: int) -> dict:
    """Scanned layout -> unrolled layout: params["layers"] (every leaf [num_layers, ...]) becomes
    params["layers_0"] .. params[f"layers_{num_layers - 1}"] (leaves [...]); the other entries are
    kept. Numpy leaves give numpy views, jax leaves jax slices (jit it to convert in one program)."""
    params = dict(params)
    layers = params.pop("layers")
    for path, leaf in jax.tree_util.tree_flatten_with_path(layers)[0]:
        if np.shape(leaf)[:1] != (num_layers,):
            raise ValueError(f"layers{jax.tree_util.keystr(path)} has shape {np.shape(leaf)}, want [{num_layers}, ...]")
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x: x[i], layers)
    return params


def stack_layers(params: Mapping) -> dict:
    """Unrolled layout -> scanned layout (the inverse of `unstack_layers`): params["layers_<i>"],
    i = 0 .. N-1, become params["layers"] with every leaf stacked to [N, ...]. Numpy leaves stay
    numpy."""
    params = dict(params)
    indices = sorted(int(m.group(1)) for k in params if (m := _UNROLLED_LAYER.fullmatch(k)))
    if not indices or indices != list(range(len(indices))) or "layers" in params:
        raise ValueError(f"want layers_0 .. layers_<N-1> and no 'layers' entry, got {sorted(params)}")
    per_layer = [params.pop(f"layers_{i}") for i in indices]

    def stack(*xs):
        return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)

    params["layers"] = jax.tree.map(stack, *per_layer)
    return params
