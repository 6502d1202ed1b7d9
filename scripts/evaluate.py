r"""Per-task and composite-n evaluation of a meteora-jax checkpoint; writes JSON, prints tables.

    # every task folder of the data root, metric per task, composite-3 built on the fly
    python scripts/evaluate.py --checkpoint runs/tiny_world/model --tokenizer runs/tiny_world/tokenizer \
        --gates runs/tiny/gates --data-root runs/tiny_world/data \
        --metrics '{"arith": "accuracy", "reverse": "bleu", "shout": "rougeL"}' \
        --build-composite 3 --composite-samples 32 --output runs/eval/tiny.json

    # only build a composite-n test set (no model needed)
    python scripts/evaluate.py --data-root DATA --build-composite 5 --composite-samples 200 \
        --composite-seed 0 --composite-out data/composite_5.jsonl --build-only

    # oracle routing (each task answered by the adapter named after it), or one adapter for all
    python scripts/evaluate.py ... --oracle
    python scripts/evaluate.py ... --force-adapter lora_b

Metrics (--metrics: JSON object or JSON file, task -> metric; others get --default-metric; a key
naming no task of the data root or of a composite file is an error, a typo would go unnoticed):
accuracy, accuracy_contains, bleu, rouge1, rouge2, rougeL. Composite-n samples are asked as chained
turns by default (sub-prompt 1, the model's answer, sub-prompt 2, ... in one conversation, so the
routing must switch adapters inside one sequence); --composite-mode joint asks the numbered prompt
at once and leaves the "@@@@" separators to the model, whose answer is split on them. Each
sub-task's answer is scored on its own; the routing temperature defaults to the original's (T = 15/20/30 for n = 3/5/10),
--composite-temperature overrides it. With --gates, the chat template, top_k and compute
dtype default to the training run's (recorded with the gates).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _check_options(args) -> set[str]:
    """Checks the numeric options, the output location and the given composite files (ValueError if
    bad); returns the tasks those files hold."""
    from meteora_jax.cli import unwritable
    from meteora_jax.data import read_composite_jsonl
    from pallas_kernels.routed_lora import check_routing_temperature

    for flag, value in (("--batch-size", args.batch_size), ("--composite-samples", args.composite_samples),
                        ("--max-new-tokens", args.max_new_tokens), ("--max-samples", args.max_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be >= 1")
    for flag, value in (("--pictures-per-set", args.pictures_per_set), ("--composite-seed", args.composite_seed)):
        if value < 0:
            raise ValueError(f"{flag} {value} must be >= 0")
    for temperature in (args.routing_temperature, args.composite_temperature):
        if temperature is not None:
            check_routing_temperature(temperature)
    out = args.composite_out
    problem = unwritable("--output", args.output) or (
        args.routing_pictures and unwritable("--routing-pictures", args.routing_pictures, folder=True)) or (
        out and args.build_composite and unwritable("--composite-out", out, folder=not out.endswith(".jsonl")))
    if problem:
        raise ValueError(problem)
    composite = bool(args.composite or args.build_composite)
    if args.oracle and args.composite_mode == "joint" and composite:
        raise ValueError("--oracle routes each composite turn to its task's adapter: it needs --composite-mode turns")
    if args.routing_pictures and (args.composite_mode == "joint" or args.oracle or args.force_adapter is not None):
        raise ValueError("--routing-pictures draws the learned routing of chained turns: not with --composite-mode "
                         "joint, --oracle or --force-adapter")
    if args.composite_out and args.composite_out.endswith(".jsonl") and len(args.build_composite) > 1:
        raise ValueError(f"--composite-out {args.composite_out} is one file; {len(args.build_composite)} sets are "
                         "built: give a folder")
    return {t for path in args.composite for r in read_composite_jsonl(path) for t in r["tasks"]}


def _model_settings(args, generator) -> dict:
    """Where the evaluated answers come from, for the results' settings: the paths as given and
    the options as resolved (the gates' recorded top_k and dtype when not overridden)."""
    absolute = lambda path: os.path.abspath(path) if path else None  # noqa: E731
    return dict(
        checkpoint=absolute(args.checkpoint),
        gates=absolute(args.gates),
        tokenizer=absolute(args.tokenizer),
        top_k=generator.config.meteora.top_k,
        dtype=generator.config.dtype,
        layer_layout=args.layer_layout,
    )


def main(argv=None) -> int:
    from meteora_jax.evaluate import METRICS
    from meteora_jax.generate import add_inference_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="model checkpoint folder (meteora_jax.checkpoint)")
    p.add_argument("--tokenizer", help="HF tokenizer folder, or a .gguf file")
    p.add_argument("--data-root", default=None, help="<root>/<task>/<split>.jsonl")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: all with a split file)")
    p.add_argument("--split", default="test")
    p.add_argument("--composite", action="append", default=[], help="composite JSONL file (repeatable)")
    p.add_argument("--build-composite", type=int, action="append", default=[], metavar="N",
                   help="build a composite-N test set from the data root's split files (repeatable)")
    p.add_argument("--composite-samples", type=int, default=100)
    p.add_argument("--composite-seed", type=int, default=0)
    p.add_argument("--composite-out", default=None,
                   help="where built sets go: a .jsonl path (one N) or a folder (default: next to --output)")
    p.add_argument("--build-only", action="store_true", help="build the composite sets and stop")
    p.add_argument("--no-single", action="store_true", help="skip the single-task evaluation")
    p.add_argument("--metrics", default=None, help="task -> metric: a JSON object or a JSON file")
    p.add_argument("--default-metric", default="accuracy", choices=sorted(METRICS))
    p.add_argument("--max-samples", type=int, default=None, help="first N records of each file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: longest reference + 8 tokens")
    p.add_argument("--routing-temperature", type=float, default=1.0)
    p.add_argument("--composite-temperature", type=float, default=None)
    p.add_argument("--oracle", action="store_true",
                   help="oracle routing: every task (and every composite turn) answered by the adapter named "
                   "after its task")
    p.add_argument("--composite-mode", choices=("turns", "joint"), default="turns",
                   help="turns (default): a composite sample's sub-prompts are chained turns of one "
                   "conversation; joint: the numbered prompt at once, the model separates its answers with @@@@")
    p.add_argument("--routing-pictures", default=None,
                   help="folder: routing pictures (PNG + HTML) of the first samples of each composite set "
                   "(an earlier run's further ones of a set are removed)")
    p.add_argument("--pictures-per-set", type=int, default=1)
    p.add_argument("--output", default="runs/eval/results.json")
    add_inference_arguments(p)
    args = p.parse_args(argv)

    from meteora_jax import evaluate as ev
    from meteora_jax.cli import check_outputs_apart, cli_fail
    from meteora_jax.generate import generator_from_args

    # Every input is checked, and the model loaded, before a composite set is written.
    try:
        composite_tasks = _check_options(args)
    except ValueError as e:
        cli_fail(p, str(e))
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks is not None else None
    if tasks is not None and not tasks:
        cli_fail(p, f"--tasks {args.tasks!r} names no task")
    if args.build_only and not args.build_composite:
        cli_fail(p, "--build-only builds composite sets and stops: give --build-composite N")
    if args.data_root and not os.path.isdir(args.data_root):
        cli_fail(p, f"--data-root {args.data_root} is not a folder")
    if args.build_composite and not args.data_root:
        cli_fail(p, "--build-composite needs --data-root")
    root_tasks = ev.tasks_with_split(args.data_root, args.split) if args.data_root else []
    try:
        # A --metrics key must name a task of the data root or of a composite file (else it is a typo
        # that leaves its task on --default-metric); tasks left out by --tasks or --no-single are
        # fine, so that one metrics file serves every subset.
        metrics = ev.parse_metric_spec(args.metrics, tasks=[*root_tasks, *(tasks or []), *composite_tasks])
    except ValueError as e:
        cli_fail(p, str(e))
    if tasks and not args.data_root:
        cli_fail(p, "--tasks names tasks of --data-root: give --data-root too")
    unknown = [t for t in tasks or [] if t not in root_tasks]
    if args.data_root and unknown:  # (found only after the model had loaded)
        cli_fail(p, f"{os.path.join(args.data_root, unknown[0], args.split + '.jsonl')}: no such file (--tasks "
                    f"{unknown[0]}; the tasks with one: {','.join(root_tasks) or 'none'})")
    # Nothing to evaluate would still load the model and then replace --output with empty results.
    single = bool(args.data_root) and not args.no_single and bool(tasks or root_tasks)
    if not args.build_only and not single and not (args.composite or args.build_composite):
        if args.data_root and not args.no_single:
            cli_fail(p, f"no task folder of --data-root {args.data_root} holds {args.split}.jsonl: nothing to evaluate")
        cli_fail(p, "nothing to evaluate: give --data-root (its tasks, unless --no-single), --composite FILE or "
                    "--build-composite N")
    build_paths = {}
    if args.build_composite:  # every n checked before any set is written (or the model loaded)
        names = tasks or root_tasks
        too_many = [n for n in args.build_composite if not 1 <= n <= len(names)]
        if too_many:
            cli_fail(p, f"--build-composite {too_many[0]}: composite-n needs 1 <= n <= the {len(names)} tasks {names}")
        for n in args.build_composite:
            out = args.composite_out
            if out is None or not out.endswith(".jsonl"):
                out = os.path.join(out or os.path.dirname(os.path.abspath(args.output)), f"composite_{n}.jsonl")
            build_paths[n] = out
        given = {os.path.abspath(path) for path in args.composite}
        clash = [out for out in build_paths.values() if os.path.abspath(out) in given]
        if clash:
            cli_fail(p, f"--build-composite would write {clash[0]}, which --composite names as input: build the set "
                        "elsewhere (--composite-out), or drop --build-composite to evaluate the existing one")
    # An output over an input (the composite set, a task's split file, the metrics file) destroyed it.
    check_outputs_apart(
        p, [*([] if args.build_only else [("--output", args.output), ("--routing-pictures", args.routing_pictures)]),
            *((f"--build-composite {n} (written to)", out) for n, out in build_paths.items())],
        [("--data-root", args.data_root), *(("--composite", path) for path in args.composite),
         ("--metrics", args.metrics if args.metrics and os.path.isfile(args.metrics) else None),
         ("--checkpoint", args.checkpoint), ("--gates", args.gates), ("--tokenizer", args.tokenizer)],
        output_folders={"--routing-pictures"})
    if not args.build_only:
        if not args.checkpoint or not args.tokenizer:
            cli_fail(p, "--checkpoint and --tokenizer are required to evaluate")
        if args.oracle and args.force_adapter is not None:
            cli_fail(p, "--oracle and --force-adapter exclude each other")
        try:
            generator, tokenizer, adapter_names, opts = generator_from_args(args)
        except ValueError as e:
            cli_fail(p, str(e))

    composite_files = list(args.composite)
    if args.build_composite:
        for n, out in build_paths.items():
            try:
                ev.build_composite_file(
                    args.data_root, names, n, args.composite_samples, out, seed=args.composite_seed, split=args.split
                )
            except ValueError as e:  # a bad task file (DataError) or composite setting
                cli_fail(p, str(e))
            print(f"composite-{n}: {args.composite_samples} samples -> {out}")
            composite_files.append(out)
    if args.build_only:
        return 0

    try:
        results = ev.run_evaluation(
            generator,
            tokenizer,
            data_root=None if args.no_single else args.data_root,
            tasks=tasks,
            split=args.split,
            composite_files=composite_files,
            metrics=metrics,
            default_metric=args.default_metric,
            max_samples=args.max_samples,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            chat_template=opts.chat_template,
            routing_temperature=args.routing_temperature,
            composite_temperature=args.composite_temperature,
            force_adapter=opts.force_adapter,
            adapter_for_task={n: i for i, n in enumerate(adapter_names)} if args.oracle else None,
            composite_mode=args.composite_mode,
            routing_pictures=args.routing_pictures,
            adapter_names=adapter_names,
            pictures_per_set=args.pictures_per_set,
            output=args.output,
            model=_model_settings(args, generator),
        )
    except ValueError as e:
        cli_fail(p, str(e))
    print(ev.format_results(results))
    print(f"\nresults: {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
