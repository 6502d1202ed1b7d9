"""HF PEFT LoRA adapter directories -> stacked MeteoRA adapter parameters.

One adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (or
`adapter_model.bin`). Its tensors are named like

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, d_in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [d_out, r]

Accepted variants: without the `base_model.model.` prefix, and with an adapter-name segment
(`lora_A.default.weight`, `lora_A.<name>.weight`; one name per file). Per module, the scaling is
`alpha / r`, or `alpha / sqrt(r)` with `use_rslora`, where `r` and `alpha` come from
`rank_pattern` / `alpha_pattern` when a pattern matches the module (PEFT's own rule), else from
`r` / `lora_alpha`. `target_modules` (list, regex or "all-linear"), `exclude_modules` and
`layers_to_transform` decide which modules must be present; the weights must match exactly.

Refused (ConversionError naming the adapter, the file and the key): DoRA, trained bias tensors,
`lora_bias`, `modules_to_save`, `fan_in_fan_out`, `target_parameters`, `layer_replication`,
`trainable_token_indices`, `alora_invocation_tokens`, QA-LoRA, BD-LoRA, Arrow, MonteCLoRA,
KaSA, initialisations that modify the base (`init_lora_weights` PiSSA, OLoRA, CorDA, LoRA-GA,
LoftQ; PEFT's `path_initial_model_for_weight_conversion` turns the first four into plain LoRA),
full embedding / lm_head weights (a resized vocabulary), malformed regular expressions, targets
that name a LLaMA module other than the seven projections, an `r` that is not a positive integer
or a `lora_alpha` that is not a finite number > 0, shapes of another base model, bool or integer
tensors, non-finite values, unreadable files. Accepted as PEFT loads them: target-list entries that match no LLaMA
module (generic lists such as ["q_proj", "v_proj", "query_key_value"]) and `bias="lora_only"`
(LLaMA's projections have no bias, so nothing extra is trained).

Stacking (`stack_adapters`): adapter l of L fills `lora_a[:, l] [n, d_in, r_max]` (A transposed,
zero-padded to the largest rank), `lora_b[:, l] [n, r_max, d_out]` and `lora_scaling[:, l] [n]`;
modules an adapter does not adapt stay zero (scaling 0), so it contributes nothing there. Gates
are fresh: normal(0, gate_std) float32 from `gate_seed`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from meteora_jax.config import ALL_PROJECTIONS, MeteoRAConfig, ModelConfig, block_of, is_positive_int, is_positive_number
from meteora_jax.convert.common import (
    ConversionError,
    check_finite,
    check_float,
    read_tensor_file,
    sha256_file,
)
from meteora_jax.convert.hf_base import projection_shape

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+?)"
    r"\.(?P<ab>lora_A|lora_B)\.(?:(?P<name>[^.]+)\.)?weight$"
)
# LLaMA modules that match a target_modules entry but cannot carry a MeteoRA adapter.
_LLAMA_NON_PROJECTIONS = ("embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm",
                          "self_attn", "mlp", "layers", "model", "rotary_emb", "act_fn")

# adapter_config.json fields that change the computation in ways a plain stacked LoRA cannot hold.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "LoRA biases (lora_bias=true)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D layers, not LLaMA)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
}


def _base_changing_init(init) -> Optional[str]:
    """`init_lora_weights` (lower case) when that initialisation also rewrote the base weights, else
    None: the trained adapter then fits PEFT's modified base, not the original one stacked here."""
    if not isinstance(init, str):
        return None
    init = init.lower()
    if init.startswith(("pissa", "corda")) or init in ("olora", "lora_ga", "loftq"):  # "pissa_niter_16" too
        return init
    return None


def module_name(layer: int, projection: str) -> str:
    """PEFT's name of a projection inside `LlamaForCausalLM`, e.g. `model.layers.0.mlp.up_proj`."""
    return f"model.layers.{layer}.{block_of(projection)}.{projection}"


def saved_key(layer: int, projection: str, ab: str) -> str:
    """The key `save_pretrained` writes for one LoRA factor (`ab` is "lora_A" or "lora_B")."""
    return f"base_model.model.{module_name(layer, projection)}.{ab}.weight"


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _listed(entries, name: str) -> bool:
    """PEFT's target/exclude rule: a regex string must match the whole name, a list entry its tail."""
    if isinstance(entries, str):
        return re.fullmatch(entries, name) is not None
    return any(name == entry or name.endswith(f".{entry}") for entry in entries)


@dataclasses.dataclass
class LoraModule:
    """One adapted projection of one layer."""

    a: np.ndarray  # [r, d_in], as stored by PEFT
    b: np.ndarray  # [d_out, r]
    rank: int
    alpha: float
    scaling: float


