"""The generation-driven evaluation (meteora_jax.evaluate.run_evaluation and scripts/evaluate.py)
on the real tiny default world: its scores must be those of predictions made independently, one
prompt at a time, and scored by the libraries directly."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import runpy

import numpy as np
import pytest
import sacrebleu
from transformers import AutoTokenizer

from conftest import TINY_CHAT_TEMPLATE
from meteora_jax.data import read_composite_jsonl, read_jsonl, write_jsonl
from meteora_jax.generate import Generator, encode_prompt, eos_ids_of, load_for_inference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 6  # records per task


@pytest.fixture(scope="module")
def world(tiny_inference_world):
    params, config, names = load_for_inference(tiny_inference_world.model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_inference_world.tokenizer)
    return tiny_inference_world, params, config, names, tokenizer


def _alone(world, prompts, max_new_tokens):
    """Each prompt generated alone (batch 1), decoded as the evaluation should."""
    _, params, config, _, tok = world
    gen = Generator(config, params, eos_token_ids=eos_ids_of(tok), pad_token_id=tok.pad_token_id)
    out = []
    for p in prompts:
        seq = gen.generate([encode_prompt(tok, p)], max_new_tokens=max_new_tokens).sequences()[0]
        out.append(tok.decode(seq, skip_special_tokens=True).strip())
    return out


def test_evaluate_script_scores_independent_predictions(world, tmp_path, capsys):
    w, _, _, names, tok = world
    # A data root whose "arith" references are the model's own answers for records 0, 2, 4 (and
    # the true sums elsewhere, which a random model does not produce): accuracy must be 3/6, which
    # needs every prediction paired with its own record across sorted, padded batches.
    data = tmp_path / "data"
    records = {t: read_jsonl(os.path.join(w.data_root, t, "test.jsonl"))[:N] for t in ("arith", "reverse")}
    max_new = 12
    own = _alone(world, [r["prompt"] for r in records["arith"]], max_new)
    assert len(set(own)) > 1
    for i in (0, 2, 4):
        records["arith"][i] = dict(records["arith"][i], response=own[i])
    for t, recs in records.items():
        os.makedirs(data / t)
        write_jsonl(data / t / "test.jsonl", recs)

    out = tmp_path / "eval" / "results.json"
    script = runpy.run_path(os.path.join(REPO, "scripts", "evaluate.py"), run_name="evaluate_script")
    argv = [
        "--checkpoint", w.model, "--tokenizer", w.tokenizer, "--data-root", str(data),
        "--metrics", json.dumps({"reverse": "bleu"}), "--batch-size", "4", "--max-new-tokens", str(max_new),
        "--build-composite", "2", "--composite-samples", "5", "--composite-seed", "3", "--output", str(out),
    ]
    assert script["main"](argv) == 0
    printed = capsys.readouterr().out

    results = json.loads(out.read_text())
    arith = results["tasks"]["arith"]
    assert arith["metric"] == "accuracy" and arith["count"] == N
    assert arith["score"] == pytest.approx(0.5)
    assert [e["prediction"] for e in arith["examples"]] == own[:3]

    rev = results["tasks"]["reverse"]
    rev_preds = _alone(world, [r["prompt"] for r in records["reverse"]], max_new)
    refs = [r["response"] for r in records["reverse"]]
    # n-gram orders up to the longest reference's words (2-3 here), as corpus_bleu takes them
    order = min(4, max(len(r.split()) for r in refs))
    want = sacrebleu.metrics.BLEU(max_ngram_order=order).corpus_score(rev_preds, [refs]).score
    assert rev["metric"] == "bleu" and rev["score"] == pytest.approx(want)

    # The composite-2 set was built (distinct sub-tasks, "@@@@" answers) and scored per sub-task.
    comp_file = out.parent / "composite_2.jsonl"
    comp = read_composite_jsonl(comp_file)
    assert len(comp) == 5 and all(len(set(r["tasks"])) == 2 for r in comp)
    assert all(r["response"].count("@@@@") == 1 for r in comp)
    c = results["composite"]["composite-2"]
    assert c["num_samples"] == 5 and c["n"] == 2 and c["routing_temperature"] == 1.0
    assert sorted(c["per_task"]) == sorted({t for r in comp for t in r["tasks"]})
    assert sum(v["count"] for v in c["per_task"].values()) == 10

    # The settings say how to reproduce the file: the model's source and resolved options too.
    settings = results["settings"]
    assert settings["model"] == dict(checkpoint=os.path.abspath(w.model), gates=None,
                                     tokenizer=os.path.abspath(w.tokenizer), top_k=2, dtype="float32",
                                     layer_layout="fused")
    assert settings["data_root"] == str(data) and settings["batch_size"] == 4
    assert settings["chat_template"] is bool(getattr(tok, "chat_template", None))  # as resolved, not None
    assert settings["composite_temperature"] is None

    # The printed tables carry the same numbers.
    assert "single tasks" in printed and "composite-2" in printed
    assert f"arith    accuracy  {0.5:.4f}  {N}" in printed
    assert str(out) in printed


@pytest.mark.parametrize("script_name", ["evaluate.py", "generate.py"])
def test_scripts_reject_unknown_force_adapter(tiny_inference_world, tmp_path, capsys, script_name):
    w = tiny_inference_world
    script = runpy.run_path(os.path.join(REPO, "scripts", script_name), run_name="cli_script")
    argv = ["--checkpoint", w.model, "--tokenizer", w.tokenizer, "--force-adapter", "poetry"]
    argv += ["--prompt", "1+2="] if script_name == "generate.py" else ["--data-root", w.data_root, "--output", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as e:
        script["main"](argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'poetry' is not an adapter" in err
    assert all(name in err for name in w.adapter_names)


def _bad_generate_inputs(w, tmp_path):
    """(extra argv, expected message) for scripts/generate.py; each must stop it before any output."""
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+2="}\n{"prompt": "3+4="\n')
    (tmp_path / "noprompt.jsonl").write_text('{"text": "1+2="}\n')
    (tmp_path / "a_file").write_text("")
    (tmp_path / "keep.jsonl").write_text('{"prompt": "1+2=", "id": 7}\n')
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    missing = tmp_path / "none"
    # Another model's tokenizer: more tokens than the tiny model's vocabulary (it generated noise, exit 0).
    from meteora_jax.checkpoint import model_config_of, read_metadata
    from meteora_jax.tiny import _build_tokenizer

    vocab = model_config_of(w.model, read_metadata(w.model)).vocab_size
    big = _build_tokenizer(["1+2=3 " + " ".join(f"w{i}" for i in range(2 * vocab))], vocab_size=vocab + 40)
    big.save_pretrained(str(tmp_path / "big_tokenizer"))
    return [
        (["--prompt", "1+2=", "--tokenizer", str(tmp_path / "big_tokenizer")],
         f"has {len(big)} tokens but the model in {w.model!r} has vocab_size {vocab}"),
        (["--prompts-file", str(missing / "p.txt")], f"{missing / 'p.txt'}: no such file"),
        (["--prompts-file", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: malformed JSON (Expecting ',' delimiter, column 18)"),
        (["--prompts-file", str(tmp_path / "noprompt.jsonl")], "noprompt.jsonl:1: missing field 'prompt'"),
        (["--prompt", "1+2=", "--batch-size", "0"], "--batch-size 0 must be >= 1"),
        (["--prompt", "1+2=", "--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
        (["--prompt", "1+2=", "--max-new-tokens", "-1"], "max_new_tokens=-1 must be >= 1"),
        (["--prompt", "1+2=", "--json", str(tmp_path / "a_file" / "out.jsonl")], "a_file is a file, not a folder"),
        (["--prompt", "1+2=", "--routing-pictures", str(tmp_path / "a_file")], "a_file is a file; give a folder path"),
        # A picture's parent that is a file failed with a traceback after generating everything.
        (["--prompt", "1+2=", "--routing-pictures", str(tmp_path / "a_file" / "pics")], "a_file is a file, not a folder"),
        (["--prompt", "1+2=", "--seed", str(2**64)], f"--seed {2**64} must be in [0, 2**32)"),  # a traceback after loading
        (["--prompt", "1+2=", "--tokenizer", str(missing)], f"tokenizer folder {str(missing)!r} does not exist"),
        (["--prompt", "1+2 " * 400], "exceeds the model's max_position_embeddings=512"),
        (["--prompt", "1+2=", "--temperature", "nan"], "temperature=nan must be >= 0"),
        (["--prompt", "1+2=", "--routing-temperature", "0"], "routing temperature must be a finite number > 0"),
        (["--prompts-file", str(tmp_path / "latin1.txt")], "latin1.txt: not UTF-8 text"),
        # These said "give --prompt and/or --prompts-file" and "no such file".
        (["--prompts-file", str(tmp_path / "blank.txt")], f"--prompts-file {tmp_path / 'blank.txt'} holds no prompt"),
        (["--prompts-file", str(tmp_path)], f"{tmp_path}: a folder, not a file"),
        # The JSON file where the pictures' folder goes: a traceback at the first picture, after generating.
        (["--prompt", "1+2=", "--json", str(tmp_path / "same"), "--routing-pictures", str(tmp_path / "same")],
         "lies in the --routing-pictures folder"),
        (["--prompt", "1+2=", "--json", str(tmp_path / "pics" / "g.jsonl"), "--routing-pictures", str(tmp_path / "pics")],
         "lies in the --routing-pictures folder"),
        # The answers replaced the prompts file (exit 0).
        (["--prompts-file", str(tmp_path / "keep.jsonl"), "--json", str(tmp_path / "keep.jsonl")],
         f"--json {tmp_path / 'keep.jsonl'} is the --prompts-file file"),
    ]


def test_scripts_stop_on_bad_input_with_one_line(tiny_inference_world, tmp_path, capsys):
    """Bad input to scripts/generate.py and scripts/evaluate.py: exit status 2, one line on stderr naming
    the file or option, and no output written."""
    w = tiny_inference_world
    generate = runpy.run_path(os.path.join(REPO, "scripts", "generate.py"), run_name="cli_script")["main"]
    evaluate = runpy.run_path(os.path.join(REPO, "scripts", "evaluate.py"), run_name="cli_script")["main"]
    outputs = tmp_path / "out"
    os.makedirs(outputs)
    base = ["--checkpoint", w.model, "--tokenizer", w.tokenizer]
    cases = [(generate, base + argv + ["--json", str(outputs / "g.jsonl")] * ("--json" not in argv), message)
             for argv, message in _bad_generate_inputs(w, tmp_path)]
    # evaluate.py: a missing data root; a malformed test file while building a composite set; a bad
    # checkpoint, which must stop the run before that set is written.
    data = tmp_path / "data"
    for task in ("arith", "reverse"):
        os.makedirs(data / task)
        write_jsonl(data / task / "test.jsonl", read_jsonl(os.path.join(w.data_root, task, "test.jsonl"))[:4])
    with open(data / "reverse" / "test.jsonl", "a") as f:
        f.write('{"prompt": "x", "response": 3}\n')
    ev_out = ["--output", str(outputs / "r.json"), "--composite-out", str(outputs)]
    built = tmp_path / "built"
    built.mkdir()
    write_jsonl(built / "composite_2.jsonl", [{"prompt": "1. a\n2. b", "response": "1@@@@\n2", "tasks": ["arith", "reverse"],
                                               "prompts": ["a", "b"]}])
    cases += [
        (evaluate, base + ["--data-root", str(tmp_path / "none")] + ev_out, "--data-root"),
        (evaluate, base + ["--data-root", str(data), "--build-composite", "2", "--output", str(tmp_path),
                           "--composite-out", str(outputs)], f"--output {tmp_path} is a folder"),
        (evaluate, base + ["--data-root", str(data), "--build-composite", "2", "--batch-size", "0"] + ev_out,
         "--batch-size 0 must be >= 1"),
        (evaluate, base + ["--data-root", str(data), "--build-composite", "2", "--composite-temperature", "0"] + ev_out,
         "routing temperature must be a finite number > 0"),
        (evaluate, base + ["--composite", str(data / "reverse" / "test.jsonl")] + ev_out,
         "test.jsonl:1: missing field 'tasks'"),
        (evaluate, base + ["--data-root", str(data), "--build-composite", "2"] + ev_out,
         "reverse/test.jsonl:5: field 'response' must be str, got int"),
        (evaluate, ["--checkpoint", str(built), "--tokenizer", w.tokenizer, "--data-root", w.data_root,
                    "--build-composite", "2"] + ev_out, "is not a meteora-jax checkpoint"),
        # Each of these failed only after every task was generated (a traceback, or nothing written),
        # or was taken silently.
        (evaluate, base + ["--data-root", str(data), "--output", str(tmp_path / "a_file" / "r.json")],
         "a_file is a file, not a folder"),
        (evaluate, base + ["--data-root", str(data), "--routing-pictures", str(tmp_path / "a_file")] + ev_out,
         "a_file is a file; give a folder path"),
        (evaluate, base + ["--data-root", str(data), "--oracle", "--composite-mode", "joint", "--build-composite", "2"]
         + ev_out, "--oracle routes each composite turn to its task's adapter: it needs --composite-mode turns"),
        (evaluate, base + ["--data-root", str(data), "--pictures-per-set", "-2"] + ev_out, "--pictures-per-set -2 must be >= 0"),
        (evaluate, base + ["--data-root", str(data), "--split", "val"] + ev_out,
         f"no task folder of --data-root {data} holds val.jsonl: nothing to evaluate"),
        (evaluate, base + ["--data-root", str(data), "--composite", str(built / "composite_2.jsonl"),
                           "--build-composite", "2", "--composite-out", str(built), "--output", str(outputs / "r.json")],
         "which --composite names as input"),  # it was rebuilt (overwritten) and scored twice
        # Nothing to evaluate: these loaded the model and replaced --output with empty results (exit 0).
        (evaluate, base + ["--tasks", "arith"] + ev_out, "--tasks names tasks of --data-root: give --data-root too"),
        (evaluate, base + ["--data-root", str(data), "--no-single"] + ev_out,
         "nothing to evaluate: give --data-root (its tasks, unless --no-single), --composite FILE or --build-composite N"),
        # A file where the built sets' folder goes: an OSError traceback after the model had loaded.
        (evaluate, base + ["--data-root", str(data), "--build-composite", "2", "--output", str(outputs / "r.json"),
                           "--composite-out", str(tmp_path / "a_file")], "a_file is a file; give a folder path"),
        # An output over an input destroyed it (exit 0): the composite set, a task's split file, a set
        # just built.
        (evaluate, base + ["--composite", str(built / "composite_2.jsonl"), "--output", str(built / "composite_2.jsonl")],
         "is the --composite file"),
        (evaluate, base + ["--data-root", str(data), "--output", str(data / "arith" / "test.jsonl")],
         f"lies inside --data-root {data}"),
        (evaluate, base + ["--data-root", str(data), "--build-composite", "2", "--composite-out",
                           str(outputs / "same.jsonl"), "--output", str(outputs / "same.jsonl")], "are the same file"),
        (evaluate, base + ["--data-root", str(data), "--routing-pictures", str(outputs / "pics"), "--output",
                           str(outputs / "pics" / "r.json"), "--composite-out", str(outputs)],
         "lies in the --routing-pictures folder"),
        # Outputs stay out of the folders read (a new file in the checkpoint was refused only on a rerun).
        (evaluate, base + ["--data-root", str(data), "--output", os.path.join(w.model, "r.json")],
         f"--output {os.path.join(w.model, 'r.json')} lies inside --checkpoint {w.model}"),
        # An unknown task failed only after the model had loaded; "," named the data root's own folder;
        # --build-only alone did nothing (exit 0); a missing metrics file was "not a JSON object".
        (evaluate, base + ["--data-root", str(data), "--tasks", "arith,nosuch"] + ev_out,
         f"{data / 'nosuch' / 'test.jsonl'}: no such file (--tasks nosuch; the tasks with one: arith,reverse)"),
        (evaluate, base + ["--data-root", str(data), "--tasks", ","] + ev_out, "--tasks ',' names no task"),
        (evaluate, ["--data-root", str(data), "--build-only"] + ev_out,
         "--build-only builds composite sets and stops: give --build-composite N"),
        (evaluate, base + ["--data-root", str(data), "--metrics", str(tmp_path / "none.json")] + ev_out,
         f"metric spec file {tmp_path / 'none.json'}: no such file (or give a JSON object)"),
    ]
    inputs = {path: path.read_bytes() for path in (tmp_path / "keep.jsonl", built / "composite_2.jsonl",
                                                   data / "arith" / "test.jsonl")}
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, (argv, err)
        assert message in err and err.count("\n") == 1 and ": error: " in err, (argv, err)
        assert not os.listdir(outputs), (argv, sorted(os.listdir(outputs)))
    assert all(path.read_bytes() == content for path, content in inputs.items())


def test_forced_routing_pictures_say_so(tiny_inference_world, tmp_path):
    """With --force-adapter every token uses that adapter; the pictures (the gates' own choices)
    carry that in their title rather than looking like the routing that ran."""
    w = tiny_inference_world
    generate = runpy.run_path(os.path.join(REPO, "scripts", "generate.py"), run_name="cli_script")["main"]
    argv = ["--checkpoint", w.model, "--tokenizer", w.tokenizer, "--prompt", "1+2=", "--max-new-tokens", "2",
            "--force-adapter", "reverse", "--routing-pictures", str(tmp_path / "pics")]
    assert generate(argv) == 0
    page = (tmp_path / "pics" / "prompt_000.html").read_text()
    assert "forced to reverse; colours: the gates&#x27; own top-1 choices (unused)" in page


def test_load_for_inference_checks_before_reading_weights(tiny_inference_world, monkeypatch, tmp_path):
    """A bad --top-k / --dtype, or gates of another shape, fail on the metadata: a 13B restore is
    minutes (they were checked after it)."""
    import meteora_jax.checkpoint as ckpt
    from meteora_jax.generate import load_for_inference

    def no_restore(*a, **k):
        raise AssertionError("weights were read before the options were checked")

    monkeypatch.setattr(ckpt, "restore_checkpoint", no_restore)
    with pytest.raises(ValueError, match="top_k=9 must be between 1 and num_adapters=3"):
        load_for_inference(tiny_inference_world.model, top_k=9)
    with pytest.raises(ValueError, match="dtype='bf16'; choose one of"):
        load_for_inference(tiny_inference_world.model, dtype="bf16")
    from meteora_jax.gates import export_gates

    names = list(tiny_inference_world.adapter_names)
    other = export_gates(tmp_path / "other", {"layers": {"mlp": {"down_proj": {"gate": np.zeros((2, 24, 3), np.float32)}}}},
                         names)
    with pytest.raises(ValueError, match=r"down_proj/gate has shape \(2, 24, 3\), the model checkpoint's is"):
        load_for_inference(tiny_inference_world.model, other)


def test_generate_script_writes_outputs_after_all_prompts(tiny_inference_world, tmp_path, capsys):
    """--json and --routing-pictures hold every prompt of every batch (written once generation is done);
    pictures an earlier run drew past this run's prompts are removed, other files kept."""
    w = tiny_inference_world
    generate = runpy.run_path(os.path.join(REPO, "scripts", "generate.py"), run_name="cli_script")["main"]
    (tmp_path / "pics").mkdir()
    for earlier in ("prompt_001.png", "prompt_004.png", "prompt_012.html", "prompt_5.txt", "notes.txt"):
        (tmp_path / "pics" / earlier).write_text("an earlier run")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("1+2=", "5+5=", "abc")))
    argv = ["--checkpoint", w.model, "--tokenizer", w.tokenizer, "--prompts-file", str(tmp_path / "prompts.jsonl"),
            "--prompt", "9+1=", "--batch-size", "3", "--max-new-tokens", "4", "--json", str(tmp_path / "g.jsonl"),
            "--routing-pictures", str(tmp_path / "pics")]
    assert generate(argv) == 0
    records = [json.loads(line) for line in open(tmp_path / "g.jsonl")]
    assert [r["prompt"] for r in records] == ["9+1=", "1+2=", "5+5=", "abc"]
    assert sorted(os.listdir(tmp_path / "pics")) == ["notes.txt"] + [
        f"prompt_{i:03d}.{ext}" for i in range(4) for ext in ("html", "png")] + ["prompt_5.txt"]
    assert (tmp_path / "pics" / "prompt_001.png").read_bytes()[:4] == b"\x89PNG"
    captured = capsys.readouterr()
    assert "removed 2 routing pictures of an earlier run" in captured.err
    assert f"routing pictures: {tmp_path / 'pics' / 'prompt_NNN'}.png and .html, NNN = 000 to 003" in captured.err
    printed = captured.out
    assert all(f"### output\n{r['output']}\n" in printed for r in records)


