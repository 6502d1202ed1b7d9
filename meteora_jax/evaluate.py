"""Task and composite-n metrics (issue 6 point 3): pure Python over strings, no model, no jax.

Scales are the libraries' own: accuracy and ROUGE in [0, 1], BLEU in [0, 100] (sacrebleu).
Results are plain dicts of str/float/int (JSON-serialisable):

    single task:  {"metric": "bleu", "score": 41.2, "count": 200}
    composite:    {"per_task": {task: <single-task result>}, "average": float,
                   "average_by_metric": {metric: float}, "num_samples": int, "n": int | None}
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sacrebleu
from rouge_score import rouge_scorer

__all__ = [
    "METRICS",
    "accuracy",
    "bleu",
    "contains_match",
    "corpus_bleu",
    "evaluate_task",
    "exact_match",
    "format_table",
    "rouge",
    "score_composite",
    "sentence_bleu",
    "split_composite",
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
    """sacrebleu corpus BLEU in [0, 100], one reference per prediction."""
    _check_pairs(predictions, references)
    if not predictions:
        return math.nan
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


bleu = corpus_bleu


@functools.lru_cache(maxsize=4)
def _scorer(use_stemmer: bool) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)


def rouge(
    predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False
) -> dict[str, float]:
    """Mean F-measure of ROUGE-1/2/L (rouge-score, sentence level) -> {"rouge1","rouge2","rougeL"}."""
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

    A separator at the very start or end makes no empty part. With `n`, the parts are padded with
    "" or truncated to exactly n (a model may emit fewer or more answers than asked).
    """
    body = _SEPARATOR_RE.sub("@@@@", text.strip())
    body = body.removeprefix("@@@@").removesuffix("@@@@")
    parts = [p.strip() for p in body.split("@@@@")] if body.strip() else [""]
    if n is not None:
        parts = (parts + [""] * n)[:n]
    return parts


def score_composite(
    predictions: Sequence[str],
    references: Sequence[str],
    tasks: Sequence[Sequence[str]],
    metric_for_task: Mapping[str, str] | Callable[[str], str],
) -> dict[str, Any]:
    """Scores composite answers per sub-task.

    predictions, references: one composite string per sample; tasks[i]: sub-task names of sample
    i, in answer order. Both strings are split into len(tasks[i]) parts, and each sub-task's
    metric (from `metric_for_task`) is computed over all its parts across samples.
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
        for task, p, r in zip(names, split_composite(pred, n), split_composite(ref, n)):
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
