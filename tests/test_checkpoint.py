"""Orbax checkpoints: bit-exact round trip, config and metadata, atomic writes, sharded restore."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meteora_jax.checkpoint import CheckpointError, read_metadata, restore_checkpoint, save_checkpoint
from meteora_jax.config import MeteoRAConfig, ModelConfig
from meteora_jax.model import init_params

REPO = Path(__file__).resolve().parent.parent


def _config(param_dtype="bfloat16"):
    return ModelConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        param_dtype=param_dtype, meteora=MeteoRAConfig(num_adapters=3, rank=4, top_k=2, targets=("q_proj", "down_proj")),
    )


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def _assert_bit_exact(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), (_, b) in zip(_leaves(got), _leaves(want)):
        a, b = np.asarray(a), np.asarray(b)
        assert (a.shape, a.dtype) == (b.shape, b.dtype), path
        assert a.tobytes() == b.tobytes(), path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    config = _config()
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
    path = tmp_path_factory.mktemp("ckpt") / "model"
    metadata = {"adapters": [{"name": "a", "sha256": "00ff"}, {"name": "b"}, {"name": "c"}], "kind": "test"}
    save_checkpoint(path, params, config, metadata)
    return path, params, config, metadata


def test_round_trip_is_bit_exact(saved):
    path, params, config, metadata = saved
    dtypes = {np.asarray(leaf).dtype.name for leaf in jax.tree.leaves(params)}
    assert dtypes == {"bfloat16", "float32"}  # bf16 weights, float32 gates and scalings
    got, got_config, got_meta = restore_checkpoint(path)
    _assert_bit_exact(got, params)
    assert got_config == config
    assert got_meta["adapters"] == metadata["adapters"] and got_meta["kind"] == "test"
    assert ModelConfig.from_dict(got_meta["model_config"]) == config
    assert got_meta["param_shapes"]["layers/self_attn/q_proj/lora_a"] == [[2, 3, 32, 4], "bfloat16"]
    assert read_metadata(path) == got_meta
    # Restored params run the model.
    from meteora_jax import LlamaForCausalLM

    logits = LlamaForCausalLM(got_config).apply({"params": got}, np.zeros((1, 4), np.int32)).logits
    assert logits.shape == (1, 4, 96) and np.isfinite(np.asarray(logits)).all()


def test_sharded_restore_single_device_mesh(saved):
    path, params, _, _ = saved
    mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "fsdp")), params)
    got, _, _ = restore_checkpoint(path, shardings=shardings)
    _assert_bit_exact(got, params)
    for (p, leaf), (_, want) in zip(_leaves(got), _leaves(shardings)):
        assert leaf.sharding == want, p
    single = NamedSharding(mesh, P())  # one sharding for every leaf
    got, _, _ = restore_checkpoint(path, shardings=single)
    assert all(leaf.sharding == single for leaf in jax.tree.leaves(got))
    with pytest.raises(CheckpointError, match="shardings do not fit the params"):
        restore_checkpoint(path, shardings={"embed_tokens": shardings["embed_tokens"]})


def test_sharded_restore_four_devices(saved, tmp_path):
    """Each of 4 (forced host) devices holds only its slice of every array after the restore."""
    path, params, _, _ = saved
    np.savez(tmp_path / "want.npz", **{jax.tree_util.keystr(k): np.asarray(v).astype(np.float32) for k, v in _leaves(params)})
    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from meteora_jax.checkpoint import restore_checkpoint, read_metadata
        assert jax.device_count() == 4
        mesh = Mesh(np.array(jax.devices()), ("fsdp",))
        shapes = read_metadata({str(path)!r})["param_shapes"]
        def spec(shape):  # shard the last axis when it divides, else replicate
            return P(*([None] * (len(shape) - 1)), "fsdp") if shape[-1] % 4 == 0 else P()
        tree = {{}}
        for key, (shape, _) in shapes.items():
            node = tree
            *parents, leaf = key.split("/")
            for part in parents:
                node = node.setdefault(part, {{}})
            node[leaf] = NamedSharding(mesh, spec(shape))
        params, config, meta = restore_checkpoint({str(path)!r}, shardings=tree)
        want = np.load({str(tmp_path / "want.npz")!r})
        sharded = 0
        for k, v in jax.tree_util.tree_leaves_with_path(params):
            assert v.sharding == NamedSharding(mesh, spec(v.shape)), k
            shard_shapes = {{s.data.shape for s in v.addressable_shards}}
            if v.shape[-1] % 4 == 0:
                assert shard_shapes == {{v.shape[:-1] + (v.shape[-1] // 4,)}}, (k, shard_shapes)
                sharded += 1
            np.testing.assert_array_equal(np.asarray(v).astype(np.float32), want[jax.tree_util.keystr(k)])
        print("sharded", sharded)
        # A sharding that does not divide its leaf (a mesh mistake) is named as such, not as damage.
        bad = jax.tree.map(lambda _: NamedSharding(mesh, P("fsdp")), tree)
        try:
            restore_checkpoint({str(path)!r}, shardings=bad)
        except ValueError as e:
            print("error:", e)
        too_long = jax.tree.map(lambda _: NamedSharding(mesh, P(*[None] * 6, "fsdp")), tree)  # more axes than any leaf
        try:
            restore_checkpoint({str(path)!r}, shardings=too_long)
        except ValueError as e:
            print("rank error:", e)
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split("sharded")[-1].split()[0]) >= 10
    error = proc.stdout.split("rank error:")[0].split("error:")[-1]
    assert "the sharding given for" in proc.stdout.split("rank error:")[-1]  # an IndexError inside jax before
    assert "the sharding given for" in error and "does not fit it" in error and "damaged" not in error, error


def test_existing_path_and_overwrite(saved, tmp_path):
    _, params, config, _ = saved
    path = tmp_path / "ckpt"
    save_checkpoint(path, params, config, {"v": 1})
    with pytest.raises(CheckpointError, match="exists; pass overwrite=True"):
        save_checkpoint(path, params, config, {"v": 2})
    assert read_metadata(path)["v"] == 1
    save_checkpoint(path, params, config, {"v": 2}, overwrite=True)
    assert read_metadata(path)["v"] == 2
    assert os.listdir(tmp_path) == ["ckpt"]  # no staging or previous copies left


def test_failed_save_leaves_nothing(saved, tmp_path, monkeypatch):
    _, params, config, _ = saved
    path = tmp_path / "ckpt"
    save_checkpoint(path, params, config, {"v": 1})

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.Checkpointer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "new", params, config, {})
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, params, config, {"v": 2}, overwrite=True)
    assert os.listdir(tmp_path) == ["ckpt"]
    monkeypatch.undo()
    assert read_metadata(path)["v"] == 1  # the old checkpoint survives a failed overwrite


def test_a_cleanup_between_a_saves_mkdir_and_lock_leaves_it_alone(saved, tmp_path, monkeypatch, caplog):
    """Another save's remove_stale_staging running after this save made its staging folder and before
    it locked it took the folder for a killed save's and removed it (the save went on unlocked)."""
    import meteora_jax.checkpoint as ckpt

    _, params, config, _ = saved
    path = tmp_path / "ckpt"
    real_lock = ckpt._lock

    def lock_after_a_concurrent_cleanup(folder):
        ckpt.remove_stale_staging(path)  # another save of the same output, starting now
        assert os.path.isdir(folder)
        return real_lock(folder)

    monkeypatch.setattr(ckpt, "_lock", lock_after_a_concurrent_cleanup)
    with caplog.at_level("WARNING", logger="meteora_jax.checkpoint"):
        save_checkpoint(path, params, config, {"v": 1})
    assert not [r for r in caplog.records if "removed" in r.getMessage()]
    assert read_metadata(path)["v"] == 1 and os.listdir(tmp_path) == ["ckpt"]


