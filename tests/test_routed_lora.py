"""The fused routed paths (`routed_lora_pallas` for decode, interpret mode on CPU; `routed_lora_prefill`,
two GEMMs, for many tokens) against the op-by-op composition (`routed_lora_xla`: f32 gate matmul,
lax.top_k, softmax, dense-masked product) computed in float32 at highest precision.

Fresh random inputs every run (the seed is printed in every assertion message). Tolerances: relative
error <= 1e-5 in fp32 and <= 1e-2 in bf16 for outputs and gradients. Gate logits (float32 in both):
relative error <= 1e-5 in fp32. In bf16 the kernels multiply the bf16 x by the float32 gate's two
bf16 halves, which carry 16 significant bits of each gate entry, so the error is bounded by the
terms' magnitudes, not by the logits (which can cancel): ||err|| <= 2^-16 ||(|x| @ |gate|)||.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from meteora_jax.layers import MeteoRALinear
from meteora_jax.routing import Routing
from pallas_kernels import routed_lora, routed_lora_xla
from pallas_kernels.routed_lora import ROUTED_MAX_COLUMNS, ROUTED_MAX_TOKENS, routed_path
from pallas_kernels.routed_lora_pallas import routed_lora_pallas
from pallas_kernels.routed_lora_prefill import routed_lora_prefill
from pallas_kernels.lora_columns import side_weight
from pallas_kernels.pallas_common import gate_halves
from pallas_kernels.routed_lora_prefill import side_products as prefill_side_products
from pallas_kernels.routed_lora_xla import gate_logits

SEED = np.random.SeedSequence().entropy
SMALL = dict(block_k=16, block_n=16)  # several d_in chunks and output blocks at test sizes
KERNELS = {"decode": functools.partial(routed_lora_pallas, **SMALL), "prefill": routed_lora_prefill}
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _inputs(case, dtype, *, t, d_in, d_out, num_adapters, rank):
    rng = np.random.default_rng([SEED % 2**63, *case])
    x = jnp.asarray(rng.standard_normal((t, d_in)), dtype)
    gate = jnp.asarray(rng.standard_normal((d_in, num_adapters)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((num_adapters, d_in, rank)) / np.sqrt(d_in), dtype)
    b = jnp.asarray(rng.standard_normal((num_adapters, rank, d_out)) / np.sqrt(rank), dtype)
    s = jnp.asarray(rng.uniform(0.5, 2.0, num_adapters), jnp.float32)
    base = jnp.asarray(rng.standard_normal((t, d_out)), dtype)
    return x, gate, a, b, s, base


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), "non-finite output"
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _reference(x, gate, a, b, s, temperature, top_k, base):
    """The composition in float32 at highest precision, cast back to x's dtype."""
    f32 = lambda v: None if v is None else v.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        y, logits = routed_lora_xla(f32(x), gate, f32(a), f32(b), s, temperature, top_k=top_k, base=f32(base))
    return y, logits