@dataclasses.dataclass
class PeftAdapter:
    name: str
    path: Path
    weights_file: Path
    sha256: str
    config: dict  # adapter_config.json as read
    modules: dict  # (layer, projection) -> LoraModule

    @property
    def projections(self) -> tuple[str, ...]:
        present = {projection for _, projection in self.modules}
        return tuple(p for p in ALL_PROJECTIONS if p in present)

    @property
    def max_rank(self) -> int:
        return max(module.rank for module in self.modules.values())

    def metadata(self) -> dict:
        cfg = self.config
        return {
            "name": self.name,
            "format": "peft",
            "source": str(self.path.resolve()),
            "weights_file": self.weights_file.name,
            "sha256": self.sha256,
            "config_sha256": sha256_file(self.path / ADAPTER_CONFIG),
            "rank": int(cfg["r"]),
            "max_rank": self.max_rank,
            "lora_alpha": float(cfg["lora_alpha"]),
            "use_rslora": bool(cfg.get("use_rslora", False)),
            "rank_pattern": dict(cfg.get("rank_pattern") or {}),
            "alpha_pattern": dict(cfg.get("alpha_pattern") or {}),
            "target_modules": list(self.projections),
            "layers": sorted({layer for layer, _ in self.modules}),
            "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        }


def _read_adapter_config(name: str, path: Path) -> dict:
    config_path = path / ADAPTER_CONFIG
    if not path.is_dir():
        raise ConversionError(f"adapter {name!r}: {path} is not a directory")
    if not config_path.is_file():
        raise ConversionError(f"adapter {name!r}: {config_path} is missing (every PEFT adapter directory needs it)")
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"adapter {name!r}: {config_path} is not valid UTF-8 JSON ({err})") from err
    what = f"adapter {name!r} ({config_path})"
    if not isinstance(cfg, dict):
        raise ConversionError(f"{what}: holds a JSON {type(cfg).__name__}, not an object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{what}: key 'peft_type' is {cfg['peft_type']!r}; only LORA adapters are supported")
    # (NaN, Infinity and true are valid JSON for Python's json module: a NaN alpha gave NaN scalings)
    if not is_positive_int(cfg.get("r")):
        raise ConversionError(f"{what}: key 'r' must be a positive integer, got {cfg.get('r')!r}")
    if not is_positive_number(cfg.get("lora_alpha")):
        raise ConversionError(f"{what}: key 'lora_alpha' must be a finite number > 0, got {cfg.get('lora_alpha')!r}")
    # bias="lora_only" / "all" on LLaMA trains nothing (its projections have no bias); bias tensors
    # in the weights file are refused by key.
    for key, feature in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ConversionError(f"{what}: key {key!r} = {cfg[key]!r}: {feature} is not supported")
    init = _base_changing_init(cfg.get("init_lora_weights"))
    if init == "loftq":
        raise ConversionError(
            f"{what}: key 'init_lora_weights' = {cfg['init_lora_weights']!r}: LoftQ adapters are trained on "
            f"LoftQ's quantised base, not on the original weights; they are not supported"
        )
    if init is not None:
        raise ConversionError(
            f"{what}: key 'init_lora_weights' = {cfg['init_lora_weights']!r}: this initialisation modifies the "
            f"base weights, so the adapter does not fit the original base. Convert it to a plain LoRA adapter "
            f"with PEFT first: save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved "
            f"right after initialisation>)"
        )
    _check_types(cfg, what)  # after the unsupported kinds, whose own message says more
    if isinstance(cfg["target_modules"], str) and cfg.get("layers_to_transform") is not None:
        raise ConversionError(  # PEFT's LoraConfig refuses the same
            f"{what}: key 'layers_to_transform' cannot be used when 'target_modules' is a string"
        )
    targets = cfg["target_modules"]
    if not isinstance(targets, str):
        # Entries that match no LLaMA module are ignored, as PEFT does (generic lists such as
        # ["q_proj", "v_proj", "query_key_value", "c_attn"]); a LLaMA module that is not a projection is refused.
        for entry in targets:
            if entry.split(".")[-1] in _LLAMA_NON_PROJECTIONS:
                raise ConversionError(
                    f"{what}: key 'target_modules' lists {entry!r}; only the LLaMA projections "
                    f"{ALL_PROJECTIONS} can carry MeteoRA adapters"
                )
    return cfg


