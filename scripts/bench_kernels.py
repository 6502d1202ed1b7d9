"""Benchmark of the routed grouped low-rank product (issue 4): one GPU run, a table and a JSON file.

    python scripts/bench_kernels.py [--out PATH] [--quick] [--check-only] [--variants]

Rows: d_in -> d_out in {4096 -> 4096, 4096 -> 14336}, r in {8, 16, 64}, T in {1, 16, 256, 4096,
16384}, L = 28, k = 2, bf16, routing from a random gate with per-adapter biases (uneven loads), plus
one skewed row (80% of the tokens' first choice on one adapter). Columns (ms, device time): base
linear (`base_product`: the model's bf16-output GEMM); base + one LoRA (XLA), summed in float32
(`lora1`) or in PEFT's arithmetic (`lora1_peft`: bf16 base output + bf16 delta); base + MeteoRA
delta via XLA dense / concat / gather / sorted ragged_dot; base + delta via jax's Hopper
`ragged_dot_mgpu` on sorted tokens; base + Pallas delta (`pallas`, base added in the kernel);
`auto`, what `grouped_lora(impl="auto")` runs; the model's inference form of the layer
(`fused_layout`: one GEMM over [x | h], its own routing included); forward + backward (d x, d
expert_weight) of the routed delta (Pallas: the grad path that `grouped_lora(impl="auto")` also
differentiates through; XLA dense; XLA concat) and of one LoRA (d x): `lora1_fb` as autodiff gives
it (its backward GEMMs take float32 operands), `lora1_fb_bf16` with bfloat16 backward operands, the
stricter baseline.
Memory columns: the compiled executable's temporary bytes (peak extra device memory beyond the
arguments and the output), from XLA's memory analysis.

Timing: CUPTI kernel timings (jax.experimental.mosaic.gpu.profiler's extension): the sum of the
kernels' device times per call, median over many calls after warm-up, cycling over three input
sets (fresh random weights and tokens) so the L2 cache does not hold a single set.
Before timing, the Pallas kernels are checked against the XLA reference on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from meteora_jax.cli import check_writable, choice_list, cli_fail, positive_int  # noqa: E402
from meteora_jax.layers import FusedProjections  # noqa: E402
from meteora_jax.routing import Routing  # noqa: E402
from pallas_kernels.grouped_lora import grouped_lora  # noqa: E402
from pallas_kernels.grouped_lora_pallas import grouped_lora_pallas  # noqa: E402
from pallas_kernels.grouped_lora_xla import (  # noqa: E402
    grouped_lora_concat,
    grouped_lora_dense,
    grouped_lora_gather,
    grouped_lora_ragged,
)
from pallas_kernels.lora_columns import extended_kernel, side_weight  # noqa: E402

L, K = 28, 2
NSETS = 3
GATHER_LIMIT = 20 * 2**30

# ------------------------------------------------------------------------------------------------
# timing


def _cupti_ext():
    try:
        from jax._src.lib import mosaic_gpu as mosaic_gpu_lib

        ext = mosaic_gpu_lib._mosaic_gpu_ext
        ext._cupti_init, ext._cupti_get_timings  # noqa: B018
        return ext
    except Exception:  # noqa: BLE001
        return None


_EXT = _cupti_ext()


BREAKDOWN = {}


def device_time_ms(fn, argsets, iters):
    """Median over `iters` calls (cycling argsets) of the summed kernel time of one call, in ms.

    The last call's per-kernel (name, ms) list is left in BREAKDOWN["last"]."""
    for a in argsets:
        jax.block_until_ready(fn(*a))
    if _EXT is not None:
        _EXT._cupti_init()
        try:
            outs = [fn(*argsets[0])]
            jax.block_until_ready(outs)
        finally:
            per_call = len(_EXT._cupti_get_timings(True))
        if per_call:
            _EXT._cupti_init()
            try:
                outs = []
                for i in range(iters):
                    outs.append(fn(*argsets[i % len(argsets)]))
                    if len(outs) > 8:
                        jax.block_until_ready(outs)
                        outs = []
                jax.block_until_ready(outs)
            finally:
                timings = _EXT._cupti_get_timings(True)
            if len(timings) == per_call * iters:
                sums = [sum(t for _, t in timings[i * per_call:(i + 1) * per_call]) for i in range(iters)]
                BREAKDOWN["last"] = [(n[:60], round(t, 5)) for n, t in timings[-per_call:]]
                return statistics.median(sums)
            if timings:
                # The kernel count per call varied (seen in session 15 on the H200, cause not found), so
                # calls cannot be told apart: the mean over all of them, with per-kernel means, instead
                # of falling back to the host clock, which counts the launch gaps too.
                print(f"note: {len(timings)} kernel records for {iters} calls of {per_call}; timing the mean",
                      flush=True)
                means = {}
                for n, t in timings:
                    means[n[:60]] = means.get(n[:60], 0.0) + t / iters
                BREAKDOWN["last"] = [(n, round(t, 5)) for n, t in means.items()]
                return sum(t for _, t in timings) / iters
    # fallback (no CUPTI records): host clock around many pipelined calls
    t0 = time.perf_counter()
    outs = [fn(*argsets[i % len(argsets)]) for i in range(iters)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - t0) / iters * 1e3


