r"""Trains the MeteoRA gates of a converted model on JSONL task data, and MixLoRA's router and FFN
experts where the config's model.mixlora adds them (docs/mixlora.md).

    python scripts/train.py --config configs/tiny.py
    python scripts/train.py --config configs/mixlora_tiny.py
    python scripts/train.py --config configs/llama3_8b.py \
        --config.model_checkpoint=/ckpt/llama3_8b_28 --config.tokenizer=/models/llama3_8b \
        --config.data.root=/data/tasks --config.train.steps=2000

Any `--config.<key>=<value>` overrides the config file; an unknown key is an error. Bad inputs
stop with a message and exit status 2 before any compute; a non-finite loss exits with 3. SIGTERM
or Ctrl-C saves the current step and exits with 128 + the signal's number (143 / 130), as a shell
reports a killed command: the run is not done and exported no gates; running it again (without
--config.checkpoint.resume=False, which would remove that step) goes on from there.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, where a bad --config file or override stops with one line on stderr and
    exit status 2 (absl and ml_collections would print a traceback or exit with 1). -h / --help
    print the usage and exit with 0, as the other scripts do (absl exits with 1 and knows no -h)."""
    if any(arg in ("-h", "--help") for arg in argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    try:
        remaining = flags.FLAGS(argv)
        _CONFIG.value.keys()  # ml_collections defers a config file's load error to its first use
    except (flags.Error, KeyError, AttributeError, OSError, ValueError) as e:
        message = _flag_error_message(e, argv)
        if message is None:
            raise  # not a bad flag (a bug inside the config file, say): keep the traceback
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    return remaining


def _flag_error_message(error: BaseException, argv: list[str]) -> str | None:
    """One line for a bad flag, naming it; None for an error no flag explains."""
    if isinstance(error, flags.Error):
        return " ".join(str(error).split())
    if isinstance(error, OSError):  # ml_collections: a config file that failed to load; the cause says why
        reason = str(error.__cause__ or error).strip().splitlines()[-1].strip()
        return f"cannot load the --config file: {reason}"
    if isinstance(error, ValueError):  # ml_collections: an override path it cannot parse
        path = re.search(r"Could not parse '([^']*)'", str(error))
        return f"--config.{path.group(1)}: not a config path (index a list as key[0])" if path else None
    return _unknown_override(argv)  # ml_collections' KeyError / AttributeError for an override path


def _unknown_override(argv: list[str]) -> str | None:
    """The first --config.<path> override whose path the config file lacks, described; None if none
    does (then the error came from elsewhere, e.g. the config file itself)."""
    import difflib
    import importlib.util

    from ml_collections import ConfigDict

    files = [arg.split("=", 1)[1] for arg in argv[1:] if arg.startswith("--config=")]
    files += [argv[i + 1] for i, arg in enumerate(argv[1:-1], 1) if arg == "--config"]
    if not files:
        return None
    try:
        spec = importlib.util.spec_from_file_location("config_file", files[-1].split(":", 1)[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(*files[-1].split(":", 1)[1:])
    except Exception:  # the config file itself is broken: absl's own error says how
        return None
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        flag = arg.split("=", 1)[0]
        node, walked = config, []
        for part in flag.removeprefix("--config.").split("."):
            if isinstance(node, (ConfigDict, dict)) and part in node:
                node, walked = node[part], walked + [part]
                continue
            where = "config." + ".".join(walked) if walked else "the config"
            if not isinstance(node, (ConfigDict, dict)):
                return f"{flag}: {where} is a {type(node).__name__}, it has no key {part!r}"
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            return f"{flag}: {where} has no key {part!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
    return None


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; use --config.<key>=<value>", file=sys.stderr)
        return 2
    from meteora_jax.checkpoint import CheckpointError
    from meteora_jax.config import ConfigError
    from meteora_jax.data import DataError
    from meteora_jax.train import NonFiniteLossError, TrainError, train

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    datasets.disable_progress_bars()
    try:
        summary = train(_CONFIG.value)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (TrainError, DataError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ev = summary["eval"]
    acc = ""
    if ev:  # gate accuracy where there are gates (else the LM loss), and MixLoRA's balance loss
        shown = [f"gate accuracy {ev['gate_acc_top1']:.3f}" if "gate_acc_top1" in ev else f"LM loss {ev['lm_loss']:.3f}"]
        shown += [f"balance loss {ev['balance_loss']:.3f}"] if "balance_loss" in ev else []
        acc = f", eval {', '.join(shown)}"
    if summary["resumed_from"]:
        print(f"resumed from the checkpoint at step {summary['resumed_from']} in {_CONFIG.value.workdir} "
              "(another workdir, or --config.checkpoint.resume=False, starts over)")
    if summary["status"] == "interrupted":
        print(f"interrupted at step {summary['step']}{acc}; run the command again, without "
              "--config.checkpoint.resume=False, to go on from there")
        return 128 + summary["signal"]
    print(f"done at step {summary['step']}{acc}; gates: {summary['gates_dir']}")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
