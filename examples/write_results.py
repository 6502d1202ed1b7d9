"""Writes docs/results.md from the files `examples/e2e_stages.sh` leaves under runs/: every number in
it comes from those files, nothing is typed in by hand.

    python examples/write_results.py                       # runs/ -> docs/results.md + docs/results/*.png
    python examples/write_results.py --runs /tmp/dry --out /tmp/dry/results.md

Reads runs/e2e/eval_{base,lora_b,oracle,meteora}.json (scripts/evaluate.py), runs/e2e/hf_eval.json
(examples/baseline_eval.py, optional), runs/smollm2_135m/metrics.jsonl (the gate training's last
eval: gate top-1 accuracy per task), runs/adapters/*/training.json and runs/e2e/times.jsonl.
Scores are shown in points (accuracy and ROUGE-L x 100).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

SYSTEMS = {"base": "base (zero-shot)", "lora_b": "LoRA-B", "oracle": "oracle adapter", "meteora": "MeteoRA"}
COMPOSITE_SYSTEMS = ("lora_b", "oracle", "meteora")


def _load_json(path: Path):
    """A JSON file's content; a missing or malformed file stops the script with one line naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SystemExit(f"error: {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _points(result: dict) -> float:
    """A metric result in points: accuracy / ROUGE in [0, 1] -> x 100; BLEU is on 0-100 already."""
    return result["score"] * (1.0 if result["metric"] == "bleu" else 100.0)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _records(path: Path, fields: dict) -> list[dict]:
    """A JSONL file's records, each holding `fields`; a bad file stops the script with one line
    naming it and the line."""
    from meteora_jax.data import DataError, read_jsonl

    try:
        return read_jsonl(path, fields=fields)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


def last_eval(metrics_jsonl: Path) -> dict:
    """The last eval record of a gate training's metrics.jsonl (scripts/train.py)."""
    evals = [r for r in _records(metrics_jsonl, {}) if r.get("split") == "eval"]
    if not evals or "gate_acc_top1" not in evals[-1]:
        raise SystemExit(f"error: {metrics_jsonl}: no eval record with gate_acc_top1 (did the gate training finish?)")
    return evals[-1]


def single_task_section(evals: dict, gate_eval: dict) -> tuple[str, dict]:
    tasks = list(evals["meteora"]["tasks"])
    rows, cols = [], {s: [] for s in SYSTEMS}
    gate_col = []
    for t in tasks:
        metric = evals["meteora"]["tasks"][t]["metric"]
        cells = []
        for s in SYSTEMS:
            r = evals.get(s, {}).get("tasks", {}).get(t)
            v = _points(r) if r else None
            cols[s].append(v)
            cells.append(_fmt(v))
        g = gate_eval.get(f"gate_acc/{t}")
        gate_col.append(None if g is None else 100 * g)
        rows.append([t, metric] + cells + [_fmt(gate_col[-1])])
    means = {s: _mean(v) for s, v in cols.items()}
    rows.append(["**average**", ""] + [f"**{_fmt(means[s])}**" for s in SYSTEMS] + [f"**{_fmt(_mean(gate_col))}**"])
    header = ["task", "metric"] + list(SYSTEMS.values()) + ["gate top-1 %"]
    summary = {"means": means, "gate_mean": _mean(gate_col), "gate_overall": 100 * gate_eval.get("gate_acc_top1", float("nan"))}
    return _table(header, rows), summary


def composite_section(evals: dict, name: str) -> tuple[str, dict]:
    present = [s for s in COMPOSITE_SYSTEMS if name in evals.get(s, {}).get("composite", {})]
    per = {s: evals[s]["composite"][name] for s in present}
    tasks = sorted({t for s in present for t in per[s]["per_task"]})
    rows = []
    for t in tasks:
        cells = []
        for s in present:
            r = per[s]["per_task"].get(t)
            cells.append(_fmt(_points(r)) if r else "-")
        count = next(per[s]["per_task"][t]["count"] for s in present if t in per[s]["per_task"])
        rows.append([t, str(count)] + cells)
    avgs = {s: _mean([_points(r) for r in per[s]["per_task"].values()]) for s in present}
    rows.append(["**average**", ""] + [f"**{_fmt(avgs[s])}**" for s in present])
    temps = {s: per[s].get("routing_temperature") for s in present}
    samples = {s: per[s].get("num_samples") for s in present}
    header = ["sub-task", "answers"] + [SYSTEMS[s] for s in present]
    return _table(header, rows), {"averages": avgs, "temperature": temps.get("meteora"), "samples": samples.get("meteora"),
                                  "pictures": per.get("meteora", {}).get("pictures", [])}


