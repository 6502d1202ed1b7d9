"""Every Pallas kernel of `grouped_lora_pallas` and `routed_lora_pallas` lowers to Triton IR for a
CUDA GPU, here on the CPU (`.lower(lowering_platforms=("cuda",))`: no GPU and no compilation, only
Pallas's Triton lowering), at the benchmark's shapes (bench_kernels.py: d 4096 -> 4096 and
4096 -> 14336, L = 28, k = 2, bf16) and a few off-tile ones.

The CPU tests run the kernels in interpret mode, which accepts programs the Triton lowering rejects
(a broadcast between unequal ranks, for example); without this check such an error first shows on
the GPU. `tests/test_fused_layout.py` checks the fused layout's two kernels the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.grouped_lora_pallas import grouped_lora_pallas
from pallas_kernels.routed_lora_pallas import routed_lora_pallas

L, TOP_K = 28, 2


def _lower_for_cuda(fn, *shapes):
    """Lowers jit(fn) for CUDA from abstract arguments (raising what the Triton lowering raises) and
    checks that the program holds Triton kernels, not only XLA ops."""
    text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text, "no Triton kernel in the lowered program"


def _grouped_args(t, d_in, d_out, rank, dtype=jnp.bfloat16):
    s = jax.ShapeDtypeStruct
    return (s((t, d_in), dtype), s((L, d_in, rank), dtype), s((L, rank, d_out), dtype), s((L,), jnp.float32),
            s((t, TOP_K), jnp.int32), s((t, TOP_K), dtype))


@pytest.mark.parametrize("path", ["decode", "dense", "sorted", "combo"])
# (16, 4096, 14336, 16): the decode forward expand's 512-column blocks (`decode_block_n_out`)
@pytest.mark.parametrize("t, d_in, d_out, rank", [(1, 4096, 4096, 8), (16, 4096, 14336, 64), (16, 4096, 14336, 16),
                                                  (256, 4096, 4096, 16), (37, 100, 72, 3)])
def test_grouped_lora_forward_lowers(path, t, d_in, d_out, rank):
    args = _grouped_args(t, d_in, d_out, rank)

    def layer(x, a, b, s, idx, w):  # base + delta, as the model calls it
        return grouped_lora_pallas(x, a, b, s, idx, w, path=path, base=jnp.zeros((t, d_out), x.dtype),
                                   interpret=False)

    _lower_for_cuda(layer, *args)


@pytest.mark.parametrize("path", ["decode", "dense", "sorted", "combo"])
@pytest.mark.parametrize("t, d_in, d_out, rank", [(16, 4096, 4096, 8), (4096, 4096, 14336, 64), (37, 100, 72, 3)])
def test_grouped_lora_backward_lowers(path, t, d_in, d_out, rank):
    """The custom VJP's kernels: gradients for x, lora_a, lora_b, scaling and expert_weight."""
    args = _grouped_args(t, d_in, d_out, rank)

    def loss(x, a, b, s, idx, w):
        out = grouped_lora_pallas(x, a, b, s, idx, w, path=path, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3, 5)), *args)


@pytest.mark.parametrize("t, d_in, d_out, rank", [(1, 4096, 4096, 8), (32, 14336, 4096, 16), (5, 100, 72, 3)])
def test_routed_lora_decode_lowers(t, d_in, d_out, rank):
    x, a, b, scaling = _grouped_args(t, d_in, d_out, rank)[:4]
    gate = jax.ShapeDtypeStruct((d_in, L), jnp.float32)
    base = jax.ShapeDtypeStruct((t, d_out), jnp.bfloat16)

    def layer(x, gate, a, b, scaling, base):
        return routed_lora_pallas(x, gate, a, b, scaling, 1.0, top_k=TOP_K, base=base, interpret=False)

    _lower_for_cuda(layer, x, gate, a, b, scaling, base)
