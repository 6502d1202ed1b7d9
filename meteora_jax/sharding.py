"""Device mesh, logical-axis -> mesh-axis rules, and the shardings of parameters and batches.

Parameters carry logical axis names (`param_logical_axes`); one table of rules in the config maps
them to the axes of a named `jax.sharding.Mesh`, so sharding is configuration, not code:

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})     # -1: all remaining devices
    rules = logical_rules(config.mesh.rules)                     # (("batch", ("data", "fsdp")), ...)
    shardings = param_shardings(param_logical_axes(model_cfg), abstract_params, mesh, rules)

Rules are tried in order and a mesh axis is used at most once per array (flax's priority rule), so
`("batch", ("data", "fsdp"))` before `("embed", "fsdp")` shards base weights over `fsdp` while
activations `("batch", "length", "embed")` keep `fsdp` for the batch.

A mesh or rule table that cannot work raises `ShardingError`, one line naming the config key
(`mesh.shape.fsdp=3: 4 devices are not divisible by 3 ...`), before anything is computed.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meteora_jax.config import ConfigError

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

# Every logical axis name that a parameter (`model.param_logical_axes`) or an activation has.
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


class ShardingError(ConfigError):
    """A mesh or rule table that cannot work with the devices or the model.

    A `ConfigError`, so the CLIs report it as a bad config: one line and exit status 2.
    """


def _axis_value(name: str, value: Any) -> int:
    """One mesh.shape entry: a size >= 1, or -1 (the devices the other axes leave)."""
    # Strict: int(2.5) would silently give 2, int("x") a traceback.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (value < 1 and value != -1):
        raise ShardingError(
            f"mesh.shape.{name}={value!r}: want a size >= 1, or -1 for the devices the other axes leave"
        )
    return int(value)


def _shape_keys(sizes: Mapping[str, int]) -> str:
    """`mesh.shape.fsdp=3, mesh.shape.tensor=2`: the entries that split devices (all if none does)."""
    keys = [f"mesh.shape.{n}={s}" for n, s in sizes.items() if s > 1]
    return ", ".join(keys) if keys else f"mesh.shape={dict(sizes)}"


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A named mesh over `devices` (default: all). One axis may be -1: it takes what is left.

    `shape` is ordered (e.g. {"data": -1, "fsdp": 1, "tensor": 1}); the last axis varies fastest,
    so put the axis with the most communication (tensor) last. The sizes must multiply to the
    number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not shape:
        raise ShardingError("mesh.shape is empty; give e.g. {data: -1, fsdp: 1, tensor: 1}")
    names = tuple(shape)
    sizes = [_axis_value(n, shape[n]) for n in names]
    free = [n for n, s in zip(names, sizes) if s == -1]
    if len(free) > 1:
        keys = ", ".join(f"mesh.shape.{n}=-1" for n in free)
        raise ShardingError(f"{keys}: at most one axis may be -1 (it takes the devices the others leave)")
    fixed = {n: s for n, s in zip(names, sizes) if s != -1}
    known = math.prod(fixed.values())
    if free:
        if len(devices) % known:
            raise ShardingError(
                f"{_shape_keys(fixed)}: {len(devices)} devices are not divisible by {known} "
                f"(mesh.shape.{free[0]}=-1 takes the devices the other axes leave)"
            )
        sizes[names.index(free[0])] = len(devices) // known
    elif known != len(devices):
        raise ShardingError(
            f"{_shape_keys(fixed)} needs {known} device{'s' * (known != 1)}, {len(devices)} are present "
            "(set one axis to -1 to take the devices the others leave)"
        )
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError) as err:
        # Odd topologies (e.g. a CPU subset): plain device order works, but may be slower on GPUs.
        warnings.warn(f"mesh_utils could not lay out mesh {dict(zip(names, sizes))} ({err}); using device order")
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, names)


def _names(axes) -> tuple[str, ...]:
    """The mesh axis names of one rule's target: None, "fsdp" or ("data", "fsdp")."""
    return () if axes is None else tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)