# (tokens, d_in, d_out, L, r, k): one token, a few, two token tiles; d not multiples of the blocks;
# k = 1 (weight 1), k = L (every adapter); r = 1.
CASES = [
    (1, 72, 40, 6, 4, 2),
    (5, 50, 33, 5, 8, 1),
    (17, 40, 24, 4, 1, 4),
    (40, 48, 20, 7, 3, 2),
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_d{}x{}_L{}_r{}_k{}".format(*c))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
def test_forward_matches_composition(kernel, case, dtype, with_base):
    t, d_in, d_out, num_adapters, rank, k = case
    x, gate, a, b, s, base = _inputs(case, dtype, t=t, d_in=d_in, d_out=d_out, num_adapters=num_adapters, rank=rank)
    base = base if with_base else None
    temperature = 1.7
    y, logits = KERNELS[kernel](x, gate, a, b, s, temperature, top_k=k, base=base)
    want_y, want_logits = _reference(x, gate, a, b, s, temperature, k, base)
    assert y.shape == (t, d_out) and y.dtype == dtype and logits.dtype == jnp.float32
    if dtype == jnp.bfloat16:
        magnitude = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(gate, np.float64))
        logit_diff = np.asarray(logits, np.float64) - np.asarray(want_logits, np.float64)
        logit_err = np.linalg.norm(logit_diff) / np.linalg.norm(magnitude)
        assert logit_err <= 2**-16, f"seed={SEED}: gate logits, error {logit_err:.2e} of the terms' magnitude"
    else:
        assert _rel(logits, want_logits) <= 1e-5, f"seed={SEED}: gate logits"
    err = _rel(y, want_y)
    assert err <= TOL[dtype], f"seed={SEED}: relative error {err:.2e}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_ties_go_to_the_lower_index_as_lax_top_k(kernel):
    """Two identical gate columns give bit-equal logits; both paths must pick the same adapters."""
    x, gate, a, b, s, base = _inputs((7,), jnp.float32, t=6, d_in=40, d_out=24, num_adapters=5, rank=4)
    gate = gate.at[:, 3].set(gate[:, 1]).at[:, 4].set(gate[:, 1])  # adapters 1, 3, 4 tie everywhere
    for k in (1, 2):
        y, _ = KERNELS[kernel](x, gate, a, b, s, 1.0, top_k=k, base=base)
        want, _ = _reference(x, gate, a, b, s, 1.0, k, base)
        assert _rel(y, want) <= 1e-5, f"seed={SEED}, k={k}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_temperature_is_traced_and_changes_the_mixture(kernel):
    x, gate, a, b, s, base = _inputs((8,), jnp.float32, t=3, d_in=32, d_out=16, num_adapters=4, rank=4)
    fused = jax.jit(lambda temp: KERNELS[kernel](x, gate, a, b, s, temp, top_k=2)[0])
    for temperature in (1.0, 15.0):
        want, _ = _reference(x, gate, a, b, s, temperature, 2, None)
        assert _rel(fused(jnp.float32(temperature)), want) <= 1e-5, f"seed={SEED}, T={temperature}"
    assert _rel(fused(jnp.float32(1.0)), fused(jnp.float32(15.0))) > 1e-3


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gradients_match_autodiff_of_composition(kernel, dtype):
    x, gate, a, b, s, base = _inputs((9,), dtype, t=5, d_in=40, d_out=24, num_adapters=5, rank=4)
    probe_y = jnp.asarray(np.random.default_rng([SEED % 2**63, 10]).standard_normal((5, 24)), jnp.float32)

    def loss(fn):
        def f(x, gate, a, b, s, base, temperature):
            y, logits = fn(x, gate, a, b, s, temperature, base)
            return jnp.sum(y.astype(jnp.float32) * probe_y) + 0.1 * jnp.sum(logits**2)
        return f

    fused = loss(lambda x, g, a, b, s, temp, base: KERNELS[kernel](x, g, a, b, s, temp, top_k=2, base=base))
    # The kernels differentiate the composition with their grouped_lora impl ("auto": on a GPU the Pallas
    # product, whose bf16 rounding differs from XLA's by ~1e-2 in the temperature's gradient).
    ref = loss(lambda x, g, a, b, s, temp, base: routed_lora_xla(x, g, a, b, s, temp, top_k=2, impl="auto",
                                                                 base=base))
    args = (x, gate, a, b, s, base, jnp.float32(2.0))
    with jax.default_matmul_precision("highest"):
        got = jax.grad(fused, argnums=tuple(range(7)))(*args)
        want = jax.grad(ref, argnums=tuple(range(7)))(*args)
    for name, g, w in zip(("x", "gate", "lora_a", "lora_b", "scaling", "base", "temperature"), got, want):
        assert g.shape == w.shape, name
        assert _rel(g, w) <= TOL[dtype], f"seed={SEED}: d{name} relative error {_rel(g, w):.2e}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_eager_gradient_with_a_concrete_temperature(kernel):
    """jax.grad outside jit, differentiating the gate only, with a Python-float temperature: the
    composition's check saw the kernel's [1]-shaped temperature as concrete and refused it."""
    x, gate, a, b, s, base = _inputs((11,), jnp.float32, t=5, d_in=40, d_out=24, num_adapters=5, rank=4)

    def loss(g):
        y, logits = KERNELS[kernel](x, g, a, b, s, 1.5, top_k=2, base=base)
        return jnp.sum(y**2) + jnp.sum(logits**2)

    with jax.default_matmul_precision("highest"):
        eager = jax.grad(loss)(gate)
        jitted = jax.jit(jax.grad(loss))(gate)
    assert _rel(eager, jitted) <= 1e-5, f"seed={SEED}: relative error {_rel(eager, jitted):.2e}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gate_logits_are_float32_accurate_with_the_dot_gradients(dtype):
    """`gate_logits` (every path's logits when differentiated, and the forced-routing layer's) against
    float64: within 2^-16 of |x| @ |gate| per logit (bf16 x: the gate's two bf16 halves, error ~2^-17);
    its gradients are the dot's (float64 formulas, relative 1e-5 in float32, 1e-2 in bf16)."""
    x, gate, *_ = _inputs((11,), dtype, t=19, d_in=300, d_out=8, num_adapters=7, rank=2)
    x64, gate64 = np.asarray(x, np.float64), np.asarray(gate, np.float64)
    got = np.asarray(jax.jit(gate_logits)(x, gate), np.float64)
    bound = 2.0**-16 * (np.abs(x64) @ np.abs(gate64))
    assert np.all(np.abs(got - x64 @ gate64) <= bound), f"seed={SEED}"

    probe = jnp.asarray(np.random.default_rng([SEED % 2**63, 12]).standard_normal((19, 7)), jnp.float32)
    dx, dgate = jax.grad(lambda x, g: jnp.sum(gate_logits(x, g) * probe), argnums=(0, 1))(x, gate)
    assert dx.dtype == x.dtype and dgate.dtype == jnp.float32
    assert _rel(dx, np.asarray(probe, np.float64) @ gate64.T) <= TOL[dtype], f"seed={SEED}"
    assert _rel(dgate, x64.T @ np.asarray(probe, np.float64)) <= TOL[dtype], f"seed={SEED}"


