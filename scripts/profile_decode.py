"""Where a decode step goes: times one jitted decode step per model and batch, and with --trace
lists the GPU kernels it launches (count and time per step, grouped by kernel name).

    python scripts/profile_decode.py [--num-layers 8] [--batches 1,32] [--models base,1lora,meteora]
        [--cache-len 640] [--reps 50] [--trace] [--layout unrolled|fused] [--out PATH] [--tiny]

Models and weights are those of scripts/bench_generate.py (LLaMA-3-8B shapes, random bf16 weights,
rank-8 adapters, MeteoRA L = 28 top-2), in the unrolled layer layout (default) or the fused one that
`Generator` uses by default (`meteora_jax.fused_layout`); model
"opbyop" is MeteoRA with the fused routed paths switched off (gate matmul, top-k, softmax and
`grouped_lora` as separate ops, the path before `routed_lora`). --compare checks that the two give
the same next-token logits.

Step time: the jitted step (--tokens tokens per row, default 1, on a half-full KV cache of --cache-len slots, the
cache donated and updated in place, as inside the generation loop) run --reps times back to back,
total time / reps after a warm-up. Kernel table (--trace): `jax.profiler` trace of 3 steps, the
events of the GPU plane's stream lines, names with trailing numbers folded together ("loop_fusion_7"
-> "loop_fusion"). Note that XLA switches command buffers (CUDA graphs) off while a profile is
active, so the traced step runs op by op; the untraced time is the one to compare across flags.
Set XLA_FLAGS in the environment to compare compiler options (one process per setting).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_generate import (  # noqa: E402
    MODEL_NAMES,
    benchmark_models,
    half_full_cache,
    layout_params,
    llama3_8b,
    make_step,
    step_apply_fn,
    tiny,
)
from meteora_jax.cli import check_writable, choice_list, cli_fail, int_list, positive_int  # noqa: E402
routed_lora_module = importlib.import_module("pallas_kernels.routed_lora")  # the module, not the function
routed_kernel_module = importlib.import_module("pallas_kernels.routed_lora_pallas")


@contextlib.contextmanager
def fused_routing(enabled: bool, blocks: dict | None = None):
    """While tracing: take (or not) the fused routed paths, with these decode-kernel block options."""
    saved = routed_lora_module.routed_path, dict(routed_kernel_module.DEFAULT_BLOCKS)
    if not enabled:
        routed_lora_module.routed_path = lambda *args: "composition"
    routed_kernel_module.DEFAULT_BLOCKS.update(blocks or {})
    try:
        yield
    finally:
        routed_lora_module.routed_path = saved[0]
        routed_kernel_module.DEFAULT_BLOCKS.clear()
        routed_kernel_module.DEFAULT_BLOCKS.update(saved[1])


def parse_blocks(text: str) -> list[dict]:
    """"block_k=128,min_programs=512;block_k=64" -> [{...}, {...}]; ValueError naming the bad item."""
    settings = []
    for part in filter(None, text.split(";")):
        setting = {}
        for item in part.split(","):
            key, _, value = item.partition("=")
            if key not in routed_kernel_module.DEFAULT_BLOCKS:
                raise ValueError(f"unknown option {key!r}; choose from {sorted(routed_kernel_module.DEFAULT_BLOCKS)}")
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{key} needs an integer >= 1, got {value!r}")
            setting[key] = int(value)
        settings.append(setting)
    return settings


def compare_fused(config, params, batch, cache_len) -> dict:
    """Next-token logits of MeteoRA with and without the fused routed kernel, same inputs."""
    ids = jax.random.randint(jax.random.key(batch), (batch, 1), 3, config.vocab_size)
    got = {}
    for fused in (True, False):
        apply = jax.jit(step_apply_fn(config, None))  # a fresh function: no trace shared between the two
        with fused_routing(fused):
            got[fused] = apply(params, half_full_cache(config, batch, cache_len), ids)[0].astype(jnp.float32)
    diff = float(jnp.linalg.norm(got[True] - got[False]) / jnp.linalg.norm(got[False]))
    agree = float(jnp.mean(jnp.argmax(got[True], -1) == jnp.argmax(got[False], -1)))
    return dict(batch=batch, logits_rel_diff=diff, top1_agreement=agree)


def kernel_events(trace_dir: str) -> tuple[list[tuple[str, float]], dict]:
    """(kernel name, duration in us) of every event on the GPU plane's stream lines, and the
    trace's layout ({plane: {line: number of events}}) for when the names are not the expected ones."""
    from jax.profiler import ProfileData

    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    events, layout = [], {}
    for plane in ProfileData.from_file(path).planes:
        layout[plane.name] = {line.name: len(list(line.events)) for line in plane.lines}
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):
                continue
            events += [(e.name, e.duration_ns / 1e3) for e in line.events]
    return events, layout


