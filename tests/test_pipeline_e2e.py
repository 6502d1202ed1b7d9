"""The whole user pipeline of the README's end-to-end section, at toy size on the CPU, through the
same command lines: tasks -> PEFT adapters -> convert base + adapters -> train the gates ->
evaluate single tasks and composite-3 prompts. Each stage reads what the previous one wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pycountry", reason="needs the `examples` extra")

REPO = Path(__file__).resolve().parents[1]
TASKS = ["arithmetic", "sort_numbers", "reverse_words"]


def _run(*args, timeout=300):
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_pipeline_end_to_end(tiny_hf_base_with_tokenizer, tmp_path):
    base = tiny_hf_base_with_tokenizer
    tasks, adapters = tmp_path / "tasks", tmp_path / "adapters"
    base_ckpt, model_ckpt, workdir = tmp_path / "ckpt_base", tmp_path / "ckpt", tmp_path / "train"

    _run("examples/make_tasks.py", "--out", tasks, "--seed", "0", "--train-size", "24", "--test-size", "4",
         "--tasks", ",".join(TASKS))
    _run("examples/train_adapters.py", "--tasks-root", tasks, "--out", adapters, "--base-dir", base,
         "--device", "cpu", "--steps", "2", "--batch-size", "4", "--rank", "4", "--alpha", "8", "--max-len", "96",
         "--save-dtype", "float32", "--no-export-base")
    assert (adapters / "adapters.txt").read_text().split() == TASKS

    _run("scripts/convert.py", "base", base, "-o", base_ckpt)
    _run("scripts/convert.py", "loras", "--base", base_ckpt, "--adapter-dir", adapters, "-o", model_ckpt)
    inspected = _run("scripts/convert.py", "inspect", model_ckpt)
    assert all(name in inspected for name in TASKS)

    _run("scripts/train.py", "--config", "configs/smollm2_135m.py",
         f"--config.model_checkpoint={model_ckpt}", f"--config.tokenizer={base}", f"--config.data.root={tasks}",
         f"--config.workdir={workdir}", "--config.data.seq_len=96", "--config.model.dtype=float32",
         "--config.train.steps=4", "--config.train.batch_size=6", "--config.train.eval_every=0",
         "--config.train.eval_batch_size=6", "--config.schedule.warmup_steps=1", "--config.checkpoint.every=2",
         "--config.logging.progress=False")
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("gate_acc_top1" in m for m in metrics)
    assert (workdir / "gates").is_dir()

    results_path = tmp_path / "eval.json"
    _run("scripts/evaluate.py", "--checkpoint", model_ckpt, "--tokenizer", base, "--gates", workdir / "gates",
         "--data-root", tasks, "--metrics", tasks / "metrics.json", "--build-composite", "3",
         "--composite-samples", "2", "--max-samples", "2", "--max-new-tokens", "8", "--output", results_path)
    results = json.loads(results_path.read_text())
    text = json.dumps(results)
    assert all(task in text for task in TASKS)
    assert "composite" in text
