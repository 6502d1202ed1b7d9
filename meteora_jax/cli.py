"""Command-line argument checks shared by the scripts (scripts/*.py, examples/): bad input stops a
script in seconds with one line and exit status 2, before weights are made or anything compiles,
rather than with a traceback after the run."""

from __future__ import annotations

import argparse
import os
import textwrap


def cli_fail(parser, message: str):
    """Stops a script on bad input: one line on stderr, exit status 2 (argparse's `parser.error` also
    prints the whole usage block, which buries the message)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def doc_summary(doc: str, width: int = 100) -> str:
    """A script's --help description: the first paragraph of its docstring, wrapped (the whole
    docstring's usage lines, where a script shows them, are for the module reader)."""
    return textwrap.fill(" ".join(doc.split("\n\n")[0].split()), width)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a finite number > 0")
    return value


def int_list(minimum: int = 1):
    """argparse type: comma-separated integers >= `minimum`, "1,32" -> [1, 32]."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
        if min(values) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= {minimum}")
        return values

    return parse


def choice_list(parser, flag: str, text: str, choices) -> list[str]:
    """The comma-separated names in `text` (empty ones dropped), each one of `choices`; else the
    script stops with one line naming `flag`."""
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        problem = f"unknown {','.join(unknown)}" if unknown else "no names"
        cli_fail(parser, f"{flag} {text!r}: {problem}; choose from {','.join(choices)}")
    return names


def unwritable(flag: str, path: str, *, folder: bool = False) -> str | None:
    """Why `path` cannot be written, as a message naming `flag`, or None: a file (or with
    `folder`, a folder) there, the missing folders above it made at write time. A file's folder
    must be writable too: files are written beside their path and renamed over it
    (`meteora_jax.files.written_whole`)."""
    full = os.path.abspath(path)
    exists = os.path.exists(full)
    if exists and os.path.isdir(full) != folder:
        want, got = ("folder", "file") if folder else ("file", "folder")
        return f"{flag} {path} is a {got}; give a {want} path"
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{flag} {path}: {parent} is a file, not a folder"
    if exists and not os.access(full, os.W_OK):
        return f"{flag} {path} is not writable"
    if (not folder or not exists) and not os.access(parent, os.W_OK):
        return f"{flag} {path}: its folder {parent} is not writable"
    return None


def check_writable(parser, flag: str, path: str, *, folder: bool = False) -> None:
    """Stops the script unless `path` can be written (see `unwritable`). Checked up front so that a
    bad path fails before the benchmark rather than after it."""
    problem = unwritable(flag, path, folder=folder)
    if problem:
        cli_fail(parser, problem)


def check_outputs_apart(parser, outputs, inputs, *, output_folders=()) -> None:
    """Stops the script if an output would overwrite something it reads or another output: an
    output that is an input file, or lies inside an input folder (a data root, a checkpoint, a
    tokenizer: outputs stay out of what the script reads, so that a second run reads the same),
    lies in the folder of an output named in `output_folders` (flags, e.g. a pictures folder), or
    is the same path as another output. `outputs` and `inputs` are (flag, path) pairs; None paths
    are skipped. Symlinks are followed, so two names for one file clash too."""
    outputs = [(flag, path, os.path.realpath(path)) for flag, path in outputs if path]
    for flag, path, out in outputs:
        for in_flag, in_path in inputs:
            if not in_path or not os.path.exists(in_path):
                continue
            source = os.path.realpath(in_path)
            if os.path.isdir(source) and os.path.commonpath([source, out]) == source:
                cli_fail(parser, f"{flag} {path} lies inside {in_flag} {in_path}, which is read: write it elsewhere")
            if out == source:
                cli_fail(parser, f"{flag} {path} is the {in_flag} file {in_path}, which is read: write it elsewhere")
        for other_flag, other, folder in outputs:
            if other_flag in output_folders and other_flag != flag and os.path.commonpath([folder, out]) == folder:
                cli_fail(parser, f"{flag} {path} lies in the {other_flag} folder {other}: give them different places")
    for i, (flag, path, out) in enumerate(outputs):
        for other_flag, _, other in outputs[i + 1:]:
            if out == other:
                cli_fail(parser, f"{flag} and {other_flag} are the same file {path}: give each its own")
