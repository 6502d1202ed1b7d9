"""The trained gates as their own files: what training exports and inference loads.

    export_gates(path, gates, adapter_names, settings)   # training (meteora_jax.train)
    gates, names = load_gates(path)                       # inference (meteora_jax.generate)
    params = merge_params(gates, params)

Only the routers are trained: MeteoRA's gates (leaves named "gate", `[n_layers, d_in, L]` float32
in the scanned layout) and, in a model with MixLoRA experts, their router and LoRA experts
(`TRAINABLE_LEAVES`). So a run's result is that small tree alone, kept apart from the frozen model
checkpoint it was trained on; it is called "the gates" below, as it is in MeteoRA. An export
folder holds

    gates/               Orbax checkpoint of the trained tree (`split_params(params)[0]`)
    adapter_names.json   the adapters in gate-column order: must match the model checkpoint's
    settings.json        how the run routed and prompted (`train.run_settings`), and the MixLoRA
                         experts' settings, which the checkpoint itself may lack: optional for
                         gates alone, needed for experts

This module needs no training dependencies (optax, datasets), so inference can load gates
without them.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils

from meteora_jax.checkpoint import CheckpointError, check_shardings_fit, orbax_read
from meteora_jax.files import replace_folder, written_whole

# MixLoRA's router and experts (named apart from MeteoRA's frozen lora_a / lora_b), and MeteoRA's gates.
MIXLORA_LEAVES = ("router", "expert_lora_a", "expert_lora_b")
TRAINABLE_LEAVES = ("gate",) + MIXLORA_LEAVES
GATE_SETTINGS_FILE = "settings.json"
ADAPTER_NAMES_FILE = "adapter_names.json"
_STAGED, _PREVIOUS = ".gates.new", ".gates.previous"  # an export being written, the one it replaces


def is_trainable(path: tuple[str, ...]) -> bool:
    """A param is trainable iff its leaf name is one of `TRAINABLE_LEAVES`."""
    return path[-1] in TRAINABLE_LEAVES


def split_params(params: Mapping) -> tuple[dict, dict]:
    """params -> (trainable, frozen): two nested dicts holding disjoint leaves."""
    flat = traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if is_trainable(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Mapping, frozen: Mapping) -> dict:
    """Inverse of `split_params`."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)})


def check_gates_fit(gates: Mapping, params: Mapping, where: str) -> None:
    """ValueError unless `gates` holds exactly the gate leaves of `params`, each of the same shape
    (gates trained on another model would otherwise fail deep in the model, or route with some
    of the checkpoint's untrained gates). `where` names the gates in the message."""
    want = {k: v.shape for k, v in traverse_util.flatten_dict(split_params(params)[0]).items()}
    got = {k: v.shape for k, v in traverse_util.flatten_dict(gates).items()}
    for key in sorted(want.keys() | got.keys()):
        name = "/".join(map(str, key))
        if key not in got:
            raise ValueError(f"gates in {where} have no {name}, which the model checkpoint has: trained for another model?")
        if key not in want:
            raise ValueError(f"gates in {where} have {name}, which the model checkpoint has not: trained for another model?")
        if tuple(got[key]) != tuple(want[key]):
            raise ValueError(f"gates in {where}: {name} has shape {tuple(got[key])}, the model checkpoint's is "
                             f"{tuple(want[key])}: trained for another model?")


def export_gates(path, gates, adapter_names, settings: Mapping[str, Any] | None = None) -> str:
    """Saves only the gates (Orbax) plus `adapter_names.json` and, when given, `settings.json` (the
    run's `run_settings`: read back by `load_gate_settings`).

    An older export in `path` is replaced only once the new gates are written: Orbax writes them to a
    hidden `.gates.new` beside `gates/`, which is renamed into place at the end, and each JSON file
    is written whole. A failed export leaves the older one loadable and nothing half-written.
    Every process calls it (Orbax writes sharded arrays cooperatively); returns the folder.
    """
    path = os.path.abspath(os.fspath(path))
    final, staged = os.path.join(path, "gates"), os.path.join(path, _STAGED)
    first = jax.process_index() == 0
    if first:
        _remove_staged(path)  # left by an export that was killed
    _sync_processes("meteora_jax.gates: staging folder cleared")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(staged, gates)
    except BaseException:
        if first:
            _remove_staged(path)
        raise
    if first:
        with written_whole(os.path.join(path, ADAPTER_NAMES_FILE)) as f:
            json.dump(list(adapter_names), f)
        settings_path = os.path.join(path, GATE_SETTINGS_FILE)
        if settings is not None:
            with written_whole(settings_path) as f:
                json.dump(dict(settings), f, indent=1)
        elif os.path.exists(settings_path):  # not those of an older export
            os.remove(settings_path)
        replace_folder(staged, final, os.path.join(path, _PREVIOUS))
    _sync_processes("meteora_jax.gates: export in place")
    return path


