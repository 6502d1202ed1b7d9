"""Shared defaults of every `configs/*.py` file (ml_collections), so each config states only what
differs. `ModelConfig.from_dict(config.model)` turns the model section into the model's config."""

from __future__ import annotations

import ml_collections

from meteora_jax.config import ALL_PROJECTIONS


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Model architecture; overwritten by the HF config when weights are imported.
    config.model = ml_collections.ConfigDict(
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            head_dim=128,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            rope_scaling=ml_collections.FieldReference(None, field_type=dict),
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            dtype="bfloat16",
            param_dtype="bfloat16",
            remat="full",
            meteora=dict(
                num_adapters=28,
                rank=8,
                top_k=2,
                targets=ALL_PROJECTIONS,
                kernel_impl="auto",
            ),
        )
    )
    return config
