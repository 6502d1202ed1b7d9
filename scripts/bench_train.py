"""Gate-training throughput vs. a base-model forward+backward, at LLaMA-3-8B shapes, one device.

    python scripts/bench_train.py                      # all modes, each in its own process
    python scripts/bench_train.py --layers 16 --batch 4 --seq 2048 --steps 5
    python scripts/bench_train.py --mode gate          # one mode, prints one JSON line
    python scripts/bench_train.py --mode gate --mesh data=1,fsdp=2,tensor=1 --batch 8   # 2 GPUs
    python scripts/bench_train.py --gate-impls "" --mixlora-impls auto   # MixLoRA against its baselines

Random weights (bf16), configs/llama3_8b.py shapes, 28 adapters of rank 8, top-2, remat "full".
Modes (each runs in a fresh process so that its peak memory is its own):

  gate       the real jitted train step of meteora_jax.train (joint loss, grads of the gates only,
             AdamW update of the gates, the config's train.lora_dropout) on the MeteoRA model.
  base_full  plain LLaMA (no adapters), LM loss, gradients of ALL parameters (no optimizer
             update): the usual "base-model forward+backward".
  base_acts  plain LLaMA, LM loss, gradients of the RMSNorm scales only: the full backward
             through the activations of every layer without weight gradients, which is the
             work gate training has to do on top of its adapters.
  mixlora    the real train step on plain LLaMA with MixLoRA experts in every FFN (--experts,
             --expert-rank, --expert-top-k; no MeteoRA adapters): LM + 0.01 x balance loss, grads
             and AdamW of the router and the experts.
  mixlora_one  the same with one expert, top-1: one LoRA of --expert-rank on each FFN projection,
             through the same code, the baseline that MixLoRA's k-fold per-pair work adds to.

tokens/s = batch * seq / median step time; peak = the device's peak_bytes_in_use.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("gate", "base_full", "base_acts", "mixlora", "mixlora_one")
TRAIN_STEP_MODES = ("gate", "mixlora", "mixlora_one")  # the real train step of meteora_jax.train


def _model_config(path: str, layers: int, adapters: int, mixlora: dict | None = None):
    import importlib.util

    from meteora_jax.config import ModelConfig

    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.num_layers = layers
    config.model.meteora.num_adapters = adapters
    if mixlora:
        config.model.mixlora.update(**mixlora)
    return config, ModelConfig.from_dict(config.model)


def _mixlora_of(mode: str, args) -> dict | None:
    """The model.mixlora settings of a mode (None: no experts)."""
    if mode == "mixlora":
        return dict(num_experts=args.experts, rank=args.expert_rank, top_k=args.expert_top_k, kernel_impl=args.kernel_impl)
    if mode == "mixlora_one":
        return dict(num_experts=1, rank=args.expert_rank, top_k=1, kernel_impl=args.kernel_impl)
    return None


def run_mode(mode: str, args) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from meteora_jax import train as train_lib
    from meteora_jax.loss import lm_loss
    from meteora_jax.model import LlamaForCausalLM

    config, model_config = _model_config(args.config, args.layers, args.adapters if mode == "gate" else 0,
                                         _mixlora_of(mode, args))
    if mode == "gate":
        import dataclasses

        meteora = dataclasses.replace(model_config.meteora, kernel_impl=args.kernel_impl)
        model_config = model_config.replace(meteora=meteora)
    model = LlamaForCausalLM(model_config)
    B, S = args.batch, args.seq
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model_config.vocab_size, (B, S), dtype=np.int32)
    ones = np.ones((B, S), np.int32)
    batch = {
        "input_ids": ids,
        "lm_labels": ids,
        "lm_mask": ones,
        "gate_labels": np.repeat(rng.integers(0, max(args.adapters, 1), (B, 1), dtype=np.int32), S, 1),
        "gate_mask": ones,
        "attention_mask": ones,
    }
    batch = jax.device_put(batch)

    @jax.jit
    def init(key):
        return nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])

    params = init(jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))

    if mode == "gate" and args.mesh:
        step_fn, carry, frozen, batch = _sharded_gate_step(args, config, model, model_config, params, batch)
        del params

        def step(carry):
            new_state, metrics = step_fn(carry, frozen, batch)
            return new_state, metrics["loss"]

    elif mode in TRAIN_STEP_MODES:
        schedule = train_lib.make_schedule(config.schedule, config.optimizer, 1000)
        tx = train_lib.make_optimizer(config.optimizer, schedule)
        gates, frozen = train_lib.split_params(params)
        del params
        state = jax.jit(
            lambda g: train_lib.TrainState(jnp.zeros((), jnp.int32), g, tx.init(g), jax.random.PRNGKey(0))
        )(gates)
        step_fn = jax.jit(
            train_lib.make_train_step(model, tx, coef=50.0, top_k=model_config.meteora.top_k, grad_accum_steps=1,
                                      lora_dropout=args.lora_dropout if mode == "gate" else 0.0,
                                      aux_coef=float(config.train.router_aux_loss_coef)),
            donate_argnums=(0,),
        )

        def step(carry):
            new_state, metrics = step_fn(carry, frozen, batch)
            return new_state, metrics["loss"]

        carry = state
    else:
        is_norm = lambda path: path[-1] == "scale"  # RMSNorm scales
        from flax import traverse_util

        flat = traverse_util.flatten_dict(params)
        wrt = traverse_util.unflatten_dict({k: v for k, v in flat.items() if mode == "base_full" or is_norm(k)})
        rest = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not (mode == "base_full" or is_norm(k))})
        del params, flat

        def loss_fn(w, r):
            out = model.apply({"params": train_lib.merge_params(w, r)}, batch["input_ids"], batch["attention_mask"])
            return lm_loss(out.logits, batch["lm_labels"], batch["lm_mask"])

        grad_fn = jax.jit(jax.value_and_grad(loss_fn))

        def step(carry):
            loss, grads = grad_fn(wrt, rest)
            return grads, loss  # keep the grads alive like an optimizer would read them

        carry = None

    t0 = time.perf_counter()
    carry, loss = step(carry)
    jax.block_until_ready((carry, loss))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        carry, loss = step(carry)
        jax.block_until_ready((carry, loss))
        times.append(time.perf_counter() - t0)
    devices = jax.devices()[: math.prod(args.mesh_shape.values())]
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30 for d in devices]
    median = float(np.median(times))
    return {
        "mode": mode,
        "device": jax.devices()[0].device_kind,
        "layers": args.layers,
        "adapters": args.adapters if mode == "gate" else 0,
        "batch": B,
        "seq": S,
        "params_b": n_params / 1e9,
        "experts": (f"{model_config.mixlora.num_experts} x r{model_config.mixlora.rank} top-{model_config.mixlora.top_k}"
                    if model_config.mixlora.num_experts else "-"),
        "trained_params_m": (sum(x.size for x in jax.tree.leaves(carry.gates)) / 1e6
                             if mode in TRAIN_STEP_MODES and not args.mesh else None),
        "kernel_impl": (model_config.mixlora if model_config.mixlora.num_experts else model_config.meteora).kernel_impl,
        "lora_dropout": args.lora_dropout if mode == "gate" else 0.0,
        "compile_s": compile_s,
        "step_s": median,
        "tokens_per_s": B * S / median,
        "peak_gib": max(peaks),  # per device
        "devices": len(devices),
        "mesh": args.mesh or "-",
        "loss": float(loss),
    }


def _sharded_gate_step(args, config, model, model_config, params, batch):
    """The gate train step over a (data, fsdp, tensor) mesh, jitted with explicit shardings, as
    `meteora_jax.train.Trainer` builds it (FSDP over base weights, batch over data x fsdp)."""
    import contextlib

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from meteora_jax import sharding as sharding_lib
    from meteora_jax import train as train_lib
    from meteora_jax.model import param_logical_axes

    mesh = sharding_lib.make_mesh(args.mesh_shape, jax.devices()[: math.prod(args.mesh_shape.values())])
    rules = sharding_lib.logical_rules(sharding_lib.DEFAULT_RULES, mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shardings = sharding_lib.param_shardings(param_logical_axes(model_config), abstract, mesh, rules)
    gate_sh, frozen_sh = train_lib.split_params(shardings)
    gates, frozen = train_lib.split_params(params)
    frozen = jax.device_put(frozen, frozen_sh)
    gates = jax.device_put(jax.tree.map(lambda x: x.astype(jnp.float32), gates), gate_sh)
    tx = train_lib.make_optimizer(config.optimizer, train_lib.make_schedule(config.schedule, config.optimizer, 1000))
    rep = sharding_lib.replicated(mesh)
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, gates), gate_sh, transform_non_params=lambda _: rep
    )
    state_sh = train_lib.TrainState(step=rep, gates=gate_sh, opt_state=opt_sh, rng=rep)
    state = jax.jit(
        lambda g: train_lib.TrainState(jnp.zeros((), jnp.int32), g, tx.init(g), jax.random.PRNGKey(0)),
        out_shardings=state_sh,
    )(gates)
    batch_sh = sharding_lib.batch_sharding(mesh, rules)
    batch = sharding_lib.put_batch(jax.device_get(batch), batch_sh)
    step = train_lib.make_train_step(model, tx, coef=50.0, top_k=model_config.meteora.top_k, grad_accum_steps=1,
                                     lora_dropout=args.lora_dropout)
    with contextlib.ExitStack() as stack:
        stack.enter_context(jax.set_mesh(mesh))
        stack.enter_context(nn.logical_axis_rules(rules))
        step_fn = jax.jit(
            step,
            in_shardings=(state_sh, frozen_sh, {k: batch_sh for k in batch}),
            out_shardings=(state_sh, rep),
            donate_argnums=(0,),
        )
        # Trace under the mesh and rules so the model's activation constraints apply.
        step_fn = step_fn.lower(state, frozen, batch).compile()
    return step_fn, state, frozen, batch


def _check_args(parser, args) -> None:
    """Stops the script on a bad option before any mode runs (in --mode all, each child would fail on
    it in turn, and a bad --json only after the first mode's minutes). Imports jax: only the modes
    need it, so it stays out of the module's imports."""
    from meteora_jax.cli import check_writable, choice_list, cli_fail
    from meteora_jax.config import MODEL_KERNEL_IMPLS
    from meteora_jax.sharding import MESH_AXES

    for flag in ("layers", "adapters", "batch", "seq", "steps", "timeout", "experts", "expert_rank"):
        if getattr(args, flag) < 1:
            cli_fail(parser, f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    if not os.path.isfile(args.config):
        cli_fail(parser, f"--config {args.config}: no such file")
    try:  # the config's own checks too, e.g. top_k <= --adapters
        config = _model_config(args.config, args.layers, args.adapters)[0]
    except Exception as e:  # noqa: BLE001 - a config file can raise anything: one line naming it
        cli_fail(parser, f"--config {args.config} with --layers {args.layers} --adapters {args.adapters}: "
                         f"{type(e).__name__}: {e}")
    if args.lora_dropout is None:
        args.lora_dropout = float(config.train.lora_dropout)
    if not 0 <= args.lora_dropout < 1:
        cli_fail(parser, f"--lora-dropout {args.lora_dropout} must be in [0, 1)")
    if args.kernel_impl not in MODEL_KERNEL_IMPLS:
        cli_fail(parser, f"--kernel-impl {args.kernel_impl!r}: choose from {','.join(MODEL_KERNEL_IMPLS)}")
    for flag in ("gate_impls", "mixlora_impls"):  # either may be empty: no such runs
        if getattr(args, flag):
            choice_list(parser, f"--{flag.replace('_', '-')}", getattr(args, flag), MODEL_KERNEL_IMPLS)
    if not 1 <= args.expert_top_k <= args.experts:
        cli_fail(parser, f"--expert-top-k {args.expert_top_k} must be in [1, --experts {args.experts}]")
    if args.mesh:
        if args.mode != "gate":  # the other modes would ignore it
            cli_fail(parser, f"--mesh runs --mode gate only, not --mode {args.mode}")
        axes = [part.partition("=") for part in args.mesh.split(",")]
        for axis, _, size in axes:
            if axis not in MESH_AXES or not size.isdigit() or int(size) < 1:
                cli_fail(parser, f"--mesh {args.mesh!r}: {axis}={size} is not AXIS=SIZE with AXIS one of "
                                 f"{','.join(MESH_AXES)} and SIZE >= 1")
        if len({axis for axis, _, _ in axes}) < len(axes):
            cli_fail(parser, f"--mesh {args.mesh!r}: an axis given twice")
    args.mesh_shape = {axis: int(size) for axis, _, size in axes} if args.mesh else {}  # {}: one device
    if args.json and args.mode != "all":
        cli_fail(parser, f"--json collects the runs of --mode all; --mode {args.mode} prints one RESULT line")
    if args.json:
        check_writable(parser, "--json", args.json)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES + ("all",), default="all")
    parser.add_argument("--config", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "llama3_8b.py"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=28)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--kernel-impl", default="xla", help="grouped_lora impl of --mode gate")
    parser.add_argument("--gate-impls", default="xla,auto", help="--mode all: gate runs, one per impl")
    parser.add_argument("--mixlora-impls", default="",
                        help="--mode all: mixlora and mixlora_one runs, one pair per impl (default: none)")
    parser.add_argument("--experts", type=int, default=8, help="--mode mixlora: experts per FFN")
    parser.add_argument("--expert-rank", type=int, default=16, help="--mode mixlora / mixlora_one: LoRA rank")
    parser.add_argument("--expert-top-k", type=int, default=2, help="--mode mixlora: experts per token")
    parser.add_argument("--lora-dropout", type=float, default=None,
                        help="train.lora_dropout of the gate runs (default: the --config file's)")
    parser.add_argument("--timeout", type=int, default=240, help="--mode all: seconds per mode")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument(
        "--mesh", default="", help="--mode gate over a mesh, e.g. data=1,fsdp=2,tensor=1 (batch = global batch); default: one device"
    )
    args = parser.parse_args()
    _check_args(parser, args)

    if args.mode != "all":
        print("RESULT " + json.dumps(run_mode(args.mode, args)), flush=True)
        return
    impls = [i for i in args.gate_impls.split(",") if i]
    mixlora_impls = [i for i in args.mixlora_impls.split(",") if i]

    def save(results):
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    runs = ([("gate", i) for i in impls[:1]] + [("base_full", None), ("base_acts", None)]
            + [("gate", i) for i in impls[1:]] + [(m, i) for i in mixlora_impls for m in ("mixlora", "mixlora_one")])
    results = []
    for mode, impl in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("config", "layers", "adapters", "batch", "seq", "steps", "lora_dropout", "experts", "expert_rank",
                      "expert_top_k")
        ]
        if impl:
            cmd.append(f"--kernel-impl={impl}")
        name = f"{mode}[{impl}]" if impl else mode
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            out, err, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            out, err, code = "", f"timed out after {args.timeout} s", -1
        lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
        if code or not lines:
            tail = (err or out)[-1500:]
            print(f"{name}: failed (exit {code})\n{tail}", flush=True)
            results.append({"mode": name, "error": tail.strip().splitlines()[-1] if tail.strip() else "failed"})
            continue
        results.append(dict(json.loads(lines[-1][len("RESULT ") :]), mode=name))
        print(json.dumps(results[-1]), flush=True)
        save(results)
    save(results)
    ok = {r["mode"]: r for r in results if "error" not in r}
    print(f"\n| run | layers | adapters | experts | lora dropout | B x S | step s | tokens/s | peak GiB | vs base_full | "
          "vs base_acts |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['mode']} | failed: {r['error'][:80]} |")
            continue
        ratios = [
            f"{r['tokens_per_s'] / ok[b]['tokens_per_s']:.2f}" if b in ok else "-" for b in ("base_full", "base_acts")
        ]
        print(
            f"| {r['mode']} | {r['layers']} | {r['adapters']} | {r['experts']} | {r['lora_dropout']} | {r['batch']} x {r['seq']} | "
            f"{r['step_s']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {r['peak_gib']:.1f} | {ratios[0]} | {ratios[1]} |"
        )


if __name__ == "__main__":
    main()
