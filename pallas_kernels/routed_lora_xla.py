"""The op-by-op composition of `routed_lora` (the reference), and the VJP its kernels share.

    gate_logits = x @ gate  (float32)
    idx, w      = top-k of gate_logits, softmax(top-k logits / temperature)   (k = 1: w = 1)
    y           = base + grouped_lora(x, lora_a, lora_b, scaling, idx, w)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from pallas_kernels.grouped_lora import as_arrays, grouped_lora
from pallas_kernels.grouped_lora_xla import top_k_routing
from pallas_kernels.pallas_common import dot_precision, gate_halves


@jax.custom_vjp
def gate_logits(x: jax.Array, gate: jax.Array) -> jax.Array:
    """x [T, d_in] @ gate [d_in, L] float32 -> [T, L] float32, computed as the prefill path's side GEMM
    computes it (bfloat16 x against the gate's two bfloat16 halves; other x at HIGHEST), so that gate
    training routes near-ties as inference does: on an H200 their top-2 sets differed on 17 of 4096
    tokens before, on none now. The halves make the logits float32-accurate (3e-7 of |x| @ |gate| on
    an H200 against 2.5e-5 for a default-precision float32 dot; docs/benchmarks.md, session 31). The
    gradients are the plain dot's."""
    if x.dtype == jnp.bfloat16:
        hi, lo = gate_halves(gate, jnp.bfloat16)
        both = jnp.dot(x, jnp.concatenate([hi, lo], axis=1), preferred_element_type=jnp.float32)
        return both[:, :gate.shape[1]] + both[:, gate.shape[1]:]
    return jnp.dot(x.astype(jnp.float32), gate, precision=lax.Precision.HIGHEST)


def _gate_logits_fwd(x, gate):
    return gate_logits(x, gate), (x, gate)


def _gate_logits_bwd(res, g):  # g [T, L] float32
    x, gate = res
    # float32 x: HIGHEST, as every float32 product here. bfloat16 / float16 x: TF32 at most rounds g and
    # the gate to 10 bits (x fits), finer than dx's own rounding.
    precision = dot_precision(x.dtype)
    dx = jnp.dot(g, gate.T, precision=precision).astype(x.dtype)
    return dx, jnp.dot(x.astype(jnp.float32).T, g, precision=precision).astype(gate.dtype)


gate_logits.defvjp(_gate_logits_fwd, _gate_logits_bwd)


def check_routing_temperature(temperature) -> None:
    """A concrete routing temperature must be a finite number > 0 (it divides the top-k logits: 0
    gives NaN weights, a negative one favours the lower-scoring adapters). A traced one is not checked."""
    if isinstance(temperature, jax.core.Tracer) or not isinstance(temperature, (int, float, np.number, np.ndarray, jax.Array)):
        return
    value = np.asarray(temperature)
    if value.ndim or not (np.isfinite(value) and value > 0):
        raise ValueError(f"routing temperature must be a finite number > 0, got {temperature!r}")


def check_top_k(top_k, num_adapters: int) -> None:
    """top_k must be an integer in [1, L] (0 gave an all-zero delta, silently)."""
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or not 1 <= top_k <= num_adapters:
        raise ValueError(f"top_k={top_k!r} must be in [1, L={num_adapters}] (an integer)")


def routed_lora_xla(
    x: jax.Array,  # [T, d_in]
    gate: jax.Array,  # [d_in, L] float32
    lora_a: jax.Array,  # [L, d_in, r]
    lora_b: jax.Array,  # [L, r, d_out]
    scaling: jax.Array,  # [L]
    temperature: jax.Array | float,
    *,
    top_k: int,
    impl: str = "xla",
    base: jax.Array | None = None,  # [T, d_out]
) -> tuple[jax.Array, jax.Array]:  # y [T, d_out] x.dtype, gate_logits [T, L] float32
    """The op-by-op composition; `impl` is the `grouped_lora` implementation of the product."""
    x, gate, lora_a, lora_b, scaling, base = as_arrays(x, gate, lora_a, lora_b, scaling, base)
    check_top_k(top_k, lora_a.shape[0])
    check_routing_temperature(temperature)
    logits = gate_logits(x, gate.astype(jnp.float32))
    expert_idx, expert_weight = top_k_routing(logits, top_k, temperature)
    y = grouped_lora(x, lora_a, lora_b, scaling, expert_idx, expert_weight.astype(x.dtype), impl=impl, base=base)
    return y, logits


ARG_NAMES = ("x", "gate", "lora_a", "lora_b", "scaling", "temperature", "base")


def with_composition_vjp(primal):
    """Makes a routed kernel differentiable through the composition.

    primal(x, gate, lora_a, lora_b, scaling, temperature, base, cfg) -> (y, gate_logits), where cfg
    (static) has `top_k`, `has_base` (False: `base` is a placeholder) and `grouped_impl`.
    Undifferentiated calls run `primal`. A differentiated call runs `routed_lora_xla` under
    `jax.vjp` instead, only for the inputs being differentiated, and keeps its residuals: a gradient
    costs what the composition's costs, with no second forward pass. The value then is the
    composition's (equal to the kernel's within the tested tolerances).

    Returns `call(x, gate, lora_a, lora_b, scaling, temperature, base, cfg)`, which checks top_k,
    takes base None (with cfg.has_base False) and a float or [] temperature, and casts the inputs as
    the primal expects: gate, scaling and temperature [1] float32, lora_a / lora_b to x's dtype.
    """
    fn = jax.custom_vjp(primal, nondiff_argnums=(7,))

    def fwd(x, gate, lora_a, lora_b, scaling, temperature, base, cfg):
        args = (x, gate, lora_a, lora_b, scaling, temperature, base)
        values = tuple(arg.value for arg in args)
        need = [name for name, arg in zip(ARG_NAMES, args) if arg.perturbed and (name != "base" or cfg.has_base)]
        if not need:
            return primal(*values, cfg), {}

        def composition(*needed):
            full = dict(zip(ARG_NAMES, values))  # (temperature [1]: the composition takes a scalar)
            full.update(zip(need, needed))
            return routed_lora_xla(full["x"], full["gate"], full["lora_a"], full["lora_b"], full["scaling"],
                                   full["temperature"][0], top_k=cfg.top_k, impl=cfg.grouped_impl,
                                   base=full["base"] if cfg.has_base else None)

        out, vjp = jax.vjp(composition, *(values[ARG_NAMES.index(name)] for name in need))
        # Which inputs are differentiated lives in the residuals' tree structure (dict keys).
        return out, dict(vjp=vjp, need={name: None for name in need})

    def bwd(cfg, res, g):
        if not res:
            return (None,) * len(ARG_NAMES)
        gy, glogits = (jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c for c in g)
        need = [name for name in ARG_NAMES if name in res["need"]]
        grads = dict(zip(need, res["vjp"]((gy, glogits.astype(jnp.float32)))))
        return tuple(grads.get(name) for name in ARG_NAMES)

    fn.defvjp(fwd, bwd, symbolic_zeros=True)

    def call(x, gate, lora_a, lora_b, scaling, temperature, base, cfg):
        num_adapters = lora_a.shape[0]
        if not 1 <= cfg.top_k <= num_adapters:
            raise ValueError(f"top_k={cfg.top_k} must be in [1, L={num_adapters}]")
        temperature = jnp.asarray(temperature, jnp.float32).reshape(1)
        base = jnp.zeros((0,), x.dtype) if base is None else base.astype(x.dtype)
        return fn(x, gate.astype(jnp.float32), lora_a.astype(x.dtype), lora_b.astype(x.dtype),
                  scaling.astype(jnp.float32), temperature, base, cfg)

    return call
