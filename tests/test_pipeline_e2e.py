"""The issue-7 pipeline at toy size on the CPU, through the same scripts the GPU run used:
examples/make_tasks.py, then examples/e2e_stages.sh (PEFT adapters + LoRA-B -> convert -> train the
gates -> evaluate base / LoRA-B / oracle / MeteoRA on single tasks and chained composite-3 ->
transformers + PEFT cross-check), then examples/write_results.py. A tiny random LLaMA stands in for
SmolLM2 (`--base-dir`); every stage reads what the previous one wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pycountry", reason="needs the `examples` extra")

REPO = Path(__file__).resolve().parents[1]
TASKS = ["arithmetic", "sort_numbers", "reverse_words"]


def _run(args, env=None, timeout=900):
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
    )
    assert proc.returncode == 0, f"{args[:2]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_pipeline_end_to_end(tiny_hf_base_with_tokenizer, tmp_path):
    runs, tasks = tmp_path / "runs", tmp_path / "tasks"
    _run([sys.executable, "examples/make_tasks.py", "--out", tasks, "--seed", "0", "--train-size", "24",
          "--test-size", "4", "--tasks", ",".join(TASKS)])
    env = {
        "RUNS": str(runs),
        "TASKS": str(tasks),
        "EVAL_BATCH": "2",
        "COMPOSITE_SAMPLES": "2",
        "COMPOSITE_SIZES": "3",
        "ADAPTER_ARGS": f"--base-dir {tiny_hf_base_with_tokenizer} --device cpu --steps 2 --batch-size 4 "
                        "--mixed-steps 2 --rank 4 --alpha 8 --max-len 96 --save-dtype float32",
        "GATE_ARGS": "--config.data.seq_len=96 --config.model.dtype=float32 --config.train.steps=4 "
                     "--config.train.batch_size=6 --config.train.eval_every=0 --config.train.eval_batch_size=6 "
                     "--config.schedule.warmup_steps=1 --config.checkpoint.every=2",
        "EVAL_ARGS": "--max-samples 2 --max-new-tokens 8",
        "HF_ARGS": "--device cpu --batch-size 4 --limit 2",
    }
    _run(["bash", "examples/e2e_stages.sh"], env)

    adapters = runs / "adapters"
    assert (adapters / "adapters.txt").read_text().split() == TASKS
    assert (adapters / "lora_b" / "adapter_model.safetensors").is_file()
    assert (runs / "smollm2_135m" / "gates").is_dir()
    e2e = runs / "e2e"
    evals = {s: json.loads((e2e / f"eval_{s}.json").read_text()) for s in ("base", "lora_b", "oracle", "meteora")}
    for system, res in evals.items():
        assert sorted(res["tasks"]) == sorted(TASKS), system
        assert (res["composite"] == {}) == (system == "base"), system
    assert evals["oracle"]["settings"]["oracle"] is True
    comp = evals["meteora"]["composite"]["composite-3"]
    assert comp["mode"] == "turns" and comp["num_samples"] == 2 and comp["routing_temperature"] == 1.0
    assert all(os.path.isfile(p) for p in comp["pictures"]) and len(comp["pictures"]) == 2
    hf = json.loads((e2e / "hf_eval.json").read_text())
    assert sorted(hf["results"]) == ["base", "lora_b", "own"]
    stages = [json.loads(line)["stage"] for line in (e2e / "times.jsonl").read_text().splitlines()]
    assert stages[0] == "adapters" and {"gates", "eval_meteora", "hf_eval"} <= set(stages)

    # Run again: every stage is already done, nothing is redone.
    _run(["bash", "examples/e2e_stages.sh"], env)
    assert len((e2e / "times.jsonl").read_text().splitlines()) == len(stages)

    out = tmp_path / "docs" / "results.md"
    _run([sys.executable, "examples/write_results.py", "--runs", runs, "--out", out])
    text = out.read_text()
    single = evals["meteora"]["tasks"]["arithmetic"]["score"] * 100
    assert f"| arithmetic | accuracy |" in text and f"{single:.1f}" in text
    assert "composite-3: MeteoRA average above LoRA-B" in text
    assert (out.parent / "results" / "routing_composite-3_00.png").is_file()
