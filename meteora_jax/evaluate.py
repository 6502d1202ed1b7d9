"""Task and composite-n metrics (issue 6 point 3), and the generation-driven evaluation loop.

The metric functions are pure Python over strings (no model, no jax). The loop at the bottom
(`run_evaluation`, `evaluate_records`, `evaluate_composite_records`, `build_composite_file`)
generates answers with a `meteora_jax.generate.Generator` and scores them with those metrics.

Scales are the libraries' own: accuracy and ROUGE in [0, 1], BLEU in [0, 100] (sacrebleu).
Results are plain dicts of str/float/int (JSON-serialisable):

    single task:  {"metric": "bleu", "score": 41.2, "count": 200}
    composite:    {"per_task": {task: <single-task result>}, "average": float,
                   "average_by_metric": {metric: float}, "num_samples": int, "n": int | None}
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sacrebleu
from nltk.stem import porter
from rouge_score import rouge_scorer

from meteora_jax.files import written_whole

__all__ = [
    "METRICS",
    "accuracy",
    "bleu",
    "contains_match",
    "corpus_bleu",
    "COMPOSITE_TEMPERATURES",
    "build_composite_file",
    "evaluate_composite_records",
    "evaluate_records",
    "evaluate_task",
    "exact_match",
    "format_results",
    "format_table",
    "generate_chained",
    "generate_texts",
    "parse_metric_spec",
    "run_evaluation",
    "rouge",
    "RougeTokenizer",
    "score_composite",
    "sentence_bleu",
    "split_composite",
    "tasks_with_split",
]

_SEPARATOR_RE = re.compile(r"\s*@@@@\s*")


def _norm(text: str) -> str:
    return text.strip().casefold()


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after stripping surrounding whitespace, case-insensitive."""
    return _norm(prediction) == _norm(reference)


def contains_match(prediction: str, reference: str) -> bool:
    """The (stripped, case-folded) reference occurs inside the prediction."""
    return _norm(reference) in _norm(prediction)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def accuracy(predictions: Sequence[str], references: Sequence[str], *, mode: str = "exact") -> float:
    """Fraction in [0, 1] of matches; `mode` "exact" or "contains". Empty input -> nan."""
    _check_pairs(predictions, references)
    match = {"exact": exact_match, "contains": contains_match}.get(mode)
    if match is None:
        raise ValueError(f"mode={mode!r} must be 'exact' or 'contains'")
    if not predictions:
        return math.nan
    return sum(match(p, r) for p, r in zip(predictions, references)) / len(predictions)


