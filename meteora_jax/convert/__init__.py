"""Conversion of HF base models, PEFT adapters and reference MeteoRA checkpoints into our params."""

from meteora_jax.convert.hf_base import (
    HFCheckpointReader,
    WeightsError,
    hf_tensors_to_params,
    load_hf_llama,
    smollm2_gguf_path,
)

__all__ = ["HFCheckpointReader", "WeightsError", "hf_tensors_to_params", "load_hf_llama", "smollm2_gguf_path"]