def test_generate_script_seeds_share_no_batch_key(tiny_inference_world, tmp_path):
    """Sampling one prompt in batches of 1: each batch draws its own key from --seed, so --seed 1's
    first batch is not --seed 0's second one (seed + batch start made them equal before)."""
    w = tiny_inference_world
    generate = runpy.run_path(os.path.join(REPO, "scripts", "generate.py"), run_name="cli_script")["main"]
    outputs = {}
    for seed in (0, 1):
        argv = ["--checkpoint", w.model, "--tokenizer", w.tokenizer, "--prompt", "1+2=", "--prompt", "1+2=",
                "--batch-size", "1", "--max-new-tokens", "12", "--temperature", "5", "--seed", str(seed),
                "--json", str(tmp_path / f"s{seed}.jsonl")]
        assert generate(argv) == 0
        outputs[seed] = [json.loads(line)["output"] for line in open(tmp_path / f"s{seed}.jsonl")]
    assert outputs[0][0] != outputs[0][1]  # the two batches of one run differ
    assert outputs[1][0] != outputs[0][1]


# ------------------------------------------------------------------------------------------------
# Composite samples as chained turns, and oracle routing


def _chain_alone(world, tok, sub_prompts, max_new_tokens, chat, forced=None):
    """One sample's turns generated one at a time (batch 1), the conversation encoded by hand."""
    _, params, config, _, _ = world
    gen = Generator(config, params, eos_token_ids=eos_ids_of(tok), pad_token_id=tok.pad_token_id)
    answers = []
    for turn, prompt in enumerate(sub_prompts):
        if chat:
            messages = []
            for p, a in zip(sub_prompts, answers):
                messages += [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
            messages.append({"role": "user", "content": prompt})
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = [tok.bos_token_id] + tok(sub_prompts[0], add_special_tokens=False)["input_ids"]
            for p, a in zip(sub_prompts[1 : turn + 1], answers):
                ids += tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                ids += tok(p, add_special_tokens=False)["input_ids"]
        force = None if forced is None else forced[turn]
        seq = gen.generate([ids], max_new_tokens=max_new_tokens, force_adapter=force).sequences()[0]
        answers.append(tok.decode(seq, skip_special_tokens=True).strip())
    return "@@@@\n".join(answers)


# Each setting in both states (chat template on/off, learned/oracle routing), not all four pairs:
# they act on different stages (prompt formatting, routing), and each pair takes 1-2 minutes on a CPU.
@pytest.mark.parametrize("chat, oracle", [(False, True), (True, False)])
def test_composite_turns_equal_turn_by_turn_generation(world, chat, oracle):
    w, params, config, names, tok = world
    if chat:  # the tiny world's tokenizer has no template: a copy gets a ChatML-style one
        tok = copy.deepcopy(tok)
        tok.chat_template = TINY_CHAT_TEMPLATE
    from meteora_jax.evaluate import build_composite_file, evaluate_composite_records

    records = build_composite_file(w.data_root, names, 2, 4, os.path.join(w.data_root, "..", f"c2_{chat}.jsonl"), seed=5)
    gen = Generator(config, params, eos_token_ids=eos_ids_of(tok), pad_token_id=tok.pad_token_id)
    adapter_for_task = {n: i for i, n in enumerate(names)} if oracle else None
    stem = os.path.join(w.data_root, "..", f"pics_{chat}_{oracle}", "c2")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    for earlier in ("c2_01.png", "c3_01.png"):  # an earlier run's second picture of this set, and another set's
        open(os.path.join(os.path.dirname(stem), earlier), "w").close()
    res = evaluate_composite_records(
        gen, tok, records, lambda t: "accuracy", max_new_tokens=6, batch_size=3, chat_template=chat,
        adapter_for_task=adapter_for_task, num_examples=len(records), pictures=(stem, names, 1),
    )
    # Pictures only of learned routing: the first sample's whole conversation.
    assert res.get("pictures", []) == ([] if oracle else [stem + "_00.png", stem + "_00.html"])
    if not oracle:
        assert os.path.getsize(stem + "_00.png") > 1000 and os.path.getsize(stem + "_00.html") > 1000
    kept = ["c2_00.html", "c2_00.png"] if not oracle else ["c2_01.png"]  # oracle runs draw no pictures
    assert sorted(os.listdir(os.path.dirname(stem))) == sorted(kept + ["c3_01.png"])
    assert res["mode"] == "turns" and res["num_samples"] == 4
    for r, ex in zip(records, res["examples"]):
        forced = [names.index(t) for t in r["tasks"]] if oracle else None
        assert ex["prediction"] == _chain_alone(world, tok, r["prompts"], 6, chat, forced)
        assert ex["prediction"].count("@@@@") == 1


def test_chains_that_could_outgrow_the_positions_are_refused_before_generating(world, tmp_path):
    """A composite sample whose last turn could pass max_position_embeddings (every answer at
    max_new_tokens) is refused, naming it, before any turn is generated, though its first turn alone
    fits; at exactly the limit it is accepted."""
    from meteora_jax import evaluate as ev

    w, params, config, names, tok = world
    records = ev.build_composite_file(w.data_root, names, 2, 3, str(tmp_path / "c2.jsonl"), seed=1)
    max_new = 6

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    # Without a chat template, by hand: [BOS] p1 (answer 1) [EOS] p2 (answer 2).
    worst = [1 + len(ids(r["prompts"][0])) + 1 + len(ids(r["prompts"][1])) + 2 * max_new for r in records]
    first = int(np.argmax(worst))
    gen = Generator(dataclasses.replace(config, max_position_embeddings=worst[first] - 1), params,
                    eos_token_ids=eos_ids_of(tok), pad_token_id=tok.pad_token_id)
    gen.generate = lambda *a, **k: pytest.fail("generated before refusing")
    assert 1 + len(ids(records[first]["prompts"][0])) + max_new <= worst[first] - 1  # turn 1 fits
    with pytest.raises(ValueError, match=rf"composite sample {first + 1}: its 2 chained turns can reach {worst[first]} "
                                         rf"tokens .* max_position_embeddings={worst[first] - 1}"):
        ev.generate_chained(gen, tok, [r["prompts"] for r in records], max_new_tokens=max_new, chat_template=False)
    gen.config = dataclasses.replace(config, max_position_embeddings=worst[first])
    ev._check_chain_lengths(gen, tok, [r["prompts"] for r in records], max_new, False)


@pytest.mark.parametrize("misfit", ["task", "turns", "joint"])
def test_run_evaluation_checks_every_length_before_generating(world, tmp_path, misfit):
    """One over-long prompt in the last task, or in a composite set (asked as turns or at once):
    run_evaluation names the task or file before generating anything (generation checks each batch
    only when it reaches it, the longest last)."""
    from meteora_jax import evaluate as ev

    w, params, config, names, tok = world
    data = tmp_path / "data"
    for task in names:
        (data / task).mkdir(parents=True)
        write_jsonl(data / task / "test.jsonl", read_jsonl(os.path.join(w.data_root, task, "test.jsonl"))[:3])
    composite = str(tmp_path / "c2.jsonl")
    records = ev.build_composite_file(str(data), names, 2, 3, composite, seed=2)
    long_prompt = " ".join(["9 + 9"] * 60)
    if misfit == "task":
        write_jsonl(data / names[-1] / "test.jsonl", [{"prompt": long_prompt, "response": "18"}])
    else:
        key = "prompts" if misfit == "turns" else "prompt"
        records[1][key] = [records[1]["prompts"][0], long_prompt] if misfit == "turns" else long_prompt
        write_jsonl(composite, records)
    limit = len(encode_prompt(tok, long_prompt)) + 2  # every other prompt fits with room
    gen = Generator(dataclasses.replace(config, max_position_embeddings=limit), params,
                    eos_token_ids=eos_ids_of(tok), pad_token_id=tok.pad_token_id)
    gen.generate = lambda *a, **k: pytest.fail("generated before refusing")
    expect = {"task": rf"task {names[-1]}, record 1: prompt of {limit - 2} tokens \+ max_new_tokens=6 exceeds",
              "turns": rf"{composite}: composite sample 2: its 2 chained turns can reach",
              "joint": rf"{composite}, record 2: prompt of {limit - 2} tokens \+ max_new_tokens=6 exceeds"}[misfit]
    with pytest.raises(ValueError, match=expect):
        ev.run_evaluation(gen, tok, data_root=str(data), composite_files=[composite], max_new_tokens=6,
                          composite_mode="joint" if misfit == "joint" else "turns", output=str(tmp_path / "r.json"))
    assert not (tmp_path / "r.json").exists()


def test_composite_sets_of_one_n_keep_their_own_results(world, tmp_path, capsys):
    """Three composite-2 files: each keeps its results (the third overwrote the second's), and the
    results file is written whole (no .partial left). A progress bar counts every answer (3 sets x
    2 samples x 2 turns): the evaluation showed nothing until its table."""
    w, params, config, names, tok = world
    from meteora_jax.evaluate import build_composite_file, run_evaluation

    paths = []
    for i in range(3):
        (tmp_path / f"x{i}").mkdir()
        paths.append(str(tmp_path / f"x{i}" / "c.jsonl"))
        build_composite_file(w.data_root, names, 2, 2, paths[-1], seed=i)
    gen = Generator(config, params, eos_token_ids=eos_ids_of(tok), pad_token_id=tok.pad_token_id)
    out = tmp_path / "r.json"
    results = run_evaluation(gen, tok, composite_files=paths, max_new_tokens=3, batch_size=2, output=str(out))
    assert list(results["composite"]) == ["composite-2", "composite-2#2", "composite-2#3"]
    assert [r["file"] for r in results["composite"].values()] == paths
    assert json.loads(out.read_text())["composite"].keys() == results["composite"].keys()
    assert sorted(os.listdir(tmp_path)) == ["r.json", "x0", "x1", "x2"]
    last_update = capsys.readouterr().err.split("\r")[-1]
    assert "evaluate: 100%" in last_update and "12/12" in last_update, last_update


def test_routing_temperatures_reach_the_generator(world, tmp_path, monkeypatch):
    """The single tasks generate at routing_temperature, the composite sets at composite_temperature
    (dropping either on its way to `Generator.generate` went unnoticed: every other test uses 1)."""
    w, params, config, names, tok = world
    from meteora_jax.evaluate import build_composite_file, run_evaluation

    gen = Generator(config, params, eos_token_ids=eos_ids_of(tok), pad_token_id=tok.pad_token_id)
    seen = []
    real = gen.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("routing_temperature"))
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate", spy)
    path = str(tmp_path / "c.jsonl")
    build_composite_file(w.data_root, names, 2, 2, path, seed=0)
    run_evaluation(gen, tok, data_root=w.data_root, tasks=[names[0]], composite_files=[path], max_samples=2,
                   batch_size=2, max_new_tokens=2, routing_temperature=7.0, composite_temperature=11.0, progress=False)
    assert seen[0] == 7.0 and set(seen) == {7.0, 11.0}, seen


