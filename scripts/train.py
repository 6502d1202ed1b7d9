"""Trains the MeteoRA gates of a converted model on JSONL task data.

    python scripts/train.py --config configs/tiny.py
    python scripts/train.py --config configs/llama3_8b.py \
        --config.model_checkpoint=/ckpt/llama3_8b_28 --config.tokenizer=/models/llama3_8b \
        --config.data.root=/data/tasks --config.train.steps=2000

Any `--config.<key>=<value>` overrides the config file; an unknown key is an error. Bad inputs
stop with a message and exit status 2 before any compute; a non-finite loss exits with 3.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<key>=<value>")
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
    acc = f", eval gate accuracy {ev['gate_acc_top1']:.3f}" if ev else ""
    print(f"{summary['status']} at step {summary['step']}{acc}; gates: {summary['gates_dir']}")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(lambda argv: sys.exit(main(argv)))
