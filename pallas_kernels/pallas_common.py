"""Small helpers every Pallas kernel of this package uses: launch parameters, tile arithmetic, dot
precision, and masked loads and stores.

Loads and stores take integer-array indices (gather / scatter style) and a mask, so that interpret
mode on the CPU drops out-of-range stores exactly like the GPU does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")


def compiler_params(num_warps, num_stages):
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def cdiv(a, b):
    return -(-a // b)


def depth_splits(num_chunks, programs_per_split, min_programs):
    """Split-K: into how many parts (a power of two) a depth of num_chunks chunks is split, doubled
    while the grid (programs_per_split programs per part) holds fewer than min_programs programs and
    every part keeps at least one chunk."""
    splits = 1
    while splits * 2 <= num_chunks and programs_per_split * splits < min_programs:
        splits *= 2
    return splits


def pow2_at_least(n, floor=16):
    return max(floor, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def dot_precision(dtype):
    """HIGHEST for float32 operands (float32 products, not TF32), the default otherwise."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def gate_halves(gate: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """hi, lo [d_in, L] in `dtype` with gate = hi + lo (float32 gate [d_in, L]): x @ hi + x @ lo, for
    x in `dtype` (bfloat16) with float32 accumulation and output, carries ~16 bits of each gate entry
    at tensor-core speed.

    hi is rounded with `lax.reduce_precision`, not by a round trip through `dtype`: XLA on GPU
    removes a float32 -> bfloat16 -> float32 round trip (its "excess precision" rewrite,
    openxla/xla#41605), which made lo zero there and the logits bfloat16-coarse (2e-4 of
    |x| @ |gate| on an H200; docs/benchmarks.md, sessions 30-31)."""
    info = jnp.finfo(dtype)
    hi = lax.reduce_precision(gate, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return hi.astype(dtype), (gate - hi).astype(dtype)


# An index past any buffer, for the elements a masked store leaves out: interpret mode writes masked-off
# elements back (old value, same index), which can undo another element's store to that index.
OUT_OF_RANGE = 1 << 30


def masked_load(ref, idx, mask):
    return plgpu.load(ref.at[idx], mask=mask, other=0)


def masked_store(ref, idx, val, mask):
    plgpu.store(ref.at[idx], val, mask=mask)


def without_aliased_input(kernel):
    """Kernel wrapper for a launch whose output is aliased to its last input only so that it starts
    as that buffer (NaN-poisoned, in tests), not to be read: drops that input's ref."""

    def wrapped(*refs):
        return kernel(*refs[:-2], refs[-1])

    return wrapped
