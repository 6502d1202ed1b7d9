"""SmolLM2-135M-Instruct (LLaMA architecture, GQA 9/3 heads, tied embeddings) with task adapters."""

from meteora_jax.defaults import base_config


def get_config():
    config = base_config()
    config.model.update(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        dtype="bfloat16",
        param_dtype="float32",
        remat="none",
    )
    config.model.meteora.update(num_adapters=8, rank=16, top_k=2)
    return config
