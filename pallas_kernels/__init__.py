"""Routed grouped low-rank product kernels and their plain-XLA references."""

from pallas_kernels.grouped_lora import IMPLS, grouped_lora
from pallas_kernels.grouped_lora_xla import (
    grouped_lora_dense,
    grouped_lora_gather,
    grouped_lora_ragged,
)

__all__ = ["IMPLS", "grouped_lora", "grouped_lora_dense", "grouped_lora_gather", "grouped_lora_ragged"]
