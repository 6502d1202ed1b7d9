"""Gate training on the embedded tiny world (CPU): learning, the loss value, frozen params,
optimizer state, resume, 4 fake devices, bad inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from conftest import child_env, quick_run_config
from meteora_jax import checkpoint as model_ckpt
from meteora_jax import data as data_lib
from meteora_jax import sharding as sharding_lib
from meteora_jax import train as train_lib
from meteora_jax.config import ModelConfig
from meteora_jax.model import LlamaForCausalLM
from meteora_jax.tiny import build_tiny_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config_module():
    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(REPO, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    config = _tiny_config_module().get_config()
    return build_tiny_world(tmp_path_factory.mktemp("tiny") / "world", ModelConfig.from_dict(config.model))


@pytest.fixture
def make_config(world, tmp_path):
    """Tiny config on the session's world, writing into tmp_path; overrides as keyword sections."""

    def make(workdir="run", **sections):
        return quick_run_config(_tiny_config_module().get_config(), world, tmp_path / workdir, **sections)

    return make


def _leaves(tree):
    return traverse_util.flatten_dict(jax.device_get(tree))


# ----------------------------------------------------------------------------------------------


def test_tiny_config_trains(make_config):
    config = make_config(train=dict(steps=60, eval_every=0), logging=dict(every=5), checkpoint=dict(export_gates=True))
    summary = train_lib.train(config)
    train_hist = [h for h in summary["history"] if h["split"] == "train"]
    first, last = train_hist[0], train_hist[-1]
    assert last["loss"] < 0.7 * first["loss"]
    assert summary["eval"]["gate_acc_top1"] > 0.6  # chance is 1/3
    for task in ("arith", "reverse", "shout"):
        assert summary["eval"][f"gate_acc/{task}"] > 0.5
    assert summary["status"] == "done" and summary["step"] == 60
    lines = [json.loads(l) for l in open(os.path.join(config.workdir, "metrics.jsonl"))]
    assert {l["split"] for l in lines} == {"train", "eval"}
    assert "tokens_per_s" in lines[0]
    gates, names = train_lib.load_gates(summary["gates_dir"])
    assert names == ["arith", "reverse", "shout"]
    assert all(k[-1] == "gate" for k in traverse_util.flatten_dict(gates))


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_step_loss_matches_hand_computation(make_config):
    config = make_config(train=dict(batch_size=4, loss_coef=7.0))
    trainer = train_lib.Trainer(train_lib.prepare(config))
    batch = next(trainer.iterator)
    # Extra padding: row 3 becomes all padding, row 1 loses its LM targets.
    for k in ("lm_mask", "gate_mask", "attention_mask"):
        batch[k][3] = 0
    batch["lm_mask"][1] = 0
    assert (batch["attention_mask"][:3] == 0).any(), "want padded positions in the real rows too"
    params = jax.device_get(train_lib.merge_params(trainer.state.gates, trainer.frozen))
    out = LlamaForCausalLM(trainer.setup.model_config).apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"]
    )
    logits = np.asarray(out.logits, np.float64)
    lm_lp = _log_softmax(logits[:, :-1])
    lm_ce = -np.take_along_axis(lm_lp, batch["lm_labels"][:, 1:, None], -1)[..., 0]
    lm_m = batch["lm_mask"][:, 1:]
    lm = (lm_ce * lm_m).sum() / lm_m.sum()
    gm = batch["gate_mask"]
    per_gate = []
    for proj in sorted(out.gate_logits):
        g = np.asarray(out.gate_logits[proj], np.float64)  # [layers, B, S, L]
        ce = -np.take_along_axis(_log_softmax(g), np.broadcast_to(batch["gate_labels"], g.shape[:-1])[..., None], -1)[..., 0]
        per_gate += list((ce * gm).sum((1, 2)) / gm.sum())
    expected = lm + 7.0 * np.mean(per_gate)

    state, metrics = trainer.train_step(trainer.state, trainer.frozen, sharding_lib.put_batch(batch, trainer.batch_sharding))
    np.testing.assert_allclose(float(metrics["lm_loss"]), lm, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["gate_loss"]), np.mean(per_gate), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    trainer.close()


def test_frozen_params_untouched_and_optimizer_state_only_for_gates(make_config, world):
    config = make_config(train=dict(steps=5))
    trainer = train_lib.Trainer(train_lib.prepare(config))
    before_gates = _leaves(trainer.state.gates)
    trainer.run()
    original, _, _ = model_ckpt.restore_checkpoint(world.model)
    orig_gates, orig_frozen = train_lib.split_params(jax.device_get(original))
    frozen = _leaves(trainer.frozen)
    assert set(frozen) == set(traverse_util.flatten_dict(orig_frozen))
    for k, v in traverse_util.flatten_dict(orig_frozen).items():
        assert np.array_equal(np.asarray(frozen[k]), np.asarray(v)), k  # bit-identical
        assert frozen[k].dtype == v.dtype
    gates = _leaves(trainer.state.gates)
    assert len(gates) == 7 and all(v.shape[0] == 2 for v in gates.values())  # 7 projections, layers stacked
    assert all(k[-1] == "gate" and v.dtype == np.float32 for k, v in gates.items())
    assert any(not np.array_equal(gates[k], before_gates[k]) for k in gates)

    gate_size = sum(v.size for v in gates.values())
    opt_leaves = jax.tree.leaves(trainer.state.opt_state)
    big = [x for x in opt_leaves if x.ndim > 0]
    assert len(big) == 2 * len(gates)  # Adam mu and nu, gates only
    assert sum(x.size for x in opt_leaves) == 2 * gate_size + sum(1 for x in opt_leaves if x.ndim == 0)
    assert all(x.dtype == np.float32 for x in big)
    frozen_size = sum(v.size for v in frozen.values())
    assert frozen_size > 40 * gate_size
    trainer.close()


def _uneven(batch):
    """Padding concentrated in rows 1 and 3 (micro-batch 1 of 2, micro-batches 1 and 3 of 4); row 3
    keeps no LM target at all."""
    batch = {k: np.array(v) for k, v in batch.items()}
    for k in ("lm_mask", "gate_mask", "attention_mask"):
        batch[k][1, 6:] = 0
        batch[k][3, 3:] = 0
    batch["lm_mask"][3] = 0
    return batch