def hf_section(hf: dict, evals: dict) -> str:
    """transformers + PEFT numbers next to ours: base zero-shot, own adapter (= our oracle), LoRA-B."""
    pairs = [("base", "base"), ("own", "oracle"), ("lora_b", "lora_b")]
    tasks = list(evals["meteora"]["tasks"])
    rows = []
    for t in tasks:
        cells = []
        for hf_key, ours in pairs:
            h = hf["results"].get(hf_key, {}).get(t)
            o = evals.get(ours, {}).get("tasks", {}).get(t)
            cells += [_fmt(_points(h)) if h else "-", _fmt(_points(o)) if o else "-"]
        rows.append([t] + cells)
    header = ["task", "base HF", "base ours", "own adapter HF (PEFT)", "oracle ours", "LoRA-B HF (PEFT)", "LoRA-B ours"]
    return _table(header, rows)


def adapters_section(runs: Path) -> str:
    rows = []
    for path in sorted(runs.glob("adapters/*/training.json")):
        log = _load_json(path)
        rows.append([log["name"], str(log["examples"]), f"{log['steps']} x {log['batch_size']}", f"{log['first_loss']:.3f}",
                     f"{log['final_loss']:.3f}", f"{log['train_seconds']:.1f}"])
    header = ["adapter", "train examples", "steps x batch", "first loss", "final loss", "seconds"]
    return _table(header, rows)


TIME_FIELDS = {"stage": str, "seconds": float, "device": str, "status": int}  # e2e_stages.sh's records


def times_section(times: list[dict]) -> str:
    """Wall-clock per stage (times.jsonl records), summed over the runs a resumable stage took."""
    totals: dict[str, list] = {}
    for r in times:
        t = totals.setdefault(r["stage"], [0.0, 0, r["device"], 0])
        t[0] += r["seconds"]
        t[1] += 1
        t[3] = r["status"]
    rows = [[s, f"{v[0]:.0f}", str(v[1]), v[2], "ok" if v[3] == 0 else f"exit {v[3]}"] for s, v in totals.items()]
    return _table(["stage", "seconds", "runs", "device", "last status"], rows)


def runs_section(runs: list[tuple[str, dict | None, dict]]) -> str:
    """One row per gate-training run: (label, its MeteoRA eval results or None, its last eval record)."""
    rows = []
    for label, ev, gate in runs:
        single = _mean([_points(r) for r in ev["tasks"].values()]) if ev else None
        comps = [_mean([_points(r) for r in ev["composite"][f"composite-{n}"]["per_task"].values()])
                 if ev and f"composite-{n}" in ev.get("composite", {}) else None for n in (3, 5, 10)]
        rows.append([label, f"{100 * gate['gate_acc_top1']:.1f}", _fmt(single)] + [_fmt(c) for c in comps])
    return _table(["gate training", "gate top-1 % (its gate_scope)", "MeteoRA single avg", "composite-3", "composite-5",
                   "composite-10"], rows)


