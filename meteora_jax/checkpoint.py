"""Orbax checkpoints of model parameters with their config and metadata.

A checkpoint is one directory written by an Orbax `CompositeCheckpointHandler` with two items:

    <dir>/params/     the parameter pytree (Orbax `StandardSave`, OCDBT/zarr arrays)
    <dir>/metadata/   JSON (`JsonSave`): {"format", "version", "model_config", "param_shapes", ...}

`model_config` is `ModelConfig.to_dict()`; `param_shapes` maps "path/to/leaf" to
`[shape, dtype]`, so a restore can build abstract arrays (and `inspect` can describe the
checkpoint) without reading any array. Everything else in the metadata is the caller's (the
converters store adapter names in index order, ranks, alphas, rsLoRA flags, target modules,
source paths and sha256 hashes).

    save_checkpoint(path, params, config, metadata)            # atomic; overwrite=True to replace
    params, config, metadata = restore_checkpoint(path)         # onto the first local device
    params, config, metadata = restore_checkpoint(path, shardings=tree_of_shardings)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from meteora_jax.config import ConfigError, ModelConfig
from meteora_jax.files import replace_folder

log = logging.getLogger(__name__)

FORMAT = "meteora-jax"
VERSION = 1
PARAMS_ITEM = "params"
METADATA_ITEM = "metadata"


class CheckpointError(ValueError):
    """A checkpoint path that is missing, exists already, or does not hold a meteora-jax checkpoint."""


@contextlib.contextmanager
def orbax_read(path: str | os.PathLike, what: str):
    """Turns what Orbax and tensorstore raise while reading files (truncated JSON, an OCDBT read past
    the end, missing array data: tensorstore's errors reach us as a bare Exception) into one
    CheckpointError naming `path` and `what` was being read, chained to the original. Callers check
    their own arguments (shardings, targets) before, so what is left is about the files. Our own
    CheckpointErrors pass through."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        reason = " ".join(str(e).split()) or type(e).__name__
        if len(reason) > 400:
            reason = reason[:400].rsplit(" ", 1)[0] + " ..."
        raise CheckpointError(f"{path}: cannot read {what} (damaged or incomplete files?): {reason}") from e


def check_shardings_fit(where: str, shardings: Mapping[Any, Any], shapes: Mapping[Any, Any]) -> None:
    """CheckpointError naming the first leaf whose sharding does not divide its shape (a mesh or
    config mistake, which Orbax would report in the middle of reading)."""
    for key, shape in shapes.items():
        try:
            shardings[key].shard_shape(tuple(shape))
        except (ValueError, IndexError) as e:  # (IndexError: a PartitionSpec longer than the rank)
            raise CheckpointError(f"{where}: the sharding given for {key} {tuple(shape)} does not fit it: {e}") from None


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` looks like a checkpoint written by `save_checkpoint`."""
    path = Path(path)
    return (path / PARAMS_ITEM).is_dir() and (path / METADATA_ITEM).is_dir()


def replaceable(path: str | os.PathLike) -> bool:
    """Whether `overwrite` may replace an existing `path`: a checkpoint, or an empty folder (never any
    other folder or file)."""
    path = Path(path)
    return is_checkpoint(path) or (path.is_dir() and not any(path.iterdir()))


def _staging_prefix(path: Path) -> str:
    """`save_checkpoint` writes `path` into the hidden folder `<prefix><8 hex digits>` beside it."""
    return f".{path.name}.tmp-"


def _unlocked_prefix(path: Path) -> str:
    """...having made it as `<this prefix><the same digits>`, locked it, and renamed it."""
    return f".{path.name}.new-"


_UNLOCKED_STALE_S = 60  # a save renames its new folder within microseconds: older, empty ones were killed


def _lock(folder: Path) -> int:
    """A descriptor of `folder` holding its exclusive flock, released when it is closed or the process
    dies (kill -9 included): marks a save in progress. OSError where it cannot (BlockingIOError:
    another process holds it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_stale_staging(path: str | os.PathLike) -> None:
    """Removes the staging folders that saves of `path` killed mid-write (kill -9, an out-of-memory
    kill, a power cut) left beside it, with a warning naming each: no cleanup ran in them, and each
    holds up to a model's size. A folder whose save is still running (it holds the folder's flock) is
    left alone. One holding the old checkpoint, moved aside by an overwrite that was killed before
    the new one was renamed into place, gives it back first if `path` is missing."""
    path = Path(path).absolute()
    pattern = re.compile(re.escape(_staging_prefix(path)) + "[0-9a-f]{8}")
    try:
        names = os.listdir(path.parent)
    except OSError:  # no folder yet, or not a folder: the caller reports that
        return
    _remove_empty_unlocked(path, names)
    for staging in (path.parent / name for name in names if pattern.fullmatch(name)):
        if not staging.is_dir():
            continue
        try:
            fd = _lock(staging)
        except FileNotFoundError:  # finished meanwhile
            continue
        except BlockingIOError:
            log.info("left %s alone: a save of %s is writing it", staging, path)
            continue
        except OSError as err:  # a file system without flock: a live save is not told from a killed one
            log.warning("%s is left by a save of %s that was interrupted or is still running (%s); remove it "
                        "if none is", staging, path, err)
            continue
        try:
            previous = staging / "previous"
            if not path.exists() and is_checkpoint(previous):
                os.replace(previous, path)
                log.warning("put %s back from %s, where an interrupted overwrite had moved it", path, previous)
            shutil.rmtree(staging, ignore_errors=True)
            log.warning("removed %s, left by a save of %s that was interrupted", staging, path)
        finally:
            os.close(fd)


def _remove_empty_unlocked(path: Path, names: list[str]) -> None:
    """The empty folders of saves killed between making their folder and renaming it (see
    `save_checkpoint`): empty, unlocked and older than a minute, so never a live save's."""
    pattern = re.compile(re.escape(_unlocked_prefix(path)) + "[0-9a-f]{8}")
    for folder in (path.parent / name for name in names if pattern.fullmatch(name)):
        try:
            if time.time() - folder.stat().st_mtime < _UNLOCKED_STALE_S or any(folder.iterdir()):
                continue
            fd = _lock(folder)
        except OSError:  # gone, not a folder, or locked by a save in progress
            continue
        try:
            folder.rmdir()
            log.warning("removed %s, left empty by a save of %s that was interrupted", folder, path)
        except OSError:
            pass
        finally:
            os.close(fd)


def save_checkpoint(
    path: str | os.PathLike,
    params: Mapping,
    config: ModelConfig,
    metadata: Optional[Mapping[str, Any]] = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Writes `params` (nested dicts of numpy or jax arrays), `config` and JSON `metadata`.

    Atomic: written into a hidden temporary directory next to `path` and renamed into place at
    the end, so a failure leaves nothing behind (a killed save's folder is removed by the next save
    of `path`: `remove_stale_staging`). An existing `path` is an error unless
    `overwrite`, in which case it is replaced only once the new checkpoint is complete, and only
    if it is a checkpoint (or an empty folder): anything else is an error either way.
    Returns the absolute path.
    """
    path = Path(path).absolute()
    if jax.process_count() > 1:
        raise CheckpointError("save_checkpoint is single-process (converters, tools); multi-host training saves "
                              "through its Orbax CheckpointManager")
    remove_stale_staging(path)  # (first: it may put back an old checkpoint that an overwrite moved aside)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if path.exists() and not replaceable(path):
        raise CheckpointError(f"{path} exists and is not a checkpoint; overwrite replaces only checkpoints")
    flat = _flatten(params)
    meta = dict(metadata or {})
    meta.update(
        format=FORMAT,
        version=VERSION,
        model_config=config.to_dict(),
        param_shapes={k: [list(np.shape(v)), np.dtype(v.dtype).name] for k, v in flat.items()},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = uuid.uuid4().hex[:8]
    staging = path.parent / f"{_staging_prefix(path)}{suffix}"
    # Locked under a name remove_stale_staging does not match, then renamed (the lock stays on the
    # folder): made and locked under the staging name, another save's cleanup could take it between
    # the two steps.
    unlocked = path.parent / f"{_unlocked_prefix(path)}{suffix}"
    lock = None
    try:
        unlocked.mkdir()
        with contextlib.suppress(OSError):  # (no flock there: other saves only report the folder)
            lock = _lock(unlocked)  # so that another save's remove_stale_staging leaves it alone
        os.rename(unlocked, staging)
        target = staging / "checkpoint"
        _checkpointer().save(
            target,
            args=ocp.args.Composite(
                **{PARAMS_ITEM: ocp.args.StandardSave(dict(params)), METADATA_ITEM: ocp.args.JsonSave(meta)}
            ),
        )
        if path.exists() and not overwrite:  # appeared while we were writing
            raise CheckpointError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        replace_folder(target, path, staging / "previous")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(unlocked, ignore_errors=True)
        if lock is not None:
            os.close(lock)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata JSON of a checkpoint (reads no arrays)."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} is not a meteora-jax checkpoint (expected {PARAMS_ITEM}/ and {METADATA_ITEM}/)")
    with orbax_read(path, "its metadata"):
        restored = _checkpointer().restore(path, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))
        meta = dict(restored[METADATA_ITEM])
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: metadata format is {meta.get('format')!r}, not {FORMAT!r}")
    return meta


def model_config_of(path: str | os.PathLike, metadata: Mapping) -> ModelConfig:
    """The `ModelConfig` stored in a checkpoint's metadata; CheckpointError naming the checkpoint
    if it cannot be built (written by another version, or edited)."""
    try:
        return ModelConfig.from_dict(metadata["model_config"])
    except ConfigError as e:
        raise CheckpointError(f"{Path(path).absolute()}: model config: {e}") from None


def abstract_params(metadata: Mapping) -> dict:
    """The params tree of a checkpoint's metadata as `jax.ShapeDtypeStruct` leaves (no arrays read)."""
    shapes = metadata["param_shapes"]
    return _unflatten({key: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype)) for key, (shape, dtype) in shapes.items()})


def adapter_names(metadata: Mapping) -> list[str]:
    """The adapter names of a checkpoint's metadata, in index order (gate column i = adapter i).

    Converted checkpoints list their adapters under `metadata["adapters"]` (one dict each, with
    its "name", rank, alpha, source, ...).
    """
    return [str(entry["name"]) for entry in metadata.get("adapters") or []]


def restore_checkpoint(
    path: str | os.PathLike,
    shardings: Any = None,
) -> tuple[dict, ModelConfig, dict]:
    """Restores `(params, config, metadata)`.

    shardings: None puts every array on the first local device; a single `jax.sharding.Sharding`
      applies to every leaf; or a pytree of shardings with the params' structure (e.g. built from a
      Mesh and the logical axis rules). Each array is read straight into its sharding, shard by
      shard, so a large model never has to sit whole on one device.
    """
    path = Path(path).absolute()
    meta = read_metadata(path)
    config = model_config_of(path, meta)
    shapes = meta["param_shapes"]
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        flat_shardings = {key: shardings for key in shapes}
    else:
        flat_shardings = _flatten(shardings)
        if set(flat_shardings) != set(shapes):
            missing, extra = sorted(set(shapes) - set(flat_shardings)), sorted(set(flat_shardings) - set(shapes))
            raise CheckpointError(f"{path}: shardings do not fit the params (missing {missing}, unexpected {extra})")
    check_shardings_fit(str(path), flat_shardings, {key: shape for key, (shape, _) in shapes.items()})
    abstract = _unflatten(
        {
            key: jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=flat_shardings[key])
            for key, (shape, dtype) in shapes.items()
        }
    )
    with orbax_read(path, "its params"):
        restored = _checkpointer().restore(
            path, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(abstract)})
        )
    return dict(restored[PARAMS_ITEM]), config, meta
