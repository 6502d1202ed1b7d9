"""A randomly initialised tiny LLaMA with a few adapters: the CPU default for demos and tests."""

from meteora_jax.defaults import base_config


def get_config():
    config = base_config()
    config.model.update(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        dtype="float32",
        param_dtype="float32",
        remat="none",
    )
    config.model.meteora.update(num_adapters=3, rank=4, top_k=2)
    return config
