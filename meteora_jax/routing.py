"""Per-token routing: gate logits -> top-k adapters and their mixing weights.

`Routing` is passed to the model on every call, so the temperature can change per call without a
recompilation (it is a traced scalar) and routing can be forced for evaluation and tests.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp


def top_k_routing(
    gate_logits: jax.Array,  # [T, L] float32
    top_k: int,
    temperature: jax.Array | float = 1.0,
) -> tuple[jax.Array, jax.Array]:  # expert_idx [T, k] int32, expert_weight [T, k] float32
    """Top-k adapters per token, weighted by softmax(top-k logits / temperature).

    With k = 1 the softmax of one logit is 1, which is the original's "weight 1" rule.
    """
    top_logits, expert_idx = jax.lax.top_k(gate_logits.astype(jnp.float32), top_k)
    expert_weight = jax.nn.softmax(top_logits / temperature, axis=-1)
    return expert_idx.astype(jnp.int32), expert_weight


@flax.struct.dataclass
class Routing:
    """Call-time routing options.

    temperature: divides the top-k logits before the softmax (the original uses 15-30 for
      composite prompts).
    forced_weights: [L] fixed mixture used for every token instead of the gate (one-hot forces a
      single adapter, as a PEFT model with that adapter active). At most `top_k` entries may be
      non-zero; gate logits are still computed and returned.
    """

    temperature: jax.Array | float = 1.0
    forced_weights: Optional[jax.Array] = None

    @classmethod
    def force_adapter(cls, index: int, num_adapters: int) -> "Routing":
        """Routes every token to adapter `index` with weight 1."""
        if not 0 <= index < num_adapters:
            raise ValueError(f"adapter index {index} out of range for {num_adapters} adapters")
        return cls(forced_weights=jax.nn.one_hot(index, num_adapters, dtype=jnp.float32))

    def select(
        self,
        gate_logits: jax.Array,  # [T, L] float32
        top_k: int,
    ) -> tuple[jax.Array, jax.Array]:  # expert_idx [T, k], expert_weight [T, k]
        if self.forced_weights is None:
            return top_k_routing(gate_logits, top_k, self.temperature)
        weights = jnp.asarray(self.forced_weights, jnp.float32)
        if weights.shape != gate_logits.shape[-1:]:
            raise ValueError(f"forced_weights has shape {weights.shape}, want [L]={gate_logits.shape[-1:]}")
        forced_weight, forced_idx = jax.lax.top_k(weights, top_k)
        num_tokens = gate_logits.shape[0]
        return (
            jnp.broadcast_to(forced_idx.astype(jnp.int32), (num_tokens, top_k)),
            jnp.broadcast_to(forced_weight, (num_tokens, top_k)),
        )