def test_an_empty_folder_of_a_killed_save_is_removed(saved, tmp_path, caplog):
    """A save killed between making its folder and renaming it left an empty `.ckpt.new-XXXXXXXX` for
    good. The next save removes it once it is a minute old; a fresh one (a save that may be renaming
    it right now) and one that is not empty are left alone."""
    _, params, config, _ = saved
    path = tmp_path / "ckpt"
    old, fresh, full = (tmp_path / f".ckpt.new-{suffix}" for suffix in ("0badf00d", "1badf00d", "2badf00d"))
    for folder in (old, fresh, full):
        folder.mkdir()
    (full / "file").write_text("x")
    for folder in (old, full):
        os.utime(folder, (os.path.getmtime(folder) - 120,) * 2)
    with caplog.at_level("WARNING", logger="meteora_jax.checkpoint"):
        save_checkpoint(path, params, config, {"v": 1})
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", fresh.name, full.name])
    assert [r.getMessage() for r in caplog.records if "left empty" in r.getMessage()] == [
        f"removed {old}, left empty by a save of {path} that was interrupted"]


def test_damaged_copies_are_named(saved, tmp_path):
    """A checkpoint cut short (an interrupted copy): its metadata or params cannot be read, and the
    error names the checkpoint and the part (they were a JSONDecodeError, or a tensorstore
    OUT_OF_RANGE deep in Orbax)."""
    import shutil

    path = saved[0]
    for part in ("metadata", "params"):
        damaged = tmp_path / f"cut_{part}"
        shutil.copytree(path, damaged)
        files = [Path(root) / f for root, _, names in os.walk(damaged / part) for f in names]
        for f in files if part == "metadata" else [max(files, key=lambda f: f.stat().st_size)]:
            data = f.read_bytes()
            f.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=rf"cut_{part}: cannot read its {part} \(damaged or incomplete files\?\)"):
            restore_checkpoint(damaged)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a meteora-jax checkpoint"):
        restore_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint .*misspelt does not exist"):  # not "is not a checkpoint"
        restore_checkpoint(tmp_path / "misspelt")


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """If the final rename fails, the checkpoint that was there before is still there, intact."""
    from meteora_jax import checkpoint as ckpt

    config = _config()
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(1)))
    path = tmp_path / "ckpt"
    ckpt.save_checkpoint(path, params, config, {"run": "first"})
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # 1: old -> staging/previous, 2: new -> path (fails), 3: restore
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, params, config, {"run": "second"}, overwrite=True)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert ckpt.read_metadata(path)["run"] == "first"
    assert not list(tmp_path.glob(".ckpt.tmp-*"))  # no staging left behind
