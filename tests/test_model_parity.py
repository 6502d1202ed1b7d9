"""Logits of our Flax LLaMA against transformers' LlamaForCausalLM (torch, fp32).

Weights go through the real importer (save_pretrained -> load_hf_llama), so the loader is tested
on every file layout it accepts. Tolerance: relative error (Frobenius) <= 1e-4 in fp32.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from meteora_jax import LlamaForCausalLM
from meteora_jax.config import ConfigError
from meteora_jax.convert import WeightsError, load_hf_llama
from torch_reference import hf_logits, random_hf_model, relative_error, tiny_hf_config

pytestmark = pytest.mark.usefixtures("float32_matmuls_module")  # float32 parity, also on a GPU (no TF32)

TOL = 1e-4


def _padded_batch(rng, vocab, batch=3, seq=13):
    """Random ids; row 1 left-padded, row 2 right-padded. Positions count real tokens only."""
    ids = rng.integers(0, vocab, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    mask[1, :5] = 0
    mask[2, -4:] = 0
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    return ids, mask, positions


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,tie,llama3_rope",
    [
        (4, 4, False, False),  # MHA, untied head (LLaMA-2)
        (4, 2, False, True),  # GQA, llama3 rope scaling (LLaMA-3)
        (6, 2, True, False),  # GQA, tied embeddings (SmolLM2)
    ],
    ids=["mha-untied", "gqa-llama3rope", "gqa-tied"],
)
def test_logits_match_transformers(tmp_path, num_heads, num_kv_heads, tie, llama3_rope):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    hf_config = tiny_hf_config(num_heads, num_kv_heads, tie=tie, llama3_rope=llama3_rope, hidden=96)
    hf_model = random_hf_model(hf_config, seed)
    hf_model.save_pretrained(tmp_path)
    config, params = load_hf_llama(tmp_path, progress=False)
    assert (config.num_heads, config.num_kv_heads, config.tie_word_embeddings) == (num_heads, num_kv_heads, tie)
    assert (config.rope_scaling is not None) == llama3_rope

    ids, mask, positions = _padded_batch(rng, hf_config.vocab_size)
    want = hf_logits(hf_model, ids, mask, positions)
    got = LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))
    err = relative_error(got.logits, want, mask)
    print(f"seed={seed} relative error {err:.2e}")
    assert err <= TOL, f"seed={seed}: relative error {err:.2e} > {TOL}"
    assert got.gate_logits == {}  # a plain LLaMA has no gates


def test_long_positions_llama3_rope(tmp_path):
    """Positions beyond original_max_position_embeddings exercise the scaled rope frequencies."""
    hf_config = tiny_hf_config(4, 2, llama3_rope=True)
    hf_model = random_hf_model(hf_config, 3)
    hf_model.save_pretrained(tmp_path)
    config, params = load_hf_llama(tmp_path, progress=False)
    ids = np.random.default_rng(3).integers(0, hf_config.vocab_size, (1, 24))
    positions = np.arange(24)[None] + 300
    want = hf_logits(hf_model, ids, None, positions)
    got = LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(ids), positions=jnp.asarray(positions))
    assert relative_error(got.logits, want) <= TOL


@pytest.mark.parametrize("layout", ["sharded-safetensors", "bin"])
def test_loader_file_layouts(tmp_path, layout):
    hf_config = tiny_hf_config(4, 2)
    hf_model = random_hf_model(hf_config, 1)
    if layout == "bin":
        # transformers 5 only writes safetensors; older checkpoints on disk are torch pickles.
        hf_config.save_pretrained(tmp_path)
        torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
    config, params = load_hf_llama(tmp_path, progress=False)
    ids = np.random.default_rng(1).integers(0, hf_config.vocab_size, (2, 7))
    want = hf_logits(hf_model, ids)
    got = LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(ids))
    assert relative_error(got.logits, want) <= TOL


def test_bf16_compute_close_to_fp32(tmp_path):
    hf_config = tiny_hf_config(4, 2)
    random_hf_model(hf_config, 2).save_pretrained(tmp_path)
    config32, params32 = load_hf_llama(tmp_path, progress=False)
    config16, params16 = load_hf_llama(tmp_path, progress=False, dtype="bfloat16", param_dtype="bfloat16")
    assert params16["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.default_rng(2).integers(0, hf_config.vocab_size, (2, 9)))
    ref = LlamaForCausalLM(config32).apply({"params": params32}, ids).logits
    got = LlamaForCausalLM(config16).apply({"params": params16}, ids).logits
    assert got.dtype == jnp.float32  # logits leave the model in fp32
    assert relative_error(got, ref) <= 3e-2


def test_rejects_non_llama(tmp_path):
    hf_config = tiny_hf_config()
    random_hf_model(hf_config, 0).save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    values = json.loads(config_path.read_text())
    values["model_type"] = "gpt2"
    config_path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match="model_type='gpt2'"):
        load_hf_llama(tmp_path, progress=False)


def test_rejects_shape_mismatch(tmp_path):
    hf_config = tiny_hf_config()
    random_hf_model(hf_config, 0).save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    values = json.loads(config_path.read_text())
    values["intermediate_size"] += 8
    config_path.write_text(json.dumps(values))
    with pytest.raises(WeightsError, match=r"mlp\.gate_proj\.weight.*shape"):
        load_hf_llama(tmp_path, progress=False)


def test_rejects_missing_and_corrupt_weights(tmp_path):
    with pytest.raises(WeightsError, match="config.json"):
        load_hf_llama(tmp_path, progress=False)
    random_hf_model(tiny_hf_config(), 0).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_hf_llama(tmp_path, progress=False)
    weights.unlink()
    with pytest.raises(WeightsError, match="no weights found"):
        load_hf_llama(tmp_path, progress=False)