def _is_str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_types(cfg: dict, what: str) -> None:
    """The adapter_config.json keys this converter reads, with the JSON types PEFT writes."""
    kinds = {  # key: (check, what it must be); None (absent) is fine for all but target_modules
        "target_modules": (lambda v: isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
        "exclude_modules": (lambda v: v is None or isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
        "layers_to_transform": (lambda v: v is None or isinstance(v, int) or (isinstance(v, list) and all(
            isinstance(i, int) for i in v)), "an integer or a list of integers"),
        "rank_pattern": (lambda v: v is None or (isinstance(v, dict) and all(map(is_positive_int, v.values()))),
                         "an object of positive integers"),
        "alpha_pattern": (lambda v: v is None or (isinstance(v, dict) and all(map(is_positive_number, v.values()))),
                          "an object of finite numbers > 0"),
    }
    for key, (ok, kind) in kinds.items():
        if key == "target_modules" and cfg.get(key) is None:
            raise ConversionError(f"{what}: key 'target_modules' is missing")
        if not ok(cfg.get(key)):
            raise ConversionError(f"{what}: key {key!r} must be {kind}, got {cfg.get(key)!r}")
    # Regular expressions, compiled now: a broken one would otherwise fail only after the base has loaded.
    patterns = [(key, cfg[key]) for key in ("target_modules", "exclude_modules") if isinstance(cfg.get(key), str)]
    patterns += [(key, pattern) for key in ("rank_pattern", "alpha_pattern") for pattern in cfg.get(key) or {}]
    for key, pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConversionError(
                f"{what}: key {key!r} holds {pattern!r}, not a valid regular expression ({err})"
            ) from err


def _weights_file(name: str, path: Path) -> Path:
    for filename in WEIGHT_FILES:
        if (path / filename).is_file():
            return path / filename
    raise ConversionError(f"adapter {name!r}: {path} has no {' or '.join(WEIGHT_FILES)}")


def _targeted(cfg: dict, layer: int, name: str) -> bool:
    """PEFT's check_target_module_exists, in its order: exclusions first; a regex or "all-linear"
    (any case) string; an exact module name in the list, which skips layers_to_transform; else a
    list entry matching the name's tail, then layers_to_transform."""
    targets, exclude = cfg["target_modules"], cfg.get("exclude_modules")
    if exclude and _listed(exclude, name):
        return False
    if isinstance(targets, str):
        return targets.lower() == "all-linear" or _listed(targets, name)
    if name in targets:
        return True
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    return _listed(targets, name) and (not layers or layer in layers)


def _expected_modules(cfg: dict, config: ModelConfig) -> set[tuple[int, str]]:
    """(layer, projection) pairs that adapter_config.json says the adapter adapts."""
    return {
        (layer, projection)
        for layer in range(config.num_layers)
        for projection in ALL_PROJECTIONS
        if _targeted(cfg, layer, module_name(layer, projection))
    }


def load_peft_adapter(name: str, path: str | os.PathLike, config: ModelConfig) -> PeftAdapter:
    """Reads and validates one PEFT adapter directory against the base model `config`."""
    path = Path(path)
    cfg = _read_adapter_config(name, path)
    weights_file = _weights_file(name, path)
    what = f"adapter {name!r} ({weights_file})"
    tensors = read_tensor_file(weights_file, f"adapter {name!r}")

    factors: dict[tuple[int, str], dict[str, tuple[str, np.ndarray]]] = {}
    names_in_keys = set()
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            if "lora_magnitude_vector" in key:
                raise ConversionError(f"{what}: key {key!r} is a DoRA magnitude; DoRA is not supported")
            if "modules_to_save" in key or "original_module" in key:
                raise ConversionError(f"{what}: key {key!r} belongs to modules_to_save, which is not supported")
            if key.endswith(".bias"):
                raise ConversionError(f"{what}: key {key!r} is a trained bias (adapter_config.json bias="
                                      f"{cfg.get('bias')!r}); only LoRA factors are supported")
            if key.endswith(("embed_tokens.weight", "lm_head.weight")):
                raise ConversionError(f"{what}: key {key!r} is a full {tuple(value.shape)} weight: the adapter was "
                                      "trained with a resized vocabulary or trained embeddings, which is not supported")
            if "lora_embedding" in key:
                raise ConversionError(f"{what}: key {key!r} is an embedding LoRA; only projections are supported")
            raise ConversionError(f"{what}: key {key!r} is not a LoRA factor of a LLaMA projection")
        layer, projection = int(match["layer"]), match["proj"]
        if projection not in ALL_PROJECTIONS or block_of(projection) != match["block"]:
            raise ConversionError(f"{what}: key {key!r} names no LLaMA projection")
        if layer >= config.num_layers:
            raise ConversionError(
                f"{what}: key {key!r} is for layer {layer}, the base model has {config.num_layers} layers "
                f"(adapter trained on a different base?)"
            )
        names_in_keys.add(match["name"])
        factors.setdefault((layer, projection), {})[match["ab"]] = (key, value)
    if len(names_in_keys) > 1:
        raise ConversionError(f"{what}: keys carry several adapter names {sorted(map(str, names_in_keys))}")
    if not factors:
        raise ConversionError(f"{what}: holds no LoRA tensors")

    expected = _expected_modules(cfg, config)
    last_layer = max(layer for layer, _ in factors)
    for layer, projection in sorted(expected - set(factors)):
        fewer = (f" (its keys stop at layer {last_layer}, the base model has {config.num_layers} layers: trained on "
                 f"a different base?)" if layer > last_layer else "")
        raise ConversionError(
            f"{what}: key {saved_key(layer, projection, 'lora_A')!r} is missing, although adapter_config.json "
            f"targets {module_name(layer, projection)}{fewer}"
        )
    selection = ", ".join(f"{key}={cfg[key]!r}" for key in ("target_modules", "exclude_modules", "layers_to_transform")
                          if cfg.get(key) is not None)
    for layer, projection in sorted(set(factors) - expected):
        key = next(iter(factors[(layer, projection)].values()))[0]
        raise ConversionError(
            f"{what}: key {key!r} adapts {module_name(layer, projection)}, which adapter_config.json does not "
            f"target ({selection})"
        )

    use_rslora = bool(cfg.get("use_rslora", False))
    modules = {}
    for (layer, projection), pair in sorted(factors.items()):
        for ab in ("lora_A", "lora_B"):
            if ab not in pair:
                raise ConversionError(f"{what}: key {saved_key(layer, projection, ab)!r} is missing")
        (key_a, a), (key_b, b) = pair["lora_A"], pair["lora_B"]
        d_in, d_out = projection_shape(config, projection)
        mod = module_name(layer, projection)
        rank = int(_pattern_value(cfg.get("rank_pattern"), mod, cfg["r"]))
        # (key, tensor, axis that must equal the base model's size, that size, full expected shape)
        for key, value, axis, size, want in ((key_a, a, 1, d_in, (rank, d_in)), (key_b, b, 0, d_out, (d_out, rank))):
            check_float(value, what, key)
            if value.ndim != 2 or value.shape[axis] != size:
                layout = f"[r, {d_in}]" if axis == 1 else f"[{d_out}, r]"
                raise ConversionError(
                    f"{what}: key {key!r} has shape {tuple(value.shape)}, the base model implies {layout} "
                    f"(adapter trained on a different base?)"
                )
            if tuple(value.shape) != want:
                raise ConversionError(
                    f"{what}: key {key!r} has shape {tuple(value.shape)} but adapter_config.json implies rank "
                    f"{rank}, i.e. {want}"
                )
            check_finite(value, what, key)
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), mod, cfg["lora_alpha"]))
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules[(layer, projection)] = LoraModule(a=a, b=b, rank=rank, alpha=alpha, scaling=scaling)
    return PeftAdapter(
        name=name, path=path, weights_file=weights_file, sha256=sha256_file(weights_file), config=cfg, modules=modules
    )


