"""The fused inference layout: the projections that share an input as one GEMM, each MeteoRA
projection's routed delta folded into it.

    params = unstack_layers(params, config.num_layers)   # the unrolled layout
    params = fuse_projections(params, config)             # this layout
    LlamaForCausalLM(config, scan_layers=False, fused_projections=True).apply({"params": params}, ...)

Per decoder layer, `layers.FUSED_GROUPS` names four groups: q/k/v, o, gate/up and down (only the
first two with MixLoRA experts in the FFN, which stays as it is). Each group becomes one
`layers.FusedProjections` entry under its block ("self_attn" or "mlp"):

    kernel        [W, sum d_out]                  the group's kernels side by side, then each adapted
                                                  projection's lora_b ([L*r] rows under its columns),
                                                  then zero rows up to W = extended_width(d_in, n_a*L*r)
    side          [d_in, n_a*L*r + parts*n_a*L]   every lora_a, then the gates
    lora_scaling  [n_a, L]

(n_a: the group's projections with adapters; `pallas_kernels.lora_columns` has the arithmetic.)
A MeteoRA projection then costs, per group, one side GEMM and the routing before the group's one
GEMM; separately it costs its own base GEMM, gate and product kernels. On a GPU at prefill sizes
each of those is a launch of a few microseconds (docs/benchmarks.md, "Fused inference layout").

The layout is for inference only (`Generator` converts to it once); training, checkpoints and the
gate loss use the separate, scanned layout.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from meteora_jax.config import ModelConfig, block_of
from meteora_jax.layers import FUSED_GROUPS
from pallas_kernels.lora_columns import extended_kernel, side_weight


def fuse_layer(layer: Mapping, config: ModelConfig, where: str = "layer") -> dict:
    """One decoder layer's params, separate projections -> fused groups. `where` names the layer
    in errors."""
    out = {key: value for key, value in layer.items() if key not in ("self_attn", "mlp")}
    # MixLoRA's FFN stays as it is: its experts sit between the projections (a nonlinearity apart).
    blocks = ("self_attn",) if config.mixlora.num_experts else ("self_attn", "mlp")
    out.update({block: layer[block] for block in ("self_attn", "mlp") if block not in blocks})
    for block in blocks:
        source = dict(layer[block])
        fused = {}
        for group, names in FUSED_GROUPS.items():
            if block_of(names[0]) != block:
                continue
            members = []
            for name in names:
                if name not in source:
                    raise ValueError(f"{where}/{block} has no {name!r} (has {sorted(source)}); "
                                     "fuse_projections takes the unrolled, separate-projection layout")
                member = source.pop(name)
                if ("lora_a" in member) != config.meteora.adapts(name):
                    raise ValueError(f"{where}/{block}/{name}: adapters {'present' if 'lora_a' in member else 'absent'}"
                                     f", but the config says {'it adapts' if config.meteora.adapts(name) else 'not'}")
                members.append(member)
            adapted = [m for m in members if "lora_a" in m]
            entry = {"kernel": extended_kernel([m["kernel"] for m in members], [m.get("lora_b") for m in members])}
            if adapted:
                entry["side"] = side_weight([m["lora_a"] for m in adapted], [m["gate"] for m in adapted],
                                            config.compute_dtype)
                entry["lora_scaling"] = jnp.stack([m["lora_scaling"] for m in adapted]).astype(jnp.float32)
            fused[group] = entry
        if source:
            raise ValueError(f"{where}/{block} has entries that are not projections: {sorted(source)}")
        out[block] = fused
    return out


def fuse_projections(params: Mapping, config: ModelConfig) -> dict:
    """Unrolled layout (`model.unstack_layers`) -> fused layout. Each layer is converted by its own
    call of one jitted function (compiled once for equal layers), so the device holds at most one
    layer twice."""
    params = dict(params)
    fuse = jax.jit(functools.partial(fuse_layer, config=config))
    for i in range(config.num_layers):
        key = f"layers_{i}"
        if key not in params:
            raise ValueError(f"params has no {key!r}; fuse_projections takes the unrolled layout (unstack_layers)")
        try:
            params[key] = fuse(params[key])
        except ValueError as err:  # raised while tracing: name the layer
            raise ValueError(str(err).replace("layer/", f"{key}/", 1)) from None
    return params
