"""`meteora-convert` (also `python scripts/convert.py`): build Orbax checkpoints for meteora-jax.

Subcommands (run `meteora-convert SUBCOMMAND --help` for every flag):

  base       HF LLaMA directory (safetensors / .bin, sharded index files included) or GGUF file
             -> checkpoint of the base params and the model config.
  loras      base (HF directory, GGUF file, or a `base` checkpoint) + N PEFT LoRA adapter
             directories, in an explicit order -> checkpoint with stacked adapters and fresh gates.
  reference  base + a checkpoint of the original PyTorch MeteoRA implementation
             -> the same layout, trained gates included.
  inspect    print what a checkpoint holds (adapters, ranks, shapes, dtypes, size).

Every conversion writes into a hidden temporary directory next to the output and renames it at
the end: on any error nothing is left behind and the exit status is 1 (Ctrl-C: 130, SIGTERM: 143).
An existing output is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from meteora_jax.checkpoint import (
    CheckpointError,
    is_checkpoint,
    read_metadata,
    remove_stale_staging,
    replaceable,
    restore_checkpoint,
    save_checkpoint,
)
from meteora_jax.config import ConfigError, ModelConfig
from meteora_jax.convert.common import ConversionError, check_param_tree, check_params_finite
from meteora_jax.convert.hf_base import WeightsError, load_hf_llama

log = logging.getLogger("meteora_jax.convert")

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
ORDER_FILE = "adapters.txt"

_EPILOG = """\
examples:
  meteora-convert base /models/Llama-2-7b-hf -o ckpt/llama2-base --dtype bf16
  meteora-convert base SmolLM2-135M-Instruct.Q4_1.gguf -o ckpt/smol-base
  meteora-convert loras --base ckpt/llama2-base --adapters math=/loras/gsm8k code=/loras/mbpp -o ckpt/l2-2
  meteora-convert loras --base /models/Llama-2-7b-hf --adapter-dir /loras -o ckpt/l2-28 --dtype bf16
  meteora-convert reference --base /models/Llama-2-7b-hf meteora_28.pt --lora-alpha 16 \\
      --order-file tasks.txt -o ckpt/l2-ref
  meteora-convert inspect ckpt/l2-28