def sentence_bleu(prediction: str, reference: str) -> float:
    """sacrebleu sentence BLEU in [0, 100] (its default smoothing)."""
    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU in [0, 100], one reference per prediction, over the n-gram orders 1 to
    min(4, the longest reference's length in sacrebleu's tokens). References all shorter than four
    tokens (short answers) are scored over the orders they have, where sacrebleu's fixed order 4 scores
    even exact answers 0. Otherwise this is sacrebleu's default corpus BLEU. The order follows the
    references alone, so answers cut short are not scored over fewer orders (sacrebleu's
    `effective_order` follows the predictions: three-word answers to seven-word references then
    scored 26 instead of 0)."""
    _check_pairs(predictions, references)
    if not predictions:
        return math.nan
    tokenize = sacrebleu.metrics.BLEU().tokenizer
    longest = max(len(tokenize(reference).split()) for reference in references)
    bleu = sacrebleu.metrics.BLEU(max_ngram_order=min(4, max(1, longest)))
    return float(bleu.corpus_score(list(predictions), [list(references)]).score)


bleu = corpus_bleu


# Characters that are ROUGE tokens on their own: ideographs and kana (written without spaces
# between words) and Hangul syllables (by syllable, as Korean ROUGE is commonly scored).
_UNSPACED = ("CJK ", "IDEOGRAPHIC ", "HIRAGANA", "KATAKANA", "HANGUL SYLLABLE")


class RougeTokenizer:
    """ROUGE tokens of any script, for rouge-score's `RougeScorer(tokenizer=...)`: str -> list[str].

    The text is NFKC-normalised and case-folded; a token is a run of letters, digits and combining
    marks (any other character, "_" included, separates tokens), except that each CJK ideograph,
    kana or Hangul syllable is a token of its own: "Hello, 世界! Été_2" -> ["hello", "世", "界", "été", "2"].
    Other scripts written without spaces (Thai, Lao, Khmer, Burmese) stay one token per phrase.
    With `use_stemmer`, Latin-script tokens longer than 3 characters are Porter-stemmed. On ASCII
    text the tokens are those of rouge-score's default tokenizer, stemmed or not.
    """

    def __init__(self, use_stemmer: bool = False):
        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        chars = []
        for c in unicodedata.normalize("NFKC", text).casefold():
            if unicodedata.category(c)[0] not in "LNM":
                c = " "
            elif not c.isascii() and unicodedata.name(c, "").startswith(_UNSPACED):
                c = f" {c} "
            chars.append(c)
        tokens = "".join(chars).split()
        if self._stemmer is not None:
            tokens = [self._stemmer.stem(t) if len(t) > 3 and _is_latin(t) else t for t in tokens]
        return tokens


def _is_latin(token: str) -> bool:
    return all(c.isascii() or unicodedata.name(c, "").startswith("LATIN") for c in token)


@functools.lru_cache(maxsize=4)
def _scorer(use_stemmer: bool) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=RougeTokenizer(use_stemmer))


def rouge(
    predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False
) -> dict[str, float]:
    """Mean F-measure of ROUGE-1/2/L (rouge-score, sentence level) -> {"rouge1","rouge2","rougeL"}.

    Tokens are `RougeTokenizer`'s: rouge-score's default keeps only [a-z0-9], so answers in other
    scripts scored 0; on ASCII text the scores are rouge-score's own."""
    _check_pairs(predictions, references)
    keys = ("rouge1", "rouge2", "rougeL")
    if not predictions:
        return {k: math.nan for k in keys}
    sums = dict.fromkeys(keys, 0.0)
    for p, r in zip(predictions, references):
        scores = _scorer(use_stemmer).score(r, p)  # rouge-score's order: (target, prediction)
        for k in keys:
            sums[k] += scores[k].fmeasure
    return {k: v / len(predictions) for k, v in sums.items()}


# name -> corpus-level metric over (predictions, references)
METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "accuracy": functools.partial(accuracy, mode="exact"),
    "accuracy_contains": functools.partial(accuracy, mode="contains"),
    "bleu": corpus_bleu,
    "rouge1": lambda p, r: rouge(p, r)["rouge1"],
    "rouge2": lambda p, r: rouge(p, r)["rouge2"],
    "rougeL": lambda p, r: rouge(p, r)["rougeL"],
}


