"""`routed_lora`: a MeteoRA projection's routing and routed low-rank product as one op.

    gate_logits = x @ gate  (float32)
    idx, w      = top-k of gate_logits, softmax(top-k logits / temperature)   (k = 1: w = 1)
    y           = base + grouped_lora(x, lora_a, lora_b, scaling, idx, w)

`routed_lora_xla` is that composition, op by op (the reference, and the path that gradients take,
where `grouped_lora` picks its own kernel). Two faster paths compute the same:
- decode (T <= 32): `routed_lora_pallas`, two Pallas launches (see its module);
- prefill (T > 32): `routed_lora_prefill`, two plain GEMMs (x @ [A_flat | gate] and the weighted
  x @ A_flat @ B_flat) around the top-k.
`routed_lora(impl="auto")` picks among the three (`routed_path`).
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.grouped_lora import IMPLS, as_arrays, check_adapter_shapes, check_base_shape
from pallas_kernels.grouped_lora_pallas import MAX_RANK
from pallas_kernels.routed_lora_pallas import routed_lora_pallas
from pallas_kernels.routed_lora_prefill import routed_lora_prefill
from pallas_kernels.routed_lora_xla import check_routing_temperature, check_top_k, routed_lora_xla

# The decode kernel's range (above ROUTED_MAX_TOKENS: the prefill path). Tokens: decode steps up to
# batch 32, where it beat the op-by-op path on an H100 (LLaMA-3-8B shapes, L = 28, r = 8: decode step
# 9.08 vs 11.12 ms at B = 1, 12.14 vs 16.40 ms at B = 32; docs/benchmarks.md, "Fused routing for
# decode"). Columns: the shrink reads every adapter's lora_a (L * r * d_in * 2 bytes), only measured
# at L * r = 224; 1024 is an estimate (8 MB at d_in = 4096, ~3 us of H100 bandwidth, about the
# op-by-op routing's cost per projection).
ROUTED_MAX_TOKENS = 32
ROUTED_MAX_COLUMNS = 1024  # L * r


def routed_path(impl: str, num_tokens: int, num_adapters: int, rank: int) -> str:
    """Which path `routed_lora(impl=...)` takes: "decode", "prefill" or "composition".

    The prefill path beat the composition at every measured size above 32 tokens on an H100
    (LLaMA-3-8B projections, L = 28, r = 8, T = 64 / 512 / 16384; docs/benchmarks.md, "Prefill").
    """
    if impl not in ("auto", "pallas"):
        return "composition"
    if impl == "auto" and jax.default_backend() != "gpu":
        return "composition"  # on CPU the Pallas kernels only run in interpret mode
    if num_tokens == 0 or rank > MAX_RANK:  # nothing to route; ranks the kernels do not take
        return "composition"
    if num_tokens > ROUTED_MAX_TOKENS:
        return "prefill"
    return "decode" if num_adapters * rank <= ROUTED_MAX_COLUMNS else "composition"


@functools.partial(jax.named_call, name="routed_lora")
def routed_lora(
    x: jax.Array,  # [T, d_in]
    gate: jax.Array,  # [d_in, L] float32
    lora_a: jax.Array,  # [L, d_in, r]
    lora_b: jax.Array,  # [L, r, d_out]
    scaling: jax.Array,  # [L]
    temperature: jax.Array | float = 1.0,
    *,
    top_k: int,
    impl: str = "auto",
    base: jax.Array | None = None,  # [T, d_out]
) -> tuple[jax.Array, jax.Array]:  # y [T, d_out] x.dtype, gate_logits [T, L] float32
    """Routes every token to its top-k adapters and returns `base + routed delta` and the logits.

    impl: a `grouped_lora` impl. "auto" and "pallas" take the decode kernel for T <= ROUTED_MAX_TOKENS
    (when L * r <= ROUTED_MAX_COLUMNS) and the prefill path above ("auto" only on GPU; on CPU the
    composition); the "xla*" impls always take the composition. Under differentiation every path
    returns the composition's value and gradients (`with_composition_vjp`), with `grouped_lora(impl)`:
    first-order reverse mode only, as `grouped_lora`.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown grouped_lora impl {impl!r}; choose one of {IMPLS}")
    x, gate, lora_a, lora_b, scaling, base = as_arrays(x, gate, lora_a, lora_b, scaling, base)
    check_adapter_shapes(x, lora_a, lora_b, scaling)
    if gate.shape != (x.shape[1], lora_a.shape[0]):
        raise ValueError(f"gate must be [d_in, L]=[{x.shape[1]}, {lora_a.shape[0]}], got {gate.shape}")
    num_adapters, _, rank = lora_a.shape
    check_top_k(top_k, num_adapters)
    check_base_shape(base, x, lora_b)
    check_routing_temperature(temperature)
    path = routed_path(impl, x.shape[0], num_adapters, rank)
    if path == "decode":
        return routed_lora_pallas(x, gate, lora_a, lora_b, scaling, temperature, top_k=top_k, base=base,
                                  grouped_impl=impl)
    if path == "prefill":
        return routed_lora_prefill(x, gate, lora_a, lora_b, scaling, temperature, top_k=top_k, base=base,
                                   grouped_impl=impl)
    return routed_lora_xla(x, gate, lora_a, lora_b, scaling, temperature, top_k=top_k, impl=impl, base=base)
