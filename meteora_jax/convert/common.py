"""Pieces shared by the PEFT and reference converters: the error type, tensor-file reading with
clear errors, hashing, dtype and finiteness checks and the check that a parameter tree fits its config."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np

from meteora_jax.config import ALL_PROJECTIONS, ModelConfig, block_of
from meteora_jax.convert.hf_base import non_float_dtype, projection_shape, tensor_to_numpy


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the adapter or file and the key."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_tensor_file(
    path: str | os.PathLike, what: str = "", keep: Optional[Callable[[str], bool]] = None
) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file or one torch pickle (`.bin` / `.pt` / `.pth`).

    A torch file may hold the state dict itself or a dict with a single `state_dict` / `model`
    entry that does. Truncated or corrupt files raise ConversionError naming the file.
    `what` (e.g. "adapter 'math'") prefixes the error messages. `keep(key)` False skips a tensor
    (a safetensors file then never reads it).
    """
    path = Path(path)
    prefix = f"{what}: " if what else ""
    if not path.is_file():
        raise ConversionError(f"{prefix}{path}: weights file not found")
    tensors: dict[str, np.ndarray] = {}
    try:
        if path.suffix == ".safetensors":
            import jax
            from safetensors import safe_open

            # The flax backend reads bf16; keep the arrays on the host, not on an accelerator.
            with jax.default_device(jax.devices("cpu")[0]):
                with safe_open(str(path), framework="flax") as handle:
                    for key in handle.keys():
                        if keep is None or keep(key):
                            tensors[key] = np.asarray(handle.get_tensor(key))
        else:
            import torch

            try:  # memory-mapped where the file format allows it (torch's zip format)
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, Mapping) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
                state = next(iter(state.values()))
            if not isinstance(state, Mapping):
                raise ConversionError(f"{prefix}{path}: holds a {type(state).__name__}, not a state dict")
            for key, value in state.items():
                if keep is not None and not keep(key):
                    continue
                if not hasattr(value, "detach"):
                    raise ConversionError(f"{prefix}{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
                tensors[key] = tensor_to_numpy(value)
    except ConversionError:
        raise
    except Exception as err:  # truncated files, bad headers, unpickling errors
        raise ConversionError(
            f"{prefix}{path}: cannot read weights, the file is truncated or corrupt ({type(err).__name__}: {err})"
        ) from err
    return tensors


def check_float(value: np.ndarray, what: str, key: str) -> None:
    """A weight read from a file is floating point: a bool or integer tensor (a damaged or foreign
    file) would otherwise be stored as 0/1 or integer weights."""
    dtype = non_float_dtype(value)
    if dtype is not None:
        raise ConversionError(f"{what}: key {key!r} has dtype {dtype}; weights must be floating point")


def check_finite(value: np.ndarray, what: str, key: str) -> None:
    if not np.all(np.isfinite(np.asarray(value, np.float32))):
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(np.asarray(value, np.float32))))
        raise ConversionError(f"{what}: tensor {key!r} has {bad} non-finite values (NaN or inf)")


def check_params_finite(params: dict, what: str) -> None:
    """Every leaf of a parameter tree is finite (e.g. base weights from a damaged download)."""
    for path, leaf in _leaves(params):
        check_finite(leaf, what, path)


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            yield from _leaves(value, path)
        else:
            yield path, value


def expected_param_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """'path/to/leaf' -> (shape, dtype name) of every parameter `LlamaForCausalLM(config)` has."""
    n, d, v = config.num_layers, config.hidden_size, config.vocab_size
    wdt = np.dtype(config.weight_dtype).name
    shapes = {
        "embed_tokens/embedding": ((v, d), wdt),
        "norm/scale": ((d,), wdt),
        "layers/input_layernorm/scale": ((n, d), wdt),
        "layers/post_attention_layernorm/scale": ((n, d), wdt),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head/kernel"] = ((d, v), wdt)
    meteora = config.meteora
    L, r = meteora.num_adapters, meteora.rank
    for projection in ALL_PROJECTIONS:
        d_in, d_out = projection_shape(config, projection)
        base = f"layers/{block_of(projection)}/{projection}"
        shapes[f"{base}/kernel"] = ((n, d_in, d_out), wdt)
        if meteora.adapts(projection):
            shapes[f"{base}/lora_a"] = ((n, L, d_in, r), wdt)
            shapes[f"{base}/lora_b"] = ((n, L, r, d_out), wdt)
            shapes[f"{base}/lora_scaling"] = ((n, L), "float32")
            shapes[f"{base}/gate"] = ((n, d_in, L), "float32")
    return shapes


def check_param_tree(params: dict, config: ModelConfig, what: str = "params") -> None:
    """The tree has exactly the leaves, shapes and dtypes the model built from `config` expects."""
    want = expected_param_shapes(config)
    have = {path: (tuple(np.shape(leaf)), np.dtype(leaf.dtype).name) for path, leaf in _leaves(params)}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise ConversionError(f"{what}: parameter tree does not fit the config (missing {missing}, unexpected {extra})")
    for path, (shape, dtype) in want.items():
        if have[path] != (shape, dtype):
            raise ConversionError(f"{what}: parameter {path!r} is {have[path]}, the config implies {(shape, dtype)}")