def evaluate_task(predictions: Sequence[str], references: Sequence[str], metric: str) -> dict[str, Any]:
    """One task's score under a metric of METRICS -> {"metric", "score", "count"}."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    return {"metric": metric, "score": METRICS[metric](predictions, references), "count": len(predictions)}


def split_composite(text: str, n: int | None = None) -> list[str]:
    """Splits a composite answer on "@@@@" (any whitespace around it), parts stripped.

    With exactly n - 1 separators the n parts are taken as they are, empty ones included (an empty
    first answer keeps its place). Otherwise a separator at the very start or end makes no empty
    part, and with `n` the parts are padded with "" or truncated to exactly n (a model may emit
    fewer or more answers than asked).
    """
    body = _SEPARATOR_RE.sub("@@@@", text.strip())
    if n is not None and n > 1 and body.count("@@@@") == n - 1:
        return [p.strip() for p in body.split("@@@@")]
    body = body.removeprefix("@@@@").removesuffix("@@@@")
    parts = [p.strip() for p in body.split("@@@@")] if body.strip() else [""]
    if n is not None:
        parts = (parts + [""] * n)[:n]
    return parts


def score_composite(
    predictions: Sequence[str | Sequence[str]],
    references: Sequence[str],
    tasks: Sequence[Sequence[str]],
    metric_for_task: Mapping[str, str] | Callable[[str], str],
) -> dict[str, Any]:
    """Scores composite answers per sub-task.

    predictions: per sample, one composite string (split on "@@@@", as a model answering all
    sub-prompts at once writes it) or the list of its answers (chained turns: taken as they are,
    so an empty answer or one holding "@@@@" keeps its place); references: one composite string per
    sample; tasks[i]: sub-task names of sample i, in answer order. Both are cut into len(tasks[i])
    parts, and each sub-task's metric (from `metric_for_task`) is computed over all its parts across
    samples.
    "average" is the unweighted mean over sub-tasks (mixing scales if metrics differ; see
    "average_by_metric" for one mean per metric).
    """
    if not len(predictions) == len(references) == len(tasks):
        raise ValueError(
            f"lengths differ: {len(predictions)} predictions, {len(references)} references, "
            f"{len(tasks)} task lists"
        )
    get_metric = metric_for_task.__getitem__ if isinstance(metric_for_task, Mapping) else metric_for_task
    preds: dict[str, list[str]] = {}
    refs: dict[str, list[str]] = {}
    for pred, ref, names in zip(predictions, references, tasks):
        n = len(names)
        pred_parts = split_composite(pred, n) if isinstance(pred, str) else ([p.strip() for p in pred] + [""] * n)[:n]
        for task, p, r in zip(names, pred_parts, split_composite(ref, n)):
            preds.setdefault(task, []).append(p)
            refs.setdefault(task, []).append(r)
    per_task = {t: evaluate_task(preds[t], refs[t], get_metric(t)) for t in sorted(preds)}
    by_metric: dict[str, list[float]] = {}
    for res in per_task.values():
        by_metric.setdefault(res["metric"], []).append(res["score"])
    scores = [res["score"] for res in per_task.values()]
    sizes = {len(t) for t in tasks}
    return {
        "per_task": per_task,
        "average": sum(scores) / len(scores) if scores else math.nan,
        "average_by_metric": {m: sum(v) / len(v) for m, v in by_metric.items()},
        "num_samples": len(predictions),
        "n": sizes.pop() if len(sizes) == 1 else None,
    }


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text table of {task: {"metric", "score", "count"}} or of a score_composite result."""
    per_task = results.get("per_task", results)
    rows = [("task", "metric", "score", "count")]
    for task, res in per_task.items():
        if isinstance(res, Mapping) and "score" in res:
            rows.append((str(task), str(res.get("metric", "")), _fmt(res["score"]), _fmt(res.get("count", ""))))
    if "average" in results:
        rows.append(("average", "", _fmt(results["average"]), _fmt(results.get("num_samples", ""))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Generation-driven evaluation (the model side; jax and the data module are imported lazily so the
# metric functions above stay importable without them).

# Routing temperatures the original uses for composite-n prompts (n -> T).
COMPOSITE_TEMPERATURES = {3: 15.0, 5: 20.0, 10: 30.0}


def parse_metric_spec(
    spec: str | Mapping[str, str] | None, *, tasks: Sequence[str] | None = None
) -> dict[str, str]:
    """A task -> metric mapping from a dict, a JSON string, or the path of a JSON file.

    Every metric must be a key of METRICS; "" or None gives {}. With `tasks`, every key must also be
    one of them: a misspelt task would otherwise be scored with the default metric, silently.
    """
    import json

    if not spec:
        return {}
    if isinstance(spec, Mapping):
        mapping = dict(spec)
    elif os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            try:
                mapping = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"metric spec file {spec}: not valid JSON ({e.msg} at line {e.lineno})") from None
            except UnicodeDecodeError:
                raise ValueError(f"metric spec file {spec}: not UTF-8 text") from None
    elif not spec.lstrip().startswith("{"):  # a path, not inline JSON
        raise ValueError(f"metric spec file {spec}: no such file (or give a JSON object)")
    else:
        try:
            mapping = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"metric spec {spec!r} is neither a JSON object nor a JSON file: {e.msg}") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ValueError(f"metric spec must map task names to metric names, got {mapping!r}")
    unknown = {t: m for t, m in mapping.items() if m not in METRICS}
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    if tasks is not None:
        unknown_tasks = sorted(set(mapping) - set(tasks))
        if unknown_tasks:
            raise ValueError(
                f"metric spec names unknown task(s) {unknown_tasks}; known tasks: {sorted(set(tasks))}"
            )
    return mapping


def tasks_with_split(data_root: str, split: str = "test") -> list[str]:
    """The task folders of `data_root` that hold `<split>.jsonl`, sorted: the tasks evaluated (and
    composed) when none are named. A folder without that file is skipped, not an error."""
    return sorted(d for d in os.listdir(data_root) if os.path.isfile(os.path.join(data_root, d, f"{split}.jsonl")))


# The progress bar of the running `run_evaluation` (None outside one): every batch of answers moves it,
# wherever in the single-task or composite paths it was generated.
_PROGRESS: contextvars.ContextVar = contextvars.ContextVar("evaluation_progress", default=None)


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool):
    """A tqdm bar over `total` answers, installed as `_PROGRESS` for the `with` block."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="evaluate", unit="answer", disable=not enabled, dynamic_ncols=True) as bar:
        token = _PROGRESS.set(bar)
        try:
            yield bar
        finally:
            _PROGRESS.reset(token)


def _generate_batched(
    generator,
    tokenizer,
    encoded: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    routing_temperature: float = 1.0,
    force_adapter: int | None = None,
) -> list[str]:
    """Greedy answers (decoded, special tokens skipped, stripped) to token-id prompts, in order.

    Prompts are sorted by length into batches of exactly `batch_size` (the last one filled with
    repeats), so one compiled program per prompt-length bucket serves the whole set.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = [list(encoded[i]) for i in chunk]
        batch += [batch[0]] * (batch_size - len(batch))
        out = generator.generate(
            batch,
            max_new_tokens=max_new_tokens,
            routing_temperature=routing_temperature,
            force_adapter=force_adapter,
        )
        for i, seq in zip(chunk, out.sequences()):
            answers[i] = tokenizer.decode(seq, skip_special_tokens=True).strip()
        bar = _PROGRESS.get()
        if bar is not None:
            bar.update(len(chunk))
    return answers


