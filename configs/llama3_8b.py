"""LLaMA-3-8B (GQA 32/8 heads, llama3 rope scaling) with 28 adapters, top-2."""

from meteora_jax.defaults import base_config


def get_config():
    config = base_config()
    config.model.update(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    config.model.rope_scaling = dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    config.model.meteora.update(num_adapters=28, rank=8, top_k=2)
    return config
