"""LLaMA-3-8B (GQA 32/8 heads, rope theta 500000) with 28 adapters, top-2."""

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
    # Meta-Llama-3-8B has no rope scaling (Llama-3.1's llama3 scaling, factor 8, comes with 131072
    # positions); a converted checkpoint's own config.json decides in any case.
    config.model.meteora.update(num_adapters=28, rank=8, top_k=2)
    # Gate training (scripts/train.py): point these at your converted checkpoint and task data,
    # e.g. --config.model_checkpoint=... --config.data.root=... on the command line.
    config.model_checkpoint = "checkpoints/llama3_8b_meteora"  # scripts/convert.py output (base + adapters)
    config.tokenizer = "models/llama3_8b"  # the base model's HF folder (tokenizer files)
    config.data.root = "data/tasks"  # <root>/<adapter name>/{train,test}.jsonl
    config.data.seq_len = 2048
    config.workdir = "runs/llama3_8b"
    config.train.update(steps=2000, batch_size=8, grad_accum_steps=4, eval_every=500, eval_batch_size=8, eval_max_batches=50)
    # The original's gate training (run_meteora_train_fsdp.sh, meteora_train.py): AdamW at 5e-4, weight decay
    # 0.01, gradients clipped at norm 0.3, cosine down to 0 as HF's (its warm-up: 0.5% of 15,000 steps).
    # Its LoRA layers drop out 10% of the adapters' input in training (MoELoRA/layer.py, update_layer).
    config.train.lora_dropout = 0.1
    # Its LM loss covers the prompt as well as the response (the loss's balance with the gate term, whose
    # coefficient 50 was chosen for it).
    config.data.lm_on_prompt = True
    config.optimizer.update(learning_rate=5e-4, weight_decay=0.01, clip_norm=0.3)
    config.schedule.update(kind="cosine", warmup_steps=100, end_factor=0.0)
    config.checkpoint.update(every=500, keep=3)
    return config