def _did_you_mean(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def logical_rules(rules: Any, mesh: Mesh | None = None) -> tuple[tuple[str, Any], ...]:
    """Normalises a config rule table (list of [name, axis | [axes] | None]) to flax's form.

    With a mesh, every mesh axis a rule names must exist in it, and every mesh axis of size > 1
    must be named by some rule (else its devices would all do the same work).
    """
    out = []
    for item in rules:
        if len(item) != 2:
            raise ShardingError(f"mesh.rules entry {item!r} must be (logical_name, mesh_axes)")
        name, axes = item
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes) if len(axes) != 1 else axes[0]
            axes = axes or None
        names = _names(axes)
        if not all(isinstance(a, str) for a in names) or len(set(names)) != len(names):
            raise ShardingError(f"mesh.rules entry {item!r}: want a mesh axis name, a list of distinct names, or None")
        if name not in LOGICAL_AXES:  # a misspelt name would leave its arrays whole, silently
            raise ShardingError(f"mesh.rules entry {item!r} names logical axis {name!r}, which no array has "
                                f"(they are {', '.join(LOGICAL_AXES)}{_did_you_mean(str(name), LOGICAL_AXES)})")
        out.append((str(name), axes))
    if mesh is None:
        return tuple(out)
    for name, axes in out:
        for a in _names(axes):
            if a not in mesh.axis_names:
                raise ShardingError(
                    f"mesh.rules entry ({name!r}, {axes!r}) names mesh axis {a!r}, which mesh.shape lacks "
                    f"(it has {', '.join(mesh.axis_names)}{_did_you_mean(a, mesh.axis_names)})"
                )
    named = sorted({a for _, axes in out for a in _names(axes)})
    for a in mesh.axis_names:
        if mesh.shape[a] > 1 and a not in named:
            raise ShardingError(
                f"mesh.shape.{a}={mesh.shape[a]}: no mesh.rules entry maps onto mesh axis {a!r}, so its "
                f"{mesh.shape[a]} devices would all do the same work (the rules use {', '.join(named) or 'none'})"
            )
    return tuple(out)


def mesh_axes_of(logical: Sequence[str | None], rules) -> PartitionSpec:
    """The mesh PartitionSpec of one array's logical axis names (unmatched names: unsharded)."""
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def _axis_size(mesh: Mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in _names(axes))


def param_shardings(logical_specs, abstract_params, mesh: Mesh, rules) -> Any:
    """NamedShardings for a params tree from its logical specs (`param_logical_axes`).

    `abstract_params` (arrays or ShapeDtypeStructs, same structure) gives the shapes. A dimension
    that its mesh axes do not divide (a vocab of 32001 over tensor=4) stays whole, with a warning
    naming the mesh key. A mesh axis of size > 1 that then splits no parameter and not the batch
    is a ShardingError: its devices would all do the same work (tensor=3 on a model 64 wide).
    """
    misfits: dict[Any, dict[str, int]] = {}  # mesh axes -> {logical name: dimension}
    examples: dict[Any, str] = {}  # mesh axes -> the first parameter they misfit, "path [shape]"
    splitting = set(_names(mesh_axes_of(("batch",), rules)[0]))  # mesh axes that split something

    def one(path, spec, leaf):
        logical = tuple(spec) if spec else ()
        entries = list(mesh_axes_of(logical, rules) if logical else PartitionSpec())
        for i, (name, axes, dim) in enumerate(zip(logical, entries, leaf.shape)):
            if dim % _axis_size(mesh, axes):
                misfits.setdefault(axes, {}).setdefault(name, dim)
                examples.setdefault(axes, f"{'/'.join(str(getattr(k, 'key', k)) for k in path)} {list(leaf.shape)}")
                entries[i] = None
            else:
                splitting.update(_names(axes))
        return NamedSharding(mesh, PartitionSpec(*entries))

    out = jax.tree.map_with_path(one, logical_specs, abstract_params, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for axes, dims in misfits.items():
        keys = " x ".join(f"mesh.shape.{a}={mesh.shape[a]}" for a in _names(axes))
        what = f"the parameter dimension(s) {', '.join(f'{n} ({d})' for n, d in dims.items())} (e.g. {examples[axes]})"
        idle = [a for a in _names(axes) if mesh.shape[a] > 1 and a not in splitting]
        if idle:
            raise ShardingError(
                f"{keys} does not divide {what}, and mesh axis {idle[0]!r} splits nothing else: its devices would "
                f"all do the same work; use a size that divides them, or map {', '.join(map(repr, dims))} to None "
                "in mesh.rules"
            )
        warnings.warn(f"{keys} does not divide {what}: those dimensions stay whole on every device", stacklevel=2)
    return out


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