def check_adapter_names(names: Sequence[str]) -> None:
    seen = set()
    for name in names:
        if not name or any(c in name for c in "=/\n"):
            raise ConversionError(f"adapter name {name!r} is empty or holds '=', '/' or a newline")
        if name in seen:
            raise ConversionError(f"adapter name {name!r} is given twice; adapter names must be unique")
        seen.add(name)


def check_adapter_dirs(adapters: Sequence[tuple[str, str | os.PathLike]]) -> None:
    """The cheap checks of `(name, directory)` pairs, for before the base model loads: unique names,
    each directory's adapter_config.json, and a weights file."""
    check_adapter_names([name for name, _ in adapters])
    for name, path in adapters:
        _read_adapter_config(name, Path(path))
        _weights_file(name, Path(path))


def load_peft_adapters(
    adapters: Sequence[tuple[str, str | os.PathLike]],
    config: ModelConfig,
    progress: bool = True,
) -> list[PeftAdapter]:
    """Loads `(name, directory)` pairs in the given order (the order is the adapter index)."""
    from tqdm.auto import tqdm

    check_adapter_names([name for name, _ in adapters])
    loaded = []
    for name, path in tqdm(adapters, desc="read adapters", disable=not progress, leave=False):
        loaded.append(load_peft_adapter(name, path, config))
    first_with = {}
    for adapter in loaded:  # allowed (an A/B of one adapter under two names), but rarely meant
        if adapter.sha256 in first_with:
            log.warning("adapters %r and %r have identical weights (%s); both are stacked", first_with[adapter.sha256],
                        adapter.name, adapter.weights_file.name)
        first_with.setdefault(adapter.sha256, adapter.name)
    return loaded


