"""The mesh config from the command line (`scripts/train.py --config.mesh...`) on fake CPU devices:
bad shapes and rules stop with one line naming the key and exit status 2 before any compute, and a
sharded step gives the one-device loss and gate gradients.

Fake devices need XLA_FLAGS before jax is imported, so everything here runs in subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import child_env
from meteora_jax import sharding as sharding_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return child_env(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")


def _train_cli(devices: int, workdir, *overrides: str, world=None) -> subprocess.Popen:
    """scripts/train.py on configs/tiny.py for one step, started (not waited for). Without a world
    the model checkpoint does not exist: enough for errors reported before it is read."""
    model, tokenizer, data = (world.model, world.tokenizer, world.data_root) if world else ("/nonexistent",) * 3
    args = [
        sys.executable, os.path.join(REPO, "scripts", "train.py"), "--config", os.path.join(REPO, "configs", "tiny.py"),
        "--config.tiny_world=", f"--config.model_checkpoint={model}", f"--config.tokenizer={tokenizer}",
        f"--config.data.root={data}", f"--config.workdir={workdir}", "--config.train.steps=1",
        "--config.train.eval_every=-1", "--config.logging.progress=False", "--config.logging.tensorboard=False",
        *overrides,
    ]  # fmt: skip
    pipe = subprocess.PIPE
    return subprocess.Popen(args, stdout=pipe, stderr=pipe, text=True, cwd=REPO, env=_env(devices))


def _expect_errors(devices: int, cases: dict, tmp_path, world=None) -> None:
    """Runs every case at once; each must print exactly `error: <its message>...` and exit with 2,
    leaving no workdir behind (nothing heavy started)."""
    procs = {flags: _train_cli(devices, tmp_path / f"w{i}", *flags, world=world) for i, flags in enumerate(cases)}
    problems = []
    for i, (flags, proc) in enumerate(procs.items()):
        out, err = proc.communicate(timeout=240)
        want = f"error: {cases[flags]}"
        if proc.returncode != 2 or not err.startswith(want) or err.count("\n") != 1:
            problems.append(f"{flags}: rc={proc.returncode}, want {want!r}, stderr ends {err[-600:]!r}")
        elif os.path.exists(tmp_path / f"w{i}"):
            problems.append(f"{flags}: the workdir was created before the error")
    assert not problems, "\n".join(problems)


def test_bad_mesh_shape_and_rules_one_line_exit_2(tmp_path):
    cases = {
        ("--config.mesh.shape.fsdp=3",): "mesh.shape.fsdp=3: 4 devices are not divisible by 3 (mesh.shape.data=-1",
        ("--config.mesh.shape.data=3",): "mesh.shape.data=3 needs 3 devices, 4 are present",
        ("--config.mesh.shape.fsdp=-1",): "mesh.shape.data=-1, mesh.shape.fsdp=-1: at most one axis may be -1",
        ("--config.mesh.shape.fsdp=0",): "mesh.shape.fsdp=0: want a size >= 1, or -1",
        ("--config.mesh.shape.tensor=-2",): "mesh.shape.tensor=-2: want a size >= 1, or -1",
        ('--config.mesh.shape={"data": "x", "fsdp": 1, "tensor": 1}',): "mesh.shape.data='x': want a size >= 1",
        # An axis no rule uses: its devices would duplicate the others' work.
        ('--config.mesh.shape={"data": -1, "fsdp": 1, "tensor": 1, "model": 2}',): (
            "mesh.shape.model=2: no mesh.rules entry maps onto mesh axis 'model'"
        ),
        ("--config.mesh.rules[0][1]=dat",): (
            "mesh.rules entry ('batch', 'dat') names mesh axis 'dat', which mesh.shape lacks "
            "(it has data, fsdp, tensor; did you mean 'data'?)"
        ),
        ("--config.train.batch_size=6",): "micro-batch 6 (train.batch_size / grad_accum_steps) is not a multiple of",
    }
    _expect_errors(4, cases, tmp_path)


def test_mesh_that_cannot_split_the_model(tiny_inference_world, tmp_path):
    """The tiny model is 64 wide (vocab 256, 2 kv heads x 16, mlp 128): nothing divides by 3.
    tensor=3 then splits nothing at all, which is one line and exit 2 (before, the run went on with 3
    devices doing one's work); fsdp=3 still splits the batch, so the run goes on with the parameters
    whole and a warning naming the key."""
    batch = ("--config.train.batch_size=12", "--config.train.eval_batch_size=12")
    cases = {
        ("--config.mesh.shape.tensor=3", *batch): (
            "mesh.shape.tensor=3 does not divide the parameter dimension(s) vocab (256), mlp (128), kv_heads (32), "
            "q_heads (64) (e.g. embed_tokens/embedding [256, 64]), and mesh axis 'tensor' splits nothing else"
        ),
    }
    fsdp = _train_cli(3, tmp_path / "fsdp", "--config.mesh.shape.fsdp=3", *batch, world=tiny_inference_world)
    _expect_errors(3, cases, tmp_path, world=tiny_inference_world)
    out, err = fsdp.communicate(timeout=240)
    assert fsdp.returncode == 0, err[-2000:]
    assert "mesh.shape.fsdp=3 does not divide the parameter dimension(s) embed (64)" in err, err[-2000:]
    assert "those dimensions stay whole on every device" in err


def test_rule_entries_validated():
    with pytest.raises(sharding_lib.ShardingError, match=r"mesh.rules entry \('batch', \('data', 'data'\)\): want"):
        sharding_lib.logical_rules([("batch", ("data", "data"))])
    with pytest.raises(sharding_lib.ShardingError, match=r"mesh.rules entry \('batch', 3\): want a mesh axis name"):
        sharding_lib.logical_rules([("batch", 3)])
    assert sharding_lib.logical_rules([["batch", ["data"]], ["embed", []]]) == (("batch", "data"), ("embed", None))
    # A misspelt logical name matched no array: the adapters silently stayed whole on every device.
    with pytest.raises(sharding_lib.ShardingError, match=r"names logical axis 'adapter', which no array has .*did you mean 'adapters'"):
        sharding_lib.logical_rules([("adapter", "tensor")] + list(sharding_lib.DEFAULT_RULES))


_GRADS = textwrap.dedent(
    """
    import importlib.util, json, sys
    import jax, numpy as np
    from meteora_jax import data as data_lib, sharding as sharding_lib, train as train_lib

    world, workdir = json.loads(sys.argv[1]), sys.argv[2]
    spec = importlib.util.spec_from_file_location("tiny", "configs/tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference, worst = None, {}
    for i, shape in enumerate([dict(data=2, fsdp=2, tensor=1), dict(data=1, fsdp=2, tensor=2)]):
        config = module.get_config()
        config.update(tiny_world="", workdir=f"{workdir}/{i}", model_checkpoint=world["model"])
        config.tokenizer = world["tokenizer"]
        config.data.root = world["data"]
        config.train.update(batch_size=8, eval_batch_size=8, eval_every=-1)
        config.mesh.shape = shape
        trainer = train_lib.Trainer(train_lib.prepare(config))
        batch = next(trainer.iterator)
        grad = jax.value_and_grad(
            train_lib._loss_fn(trainer.model, float(config.train.loss_coef), trainer.setup.model_config.meteora.top_k),
            has_aux=True,
        )
        if reference is None:  # one device: plain jit on host copies (the same gates, frozen params, batch)
            args = jax.device_get((trainer.state.gates, trainer.frozen))
            (loss, _), grads = jax.jit(grad)(*args, batch)
            reference = float(loss), jax.tree.leaves(jax.device_get(grads))
        batch_shardings = {k: trainer.batch_sharding for k in data_lib.ARRAY_KEYS}
        with trainer._context():
            step = jax.jit(grad, in_shardings=(trainer.gate_shardings, trainer.frozen_shardings, batch_shardings))
            sharded = sharding_lib.put_batch(batch, trainer.batch_sharding)
            (loss, _), grads = step(trainer.state.gates, trainer.frozen, sharded)
        grads = jax.tree.leaves(jax.device_get(grads))
        errors = [np.abs(g - r).max() / np.abs(r).max() for g, r in zip(grads, reference[1])]
        worst[str(shape)] = dict(
            loss=abs(float(loss) - reference[0]) / abs(reference[0]), grads=float(max(errors)), n=len(errors),
            devices=trainer.mesh.devices.size,
        )
        trainer.close()
    print("RESULT" + json.dumps(worst))
    """
)


def test_sharded_gate_gradients_match_one_device(tiny_inference_world, tmp_path):
    """data x fsdp and fsdp x tensor meshes on 4 fake devices vs one device: the same loss and gate
    gradients. (tests/test_train.py compares the losses of a data=2, fsdp=2 run over several steps.)"""
    w = tiny_inference_world
    world = dict(model=w.model, tokenizer=w.tokenizer, data=w.data_root)
    proc = subprocess.run(
        [sys.executable, "-c", _GRADS, json.dumps(world), str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=_env(4),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT")[-1])
    for shape, r in result.items():
        assert r["devices"] == 4 and r["n"] == 7, (shape, r)  # one gate per projection
        assert r["loss"] < 1e-5 and r["grads"] < 1e-5, (shape, r)
