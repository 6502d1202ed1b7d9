"""A randomly initialised tiny LLaMA with a few adapters: the CPU default for demos and tests.

`python scripts/train.py --config configs/tiny.py` builds (or finds) the embedded tiny world in
runs/tiny_world (tokenizer, 3 generated tasks, a random model with 3 random adapters; see
meteora_jax/tiny.py) and trains the gates on a CPU in a minute or two.
"""

from meteora_jax.defaults import base_config

TINY_WORLD = "runs/tiny_world"


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

    config.tiny_world = TINY_WORLD
    # The world's paths follow config.tiny_world (an override of it moves all three).
    world = config.get_ref("tiny_world")
    config.model_checkpoint = world + "/model"
    config.tokenizer = world + "/tokenizer"
    config.workdir = "runs/tiny"
    config.data.update(root=world + "/data", seq_len=32)
    config.train.update(steps=300, batch_size=16, eval_every=100, eval_batch_size=16, eval_max_batches=0)
    config.optimizer.update(learning_rate=3e-3, weight_decay=0.0)
    config.schedule.update(kind="cosine", warmup_steps=20, end_factor=0.1)
    config.checkpoint.update(every=100, keep=2)
    config.logging.update(every=10)
    return config