def generate_texts(
    generator,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    chat_template: bool | None = None,
    routing_temperature: float = 1.0,
    force_adapter: int | None = None,
) -> list[str]:
    """Greedy answers to text prompts, in order (`generator`: a `meteora_jax.generate.Generator`)."""
    from meteora_jax.generate import encode_prompt

    encoded = [encode_prompt(tokenizer, p, chat_template=chat_template) for p in prompts]
    return _generate_batched(
        generator,
        tokenizer,
        encoded,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        routing_temperature=routing_temperature,
        force_adapter=force_adapter,
    )


def generate_chained(
    generator,
    tokenizer,
    sub_prompts: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    chat_template: bool | None = None,
    routing_temperature: float = 1.0,
    force_adapter: int | None = None,
    force_adapters: Sequence[Sequence[int]] | None = None,
) -> list[list[str]]:
    """Composite answers by chained turns: sample j's sub-prompts are asked one after another in one
    conversation, each answered (greedy, up to `max_new_tokens`) with every earlier prompt and the
    model's own earlier answers in context, so routing must switch adapters inside one sequence.
    Returns per sample its answers, one per turn.

    force_adapters[j][i]: the adapter that answers turn i of sample j (oracle routing per
    segment; the whole conversation is re-read with it); overrides `force_adapter`.
    """
    from meteora_jax.generate import encode_turns

    _check_chain_lengths(generator, tokenizer, sub_prompts, max_new_tokens, chat_template)
    answers: list[list[str]] = [[] for _ in sub_prompts]
    for turn in range(max((len(s) for s in sub_prompts), default=0)):
        active = [j for j, s in enumerate(sub_prompts) if turn < len(s)]
        groups: dict[int | None, list[int]] = {}
        for j in active:
            groups.setdefault(force_adapters[j][turn] if force_adapters else force_adapter, []).append(j)
        for forced, members in groups.items():
            encoded = [
                encode_turns(tokenizer, sub_prompts[j][: turn + 1], answers[j], chat_template=chat_template) for j in members
            ]
            texts = _generate_batched(
                generator,
                tokenizer,
                encoded,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                routing_temperature=routing_temperature,
                force_adapter=forced,
            )
            for j, text in zip(members, texts):
                answers[j].append(text)
    return answers