def stack_adapters(
    adapters: Sequence[PeftAdapter],
    base_params: dict,
    config: ModelConfig,
    *,
    top_k: int = 2,
    gate_seed: int = 0,
    gate_std: float = 0.02,
    progress: bool = True,
) -> tuple[dict, ModelConfig]:
    """Adds stacked adapters and fresh gates to a base parameter tree (numpy leaves, no adapters).

    Returns `(params, config)` with `config.meteora` = (L, max rank, top_k, union of adapted
    projections); a projection no adapter adapts stays a plain linear layer.
    """
    from tqdm.auto import tqdm

    if not adapters:
        raise ConversionError("no adapters given")
    num, n = len(adapters), config.num_layers
    rank = max(adapter.max_rank for adapter in adapters)
    targets = tuple(p for p in ALL_PROJECTIONS if any(p in a.projections for a in adapters))
    for adapter in adapters:
        missing = [p for p in targets if p not in adapter.projections]
        if missing:
            log.warning("adapter %r does not adapt %s; it contributes zero there", adapter.name, ", ".join(missing))
        partial = {p: sorted(l for l, q in adapter.modules if q == p) for p in adapter.projections}
        partial = {p: layers for p, layers in partial.items() if len(layers) < n}
        if partial:
            log.warning("adapter %r adapts only some layers (%s); it contributes zero elsewhere", adapter.name, partial)
    meteora = MeteoRAConfig(
        num_adapters=num, rank=rank, top_k=min(top_k, num), targets=targets, kernel_impl=config.meteora.kernel_impl
    )
    if top_k > num:
        log.warning("top_k=%d > %d adapters; using top_k=%d", top_k, num, num)
    config = config.replace(meteora=meteora)
    dtype = config.weight_dtype
    params = _copy_tree(base_params)
    for index, projection in enumerate(tqdm(targets, desc="stack adapters", disable=not progress, leave=False)):
        d_in, d_out = projection_shape(config, projection)
        lora_a = np.zeros((n, num, d_in, rank), np.float32)
        lora_b = np.zeros((n, num, rank, d_out), np.float32)
        scaling = np.zeros((n, num), np.float32)
        for l, adapter in enumerate(adapters):
            for layer in range(n):
                module = adapter.modules.get((layer, projection))
                if module is None:
                    continue
                lora_a[layer, l, :, : module.rank] = np.asarray(module.a, np.float32).T
                lora_b[layer, l, : module.rank, :] = np.asarray(module.b, np.float32).T
                scaling[layer, l] = module.scaling
        leaf = params["layers"][block_of(projection)][projection]
        leaf["lora_a"] = lora_a.astype(dtype)
        leaf["lora_b"] = lora_b.astype(dtype)
        leaf["lora_scaling"] = scaling
        leaf["gate"] = init_gate(gate_seed, index, (n, d_in, num), gate_std)
    return params, config


def init_gate(seed: int, projection_index: int, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Fresh gate [n, d_in, L]: normal(0, std) float32, one stream per (seed, projection)."""
    rng = np.random.default_rng([seed, projection_index])
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _copy_tree(tree: dict) -> dict:
    return {k: _copy_tree(v) if isinstance(v, dict) else v for k, v in tree.items()}


def adapters_metadata(adapters: Sequence[PeftAdapter]) -> list[dict[str, Any]]:
    return [adapter.metadata() for adapter in adapters]


def read_order_file(path: str | os.PathLike, parent: Optional[str | os.PathLike] = None) -> list[tuple[str, Path]]:
    """An adapter order file: one adapter per line, in index order; `#` starts a comment.

    A line is `name` (the directory `<parent>/name`) or `name=path` (relative paths are relative
    to the order file's folder). `parent` defaults to the order file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"order file {path} not found")
    parent = Path(parent) if parent is not None else path.parent
    entries = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConversionError(f"order file {path} is not UTF-8 text ({err})") from err
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" in line:
            name, target = (part.strip() for part in line.split("=", 1))
            target_path = Path(target) if Path(target).is_absolute() else path.parent / target
        else:
            name = line.rstrip("/")
            target_path = parent / name
        if not name:
            raise ConversionError(f"order file {path}, line {number}: empty adapter name")
        entries.append((name, target_path))
    if not entries:
        raise ConversionError(f"order file {path} lists no adapters")
    return entries
