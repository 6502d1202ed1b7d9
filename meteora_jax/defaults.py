"""Shared defaults of every `configs/*.py` file (ml_collections), so each config states only what
differs. `ModelConfig.from_dict(config.model)` turns the model section into the model's config.

Sections: model (architecture), and for training (`scripts/train.py`, `meteora_jax.train`):
paths (model_checkpoint, tokenizer, workdir), data, train (steps, batch, accumulation, loss),
optimizer, schedule, mesh (shape + logical-axis rules), checkpoint, logging."""

from __future__ import annotations

import ml_collections

from meteora_jax.config import ALL_PROJECTIONS
from meteora_jax.sharding import DEFAULT_RULES


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
            # MixLoRA's trainable FFN experts (docs/mixlora.md); num_experts 0: off. Over a
            # checkpoint without experts, training adds them (new leaves, initialised from `seed`).
            mixlora=dict(num_experts=0, rank=8, alpha=16.0, top_k=2, kernel_impl="auto"),
        )
    )
    _add_training_sections(config)
    return config


def _add_training_sections(config: ml_collections.ConfigDict) -> None:
    config.seed = 0
    # Converted model checkpoint (meteora_jax.checkpoint: base params + stacked adapters + gates,
    # its metadata lists the adapters in order). Its architecture wins over `model`; from `model`
    # only dtype, remat, meteora.top_k, meteora.kernel_impl and the mixlora section apply.
    config.model_checkpoint = ""
    config.tokenizer = ""  # the base model's HF tokenizer folder, or its .gguf file (transformers AutoTokenizer)
    config.workdir = "runs/train"  # train checkpoints, metrics.jsonl, TensorBoard events, gates/
    config.tiny_world = ""  # a folder: build the embedded tiny world there first (configs/tiny.py)
    config.distributed = False  # jax.distributed.initialize() before anything else (multi-host)

    config.data = ml_collections.ConfigDict(
        dict(
            root="",  # <root>/<task>/{train,test}.jsonl, task names = adapter names
            seq_len=512,
            chat_template=False,
            lm_on_prompt=False,  # True: prompt tokens are LM targets too (as the original)
            # Tokens the gate loss and gate accuracy cover: "all" non-padding tokens but a BOS (as
            # the original), or "task": from the prompt text on, leaving out the BOS / chat-template
            # head (e.g. a default system prompt) that is the same for every task.
            gate_scope="all",
            mixing="round_robin",  # or "uniform"
            eval_split="test",
        )
    )
    config.train = ml_collections.ConfigDict(
        dict(
            steps=1000,
            batch_size=8,  # global, per optimizer step
            grad_accum_steps=1,  # micro-batches of batch_size / grad_accum_steps, scanned
            loss_coef=50.0,  # loss = lm + coef * gate (the original's 50)
            router_aux_loss_coef=0.01,  # + this * MixLoRA's load-balancing loss (MixLoRA's 0.01)
            # Dropout on the adapters' input while the gates train (the original's 0.1), and on
            # MixLoRA's experts' input (MixLoRA's 0.05).
            lora_dropout=0.0,
            eval_every=200,  # 0: only at the end
            eval_batch_size=8,
            eval_max_batches=0,  # 0: the whole test split
        )
    )
    config.optimizer = ml_collections.ConfigDict(
        dict(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)  # clip_norm 0: no clipping
    )
    config.schedule = ml_collections.ConfigDict(
        dict(kind="cosine", warmup_steps=100, end_factor=0.1)  # kind: cosine | linear | constant
    )
    config.mesh = ml_collections.ConfigDict(
        dict(
            shape=dict(data=-1, fsdp=1, tensor=1),
            rules=[list(r) for r in DEFAULT_RULES],
        )
    )
    config.checkpoint = ml_collections.ConfigDict(
        dict(every=500, keep=3, resume=True, async_save=False, export_gates=True)
    )
    config.logging = ml_collections.ConfigDict(dict(every=10, progress=True, tensorboard=True, jsonl=True))
