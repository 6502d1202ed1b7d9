"""The fused layout's side step in isolation (GPU): the side GEMM x @ S with float32 output, alone
or with the routing kernel after it, at the LLaMA-3-8B projection groups' shapes
(`meteora_jax.fused_layout`; L = 28, r = 8, bf16, gates as two halves), per formulation.

    python scripts/bench_side_gemm.py [--tokens 1,32,512,16384] [--variants one,partials8,...]
        [--layers 8] [--reps 50] [--fill-blocks 0,1,4] [--out PATH]

Variants (x [T, d_in], S [d_in, C]; output [T, C], or [P, T, C] partials that the routing sums):
  one            x @ S: one GEMM, as XLA chooses (its split-K included)
  pair           the same, a single token run as two rows (a GEMM, not a GEMV)
  triton_only    "one" compiled with xla_gpu_cublas_fallback=False
  cublas_only    "one" compiled with xla_gpu_enable_triton_gemm=False
  partialsP      `pallas_kernels.lora_columns.side_products(..., splits=P)`: XLA, left unsummed
  psideP[xB][kK] `side_products_pallas(splits=P, block_c=B, block_k=K)` (defaults: the function's)
  routeP         the model's side step with XLA's side GEMM (`layers.FusedProjections`): P partials
                 ("route" alone: `side_splits`' P) and the routing kernel `fill_lora_columns_pallas`
                 (which writes x_ext), once per token tile in --fill-blocks (0: `fill_block_t`)
  prouteP[xB][kK] the same with `side_products_pallas` as the side GEMM
Each call runs --layers distinct (x, S) pairs (more weight bytes than the L2 holds). Per group:
kernel time and kernel count from a `jax.profiler` trace of 3 calls, and the untraced wall time
(median of --reps calls, divided by --layers). Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from meteora_jax.cli import check_writable, choice_list, cli_fail, int_list, positive_int  # noqa: E402
from pallas_kernels.lora_columns import side_products, side_splits  # noqa: E402
from pallas_kernels.lora_columns_pallas import fill_lora_columns_pallas, side_products_pallas  # noqa: E402
from profile_decode import fold, kernel_events  # noqa: E402

GROUPS = {"qkv": (4096, 3), "o": (4096, 1), "gate_up": (4096, 2), "down": (14336, 1)}  # d_in, projections
NUM_ADAPTERS, RANK = 28, 8
DEFAULT_VARIANTS = "one,pair,partials4,partials8,partials16,pside16,route,proute16"
VARIANT = re.compile(r"(one|pair|triton_only|cublas_only|partials|pside|route|proute)(\d*)(?:x(\d+))?(?:k(\d+))?")


def is_variant(variant: str) -> bool:
    """Whether `variant` names one: numbers >= 1, and only where its kind takes them (P: partials,
    pside, route, proute; xB and kK: pside, proute)."""
    match = VARIANT.fullmatch(variant)
    if not match:
        return False
    kind, *numbers = match.groups()
    takes = {"partials": 1, "route": 1, "pside": 3, "proute": 3}.get(kind, 0)
    return not any(numbers[takes:]) and all(int(n) >= 1 for n in numbers if n)


def side_gemm(variant: str):
    """(function of (x, S) -> the side GEMM's output, compiler options) for a variant name."""
    kind, splits, block_c, block_k = VARIANT.fullmatch(variant).groups()
    options = {"triton_only": {"xla_gpu_cublas_fallback": False},
               "cublas_only": {"xla_gpu_enable_triton_gemm": False}}.get(kind)
    if kind in ("one", "triton_only", "cublas_only"):
        return (lambda x, s: jnp.dot(x, s, preferred_element_type=jnp.float32)), options
    if kind == "pair":  # a single token as two rows
        def pair(x, s):
            if x.shape[0] > 1:
                return jnp.dot(x, s, preferred_element_type=jnp.float32)
            return jnp.dot(jnp.pad(x, ((0, 1), (0, 0))), s, preferred_element_type=jnp.float32)[:1]
        return pair, None
    if kind in ("pside", "proute"):
        blocks = {k: int(v) for k, v in (("splits", splits), ("block_c", block_c), ("block_k", block_k)) if v}
        return (lambda x, s: side_products_pallas(x, s, **blocks)), None
    # partials, route: XLA's partial products ("route" without a number: side_splits' P)
    return (lambda x, s: side_products(x, s, int(splits) if splits else side_splits(x.shape[0], s.shape[1],
                                                                                  x.shape[1]))), None


def is_routed(variant: str) -> bool:
    """Whether the variant runs the routing kernel after its side GEMM."""
    return VARIANT.fullmatch(variant).group(1) in ("route", "proute")


def side_step(variant: str, projections: int, block_t: int):
    """(function of (x list, S list) -> outputs, compiler options): the variant's side GEMM, and for
    the route variants the routing kernel after it (x_ext out)."""
    gemm, options = side_gemm(variant)
    routed = is_routed(variant)
    scaling = jnp.full((projections, NUM_ADAPTERS), 2.0, jnp.float32)

    def run(xs, ss):
        outs = []
        for x, s in zip(xs, ss):
            side = gemm(x, s)
            if routed:
                side = fill_lora_columns_pallas(x, side, scaling, 1.0, rank=RANK, top_k=2, block_t=block_t or None)[0]
            outs.append(side)
        return outs
    return run, options


def measure(fn, args, reps: int) -> dict:
    for _ in range(6):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(3):
                jax.block_until_ready(fn(*args))
        events, _ = kernel_events(trace_dir)
    by_name = collections.defaultdict(float)
    for name, us in events:
        by_name[fold(name)] += us / 3
    return dict(wall_us=1e6 * statistics.median(times), kernel_us=sum(us for _, us in events) / 3,
                kernels=len(events) / 3, top=sorted(by_name.items(), key=lambda kv: -kv[1])[:4])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int_list(), default="1,32,512,16384")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--groups", default=",".join(GROUPS))
    p.add_argument("--layers", type=positive_int, default=8)
    p.add_argument("--reps", type=positive_int, default=50)
    p.add_argument("--fill-blocks", type=int_list(minimum=0), default="0",
                   help="routing-kernel token tiles of the route variants (0: default)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs"), "bench_side_gemm.json"))
    args = p.parse_args(argv)
    groups = choice_list(p, "--groups", args.groups, GROUPS)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if not is_variant(v)]
    if unknown or not variants:
        problem = f"unknown {','.join(unknown)}" if unknown else "no variant"
        cli_fail(p, f"--variants {args.variants!r}: {problem}; choose from one, pair, triton_only, cublas_only, "
                    "partialsP, psideP[xB][kK], routeP, prouteP[xB][kK] (numbers >= 1)")
    check_writable(p, "--out", args.out)
    rows = []
    for group in groups:
        depth, projections = GROUPS[group]
        columns = projections * NUM_ADAPTERS * (RANK + 2)
        for num_tokens in args.tokens:
            key = jax.random.key(num_tokens + depth)
            xs = [jax.random.normal(jax.random.fold_in(key, i), (num_tokens, depth), jnp.bfloat16)
                  for i in range(args.layers)]
            ss = [0.02 * jax.random.normal(jax.random.fold_in(key, 1000 + i), (depth, columns), jnp.bfloat16)
                  for i in range(args.layers)]
            for variant in variants:
                routed = is_routed(variant)
                for block_t in (args.fill_blocks if routed else [0]):
                    if block_t > max(num_tokens, 1):
                        continue
                    name = f"{variant}@{block_t or 'auto'}" if routed else variant
                    fn, options = side_step(variant, projections, block_t)
                    try:
                        m = measure(jax.jit(fn, compiler_options=options), (xs, ss), args.reps)
                    except Exception as e:  # noqa: BLE001 - one failing variant must not end the sweep
                        print(f"{group} T={num_tokens} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    row = dict(group=group, tokens=num_tokens, variant=name, columns=columns,
                               wall_us=m["wall_us"] / args.layers, kernel_us=m["kernel_us"] / args.layers,
                               kernels=m["kernels"] / args.layers, top=m["top"])
                    rows.append(row)
                    print(f"{group:8} T={num_tokens:<6} {name:18} kernel {row['kernel_us']:7.1f} us  "
                          f"kernels {row['kernels']:.1f}  wall {row['wall_us']:7.1f} us", flush=True)
            del ss
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, layers=args.layers, rows=rows), f,
                  indent=1)
    print(f"wrote {args.out}\n\n{jax.devices()[0].device_kind}, per GEMM")
    print(f"{'group':8} {'T':>6} {'variant':18} {'kernel us':>9} {'kernels':>7} {'wall us':>8}  top kernel")
    for r in rows:
        top = r["top"][0][0][:40] if r["top"] else "-"
        print(f"{r['group']:8} {r['tokens']:6} {r['variant']:18} {r['kernel_us']:9.1f} {r['kernels']:7.1f} "
              f"{r['wall_us']:8.1f}  {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
