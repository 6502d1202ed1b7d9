"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest

# The suite compiles hundreds of small programs and runs each a few times, so XLA's CPU compile time
# dominates it. At backend optimization level 0 the same programs compile about 30% faster (two of the
# slowest tests: 84 -> 59 s). The computations are the same; only the tests run this way (GPU runs and
# users' CPU runs keep XLA's default). Set before jax creates its backend; an XLA_FLAGS already in the
# environment wins.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**overrides: str) -> dict:
    """The environment for a test's child Python process: this one's, with the repository first on
    PYTHONPATH (the caller's entries kept: dependencies installed there, as on a GPU image, were lost
    when it was replaced) and `overrides` on top."""
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, **overrides}


def quick_run_config(config, world, workdir, **sections):
    """A tiny training config (configs/*.py's get_config()) pointed at a built tiny `world`: writing
    into `workdir`, quiet, 6 steps, no eval, no checkpoints or export; `sections` override it
    (a dict updates a section, anything else replaces the key)."""
    config.tiny_world = ""
    config.model_checkpoint = world.model
    config.tokenizer = world.tokenizer
    config.data.root = world.data_root
    config.workdir = str(workdir)
    config.logging.update(progress=False, tensorboard=False, every=1)
    config.train.update(steps=6, eval_every=-1)
    config.checkpoint.update(every=0, export_gates=False)
    for section, values in sections.items():
        if isinstance(values, dict):
            config[section].update(**values)
        else:
            config[section] = values
    return config


@pytest.fixture
def float32_matmuls():
    """float32 products in full float32 for one test: on a GPU, JAX's default runs float32 matmuls in
    TF32 (relative error ~3e-4; README, "Use from Python"), over the parity tolerances of 1e-5 / 1e-4.
    Not for tests that read the precisions in a jaxpr: the setting is written into every dot there."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def float32_matmuls_module():
    """`float32_matmuls` for a whole test module, its module-scoped fixtures included (e.g. one
    generation every test compares with: set per test, that ran in TF32 and the tests in float32,
    and greedy tokens differed on a GPU). Files opt in with
    `pytestmark = pytest.mark.usefixtures("float32_matmuls_module")`."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


# A chat template in the ChatML style many instruct models use: every turn ends with <|im_end|>.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Translate to French: hello world. Bonjour le monde.",
    "Question: what is 12 + 30? Answer: 42",
    "Summarise the following text in one sentence, please.",
    "Is this review positive or negative? It was great fun.",
]


def make_tiny_tokenizer(corpus=None, *, vocab_size: int = 400, add_bos: bool = True):
    """A real, offline, byte-level BPE tokenizer trained in milliseconds, as transformers sees one.

    Byte-level: any text round-trips (no unknown tokens). Special tokens: <pad> 0, <s> 1 (BOS),
    </s> 2 (EOS), <|im_start|> 3, <|im_end|> 4. With `add_bos`, encoding with special tokens
    prepends <s> (as LLaMA tokenizers do). Carries TINY_CHAT_TEMPLATE.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or _TINY_CORPUS), trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    hf.chat_template = TINY_CHAT_TEMPLATE
    return hf


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A small byte-level BPE `PreTrainedTokenizerFast` with pad/bos/eos and a chat template."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_tokenizer_factory():
    """`make_tiny_tokenizer(corpus=None, *, vocab_size=400, add_bos=True)` for custom variants."""
    return make_tiny_tokenizer


# --- Checkpoint conversion (tests/test_convert.py): a tiny HF LLaMA and PEFT adapters on it. ---

# Three LoRA adapters that differ in every way the converter must handle: rank, alpha, rsLoRA,
# target modules, and per-module rank/alpha patterns.
TINY_PEFT_ADAPTERS = {
    "alpha": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "beta": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "gamma": dict(
        r=2,
        lora_alpha=4,
        target_modules=["o_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 6},
        alpha_pattern={"model.layers.1.mlp.up_proj": 10},
    ),
}


def make_tiny_hf_llama(path, seed: int = 0, **config_kwargs):
    """Saves a random tiny transformers LlamaForCausalLM (hidden 64, 2 layers, GQA 4/2, vocab 160)
    to `path` with `save_pretrained` (safetensors) and returns the model."""
    from torch_reference import random_hf_model, tiny_hf_config

    model = random_hf_model(tiny_hf_config(**{"num_heads": 4, "num_kv_heads": 2, "hidden": 64, **config_kwargs}), seed)
    model.save_pretrained(path)
    return model


def make_peft_adapter(base_dir, path, seed: int, **lora_kwargs):
    """Trains nothing: wraps the HF model in `base_dir` with a PEFT LoraConfig(**lora_kwargs) whose A
    and B are both random (init_lora_weights=False, so the adapter changes the output), and saves it
    to `path` with `save_pretrained`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():  # keep the deltas moderate so logits stay in a well-conditioned range
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(0.5)
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_llama_dir(tmp_path_factory):
    """Directory of a random tiny HF LLaMA (see `make_tiny_hf_llama`)."""
    path = tmp_path_factory.mktemp("tiny_hf_llama")
    make_tiny_hf_llama(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_peft_adapters(tiny_hf_llama_dir, tmp_path_factory):
    """[(name, directory)] of the TINY_PEFT_ADAPTERS saved by PEFT on `tiny_hf_llama_dir`, in order."""
    root = tmp_path_factory.mktemp("tiny_peft_adapters")
    return [
        (name, make_peft_adapter(tiny_hf_llama_dir, root / name, seed=10 + i, **kwargs))
        for i, (name, kwargs) in enumerate(TINY_PEFT_ADAPTERS.items())
    ]


@pytest.fixture(scope="session")
def tiny_hf_base_with_tokenizer(tmp_path_factory):
    """A folder holding a random tiny HF LlamaForCausalLM (tied embeddings) and the tiny byte-level
    tokenizer with its chat template: what examples/ and the pipeline test use as "the base model"."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_base")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- Inference (tests/test_evaluate_loop.py, tests/test_notebook.py): the tiny default world. ---


@pytest.fixture(scope="session")
def tiny_inference_world(tmp_path_factory):
    """`meteora_jax.tiny.build_tiny_world` for the model of configs/tiny.py, built in a temporary
    folder: a `TinyWorld` with .tokenizer, .data_root, .model (checkpoint) and .adapter_names."""
    import importlib.util
    from pathlib import Path

    from meteora_jax.config import ModelConfig
    from meteora_jax.tiny import build_tiny_world

    spec = importlib.util.spec_from_file_location("_tiny_config", Path(__file__).parents[1] / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model_config = ModelConfig.from_dict(module.get_config().model)
    return build_tiny_world(tmp_path_factory.mktemp("tiny_inference") / "world", model_config)
