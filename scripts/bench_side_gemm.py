"""The fused layout's side GEMM in isolation (GPU): x_ext @ S with float32 output, at the LLaMA-3-8B
projection groups' shapes (`meteora_jax.fused_layout`; L = 28, r = 8, bf16, gates as two halves),
per formulation and XLA option.

    python scripts/bench_side_gemm.py [--tokens 1,32,512,16384] [--variants one,partials8,...]
        [--layers 8] [--reps 50] [--fill-blocks 0,1,4] [--out PATH]

Variants (output [T, C], or [P, T, C] partials that the routing kernel sums):
  one            x_ext [T, W] @ S [W, C]: one GEMM, as XLA chooses (its split-K included)
  slice          x_ext[:, :d_in] @ S[:d_in]: the unpadded contracting dimension
  pad_columns    C rounded up to a multiple of 128
  triton_only    "one" compiled with xla_gpu_cublas_fallback=False
  cublas_only    "one" compiled with xla_gpu_enable_triton_gemm=False
  split_sumP     P partial products, summed by XLA
  partialsP      `pallas_kernels.lora_columns.side_products(..., splits=P)`, left unsummed
  x_rows         x [T, d_in] @ S [d_in, C]: S stored without the zero rows under the tail
  x_rows_pair    the same, a single token run as two rows (a GEMM, not a GEMV)
  routeP         the model's whole side step (`layers.FusedProjections`): x padded to x_ext by XLA,
                 P partials of x_ext @ S (P = 1: one GEMM; "route" alone: `side_splits`' P) and the
                 routing kernel `fill_lora_columns_pallas`, once per token tile in --fill-blocks
                 (0: the kernel's default, `fill_block_t`)
Each call runs --layers distinct (x_ext, S) pairs (more weight bytes than the L2 holds). Per GEMM:
kernel time and kernel count from a `jax.profiler` trace of 3 calls, and the untraced wall time
(median of --reps calls, divided by --layers). Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import collections
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

from pallas_kernels.lora_columns import extended_width, side_products, side_splits  # noqa: E402
from pallas_kernels.lora_columns_pallas import fill_lora_columns_pallas  # noqa: E402
from profile_decode import fold, kernel_events  # noqa: E402

GROUPS = {"qkv": (4096, 3), "o": (4096, 1), "gate_up": (4096, 2), "down": (14336, 1)}  # d_in, projections
NUM_ADAPTERS, RANK = 28, 8
DEFAULT_VARIANTS = "one,slice,pad_columns,triton_only,cublas_only,split_sum8,partials4,partials8,partials16"


def route(depth: int, projections: int, splits: int, block_t: int):
    """The side step of one group as the model runs it: function of (x list, S list) -> x_ext list
    with the h columns written (routing kernel included)."""
    columns = projections * NUM_ADAPTERS * RANK
    width = extended_width(depth, columns)
    scaling = jnp.full((projections, NUM_ADAPTERS), 2.0, jnp.float32)

    def run(xs, ss):
        outs = []
        for x, s in zip(xs, ss):
            x_ext = jnp.pad(x, ((0, 0), (0, width - depth)))
            p = splits or side_splits(x.shape[0], s.shape[1])
            side = side_products(x_ext, s, p)
            outs.append(fill_lora_columns_pallas(x_ext, side, scaling, 1.0, depth=depth, rank=RANK, top_k=2,
                                                 block_t=block_t or None)[0])
        return outs
    return run


def side_gemm(variant: str, depth: int, width: int):
    """(function of (x_ext list, S list) -> outputs, compiler options, S's row count, splits)."""
    def one(xs, ss):
        return [jnp.dot(x, s, preferred_element_type=jnp.float32) for x, s in zip(xs, ss)]

    if variant in ("one", "pad_columns"):
        return one, None, width, 1
    if variant == "triton_only":
        return one, {"xla_gpu_cublas_fallback": False}, width, 1
    if variant == "cublas_only":
        return one, {"xla_gpu_enable_triton_gemm": False}, width, 1
    if variant == "slice":
        return (lambda xs, ss: [jnp.dot(x[:, :depth], s, preferred_element_type=jnp.float32)
                                for x, s in zip(xs, ss)]), None, depth, 1
    if variant in ("x_rows", "x_rows_pair"):
        # x itself against S stored with d_in rows only (the layout a routing kernel that writes
        # x_ext itself needs). "pair": a single token runs as two rows (a GEMM, not XLA's GEMV
        # reduction, which session 8 measured at about twice the x_ext GEMV's time at d_in 4096).
        def x_rows(xs, ss, pair=variant.endswith("pair")):
            outs = []
            for x, s in zip(xs, ss):  # x [T, d_in] (see main)
                if pair and x.shape[0] == 1:
                    outs.append(jnp.dot(jnp.pad(x, ((0, 1), (0, 0))), s, preferred_element_type=jnp.float32)[:1])
                else:
                    outs.append(jnp.dot(x, s, preferred_element_type=jnp.float32))
            return outs
        return x_rows, None, depth, 1
    for prefix, summed in (("split_sum", True), ("partials", False)):
        if variant.startswith(prefix):
            splits = int(variant[len(prefix):])

            def partials(xs, ss, splits=splits, summed=summed):
                outs = [side_products(x, s, splits) for x, s in zip(xs, ss)]
                return [o.sum(0) for o in outs] if summed else outs
            return partials, None, width, splits
    raise ValueError(f"unknown variant {variant!r}")


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
    p.add_argument("--tokens", default="1,32,512,16384")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--groups", default=",".join(GROUPS))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--fill-blocks", default="0", help="routing-kernel token tiles of the route variants (0: default)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs"), "bench_side_gemm.json"))
    args = p.parse_args(argv)
    rows = []
    for group in args.groups.split(","):
        depth, projections = GROUPS[group]
        lora_columns = projections * NUM_ADAPTERS * RANK
        width = extended_width(depth, lora_columns)
        for num_tokens in (int(t) for t in args.tokens.split(",")):
            key = jax.random.key(num_tokens + depth)
            xs = [jnp.pad(jax.random.normal(jax.random.fold_in(key, i), (num_tokens, depth), jnp.bfloat16),
                          ((0, 0), (0, width - depth))) for i in range(args.layers)]
            variants = []
            for variant in args.variants.split(","):
                if variant.startswith("route"):
                    splits = int(variant[5:] or 0)
                    for block_t in (int(b) for b in args.fill_blocks.split(",")):
                        if block_t <= max(num_tokens, 1):
                            fn = route(depth, projections, splits, block_t)
                            variants.append((f"{variant}@{block_t or 'auto'}", (fn, None, width, splits or 1), True))
                else:
                    variants.append((variant, side_gemm(variant, depth, width), variant.startswith("x_rows")))
            # Variants marked True take x [T, d_in] (as the model does), the others x_ext.
            x_in = [x[:, :depth] for x in xs]
            for variant, (fn, options, rows_s, splits), takes_x in variants:
                if rows_s % splits:
                    continue
                columns = lora_columns + 2 * projections * NUM_ADAPTERS
                if variant == "pad_columns":
                    columns = -(-columns // 128) * 128
                ss = [0.02 * jax.random.normal(jax.random.fold_in(key, 1000 + i), (rows_s, columns), jnp.bfloat16)
                      for i in range(args.layers)]
                try:
                    m = measure(jax.jit(fn, compiler_options=options),
                                (x_in if takes_x else xs, ss), args.reps)
                except Exception as e:  # noqa: BLE001 - one failing variant must not end the sweep
                    print(f"{group} T={num_tokens} {variant}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                row = dict(group=group, tokens=num_tokens, variant=variant, width=width, columns=columns,
                           wall_us=m["wall_us"] / args.layers, kernel_us=m["kernel_us"] / args.layers,
                           kernels=m["kernels"] / args.layers, top=m["top"])
                rows.append(row)
                print(f"{group:8} T={num_tokens:<6} {variant:14} kernel {row['kernel_us']:7.1f} us  "
                      f"kernels {row['kernels']:.1f}  wall {row['wall_us']:7.1f} us", flush=True)
                del ss
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, layers=args.layers, rows=rows), f,
                  indent=1)
    print(f"wrote {args.out}\n\n{jax.devices()[0].device_kind}, per GEMM")
    print(f"{'group':8} {'T':>6} {'variant':14} {'kernel us':>9} {'kernels':>7} {'wall us':>8}  top kernel")
    for r in rows:
        top = r["top"][0][0][:40] if r["top"] else "-"
        print(f"{r['group']:8} {r['tokens']:6} {r['variant']:14} {r['kernel_us']:9.1f} {r['kernels']:7.1f} "
              f"{r['wall_us']:8.1f}  {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
