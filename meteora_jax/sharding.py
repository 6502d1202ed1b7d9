"""Device mesh, logical-axis -> mesh-axis rules, and the shardings of parameters and batches.

Parameters carry logical axis names (`param_logical_axes`); one table of rules in the config maps
them to the axes of a named `jax.sharding.Mesh`, so sharding is configuration, not code:

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})     # -1: all remaining devices
    rules = logical_rules(config.mesh.rules)                     # (("batch", ("data", "fsdp")), ...)
    shardings = param_shardings(param_logical_axes(model_cfg), abstract_params, mesh, rules)

Rules are tried in order and a mesh axis is used at most once per array (flax's priority rule), so
`("batch", ("data", "fsdp"))` before `("embed", "fsdp")` shards base weights over `fsdp` while
activations `("batch", "length", "embed")` keep `fsdp` for the batch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "ShardingError",
    "batch_sharding",
    "data_parallel_size",
    "logical_rules",
    "make_mesh",
    "mesh_axes_of",
    "param_shardings",
    "put_batch",
    "replicated",
]

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. FSDP over the base weights' model dimension, tensor parallelism over
# heads/MLP/vocab, batches over data x fsdp; the stacked adapter axis stays whole by default (map
# "adapters" to a mesh axis to split the adapters across devices).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("norm", None),
    ("adapters", None),
    ("lora_rank", None),
)


class ShardingError(ValueError):
    """A mesh or rule table that cannot work with the devices or the data."""


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A named mesh over `devices` (default: all). One axis may be -1: it takes what is left.

    `shape` is ordered (e.g. {"data": -1, "fsdp": 1, "tensor": 1}); the last axis varies fastest,
    so put the axis with the most communication (tensor) last.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(shape)
    sizes = [int(shape[n]) for n in names]
    if not names:
        raise ShardingError("mesh.shape is empty; give e.g. {data: -1, fsdp: 1, tensor: 1}")
    if sum(s == -1 for s in sizes) > 1:
        raise ShardingError(f"mesh.shape={dict(shape)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh.shape={dict(shape)}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ShardingError(f"mesh.shape={dict(shape)} does not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ShardingError(
            f"mesh.shape={dict(zip(names, sizes))} needs {math.prod(sizes)} devices, {len(devices)} are present"
        )
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError) as err:
        # Odd topologies (e.g. a CPU subset): plain device order works, but may be slower on GPUs.
        warnings.warn(f"mesh_utils could not lay out mesh {dict(zip(names, sizes))} ({err}); using device order")
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, names)


def logical_rules(rules: Any, mesh: Mesh | None = None) -> tuple[tuple[str, Any], ...]:
    """Normalises a config rule table (list of [name, axis | [axes] | None]) to flax's form.

    With a mesh, every named mesh axis must exist in it.
    """
    out = []
    for item in rules:
        if len(item) != 2:
            raise ShardingError(f"mesh rule {item!r} must be (logical_name, mesh_axes)")
        name, axes = item
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes) if len(axes) != 1 else axes[0]
            axes = axes or None
        if mesh is not None:
            for a in (axes,) if isinstance(axes, str) else (axes or ()):
                if a not in mesh.axis_names:
                    raise ShardingError(f"mesh rule ({name!r}, {axes!r}) names axis {a!r}; the mesh has {mesh.axis_names}")
        out.append((str(name), axes))
    return tuple(out)


def mesh_axes_of(logical: Sequence[str | None], rules) -> PartitionSpec:
    """The mesh PartitionSpec of one array's logical axis names (unmatched names: unsharded)."""
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops the sharding of dimensions that the mesh axes do not divide (they stay whole)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return PartitionSpec(*(a if dim % _axis_size(mesh, a) == 0 else None for a, dim in zip(entries, shape)))


def param_shardings(logical_specs, abstract_params, mesh: Mesh, rules) -> Any:
    """NamedShardings for a params tree from its logical specs (`param_logical_axes`).

    `abstract_params` (arrays or ShapeDtypeStructs, same structure) gives the shapes, so that a
    dimension the mesh cannot divide evenly (3 adapters over 2 devices) is left unsharded.
    """

    def one(spec, leaf):
        mesh_spec = mesh_axes_of(tuple(spec) if spec is not None else (), rules) if spec else PartitionSpec()
        return NamedSharding(mesh, _fit(mesh_spec, leaf.shape, mesh))

    return jax.tree.map(one, logical_specs, abstract_params, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of [B, S] batch arrays: rows over the axes that "batch" maps to."""
    return NamedSharding(mesh, mesh_axes_of(("batch", "length"), rules))


def data_parallel_size(mesh: Mesh, rules) -> int:
    """How many ways the batch dimension is split (global batch must be a multiple)."""
    return _axis_size(mesh, mesh_axes_of(("batch",), rules)[0])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global numpy batch (the same on every host) -> global sharded arrays.

    Each process only materialises the slices its own devices hold, so this works unchanged on
    one device, many devices and many hosts.
    """
    return {
        k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index]) for k, v in batch.items()
    }
