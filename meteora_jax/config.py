"""Model and MeteoRA hyper-parameters, and their construction from an HF `LlamaConfig`.

The model modules take these frozen dataclasses (hashable, so Flax can hold them as attributes).
User-facing configs are ml_collections files under `configs/`; `ModelConfig.from_dict`
turns their `model` section into a `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import jax.numpy as jnp

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ALL_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS



def block_of(projection: str) -> str:
    """"self_attn" or "mlp": the decoder block (HF module and our param subtree) of a projection."""
    return "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"


REMAT_POLICIES = ("none", "full", "dots")
# grouped_lora implementations the model may use ("xla_gather" materialises [T, k, d_in, r]: it
# exists as a benchmark baseline only).
MODEL_KERNEL_IMPLS = ("auto", "xla", "pallas", "xla_dense", "xla_concat", "xla_ragged")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A model configuration that cannot be built or does not match the weights."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """The llama3 `rope_scaling` variant (HF `rope_type="llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        # (A factor of 0 gave NaN logits without an error; the smoothing divides by high - low.)
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            if not is_positive_number(getattr(self, name)):
                raise ConfigError(f"rope_scaling.{name}={getattr(self, name)!r} must be a finite positive number")
        if not is_positive_int(self.original_max_position_embeddings):
            raise ConfigError(f"rope_scaling.original_max_position_embeddings={self.original_max_position_embeddings!r} "
                              "must be a positive integer")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                              f"low_freq_factor={self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class MeteoRAConfig:
    """How many adapters each projection embeds and how tokens are routed to them.

    num_adapters = 0 makes a plain LLaMA. `rank` is the padded (largest) rank of the adapters.
    """

    num_adapters: int = 0
    rank: int = 8
    top_k: int = 2
    targets: tuple[str, ...] = ALL_PROJECTIONS
    kernel_impl: str = "auto"

    def __post_init__(self):
        unknown = set(self.targets) - set(ALL_PROJECTIONS)
        if unknown:
            raise ConfigError(f"meteora.targets has unknown projections {sorted(unknown)}; known: {ALL_PROJECTIONS}")
        integers = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (self.num_adapters, self.rank))
        if not (integers and self.num_adapters >= 0 and self.rank >= 1):
            raise ConfigError(f"meteora needs integers num_adapters >= 0 and rank >= 1, got {self.num_adapters!r}, "
                              f"{self.rank!r}")
        if self.kernel_impl not in MODEL_KERNEL_IMPLS:
            raise ConfigError(f"meteora.kernel_impl={self.kernel_impl!r}; choose one of {MODEL_KERNEL_IMPLS}")
        if self.num_adapters and not 1 <= self.top_k <= self.num_adapters:
            raise ConfigError(f"meteora.top_k={self.top_k} must be between 1 and num_adapters={self.num_adapters}")

    def adapts(self, projection: str) -> bool:
        return self.num_adapters > 0 and projection in self.targets


@dataclasses.dataclass(frozen=True)
class MixLoRAConfig:
    """MixLoRA's FFN experts (`meteora_jax.mixlora`): num_experts LoRAs of rank `rank` (scaling
    alpha / rank) on gate, up and down of every layer, top_k of them per token. num_experts = 0: off."""

    num_experts: int = 0
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    kernel_impl: str = "auto"

    def __post_init__(self):
        # (The module's helpers come later: the default instance is built at import.)
        integers = all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                       for v in (self.num_experts, self.rank, self.top_k))
        if not (integers and self.num_experts >= 0 and self.rank >= 1):
            raise ConfigError(f"mixlora needs integers num_experts >= 0, rank >= 1 and top_k, got {self.num_experts!r}, "
                              f"{self.rank!r}, {self.top_k!r}")
        if isinstance(self.alpha, bool) or not (isinstance(self.alpha, numbers.Real) and 0 < self.alpha < math.inf):
            raise ConfigError(f"mixlora.alpha={self.alpha!r} must be a finite positive number")
        if self.kernel_impl not in MODEL_KERNEL_IMPLS:
            raise ConfigError(f"mixlora.kernel_impl={self.kernel_impl!r}; choose one of {MODEL_KERNEL_IMPLS}")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"mixlora.top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")


_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-architecture decoder with MeteoRA projections (and, optionally, MixLoRA FFN experts)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # compute dtype; softmax, norms and gate logits stay float32
    param_dtype: str = "float32"  # storage of base weights and adapters; gates are always float32
    remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs)
    meteora: MeteoRAConfig = MeteoRAConfig()
    mixlora: MixLoRAConfig = MixLoRAConfig()

    def __post_init__(self):
        for name in _POSITIVE_INTS:
            if not is_positive_int(getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive integer")
        for name in ("rms_norm_eps", "rope_theta"):
            if not is_positive_number(getattr(self, name)):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a finite positive number")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings={self.tie_word_embeddings!r} must be True or False")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat={self.remat!r}; choose one of {REMAT_POLICIES}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r}; choose one of {tuple(DTYPES)}")
        shared = [p for p in MLP_PROJECTIONS if self.meteora.adapts(p)] if self.mixlora.num_experts else []
        if shared:
            raise ConfigError(f"mixlora puts its experts on the FFN, where meteora adapts {shared} too: "
                              "give meteora.targets without the FFN projections")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (stored in checkpoints). Without MixLoRA experts it has no
        "mixlora" key, so that code older than MixLoRA still reads the checkpoints it can run."""
        values = dataclasses.asdict(self)
        if not self.mixlora.num_experts:
            del values["mixlora"]
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of `to_dict`; also accepts an ml_collections `ConfigDict`. Unknown keys are errors."""
        values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in values)
        if missing:
            raise ConfigError(f"model config lacks keys {missing}")
        if values.get("rope_scaling") is not None:
            rope = dict(values["rope_scaling"])
            rope_keys = [f.name for f in dataclasses.fields(RopeScaling)]
            if sorted(rope) != sorted(rope_keys):
                raise ConfigError(f"rope_scaling has keys {sorted(rope)}; want exactly {rope_keys} (llama3 scaling)")
            values["rope_scaling"] = RopeScaling(**rope)
        meteora = dict(values.get("meteora") or {})
        unknown = set(meteora) - {f.name for f in dataclasses.fields(MeteoRAConfig)}
        if unknown:
            raise ConfigError(f"unknown model.meteora config keys {sorted(unknown)}")
        if "targets" in meteora:
            meteora["targets"] = tuple(meteora["targets"])
        values["meteora"] = MeteoRAConfig(**meteora)
        mixlora = dict(values.get("mixlora") or {})  # (absent from checkpoints written before it)
        unknown = set(mixlora) - {f.name for f in dataclasses.fields(MixLoRAConfig)}
        if unknown:
            raise ConfigError(f"unknown model.mixlora config keys {sorted(unknown)}")
        values["mixlora"] = MixLoRAConfig(**mixlora)
        return cls(**values)

    @classmethod
    def from_hf(cls, hf_config, meteora: MeteoRAConfig = MeteoRAConfig(), **overrides) -> "ModelConfig":
        """Maps a transformers `LlamaConfig` (or its dict) onto a `ModelConfig`.

        Refuses configs that are not LLaMA-architecture: other model types, biased projections,
        activations other than SiLU, and rope variants other than default/llama3.
        """
        hf = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        model_type = hf.get("model_type")
        if model_type != "llama":
            raise ConfigError(f"model_type={model_type!r} is not supported; meteora-jax loads LLaMA-architecture models")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"HF config has {flag}=True; LLaMA projections without bias are supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={hf.get('hidden_act')!r}; only 'silu' (SwiGLU) is supported")
        missing = [key for key in _HF_REQUIRED if not _is_int(hf.get(key))]
        if missing:
            raise ConfigError(f"HF config lacks integer keys {missing}")
        rope_theta, rope_scaling = _rope_from_hf(hf)
        num_heads = _hf_int(hf, "num_attention_heads")
        tie = hf.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):  # bool("false") would be True
            raise ConfigError(f"HF config key 'tie_word_embeddings' must be true or false, got {tie!r}")
        values = dict(
            vocab_size=_hf_int(hf, "vocab_size"),
            hidden_size=_hf_int(hf, "hidden_size"),
            intermediate_size=_hf_int(hf, "intermediate_size"),
            num_layers=_hf_int(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=_hf_int(hf, "num_key_value_heads", num_heads),
            head_dim=_hf_int(hf, "head_dim", hf["hidden_size"] // num_heads),
            rms_norm_eps=_hf_float(hf, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=_hf_int(hf, "max_position_embeddings", 2048),
            tie_word_embeddings=tie,
            meteora=meteora,
        )
        values.update(overrides)
        return cls(**values)


def describe_changes(before: Mapping[str, Any], now: Mapping[str, Any], limit: int = 8) -> str:
    """'key old -> new, ...' for the keys of two flat {"section.key": value} dicts whose values
    differ (sorted; after `limit` of them, "and N more"); "" when none differ."""
    changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
    shown = ", ".join(f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in changed[:limit])
    return shown + (f" and {len(changed) - limit} more" if len(changed) > limit else "")


_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # JSON true is not a size


def is_positive_int(value) -> bool:
    """An integer > 0 (not a bool: JSON true is not a size)."""
    return _is_int(value) and value > 0


def is_positive_number(value) -> bool:
    """A finite number > 0 (an int too, not a bool)."""
    return (_is_int(value) or (isinstance(value, numbers.Real) and not isinstance(value, bool)
                               and math.isfinite(value))) and value > 0


def _hf_int(hf: Mapping[str, Any], key: str, default: int | None = None, label: str | None = None) -> int:
    """A positive integer of the HF config; `default` when the key is absent or null."""
    value = hf.get(key)
    if value is None and default is not None:
        return default
    if not is_positive_int(value):
        raise ConfigError(f"HF config key {label or key!r} must be a positive integer, got {value!r}")
    return value


def _hf_float(hf: Mapping[str, Any], key: str, default: float | None, label: str | None = None) -> float:
    """A finite positive number of the HF config; `default` when the key is absent or null."""
    value = hf.get(key)
    if value is None and default is not None:
        return default
    if not is_positive_number(value):
        raise ConfigError(f"HF config key {label or key!r} must be a finite positive number, got {value!r}")
    return float(value)


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Reads rope theta and scaling from either the transformers 4.x or 5.x config layout."""
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], Mapping):
            raise ConfigError(f"HF config key {key!r} must be an object, got {hf[key]!r}")
    current = dict(hf.get("rope_parameters") or {})  # transformers >= 5
    legacy = dict(hf.get("rope_scaling") or {})  # transformers 4.x
    params = {**legacy, **current}

    def label(key: str) -> str:  # where a key came from, for messages
        return f"{'rope_parameters' if key in current else 'rope_scaling'}.{key}"

    if "rope_theta" in params:
        theta = _hf_float(params, "rope_theta", None, label=label("rope_theta"))
    else:
        theta = _hf_float(hf, "rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"rope_type={rope_type!r} is not supported; supported: default, llama3")
    missing = [key for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
               if params.get(key) is None]
    if missing:
        where = "rope_parameters" if current else "rope_scaling"
        raise ConfigError(f"HF config key {where!r} (rope_type 'llama3') lacks {missing}")
    return theta, RopeScaling(
        factor=_hf_float(params, "factor", None, label=label("factor")),
        low_freq_factor=_hf_float(params, "low_freq_factor", None, label=label("low_freq_factor")),
        high_freq_factor=_hf_float(params, "high_freq_factor", None, label=label("high_freq_factor")),
        original_max_position_embeddings=_hf_int(
            params, "original_max_position_embeddings", label=label("original_max_position_embeddings")
        ),
    )