def temp_mib(compiled):
    try:
        return compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # noqa: BLE001
        return float("nan")


# ------------------------------------------------------------------------------------------------
# inputs


def make_inputs(key, t, d_in, d_out, r, dtype=jnp.bfloat16, skew=False):
    ks = jax.random.split(key, 8)
    x = jax.random.normal(ks[0], (t, d_in), dtype)
    w_base = (jax.random.normal(ks[1], (d_in, d_out), jnp.float32) / np.sqrt(d_in)).astype(dtype)
    a = (jax.random.normal(ks[2], (L, d_in, r), jnp.float32) / np.sqrt(d_in)).astype(dtype)
    b = (jax.random.normal(ks[3], (L, r, d_out), jnp.float32) / np.sqrt(r)).astype(dtype)
    s = jax.random.uniform(ks[4], (L,), jnp.float32, 0.5, 2.0)
    gate = jax.random.normal(ks[5], (d_in, L), jnp.float32) / np.sqrt(d_in)
    bias = jax.random.normal(ks[6], (L,), jnp.float32) * 1.0  # uneven adapter loads
    logits = x.astype(jnp.float32) @ gate + bias
    if skew:  # 80% of the tokens pick adapter 0 first
        hot = jax.random.uniform(ks[7], (t,)) < 0.8
        logits = jnp.where(hot[:, None], logits.at[:, 0].add(100.0), logits)
    wv, idx = jax.lax.top_k(logits, K)
    wv = jax.nn.softmax(wv, axis=-1)
    a1, b1, s1 = a[0], b[0], s[0]
    # The fused inference layout's weights of this projection, stored once as the model stores them.
    side_w, w_ext = side_weight([a], [gate], dtype), extended_kernel([w_base], [b])
    return dict(x=x, w_base=w_base, a=a, b=b, s=s, idx=idx.astype(jnp.int32), w=wv, a1=a1, b1=b1, s1=s1,
                side_w=side_w, w_ext=w_ext)


def _mgpu_delta():
    """Routed delta through jax's Hopper ragged_dot_mgpu on sorted pairs, or None if unavailable."""
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    except Exception:  # noqa: BLE001
        return None

    def delta(x, a, b, s, idx, w, block):
        num_tokens, top_k = idx.shape
        flat = idx.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        tok = order // top_k
        sizes = jnp.bincount(flat, length=a.shape[0]).astype(jnp.int32)
        xs = x[tok]
        bm, bn, bk = block
        xa = ragged_dot_mgpu.ragged_dot(xs, a, group_sizes=sizes, block_m=bm, block_n=min(bn, a.shape[2]),
                                        block_k=bk, max_concurrent_steps=2, grid_block_n=1)
        coef = (w.reshape(-1).astype(jnp.float32) * s[flat])[order]
        xa = (xa.astype(jnp.float32) * coef[:, None]).astype(x.dtype)
        ys = ragged_dot_mgpu.ragged_dot(xa, b, group_sizes=sizes, block_m=bm, block_n=bn,
                                        block_k=min(bk, b.shape[1]), max_concurrent_steps=2, grid_block_n=1)
        return jnp.zeros((num_tokens, b.shape[2]), jnp.float32).at[tok].add(ys.astype(jnp.float32)).astype(x.dtype)

    return delta


MGPU = _mgpu_delta()

# ------------------------------------------------------------------------------------------------
# functions under test (all take the same arguments)
ARGS = ("x", "w_base", "a", "b", "s", "idx", "w", "a1", "b1", "s1", "side_w", "w_ext")


