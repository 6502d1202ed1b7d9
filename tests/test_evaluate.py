"""meteora_jax.evaluate against hand computations and the libraries called directly."""

from __future__ import annotations

import json
import math
import random
import string

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from meteora_jax import evaluate as ev

HYP, REF = "the cat sat on the mat", "the cat sat on a mat"


def test_accuracy_exact_and_contains_by_hand():
    preds = ["  Paris \n", "the answer is LONDON", "rome", "Berlin"]
    refs = ["paris", "London", "Madrid", "berlin city"]
    assert ev.accuracy(preds, refs) == pytest.approx(1 / 4)  # only "Paris"
    assert ev.accuracy(preds, refs, mode="contains") == pytest.approx(2 / 4)  # + "... LONDON"
    assert math.isnan(ev.accuracy([], []))
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        ev.accuracy(["a", "b"], ["a"])


def test_bleu_by_hand_and_against_sacrebleu():
    # n-gram precisions of HYP vs REF: 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty.
    by_hand = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert ev.corpus_bleu([HYP], [REF]) == pytest.approx(by_hand, abs=1e-6)
    assert ev.sentence_bleu(HYP, HYP) == pytest.approx(100.0)
    preds = [HYP, "a dog barked loudly at night", "hello there"]
    refs = [REF, "the dog barked at night", "hello there friend"]
    # A reference of four tokens or more: sacrebleu's default corpus BLEU.
    assert ev.corpus_bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, abs=1e-9)
    # Exact answers shorter than four words: 100 (sacrebleu's default order 4 scored them 0).
    short = ["naeco duolc wodniw", "891", "esroh enots"]
    assert ev.corpus_bleu(short, short) == pytest.approx(100.0)
    assert sacrebleu.corpus_bleu(short, [short]).score == 0.0
    # References of at most 3 tokens: orders 1-3. Precisions 5/6, 3/4, 1/2; 6 words against 5, no penalty.
    by_hand = 100 * (5 / 6 * 3 / 4 * 1 / 2) ** (1 / 3)
    assert ev.corpus_bleu(["the cat sat down", "a dog"], ["the cat sat", "a dog"]) == pytest.approx(by_hand, abs=1e-6)
    # Answers cut to three words against seven-word references: the references' order 4, so 0, as
    # sacrebleu scores it (sacrebleu's effective_order followed the answers down to order 3: 26.4).
    cut, full = ["the cat sat", "a dog ran"], ["the cat sat on the red mat", "a dog ran to the old barn"]
    assert ev.corpus_bleu(cut, full) == pytest.approx(sacrebleu.corpus_bleu(cut, [full]).score, abs=1e-9)
    assert ev.corpus_bleu(cut, full) < 1e-6 < sacrebleu.metrics.BLEU(effective_order=True).corpus_score(cut, [full]).score
    for p, r in zip(preds, refs):
        assert ev.sentence_bleu(p, r) == pytest.approx(sacrebleu.sentence_bleu(p, [r]).score, abs=1e-9)


def test_composite_file_part_count_must_match_its_tasks(tmp_path):
    """A reference with fewer '@@@@' parts than tasks: the missing part was scored as "" (an empty
    answer then counted as right)."""
    from meteora_jax.data import DataError, read_composite_jsonl, write_jsonl

    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"prompt": "p", "response": "1@@@@\nx", "tasks": ["a", "b"]},
                       {"prompt": "q", "response": "1@@@@\nx", "tasks": ["a", "b", "c"]}])
    with pytest.raises(DataError, match=r"c.jsonl:2: field 'response' holds 2 answer\(s\) separated by '@@@@', "
                                        r"field 'tasks' names 3"):
        read_composite_jsonl(path)