@pytest.mark.usefixtures("float32_matmuls")
def test_grad_accum_is_the_full_batch_objective(make_config):
    """grad_accum_steps=A optimises lm (mean over ALL the batch's LM targets) + coef * gate (mean over
    ALL its gate tokens), as A=1 does, whatever the micro-batches' token counts. Tolerance: fp32
    summation order only, rtol 1e-5 on the metrics and 1e-4 (atol 1e-5 * max|grad|) on gradients. The
    suite's XLA optimization level 0 sums in another order than the default: one gate element differed
    by 1.5e-6 * max|grad| there. Wrongly weighted micro-batches (their gate token counts differ over 2x,
    asserted below) would be off by far more. float32 matmuls throughout: on a GPU the default is TF32,
    where the two runs differed by 2.1e-5 in grad_norm (an H100, session 35)."""
    config = make_config(train=dict(batch_size=4, loss_coef=7.0))
    trainer = train_lib.Trainer(train_lib.prepare(config))
    batch = _uneven(next(trainer.iterator))
    gate_rows = batch["gate_mask"].sum(1)
    assert gate_rows[0] + gate_rows[2] > 2 * (gate_rows[1] + gate_rows[3])  # micro-batches very uneven
    sgd = optax.sgd(1.0)  # new gates = gates - grad: the gradient itself is compared
    gates0 = trainer.state.gates

    def run(A):
        step = jax.jit(train_lib.make_train_step(trainer.model, sgd, coef=7.0, top_k=2, grad_accum_steps=A))
        state = train_lib.TrainState(
            step=jnp.zeros((), jnp.int32), gates=gates0, opt_state=sgd.init(gates0), rng=trainer.state.rng
        )
        new, m = step(state, trainer.frozen, {k: jnp.asarray(v) for k, v in batch.items()})
        grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), gates0, new.gates)
        return traverse_util.flatten_dict(grads), jax.device_get(m)

    g1, m1 = run(1)
    scale = max(np.abs(v).max() for v in g1.values())
    assert scale > 0
    for A in (2,):
        gA, mA = run(A)
        for k in ("loss", "lm_loss", "gate_loss", "gate_acc_top1", "gate_acc_topk", "grad_norm"):
            np.testing.assert_allclose(mA[k], m1[k], rtol=1e-5, err_msg=f"A={A} {k}")
        for k in ("lm_tokens", "gate_tokens", "gate_task_correct", "gate_task_count"):
            np.testing.assert_array_equal(mA[k], m1[k])
        for k in g1:
            np.testing.assert_allclose(gA[k], g1[k], rtol=1e-4, atol=1e-5 * scale, err_msg=f"A={A} {k}")

    # The jitted, sharded trainer step with Adam: the same gates after one step (fp32, atol 1e-6).
    acc = train_lib.Trainer(train_lib.prepare(make_config("acc", train=dict(batch_size=4, loss_coef=7.0, grad_accum_steps=2))))
    s1, n1 = trainer.train_step(trainer.state, trainer.frozen, sharding_lib.put_batch(batch, trainer.batch_sharding))
    with acc._context():  # mesh for the micro-batch sharding constraints
        s2, n2 = acc.train_step(acc.state, acc.frozen, sharding_lib.put_batch(batch, acc.batch_sharding))
    np.testing.assert_allclose(float(n2["loss"]), float(n1["loss"]), rtol=1e-5)
    a, b = _leaves(s1.gates), _leaves(s2.gates)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6)
    trainer.close()
    acc.close()


def test_lora_dropout_in_the_train_step(make_config):
    """train.lora_dropout: the gradient changes with it and is repeatable from the state's rng, which
    advances as without dropout (a resumed run draws the same keys); each micro-batch gets its own
    key. The dropout itself is checked in tests/test_meteora_layer.py."""
    config = make_config(train=dict(batch_size=4, loss_coef=7.0))
    trainer = train_lib.Trainer(train_lib.prepare(config))
    batch = {k: jnp.asarray(v) for k, v in next(trainer.iterator).items()}
    sgd = optax.sgd(1.0)
    gates0 = trainer.state.gates

    def run(rate):
        step = jax.jit(train_lib.make_train_step(trainer.model, sgd, coef=7.0, top_k=2, grad_accum_steps=1,
                                                 lora_dropout=rate))
        state = train_lib.TrainState(step=jnp.zeros((), jnp.int32), gates=gates0, opt_state=sgd.init(gates0),
                                     rng=trainer.state.rng)
        new, metrics = step(state, trainer.frozen, batch)
        return new, _leaves(new.gates), float(metrics["loss"])

    plain, plain_gates, plain_loss = run(0.0)
    dropped, dropped_gates, dropped_loss = run(0.3)
    again = run(0.3)[1]
    assert dropped_loss != plain_loss and np.isfinite(dropped_loss)
    assert any(not np.array_equal(dropped_gates[k], plain_gates[k]) for k in plain_gates)
    for k in dropped_gates:
        np.testing.assert_array_equal(again[k], dropped_gates[k])
    np.testing.assert_array_equal(dropped.rng, plain.rng)

    # Two micro-batches: the dropout keys that reach the model, recorded in an eager run, differ.
    keys = []

    class Recording:  # the model, noting each concrete dropout key it is given
        def apply(self, *args, rngs=None, **kwargs):
            if rngs and not isinstance(rngs["dropout"], jax.core.Tracer):
                keys.append(np.asarray(rngs["dropout"]).tobytes())
            return trainer.model.apply(*args, rngs=rngs, **kwargs)

    step = train_lib.make_train_step(Recording(), sgd, coef=7.0, top_k=2, grad_accum_steps=2, lora_dropout=0.3)
    with jax.disable_jit():
        step(train_lib.TrainState(step=jnp.zeros((), jnp.int32), gates=gates0, opt_state=sgd.init(gates0),
                                  rng=trainer.state.rng), trainer.frozen, batch)
    assert len(keys) == 2 and keys[0] != keys[1]
    trainer.close()