def base_product(x, w_base):
    """The base GEMM as the model computes it (`layers.MeteoRALinear`): compute-dtype output, which
    the GEMM accumulates in float32 and rounds once. (Asking for a float32 output and converting
    rounds the same, but at d_out 14336 XLA then runs the GEMM with a float32 output and a separate
    convert kernel: 83 µs at T = 4096 on an H200.)"""
    return jnp.dot(x, w_base)


def layer(delta_fn):
    def f(x, w_base, a, b, s, idx, w, a1, b1, s1, side_w, w_ext):
        y = base_product(x, w_base)
        return y if delta_fn is None else y + delta_fn(x, a, b, s, idx, w)
    return f


def auto_layer(x, w_base, a, b, s, idx, w, a1, b1, s1, side_w, w_ext):
    """What the model's separate layout runs: `grouped_lora(impl="auto")` with the base added in."""
    return grouped_lora(x, a, b, s, idx, w, base=base_product(x, w_base))


def pallas_layer(**kw):
    def f(x, w_base, a, b, s, idx, w, a1, b1, s1, side_w, w_ext):
        return grouped_lora_pallas(x, a, b, s, idx, w, base=base_product(x, w_base), **kw)
    return f


def fused_layout_layer(x, w_base, a, b, s, idx, w, a1, b1, s1, side_w, w_ext):
    """The model's inference form of the layer (`layers.FusedProjections` with one projection, the
    fused layout): side GEMM, the routing kernel, one GEMM over [x | h]. It routes by its own gate
    (top-k and softmax included), where the other columns take idx and w as given."""
    proj = FusedProjections(features=(w_base.shape[1],), adapted=(True,), num_adapters=L, rank=a.shape[2],
                            top_k=K, dtype=x.dtype, param_dtype=x.dtype)
    params = {"kernel": w_ext, "side": side_w, "lora_scaling": s[None].astype(jnp.float32)}
    return proj.apply({"params": params}, x, Routing())[0][0]


def lora1_layer(x, w_base, a, b, s, idx, w, a1, b1, s1, side_w, w_ext):
    """One LoRA, base and delta summed in float32 and rounded once."""
    y = jnp.dot(x, w_base, preferred_element_type=jnp.float32)
    xa = jnp.dot(x, a1, preferred_element_type=jnp.float32) * s1
    return (y + jnp.dot(xa.astype(x.dtype), b1, preferred_element_type=jnp.float32)).astype(x.dtype)


def lora1_peft_layer(x, w_base, a, b, s, idx, w, a1, b1, s1, side_w, w_ext):
    """One LoRA in HF PEFT's arithmetic: base output and delta each in the compute dtype, then added.
    XLA can fold the add into a GEMM, so at large T this baseline is faster than `lora1_layer`."""
    xa = (jnp.dot(x, a1, preferred_element_type=jnp.float32) * s1).astype(x.dtype)
    return base_product(x, w_base) + jnp.dot(xa, b1)


def lora1_fwd_bwd(x, w_base, a, b, s, idx, w, a1, b1, s1, side_w, w_ext):
    def delta(x):
        xa = jnp.dot(x, a1, preferred_element_type=jnp.float32) * s1
        return jnp.dot(xa.astype(x.dtype), b1, preferred_element_type=jnp.float32).astype(x.dtype)
    out, vjp = jax.vjp(delta, x)
    return out, vjp(out)  # cotangent: any [T, d_out] array


def lora1_fwd_bwd_bf16(x, w_base, a, b, s, idx, w, a1, b1, s1, side_w, w_ext):
    """One LoRA's f+b with every backward GEMM on bfloat16 operands: `grouped_lora_concat` with one
    adapter and weight 1 (a stricter baseline than `lora1_fwd_bwd`, whose autodiff backward runs its
    GEMMs on float32 operands)."""
    one_idx, one_w = jnp.zeros((x.shape[0], 1), jnp.int32), jnp.ones((x.shape[0], 1), jnp.float32)
    out, vjp = jax.vjp(lambda x: grouped_lora_concat(x, a1[None], b1[None], s1[None], one_idx, one_w), x)
    return out, vjp(out)


