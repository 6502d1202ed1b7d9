"""One MeteoRA projection at decode sizes: the fused routed kernel (`routed_lora_pallas`, with a grid
of block options) against the op-by-op composition (`grouped_lora` impl "auto" and "pallas") and the
base GEMV alone, all in one run.

    python scripts/bench_routed_lora.py [--tokens 1,32] [--rank 8] [--iters 200] [--trace]
        [--no-block-sweep] [--out PATH]

Shapes: LLaMA-3-8B projections (d_in -> d_out) 4096 -> 4096, 4096 -> 1024, 4096 -> 14336 and
14336 -> 4096; L = 28 adapters, top-2, bf16, random gate (uneven loads).
Timing: each variant runs --iters times inside one jitted `fori_loop` whose next input depends on
the previous output (so calls cannot overlap), after a warm-up; median of 5 such runs, divided by
--iters. Every column carries the same small loop overhead (an add and a slice); "delta" columns
subtract the base GEMV's time measured the same way. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.routed_lora import routed_lora_xla  # noqa: E402
from pallas_kernels.routed_lora_pallas import routed_lora_pallas  # noqa: E402
from profile_decode import fold, kernel_events  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
BLOCKS = [
    dict(block_k=128, min_programs=128),
    dict(block_k=128, min_programs=512),
    dict(block_k=64, min_programs=1024),
    dict(block_k=256, min_programs=512, num_stages=2),
    dict(block_k=128, min_programs=512, num_warps=2, num_stages=2),
]


def variant_name(blocks):
    return "fused " + (" ".join(f"{k.split('_')[-1][0]}{v}" for k, v in blocks.items()) or "default")


def time_loop(layer, x, iters, trace=False):
    """Seconds per call of layer(x) -> y [T, d_out], serialised through the loop carry; with trace,
    also {kernel name: us per call} from a profile of one more run."""

    def body(_, x):
        y = layer(x)
        return x + (y[:, :1] * 1e-6).astype(x.dtype)

    run = jax.jit(lambda x: jax.lax.fori_loop(0, iters, body, x))
    jax.block_until_ready(run(x))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x))
        times.append(time.perf_counter() - t0)
    kernels = {}
    if trace:
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                jax.block_until_ready(run(x))
            for name, us in kernel_events(trace_dir)[0]:
                kernels[fold(name)] = kernels.get(fold(name), 0.0) + us / iters
    return statistics.median(times) / iters, kernels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,32")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--adapters", type=int, default=28)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--trace", action="store_true", help="also time each kernel (us per call) from a profile")
    p.add_argument("--no-block-sweep", dest="block_sweep", action="store_false",
                   help="the fused kernel with its default blocks only")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs"), "bench_routed_lora.json"))
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    L, r, dtype = args.adapters, args.rank, jnp.bfloat16
    rows = []
    for d_in, d_out in SHAPES:
        keys = jax.random.split(jax.random.key(d_in * 7 + d_out), 5)
        kernel = (jax.random.normal(keys[0], (d_in, d_out)) / np.sqrt(d_in)).astype(dtype)
        gate = jax.random.normal(keys[1], (d_in, L), jnp.float32) / np.sqrt(d_in)
        lora_a = (jax.random.normal(keys[2], (L, d_in, r)) / np.sqrt(d_in)).astype(dtype)
        lora_b = (jax.random.normal(keys[3], (L, r, d_out)) * 0.01).astype(dtype)
        scaling = jnp.full((L,), 2.0, jnp.float32)
        for t in (int(v) for v in args.tokens.split(",")):
            x = jax.random.normal(keys[4], (t, d_in)).astype(dtype)
            variants = {
                "base": lambda x: x @ kernel,
                "opbyop": lambda x: routed_lora_xla(x, gate, lora_a, lora_b, scaling, 1.0, top_k=2, impl="auto",
                                                    base=x @ kernel)[0],
                "opbyop pallas": lambda x: routed_lora_xla(x, gate, lora_a, lora_b, scaling, 1.0, top_k=2,
                                                           impl="pallas", base=x @ kernel)[0],
            }
            for blocks in BLOCKS if args.block_sweep else [{}]:
                variants[variant_name(blocks)] = (
                    lambda x, blocks=blocks: routed_lora_pallas(x, gate, lora_a, lora_b, scaling, 1.0, top_k=2,
                                                                base=x @ kernel, **blocks)[0])
            us, kernels = {}, {}
            for name, fn in variants.items():
                try:
                    seconds, kernels[name] = time_loop(fn, x, args.iters, args.trace)
                    us[name] = 1e6 * seconds
                except Exception as err:  # e.g. a block option that exceeds shared memory: report, go on
                    us[name] = float("nan")
                    print(f"{d_in}->{d_out} T={t} {name}: {type(err).__name__}: {str(err)[:120]}", flush=True)
            row = dict(d_in=d_in, d_out=d_out, tokens=t, us=us, kernels=kernels)
            rows.append(row)
            fused = [k for k in us if k.startswith("fused") and us[k] == us[k]]
            best = min(fused, key=us.get) if fused else None
            print(f"{d_in}->{d_out} T={t}: base {us['base']:.1f} us, op-by-op {us['opbyop']:.1f}, "
                  f"best fused {us.get(best, float('nan')):.1f} ({best})", flush=True)
            if args.trace:
                for name in kernels:
                    top = sorted(kernels[name].items(), key=lambda kv: -kv[1])[:6]
                    print(f"   {name:24} " + ", ".join(f"{k} {v:.1f}" for k, v in top), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=dev.device_kind, jax=jax.__version__, adapters=L, rank=r, iters=args.iters,
                       rows=rows), f, indent=1)
    print(f"wrote {args.out}\n\n{dev.device_kind}, L = {L}, r = {r}, top-2, bf16; us per call (delta = minus base)")
    names = list(rows[0]["us"])
    print("| d_in -> d_out | T | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for row in rows:
        cells = [f"{row['us'][n]:.1f}" if n == "base" else f"{row['us'][n] - row['us']['base']:+.1f}" for n in names]
        print(f"| {row['d_in']} -> {row['d_out']} | {row['tokens']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
