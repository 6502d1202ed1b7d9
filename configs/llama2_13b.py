"""LLaMA-2-13B (multi-head attention) with 28 adapters, top-2: the paper's main setting."""

from meteora_jax.defaults import base_config


def get_config():
    config = base_config()
    config.model.update(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        head_dim=128,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    config.model.meteora.update(num_adapters=28, rank=8, top_k=2)
    return config