def routed_fwd_bwd(delta_fn, lora_grads=False):
    def f(x, w_base, a, b, s, idx, w, a1, b1, s1, side_w, w_ext):
        if lora_grads:
            out, vjp = jax.vjp(lambda x, w, a, b: delta_fn(x, a, b, s, idx, w), x, w, a, b)
        else:
            out, vjp = jax.vjp(lambda x, w: delta_fn(x, a, b, s, idx, w), x, w)
        return out, vjp(out)
    return f


def pallas_delta(**kw):
    return lambda x, a, b, s, idx, w: grouped_lora_pallas(x, a, b, s, idx, w, **kw)


def columns(variants=False):
    cols = {
        "base": layer(None),
        "lora1": lora1_layer,
        "lora1_peft": lora1_peft_layer,
        "xla_dense": layer(grouped_lora_dense),
        "xla_concat": layer(grouped_lora_concat),
        "xla_gather": layer(grouped_lora_gather),
        "xla_ragged": layer(grouped_lora_ragged),
        "mgpu_ragged": None if MGPU is None else "mgpu",
        "pallas": pallas_layer(),
        "auto": auto_layer,
        "pallas_unfused": layer(pallas_delta()),
        "fused_layout": fused_layout_layer,
        "lora1_fb": lora1_fwd_bwd,
        "lora1_fb_bf16": lora1_fwd_bwd_bf16,
        "xla_dense_fb": routed_fwd_bwd(grouped_lora_dense),
        "xla_concat_fb": routed_fwd_bwd(grouped_lora_concat),
        "pallas_fb": routed_fwd_bwd(pallas_delta()),
        "pallas_fb_lora": routed_fwd_bwd(pallas_delta(), lora_grads=True),
    }
    if variants:
        cols["pallas_sorted"] = pallas_layer(path="sorted")
        cols["pallas_dense"] = pallas_layer(path="dense")  # --skip pallas_dense leaves it out
        cols["pallas_decode"] = pallas_layer(path="decode")
        cols["pallas_combo"] = pallas_layer(path="combo")
        cols["pallas_fb_sorted"] = routed_fwd_bwd(pallas_delta(path="sorted"))
        cols["pallas_fb_dense"] = routed_fwd_bwd(pallas_delta(path="dense"))
        cols["pallas_fb_decode"] = routed_fwd_bwd(pallas_delta(path="decode"))
        cols["pallas_fb_combo"] = routed_fwd_bwd(pallas_delta(path="combo"))
    return cols


# Paths the auto rule chooses among; the "best" column of the compact table is the fastest of these.
LAYER_PATHS = ("pallas_sorted", "pallas_dense", "pallas_decode", "pallas_combo")
FB_PATHS = ("pallas_fb_sorted", "pallas_fb_dense", "pallas_fb_decode", "pallas_fb_combo")


# ------------------------------------------------------------------------------------------------
# GPU correctness check


CHECK_CASES = [  # (T, d_in, d_out, r, k, dtype, path)
    (1, 4096, 4096, 64, 2, jnp.bfloat16, "auto"),
    (16, 4096, 14336, 8, 2, jnp.bfloat16, "auto"),
    (300, 4096, 4096, 16, 2, jnp.bfloat16, "auto"),
    # float32 through the concat grad path (HIGHEST-precision GEMMs: TF32 gave 3e-4), below and above
    # ROUTING_GRAD_GATHER_MIN_TOKENS
    (300, 200, 333, 7, 3, jnp.float32, "auto"),
    (2048, 100, 333, 5, 2, jnp.float32, "auto"),
    (300, 4096, 4096, 16, 2, jnp.bfloat16, "decode"),
    (1, 4096, 4096, 8, 2, jnp.bfloat16, "decode"),
    (16, 4096, 14336, 64, 2, jnp.bfloat16, "decode"),
    (9, 4096, 4096, 8, 2, jnp.bfloat16, "decode"),
    (4096, 4096, 4096, 64, 2, jnp.bfloat16, "sorted"),  # the default depth tile (128) at a benchmark row
    (1000, 200, 333, 7, 3, jnp.float32, "sorted"),
    (37, 130, 90, 128, 1, jnp.float32, "decode"),
    (37, 130, 90, 128, 28, jnp.bfloat16, "sorted"),
    (300, 4096, 4096, 16, 2, jnp.bfloat16, "dense"),
    (77, 200, 333, 5, 3, jnp.float32, "dense"),
    (16, 4096, 4096, 64, 2, jnp.bfloat16, "dense"),
    (256, 4096, 14336, 8, 2, jnp.bfloat16, "dense"),
    (4096, 4096, 4096, 16, 2, jnp.bfloat16, "dense"),
    (1000, 200, 333, 7, 28, jnp.float32, "dense"),
    (4096, 4096, 4096, 16, 2, jnp.bfloat16, "combo"),
    (16384, 4096, 14336, 8, 2, jnp.bfloat16, "combo"),
    (300, 4096, 4096, 64, 2, jnp.bfloat16, "combo"),
    (1000, 200, 333, 7, 3, jnp.float32, "combo"),
    (37, 130, 90, 128, 28, jnp.bfloat16, "combo"),
]
CHECK_PATHS = tuple(dict.fromkeys(case[-1] for case in CHECK_CASES))  # --check-paths


