"""The LLaMA causal language model with MeteoRA projections, scanned over decoder layers.

    model = LlamaForCausalLM(config)
    out = model.apply({"params": params}, input_ids, attention_mask)
    out.logits       # [B, S, V] float32
    out.gate_logits  # {projection: [num_layers, B, S, L] float32}, for the gate loss
    out.cache        # the updated KVCache when one was passed in

A KV cache holds `S_max` slots per sequence. A call writes its `S` tokens into slots
`cache.index .. cache.index + S - 1`; each query attends to the valid slots at or before its own.
Prefill is a call with the prompt, decode a call with one token.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from meteora_jax.config import ModelConfig
from meteora_jax.layers import DecoderLayer, RMSNorm
from meteora_jax.routing import Routing

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer. k, v: [num_layers, B, S_max, H_kv, hd]; valid: [B, S_max]."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array  # the slot holds a real (non-padding) token
    index: jax.Array  # [] int32: the next slot to write

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_length: int, dtype=None) -> "KVCache":
        shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
        dtype = dtype or config.compute_dtype
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array  # [B, S, V] float32
    gate_logits: dict  # {projection: [num_layers, B, S, L] float32}; empty for a plain LLaMA
    cache: Optional[KVCache] = None


class LlamaForCausalLM(nn.Module):
    config: ModelConfig
    collect_gate_logits: bool = True

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
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq), bool)
        attention_mask = attention_mask.astype(bool)
        cache_index = jnp.zeros((), jnp.int32) if cache is None else cache.index
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

        block = DecoderLayer
        if cfg.remat != "none":
            block = nn.remat(block, prevent_cse=False, policy=_REMAT_POLICIES[cfg.remat])
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.collect_gate_logits, name="layers")
        layer_indices = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (h, new_layer_caches), gate_logits = layers(
            (h, layer_caches), layer_indices, positions, query_slots, key_valid, cache_index, routing
        )

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
        return ModelOutput(logits=logits.astype(jnp.float32), gate_logits=gate_logits, cache=new_cache)


def init_params(config: ModelConfig, rng: jax.Array, batch: int = 1, seq: int = 8) -> dict:
    """Randomly initialised parameters (unboxed arrays; `param_specs` gives their logical axes)."""
    model = LlamaForCausalLM(config)
    variables = model.init(rng, jnp.zeros((batch, seq), jnp.int32))
    return nn.unbox(variables["params"])


def param_logical_axes(config: ModelConfig) -> dict:
    """The logical axis names of every parameter, as a pytree of `PartitionSpec`s."""
    model = LlamaForCausalLM(config)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.get_partition_spec(abstract)["params"]