def _narrowing_round_trips(jaxpr):
    """Every convert back to a float type from a narrower one that was converted from it
    (float32 -> bfloat16 -> float32), sub-jaxprs included."""
    narrowed, found = {}, []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "convert_element_type":
            (src,), (out,) = eqn.invars, eqn.outvars
            wide = narrowed.get(src) if isinstance(src, jax.extend.core.Var) else None
            if wide is not None and jnp.dtype(out.aval.dtype) == wide:
                found.append(str(eqn))
            if jnp.dtype(out.aval.dtype).itemsize < jnp.dtype(src.aval.dtype).itemsize:
                narrowed[out] = jnp.dtype(src.aval.dtype)
        for sub in jaxprs_in_params(eqn.params):
            found += _narrowing_round_trips(sub)
    return found


def test_gate_halves_do_not_rely_on_a_round_trip_xla_gpu_removes():
    """XLA on GPU rewrites convert(convert(gate, bf16), f32) to gate (openxla/xla#41605): halves
    computed as gate - f32(bf16(gate)) had lo = 0 there, and every bf16 path's logits were
    bf16-coarse (2e-4 of |x| @ |gate| on an H200, 18 of 4096 top-2 sets wrong; docs/benchmarks.md,
    session 31). The CPU keeps the round trip, so the values alone cannot show it: the jaxprs of
    every place that builds the halves must hold no such round trip."""
    x, gate, a, *_ = _inputs((14,), jnp.bfloat16, t=5, d_in=32, d_out=8, num_adapters=3, rank=2)
    builders = {
        "gate_halves": lambda g: gate_halves(g, jnp.bfloat16),
        "gate_logits": lambda g: gate_logits(x, g),
        "prefill side_products": lambda g: prefill_side_products(x, g, a),
        "fused layout side_weight": lambda g: side_weight([a], [g], jnp.bfloat16),
    }
    for name, build in builders.items():
        assert not _narrowing_round_trips(jax.make_jaxpr(build)(gate).jaxpr), name
    hi, lo = jax.jit(builders["gate_halves"])(gate)
    assert np.all(np.asarray(hi, np.float32) == np.asarray(gate.astype(jnp.bfloat16), np.float32))
    assert np.all(np.abs(np.asarray(hi, np.float64) + np.asarray(lo, np.float64) - np.asarray(gate, np.float64))
                  <= 2.0**-16 * np.abs(np.asarray(gate, np.float64))), f"seed={SEED}"