def check(log, paths=None):
    """The Pallas paths (all, or those in `paths`) against the float32 XLA reference, outputs and
    gradients, on this GPU."""
    rng = np.random.default_rng()
    ok = True
    for case in CHECK_CASES:
        if paths and case[-1] not in paths:
            continue
        try:
            ok &= _check_case(log, rng, *case)
        except Exception:  # noqa: BLE001
            log(f"check {case} raised:\n{traceback.format_exc()[-3000:]}")
            ok = False
    return ok


def _check_case(log, rng, t, d_in, d_out, r, k, dtype, path):
    seed = int(rng.integers(2**31))
    key = jax.random.PRNGKey(seed)
    ks = jax.random.split(key, 8)  # one key per array: none is drawn from another's key
    x = jax.random.normal(ks[0], (t, d_in), dtype)
    a = (jax.random.normal(ks[1], (L, d_in, r)) / np.sqrt(d_in)).astype(dtype)
    b = (jax.random.normal(ks[2], (L, r, d_out)) / np.sqrt(r)).astype(dtype)
    s = jax.random.uniform(ks[3], (L,), jnp.float32, 0.5, 2.0)
    idx = jax.vmap(lambda kk: jax.random.permutation(kk, L)[:k])(jax.random.split(ks[4], t)).astype(jnp.int32)
    w = jax.random.uniform(ks[5], (t, k), jnp.float32)
    f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
    base = jax.random.normal(ks[6], (t, d_out), dtype)
    with jax.default_matmul_precision("highest"):
        ref = grouped_lora_dense(f32(x), f32(a), f32(b), s, idx, w)
    out = jax.jit(lambda *v: grouped_lora_pallas(*v, path=path, poison=True))(x, a, b, s, idx, w)
    outb = jax.jit(lambda *v: grouped_lora_pallas(*v[:-1], base=v[-1], path=path))(x, a, b, s, idx, w, base)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    errs = {"out": float(jnp.linalg.norm(f32(out) - ref) / jnp.linalg.norm(ref)),
            "out+base": float(jnp.linalg.norm(f32(outb) - ref - f32(base)) / jnp.linalg.norm(ref + f32(base)))}
    g = jax.random.normal(ks[7], (t, d_out), jnp.float32)

    def loss(fn, cast):
        return lambda x, a, b, w: jnp.sum(f32(fn(cast(x), cast(a), cast(b), s, idx, w)) * g)

    with jax.default_matmul_precision("highest"):
        gref = jax.grad(loss(grouped_lora_dense, f32), argnums=(0, 1, 2, 3))(f32(x), f32(a), f32(b), w)
    gp = jax.jit(jax.grad(loss(lambda *v: grouped_lora_pallas(*v, path=path, poison=True), lambda v: v),
                          argnums=(0, 1, 2, 3)))(x, a, b, w)
    for name, u, v in zip(("dx", "da", "db", "dw"), gref, gp):
        errs[name] = float(jnp.linalg.norm(f32(v) - u) / jnp.linalg.norm(u))
    good = all(np.isfinite(e) and e <= tol for e in errs.values())
    log(f"check T={t} {d_in}->{d_out} r={r} k={k} {jnp.dtype(dtype).name} {path} seed={seed}: "
        + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + ("  ok" if good else "  FAIL"))
    return good


# ------------------------------------------------------------------------------------------------