def _check_chain_lengths(generator, tokenizer, sub_prompts, max_new_tokens: int, chat_template) -> None:
    """ValueError naming the first sample whose conversation could outgrow the model's positions:
    its prompts and template, plus every turn's answer at max_new_tokens. Checked before the first
    turn, as a late turn would otherwise fail after every earlier one was generated. (An answer is
    decoded and encoded again for the next turn, which can, rarely, take a token or two more.)"""
    from meteora_jax.generate import encode_turns

    limit = generator.config.max_position_embeddings
    for j, prompts in enumerate(sub_prompts):
        if not prompts:
            continue
        asked = len(encode_turns(tokenizer, prompts, [""] * (len(prompts) - 1), chat_template=chat_template))
        worst = asked + len(prompts) * max_new_tokens
        if worst > limit:
            raise ValueError(
                f"composite sample {j + 1}: its {len(prompts)} chained turns can reach {worst} tokens ({asked} of "
                f"prompts and template, {len(prompts)} answers of up to max_new_tokens={max_new_tokens}), past the "
                f"model's max_position_embeddings={limit}; lower max_new_tokens or chain fewer tasks"
            )


def _auto_max_new_tokens(tokenizer, references: Sequence[str], margin: int = 8) -> int:
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=0)
    return longest + margin


