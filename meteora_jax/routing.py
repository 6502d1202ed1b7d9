"""Per-token routing: gate logits -> top-k adapters and their mixing weights.

`Routing` is passed to the model on every call, so the temperature can change per call without a
recompilation (it is a traced scalar) and routing can be forced for evaluation and tests.
"""

from __future__ import annotations

import numbers
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.grouped_lora_xla import top_k_routing  # noqa: F401 (re-exported)


@flax.struct.dataclass
class Routing:
    """Call-time routing options.

    temperature: divides the top-k logits before the softmax (the original uses 15-30 for
      composite prompts); > 0 (`routed_lora` checks a concrete one).
    forced_weights: [L] fixed mixture (>= 0) used for every token instead of the gate (one-hot forces
      a single adapter, as a PEFT model with that adapter active). Every non-zero entry is used,
      whatever the layer's top_k; gate logits are still computed and returned.
    lora_dropout: in [0, 1); during gate training, the share of the adapters' input elements
      zeroed (the rest scaled by 1 / (1 - rate)), as the original's training does with 0.1; the gate
      sees the whole input. One mask per token serves its k adapters (the original draws one per
      adapter: our kernels take one input row per token). MixLoRA's experts take it too, one mask
      per (token, slot) and projection. Needs a "dropout" rng in `apply`; the fused inference
      layout refuses it.
    """

    temperature: jax.Array | float = 1.0
    forced_weights: Optional[jax.Array] = None
    # How many adapters the forced mixture uses (static, so it survives jit). Counted from concrete
    # forced_weights; 0 means "the layer's top_k" (traced weights, whose zeros cannot be counted).
    forced_top_k: int = flax.struct.field(pytree_node=False, default=0)
    lora_dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    def __post_init__(self):
        if not (isinstance(self.lora_dropout, numbers.Real) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        # (The temperature is checked where it is used, `routed_lora`: a pytree unflatten rebuilds this
        # class with placeholder leaves, e.g. vmap's in_axes.)
        weights = self.forced_weights
        if weights is None or isinstance(weights, jax.core.Tracer):
            return
        # Counted already (forced_top_k set): a pytree unflatten rebuilding the class with placeholder
        # leaves (vmap's in_axes) is left alone, but new weights, as `Routing.replace` gives, are
        # counted again (it kept the old count, dropping adapters of the new mixture).
        if self.forced_top_k and not isinstance(weights, (np.ndarray, jax.Array)):
            return
        weights = np.asarray(weights)
        if weights.ndim != 1 or not np.count_nonzero(weights) or not np.all((weights >= 0) & np.isfinite(weights)):
            raise ValueError(f"forced_weights must be [L], finite and >= 0 with a non-zero entry, got {weights!r}")
        object.__setattr__(self, "forced_top_k", int(np.count_nonzero(weights)))

    @classmethod
    def force_adapter(cls, index: int, num_adapters: int) -> "Routing":
        """Routes every token to adapter `index` with weight 1."""
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise ValueError(f"adapter index must be an integer, got {index!r}")
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
        k = self.forced_top_k or top_k
        forced_weight, forced_idx = jax.lax.top_k(weights, k)
        num_tokens = gate_logits.shape[0]
        return (
            jnp.broadcast_to(forced_idx.astype(jnp.int32), (num_tokens, k)),
            jnp.broadcast_to(forced_weight, (num_tokens, k)),
        )
