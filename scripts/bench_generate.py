"""Generation benchmark (issue 6 point 6): prefill and decode tokens/s of the base model, the base
+ one LoRA and MeteoRA, at LLaMA-3-8B shapes with random weights, in the unrolled and fused
decoder-layer layouts (the default; scan on request), all in one run.

    python scripts/bench_generate.py [--out PATH] [--num-layers 32] [--batches 1,32]
        [--prompt-len 512] [--new-tokens 128] [--reps 5] [--layouts unrolled,fused] [--tiny]

Models (bf16 weights and compute, rank 8 adapters on all 7 projections):
  base       plain LLaMA-3-8B (num_adapters = 0)
  1 LoRA     MeteoRA layers with L = 1 adapter, routing forced to it with weight 1
             (`force_adapter=0`): x @ W + s (x @ A) @ B per projection, the gate skipped from the
             mixture (its [d, 1] logits are still computed, as in every MeteoRA layer)
  MeteoRA    L = 28 adapters, top-2 routing by the gates (random gates: tokens spread over adapters)
The three share the same base weights on the device.

Layouts (`Generator(scan_layers=..., fused_projections=...)`): "scan" runs the decoder layers with
`nn.scan` over stacked weights (the training/checkpoint layout); "unrolled" converts them once to
one set of weights per layer, applied in a Python loop; "fused" (the generator's default) also
fuses the projections that share an input into one GEMM, MeteoRA deltas folded in
(`meteora_jax.fused_layout`; the base model gets its q/k/v and gate/up GEMMs fused the same way).
Ratios to base are taken within a layout.

Timing: `Generator.device_call` binds the one compiled program (prefill + `while_loop` decode) to
device-resident inputs; each run is one dispatch followed by `block_until_ready`, after a
warm-up run (compilation) and 1 s of untimed runs. Median of --reps runs. Prompts are random ids
of exactly --prompt-len tokens (no padding), EOS disabled, greedy.
  prefill time  = T(max_new_tokens = 1): prefill + the first token
  decode time   = T(max_new_tokens = N) - T(1): N - 1 decode steps (same compiled program: the
                  new-token bucket is fixed to N, so both runs use the same cache length)
  prefill tok/s = B * prompt_len / prefill time;  decode tok/s = B * (N - 1) / decode time
Targets (issue 6): MeteoRA prefill >= 0.85x base, decode >= 0.75x base.
Prints a compact table last and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from meteora_jax.config import MeteoRAConfig, ModelConfig  # noqa: E402
from meteora_jax.cli import check_writable, choice_list, cli_fail, int_list, positive_int  # noqa: E402
from meteora_jax.generate import Generator, inference_params  # noqa: E402
from meteora_jax.model import KVCache, LlamaForCausalLM, init_params  # noqa: E402
from meteora_jax.routing import Routing  # noqa: E402

TARGETS = {"prefill": 0.85, "decode": 0.75}
LAYOUTS = ("scan", "unrolled", "fused")
MODEL_NAMES = ("base", "1lora", "meteora")  # --models: `benchmark_models`' names, lower case without spaces


def llama3_8b(num_layers: int, meteora: MeteoRAConfig) -> ModelConfig:
    return ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=num_layers,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,  # no rope scaling: Meta-Llama-3-8B's (Llama-3.1's adds it)
        max_position_embeddings=8192,
        dtype="bfloat16",
        param_dtype="bfloat16",
        meteora=meteora,
    )


def tiny(num_layers: int, meteora: MeteoRAConfig) -> ModelConfig:
    return ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=num_layers, num_heads=4,
        num_kv_heads=2, head_dim=16, dtype="bfloat16", param_dtype="bfloat16", meteora=meteora,
    )


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random parameters with init-like scales, made leaf by leaf on the device (no full-model init)."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def make(path, leaf, key):
        name = path[-1].key
        shape, dtype = leaf.shape, leaf.dtype
        if name in ("scale", "lora_scaling"):
            return jnp.ones(shape, dtype)
        if name == "embedding":
            std = 0.02
        elif name == "lora_b":
            std = 0.01
        else:  # kernel [.., d_in, d_out], lora_a [.., d_in, r], gate [.., d_in, L]
            std = 1.0 / np.sqrt(shape[-2])
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    out = jax.jit(lambda ks: [make(path, leaf, k) for (path, leaf), k in zip(leaves, ks)])(keys)
    return jax.tree_util.tree_unflatten(treedef, out)


def derived_params(meteora_params: dict, keep_adapters: int | None) -> dict:
    """The same base arrays with no adapters (None) or with the first `keep_adapters` adapters."""

    def walk(node):
        if "kernel" in node and "lora_a" in node:
            if keep_adapters is None:
                return {"kernel": node["kernel"]}
            k = keep_adapters
            return {
                "kernel": node["kernel"],
                "lora_a": node["lora_a"][:, :k],
                "lora_b": node["lora_b"][:, :k],
                "lora_scaling": node["lora_scaling"][:, :k],
                "gate": node["gate"][..., :k],
            }
        return {key: walk(v) if isinstance(v, dict) else v for key, v in node.items()}

    return walk(meteora_params)


def _median_time(run, reps: int, warmup_s: float = 1.0) -> float:
    """Median seconds of `reps` runs, after `warmup_s` of untimed ones (the GPU idles through the
    compilation before; the B = 1 prefill, ~20 ms, is the measurement most exposed to that)."""
    t_end = time.perf_counter() + warmup_s
    while time.perf_counter() < t_end:
        jax.block_until_ready(run())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name, layout, config, params, batches, prompt_len, new_tokens, reps, force_adapter=None,
                compiler_options=None) -> list[dict]:
    gen = Generator(
        config, params, min_prompt_bucket=prompt_len, min_new_tokens_bucket=new_tokens, scan_layers=layout == "scan",
        fused_projections=layout == "fused", compiler_options=compiler_options,
    )
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        prompts = rng.integers(3, config.vocab_size, (batch, prompt_len)).tolist()
        kw = dict(eos_token_ids=[], force_adapter=force_adapter)
        run_1, _, _ = gen.device_call(prompts, max_new_tokens=1, **kw)
        run_n, _, _ = gen.device_call(prompts, max_new_tokens=new_tokens, **kw)
        t0 = time.perf_counter()
        jax.block_until_ready(run_1())  # compiles
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(run_n())  # same program
        assert gen.num_traces == len(rows) + 1, "prefill and decode runs must share one compiled program"
        t_prefill = _median_time(run_1, reps)
        t_total = _median_time(run_n, reps)
        t_decode = max(t_total - t_prefill, 1e-9)
        row = dict(
            model=name,
            layout=layout,
            batch=batch,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            prefill_s=t_prefill,
            decode_s=t_decode,
            prefill_tok_s=batch * prompt_len / t_prefill,
            decode_tok_s=batch * (new_tokens - 1) / t_decode,
            decode_ms_per_step=1e3 * t_decode / (new_tokens - 1),
            compile_s=compile_s,
        )
        print(
            f"{name:10} {layout:8} B={batch:<3} "
            f"prefill {row['prefill_tok_s']:10.0f} tok/s ({1e3 * t_prefill:7.1f} ms)  "
            f"decode {row['decode_tok_s']:9.0f} tok/s ({row['decode_ms_per_step']:.2f} ms/step)  "
            f"compile {compile_s:.1f} s",
            flush=True,
        )
        rows.append(row)
    return rows


def benchmark_models(make, num_layers: int, rank: int) -> dict:
    """name -> (config, params, force_adapter) of the three benchmark models, sharing base weights."""
    meteora_cfg = make(num_layers, MeteoRAConfig(num_adapters=28, rank=rank, top_k=2))
    t0 = time.perf_counter()
    meteora_params = random_params(meteora_cfg)
    jax.block_until_ready(meteora_params)
    print(f"random weights in {time.perf_counter() - t0:.1f} s", flush=True)
    return {
        "base": (make(num_layers, MeteoRAConfig(num_adapters=0)), derived_params(meteora_params, None), None),
        "1 LoRA": (make(num_layers, MeteoRAConfig(num_adapters=1, rank=rank, top_k=1)),
                   derived_params(meteora_params, 1), 0),
        "MeteoRA": (meteora_cfg, meteora_params, None),
    }


def half_full_cache(config, batch, cache_len, per_layer=True):
    """A KV cache of `cache_len` slots whose first half holds (zero) valid entries; per layer (as
    `Generator` makes it for the unrolled layouts) or stacked (the scanned layout)."""
    cache = KVCache.init(config, batch, cache_len, per_layer=per_layer)
    return cache.replace(index=jnp.int32(cache_len // 2), valid=cache.valid.at[:, : cache_len // 2].set(True))


def step_apply_fn(config, force_adapter, scan_layers=False, fused_projections=False):
    """(params, cache, ids [B, S]) -> (next-token logits [B, V], updated cache with its index kept),
    so that the same step can run again on the same slots."""
    model = LlamaForCausalLM(config, collect_gate_logits=False, scan_layers=scan_layers,
                             fused_projections=fused_projections)
    routing = Routing(temperature=jnp.float32(1.0))
    if force_adapter is not None:
        routing = Routing.force_adapter(force_adapter, config.meteora.num_adapters)

    def apply(params, cache, ids):
        out = model.apply({"params": params}, ids, jnp.ones(ids.shape, bool), None, cache, routing=routing)
        return out.logits[:, -1], out.cache.replace(index=cache.index)

    return apply


def make_step(config, force_adapter, scan_layers=False, fused_projections=False):
    """Jitted (params, cache, ids [B, S]) -> (S copies of the argmax [B, S], cache); the cache is
    donated and updated in place, as inside the generation loop."""
    apply = step_apply_fn(config, force_adapter, scan_layers, fused_projections)

    def step(params, cache, ids):
        logits, cache = apply(params, cache, ids)
        return jnp.broadcast_to(jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None], ids.shape), cache

    return jax.jit(step, donate_argnums=1)


def layout_params(config, params, layout: str):
    """Scanned-layout params converted to `layout` (one of LAYOUTS), as `Generator` converts them."""
    return inference_params(params, config, scan_layers=layout == "scan", fused_projections=layout == "fused")


def decode_step_ms(config, params, layout, batch, cache_len, reps, force_adapter=None) -> float:
    """One decode step (one token per row on a half-full KV cache of `cache_len` slots), jitted on
    its own: the per-token cost of the model without the generation loop. Median of single steps."""
    params = layout_params(config, params, layout)
    step = make_step(config, force_adapter, scan_layers=layout == "scan", fused_projections=layout == "fused")
    state = [jnp.ones((batch, 1), jnp.int32), half_full_cache(config, batch, cache_len, per_layer=layout != "scan")]

    def run():
        state[0], state[1] = step(params, state[1], state[0])
        return state[0]

    jax.block_until_ready(run())
    return 1e3 * _median_time(run, max(reps, 3))


def _base_rows(rows: list[dict]) -> dict:
    """(layout, batch) -> the base model's row: ratios compare models within one layout."""
    return {(r["layout"], r["batch"]): r for r in rows if r["model"] == "base"}