def _remove_staged(path: str) -> None:
    """Removes an unfinished export's folders: ours and Orbax's temporary one beside it."""
    for leftover in glob.glob(os.path.join(glob.escape(path), _STAGED + "*")) + [os.path.join(path, _PREVIOUS)]:
        shutil.rmtree(leftover, ignore_errors=True)


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: {what} is not valid JSON ({err})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: {what} is not UTF-8 text") from None


def load_gates(path, sharding: jax.sharding.Sharding | None = None) -> tuple[dict, list[str]]:
    """-> (gates tree as `split_params(params)[0]`, adapter names). Merge with `merge_params`.
    A folder that is not a gate export raises ValueError naming what is missing (as
    `checkpoint.restore_checkpoint` does for a model checkpoint: the CLIs report both alike).

    sharding: where every gate goes; None puts them on the first local device (as
    `restore_checkpoint` does with the params), whatever mesh the training run saved them from.
    """
    path = os.path.abspath(os.fspath(path))
    names_path, gates_path = os.path.join(path, ADAPTER_NAMES_FILE), os.path.join(path, "gates")
    if not os.path.exists(path):
        raise ValueError(f"gates folder {path} does not exist")
    for needed in (gates_path, names_path):
        if not os.path.exists(needed):
            inside = os.path.join(gates_path, ADAPTER_NAMES_FILE)  # a training workdir holds the export in gates/
            hint = f"; did you mean {gates_path}?" if os.path.isfile(inside) else ""
            raise ValueError(f"{path} is not a gate export (expected gates/ and {ADAPTER_NAMES_FILE}): "
                             f"{needed} is missing{hint}")
    names = _read_json(names_path, "the adapter names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{names_path}: expected a JSON list of adapter names, got {names!r}")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as ckptr, orbax_read(gates_path, "the gates"):
        # Without a target Orbax rebuilds the saving run's mesh: gates trained on several devices
        # would not load on one, nor sit beside params restored on one device.
        stored = ckptr.metadata(gates_path)
        if stored is None or stored.item_metadata is None:
            raise CheckpointError(f"{gates_path}: holds no Orbax checkpoint metadata (an empty or damaged export)")
        tree = stored.item_metadata.tree
        shapes = {"/".join(k): m.shape for k, m in traverse_util.flatten_dict(tree).items()}  # (names for messages)
        check_shardings_fit(gates_path, dict.fromkeys(shapes, sharding), shapes)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
        gates = ckptr.restore(gates_path, target)
    return gates, names


def load_gate_settings(path) -> dict:
    """The training run's settings exported with the gates (see `train.run_settings`); {} for an
    export that has none."""
    settings_path = os.path.join(os.path.abspath(os.fspath(path)), GATE_SETTINGS_FILE)
    if not os.path.exists(settings_path):
        return {}
    settings = _read_json(settings_path, "the run settings")
    if not isinstance(settings, dict):
        raise ValueError(f"{settings_path}: expected a JSON object of run settings, got {settings!r}")
    for key, value in settings.items():  # (top_k 2.7 was cut to 2; "two" failed in int())
        want = _SETTING_TYPES.get(key)
        if want and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
            raise ValueError(f"{settings_path}: {key!r} must be {_TYPE_NAMES[want]}, got {value!r}")
    return settings


# The value types of `train.run_settings`' keys (other keys are kept as they are).
_SETTING_TYPES = {"top_k": int, "kernel_impl": str, "dtype": str, "chat_template": bool, "lm_on_prompt": bool,
                  "gate_scope": str, "mixlora": dict}
_TYPE_NAMES = {int: "an integer", str: "a string", bool: "true or false", dict: "an object"}