def main(argv=None) -> int:
    from meteora_jax.cli import doc_summary

    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--gates-workdir", default=None, help="default: <runs>/smollm2_135m")
    p.add_argument("--earlier", action="append", default=[], metavar="LABEL=METRICS_JSONL[,EVAL_JSON]",
                   help="an earlier gate-training run for the runs table (repeatable)")
    p.add_argument("--final-label", default="final run", help="label of the run the tables show")
    p.add_argument("--pictures", default="3,5", help="composite sizes whose routing pictures are copied")
    p.add_argument("--notes", default=None, help="a markdown file appended as is (method notes, caveats)")
    args = p.parse_args(argv)
    earlier = []  # (label, metrics.jsonl, eval json or None)
    for spec in args.earlier:
        label, _, files = spec.partition("=")
        metrics_path, _, eval_path = files.partition(",")
        if not label or not metrics_path:
            p.error(f"--earlier {spec!r}: want LABEL=METRICS_JSONL[,EVAL_JSON]")
        earlier.append((label, Path(metrics_path), Path(eval_path) if eval_path else None))
    if args.notes and not Path(args.notes).is_file():
        p.error(f"--notes {args.notes}: no such file")
    runs, out = Path(args.runs), Path(args.out)
    if out.is_dir():
        p.error(f"--out {out} is a folder; give the results file's path")
    e2e = runs / "e2e"
    evals = {s: _load_json(e2e / f"eval_{s}.json") for s in SYSTEMS if (e2e / f"eval_{s}.json").is_file()}
    if "meteora" not in evals:
        raise SystemExit(f"{e2e / 'eval_meteora.json'}: missing; run examples/e2e_stages.sh eval first")
    gate_eval = last_eval(Path(args.gates_workdir or runs / "smollm2_135m") / "metrics.jsonl")
    # Every other input too, before the pictures are copied: a bad file leaves nothing written.
    earlier_runs = [(label, _load_json(eval_path) if eval_path else None, last_eval(metrics_path))
                    for label, metrics_path, eval_path in earlier]
    hf = _load_json(e2e / "hf_eval.json") if (e2e / "hf_eval.json").is_file() else None
    times = _records(e2e / "times.jsonl", TIME_FIELDS) if (e2e / "times.jsonl").is_file() else None
    notes = Path(args.notes).read_text(encoding="utf-8").rstrip() if args.notes else None
    pic_dir = out.parent / out.stem  # docs/results/

    single, s = single_task_section(evals, gate_eval)
    gap = s["means"]["meteora"] - s["means"]["oracle"] if s["means"]["oracle"] is not None else None
    targets = [
        ["MeteoRA single-task average within 2 points of the oracle adapter",
         f"{_fmt(s['means']['meteora'])} vs {_fmt(s['means']['oracle'])} ({gap:+.1f})" if gap is not None else "-",
         "yes" if gap is not None and gap >= -2.0 else "no"],
        ["gate top-1 routing accuracy >= 95% on single-task test tokens",
         f"{_fmt(s['gate_overall'])}% (token-weighted); {_fmt(s['gate_mean'])}% (mean over tasks)",
         "yes" if s["gate_overall"] >= 95.0 else "no"],
    ]
    composite_parts = []
    for n in (3, 5, 10):
        name = f"composite-{n}"
        if not any(name in e.get("composite", {}) for e in evals.values()):
            continue
        table, c = composite_section(evals, name)
        mine, lb = c["averages"].get("meteora"), c["averages"].get("lora_b")
        targets.append([f"{name}: MeteoRA average above LoRA-B", f"{_fmt(mine)} vs {_fmt(lb)}",
                        "yes" if mine is not None and lb is not None and mine > lb else "no"])
        composite_parts += ["", f"## {name.capitalize()}", "",
                            f"{c['samples']} samples, each chaining {n} distinct tasks' test prompts as turns of one "
                            f"conversation (every answer scored against its own task's reference); routing "
                            f"temperature {c['temperature']:g}.", "", table]
        for recorded in c["pictures"]:
            pic = e2e / "pictures" / Path(recorded).name  # recorded paths are those of the GPU machine
            dest = pic_dir / f"routing_{pic.name}"
            if str(n) not in args.pictures.split(",") or pic.suffix != ".png":
                continue
            if pic.is_file():
                pic_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(pic, dest)
            if dest.is_file():  # copied now, or by an earlier run from the full runs/ folder
                composite_parts += ["", f"![routing of one {name} sample]({pic_dir.name}/{dest.name})"]
    parts = [
        "# Results: MeteoRA on SmolLM2-135M-Instruct with ten PEFT task adapters",
        "",
        "Made by `examples/write_results.py` from the files that `examples/e2e_stages.sh` wrote; the "
        "command sequence is in `examples/README.md`. Scores are in points: accuracy and ROUGE-L x 100.",
        "",
        "## Targets",
        "",
        _table(["target", "measured", "met"], targets),
        "",
        "## Single tasks (test splits)",
        "",
        "Greedy decoding; `oracle adapter` routes every token to the task's own adapter (the PEFT "
        "baseline, through our model); `MeteoRA` routes by the trained gates (top-2). Gate top-1: share "
        "of the task's test tokens (teacher-forced; the tokens the gate loss covers, `data.gate_scope`: "
        "for configs/smollm2_135m.py from the prompt text on, without the chat template's shared system "
        "prompt) whose top-1 gate choice is the task's adapter, averaged over every gate of every layer "
        "(the gate training's final eval).",
        "",
        single,
        *composite_parts,
    ]
    if earlier_runs:
        runs_rows = earlier_runs + [(args.final_label, evals["meteora"], gate_eval)]
        parts += ["", "## Gate-training runs", "", runs_section(runs_rows)]
    if hf is not None:
        parts += ["", "## Cross-check with transformers + PEFT", "",
                  "The same test prompts through `examples/baseline_eval.py` (PyTorch, float32, PEFT adapters "
                  "as saved); ours is the converted checkpoint through `scripts/evaluate.py` (JAX, float32).",
                  "", hf_section(hf, evals)]
    parts += ["", "## Task adapters (examples/train_adapters.py)", "", adapters_section(runs)]
    if times is not None:
        parts += ["", "## Wall-clock per stage", "", times_section(times)]
    if notes is not None:
        parts += ["", notes]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
