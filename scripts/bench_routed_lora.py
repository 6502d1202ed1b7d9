"""One MeteoRA projection: the fused routed paths (`routed_lora_pallas` for T <= 32, with a grid of block
options; `routed_lora_prefill` above) against the op-by-op composition (`grouped_lora` impl "auto",
and "pallas" at decode sizes) and the base GEMM alone, all in one run.

    python scripts/bench_routed_lora.py [--tokens 1,32,512,16384] [--rank 8] [--iters 200] [--trace]
        [--no-block-sweep] [--sweep-tokens 1,32] [--shapes 4096x4096,...] [--out PATH]

Shapes: LLaMA-3-8B projections (d_in -> d_out) 4096 -> 4096, 4096 -> 1024, 4096 -> 14336 and
14336 -> 4096; L = 28 adapters, top-2, bf16, random gate (uneven loads).
Timing: each variant runs --iters times (fewer above T = 256: --iters x 256 / T, at least 8)
inside one jitted `fori_loop` whose next input depends on the previous output (so calls cannot
overlap), after a warm-up; median of 5 such runs, divided by the count. Every column carries the same
small loop overhead (an add and a slice); "delta" columns subtract the base GEMM's time measured the
same way. The "err" column: the fused path's (default blocks) largest relative row error against
the composition in float32 at highest precision, and how many rows exceed 2e-2. Prints a table last
and writes JSON.
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

from meteora_jax.cli import check_writable, cli_fail, int_list, positive_int  # noqa: E402
from pallas_kernels.routed_lora import ROUTED_MAX_TOKENS, routed_lora_xla  # noqa: E402
from pallas_kernels.routed_lora_pallas import routed_lora_pallas  # noqa: E402
from pallas_kernels.routed_lora_prefill import routed_lora_prefill  # noqa: E402
from profile_decode import fold, kernel_events  # noqa: E402

SHAPES = "4096x4096,4096x1024,4096x14336,14336x4096"
DECODE_BLOCKS = [
    dict(block_k=128, min_programs=128),
    dict(block_k=128, min_programs=512),
    dict(block_k=64, min_programs=1024),
    dict(block_k=256, min_programs=512, num_stages=2),
    dict(block_k=128, min_programs=512, num_warps=2, num_stages=2),
]


def shape_list(text: str) -> list[tuple[int, int]]:
    """argparse type: "4096x4096,4096x1024" -> [(4096, 4096), (4096, 1024)], sizes >= 1."""
    shapes = []
    for shape in text.split(","):
        d_in, sep, d_out = shape.partition("x")
        if not (sep and d_in.isdigit() and d_out.isdigit() and int(d_in) > 0 and int(d_out) > 0):
            raise argparse.ArgumentTypeError(f"{shape!r} is not d_in x d_out (e.g. 4096x1024, sizes >= 1)")
        shapes.append((int(d_in), int(d_out)))
    return shapes


def variant_name(blocks):
    short = {"block_n": "n", "block_k": "k", "min_programs": "p", "num_warps": "w", "num_stages": "s"}
    return "fused " + (" ".join(f"{short[k]}{v}" for k, v in blocks.items()) or "default")


def row_errors(got, want):
    """(largest relative L2 error over rows, rows above 2e-2): a token routed to other adapters
    (a near-tie that float32 rounding decides differently) shows as one bad row."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.linalg.norm(got - want, axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-30)
    return float(np.max(err)), int(np.sum(err > 2e-2))


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
    p.add_argument("--tokens", type=int_list(), default="1,32,512,16384")
    p.add_argument("--shapes", type=shape_list, default=SHAPES, help="d_in x d_out of each projection")
    p.add_argument("--sweep-tokens", type=int_list(), default="1,32",
                   help="token counts that get the decode kernel's block sweep")
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--adapters", type=int, default=28, help="at least 2 (top-2 routing)")
    p.add_argument("--iters", type=positive_int, default=200)
    p.add_argument("--trace", action="store_true", help="also time each kernel (us per call) from a profile")
    p.add_argument("--no-block-sweep", dest="block_sweep", action="store_false",
                   help="the fused kernel with its default blocks only")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs"), "bench_routed_lora.json"))
    args = p.parse_args(argv)
    if args.adapters < 2:
        cli_fail(p, f"--adapters {args.adapters}: top-2 routing needs at least 2")
    check_writable(p, "--out", args.out)
    dev = jax.devices()[0]
    L, r, dtype = args.adapters, args.rank, jnp.bfloat16
    rows = []
    for d_in, d_out in args.shapes:
        keys = jax.random.split(jax.random.key(d_in * 7 + d_out), 5)
        kernel = (jax.random.normal(keys[0], (d_in, d_out)) / np.sqrt(d_in)).astype(dtype)
        gate = jax.random.normal(keys[1], (d_in, L), jnp.float32) / np.sqrt(d_in)
        lora_a = (jax.random.normal(keys[2], (L, d_in, r)) / np.sqrt(d_in)).astype(dtype)
        lora_b = (jax.random.normal(keys[3], (L, r, d_out)) * 0.01).astype(dtype)
        scaling = jnp.full((L,), 2.0, jnp.float32)
        for t in args.tokens:
            x = jax.random.normal(keys[4], (t, d_in)).astype(dtype)
            decode = t <= ROUTED_MAX_TOKENS
            fused, sweep = (routed_lora_pallas, DECODE_BLOCKS) if decode else (routed_lora_prefill, [])
            variants = {
                "base": lambda x: x @ kernel,
                "opbyop": lambda x: routed_lora_xla(x, gate, lora_a, lora_b, scaling, 1.0, top_k=2, impl="auto",
                                                    base=x @ kernel)[0],
            }
            if decode:
                variants["opbyop pallas"] = lambda x: routed_lora_xla(x, gate, lora_a, lora_b, scaling, 1.0, top_k=2,
                                                                      impl="pallas", base=x @ kernel)[0]
            swept = args.block_sweep and t in args.sweep_tokens
            for blocks in [{}] + (sweep if swept else []):
                variants[variant_name(blocks)] = (
                    lambda x, blocks=blocks: fused(x, gate, lora_a, lora_b, scaling, 1.0, top_k=2, base=x @ kernel,
                                                   **blocks)[0])
            with jax.default_matmul_precision("highest"):
                want = routed_lora_xla(*(v.astype(jnp.float32) for v in (x, gate, lora_a, lora_b)), scaling, 1.0,
                                       top_k=2, impl="xla", base=(x @ kernel).astype(jnp.float32))[0]
            err, bad_rows = row_errors(jax.jit(variants["fused default"])(x), want)
            iters = max(8, args.iters * 256 // max(t, 256))
            us, kernels = {}, {}
            for name, fn in variants.items():
                try:
                    seconds, kernels[name] = time_loop(fn, x, iters, args.trace)
                    us[name] = 1e6 * seconds
                except Exception as exc:  # e.g. a block option that exceeds shared memory: report, go on
                    us[name] = float("nan")
                    print(f"{d_in}->{d_out} T={t} {name}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            row = dict(d_in=d_in, d_out=d_out, tokens=t, us=us, kernels=kernels, err=err, bad_rows=bad_rows,
                       iters=iters)
            rows.append(row)
            print(f"   {d_in}->{d_out} T={t}: " + ", ".join(f"{n} {v:.1f}" for n, v in us.items()), flush=True)
            fused_names = [k for k in us if k.startswith("fused") and us[k] == us[k]]
            best = min(fused_names, key=us.get) if fused_names else None
            print(f"{d_in}->{d_out} T={t}: base {us['base']:.1f} us, op-by-op {us['opbyop']:.1f}, "
                  f"best fused {us.get(best, float('nan')):.1f} ({best}), err {err:.1e} ({bad_rows} rows > 2e-2)",
                  flush=True)
            if args.trace:
                for name in kernels:
                    top = sorted(kernels[name].items(), key=lambda kv: -kv[1])[:6]
                    print(f"   {name:24} " + ", ".join(f"{k} {v:.1f}" for k, v in top), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=dev.device_kind, jax=jax.__version__, adapters=L, rank=r, iters=args.iters,
                       rows=rows), f, indent=1)
    print(f"wrote {args.out}\n\n{dev.device_kind}, L = {L}, r = {r}, top-2, bf16; us per call (delta = minus base)")
    for decode in (True, False):  # one table per kernel: their block options differ
        part = [row for row in rows if (row["tokens"] <= ROUTED_MAX_TOKENS) == decode]
        names = list(dict.fromkeys(n for row in part for n in row["us"]))
        if not part:
            continue
        print("\n| d_in -> d_out | T | err (rows > 2e-2) | " + " | ".join(names) + " |")
        print("|---|---|---|" + "---|" * len(names))
        for row in part:
            cells = [f"{row['us'][n]:.1f}" if n == "base" else f"{row['us'][n] - row['us']['base']:+.1f}"
                     if n in row["us"] else "" for n in names]
            error = f"{row['err']:.0e} ({row['bad_rows']})"
            print(f"| {row['d_in']} -> {row['d_out']} | {row['tokens']} | {error} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