def parse_row(spec):
    """'d_out:r:T' or 'd_out:r:T:skew' -> (d_out, r, T, skew); ValueError naming the spec."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "skew"):
        raise ValueError(f"{spec!r} is not d_out:r:T or d_out:r:T:skew")
    try:
        d_out, r, t = (int(v) for v in parts[:3])
    except ValueError:
        raise ValueError(f"{spec!r} has a non-integer d_out, r or T") from None
    if min(d_out, r, t) < 1:
        raise ValueError(f"{spec!r}: d_out, r and T must be >= 1")
    return d_out, r, t, len(parts) == 4


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_kernels.json"))
    parser.add_argument("--quick", action="store_true", help="a subset of rows (tuning)")
    parser.add_argument("--variants", action="store_true", help="add Pallas block/path variants")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--check-paths", default="", help="comma-separated paths the GPU check covers (default all)")
    parser.add_argument("--dout", type=int, choices=(0, 4096, 14336), default=0,
                        help="only rows with this d_out (0: all)")
    parser.add_argument("--iters", type=positive_int, default=30)
    parser.add_argument("--only", default="",
                        help="comma-separated column names (the pallas_* path variants need --variants)")
    parser.add_argument("--rows", default="", help="explicit rows 'd_out:r:T[:skew],...' (overrides --quick/--dout)")
    parser.add_argument("--skip", default="", help="comma-separated column names to leave out")
    parser.add_argument("--decode-max-t", type=int, default=1 << 30, help="time the decode path only up to this T")
    parser.add_argument("--hlo-dir", default="", help="also write each timed column's compiled HLO here (to map the "
                        "per-kernel breakdown's fusion names to their ops)")
    args = parser.parse_args()

    # Every option is checked here, before the GPU check and the first compile.
    if args.no_check and (args.check_only or args.check_paths):
        cli_fail(parser, "--no-check excludes --check-only and --check-paths")
    check_paths = choice_list(parser, "--check-paths", args.check_paths, CHECK_PATHS) if args.check_paths else []
    rows = [(d_out, r, t, False) for d_out in (4096, 14336) for r in (8, 16, 64) for t in (1, 16, 256, 4096, 16384)]
    rows.append((4096, 16, 4096, True))
    if args.quick:
        rows = [(4096, r, t, False) for r in (8, 64) for t in (1, 16, 256, 4096, 16384)] + [(4096, 16, 4096, True)]
    if args.dout:
        rows = [row for row in rows if row[0] == args.dout]
    if args.rows:
        try:
            rows = [parse_row(spec) for spec in args.rows.split(",")]
        except ValueError as e:
            cli_fail(parser, f"--rows: {e}")
    if not rows:  # --quick --dout 14336
        cli_fail(parser, f"--dout {args.dout}: --quick has rows of d_out 4096 only")
    cols = columns(args.variants)
    for flag, text in (("--only", args.only), ("--skip", args.skip)):
        names = choice_list(parser, flag, text, list(columns(variants=True))) if text else []
        if set(names) - set(cols):
            cli_fail(parser, f"{flag} {text!r}: {','.join(sorted(set(names) - set(cols)))}: add --variants")
    if args.only:
        cols = {k: v for k, v in cols.items() if k in args.only.split(",")}
    if args.skip:
        cols = {k: v for k, v in cols.items() if k not in args.skip.split(",")}
    if not cols and not args.check_only:
        cli_fail(parser, f"--only {args.only!r} and --skip {args.skip!r} leave no column")
    check_writable(parser, "--out", args.out)
    if args.hlo_dir:
        check_writable(parser, "--hlo-dir", args.hlo_dir, folder=True)

    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, cupti={_EXT is not None}")
    t0 = time.time()
    ok = None  # not checked (--no-check): the JSON's check_ok is null
    if args.no_check:
        log("gpu check skipped (--no-check)")
    else:
        ok = check(log, check_paths)
        log(f"gpu check {'passed' if ok else 'FAILED'} in {time.time() - t0:.0f}s")
    if args.check_only:
        return 0 if ok else 1

    if MGPU is not None and "mgpu_ragged" in cols and args.only != "mgpu_ragged":
        # jax's Mosaic GPU kernel can fault the CUDA context (seen: misaligned address on the
        # skewed row), so it runs in its own process and its numbers are merged afterwards.
        cols.pop("mgpu_ragged")
        cols["mgpu_ragged"] = "subprocess"
    results = []
    key = jax.random.PRNGKey(int(np.random.SeedSequence().entropy % 2**31))
    for d_out, r, t, skew in rows:
        d_in = 4096
        sets = []
        for _ in range(NSETS):
            key, sub = jax.random.split(key)
            inp = make_inputs(sub, t, d_in, d_out, r, skew=skew)
            sets.append(tuple(inp[n] for n in ARGS))
        loads = np.bincount(np.asarray(sets[0][5]).reshape(-1), minlength=L)
        row = dict(d_in=d_in, d_out=d_out, r=r, T=t, skew=skew, max_load=int(loads.max()),
                   empty_adapters=int((loads == 0).sum()), ms={}, temp_mib={})
        for name, fn in cols.items():
            if fn is None:
                row["ms"][name] = "n/a"
                continue
            if fn == "subprocess":
                continue
            if name == "mgpu_ragged" and skew:
                row["ms"][name] = "n/a"
                row.setdefault("errors", {})[name] = "skipped: faulted the CUDA context on this row"
                continue
            if name in ("pallas_decode", "pallas_fb_decode") and t > args.decode_max_t:
                row["ms"][name] = "skip"
                continue
            if name == "xla_gather" and t * K * (d_in * r + r * d_out) * 2 > GATHER_LIMIT:
                row["ms"][name] = "oom-skip"
                continue
            try:
                if fn == "mgpu":
                    fn = None
                    for block in ((64, 64, 64), (64, 128, 64), (128, 128, 64)):
                        cand = layer(lambda x, a, b, s, idx, w, block=block: MGPU(x, a, b, s, idx, w, block))
                        try:
                            comp = jax.jit(cand).lower(*sets[0]).compile()
                            jax.block_until_ready(comp(*sets[0]))
                            fn = cand
                            break
                        except Exception as e:  # noqa: BLE001
                            err = e
                    if fn is None:
                        raise err
                comp = jax.jit(fn).lower(*sets[0]).compile()
                if args.hlo_dir:
                    os.makedirs(args.hlo_dir, exist_ok=True)
                    tag = f"{d_out}_{r}_{t}{'_skew' if skew else ''}_{name}"
                    with open(os.path.join(args.hlo_dir, f"{tag}.hlo.txt"), "w") as f:
                        f.write(comp.as_text())
                row["temp_mib"][name] = temp_mib(comp)
                BREAKDOWN.pop("last", None)
                row["ms"][name] = device_time_ms(comp, sets, args.iters)
                if "last" in BREAKDOWN:
                    row.setdefault("kernels", {})[name] = BREAKDOWN["last"]
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                row["ms"][name] = "n/a"
                row.setdefault("errors", {})[name] = msg
                if name.startswith("pallas"):
                    traceback.print_exc()
        ms = row["ms"]

        def ratio(a, b):
            return ms[a] / ms[b] if isinstance(ms.get(a), float) and isinstance(ms.get(b), float) else float("nan")

        for tag, paths in (("best", LAYER_PATHS), ("best_fb", FB_PATHS)):
            timed = {p: ms[p] for p in paths if isinstance(ms.get(p), float)}
            if timed:
                row[tag] = min(timed, key=timed.get)
                ms[tag] = timed[row[tag]]
        main_col = "pallas" if isinstance(ms.get("pallas"), float) else "best"
        fb_col = "pallas_fb" if isinstance(ms.get("pallas_fb"), float) else "best_fb"
        row["layer_ratio"] = ratio(main_col, "lora1")
        row["fb_ratio"] = ratio(fb_col, "lora1_fb")
        row["fused_layout_ratio"] = ratio("fused_layout", "lora1")
        row["auto_ratio"] = ratio("auto", "lora1")
        for name in ("pallas", "auto", "fused_layout"):
            row[f"{name}_ratio_peft"] = ratio(name, "lora1_peft")
        row["concat_fb_ratio"] = ratio("xla_concat_fb", "lora1_fb")
        row["concat_fb_ratio_bf16"] = ratio("xla_concat_fb", "lora1_fb_bf16")
        row["fb_ratio_bf16"] = ratio(fb_col, "lora1_fb_bf16")
        xla = [ms[c] for c in ("xla_dense", "xla_concat", "xla_gather", "xla_ragged")
               if isinstance(ms.get(c), float)]
        row["xla_best_ratio"] = (ms[main_col] / min(xla)) if xla and isinstance(ms.get(main_col), float) else float("nan")
        row["faster_than_xla"] = bool(xla) and isinstance(ms.get(main_col), float) and ms[main_col] < min(xla)
        results.append(row)
        log(json.dumps(row))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, check_ok=ok, rows=results), f, indent=1)

    if cols.get("mgpu_ragged") == "subprocess":
        import subprocess

        sub_out = os.path.splitext(args.out)[0] + "_mgpu.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--no-check", "--only", "mgpu_ragged",
               "--iters", str(args.iters), "--out", sub_out, "--dout", str(args.dout)] + (["--quick"] if args.quick else [])
        cmd += ["--rows", args.rows] if args.rows else []  # the same rows as this run's
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        log(f"mgpu subprocess rc={proc.returncode}")
        sub = {}
        if os.path.exists(sub_out):
            with open(sub_out) as f:
                sub = {(r["d_out"], r["r"], r["T"], r["skew"]): r for r in json.load(f)["rows"]}
            os.remove(sub_out)
        sub_table = os.path.splitext(sub_out)[0] + "_table.txt"  # merged into this run's table below
        if os.path.exists(sub_table):
            os.remove(sub_table)
        for row in results:
            other = sub.get((row["d_out"], row["r"], row["T"], row["skew"]), {})
            row["ms"]["mgpu_ragged"] = other.get("ms", {}).get("mgpu_ragged", "n/a")
            if "mgpu_ragged" in other.get("temp_mib", {}):
                row["temp_mib"]["mgpu_ragged"] = other["temp_mib"]["mgpu_ragged"]
            if "mgpu_ragged" in other.get("errors", {}):
                row.setdefault("errors", {})["mgpu_ragged"] = other["errors"]["mgpu_ragged"]
        with open(args.out, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, check_ok=ok, rows=results), f, indent=1)

    # compact table last
    names = list(cols)
    short = {"xla_dense": "dense", "xla_gather": "gather", "xla_ragged": "ragged", "mgpu_ragged": "mgpu",
             "lora1_fb": "lora1FB", "xla_dense_fb": "denseFB", "xla_concat": "concat",
             "xla_concat_fb": "concatFB", "lora1_peft": "l1peft", "lora1_fb_bf16": "l1FBbf16",
             "pallas_fb": "palFB", "pallas_fb_lora": "palFB+AB",
             "pallas_sorted": "p_sorted", "pallas_dense": "p_dense", "pallas_decode": "p_decode",
             "pallas_combo": "p_combo", "pallas_fb_combo": "pFB_comb",
             "pallas_fb_sorted": "pFB_sort", "pallas_fb_dense": "pFB_dens", "pallas_fb_decode": "pFB_deco",
             "fused_layout": "fusedlay"}
    hdr = f"{'d_out':>5} {'r':>3} {'T':>6} " + " ".join(f"{short.get(n, n)[:9]:>9}" for n in names)
    hdr += "  lay/l1 fused/l1 lay/peft fused/peft  fb/l1 fb/l1bf16  memMiB(pal/p_sorted/p_dense/dense/gather)"
    table = [f"device: {dev.device_kind}; ms (CUPTI kernel time, median of {args.iters}); bf16, L={L}, k={K}", hdr]
    for row in results:
        cells = []
        for n in names:
            v = row["ms"].get(n, "")
            cells.append(f"{v:9.4f}" if isinstance(v, float) else f"{str(v):>9}")
        mem = "/".join(f"{row['temp_mib'].get(c, float('nan')):.1f}"
                       for c in ("pallas", "pallas_sorted", "pallas_dense", "xla_dense", "xla_gather"))
        tag = (" skew" if row["skew"] else "") + f" best={row.get('best', '-')}/{row.get('best_fb', '-')}"
        table.append(f"{row['d_out']:>5} {row['r']:>3} {row['T']:>6} " + " ".join(cells)
                     + f"  {row['layer_ratio']:6.3f} {row['fused_layout_ratio']:8.3f}"
                     + f" {row['pallas_ratio_peft']:8.3f} {row['fused_layout_ratio_peft']:10.3f} {row['fb_ratio']:6.3f}"
                     + f" {row['fb_ratio_bf16']:9.3f}  {mem}{tag}")
    for line in table:
        log(line)
    with open(os.path.splitext(args.out)[0] + "_table.txt", "w") as f:
        f.write("\n".join(table) + "\n")
    return 1 if ok is False else 0


if __name__ == "__main__":
    sys.exit(main())