def evaluate_records(
    generator,
    tokenizer,
    records: Sequence[Mapping[str, Any]],
    metric: str,
    *,
    max_new_tokens: int | None = None,
    num_examples: int = 3,
    **generate_kw,
) -> dict[str, Any]:
    """Generates answers to single-task records {"prompt", "response"} and scores them.

    Returns evaluate_task's {"metric", "score", "count"} plus "examples" (the first
    `num_examples` prompt / reference / prediction triples). max_new_tokens None: the longest
    reference in tokens + 8.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
    refs = [r["response"] for r in records]
    n_new = max_new_tokens or _auto_max_new_tokens(tokenizer, refs)
    preds = generate_texts(generator, tokenizer, [r["prompt"] for r in records], max_new_tokens=n_new, **generate_kw)
    result = evaluate_task(preds, refs, metric)
    result["examples"] = [
        {"prompt": r["prompt"], "reference": r["response"], "prediction": p}
        for r, p in zip(records[:num_examples], preds[:num_examples])
    ]
    return result


COMPOSITE_MODES = ("turns", "joint")


def save_chained_routing_picture(
    generator,
    tokenizer,
    record: Mapping[str, Any],
    answers: Sequence[str],
    stem: str,
    adapter_names: Sequence[str],
    *,
    max_new_tokens: int,
    chat_template: bool | None = None,
    routing_temperature: float = 1.0,
) -> list[str]:
    """Routing picture (PNG + HTML, `meteora_jax.viz`) of one composite sample answered in chained
    turns: the last turn is generated again with every earlier prompt and answer (`answers`, one per
    turn, as `generate_chained` returns them) in context, so the picture covers the whole
    conversation (prefill routing of the earlier turns, decode routing of the last answer), and the
    same of MixLoRA's experts where the model has them (`viz.save_routing_pictures`). Returns the
    paths."""
    from meteora_jax import viz
    from meteora_jax.generate import encode_turns

    subs = list(record["prompts"])
    ids = encode_turns(tokenizer, subs, list(answers)[: len(subs) - 1], chat_template=chat_template)
    out = generator.generate(
        [ids], max_new_tokens=max_new_tokens, routing_temperature=routing_temperature, return_routing=True
    )
    full = ids + [int(t) for t in out.tokens[0, : out.lengths[0]]]
    pieces = viz.token_pieces(tokenizer, full)
    title = f"top-1 adapter share per token; turns: {', '.join(record['tasks'])}"
    return viz.save_routing_pictures(
        stem, pieces, routing=out.routing[0] if out.routing else None, adapter_names=adapter_names,
        expert_routing=out.expert_routing[0] if out.expert_routing else None,
        num_experts=generator.config.mixlora.num_experts, prompt_length=len(ids), title=title)


def evaluate_composite_records(
    generator,
    tokenizer,
    records: Sequence[Mapping[str, Any]],
    metric_for_task: Mapping[str, str] | Callable[[str], str],
    *,
    mode: str = "turns",
    max_new_tokens: int | None = None,
    num_examples: int = 3,
    adapter_for_task: Mapping[str, int] | None = None,
    pictures: tuple[str, Sequence[str], int] | None = None,
    **generate_kw,
) -> dict[str, Any]:
    """Generates answers to composite records {"prompt", "response", "tasks"[, "prompts"]} and scores
    each sub-task (score_composite), plus "examples" ({"prompt", "reference", "tasks", "prediction"},
    and in turns mode "answers": the turns' answers apart).

    mode "turns": the sub-prompts ("prompts") are chained turns of one conversation
    (`generate_chained`); max_new_tokens applies per turn (default: longest sub-answer + 8).
    mode "joint": the numbered "prompt" is asked at once and the model must separate its answers
    with "@@@@" itself (the original's format; max_new_tokens default: longest answer + 8).
    adapter_for_task (turns mode): oracle routing, each turn answered by its task's adapter.
    pictures (turns mode, learned routing): (stem prefix, adapter names, count): routing pictures of
    the first `count` samples (`save_chained_routing_picture`), listed under "pictures".
    """
    from meteora_jax.data import COMPOSITE_SEPARATOR

    refs = [r["response"] for r in records]
    paths: list[str] = []
    prompts, n_new = _composite_prompts(tokenizer, records, mode, max_new_tokens)
    if mode == "turns":
        forced = None
        if adapter_for_task is not None:
            forced = [[adapter_for_task[t] for t in r["tasks"]] for r in records]
        preds = generate_chained(
            generator, tokenizer, prompts, max_new_tokens=n_new, force_adapters=forced, **generate_kw
        )
        if pictures and forced is None and generate_kw.get("force_adapter") is None:
            prefix, names, count = pictures
            for i, (r, answers) in enumerate(list(zip(records, preds))[:count]):
                paths += save_chained_routing_picture(
                    generator, tokenizer, r, answers, f"{prefix}_{i:02d}", names, max_new_tokens=n_new,
                    chat_template=generate_kw.get("chat_template"),
                    routing_temperature=generate_kw.get("routing_temperature", 1.0),
                )
            from meteora_jax import viz

            folder, name = os.path.split(prefix)
            viz.remove_earlier_routing_pictures(folder or ".", name + "_", min(count, len(records)), adapters=bool(names),
                                                experts=bool(generator.config.mixlora.num_experts))
    else:
        if adapter_for_task is not None:
            raise ValueError("oracle routing per segment needs mode 'turns'")
        preds = generate_texts(generator, tokenizer, prompts, max_new_tokens=n_new, **generate_kw)
    result = score_composite(preds, refs, [r["tasks"] for r in records], metric_for_task)
    result["mode"] = mode
    if paths:
        result["pictures"] = paths
    # Chained turns keep their answers apart too: a joined answer that holds "@@@@" cannot be split back.
    result["examples"] = [
        {"prompt": r["prompt"], "reference": r["response"], "tasks": list(r["tasks"]),
         "prediction": p if isinstance(p, str) else COMPOSITE_SEPARATOR.join(p)}
        | ({} if isinstance(p, str) else {"answers": list(p)})
        for r, p in zip(records[:num_examples], preds[:num_examples])
    ]
    return result


def _composite_prompts(tokenizer, records: Sequence[Mapping[str, Any]], mode: str, max_new_tokens: int | None):
    """What `mode` asks of composite records -> (prompts, max_new_tokens): "turns": each record's
    sub-prompts, and tokens per turn (default: the longest sub-answer + 8); "joint": each numbered
    prompt, and tokens per answer (default: the longest answer + 8)."""
    if mode not in COMPOSITE_MODES:
        raise ValueError(f"composite mode {mode!r}; choose one of {COMPOSITE_MODES}")
    refs = [r["response"] for r in records]
    if mode == "joint":
        return [r["prompt"] for r in records], max_new_tokens or _auto_max_new_tokens(tokenizer, refs)
    missing = next((i for i, r in enumerate(records) if not r.get("prompts")), None)
    if missing is not None:
        raise ValueError(
            f"composite record {missing + 1} has no 'prompts' list (sub-prompts): the 'turns' mode needs it; "
            "rebuild the set with build_composite_file or use mode 'joint'"
        )
    parts = [p for r in refs for p in split_composite(r)]
    return [r["prompts"] for r in records], max_new_tokens or _auto_max_new_tokens(tokenizer, parts)


def build_composite_file(
    data_root: str,
    tasks: Sequence[str],
    n: int,
    num_samples: int,
    path: str,
    *,
    seed: int = 0,
    split: str = "test",
) -> list[dict]:
    """Writes a composite-n test set (JSONL {"prompt", "response", "tasks"}) built from the
    single-task `<data_root>/<task>/<split>.jsonl` files of `tasks` (a missing one is a DataError
    naming it; other folders of `data_root` are ignored); returns its records."""
    from meteora_jax.data import build_composite, read_jsonl, write_jsonl

    # Only the named tasks' files are read, as in run_evaluation: training's find_task_dirs would
    # take every other task folder (not selected, or without this split) for an unknown adapter.
    test_sets = {t: read_jsonl(os.path.join(data_root, t, f"{split}.jsonl")) for t in tasks}
    records = build_composite(test_sets, n, num_samples, seed=seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_jsonl(path, records)
    return records


def run_evaluation(
    generator,
    tokenizer,
    *,
    data_root: str | None = None,
    tasks: Sequence[str] | None = None,
    split: str = "test",
    composite_files: Sequence[str] = (),
    metrics: Mapping[str, str] | None = None,
    default_metric: str = "accuracy",
    max_samples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    chat_template: bool | None = None,
    routing_temperature: float = 1.0,
    composite_temperature: float | None = None,
    force_adapter: int | None = None,
    adapter_for_task: Mapping[str, int] | None = None,
    composite_mode: str = "turns",
    routing_pictures: str | None = None,
    adapter_names: Sequence[str] = (),
    pictures_per_set: int = 1,
    output: str | None = None,
    model: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Per-task and composite-n evaluation; returns (and writes to `output` as JSON)

        {"tasks": {task: {"metric", "score", "count", "examples"}},
         "composite": {name: score_composite result + "routing_temperature", "file", "examples"},
         "settings": {...}}

    tasks: the task folders of `data_root` to evaluate on `<task>/<split>.jsonl` (None: all).
    composite_files: composite JSONL files; the routing temperature of a composite-n file is
    `composite_temperature`, else the original's (COMPOSITE_TEMPERATURES) for n in {3, 5, 10},
    else `routing_temperature`. Metrics: `metrics[task]`, else `default_metric`.
    composite_mode: "turns" or "joint" (see `evaluate_composite_records`).
    adapter_for_task: oracle routing, task name -> adapter index: each single task's records, and
    each turn of a composite sample, are answered by that task's own adapter (excludes
    `force_adapter`; every evaluated task must be in it).
    routing_pictures: a folder for routing pictures of the first `pictures_per_set` samples of each
    composite set (learned routing, turns mode), `<folder>/<set name>_<i>.png/.html`; an earlier
    run's pictures of a set past this run's count are removed.
    model: where the answers came from (scripts/evaluate.py gives the checkpoint, gates and
    tokenizer paths, top_k, dtype and layer layout), recorded in the results' settings with the
    evaluation's own options, so that a results file says how to reproduce it.
    progress: a tqdm bar (stderr) over every answer to generate (a composite turn is one answer).
    """
    import json

    from meteora_jax.data import read_composite_jsonl, read_jsonl
    from meteora_jax.generate import uses_chat_template

    metrics = dict(metrics or {})
    for name in [default_metric, *metrics.values()]:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
    metric_for = lambda task: metrics.get(task, default_metric)  # noqa: E731
    if adapter_for_task is not None and force_adapter is not None:
        raise ValueError("force_adapter and adapter_for_task (oracle routing) exclude each other")

    def check_oracle(task_names):  # fails before any generation
        unknown = sorted(set(task_names) - set(adapter_for_task if adapter_for_task is not None else task_names))
        if unknown:
            raise ValueError(f"oracle routing: no adapter named after task(s) {unknown}; adapters: {sorted(adapter_for_task)}")

    common = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, chat_template=chat_template)
    results: dict[str, Any] = {"tasks": {}, "composite": {}}
    # Every file is read and validated before any generation: a bad one found after an hour of
    # evaluation would waste it (and leave the earlier sets' routing pictures behind).
    task_records = {}
    if data_root:
        names = list(tasks) if tasks else tasks_with_split(data_root, split)
        check_oracle(names)
        task_records = {task: read_jsonl(os.path.join(data_root, task, f"{split}.jsonl"))[:max_samples]
                        for task in names}
    composite_sets = [(path, read_composite_jsonl(path)[:max_samples]) for path in composite_files]
    for _, records in composite_sets:
        check_oracle([t for r in records for t in r["tasks"]])

    _check_everything_fits(generator, tokenizer, task_records, composite_sets, composite_mode=composite_mode,
                           max_new_tokens=max_new_tokens, chat_template=chat_template)

    answers = sum(map(len, task_records.values())) + sum(
        len(records) if composite_mode == "joint" else sum(len(r["tasks"]) for r in records)
        for _, records in composite_sets)
    with _progress_bar(answers, progress) as bar:
        for task, records in task_records.items():
            bar.set_postfix_str(task)
            force = adapter_for_task[task] if adapter_for_task is not None else force_adapter
            results["tasks"][task] = evaluate_records(
                generator, tokenizer, records, metric_for(task), routing_temperature=routing_temperature,
                force_adapter=force, **common
            )
        for path, records in composite_sets:
            bar.set_postfix_str(os.path.basename(path))
            sizes = {len(r["tasks"]) for r in records}
            n = sizes.pop() if len(sizes) == 1 else None
            temp = composite_temperature or COMPOSITE_TEMPERATURES.get(n, routing_temperature)
            base_name = f"composite-{n}" if n is not None else os.path.splitext(os.path.basename(path))[0]
            name, count = base_name, 1
            while name in results["composite"]:  # another file of the same n (or name)
                count += 1
                name = f"{base_name}#{count}"
            res = evaluate_composite_records(
                generator, tokenizer, records, metric_for, mode=composite_mode, routing_temperature=temp,
                force_adapter=force_adapter, adapter_for_task=adapter_for_task,
                pictures=(os.path.join(routing_pictures, name), adapter_names, pictures_per_set) if routing_pictures else None,
                **common,
            )
            res.update(routing_temperature=temp, file=os.path.abspath(path))
            results["composite"][name] = res
    results["settings"] = dict(
        model=dict(model or {}),
        data_root=os.path.abspath(data_root) if data_root else None,
        split=split,
        metrics={**{t: metric_for(t) for t in results["tasks"]}},
        default_metric=default_metric,
        max_samples=max_samples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        chat_template=uses_chat_template(tokenizer, chat_template),  # as resolved for the prompts
        routing_temperature=routing_temperature,
        composite_temperature=composite_temperature,
        force_adapter=force_adapter,
        oracle=adapter_for_task is not None,
        composite_mode=composite_mode,
    )
    if output:  # whole or not at all: an interrupted write keeps an earlier run's results
        with written_whole(output) as f:
            json.dump(results, f, indent=1, ensure_ascii=False, allow_nan=True)
    return results


def _check_everything_fits(generator, tokenizer, task_records, composite_sets, *, composite_mode, max_new_tokens,
                           chat_template) -> None:
    """ValueError naming the task or composite file whose prompts with their answers could pass the
    model's positions. Generation checks each batch as it reaches it, longest prompts last, so a
    misfit would otherwise end an evaluation near its end."""
    from meteora_jax.generate import encode_prompt

    def check(where, prompts, n_new):
        for i, prompt in enumerate(prompts):
            try:
                generator.check_lengths([encode_prompt(tokenizer, prompt, chat_template=chat_template)], n_new)
            except ValueError as e:
                raise ValueError(f"{where}, record {i + 1}: {e}") from None

    for task, records in task_records.items():
        check(f"task {task}", [r["prompt"] for r in records],
              max_new_tokens or _auto_max_new_tokens(tokenizer, [r["response"] for r in records]))
    for path, records in composite_sets:
        prompts, n_new = _composite_prompts(tokenizer, records, composite_mode, max_new_tokens)
        if composite_mode == "joint":
            check(path, prompts, n_new)
            continue
        try:
            _check_chain_lengths(generator, tokenizer, prompts, n_new, chat_template)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def format_results(results: Mapping[str, Any]) -> str:
    """The printed form of `run_evaluation`'s result: one table for the tasks, one per composite."""
    parts = []
    if results.get("tasks"):
        parts.append("single tasks\n" + format_table(results["tasks"]))
    for name, res in results.get("composite", {}).items():
        temp = res.get("routing_temperature")
        head = f"{name} (routing temperature {temp:g})" if isinstance(temp, (int, float)) else name
        parts.append(head + "\n" + format_table(res))
    return "\n\n".join(parts)
