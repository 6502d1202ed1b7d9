"""Routed grouped low-rank product kernels and their plain-XLA references."""

from pallas_kernels.grouped_lora import IMPLS, grouped_lora
from pallas_kernels.grouped_lora_xla import (
    grouped_lora_dense,
    grouped_lora_gather,
    grouped_lora_ragged,
    top_k_routing,
)
from pallas_kernels.routed_lora import routed_lora, routed_lora_xla

__all__ = [
    "IMPLS",
    "grouped_lora",
    "grouped_lora_dense",
    "grouped_lora_gather",
    "grouped_lora_ragged",
    "routed_lora",
    "routed_lora_xla",
    "top_k_routing",
]