"""


def _common(parser: argparse.ArgumentParser, dtype: bool = True) -> None:
    parser.add_argument("-o", "--output", required=True, type=Path, help="checkpoint directory to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (only once the new one is complete)")
    if dtype:
        parser.add_argument(
            "--dtype",
            choices=sorted(DTYPES),
            default=None,
            help="storage and compute dtype of base weights and LoRA factors (gates and scalings stay "
            "float32); default: a --base checkpoint's own, else fp32",
        )
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")


def _base_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        required=True,
        type=Path,
        help="the base model: an HF LLaMA directory, a .gguf file, or a checkpoint made by `base`",
    )
    parser.add_argument("--gguf-file", help="GGUF file name inside --base, when --base is a directory")
    parser.add_argument(
        "--top-k",
        type=int,
        default=2,
        help="adapters mixed per token (stored in the model config; default 2, capped at the number of adapters)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meteora-convert",
        description=__doc__.split("\n\n", 1)[1],
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{base,loras,reference,inspect}")

    base = sub.add_parser(
        "base",
        help="HF LLaMA directory or GGUF file -> base checkpoint",
        description="Converts an HF LLaMA-architecture model (config.json + model.safetensors / "
        "pytorch_model.bin, or their sharded *.index.json variants) or a GGUF file (dequantised by "
        "transformers; needs the `gguf` package) into a checkpoint of the base params and the model config. "
        "Every tensor is checked against the shape the config implies, for a floating-point dtype and for "
        "non-finite values.",
    )
    base.add_argument("source", type=Path, help="HF model directory or .gguf file")
    base.add_argument("--gguf-file", help="GGUF file name inside SOURCE, when SOURCE is a directory")
    _common(base)

    loras = sub.add_parser(
        "loras",
        help="base + PEFT LoRA adapters -> MeteoRA checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Stacks N HF PEFT LoRA adapters (each a directory with adapter_config.json and
adapter_model.safetensors or adapter_model.bin) onto a base model. Adapter l of N gets index l:
the gates trained later are only meaningful under this order, so it is always explicit:

  --adapters NAME=DIR [NAME=DIR ...]   in this order (a bare DIR is named after its folder)
  --order-file FILE                    one adapter per line: NAME (= DIR/NAME under --adapter-dir,
                                       else next to FILE) or NAME=DIR; '#' starts a comment
  --adapter-dir DIR                    a parent folder; the order comes from --order-file or,
                                       without one, from DIR/adapters.txt (required)

Per module the scaling is lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; rank_pattern
and alpha_pattern are honoured. Ranks are zero-padded to the largest. An adapter that does not adapt
a projection contributes zero there (a warning says so once per adapter); a projection no adapter
adapts stays a plain linear layer. Gates are fresh: normal(0, --gate-std) float32 from --seed.

Refused with an error naming the adapter, file and key: missing adapter_config.json or weights,
shapes of another base model, DoRA, trained bias tensors (bias="lora_only" or "all" converts: LLaMA's
projections have no bias), lora_bias, modules_to_save, fan_in_fan_out,
target_parameters, layer_replication, trainable tokens, initialisations that modify the base
(init_lora_weights pissa, olora, corda, lora_ga: convert those to plain LoRA with PEFT's
path_initial_model_for_weight_conversion; loftq), malformed regular expressions, targets naming a
LLaMA module other than the seven projections (entries that match no LLaMA module are ignored, as
PEFT does), keys that adapter_config.json does not explain (or missing ones),
bool or integer tensors, non-finite values, truncated or corrupt weight files, duplicate adapter names.
Accepted key variants: with or without the base_model.model. prefix, with or without an adapter
name segment (lora_A.default.weight).""",
    )
    _base_arg(loras)
    loras.add_argument("--adapters", nargs="+", metavar="NAME=DIR", help="adapters in index order")
    loras.add_argument("--order-file", type=Path, help="file listing the adapters in index order (see above)")
    loras.add_argument("--adapter-dir", type=Path, help="parent folder of the adapter directories")
    loras.add_argument("--seed", type=int, default=0, help="seed of the fresh gates (default 0)")
    loras.add_argument("--gate-std", type=float, default=0.02, help="std of the fresh gates (default 0.02)")
    _common(loras)

    ref = sub.add_parser(
        "reference",
        help="base + original PyTorch MeteoRA checkpoint -> MeteoRA checkpoint (trained gates kept)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Converts a checkpoint of the original PyTorch MeteoRA implementation. Accepted: a .safetensors
file, a torch .bin/.pt/.pth state dict (optionally wrapped as {"state_dict": ...} or {"model": ...}),
or a directory of such files. Keys, per layer i and projection P (self_attn.q_proj ... mlp.down_proj),
optionally prefixed by base_model.model. and with an optional adapter name before 'weight':

  model.layers.{i}.{P}.lora_A.weight     [L*r, d_in]   rows l*r:(l+1)*r = adapter l
  model.layers.{i}.{P}.lora_B.weight     [d_out, L*r]  columns l*r:(l+1)*r = adapter l
  model.layers.{i}.{P}.moe_gate.weight   [L, d_in]     row l = adapter l's gate

L = rows of moe_gate.weight; r = rows(lora_A) / L. Base weights in the file are skipped (the base
comes from --base); any other key is an error. The file holds no alphas: give --lora-alpha (with
--rslora for alpha/sqrt(r)) or --scaling, one value or one per adapter.""",
    )
    _base_arg(ref)
    ref.add_argument("checkpoint", type=Path, help="reference checkpoint file or directory")
    ref.add_argument("--names", help="comma-separated adapter names in index order (default adapter_0, ...)")
    ref.add_argument("--order-file", type=Path, help="file with one adapter name per line, in index order")
    ref.add_argument("--num-adapters", type=int, help="assert the number of adapters L")
    scale = ref.add_mutually_exclusive_group(required=True)
    scale.add_argument("--lora-alpha", type=float, nargs="+", help="alpha (one, or one per adapter); scaling = alpha / r")
    scale.add_argument("--scaling", type=float, nargs="+", help="the scaling itself (one, or one per adapter)")
    ref.add_argument("--rslora", action="store_true", help="with --lora-alpha: scaling = alpha / sqrt(r)")
    _common(ref)

    inspect = sub.add_parser("inspect", help="print what a checkpoint holds", description="Prints the model config, "
                             "the adapters (index, name, ranks, alpha, rsLoRA, targets, source), and every parameter's "
                             "shape and dtype with the total size. Reads no arrays.")
    inspect.add_argument("checkpoint", type=Path)
    inspect.add_argument("--json", action="store_true", help="print the raw metadata JSON")
    return parser


def _dtype_overrides(dtype: str) -> dict:
    return {"dtype": DTYPES[dtype], "param_dtype": DTYPES[dtype]}


def load_base(path: Path, dtype: Optional[str], gguf_file: Optional[str] = None, progress: bool = True
              ) -> tuple[ModelConfig, dict, dict]:
    """(config, numpy params without adapters, metadata about the source) of a base model.

    dtype: "fp32" / "bf16", or None: a checkpoint's own dtype (a bf16 base stays bf16), fp32 for an
    HF model or GGUF file.
    """
    if is_checkpoint(path):
        # Into host memory: conversion never computes, and a large base need not fit one GPU.
        params, config, meta = restore_checkpoint(path, shardings=SingleDeviceSharding(jax.devices("cpu")[0]))
        if config.meteora.num_adapters:
            raise ConversionError(f"{path}: checkpoint already holds {config.meteora.num_adapters} adapters; give a base")
        overrides = _dtype_overrides(dtype) if dtype else {}
        weight_dtype = ModelConfig.from_dict({**config.to_dict(), **overrides}).weight_dtype
        params = _map(params, lambda x: np.asarray(x).astype(weight_dtype, copy=False))  # (a bf16 base: no second copy)
        config = config.replace(**overrides)
        return config, params, {**meta.get("base", {}), "checkpoint": str(path.absolute())}
    overrides = _dtype_overrides(dtype or "fp32")
    if not path.exists():
        raise ConversionError(f"base model {path} not found")
    config, params = load_hf_llama(path, gguf_file=gguf_file, progress=progress, **overrides)
    source = path / gguf_file if gguf_file else path
    check_params_finite(params, str(source))
    return config, params, {"source": str(source.absolute()), "format": "gguf" if source.suffix == ".gguf" else "hf"}


def _map(tree: dict, fn) -> dict:
    return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _adapter_list(args) -> list[tuple[str, Path]]:
    from meteora_jax.convert.peft import read_order_file

    given = sum(x is not None for x in (args.adapters, args.order_file))
    if given != 1 and not (given == 0 and args.adapter_dir):
        raise ConversionError("give the adapter order with exactly one of --adapters or --order-file (or --adapter-dir)")
    if args.adapters:
        if args.adapter_dir:
            raise ConversionError("--adapters takes NAME=DIR pairs; do not combine it with --adapter-dir")
        entries = []
        for item in args.adapters:
            name, sep, target = item.partition("=")
            if not sep:
                target, name = item, Path(os.path.abspath(item)).name  # "." names the folder itself (links kept)
            entries.append((name, Path(target)))
        return entries
    order = args.order_file
    if order is None:
        order = args.adapter_dir / ORDER_FILE
        if not order.is_file():
            raise ConversionError(
                f"{args.adapter_dir}: no {ORDER_FILE}; the adapter order must be explicit (gates trained under one "
                f"order are meaningless under another). Write one adapter name per line into {order}, or pass "
                f"--order-file / --adapters"
            )
    return read_order_file(order, parent=args.adapter_dir)


def _header(kind: str, config: ModelConfig) -> dict:
    return {
        "kind": kind,
        "dtype": config.param_dtype,
        "created_by": "meteora-convert",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_output(args, inputs: Sequence[Path]) -> None:
    """The output location, before any work: --overwrite replaces only a checkpoint (or an empty
    folder), never one of the inputs or a folder holding one, and the location must be writable.
    What killed conversions to it left (hidden staging folders) is removed first, with a warning."""
    out = args.output.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if out == source or out in source.parents:
            raise ConversionError(f"output {args.output} is, or holds, the input {given}; choose another output")
    remove_stale_staging(out)  # (before the base loads: frees their space; may give back an old checkpoint)
    if out.exists():
        if not args.overwrite:
            raise CheckpointError(f"{args.output} exists; pass --overwrite to replace it")
        if not replaceable(out):
            raise CheckpointError(f"{args.output} exists and is not a meteora-jax checkpoint; --overwrite replaces only "
                                  "checkpoints (remove it yourself, or choose another output)")
    parent = next(p for p in out.parents if p.exists())  # the folders below it are created
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"cannot write {args.output}: {parent} is not a writable folder")


def _run_base(args) -> Path:
    progress = not args.quiet
    _check_output(args, [args.source])
    config, params, base_meta = load_base(args.source, args.dtype, args.gguf_file, progress)
    check_param_tree(params, config, str(args.source))
    return save_checkpoint(args.output, params, config, {**_header("base", config), "base": base_meta, "adapters": []},
                           overwrite=args.overwrite)


def _check_top_k(args) -> None:
    if args.top_k < 1:
        raise ConversionError(f"--top-k {args.top_k} must be >= 1")


def _run_loras(args) -> Path:
    from meteora_jax.convert.peft import adapters_metadata, check_adapter_dirs, load_peft_adapters, stack_adapters

    progress = not args.quiet
    _check_top_k(args)
    if not (np.isfinite(args.gate_std) and args.gate_std >= 0):
        raise ConversionError(f"--gate-std {args.gate_std} must be a finite number >= 0")
    if args.seed < 0:  # numpy's generator takes non-negative seeds only
        raise ConversionError(f"--seed {args.seed} must be >= 0")
    entries = _adapter_list(args)
    _check_output(args, [args.base, *(path for _, path in entries)])
    check_adapter_dirs(entries)  # before the base model, which may take minutes to load
    config, params, base_meta = load_base(args.base, args.dtype, args.gguf_file, progress)
    adapters = load_peft_adapters(entries, config, progress=progress)
    params, config = stack_adapters(
        adapters, params, config, top_k=args.top_k, gate_seed=args.seed, gate_std=args.gate_std, progress=progress
    )
    check_param_tree(params, config, str(args.output))
    metadata = {
        **_header("loras", config),
        "base": base_meta,
        "adapters": adapters_metadata(adapters),
        "gates": {"init": "normal", "std": args.gate_std, "seed": args.seed},
    }
    return save_checkpoint(args.output, params, config, metadata, overwrite=args.overwrite)


def _run_reference(args) -> Path:
    from meteora_jax.convert.peft import read_order_file
    from meteora_jax.convert.reference import load_reference, reference_files

    progress = not args.quiet
    if args.rslora and args.lora_alpha is None:
        raise ConversionError("--rslora needs --lora-alpha")
    if args.names and args.order_file:
        raise ConversionError("give adapter names with --names or --order-file, not both")
    _check_top_k(args)
    _check_output(args, [args.base, args.checkpoint])
    names = None
    if args.names:
        names = [name.strip() for name in args.names.split(",")]
    elif args.order_file:
        names = [name for name, _ in read_order_file(args.order_file)]
    reference_files(args.checkpoint)  # a missing checkpoint is named before the base is loaded (minutes)
    config, params, base_meta = load_base(args.base, args.dtype, args.gguf_file, progress)
    params, config, ref_meta = load_reference(
        args.checkpoint,
        params,
        config,
        names=names,
        num_adapters=args.num_adapters,
        scaling=None if args.scaling is None else (args.scaling if len(args.scaling) > 1 else args.scaling[0]),
        lora_alpha=None if args.lora_alpha is None else (args.lora_alpha if len(args.lora_alpha) > 1 else args.lora_alpha[0]),
        use_rslora=args.rslora,
        top_k=args.top_k,
        progress=progress,
    )
    check_param_tree(params, config, str(args.output))
    metadata = {**_header("reference", config), "base": base_meta, **ref_meta}
    return save_checkpoint(args.output, params, config, metadata, overwrite=args.overwrite)


def describe(meta: dict) -> str:
    """A human-readable summary of a checkpoint's metadata."""
    cfg = meta["model_config"]
    m = cfg["meteora"]
    lines = [
        f"kind: {meta.get('kind', '?')}   created: {meta.get('created', '?')}   base: {meta.get('base', {}).get('source', '?')}",
        f"model: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, "
        f"heads {cfg['num_heads']}/{cfg['num_kv_heads']} (head_dim {cfg['head_dim']}), vocab {cfg['vocab_size']}, "
        f"dtype {cfg['param_dtype']}, tied embeddings {cfg['tie_word_embeddings']}",
        f"meteora: {m['num_adapters']} adapters, padded rank {m['rank']}, top_k {m['top_k']}, "
        f"targets {', '.join(m['targets'])}" if m["num_adapters"] else "meteora: no adapters (a plain LLaMA)",
    ]
    adapters = meta.get("adapters") or []
    if adapters:
        lines.append("adapters (index order):")
        for i, a in enumerate(adapters):
            rank = a.get("rank", a.get("ranks"))
            if a.get("max_rank", rank) != rank:
                rank = f"{rank} (patterns up to {a['max_rank']})"
            lines.append(
                f"  [{i:2d}] {a['name']:<20} rank {rank}  alpha {a.get('lora_alpha')}  rslora {a.get('use_rslora')}  "
                f"targets {','.join(a.get('target_modules', []))}  {a.get('source', '')}"
            )
    total = 0
    lines.append("params:")
    for path, (shape, dtype) in sorted(meta["param_shapes"].items()):
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(_np_dtype(dtype)).itemsize
        total += size
        lines.append(f"  {path:<45} {str(tuple(shape)):<24} {dtype}")
    lines.append(f"total: {len(meta['param_shapes'])} arrays, {total / 2**20:.1f} MiB")
    return "\n".join(lines)


def _np_dtype(name: str):
    import jax.numpy as jnp

    return jnp.dtype(name)


def _run_inspect(args) -> None:
    meta = read_metadata(args.checkpoint)
    print(json.dumps(meta, indent=2) if args.json else describe(meta))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 conversion error, 2 usage error)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("meteora_jax").setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    if getattr(args, "quiet", False):  # transformers' own bars (GGUF dequantisation, weight loading)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        if args.command == "inspect":
            _run_inspect(args)
            return 0
        run = {"base": _run_base, "loras": _run_loras, "reference": _run_reference}[args.command]
        path = run(args)
    except (ConversionError, WeightsError, ConfigError, CheckpointError) as err:
        print(f"meteora-convert {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # the disk, not the inputs: full, or the output taken away meanwhile
        print(f"meteora-convert {args.command}: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


class _Stopped(BaseException):
    """Raised by SIGTERM; a BaseException, so no `except Exception` on the way swallows it."""


def _raise_stop(signum, frame):
    raise _Stopped()


def console_main() -> int:
    """The `meteora-convert` command (and scripts/convert.py): `main` with SIGTERM (a scheduler's
    time limit) unwinding like Ctrl-C, so an unfinished checkpoint's hidden staging folder is
    removed by save_checkpoint's cleanup instead of staying beside the output. Either ends with one
    line and exit status 143 (SIGTERM) or 130 (Ctrl-C), not a traceback. Only the command sets the
    handler: a program that calls `main` keeps its own SIGTERM and KeyboardInterrupt behaviour."""
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        return main()
    except (_Stopped, KeyboardInterrupt) as stop:
        signum = signal.SIGTERM if isinstance(stop, _Stopped) else signal.SIGINT
        print(f"meteora-convert: stopped by {signum.name}; nothing written", file=sys.stderr)
        return 128 + int(signum)


if __name__ == "__main__":
    sys.exit(console_main())
