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
    config.model.meteora.update(num_adapters=10, rank=16, top_k=2)
    # Gate training (scripts/train.py): point these at your converted checkpoint and task data,
    # e.g. --config.model_checkpoint=... --config.data.root=... on the command line.
    # Defaults follow examples/README.md: tasks in data/tasks, adapters and the exported base
    # (tokenizer included) in runs/adapters, the converted checkpoint in runs/smollm2_meteora.
    config.model_checkpoint = "runs/smollm2_meteora"  # scripts/convert.py output (base + adapters)
    config.tokenizer = "runs/adapters/base"  # the base model's HF folder (tokenizer files)
    config.data.root = "data/tasks"  # <root>/<adapter name>/{train,test}.jsonl
    config.data.seq_len = 192  # the example tasks' longest sample is 147 tokens with the chat template
    config.data.chat_template = True  # as the example adapters were trained
    # SmolLM2's template puts the same system prompt (~20 tokens) before every user turn: no gate
    # can tell the task there, so the gate loss starts at the prompt text.
    config.data.gate_scope = "task"
    config.workdir = "runs/smollm2_135m"
    # eval_max_batches=0: every eval (and the final one, reported per task) covers the whole test split.
    config.train.update(steps=3000, batch_size=16, grad_accum_steps=1, eval_every=500, eval_batch_size=64, eval_max_batches=0)
    config.optimizer.update(learning_rate=1e-3)
    config.schedule.update(kind="cosine", warmup_steps=100)
    config.checkpoint.update(every=500, keep=3)
    return config
