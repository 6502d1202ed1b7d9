"""Convert HF base models, PEFT LoRA adapters and reference MeteoRA checkpoints into Orbax
checkpoints. Same as the `meteora-convert` console script; see `python scripts/convert.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from meteora_jax.convert.cli import console_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(console_main())