def test_rouge_by_hand_and_against_rouge_score():
    got = ev.rouge([HYP], [REF])
    # unigrams: 5 of 6 match both ways; bigrams: 3 of 5; LCS "the cat sat on mat": 5 of 6.
    assert got == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6}, abs=1e-9)
    preds = [HYP, "a quick brown dog", "nothing in common"]
    refs = [REF, "the quick brown fox", "totally different words"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    direct = [scorer.score(r, p) for p, r in zip(preds, refs)]
    got = ev.rouge(preds, refs)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert got[k] == pytest.approx(sum(d[k].fmeasure for d in direct) / 3, abs=1e-12)
    # Precision and recall differ here, so the F-measure (not either) must be what is returned.
    asym = ev.rouge(["the cat"], ["the cat sat down"])["rouge1"]
    assert asym == pytest.approx(2 * 1.0 * 0.5 / 1.5)


def _random_ascii_text(rng):
    """Words (random letters and digits, or English words with suffixes the stemmer strips) in random
    case, joined by runs of ASCII punctuation, whitespace and "_"."""
    english = ["running", "cats", "generations", "happily", "agreed", "the", "on", "studies", "connected"]
    separators = string.punctuation + string.whitespace + "_"
    parts = []
    for _ in range(rng.randrange(0, 12)):
        word = rng.choice(english) if rng.random() < 0.5 else "".join(
            rng.choices(string.ascii_letters + string.digits, k=rng.randrange(1, 9)))
        word = "".join(c.upper() if rng.random() < 0.2 else c for c in word)
        parts.append(word + "".join(rng.choices(separators, k=rng.randrange(1, 3))))
    return "".join(parts)


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_tokenizer_equals_rouge_score_default_on_ascii(use_stemmer):
    """On ASCII text, tokens and scores are exactly rouge-score's own (fresh random texts each run)."""
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    stock = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    ours = ev.RougeTokenizer(use_stemmer)
    preds, refs = [], []
    for _ in range(200):
        p, r = _random_ascii_text(rng), _random_ascii_text(rng)
        assert ours.tokenize(p) == stock._tokenizer.tokenize(p), f"seed {seed}: {p!r}"
        preds.append(p)
        refs.append(r if rng.random() < 0.5 else p[: len(p) // 2] + r)  # some overlap
    direct = [stock.score(r, p) for p, r in zip(preds, refs)]
    expect = {k: sum(d[k].fmeasure for d in direct) / len(direct) for k in ("rouge1", "rouge2", "rougeL")}
    assert ev.rouge(preds, refs, use_stemmer=use_stemmer) == expect, f"seed {seed}"


def test_rouge_tokenizer_tokens():
    tok = ev.RougeTokenizer()
    assert tok.tokenize("Hello, 世界! Été_2") == ["hello", "世", "界", "été", "2"]
    assert tok.tokenize("こんにちは、カナ。한국") == ["こ", "ん", "に", "ち", "は", "カ", "ナ", "한", "국"]
    assert tok.tokenize("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]  # vowel signs and virama stay in their word
    assert tok.tokenize("e\u0301te\u0301 ＡＢＣ１２") == ["été", "abc12"]  # NFKC: composed accents, ASCII width
    stem = ev.RougeTokenizer(use_stemmer=True)
    assert stem.tokenize("Running générations приветствия cats") == ["run", "génération", "приветствия", "cat"]


@pytest.mark.parametrize("text", ["今天天气很好", "こんにちは世界", "привет мир", "γεια σου κόσμε",
                                  "مرحبا بالعالم", "नमस्ते दुनिया", "안녕하세요 세계"])
def test_rouge_identical_non_latin_is_one(text):
    """rouge-score's default tokenizer drops every non-[a-z0-9] character: these all scored 0."""
    assert ev.rouge([text], [text]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


@pytest.mark.parametrize(
    "pred, ref, expect",
    [
        # one token per character: 我 喜 欢 猫 / 我 很 喜 欢 狗; unigrams 3 shared: P 3/4, R 3/5;
        # bigrams 喜欢 only: P 1/3, R 1/4; LCS 我喜欢 = 3.
        ("我喜欢猫", "我很喜欢狗", {"rouge1": 2 / 3, "rouge2": 2 / 7, "rougeL": 2 / 3}),
        # 今 天 天 气 很 好 / 今 天 天 气 不 错: 4 of 6 (天 twice), bigrams 3 of 5, LCS 今天天气.
        ("今天天气很好", "今天天气不错", {"rouge1": 2 / 3, "rouge2": 3 / 5, "rougeL": 2 / 3}),
        # case-folded Cyrillic: 3 of 4 words, bigrams "на ковре" 1 of 3, LCS 3.
        ("Кошка сидит на ковре.", "кошка сидела на ковре", {"rouge1": 3 / 4, "rouge2": 1 / 3, "rougeL": 3 / 4}),
        # Greek (final sigma folded): P 3/3, R 3/4 -> 6/7; bigrams P 2/2, R 2/3 -> 4/5.
        ("Ο ΣΚΎΛΟΣ τρέχει", "ο σκύλος τρέχει γρήγορα", {"rouge1": 6 / 7, "rouge2": 4 / 5, "rougeL": 6 / 7}),
        # accents are letters: "été" != "ete", "café" != "cafe" (rouge-score saw "t" / "ete", "caf" / "cafe").
        ("été", "ete", {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}),
        ("café crème", "cafe crème", {"rouge1": 1 / 2, "rouge2": 0.0, "rougeL": 1 / 2}),
        # rouge-score made both "na ve caf" and scored a false 1.0.
        ("naïve café", "na ve caf", {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}),
    ],
)
def test_rouge_non_latin_by_hand(pred, ref, expect):
    assert ev.rouge([pred], [ref]) == pytest.approx(expect, abs=1e-12, rel=0)


@pytest.mark.parametrize(
    "text, n, expect",
    [
        ("a@@@@\nb@@@@\nc", None, ["a", "b", "c"]),
        ("  a \n@@@@\n\n b  @@@@ c\n", None, ["a", "b", "c"]),
        ("a@@@@\nb@@@@\n", None, ["a", "b"]),  # trailing separator: no empty part
        ("a@@@@b", 4, ["a", "b", "", ""]),  # too few parts: padded
        ("a@@@@b@@@@c@@@@d", 2, ["a", "b"]),  # too many: truncated
        ("", 2, ["", ""]),
        ("just one answer", None, ["just one answer"]),
        ("@@@@\nb@@@@\nc", 3, ["", "b", "c"]),  # exactly n - 1 separators: an empty first part keeps its place
        ("a@@@@\n@@@@\n", 3, ["a", "", ""]),
        ("@@@@\nb@@@@\nc", None, ["b", "c"]),  # n unknown: a leading separator makes no part
    ],
)
def test_split_composite(text, n, expect):
    assert ev.split_composite(text, n) == expect


def test_score_composite_keeps_turn_answers_in_place(monkeypatch):
    """Chained turns are scored from their answer lists: an empty first answer, or one that holds the
    separator itself, leaves every later answer with its own sub-task (they moved up one before)."""
    tasks = [["arith", "reverse", "shout"]] * 2
    refs = ["4@@@@\ngod pmal@@@@\nQUIET RIVER!"] * 2
    answers = [["", "god pmal", "QUIET RIVER!"], ["4 @@@@ 5", "god pmal", "QUIET RIVER!"]]
    res = ev.score_composite(answers, refs, tasks, lambda t: "accuracy")
    assert {t: r["score"] for t, r in res["per_task"].items()} == {"arith": 0.0, "reverse": 1.0, "shout": 1.0}

    # evaluate_composite_records passes generate_chained's lists on (its generation stubbed here).
    monkeypatch.setattr(ev, "generate_chained", lambda *a, **k: answers)
    records = [{"prompt": "1. 2+2\n2. lamp dog\n3. quiet river", "response": refs[0], "tasks": tasks[0],
                "prompts": ["2+2", "lamp dog", "quiet river"]}] * 2
    res = ev.evaluate_composite_records(None, None, records, lambda t: "accuracy", max_new_tokens=4)
    assert {t: r["score"] for t, r in res["per_task"].items()} == {"arith": 0.0, "reverse": 1.0, "shout": 1.0}
    assert res["examples"][0]["prediction"] == "@@@@\ngod pmal@@@@\nQUIET RIVER!"
    assert res["examples"][1]["answers"] == answers[1]


def test_score_composite_hand_made():
    tasks = [["qa", "mt"], ["mt", "qa"], ["qa", "mt"]]
    refs = [
        "Paris@@@@\nthe cat sat on a mat",
        "hello there friend@@@@\nblue",
        "42@@@@\nthe dog barked at night",
    ]
    preds = [
        "paris @@@@ the cat sat on the mat",
        "hello there@@@@\nBlue\n",
        "41",  # the model stopped after one answer: the mt part is scored as ""
    ]
    res = ev.score_composite(preds, refs, tasks, {"qa": "accuracy", "mt": "bleu"})
    assert res["per_task"]["qa"] == {"metric": "accuracy", "score": pytest.approx(2 / 3), "count": 3}
    mt_bleu = sacrebleu.corpus_bleu(
        [HYP, "hello there", ""], [["the cat sat on a mat", "hello there friend", "the dog barked at night"]]
    ).score
    assert res["per_task"]["mt"]["score"] == pytest.approx(mt_bleu, abs=1e-9)
    assert res["per_task"]["mt"]["count"] == 3
    assert res["average"] == pytest.approx((2 / 3 + mt_bleu) / 2)
    assert res["average_by_metric"] == pytest.approx({"accuracy": 2 / 3, "bleu": mt_bleu})
    assert res["n"] == 2 and res["num_samples"] == 3
    assert json.loads(json.dumps(res)) == res  # plain JSON types only

    table = ev.format_table(res)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "metric", "score", "count"]
    assert any(line.split()[:3] == ["qa", "accuracy", f"{2 / 3:.4f}"] for line in lines)
    assert lines[-1].split()[:2] == ["average", f"{(2 / 3 + mt_bleu) / 2:.4f}"]


def test_evaluate_task_and_table_for_single_tasks():
    results = {
        "qa": ev.evaluate_task(["Paris", "Rome"], ["paris", "Madrid"], "accuracy"),
        "sum": ev.evaluate_task([HYP], [REF], "rouge2"),
    }
    assert results["qa"]["score"] == pytest.approx(0.5) and results["sum"]["score"] == pytest.approx(0.6)
    text = ev.format_table(results)
    assert "0.5000" in text and "0.6000" in text and "rouge2" in text
    with pytest.raises(ValueError, match="unknown metric"):
        ev.evaluate_task(["a"], ["a"], "meteor")


@pytest.mark.parametrize("bad", ["task", "composite"])
def test_run_evaluation_validates_every_file_before_generating(tmp_path, bad):
    """A malformed task or composite file (the last one read) stops the evaluation before any
    generation, with the file and line, and nothing is written."""
    from meteora_jax.data import DataError, write_jsonl

    class NoGeneration:
        def __getattr__(self, name):
            raise AssertionError(f"generator.{name} used before every input file was validated")

    good = [{"prompt": "1+1=", "response": "2"}, {"prompt": "2+2=", "response": "4"}]
    for task in ("a_task", "z_task"):
        (tmp_path / "data" / task).mkdir(parents=True)
        write_jsonl(tmp_path / "data" / task / "test.jsonl", good)
    composite = tmp_path / "composite.jsonl"
    write_jsonl(composite, [{"prompt": "1+1= @@@@ 2+2=", "response": "2@@@@\n4", "tasks": ["a_task", "z_task"]}])
    broken = tmp_path / "data" / "z_task" / "test.jsonl" if bad == "task" else composite
    with open(broken, "a") as f:
        f.write('{"prompt": "3+3="}\n')
    with pytest.raises(DataError, match=rf"{broken.name}:\d+: missing field 'response'"):
        ev.run_evaluation(NoGeneration(), NoGeneration(), data_root=str(tmp_path / "data"),
                          composite_files=[str(composite)], routing_pictures=str(tmp_path / "pics"),
                          adapter_names=["a_task", "z_task"], output=str(tmp_path / "out" / "r.json"))
    assert not (tmp_path / "pics").exists() and not (tmp_path / "out").exists()


def test_oracle_without_adapters_is_refused_before_generation(tmp_path):
    """adapter_for_task == {} (a checkpoint without adapters): one ValueError naming the tasks, not a
    KeyError after the files were read."""
    from meteora_jax.data import write_jsonl

    class NoGeneration:
        def __getattr__(self, name):
            raise AssertionError(f"generator.{name} used before the oracle was checked")

    (tmp_path / "arith").mkdir()
    write_jsonl(tmp_path / "arith" / "test.jsonl", [{"prompt": "1+1=", "response": "2"}])
    with pytest.raises(ValueError, match=r"oracle routing: no adapter named after task\(s\) \['arith'\]"):
        ev.run_evaluation(NoGeneration(), NoGeneration(), data_root=str(tmp_path), adapter_for_task={})


def _evaluate_main():
    import os
    import runpy

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "evaluate.py")
    return runpy.run_path(script, run_name="cli_script")["main"]


def _task_root(root, with_test=("arith", "reverse", "shout"), without_test=("notes",)):
    """A data root: folders with a 3-record test.jsonl, and folders holding only a train.jsonl."""
    from meteora_jax.data import write_jsonl

    for task in (*with_test, *without_test):
        (root / task).mkdir(parents=True)
        recs = [{"prompt": f"{task} {i}", "response": f"{task} answer {i}"} for i in range(3)]
        write_jsonl(root / task / ("test.jsonl" if task in with_test else "train.jsonl"), recs)
    return root


def test_build_composite_uses_only_the_selected_tasks(tmp_path, capsys):
    """--tasks with --build-composite composes just those tasks: the other folders of the data root
    (real tasks, or folders without test.jsonl) are no error, as in the single-task evaluation."""
    from meteora_jax.data import read_composite_jsonl

    main, data, out = _evaluate_main(), _task_root(tmp_path / "data"), tmp_path / "out"
    build = ["--data-root", str(data), "--build-composite", "2", "--composite-samples", "10", "--build-only"]
    assert main(build + ["--tasks", "arith,reverse", "--composite-out", str(out / "c2.jsonl")]) == 0
    records = read_composite_jsonl(out / "c2.jsonl")
    assert len(records) == 10 and all(sorted(r["tasks"]) == ["arith", "reverse"] for r in records)

    # No --tasks: every folder with a test.jsonl; "notes" (train.jsonl only) is skipped.
    assert main(build + ["--composite-out", str(out / "all.jsonl")]) == 0
    assert {t for r in read_composite_jsonl(out / "all.jsonl") for t in r["tasks"]} == {"arith", "reverse", "shout"}

    # A selected task without test.jsonl: one line naming that file, nothing written.
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(build + ["--tasks", "arith,notes", "--composite-out", str(out / "bad.jsonl")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"{data / 'notes' / 'test.jsonl'}: no such file" in err
    assert not (out / "bad.jsonl").exists()

    # Several n, one too large for the tasks: refused before the first set is written.
    with pytest.raises(SystemExit) as e:
        main(["--data-root", str(data), "--build-composite", "2", "--build-composite", "4", "--build-only",
              "--composite-out", str(out / "multi")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--build-composite 4: composite-n needs 1 <= n <= the 3 tasks" in err
    assert not (out / "multi").exists()


def test_metric_spec_rejects_unknown_task(tmp_path, capsys):
    """A --metrics key that names no task is rejected like an unknown metric (it used to leave the
    misspelt task on the default metric without a word), before anything is written."""
    assert ev.parse_metric_spec({"arith": "bleu"}, tasks=["arith"]) == {"arith": "bleu"}
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['arth'\]; known tasks: \['arith', 'reverse'\]"):
        ev.parse_metric_spec('{"arth": "bleu"}', tasks=["reverse", "arith"])

    main, data, out = _evaluate_main(), _task_root(tmp_path / "data"), tmp_path / "out"
    build = ["--data-root", str(data), "--build-composite", "2", "--build-only", "--composite-out", str(out / "c2.jsonl")]
    with pytest.raises(SystemExit) as e:
        main(build + ["--metrics", json.dumps({"arth": "bleu", "reverse": "bleu"})])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "unknown task(s) ['arth']; known tasks: ['arith', 'reverse', 'shout']" in err
    assert not out.exists()

    # A task left out by --tasks, or one only a composite file holds, is a known task.
    composite = tmp_path / "c.jsonl"
    composite.write_text(json.dumps({"prompt": "1. a\n2. b", "response": "x@@@@\ny", "tasks": ["qa", "mt"]}) + "\n")
    metrics = json.dumps({"shout": "rougeL", "qa": "accuracy"})
    assert main(build + ["--tasks", "arith,reverse", "--composite", str(composite), "--metrics", metrics]) == 0