def table(rows: list[dict]) -> str:
    base = _base_rows(rows)
    head = ("model", "layout", "batch", "prefill tok/s", "decode tok/s", "ms/step", "prefill x base", "decode x base")
    lines = [head]
    for r in rows:
        b = base.get((r["layout"], r["batch"]))
        lines.append(
            (
                r["model"],
                r["layout"],
                str(r["batch"]),
                f"{r['prefill_tok_s']:.0f}",
                f"{r['decode_tok_s']:.0f}",
                f"{r['decode_ms_per_step']:.2f}",
                f"{r['prefill_tok_s'] / b['prefill_tok_s']:.3f}" if b else "",
                f"{r['decode_tok_s'] / b['decode_tok_s']:.3f}" if b else "",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = lambda line: "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(x) for x in lines[1:]])


def _option_value(text: str):
    """An XLA option's value from the command line: true/false as bool, integers as int (XLA does
    not parse these from strings), anything else as given."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs"), "bench_generate.json"))
    p.add_argument("--num-layers", type=positive_int, default=32)
    p.add_argument("--batches", type=int_list(), default="1,32")
    p.add_argument("--prompt-len", type=positive_int, default=512)
    p.add_argument("--new-tokens", type=int, default=128, help="at least 2 (decode time: N - 1 steps)")
    p.add_argument("--reps", type=positive_int, default=5)
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--models", default="base,1lora,meteora", help="subset of base,1lora,meteora")
    p.add_argument("--layouts", default="unrolled,fused", help="subset of scan,unrolled,fused (decoder-layer layouts)")
    p.add_argument("--step-diagnostic", action="store_true",
                   help="also time one jitted decode step (model.apply with a KV cache) outside the loop")
    p.add_argument("--compiler-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an XLA option for every model's generation program (Generator compiler_options), "
                        "e.g. xla_gpu_enable_command_buffer=FUSION,CUBLAS; repeatable")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny model's widths; layers, batches, lengths and reps stay as given, so a CPU dry run "
                        "also passes e.g. --num-layers 1 --batches 1 --prompt-len 4 --new-tokens 3 --reps 1")
    args = p.parse_args(argv)
    batches = args.batches
    if args.new_tokens < 2:  # the decode time is T(N) - T(1)
        cli_fail(p, f"--new-tokens {args.new_tokens}: must be >= 2 (decode time = N - 1 steps)")
    compiler_options = {}
    for option in args.compiler_option:
        name, sep, value = option.partition("=")
        if not sep or not name:
            p.error(f"--compiler-option {option!r}: expected NAME=VALUE")
        compiler_options[name] = _option_value(value)
    layouts = choice_list(p, "--layouts", args.layouts, LAYOUTS)
    model_names = choice_list(p, "--models", args.models, MODEL_NAMES)
    check_writable(p, "--out", args.out)
    make = tiny if args.tiny else llama3_8b
    positions = make(1, MeteoRAConfig()).max_position_embeddings  # (it failed after building the weights)
    if args.prompt_len + args.new_tokens > positions:
        cli_fail(p, f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} exceeds the model's "
                    f"max_position_embeddings={positions}")

    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, device {dev.device_kind} ({dev.platform}), {args.num_layers} layers", flush=True)
    models = [(name, *model) for name, model in benchmark_models(make, args.num_layers, args.rank).items()
              if name.replace(" ", "").lower() in model_names]
    rows = []
    for layout in layouts:
        for name, cfg, params, force in models:
            rows += bench_model(name, layout, cfg, params, batches, args.prompt_len, args.new_tokens, args.reps, force,
                                compiler_options or None)
            # A Generator is a reference cycle (its jitted method): collect it now, so that its
            # unrolled copy of the weights leaves the device before the next one is made.
            gc.collect()
            if args.step_diagnostic:
                for batch in batches:
                    ms = decode_step_ms(cfg, params, layout, batch, args.prompt_len + args.new_tokens, args.reps, force)
                    print(f"{name:10} {layout:8} B={batch:<3} one jitted decode step outside the loop: {ms:.2f} ms",
                          flush=True)
                    rows[-len(batches) + batches.index(batch)]["single_step_ms"] = ms

    result = dict(
        device=dev.device_kind,
        jax=jax.__version__,
        shapes="tiny" if args.tiny else "llama3-8b",
        num_layers=args.num_layers,
        rank=args.rank,
        meteora=dict(num_adapters=28, top_k=2),
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        reps=args.reps,
        layouts=layouts,
        compiler_options=compiler_options,
        rows=rows,
        targets=TARGETS,
    )
    base = _base_rows(rows)
    checks = []
    for r in rows:
        b = base.get((r["layout"], r["batch"]))  # ratios need the base row of the same run and layout
        if r["model"] == "MeteoRA" and b:
            for kind in ("prefill", "decode"):
                ratio = r[f"{kind}_tok_s"] / b[f"{kind}_tok_s"]
                checks.append(dict(layout=r["layout"], batch=r["batch"], kind=kind, ratio=ratio,
                                   target=TARGETS[kind], met=ratio >= TARGETS[kind]))
    result["checks"] = checks
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out}")
    for c in checks:
        print(f"MeteoRA {c['layout']:8} {c['kind']:7} B={c['batch']}: {c['ratio']:.3f}x base "
              f"(target >= {c['target']}) {'met' if c['met'] else 'MISSED'}")
    by_key = {(r["model"], r["layout"], r["batch"]): r for r in rows}
    for (name, layout, batch), r in by_key.items():
        scan = by_key.get((name, "scan", batch))
        if layout == "unrolled" and scan:
            print(f"{name:10} B={batch:<3} unrolled / scan: prefill {r['prefill_tok_s'] / scan['prefill_tok_s']:.3f}x, "
                  f"decode {r['decode_tok_s'] / scan['decode_tok_s']:.3f}x")
    print(f"\n{dev.device_kind}, {args.num_layers} layers, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