def _dots(jaxpr):
    """(precision, operand and output shapes) of every dot_general in a jaxpr, sub-jaxprs (custom VJPs)
    included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((eqn.params["precision"], {v.aval.shape for v in [*eqn.invars, *eqn.outvars]}))
        for sub in jaxprs_in_params(eqn.params):
            found += _dots(sub)
    return found


def test_float32_gate_training_takes_no_tf32_product():
    """float32 gate training multiplies at HIGHEST in the routed products and the gate logits (XLA's
    default is TF32 on recent GPUs: ~1e-3 relative logit error, which flips near-tied top-k choices
    between training and inference): the routed layer and the forced-routing layer, forward and
    backward. (The base linear keeps JAX's default precision, which `jax_default_matmul_precision` sets.)"""
    x, gate, a, b, s, base = _inputs((13,), jnp.float32, t=6, d_in=40, d_out=24, num_adapters=5, rank=4)

    def routed(x, gate):
        y, logits = routed_lora_xla(x, gate, a, b, s, 1.0, top_k=2, impl="xla", base=base)
        return jnp.sum(y) + jnp.sum(logits**2)

    layer = MeteoRALinear(features=24, axes=("embed", "mlp"), num_adapters=5, rank=4, kernel_impl="xla")
    forced = Routing(temperature=jnp.float32(1.0), forced_weights=jnp.full((5,), 0.2, jnp.float32))
    params = layer.init(jax.random.key(0), x, forced)

    def forced_loss(params):
        y, logits = layer.apply(params, x, forced)
        return jnp.sum(y) + jnp.sum(logits**2)

    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for name, jaxpr in (("routed", jax.make_jaxpr(jax.grad(routed, argnums=(0, 1)))(x, gate)),
                        ("forced", jax.make_jaxpr(jax.grad(forced_loss))(params))):
        dots = [p for p, shapes in _dots(jaxpr.jaxpr) if not shapes & {(40, 24), (24, 40)}]  # not the base's
        assert len(dots) >= 6 and all(p == highest for p in dots), (name, dots)


def test_dispatcher_choices_and_errors():
    assert routed_path("pallas", ROUTED_MAX_TOKENS, 4, 8) == "decode"
    assert routed_path("pallas", ROUTED_MAX_TOKENS + 1, 4, 8) == "prefill"
    assert routed_path("pallas", 1, ROUTED_MAX_COLUMNS + 1, 1) == "composition"
    assert routed_path("xla", 1, 4, 8) == "composition"
    assert routed_path("pallas", 0, 4, 8) == "composition"  # T = 0: the decode kernel's gather failed
    assert routed_path("pallas", 1, 2, 256) == "composition"  # r > 128: the kernels' limit
    on_gpu = jax.default_backend() == "gpu"
    assert routed_path("auto", 1, 4, 8) == ("decode" if on_gpu else "composition")
    assert routed_path("auto", 512, 28, 8) == ("prefill" if on_gpu else "composition")
    x, gate, a, b, s, base = _inputs((11,), jnp.float32, t=4, d_in=24, d_out=16, num_adapters=3, rank=2)
    want, want_logits = _reference(x, gate, a, b, s, 1.0, 2, base)
    for impl in ("auto", "pallas", "xla", "xla_gather"):
        with jax.default_matmul_precision("highest"):
            y, logits = routed_lora(x, gate, a, b, s, top_k=2, impl=impl, base=base)
        assert _rel(y, want) <= 1e-5 and _rel(logits, want_logits) <= 1e-5, f"seed={SEED}, impl={impl}"
    with pytest.raises(ValueError, match="unknown grouped_lora impl 'fast'"):
        routed_lora(x, gate, a, b, s, top_k=2, impl="fast")
    with pytest.raises(ValueError, match=r"gate must be \[d_in, L\]=\[24, 3\], got \(24, 4\)"):
        routed_lora(x, jnp.zeros((24, 4)), a, b, s, top_k=2)
    with pytest.raises(ValueError, match="lora_b .* does not match lora_a"):
        routed_lora(x, gate, a, b[:, :1], s, top_k=2)
    for kernel in KERNELS.values():
        with pytest.raises(ValueError, match="top_k=4 must be in"):
            kernel(x, gate, a, b, s, 1.0, top_k=4)
    # The same error from every impl (the XLA composition took top_k=0 as a zero delta, and failed
    # inside lax.top_k above L), and inputs that would be taken silently.
    for impl in ("auto", "pallas", "xla", "xla_gather"):
        for top_k in (0, 4):
            with pytest.raises(ValueError, match=rf"top_k={top_k} must be in \[1, L=3\]"):
                routed_lora(x, gate, a, b, s, top_k=top_k, impl=impl)
        with pytest.raises(ValueError, match=r"base must be \[T, d_out\]=\[4, 16\], got \(1, 16\)"):
            routed_lora(x, gate, a, b, s, top_k=2, impl=impl, base=base[:1])
        for temperature in (0.0, -1.0, float("inf")):  # 0 gives NaN weights, < 0 favours the losers
            with pytest.raises(ValueError, match="routing temperature must be a finite number > 0"):
                routed_lora(x, gate, a, b, s, temperature, top_k=2, impl=impl)
    # The public XLA reference checks the same (it took top_k=0 and temperature 0 silently).
    for top_k, temperature, message in ((0, 1.0, r"top_k=0 must be in \[1, L=3\]"), (2.0, 1.0, "top_k=2.0 must be in"),
                                        (2, 0.0, "routing temperature must be a finite number > 0")):
        with pytest.raises(ValueError, match=message):
            routed_lora_xla(x, gate, a, b, s, temperature, top_k=top_k)
    # numpy arrays and lists are taken as arrays (they were AttributeErrors), with the same result
    with jax.default_matmul_precision("highest"):
        for fn in (routed_lora, lambda *v, **kw: routed_lora_xla(*v, 1.0, **kw)):
            y, _ = fn(np.asarray(x), np.asarray(gate).tolist(), np.asarray(a), np.asarray(b), np.asarray(s).tolist(),
                      top_k=2, base=np.asarray(base))
            assert _rel(y, want) <= 1e-5, f"seed={SEED}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_nan_token_leaves_the_other_tokens_alone(kernel):
    """A token whose logits are NaN (e.g. overflowed activations) gets a NaN row, and only that row."""
    x, gate, a, b, s, base = _inputs((12,), jnp.float32, t=4, d_in=32, d_out=16, num_adapters=5, rank=4)
    x = x.at[2, 3].set(jnp.nan)
    y, logits = KERNELS[kernel](x, gate, a, b, s, 1.0, top_k=2, base=base)
    want, _ = _reference(x, gate, a, b, s, 1.0, 2, base)
    assert np.all(np.isnan(np.asarray(y[2]))) and np.all(np.isnan(np.asarray(logits[2])))
    keep = np.array([0, 1, 3])
    assert _rel(y[keep], want[keep]) <= 1e-5, f"seed={SEED}"


def test_model_prefill_and_decode_with_the_fused_kernel_equal_the_xla_model():
    """A 2-layer MeteoRA model (unrolled, as the Generator runs it) with kernel_impl="pallas", so the
    layers take the fused paths (the prefill's 2 x 20 tokens the two-GEMM prefill path, each decode
    step's 2 the decode kernel), against the same weights with kernel_impl="xla": logits, gate logits and KV
    cache at the padded prefill and each decode step."""
    from meteora_jax import KVCache, LlamaForCausalLM, MeteoRAConfig, ModelConfig, init_params
    from meteora_jax.model import unstack_layers
    from torch_reference import relative_error

    def config(impl):
        return ModelConfig(vocab_size=61, hidden_size=40, intermediate_size=56, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=10,
                           meteora=MeteoRAConfig(num_adapters=5, rank=3, top_k=2, kernel_impl=impl))

    rng = np.random.default_rng([SEED % 2**63, 13])
    params = unstack_layers(init_params(config("xla"), jax.random.key(int(rng.integers(2**31)))), 2)
    batch, prompt_len, total = 2, 20, 23
    ids = jnp.asarray(rng.integers(0, 61, (batch, total)))
    mask = np.ones((batch, total), bool)
    mask[1, :2] = False  # left padding
    positions = jnp.asarray(np.clip(np.cumsum(mask, -1) - 1, 0, None))
    apply = {impl: jax.jit(lambda p, *a, m=LlamaForCausalLM(config(impl), scan_layers=False): m.apply({"params": p}, *a))
             for impl in ("pallas", "xla")}
    caches = {impl: KVCache.init(config(impl), batch, max_length=26) for impl in apply}

    def pallas_jaxpr(sl):
        return str(jax.make_jaxpr(apply["pallas"])(params, ids[:, sl], jnp.asarray(mask[:, sl]), positions[:, sl],
                                                   caches["pallas"]))

    prefill_jaxpr, decode_jaxpr = pallas_jaxpr(slice(0, prompt_len)), pallas_jaxpr(slice(0, 1))
    assert "name=_prefill_two_gemms" in prefill_jaxpr and "routed_lora_expand" not in prefill_jaxpr, "prefill path"
    assert "routed_lora_expand" in decode_jaxpr and "_prefill_two_gemms" not in decode_jaxpr, "decode kernel"
    for step, sl in enumerate([slice(0, prompt_len)] + [slice(t, t + 1) for t in range(prompt_len, total)]):
        args = (ids[:, sl], jnp.asarray(mask[:, sl]), positions[:, sl])
        with jax.default_matmul_precision("highest"):
            out = {impl: fn(params, *args, caches[impl]) for impl, fn in apply.items()}
        got, want = out["pallas"], out["xla"]
        context = f"seed={SEED} step={step}"
        assert relative_error(got.logits, want.logits, mask[:, sl]) <= 1e-5, context
        for name, w in want.gate_logits.items():
            valid = np.broadcast_to(mask[:, sl][None, :, :, None], w.shape)
            assert relative_error(got.gate_logits[name], w, valid) <= 1e-5, (context, name)
        caches = {impl: o.cache for impl, o in out.items()}
    for g, w in ((caches["pallas"].k, caches["xla"].k), (caches["pallas"].v, caches["xla"].v)):
        assert relative_error(g, w) <= 1e-5, f"seed={SEED}"


def test_gate_training_gradients_through_the_fused_paths_equal_the_xla_model():
    """Gate training as train.py runs it (scanned layers, remat "full", joint loss, gradients for the
    gates only) with kernel_impl="pallas", whose 2 x 24-token forward takes the prefill path under the
    composition's VJP, against kernel_impl="xla": loss (1e-5) and every gate gradient (1e-4: the
    differentiated composition runs the Pallas product, whose f32 sums differ in order from XLA's;
    usually up to 1.2e-5 through these two layers, once 5.01e-5 for the k_proj gate), f32."""
    from meteora_jax import LlamaForCausalLM, MeteoRAConfig, ModelConfig, init_params
    from meteora_jax.loss import joint_loss
    from meteora_jax.train import merge_params, split_params

    def model(impl):
        return LlamaForCausalLM(ModelConfig(
            vocab_size=53, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=8, remat="full", meteora=MeteoRAConfig(num_adapters=5, rank=3, top_k=2, kernel_impl=impl)))

    rng = np.random.default_rng([SEED % 2**63, 14])
    params = init_params(model("xla").config, jax.random.key(int(rng.integers(2**31))))
    gates, frozen = split_params(params)
    gates = jax.tree.map(lambda g: g + jnp.asarray(rng.standard_normal(g.shape), g.dtype), gates)  # not all-zero
    batch_size, seq = 2, 24
    mask = np.ones((batch_size, seq), bool)
    mask[1, :5] = False
    batch = dict(
        input_ids=jnp.asarray(rng.integers(0, 53, (batch_size, seq))), attention_mask=jnp.asarray(mask),
        lm_labels=jnp.asarray(rng.integers(0, 53, (batch_size, seq))), lm_mask=jnp.asarray(mask),
        gate_labels=jnp.asarray(rng.integers(0, 5, (batch_size, seq))), gate_mask=jnp.asarray(mask))

    def loss(impl):
        def f(gates):
            out = model(impl).apply({"params": merge_params(gates, frozen)}, batch["input_ids"],
                                    batch["attention_mask"])
            return joint_loss(out.logits, out.gate_logits, batch, coef=50.0, top_k=2)[0]
        return f

    assert "name=_prefill_two_gemms" in str(jax.make_jaxpr(loss("pallas"))(gates)), "the prefill path"
    with jax.default_matmul_precision("highest"):
        got_loss, got = jax.value_and_grad(loss("pallas"))(gates)
        want_loss, want = jax.value_and_grad(loss("xla"))(gates)
    assert abs(float(got_loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss)), f"seed={SEED}"
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        assert _rel(g, w) <= 1e-4, f"seed={SEED}: {jax.tree_util.keystr(path)} relative error {_rel(g, w):.2e}"
