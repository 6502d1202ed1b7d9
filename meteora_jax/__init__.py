"""meteora-jax: MeteoRA (many LoRA adapters routed per token) for LLaMA in JAX/Flax."""

from meteora_jax.config import MeteoRAConfig, MixLoRAConfig, ModelConfig, RopeScaling
from meteora_jax.model import KVCache, LlamaForCausalLM, ModelOutput, init_params
from meteora_jax.routing import Routing, top_k_routing

__all__ = [
    "KVCache",
    "LlamaForCausalLM",
    "MeteoRAConfig",
    "MixLoRAConfig",
    "ModelConfig",
    "ModelOutput",
    "RopeScaling",
    "Routing",
    "init_params",
    "top_k_routing",
]