def test_eval_metrics_are_token_weighted(make_config, monkeypatch):
    config = make_config(train=dict(eval_every=0, eval_batch_size=4, eval_max_batches=0, loss_coef=7.0))
    trainer = train_lib.Trainer(train_lib.prepare(config))
    real = list(data_lib.eval_batches(trainer.setup.eval_data, 4))
    batches = [real[0], _uneven(real[len(real) // 2]), real[-1]]  # different LM / gate token ratios
    monkeypatch.setattr(train_lib.data_lib, "eval_batches", lambda data, bs: iter(batches))
    got = trainer.evaluate()

    whole = {k: jnp.asarray(np.concatenate([b[k] for b in batches])) for k in data_lib.ARRAY_KEYS}
    step = jax.jit(train_lib.make_eval_step(trainer.model, coef=7.0, top_k=2))
    want = jax.device_get(step(trainer.state.gates, trainer.frozen, whole))  # one batch: exact masked means
    for k in ("loss", "lm_loss", "gate_loss", "gate_acc_top1", "gate_acc_topk"):
        np.testing.assert_allclose(got[k], float(want[k]), rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(got["loss"], got["lm_loss"] + 7.0 * got["gate_loss"], rtol=1e-6)
    per_task = want["gate_task_correct"] / want["gate_task_count"]
    for name, acc in zip(trainer.setup.adapter_names, per_task):
        np.testing.assert_allclose(got[f"gate_acc/{name}"], acc, rtol=1e-6)
    per_layer = want["gate_layer_correct"] / want["gate_layer_count"]
    assert len(per_layer) == trainer.setup.model_config.num_layers
    for i, acc in enumerate(per_layer):
        np.testing.assert_allclose(got[f"gate_acc_layer/{i}"], acc, rtol=1e-6)
    # Every gate sits in one layer: the token-weighted mean over layers is the overall top-1.
    np.testing.assert_allclose(want["gate_layer_correct"].sum() / want["gate_layer_count"].sum(), got["gate_acc_top1"], rtol=1e-5)
    trainer.close()


def test_non_finite_grad_norm_stops_before_saving(make_config):
    trainer = train_lib.Trainer(train_lib.prepare(make_config("inf_grad", train=dict(steps=5), checkpoint=dict(every=1))))
    real, calls = trainer.train_step, []

    def poisoned(state, frozen, batch):  # step 3: an inf gradient under a finite loss
        state, metrics = real(state, frozen, batch)
        calls.append(None)
        if len(calls) == 3:
            metrics = dict(metrics, grad_norm=jnp.float32(np.inf))
        return state, metrics

    trainer.train_step = poisoned
    with pytest.raises(train_lib.NonFiniteLossError, match=r"grad_norm is inf at step 3.*Last good checkpoint: step 2"):
        trainer.run()
    assert trainer.manager.latest_step() == 2 and len(calls) == 3
    trainer.close()


def test_resume_from_earlier_checkpoint_logs_each_step_once(make_config):
    first = make_config("relog", train=dict(steps=4), checkpoint=dict(every=1, keep=10))
    train_lib.train(first)
    ckpts = os.path.join(first.workdir, "checkpoints")
    for step in (3, 4):  # resume from step 2: the log already holds steps 3 and 4
        shutil.rmtree(os.path.join(ckpts, str(step)))
    with pytest.warns(UserWarning, match=r"resuming from step 2 in .*relog.* other settings: train\.steps 4 -> 5$"):
        summary = train_lib.train(make_config("relog", train=dict(steps=5), checkpoint=dict(every=1, keep=10)))
    assert summary["history"][0]["step"] == 3 and summary["resumed_from"] == 2
    records = [json.loads(l) for l in open(os.path.join(first.workdir, "metrics.jsonl"))]
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_over_edited_train_data_says_which_task(make_config, world, tmp_path):
    """A train.jsonl edited between runs (same example count, so the data position still fits) is
    named when the run resumes; the other tasks, unchanged, are not."""
    data = tmp_path / "data"
    shutil.copytree(world.data_root, data)
    first = make_config("edited", data=dict(root=str(data)), train=dict(steps=2), checkpoint=dict(every=1))
    train_lib.train(first)
    tasks = sorted(os.listdir(data))
    path = data / tasks[1] / "train.jsonl"
    records = data_lib.read_jsonl(str(path))
    records[0] = dict(records[0], response=records[0]["response"] + " (fixed)")
    data_lib.write_jsonl(str(path), records)
    with pytest.warns(UserWarning, match=rf"the train.jsonl of \['{tasks[1]}'\] changed since the checkpoint"):
        summary = train_lib.train(make_config("edited", data=dict(root=str(data)), train=dict(steps=3),
                                              checkpoint=dict(every=1)))
    assert summary["resumed_from"] == 2 and summary["step"] == 3

    # Cut down below the saved data position, the resume cannot continue, and the refusal says why.
    data_lib.write_jsonl(str(path), records[:1])
    with pytest.raises(train_lib.TrainError, match=rf"the data position does not fit this run .*; the train.jsonl "
                                                    rf"of \['{tasks[1]}'\] changed since the checkpoint was written: "):
        train_lib.train(make_config("edited", data=dict(root=str(data)), train=dict(steps=4), checkpoint=dict(every=1)))


def _tiny_model(**changes) -> ModelConfig:
    model = _tiny_config_module().get_config().model
    model.update(**{k: v for k, v in changes.items() if k != "top_k"})
    if "top_k" in changes:
        model.meteora.top_k = changes["top_k"]
    return ModelConfig.from_dict(model)


def test_tiny_world_of_another_model_is_kept_and_refused(tmp_path):
    """A tiny world folder is reused for the same model (routing settings may differ), and a world
    built for another model, or a folder that is not a world, is refused and left as it is (it used
    to be replaced silently, and the gates trained on it no longer fitted)."""
    from meteora_jax.tiny import TinyWorldError

    root = tmp_path / "world"
    build_tiny_world(root, _tiny_model())
    stamp = (root / "WORLD.json").read_text()
    assert build_tiny_world(root, _tiny_model(top_k=1)).model == str(root / "model")
    with pytest.raises(TinyWorldError, match=r"hidden_size 64 -> 32.*left as it is"):
        build_tiny_world(root, _tiny_model(hidden_size=32, head_dim=8))
    assert (root / "WORLD.json").read_text() == stamp and (root / "model").is_dir()

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(TinyWorldError, match="holds no tiny world"):
        build_tiny_world(other, _tiny_model())
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]


def test_tiny_world_inputs_it_cannot_build(tmp_path):
    """Each is a TinyWorldError (one line, exit 2 from train.py; they were tracebacks) and leaves
    nothing behind."""
    from meteora_jax.tiny import TinyWorldError

    with pytest.raises(TinyWorldError, match="the tiny world has 3 tasks; model.meteora.num_adapters is 4"):
        build_tiny_world(tmp_path / "w4", _tiny_model(meteora=dict(num_adapters=4)))
    with pytest.raises(TinyWorldError, match=r"the tiny tokenizer has \d+ tokens: model.vocab_size=40 is too small"):
        build_tiny_world(tmp_path / "v40", _tiny_model(vocab_size=40))
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    with pytest.raises(TinyWorldError, match="a_file is a file, not a folder"):
        build_tiny_world(a_file, _tiny_model())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_metrics_jsonl_is_strict_json(tmp_path):
    """A non-finite scalar (the accuracy of a task without eval tokens) is written as null."""
    import ml_collections

    log = train_lib._MetricLog(str(tmp_path), ml_collections.ConfigDict(dict(jsonl=True, tensorboard=False)))
    log.write(3, "eval", {"gate_acc/a": float("nan"), "loss": 1.5})
    log.close()

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert record == {"step": 3, "split": "eval", "gate_acc/a": None, "loss": 1.5}


def _tb_events(folder):
    """Every event of the TFRecord event files in `folder` (length, crc, payload, crc per record)."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data, at = open(path, "rb").read(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            events.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + length]))
            at += 12 + length + 4
    return events


def test_resumed_tensorboard_log_purges_the_steps_it_logs_again(tmp_path):
    """A run resumed from step 2 tells TensorBoard to drop the earlier run's events from step 3 on
    (a SessionLog START at step 3), as metrics.jsonl drops its records: each step is shown once."""
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(jsonl=True, tensorboard=True))
    log = train_lib._MetricLog(str(tmp_path), cfg)
    for step in range(1, 6):
        log.write(step, "train", {"loss": float(step)})
    log.close()
    log = train_lib._MetricLog(str(tmp_path), cfg, keep_up_to=2)
    log.write(3, "train", {"loss": 30.0})
    log.close()
    starts = [e.step for e in _tb_events(tmp_path / "tb") if e.HasField("session_log") and e.session_log.status == 1]
    assert 3 in starts, starts
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_checkpoint_past_train_steps_is_refused(make_config):
    """Resuming a step-2 checkpoint with train.steps=1 exported the step-2 gates as 'done at step 2'."""
    train_lib.train(make_config("past", train=dict(steps=2), checkpoint=dict(every=1)))
    _expect(make_config("past", train=dict(steps=1)), train_lib.TrainError,
            r"the checkpoint in .*past is at step 2, past train.steps=1: give train.steps >= 2, or another workdir")


def test_train_refuses_another_model_s_tiny_world_and_checkpoint(make_config, tmp_path):
    """Both ways a run can meet another model's files end in a TrainError (exit 2 from the script),
    not an Orbax traceback: a tiny_world folder built for another model, and a workdir whose
    checkpoint holds gates of another shape."""
    config = make_config("mixed", train=dict(steps=1), checkpoint=dict(every=1))
    train_lib.train(config)

    small = build_tiny_world(tmp_path / "small_world", _tiny_model(hidden_size=32, head_dim=8))
    world_config = make_config("mixed")
    world_config.tiny_world = small.root
    world_config.model.update(hidden_size=64)  # the tiny config's model, not the world's
    _expect(world_config, train_lib.TrainError, r"config.tiny_world=.*hidden_size 32 -> 64")

    resumed = make_config("mixed", train=dict(steps=2), checkpoint=dict(every=1))
    resumed.model_checkpoint, resumed.tokenizer, resumed.data.root = small.model, small.tokenizer, small.data_root
    resumed.model.update(hidden_size=32, head_dim=8)
    _expect(resumed, train_lib.TrainError, r"checkpoint step 1 in .*mixed cannot be restored for this run")


def test_resume_refusals_name_the_changed_settings(make_config):
    """A resume that cannot restore the optimizer state (clipping switched off) or the data position
    (another batch size) is one TrainError naming the checkpoint and the settings that changed (the
    first cut Orbax's reason off at a colon and blamed another model; the second named neither)."""
    train_lib.train(make_config("changed", train=dict(steps=1), checkpoint=dict(every=1)))
    no_clip = make_config("changed", train=dict(steps=2), optimizer=dict(clip_norm=0.0))
    _expect(no_clip, train_lib.TrainError,
            r"checkpoint step 1 in .*changed cannot be restored for this run \(.+\); it was written by a run with "
            r"other settings: .*optimizer.clip_norm 1.0 -> 0.0.*--config.checkpoint.resume=False to start over")
    batch = make_config("changed", train=dict(steps=2, batch_size=8))
    _expect(batch, train_lib.TrainError,
            r"checkpoint step 1 in .*changed: the data position does not fit this run \(data state was saved with "
            r"seed=0, batch_size=16.*\); it was written by a run with other settings: .*train.batch_size 16 -> 8")


def test_exported_gates_carry_the_run_settings(make_config, world, monkeypatch, capsys):
    from meteora_jax.generate import cli_options, load_for_inference

    config = make_config("settings", train=dict(steps=2), checkpoint=dict(export_gates=True))
    config.model.meteora.top_k = 1  # the checkpoint says 2
    gates_dir = train_lib.train(config)["gates_dir"]
    settings = train_lib.load_gate_settings(gates_dir)
    assert settings == dict(top_k=1, kernel_impl=config.model.meteora.kernel_impl, dtype="float32",
                            chat_template=False, lm_on_prompt=False, gate_scope="all")
    _, stored, _ = load_for_inference(world.model)
    assert stored.meteora.top_k == 2
    _, cfg, names = load_for_inference(world.model, gates_dir)
    assert cfg.meteora.top_k == 1 and cfg.dtype == "float32"
    _, cfg, _ = load_for_inference(world.model, gates_dir, top_k=3, dtype="bfloat16")  # explicit wins
    assert cfg.meteora.top_k == 3 and cfg.dtype == "bfloat16"

    tok = type("Tok", (), dict(pad_token_id=None, eos_token_id=2))()
    assert cli_options(tok, names, gates=gates_dir).chat_template is False  # recorded
    assert cli_options(tok, names, gates=gates_dir, chat_template="yes").chat_template is True
    assert cli_options(tok, names, gates=gates_dir, chat_template="auto").chat_template is None
    assert cli_options(tok, names).chat_template is None  # no gates: auto
    assert cli_options(tok, names).pad_token_id == 2

    # scripts/generate.py encodes prompts with the recorded flag by default.
    import runpy

    from meteora_jax import generate as gen_lib

    seen, real_encode = [], gen_lib.encode_prompt

    def encode(tokenizer, prompt, *, chat_template=None):
        seen.append(chat_template)
        return real_encode(tokenizer, prompt, chat_template=chat_template)

    monkeypatch.setattr(gen_lib, "encode_prompt", encode)
    script = runpy.run_path(os.path.join(REPO, "scripts", "generate.py"), run_name="generate_script")
    argv = ["--checkpoint", world.model, "--tokenizer", world.tokenizer, "--gates", gates_dir,
            "--prompt", "1+2=", "--max-new-tokens", "2"]
    assert script["main"](argv) == 0
    assert seen == [False]
    capsys.readouterr()


class _SignalAfter:
    """Wraps the batch iterator: raises SIGTERM at the process after `n` batches were drawn."""

    def __init__(self, inner, n):
        self.inner, self.n, self.drawn = inner, n, 0

    def __next__(self):
        self.drawn += 1
        if self.drawn == self.n:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)


def test_resume_equals_uninterrupted(make_config):
    n = 4
    full = make_config("full", train=dict(steps=2 * n))
    t_full = train_lib.Trainer(train_lib.prepare(full))
    assert t_full.run()["status"] == "done"
    want = _leaves(t_full.state.gates)
    want_opt = jax.device_get(jax.tree.leaves(t_full.state.opt_state))
    t_full.close()

    parts = make_config("parts", train=dict(steps=2 * n), checkpoint=dict(every=1, keep=2))
    t1 = train_lib.Trainer(train_lib.prepare(parts))
    t1.iterator = _SignalAfter(t1.iterator, n)
    summary = t1.run()  # SIGTERM during step n: finish it, save, return
    assert summary["status"] == "interrupted" and summary["step"] == n and summary["resumed_from"] is None
    assert t1.manager.latest_step() == n and sorted(t1.manager.all_steps()) == [n - 1, n]  # keep=2
    ckpt_dir = t1.manager.directory
    t1.close()

    # A run killed mid-save leaves an unfinished temporary step folder: resume must skip it.
    partial = os.path.join(str(ckpt_dir), f"{n + 1}.orbax-checkpoint-tmp-1234567")
    shutil.copytree(os.path.join(str(ckpt_dir), str(n)), partial)
    for root, _, files in os.walk(partial):
        for f in files:
            open(os.path.join(root, f), "w").close()  # truncated files

    t2 = train_lib.Trainer(train_lib.prepare(parts))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = t2.run()
    assert not [w for w in caught if "other settings" in str(w.message)]  # the same config: nothing to say
    assert not [w for w in caught if "changed since" in str(w.message)]  # nor the same data
    assert summary["status"] == "done" and summary["step"] == 2 * n
    assert summary["history"][0]["step"] == n + 1
    got = _leaves(t2.state.gates)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    for a, b in zip(jax.device_get(jax.tree.leaves(t2.state.opt_state)), want_opt):
        np.testing.assert_array_equal(a, b)
    assert t2.iterator.state_dict() == t_full.iterator.state_dict()
    t2.close()


def test_signal_during_eval_still_saves(make_config):
    """A SIGTERM that arrives while the loop blocks after the save decision (here in an eval; on a
    GPU mostly while it waits for a step's metrics) stops the run with that step saved."""
    config = make_config("eval_signal", train=dict(steps=6, eval_every=2), checkpoint=dict(every=0))
    trainer = train_lib.Trainer(train_lib.prepare(config))
    real_evaluate = trainer.evaluate

    def evaluate_then_signal():
        out = real_evaluate()
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.evaluate = evaluate_then_signal
    summary = trainer.run()
    assert summary["status"] == "interrupted" and summary["step"] == 2 and summary["saved_step"] == 2
    assert summary["signal"] == signal.SIGTERM  # scripts/train.py exits with 128 + 15
    assert trainer.manager.all_steps() == [2]
    trainer.close()


def test_resume_false_starts_over(make_config):
    """checkpoint.resume=False in a workdir holding an earlier run's checkpoints: they are removed,
    so a later resume continues this run (it took the old run's latest step), and a save of a step
    the old run held does not fail (Orbax: StepAlreadyExistsError)."""
    train_lib.train(make_config("again", train=dict(steps=4), checkpoint=dict(every=2)))
    fresh = make_config("again", train=dict(steps=3), checkpoint=dict(every=2, resume=False))
    with pytest.warns(UserWarning, match="checkpoint.resume=False: removing the earlier run's checkpoints"):
        trainer = train_lib.Trainer(train_lib.prepare(fresh))
    summary = trainer.run()
    assert summary["status"] == "done" and summary["resumed_from"] is None and summary["step"] == 3
    assert trainer.manager.all_steps() == [2, 3]
    trainer.close()


_TWO_HOSTS = """
import os, signal, sys, time, warnings
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from meteora_jax.train import _StopRequest, _start_over

warnings.simplefilter("ignore")
if jax.process_index() == 1:
    time.sleep(2)  # process 0 has removed the shared folder by now
_start_over(sys.argv[3])
print("STARTED_OVER", os.path.exists(sys.argv[3]), flush=True)
stop = _StopRequest()
before = stop.agreed(), stop.agreed(blocking=False)
if jax.process_index() == 0:
    stop.signum = signal.SIGTERM  # only the first host got the signal
print("AGREED", *before, stop.agreed(blocking=False), stop.agreed(), flush=True)
"""


def test_two_processes_agree_on_a_stop_and_a_start_over(tmp_path):
    """Two processes of one run on a shared disk: a signal that reached one host stops both at the
    same (blocking) step, as one that stopped alone would leave the other in the next step's
    collectives; resume=False removes the earlier checkpoints once, both passing the same barrier
    (a process that looked after process 0 had removed them skipped it)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "7").mkdir(parents=True)
    env = child_env(JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_HOSTS, address, str(i), str(checkpoints)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        assert "STARTED_OVER False" in out and f"AGREED None None None {int(signal.SIGTERM)}" in out, (out, err[-2000:])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(make_config):
    good = make_config("nan", train=dict(steps=3), checkpoint=dict(every=1))
    train_lib.train(good)
    # A learning rate this large sends the gates to inf after one update (an infinite loss_coef is refused).
    bad = make_config("nan", train=dict(steps=6), optimizer=dict(learning_rate=1e38), checkpoint=dict(every=1))
    with pytest.raises(train_lib.NonFiniteLossError, match=r"at step 5.*Last good checkpoint: step 4"):
        train_lib.train(bad)
    trainer = train_lib.Trainer(train_lib.prepare(good))
    assert trainer.manager.latest_step() == 4
    trainer.close()


_MULTI_DEVICE = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    from jax.sharding import PartitionSpec as P
    sys.path.insert(0, {repo!r})
    from meteora_jax import train as train_lib
    import ml_collections
    config = ml_collections.ConfigDict(json.loads({config!r}))
    config.mesh.shape = dict(data=2, fsdp=2, tensor=1)
    trainer = train_lib.Trainer(train_lib.prepare(config))
    summary = trainer.run()
    embed = trainer.frozen["embed_tokens"]["embedding"]
    q = trainer.frozen["layers"]["self_attn"]["q_proj"]["kernel"]
    gate = trainer.state.gates["layers"]["self_attn"]["q_proj"]["gate"]
    spec = lambda a: [x if x is None or isinstance(x, str) else list(x) for x in a.sharding.spec]
    out = dict(
        devices=jax.device_count(),
        losses=[h["loss"] for h in summary["history"] if h["split"] == "train"],
        embed_spec=spec(embed), embed_shard=list(embed.addressable_shards[0].data.shape),
        embed_shape=list(embed.shape), q_spec=spec(q), gate_spec=spec(gate),
        mu_spec=spec(trainer.state.opt_state[1][0].mu["layers"]["self_attn"]["q_proj"]["gate"]),
    )
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="fakes 4 host (CPU) devices and compares with a run "
                    "in this process, which must be on the CPU too")
def test_four_fake_devices_match_one(make_config):
    single = make_config("single", train=dict(steps=4, batch_size=8, grad_accum_steps=2))
    multi = make_config("multi", train=dict(steps=4, batch_size=8, grad_accum_steps=2))
    code = _MULTI_DEVICE.format(repo=REPO, config=multi.to_json())
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT")[-1])
    assert out["devices"] == 4
    # FSDP: the embedding's model dim is split over fsdp; each device holds half of it.
    assert out["embed_spec"] == ["tensor", "fsdp"]  # [vocab, embed]
    assert out["embed_shard"] == [out["embed_shape"][0], out["embed_shape"][1] // 2]
    assert out["q_spec"] == [None, "fsdp", "tensor"]  # [layers, embed, q_heads]
    assert out["gate_spec"] == out["mu_spec"] == [None, "fsdp", None]  # [layers, embed, adapters]

    summary = train_lib.train(single)
    losses = [h["loss"] for h in summary["history"] if h["split"] == "train"]
    np.testing.assert_allclose(out["losses"], losses, rtol=2e-5)


# ----------------------------------------------------------------------------------------------
# Schedule and optimizer, against hand formulas


def _schedule_hand(kind, peak, end, warmup, total, step):
    """HF's shape: linear warmup 0 -> peak over `warmup` steps, then cosine (HF's cosine-with-warmup,
    ending at `end` instead of 0) / linear decay to `end` at step `total`, or constant at peak."""
    if step < warmup:
        return peak * step / warmup
    frac = (step - warmup) / (total - warmup)
    if kind == "cosine":
        return end + (peak - end) * 0.5 * (1 + np.cos(np.pi * frac))
    if kind == "linear":
        return peak + (end - peak) * frac
    return peak


@pytest.mark.parametrize("total,warmup", [(100, 10), (64, 0), (20, 40)], ids=["warmup", "no-warmup", "warmup-past-end"])
@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_matches_hand_formula(kind, total, warmup):
    """The learning rate at step 0, mid-warmup, the end of warmup, mid-decay and the last step
    (total - 1) of every schedule kind is the hand formula's, rtol 1e-5: guards against a warmup
    left out (starting at peak), a decay that never happens or never reaches end_factor * lr, and
    a warmup longer than the run not being cut at train.steps."""
    rng = np.random.default_rng()
    peak, end_factor = float(rng.uniform(1e-4, 1e-2)), float(rng.uniform(0.05, 0.5))
    config = _tiny_config_module().get_config()
    config.optimizer.update(learning_rate=peak)
    config.schedule.update(kind=kind, warmup_steps=warmup, end_factor=end_factor)
    schedule = train_lib.make_schedule(config.schedule, config.optimizer, total)
    w = min(warmup, total)
    steps = sorted({0, w // 2, w, w + (total - w) // 2, total - 1} & set(range(total)))
    got = [float(schedule(s)) for s in steps]
    want = [_schedule_hand(kind, peak, peak * end_factor, w, total, s) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12, err_msg=f"steps {steps}")  # step 0: 0 (or peak)


def test_optimizer_step_is_clip_then_adamw():
    """Two `make_optimizer` updates of random params with huge random gradients (global norm far over
    clip_norm) and weight_decay > 0 equal a hand (numpy, float64) clip-by-global-norm + AdamW (bias-
    corrected moments, decoupled decay lr * wd * p, the schedule read at counts 0 and 1), rtol 1e-5.
    Two steps, because Adam's first step is g / (|g| + eps) and hardly sees a uniform clip: the
    second mixes two clipped gradients of different raw norms. Guards against the configured
    clip_norm or weight_decay being ignored."""
    rng = np.random.default_rng()
    config = _tiny_config_module().get_config()
    config.optimizer.update(b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1, clip_norm=0.5)
    o = config.optimizer
    lrs = [2e-2, 5e-3]
    tx = train_lib.make_optimizer(o, lambda count: jnp.asarray(lrs, jnp.float32)[count])
    params = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": {"c": rng.normal(size=(7,)).astype(np.float32)}}
    state = tx.init(jax.tree.map(jnp.asarray, params))
    flat_p = {k: v.astype(np.float64) for k, v in traverse_util.flatten_dict(params).items()}
    m = {k: np.zeros_like(v) for k, v in flat_p.items()}
    v = {k: np.zeros_like(x) for k, x in flat_p.items()}
    for t, scale in ((1, 1e4), (2, 30.0)):
        grads = {k: (scale * rng.normal(size=x.shape)).astype(np.float32) for k, x in flat_p.items()}
        norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values()))
        assert norm > 10 * o.clip_norm
        want = {}
        for k, g in grads.items():
            g = g.astype(np.float64) * o.clip_norm / norm
            m[k] = o.b1 * m[k] + (1 - o.b1) * g
            v[k] = o.b2 * v[k] + (1 - o.b2) * g**2
            m_hat, v_hat = m[k] / (1 - o.b1**t), v[k] / (1 - o.b2**t)
            want[k] = -lrs[t - 1] * (m_hat / (np.sqrt(v_hat) + o.eps) + o.weight_decay * flat_p[k])
        p_tree = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict({k: x.astype(np.float32) for k, x in flat_p.items()}))
        updates, state = tx.update(jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(grads)), state, p_tree)
        got = traverse_util.flatten_dict(jax.device_get(updates))
        for k in flat_p:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-9, err_msg=f"step {t}, {k}")
            flat_p[k] = flat_p[k] + want[k]


# ----------------------------------------------------------------------------------------------
# Bad inputs: each fails in `prepare`, before any compute, with a clear message.


@pytest.fixture
def no_compute(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("compute started before the bad input was reported")

    monkeypatch.setattr(train_lib.Trainer, "__init__", fail)


@pytest.fixture
def data_copy(world, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(world.data_root, root)
    return root


def _expect(config, error, match):
    with pytest.raises(error, match=match):
        train_lib.train(config)


def test_bad_missing_data_root(make_config, no_compute, tmp_path):
    _expect(make_config(data=dict(root=str(tmp_path / "nope"))), data_lib.DataError, "is not a folder")


def test_workdir_inside_the_data_root_is_refused(make_config, no_compute, data_copy):
    """A workdir in the data root put checkpoints/, gates/ and tb/ among the task folders (exit 0); the
    next run failed on them as tasks."""
    for workdir in (data_copy, data_copy / "runs" / "a"):
        config = make_config(data=dict(root=str(data_copy)))
        config.workdir = str(workdir)
        _expect(config, train_lib.TrainError, "lies inside config.data.root")
    assert sorted(os.listdir(data_copy)) == sorted(os.listdir(make_config().data.root))


def test_a_built_read_only_tiny_world_is_used(world, tmp_path, monkeypatch):
    """A complete tiny world is only read: a read-only one was refused as "not writable"."""
    config = _tiny_config_module().get_config()
    config.tiny_world = str(tmp_path / "world")
    shutil.copytree(os.path.dirname(world.model), config.tiny_world)
    config.workdir = str(tmp_path / "run")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).startswith(config.tiny_world) and mode == os.W_OK
                        else real_access(path, mode))
    assert train_lib.prepare(config).model_config.vocab_size > 0


def test_bad_task_folder_without_adapter(make_config, no_compute, data_copy):
    shutil.copytree(data_copy / "arith", data_copy / "poetry")
    _expect(make_config(data=dict(root=str(data_copy))), data_lib.DataError, r"\['poetry'\].*match no adapter")


def test_adapter_without_task_folder_warns(make_config, data_copy):
    shutil.rmtree(data_copy / "shout")
    with pytest.warns(UserWarning, match=r"\['shout'\] have no task folder"):
        setup = train_lib.prepare(make_config(data=dict(root=str(data_copy))))
    assert list(setup.train_data) == ["arith", "reverse"]


def test_bad_task_folder_without_split_file(make_config, no_compute, data_copy):
    os.remove(data_copy / "reverse" / "test.jsonl")
    _expect(make_config(data=dict(root=str(data_copy)), train=dict(eval_every=0)), data_lib.DataError, "no test.jsonl")


def test_bad_malformed_jsonl_line(make_config, no_compute, data_copy):
    path = data_copy / "shout" / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[6] = '{"prompt": "SHOUT A", "response": '
    path.write_text("\n".join(lines) + "\n")
    _expect(make_config(data=dict(root=str(data_copy))), data_lib.DataError, r"shout/train.jsonl:7: malformed JSON")


def test_bad_missing_field(make_config, no_compute, data_copy):
    path = data_copy / "arith" / "test.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"prompt": "1+2="})
    path.write_text("\n".join(lines) + "\n")
    config = make_config(data=dict(root=str(data_copy)), train=dict(eval_every=0))
    _expect(config, data_lib.DataError, r"arith/test.jsonl:3: missing field 'response'")


def test_bad_empty_dataset(make_config, no_compute, data_copy):
    (data_copy / "reverse" / "train.jsonl").write_text("\n")
    _expect(make_config(data=dict(root=str(data_copy))), data_lib.DataError, "reverse/train.jsonl: empty dataset")


def test_bad_seq_len_too_long(make_config, no_compute):
    _expect(make_config(data=dict(seq_len=4096)), train_lib.TrainError, "seq_len=4096 exceeds .*max_position_embeddings=512")


def test_bad_top_k_above_adapters(make_config, no_compute):
    config = make_config()
    config.model.meteora.top_k = 4
    _expect(config, train_lib.TrainError, "top_k=4 exceeds the checkpoint's 3 adapters")


def test_bad_batch_vs_mesh_and_missing_checkpoint(make_config, no_compute, tmp_path):
    _expect(make_config(train=dict(batch_size=6, grad_accum_steps=4)), train_lib.TrainError, "not a multiple of train.grad_accum_steps")
    _expect(make_config(model_checkpoint=str(tmp_path / "none")), train_lib.TrainError, "does not exist")
    _expect(make_config(mesh=dict(shape=dict(data=3, fsdp=1, tensor=1))), train_lib.TrainError, "needs 3 devices")


@pytest.mark.parametrize(
    "section,values,message",
    [
        ("seed", -1, r"seed=-1 must be in \[0, 2\*\*32\)"),  # a numpy traceback after compiling
        ("schedule", dict(warmup_steps=-5), r"schedule.warmup_steps=-5 must be >= 0"),  # cosine began at 0.91 lr
        ("schedule", dict(end_factor=1.5), r"schedule.end_factor=1.5 must be in \[0, 1\]"),
        ("train", dict(lora_dropout=1.0), r"train.lora_dropout=1.0 must be in \[0, 1\)"),  # NaN inputs (x / 0)
        # Each of these trained: a negative eval cap logged loss 0 and accuracy 0 from no batch; a
        # negative clip_norm turned clipping off; b1 = 1 stopped at step 2 on a NaN loss, blaming it.
        ("train", dict(eval_max_batches=-1), r"train.eval_max_batches=-1 must be >= 0 \(0: the whole split\)"),
        ("optimizer", dict(clip_norm=-0.3), r"optimizer.clip_norm=-0.3 must be a finite number >= 0 \(0: no clipping\)"),
        ("optimizer", dict(b1=1.0), r"optimizer.b1=1.0, optimizer.b2=0.999 must be in \[0, 1\)"),
        ("optimizer", dict(b2=1.5), r"optimizer.b1=0.9, optimizer.b2=1.5 must be in \[0, 1\)"),
        ("optimizer", dict(eps=-1.0), r"optimizer.eps=-1.0 must be a finite number >= 0"),
        ("optimizer", dict(weight_decay=-0.5), r"optimizer.weight_decay=-0.5 must be a finite number >= 0"),
        ("optimizer", dict(learning_rate=float("inf")), r"optimizer.learning_rate=inf must be a finite number > 0"),
        # A negative gate coefficient trained the gates away from each token's task (exit 0); NaN stopped at step 1.
        ("train", dict(loss_coef=-1.0), r"train.loss_coef=-1.0 must be a finite number >= 0"),
        ("train", dict(loss_coef=float("nan")), r"train.loss_coef=nan must be a finite number >= 0"),
        ("model", dict(num_kv_heads=0), r"config.model: num_kv_heads=0 must be a positive integer"),
        ("workdir", os.path.join(REPO, "README.md"), r"config.workdir .*README.md is a file; give a folder path"),
        ("workdir", os.path.join(REPO, "README.md", "run"), r"config.workdir .*: .*README.md is a file, not a folder"),
    ],
)
def test_bad_run_values(make_config, no_compute, section, values, message):
    config = make_config(**{section: values})
    config.tiny_world = "unused" if section == "model" else ""  # the model section builds only a tiny world
    _expect(config, train_lib.TrainError, message)


def test_script_bad_input_exit_code_and_unknown_key(world, tmp_path):
    base = [
        sys.executable,
        os.path.join(REPO, "scripts", "train.py"),
        f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
        "--config.tiny_world=",
        f"--config.model_checkpoint={world.model}",
        f"--config.tokenizer={world.tokenizer}",
        f"--config.data.root={world.data_root}",
        f"--config.workdir={tmp_path / 'w'}",
    ]
    proc = subprocess.run(base + ["--config.data.seq_len=100000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: data.seq_len=100000 exceeds the model's max_position_embeddings=512" in proc.stderr
    assert not os.path.exists(tmp_path / "w")  # stopped before the trainer made its workdir
    # Bad flags: one line on stderr, exit status 2, no traceback.
    bad_flags = {
        "--config.train.stepz=3": "error: --config.train.stepz: config.train has no key 'stepz' (did you mean 'steps'?)",
        "--config.data.steps=3": "error: --config.data.steps: config.data has no key 'steps'",
        "--config.train.steps.every=3": "error: --config.train.steps.every: config.train.steps is a int, it has no key 'every'",
        "--config.train.steps=ten": "error: flag --config.train.steps=ten: invalid literal for int()",
        "--config.mesh.rules.0.1=dat": "error: --config.mesh.rules.0.1: not a config path (index a list as key[0])",
        f"--config={tmp_path / 'no_such_config.py'}": "error: cannot load the --config file: [Errno 2] No such file",
    }
    for flag, message in bad_flags.items():
        proc = subprocess.run(base + [flag], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (flag, proc.stderr)
        assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, (flag, proc.stderr)
    assert not os.path.exists(tmp_path / "w")


def test_script_help_exits_0():
    for flag in ("-h", "--help"):  # absl knew no -h (exit 2) and exited 1 after --help
        proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "train.py"), flag],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "Trains the MeteoRA gates" in proc.stdout and "--config" in proc.stdout, proc


@pytest.mark.parametrize("name", ["tiny", "smollm2_135m", "llama3_8b", "llama2_13b"])
def test_configs_have_training_sections(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    ModelConfig.from_dict(config.model)
    assert config.model_checkpoint and config.tokenizer and config.data.root and config.workdir
    assert config.data.seq_len <= config.model.max_position_embeddings
    assert config.train.batch_size % config.train.grad_accum_steps == 0
    sharding_lib.logical_rules(config.mesh.rules)


@pytest.mark.parametrize("name", ["llama3_8b", "llama2_13b"])
def test_paper_configs_train_as_the_original(name):
    """The original's gate training (run_meteora_train_fsdp.sh, meteora_train.py): 28 adapters, top-2,
    AdamW 5e-4, weight decay 0.01, clipping at 0.3, LoRA dropout 0.1, gate coefficient 50, and the LM
    loss over prompt and response (the balance that coefficient was chosen for)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert (config.model.meteora.num_adapters, config.model.meteora.top_k) == (28, 2)
    assert (config.optimizer.learning_rate, config.optimizer.weight_decay, config.optimizer.clip_norm) == (5e-4, 0.01, 0.3)
    assert (config.train.lora_dropout, config.train.loss_coef) == (0.1, 50.0)
    assert config.data.lm_on_prompt and config.data.gate_scope == "all"


def test_tiny_config_paths_follow_its_world():
    """--config.tiny_world=... moves the model, tokenizer and data paths with it (they pointed at
    runs/tiny_world whatever the world, so a changed world trained the old world's model)."""
    config = _tiny_config_module().get_config()
    config.tiny_world = "runs/other_world"
    assert (config.model_checkpoint, config.tokenizer, config.data.root) == (
        "runs/other_world/model", "runs/other_world/tokenizer", "runs/other_world/data")
    config.model_checkpoint = "ckpt/mine"  # an explicit path stays
    config.tiny_world = "runs/third"
    assert config.model_checkpoint == "ckpt/mine" and config.tokenizer == "runs/third/tokenizer"
