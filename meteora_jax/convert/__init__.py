"""Conversion of HF base models, PEFT adapters and reference MeteoRA checkpoints into our params."""

from meteora_jax.convert.common import ConversionError
from meteora_jax.convert.hf_base import (
    HFCheckpointReader,
    WeightsError,
    hf_tensors_to_params,
    load_hf_llama,
    smollm2_gguf_path,
)
from meteora_jax.convert.peft import PeftAdapter, load_peft_adapter, load_peft_adapters, read_order_file, stack_adapters
from meteora_jax.convert.reference import load_reference

__all__ = [
    "ConversionError",
    "HFCheckpointReader",
    "PeftAdapter",
    "WeightsError",
    "hf_tensors_to_params",
    "load_hf_llama",
    "load_peft_adapter",
    "load_peft_adapters",
    "load_reference",
    "read_order_file",
    "smollm2_gguf_path",
    "stack_adapters",
]
