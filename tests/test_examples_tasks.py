"""examples/: the task generator (deterministic, valid, disjoint splits, distinct formats) and the
PEFT adapter trainer at toy size on a tiny random LLaMA (adapters load back with PEFT and moved)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meteora_jax.data import read_jsonl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_tasks = _load("make_tasks")
DATA_PACKAGES = ("pycountry", "periodictable", "num2words", "babel", "pint")
_missing = [p for p in DATA_PACKAGES if importlib.util.find_spec(p) is None]
needs_data = pytest.mark.skipif(bool(_missing), reason=f"needs the `examples` extra (missing {_missing})")

TRAIN, TEST = 60, 20


@pytest.fixture(scope="module")
def task_roots(tmp_path_factory):
    if _missing:
        pytest.skip(f"needs the `examples` extra (missing {_missing})")
    roots = []
    for i, seed in enumerate((0, 0, 1)):
        root = tmp_path_factory.mktemp(f"tasks{i}")
        make_tasks.main(["--out", str(root), "--seed", str(seed), "--train-size", str(TRAIN), "--test-size", str(TEST)])
        roots.append(root)
    return roots


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@needs_data
def test_deterministic_by_seed(task_roots):
    a, b, c = (_files(r) for r in task_roots)
    assert a == b
    assert a.keys() == c.keys()
    assert any(a[k] != c[k] for k in a if k.endswith(".jsonl"))


@needs_data
def test_layout_manifest_and_splits(task_roots):
    root = task_roots[0]
    manifest = json.loads((root / "tasks.json").read_text())
    metrics = json.loads((root / "metrics.json").read_text())
    assert list(manifest) == list(make_tasks.TASKS) and len(manifest) >= 8
    assert metrics == {t: m["metric"] for t, m in manifest.items()}
    real = [t for t, m in manifest.items() if m["source"] != "procedural"]
    assert len(real) * 2 >= len(manifest)
    for task, info in manifest.items():
        assert info["metric"] in ("accuracy", "accuracy_contains", "rougeL", "bleu") and info["description"]
        train = read_jsonl(root / task / "train.jsonl")
        test = read_jsonl(root / task / "test.jsonl")
        assert (len(train), len(test)) == (TRAIN, TEST) == (info["train"], info["test"])
        prompts_train = {r["prompt"] for r in train}
        prompts_test = {r["prompt"] for r in test}
        assert len(prompts_train) == TRAIN and len(prompts_test) == TEST
        assert not prompts_train & prompts_test, task
        assert all(r["response"].strip() == r["response"] and r["response"] for r in train + test)


@needs_data
def test_test_split_does_not_depend_on_train_size(task_roots, tmp_path):
    make_tasks.main(["--out", str(tmp_path), "--train-size", "7", "--test-size", str(TEST), "--tasks", "arithmetic"])
    want = (task_roots[0] / "arithmetic" / "test.jsonl").read_bytes()
    assert (tmp_path / "arithmetic" / "test.jsonl").read_bytes() == want


def test_too_large_split_stops_before_writing(tmp_path, capsys):
    """A size past a task's pool of distinct prompts (roman_numerals has 3,999) is one line naming the
    task, the split and the flag, within seconds, and no task is written (the arithmetic drawn first
    included)."""
    with pytest.raises(SystemExit) as e:
        make_tasks.main(["--out", str(tmp_path / "t"), "--train-size", "4500", "--test-size", "5",
                         "--tasks", "arithmetic,roman_numerals"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2
    assert "task 'roman_numerals', train split: only" in err and "--train-size" in err, err
    assert not (tmp_path / "t").exists()

    # A sampler's own bug is not reported as a size problem: its error comes through as it is.
    def broken():
        return lambda rng: (int("x"), "")

    task = make_tasks.Task("broken", "accuracy", "", "procedural", broken)
    with pytest.raises(ValueError, match="invalid literal") as e:
        make_tasks.make_task(task, 0, 5, 5)
    assert not isinstance(e.value, make_tasks.PoolExhausted)


def _shape(text):
    # The format of a string: digits, letters and the rest collapsed to classes.
    return re.sub(r"[^\W\d_]+", "a", re.sub(r"\d+", "0", text))


@needs_data
def test_tasks_have_distinct_formats(task_roots):
    root = task_roots[0]
    prompt_heads, response_shapes = {}, {}
    for task in make_tasks.TASKS:
        records = read_jsonl(root / task / "train.jsonl")
        prompt_heads[task] = {r["prompt"][:12] for r in records}
        response_shapes[task] = {_shape(r["response"]) for r in records}
    tasks = list(make_tasks.TASKS)
    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            assert not prompt_heads[a] & prompt_heads[b], (a, b)
            assert not response_shapes[a] & response_shapes[b], (a, b)


def test_procedural_tasks_answers_are_right(tmp_path):
    make_tasks.main(["--out", str(tmp_path), "--train-size", "30", "--test-size", "5",
                     "--tasks", "arithmetic,sort_numbers,reverse_words,roman_numerals"])
    for r in read_jsonl(tmp_path / "arithmetic" / "train.jsonl"):
        a, op, b = re.fullmatch(r"What is (\d+) (plus|minus) (\d+)\?", r["prompt"]).groups()
        assert r["response"] == f"Answer: {int(a) + int(b) if op == 'plus' else int(a) - int(b)}"
    for r in read_jsonl(tmp_path / "sort_numbers" / "train.jsonl"):
        xs = [int(x) for x in r["prompt"].split(": ")[1].split(", ")]
        assert r["response"] == " < ".join(map(str, sorted(xs)))
    for r in read_jsonl(tmp_path / "reverse_words" / "train.jsonl"):
        assert r["response"].split(" / ") == r["prompt"].split(": ")[1].split()[::-1]
    # Roman numerals read back by the additive/subtractive rule, and canonical (no 'IIII', 'VV', ...).
    values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
    for r in read_jsonl(tmp_path / "roman_numerals" / "train.jsonl"):
        n = int(re.fullmatch(r"Convert (\d+) to Roman numerals\.", r["prompt"]).group(1))
        head, numeral = r["response"].split(" = ")
        v = [values[c] for c in numeral]
        assert int(head) == n == sum(-x if i + 1 < len(v) and x < v[i + 1] else x for i, x in enumerate(v))
        assert not re.search(r"IIII|XXXX|CCCC|VV|LL|DD", numeral)


# ----------------------------------------------------------------------------------------------
# The adapter trainer on a tiny random LLaMA (CPU)


def test_train_adapters_toy(tiny_hf_base_with_tokenizer, tmp_path, capsys):
    tiny_base_dir = tiny_hf_base_with_tokenizer
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    train_adapters = _load("train_adapters")
    tasks_root, out = tmp_path / "tasks", tmp_path / "adapters"
    make_tasks.main(["--out", str(tasks_root), "--train-size", "8", "--test-size", "2",
                     "--tasks", "arithmetic,sort_numbers"])
    common = ["--tasks-root", str(tasks_root), "--out", str(out), "--base-dir", str(tiny_base_dir), "--device", "cpu",
              "--steps", "2", "--batch-size", "4", "--rank", "4", "--alpha", "8", "--max-len", "64", "--lr", "1e-2",
              "--mixed", "--mixed-steps", "2", "--save-dtype", "float32"]
    # Split over two runs: the second resumes by skipping the finished adapters.
    assert train_adapters.main(common + ["--max-tasks-per-run", "2"]) == 0
    assert (out / "adapters.txt").read_text().split() == ["arithmetic", "sort_numbers"]  # both task adapters exist
    assert not (out / "lora_b").exists()
    assert train_adapters.main(common) == 0
    captured = capsys.readouterr()
    assert "already done" in captured.out and "remaining: none" in captured.out
    assert "[warning]" not in captured.err  # same settings: nothing to say
    assert (out / "adapters.txt").read_text().split() == ["arithmetic", "sort_numbers"]
    assert (out / "base" / "config.json").is_file()

    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        want = base(ids).logits
    for name in ("arithmetic", "sort_numbers", "lora_b"):
        d = out / name
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
        assert set(cfg["target_modules"]) == set(train_adapters.ALL_PROJECTIONS.split(","))
        weights = load_file(d / "adapter_model.safetensors")
        b_keys = [k for k in weights if "lora_B" in k]
        assert b_keys and len(b_keys) == 2 * 7  # 2 layers x 7 projections
        assert any(weights[k].abs().max() > 0 for k in b_keys)  # PEFT inits B at zero: training moved it
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir), d).eval()
        with torch.no_grad():
            got = model(ids).logits
        assert not torch.allclose(got, want)

    # The HF-side evaluation runs over the same folders: base, own adapters and LoRA-B.
    baseline_eval = _load("baseline_eval")
    args = ["--tasks-root", str(tasks_root), "--adapters", str(out), "--base-dir", str(tiny_base_dir),
            "--device", "cpu", "--limit", "2", "--out", str(tmp_path / "eval.json")]
    assert baseline_eval.main(args) == 0
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert set(results) == {"base", "own", "lora_b"}
    assert all(set(r) == {"arithmetic", "sort_numbers"} for r in results.values())

    # A run with other settings keeps the finished adapters, and says so, naming each changed setting.
    other = list(common)
    other[other.index("--rank") + 1] = "8"
    assert train_adapters.main(other) == 0
    err = capsys.readouterr().err
    for name in ("arithmetic", "sort_numbers", "lora_b"):
        assert f"[warning] {name} is kept as trained, with other settings than this run's (rank 4 -> 8)" in err, err

    # Re-training one task keeps the other in adapters.txt (manifest order, every adapter present).
    shutil.rmtree(out / "sort_numbers")
    assert train_adapters.main(common + ["--tasks", "sort_numbers"]) == 0
    assert (out / "adapters.txt").read_text().split() == ["arithmetic", "sort_numbers"]


def test_example_scripts_stop_on_bad_input(tmp_path, capsys):
    """train_adapters.py / baseline_eval.py: bad counts, data and names stop before the model loads,
    with one line naming the file or flag, and nothing is written."""
    train_adapters, baseline_eval = _load("train_adapters"), _load("baseline_eval")
    tasks_root, out = tmp_path / "tasks", tmp_path / "adapters"
    make_tasks.main(["--out", str(tasks_root), "--train-size", "8", "--test-size", "2", "--tasks", "arithmetic,sort_numbers"])
    with open(tasks_root / "sort_numbers" / "train.jsonl", "a") as f:
        f.write('{"prompt": "3 1 2"}\n')
    common = ["--tasks-root", str(tasks_root), "--out", str(out), "--base-dir", str(tmp_path / "no-model")]
    for main, argv, message in (
        (train_adapters.main, common + ["--steps", "0"], "argument --steps: 0 is not >= 1"),
        (train_adapters.main, common + ["--time-budget", "0"], "argument --time-budget: 0.0 is not a finite number > 0"),
        (train_adapters.main, common + ["--tasks", "arithmetic", "--mixed", "--mixed-name", "base"],
         "adapter 'base' would replace the base model export"),
        (train_adapters.main, common, "sort_numbers/train.jsonl:9: missing field 'response'"),
        (train_adapters.main, ["--tasks-root", str(tmp_path / "none"), "--out", str(out)], "is not a folder"),
        (baseline_eval.main, ["--tasks-root", str(tasks_root), "--limit", "-1"], "argument --limit: -1 is not >= 1"),
        (baseline_eval.main, ["--tasks-root", str(tasks_root), "--out", str(tmp_path)], "is a folder"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err + str(e.value.code)
        assert e.value.code != 0 and message in err, (argv, err)
    assert not out.exists()


def test_e2e_stages_checks_every_stage_name_first(tmp_path):
    """An unknown stage name stops e2e_stages.sh before any stage runs (it ran the earlier stages
    first before) and before it creates the runs folder."""
    runs = tmp_path / "runs"
    done = subprocess.run(["bash", str(EXAMPLES / "e2e_stages.sh"), "convert", "bogus"], capture_output=True, text=True,
                          env={**os.environ, "RUNS": str(runs)}, timeout=120)
    assert done.returncode == 2 and "unknown stage bogus" in done.stderr, done.stderr
    assert "=== " not in done.stderr and not runs.exists()


def test_write_results_stops_on_bad_input(tmp_path, capsys):
    """write_results.py: a malformed --earlier, a missing or malformed eval / metrics file is one line
    naming the flag or the file (tracebacks before), and no results file is written."""
    write_results = _load("write_results")
    runs, out = tmp_path / "runs", tmp_path / "docs" / "results.md"
    (runs / "e2e").mkdir(parents=True)
    metrics = runs / "smollm2_135m" / "metrics.jsonl"
    common = ["--runs", str(runs), "--out", str(out)]
    cases = [
        (common + ["--earlier", "run0"], "--earlier 'run0': want LABEL=METRICS_JSONL[,EVAL_JSON]"),
        (common + ["--notes", str(tmp_path / "none.md")], "none.md: no such file"),
        (["--runs", str(runs), "--out", str(tmp_path)], "is a folder"),
        (common, "eval_meteora.json: missing"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            write_results.main(argv)
        err = capsys.readouterr().err + str(e.value.code)
        assert e.value.code != 0 and message in err, (argv, err)

    (runs / "e2e" / "eval_meteora.json").write_text('{"tasks": {}')
    for argv, message in [(common, "eval_meteora.json: malformed JSON")]:
        with pytest.raises(SystemExit) as e:
            write_results.main(argv)
        assert message in str(e.value.code), e.value.code
    (runs / "e2e" / "eval_meteora.json").write_text('{"tasks": {}}')
    with pytest.raises(SystemExit) as e:
        write_results.main(common)
    assert "metrics.jsonl: no such file" in str(e.value.code), e.value.code
    metrics.parent.mkdir()
    metrics.write_text('{"split": "train", "loss": 1.0}\n{"split": "eval"\n')
    with pytest.raises(SystemExit) as e:
        write_results.main(common)
    assert "metrics.jsonl:2: malformed JSON" in str(e.value.code), e.value.code
    metrics.write_text('{"split": "train", "loss": 1.0}\n')
    with pytest.raises(SystemExit) as e:
        write_results.main(common)
    assert "no eval record" in str(e.value.code), e.value.code

    # A bad later input (times.jsonl, an --earlier file) stops it before the routing pictures are copied.
    metrics.write_text('{"split": "eval", "gate_acc_top1": 0.9}\n')
    (runs / "e2e" / "eval_meteora.json").write_text(json.dumps({"tasks": {}, "composite": {"composite-3": {
        "per_task": {}, "pictures": ["/gpu/pictures/c3_00.png"]}}}))
    (runs / "e2e" / "pictures").mkdir()
    (runs / "e2e" / "pictures" / "c3_00.png").write_bytes(b"png")
    (runs / "e2e" / "times.jsonl").write_text('{"stage": "gates", "seconds": "ten", "device": "cpu", "status": 0}\n')
    with pytest.raises(SystemExit) as e:
        write_results.main(common)
    assert "times.jsonl:1: field 'seconds' must be float, got str" in str(e.value.code), e.value.code
    (runs / "e2e" / "times.jsonl").unlink()
    with pytest.raises(SystemExit) as e:
        write_results.main(common + ["--earlier", f"run0={tmp_path / 'none.jsonl'}"])
    assert "none.jsonl: no such file" in str(e.value.code), e.value.code
    assert not out.exists() and not (out.parent / "results").exists()


def test_greedy_generate_left_padding_matches_one_by_one(tiny_hf_base_with_tokenizer):
    tiny_base_dir = tiny_hf_base_with_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_common = _load("hf_common")
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    prompts = ["What is 12 plus 30?", "Sort ascending: 5, 3", "hello world, a much longer prompt than the others"]
    batched = hf_common.greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [hf_common.greedy_generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single


def test_scores():
    """The HF-side task scores equal meteora_jax.evaluate's on the same strings (so HF baselines and
    our evaluation are comparable), and hand-computed values."""
    from meteora_jax import evaluate as ev

    hf_common = _load("hf_common")
    assert hf_common.score("accuracy", ["Answer: 3 ", "x"], ["answer: 3", "y"]) == 0.5
    assert hf_common.score("accuracy_contains", ["so: Answer: 3."], ["Answer: 3"]) == 1.0
    assert hf_common.score("rougeL", ["a b c d"], ["a b c d"]) == 1.0
    assert abs(hf_common.score("rougeL", ["a x c"], ["a b c"]) - 2 / 3) < 1e-9  # LCS 2 of 3 tokens each
    assert hf_common.score("rougeL", ["Île-de-France"], ["île de france"]) == 1.0  # as meteora_jax.evaluate
    assert abs(hf_common.score("rougeL", ["北京市"], ["北京"]) - 0.8) < 1e-9  # LCS 2: P 2/3, R 1
    preds = ["Paris is a city of France, code FR-75.", "nothing alike", "Answer: 3 "]
    refs = ["Paris is a metropolitan department of France, with code FR-75.", "Bulgan is a province of Mongolia.",
            "answer: 3"]
    short = ["891", "esroh enots"]  # answers under four words: BLEU over the orders they have, on both sides
    for metric in ("accuracy", "accuracy_contains", "rougeL", "bleu"):
        assert abs(hf_common.score(metric, preds, refs) - ev.METRICS[metric](preds, refs)) < 1e-9, metric
        assert abs(hf_common.score(metric, short, short) - ev.METRICS[metric](short, short)) < 1e-9, metric
    assert hf_common.score("bleu", short, short) == ev.corpus_bleu(short, short) > 99.99
