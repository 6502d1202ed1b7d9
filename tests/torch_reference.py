"""Independent references in PyTorch for the model tests: transformers' LlamaForCausalLM built
from our configs and parameters (the parity oracle), and random tiny HF configs."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from meteora_jax.config import ALL_PROJECTIONS, ModelConfig, block_of
from meteora_jax.convert.hf_base import hf_projection_name


def tiny_hf_config(
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie: bool = False,
    llama3_rope: bool = False,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 160,
) -> LlamaConfig:
    rope = dict(rope_type="default", rope_theta=10000.0)
    if llama3_rope:
        rope = dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        )
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden - 16,  # deliberately not a power of two
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        rope_parameters=rope,
    )


def random_hf_model(hf_config: LlamaConfig, seed: int) -> HFLlama:
    """An HF model with random weights, norms included (HF initialises norms to ones)."""
    torch.manual_seed(seed)
    model = HFLlama(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def merged_hf_model(config: ModelConfig, params: dict, adapter_weights: np.ndarray | None = None) -> HFLlama:
    """transformers' LLaMA with our parameters, every adapted projection merged as
    W + sum_i adapter_weights[i] * s_i * A_i @ B_i (None: no adapters)."""
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=dict(rope_type="default", rope_theta=config.rope_theta),
    )
    model = HFLlama(hf_config).eval()
    f64 = lambda a: np.asarray(a, np.float64)
    state = {
        "model.embed_tokens.weight": f64(params["embed_tokens"]["embedding"]),
        "model.norm.weight": f64(params["norm"]["scale"]),
    }
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = f64(params["lm_head"]["kernel"]).T
    layers = params["layers"]
    for i in range(config.num_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{norm}.weight"] = f64(layers[norm]["scale"][i])
        for projection in ALL_PROJECTIONS:
            block = layers[block_of(projection)]
            leaves = block[projection]
            kernel = f64(leaves["kernel"][i])
            if adapter_weights is not None and "lora_a" in leaves:
                for e, weight in enumerate(adapter_weights):
                    delta = f64(leaves["lora_a"][i, e]) @ f64(leaves["lora_b"][i, e])
                    kernel = kernel + weight * f64(leaves["lora_scaling"][i, e]) * delta
            state[f"{hf_projection_name(i, projection)}.weight"] = kernel.T
    result = model.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()}, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys, result
    return model


def hf_logits(model: HFLlama, input_ids, attention_mask=None, positions=None) -> np.ndarray:
    as_long = lambda a: None if a is None else torch.tensor(np.asarray(a), dtype=torch.long)
    with torch.no_grad():
        out = model(
            input_ids=as_long(input_ids), attention_mask=as_long(attention_mask), position_ids=as_long(positions)
        )
    return out.logits.float().numpy()


def relative_error(got, want, mask=None) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if mask is not None:
        got, want = got[np.asarray(mask, bool)], want[np.asarray(mask, bool)]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))