def fold(name: str) -> str:
    name = re.sub(r"(\.\d+)+$", "", name)
    return re.sub(r"_\d+$", "", name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs"), "profile_decode.json"))
    p.add_argument("--num-layers", type=positive_int, default=8)
    p.add_argument("--batches", type=int_list(), default="1,32")
    p.add_argument("--models", default="base,1lora,meteora", help="subset of base,1lora,meteora,opbyop")
    p.add_argument("--cache-len", type=positive_int, default=640)
    p.add_argument("--tokens", type=positive_int, default=1, help="tokens per row and step (> 1: a prefill chunk)")
    p.add_argument("--reps", type=positive_int, default=50)
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--trace", action="store_true")
    p.add_argument("--compare", action="store_true", help="fused vs op-by-op MeteoRA next-token logits")
    p.add_argument("--routed-blocks", default="",
                   help="also run MeteoRA with these routed-kernel block options, e.g. "
                        "'block_k=128,min_programs=512;block_k=64,min_programs=1024' (one model per setting)")
    p.add_argument("--top", type=positive_int, default=25, help="kernel-table rows per model and batch")
    p.add_argument("--layout", choices=("unrolled", "fused"), default="unrolled",
                   help="decoder-layer layout (bench_generate's LAYOUTS; fused: meteora_jax.fused_layout)")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    model_names = choice_list(p, "--models", args.models, MODEL_NAMES + ("opbyop",))
    try:
        routed_blocks = parse_blocks(args.routed_blocks)
    except ValueError as e:
        cli_fail(p, f"--routed-blocks {args.routed_blocks!r}: {e}")
    if args.layout == "fused" and (args.compare or routed_blocks or "opbyop" in model_names):
        p.error("--compare, --routed-blocks and model opbyop switch routed_lora's paths: use --layout unrolled")
    if args.compare and "meteora" not in model_names:  # it compares that model's two paths
        cli_fail(p, f"--compare needs model meteora in --models {args.models!r}")
    check_writable(p, "--out", args.out)
    make = tiny if args.tiny else llama3_8b
    batches = args.batches
    dev = jax.devices()[0]
    flags = os.environ.get("XLA_FLAGS", "")
    print(f"jax {jax.__version__}, {dev.device_kind}, {args.num_layers} layers, XLA_FLAGS={flags!r}", flush=True)

    models = {name.replace(" ", "").lower(): model for name, model in
              benchmark_models(make, args.num_layers, args.rank).items()}
    models["opbyop"] = models["meteora"]
    runs = [(name, name, {}) for name in model_names]
    for blocks in routed_blocks:
        runs.append(("meteora", "meteora[" + ",".join(f"{k}={v}" for k, v in blocks.items()) + "]", blocks))
    rows, comparisons = [], []
    for model_name, name, blocks in runs:
        config, params, force = models[model_name]
        params = layout_params(config, params, args.layout)
        step = make_step(config, force, fused_projections=args.layout == "fused")
        for batch in batches:
            ids = jnp.ones((batch, args.tokens), jnp.int32)
            cache = half_full_cache(config, batch, max(args.cache_len, 2 * args.tokens))
            t0 = time.perf_counter()
            with fused_routing(name != "opbyop", blocks):  # compiles
                ids, cache = step(params, cache, ids)
            jax.block_until_ready(ids)
            compile_s = time.perf_counter() - t0
            for _ in range(3):
                ids, cache = step(params, cache, ids)
            jax.block_until_ready(ids)
            t0 = time.perf_counter()
            for _ in range(args.reps):
                ids, cache = step(params, cache, ids)
            jax.block_until_ready(ids)
            step_ms = 1e3 * (time.perf_counter() - t0) / args.reps
            row = dict(model=name, batch=batch, tokens=args.tokens, step_ms=step_ms, compile_s=compile_s)
            if args.trace:
                with tempfile.TemporaryDirectory() as trace_dir:
                    with jax.profiler.trace(trace_dir):
                        for _ in range(3):
                            ids, cache = step(params, cache, ids)
                        jax.block_until_ready(ids)
                    events, row["trace_layout"] = kernel_events(trace_dir)
                by_name = collections.defaultdict(lambda: [0, 0.0])
                for kname, us in events:
                    by_name[fold(kname)][0] += 1
                    by_name[fold(kname)][1] += us
                row["kernels_per_step"] = len(events) / 3
                row["kernel_us_per_step"] = sum(us for _, us in events) / 3
                row["kernels"] = sorted(
                    ([k, c / 3, us / 3] for k, (c, us) in by_name.items()), key=lambda r: -r[2]
                )
            rows.append(row)
            msg = f"{name:8} B={batch:<3} step {step_ms:7.3f} ms  compile {compile_s:5.1f} s"
            if args.trace:
                msg += f"  kernels/step {row['kernels_per_step']:.0f}, kernel time {row['kernel_us_per_step'] / 1e3:.3f} ms"
            print(msg, flush=True)
        if args.compare and name == "meteora":
            comparisons = [compare_fused(config, params, batch, args.cache_len) for batch in batches]
            for c in comparisons:
                print(f"fused vs op-by-op B={c['batch']}: logits relative difference {c['logits_rel_diff']:.2e}, "
                      f"top-1 agreement {c['top1_agreement']:.3f}", flush=True)
        del params
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=dev.device_kind, jax=jax.__version__, xla_flags=flags, num_layers=args.num_layers,
                       cache_len=args.cache_len, rows=rows, comparisons=comparisons), f, indent=1)
    print(f"wrote {args.out}")
    for row in rows:
        if "kernels" not in row:
            continue
        print(f"\n{row['model']} B={row['batch']}: {row['kernels_per_step']:.0f} kernels, "
              f"{row['kernel_us_per_step']:.0f} us kernel time, {1e3 * row['step_ms']:.0f} us step (untraced)")
        print(f"  {'kernel':60} {'n/step':>7} {'us/step':>9} {'us each':>8}")
        for kname, count, us in row["kernels"][: args.top]:
            print(f"  {kname[:60]:60} {count:7.1f} {us:9.1f} {us / max(count, 1e-9):8.2f}")
    print(f"\n{dev.device_kind}, {args.num_layers} layers, XLA_FLAGS={flags!r}")
    for row in rows:
        print(f"{row['model']:8} B={row['batch']:<3} {row['step_ms']:7.3f} ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