def test_oracle_single_tasks_equal_forcing_each_task(world):
    w, params, config, names, tok = world
    from meteora_jax.evaluate import run_evaluation

    gen = Generator(config, params, eos_token_ids=eos_ids_of(tok), pad_token_id=tok.pad_token_id)
    kw = dict(data_root=w.data_root, max_samples=4, batch_size=4, max_new_tokens=6, metrics={t: "bleu" for t in names})
    oracle = run_evaluation(gen, tok, adapter_for_task={n: i for i, n in enumerate(names)}, **kw)
    assert oracle["settings"]["oracle"] is True
    for i, task in enumerate(names):
        alone = run_evaluation(gen, tok, tasks=[task], force_adapter=i, **kw)["tasks"][task]
        assert oracle["tasks"][task]["score"] == pytest.approx(alone["score"])
        assert [e["prediction"] for e in oracle["tasks"][task]["examples"]] == [
            e["prediction"] for e in alone["examples"]
        ]
    with pytest.raises(ValueError, match="no adapter named after task"):
        run_evaluation(gen, tok, adapter_for_task={names[0]: 0}, **kw)


def test_turns_mode_needs_sub_prompts(world):
    _, params, config, _, tok = world
    from meteora_jax.evaluate import evaluate_composite_records

    gen = Generator(config, params, eos_token_ids=eos_ids_of(tok), pad_token_id=tok.pad_token_id)
    old_format = [{"prompt": "1. a\n2. b", "response": "x@@@@\ny", "tasks": ["arith", "reverse"]}]
    with pytest.raises(ValueError, match="record 1 has no 'prompts'"):
        evaluate_composite_records(gen, tok, old_format, lambda t: "accuracy")
    res = evaluate_composite_records(gen, tok, old_format, lambda t: "accuracy", mode="joint", max_new_tokens=4)
    assert res["mode"] == "joint" and res["num_samples"] == 1


def test_evaluate_script_rejects_oracle_with_force(tiny_inference_world, tmp_path, capsys):
    w = tiny_inference_world
    script = runpy.run_path(os.path.join(REPO, "scripts", "evaluate.py"), run_name="cli_script")
    argv = ["--checkpoint", w.model, "--tokenizer", w.tokenizer, "--data-root", w.data_root, "--oracle",
            "--force-adapter", "0", "--output", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as e:
        script["main"](argv)
    assert e.value.code == 2
    assert "--oracle and --force-adapter exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
