"""MixLoRA training on the tiny world (CPU): the experts training adds to a plain checkpoint, the
train step against a hand-written objective (LM loss + coef * balance loss) and its gradients, with
and without accumulation, MeteoRA's gates trained beside the experts, export and inference, and bad
input. The block and the balance loss themselves are tested against PyTorch and transformers in
tests/test_mixlora.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from conftest import child_env, quick_run_config
from meteora_jax import data as data_lib
from meteora_jax import sharding as sharding_lib
from meteora_jax import train as train_lib
from meteora_jax.checkpoint import model_config_of, read_metadata, restore_checkpoint, save_checkpoint
from meteora_jax.config import MixLoRAConfig, ModelConfig
from meteora_jax.gates import load_gate_settings, merge_params, split_params
from meteora_jax.generate import load_for_inference
from meteora_jax.model import LlamaForCausalLM, init_params
from meteora_jax.tiny import TASKS, build_tiny_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXLORA_LEAVES = {"router", "expert_lora_a", "expert_lora_b"}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _config_file(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def plain_world(tmp_path_factory):
    """configs/mixlora_tiny.py's world: the tiny tasks and a random plain model (no adapters)."""
    model = ModelConfig.from_dict(_config_file("mixlora_tiny").model).replace(mixlora=MixLoRAConfig())
    return build_tiny_world(tmp_path_factory.mktemp("plain") / "world", model)


@pytest.fixture
def make_config(plain_world, tmp_path):
    """configs/mixlora_tiny.py on the module's world, writing into tmp_path; overrides as sections."""

    def make(workdir="run", **sections):
        return quick_run_config(_config_file("mixlora_tiny"), plain_world, tmp_path / workdir, **sections)

    return make


@pytest.fixture
def no_compute(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("compute started before the bad input was reported")

    monkeypatch.setattr(train_lib.Trainer, "__init__", fail)


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree))


def _batch(setup, size: int, seed: int = 0) -> dict:
    return jax.tree.map(jnp.asarray, next(data_lib.BalancedBatchIterator(setup.train_data, size, seed=seed)))


# ----------------------------------------------------------------------------------------------
# The hand-written objective: lm + aux_coef * balance, straight from the papers' formulas.


def _lm_by_hand(logits, batch):
    """Mean next-token cross-entropy over lm_mask[:, 1:]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    labels = jnp.where(batch["lm_mask"][:, 1:] > 0, batch["lm_labels"][:, 1:], 0)
    ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    mask = batch["lm_mask"][:, 1:].astype(jnp.float32)
    return jnp.sum(ce * mask) / jnp.sum(mask)


def _balance_by_hand(router_logits, attention_mask, top_k):
    """Switch/Mixtral: E * sum_e (share of (layer, token) rows whose top-k holds e) * (mean prob of e),
    over every layer's unpadded tokens. router_logits [n_layers, B, S, E]. -> (loss, loads [E]: those
    rows counted per expert)."""
    E = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits, axis=-1).reshape(-1, E)  # [(layer, token), E]
    keep = jnp.broadcast_to(attention_mask[None] > 0, router_logits.shape[:-1]).reshape(-1)
    rank = jnp.argsort(jnp.argsort(-probs, axis=-1), axis=-1)  # 0 = largest
    chosen = (rank < top_k).astype(jnp.float32)
    loads = jnp.sum(chosen * keep[:, None], axis=0)
    mean_prob = jnp.sum(probs * keep[:, None], axis=0) / jnp.sum(keep)
    return E * jnp.sum(loads / jnp.sum(keep) * mean_prob), loads


def _gate_by_hand(gate_logits, batch):
    """MeteoRA's gate loss: the mean over every gate (projection x layer) of its masked cross-entropy
    against the token's task. gate_logits {proj: [n_layers, B, S, L]}."""
    mask = batch["gate_mask"].astype(jnp.float32)
    losses = []
    for logits in gate_logits.values():
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [n_layers, B, S, L]
        ce = -jnp.take_along_axis(logp, jnp.broadcast_to(batch["gate_labels"], logp.shape[:-1])[..., None], -1)[..., 0]
        losses += [jnp.sum(layer * mask) / jnp.sum(mask) for layer in ce]
    return sum(losses) / len(losses)


def _objective(model, frozen, aux_coef, gate_coef=0.0):
    def objective(trainable, batch):
        out = model.apply({"params": merge_params(trainable, frozen)}, batch["input_ids"], batch["attention_mask"])
        balance, loads = _balance_by_hand(out.router_logits, batch["attention_mask"], model.config.mixlora.top_k)
        gate = _gate_by_hand(out.gate_logits, batch) if gate_coef else 0.0
        return _lm_by_hand(out.logits, batch) + gate_coef * gate + aux_coef * balance, (balance, loads)

    return objective


def _with_random_b(trainable):
    """Non-zero expert B, so that every expert leaf has a gradient (B = 0 stops A's)."""
    key = jax.random.key(np.random.default_rng().integers(2**31))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: 0.05 * jax.random.normal(key, x.shape) if path[-1].key == "expert_lora_b" else x, trainable)


def _check_update(new, old, grads):
    """new == old - grads (SGD, lr 1), per leaf to 1e-5 of its largest gradient; every leaf moved."""
    new, old, grads = _flat(new), _flat(old), _flat(grads)
    assert new.keys() == old.keys()
    for k in new:
        scale = np.max(np.abs(grads[k]))
        assert scale > 0, k
        np.testing.assert_allclose(new[k], old[k] - grads[k], rtol=0, atol=1e-5 * scale + 1e-7, err_msg=str(k))


def _sgd_step(model, trainable, frozen, batch, *, aux_coef, grad_accum_steps=1):
    """One train step with plain SGD at learning rate 1: new params = params - grads."""
    tx = optax.sgd(1.0)
    step = train_lib.make_train_step(model, tx, coef=50.0, top_k=2, grad_accum_steps=grad_accum_steps,
                                     aux_coef=aux_coef)
    state = train_lib.TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), jax.random.PRNGKey(0))
    return jax.jit(step)(state, frozen, batch)


# ----------------------------------------------------------------------------------------------


def test_prepare_adds_experts_that_start_as_the_checkpoint(make_config, plain_world, float32_matmuls):
    """Over a plain checkpoint the router and experts are new float32 leaves: B zero (the model is the
    checkpoint's), A non-zero within PEFT's bound, drawn from the run's seed. The tasks are the data
    root's folders."""
    setup = train_lib.prepare(make_config())
    assert setup.adapter_names == [] and list(setup.train_data) == sorted(TASKS)
    new = {k: v for k, v in _flat(setup.params).items() if k[-1] in MIXLORA_LEAVES}
    assert sorted("/".join(k) for k in new) == sorted(
        ["layers/mlp/router"] + [f"layers/mlp/{p}/expert_lora_{ab}" for p in ("gate_proj", "up_proj", "down_proj")
                                 for ab in "ab"])
    assert all(v.dtype == np.float32 for v in new.values())
    for key, value in new.items():
        if key[-1] == "expert_lora_b":
            assert not np.any(value)
        elif key[-1] == "expert_lora_a":  # [layers, E, d_in, r], kaiming-uniform: |a| <= 1 / sqrt(d_in), per expert
            bound = 1 / np.sqrt(value.shape[2])
            assert 0.9 * bound < np.max(np.abs(value)) <= bound + 1e-7

    stored, stored_config, _ = restore_checkpoint(plain_world.model)
    ids = jnp.asarray(np.random.default_rng().integers(4, 200, (2, 12)), jnp.int32)
    want = LlamaForCausalLM(stored_config).apply({"params": stored}, ids).logits
    got = LlamaForCausalLM(setup.model_config).apply({"params": setup.params}, ids).logits
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    again = _flat(train_lib.prepare(make_config()).params)
    other = _flat(train_lib.prepare(make_config(seed=1)).params)
    a_key = ("layers", "mlp", "up_proj", "expert_lora_a")
    np.testing.assert_array_equal(again[a_key], new[a_key])
    assert not np.array_equal(other[a_key], new[a_key])


@pytest.mark.parametrize("aux_coef", [0.0, 0.3])
def test_train_step_follows_lm_plus_balance(make_config, aux_coef, float32_matmuls):
    """The step trains the router and the experts, and only them, on lm + aux_coef * balance: its
    loss and its update (SGD, lr 1) match the hand-written objective's value and gradient."""
    setup = train_lib.prepare(make_config())
    model = LlamaForCausalLM(setup.model_config)
    trainable, frozen = split_params(setup.params)
    assert {k[-1] for k in _flat(trainable)} == MIXLORA_LEAVES
    trainable = _with_random_b(trainable)
    batch = _batch(setup, 4)

    state, metrics = _sgd_step(model, trainable, frozen, batch, aux_coef=aux_coef)
    (value, (balance, loads)), grads = jax.value_and_grad(_objective(model, frozen, aux_coef), has_aux=True)(
        trainable, batch)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    np.testing.assert_allclose(metrics["balance_loss"], balance, rtol=1e-5)
    np.testing.assert_array_equal(metrics["expert_tokens"], loads)  # the experts' loads, counted
    assert "gate_loss" not in metrics  # no adapters: no gate terms
    _check_update(state.gates, trainable, grads)


def test_accumulation_weighs_the_balance_by_tokens(make_config, float32_matmuls):
    """With 2 micro-batches the LM term is the whole batch's and the balance term is the token-weighted
    mean of the micro-batches' balance losses: value and update match that objective by hand."""
    setup = train_lib.prepare(make_config())
    model = LlamaForCausalLM(setup.model_config)
    trainable, frozen = split_params(setup.params)
    trainable = _with_random_b(trainable)
    batch = _batch(setup, 4, seed=3)
    batch["attention_mask"] = batch["attention_mask"].at[0, -5:].set(0)  # unequal micro-batch token counts
    aux = 0.5
    state, metrics = _sgd_step(model, trainable, frozen, batch, aux_coef=aux, grad_accum_steps=2)

    objective = _objective(model, frozen, 0.0)
    micro = [jax.tree.map(lambda x: x[a::2], batch) for a in range(2)]  # rows a, a + 2 (make_train_step's split)
    tokens = [jnp.sum(m["attention_mask"]) for m in micro]

    def by_hand(p):
        out = model.apply({"params": merge_params(p, frozen)}, batch["input_ids"], batch["attention_mask"])
        lm = _lm_by_hand(out.logits, batch)
        balances = [objective(p, m)[1][0] for m in micro]
        balance = sum(t * b for t, b in zip(tokens, balances)) / sum(tokens)
        return lm + aux * balance, balance

    (value, balance), grads = jax.value_and_grad(by_hand, has_aux=True)(trainable)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    np.testing.assert_allclose(metrics["balance_loss"], balance, rtol=1e-5)
    np.testing.assert_array_equal(metrics["expert_tokens"], objective(trainable, batch)[1][1])  # loads: summed
    _check_update(state.gates, trainable, grads)


def test_training_lowers_the_lm_loss_and_exports_what_inference_loads(make_config, plain_world, float32_matmuls):
    """configs/mixlora_tiny.py for 60 steps: the eval LM loss falls; the export holds the router and
    experts with their settings; load_for_inference rebuilds the model (the trained logits), and
    scripts/generate.py runs on it."""
    config = make_config(train=dict(steps=60, eval_every=0), checkpoint=dict(export_gates=True))
    trainer = train_lib.Trainer(train_lib.prepare(config))
    try:
        before = trainer.evaluate()
        summary = trainer.run()
    finally:
        trainer.close()
    after = summary["eval"]
    assert after["lm_loss"] < before["lm_loss"] - 0.5, (before, after)
    assert not any(k.startswith("gate_") for k in after)
    shares = [after[f"expert_share/{e}"] for e in range(4)]
    assert abs(sum(shares) - 1) < 1e-6 and min(shares) > 0.05, shares  # every expert in use
    assert 2.0 <= after["balance_loss"] < 3.0  # top-2 of 4: 2 when balanced, 8 when one pair takes all
    np.testing.assert_allclose(after["loss"], after["lm_loss"] + 0.01 * after["balance_loss"], rtol=1e-6)

    gates_dir = summary["gates_dir"]
    assert load_gate_settings(gates_dir)["mixlora"] == dataclasses.asdict(trainer.setup.model_config.mixlora)
    params, config_loaded, names = load_for_inference(plain_world.model, gates_dir)
    assert names == [] and config_loaded.mixlora == trainer.setup.model_config.mixlora
    with pytest.raises(ValueError, match="top_k=1 routes MeteoRA's adapters, and the checkpoint .* has none"):
        load_for_inference(plain_world.model, gates_dir, top_k=1)  # (it would change nothing)
    trained = merge_params(trainer.state.gates, trainer.frozen)
    ids = jnp.asarray(np.random.default_rng().integers(4, 200, (2, 10)), jnp.int32)
    want = LlamaForCausalLM(trainer.setup.model_config).apply({"params": trained}, ids).logits
    got = LlamaForCausalLM(config_loaded).apply({"params": params}, ids).logits
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    generate = runpy.run_path(os.path.join(REPO, "scripts", "generate.py"), run_name="cli_script")["main"]
    out = os.path.join(os.path.dirname(gates_dir), "out.jsonl")
    pictures = os.path.join(os.path.dirname(gates_dir), "pictures")
    assert generate(["--checkpoint", plain_world.model, "--tokenizer", plain_world.tokenizer, "--gates", gates_dir,
                     "--prompt", "417+26=", "--max-new-tokens", "4", "--json", out, "--routing-pictures", pictures]) == 0
    with open(out) as f:
        assert [json.loads(line)["prompt"] for line in f] == ["417+26="]
    assert sorted(os.listdir(pictures)) == ["prompt_000_experts.html", "prompt_000_experts.png"]  # (no adapters)


def test_lora_dropout_reaches_the_experts(make_config):
    """train.lora_dropout drops the experts' LoRA input (MixLoRA trains with 0.05): the loss moves with
    the dropout key, and without dropout it is the keyless loss."""
    setup = train_lib.prepare(make_config())
    model = LlamaForCausalLM(setup.model_config)
    trainable, frozen = split_params(setup.params)
    trainable, batch = _with_random_b(trainable), _batch(setup, 4)
    plain = train_lib._loss_fn(model, 50.0, 2, lora_dropout=0.0, aux_coef=0.01)
    keyless = float(plain(trainable, frozen, batch)[0])
    assert float(plain(trainable, frozen, batch, jax.random.PRNGKey(1))[0]) == keyless  # (no rng used)
    dropped = train_lib._loss_fn(model, 50.0, 2, lora_dropout=0.5, aux_coef=0.01)
    one, two = (float(dropped(trainable, frozen, batch, jax.random.PRNGKey(i))[0]) for i in (1, 2))
    assert len({keyless, one, two}) == 3


def test_a_resumed_run_matches_an_uninterrupted_one(make_config, tmp_path):
    """3 steps, a checkpoint, 3 more: the router and experts equal those of 6 steps in one go (the
    experts' init is not drawn again over the checkpoint's state)."""
    constant = dict(kind="constant", warmup_steps=0)  # (a decay's length follows train.steps)
    resumed = make_config(train=dict(steps=3), checkpoint=dict(every=3), schedule=constant)
    train_lib.train(resumed)
    resumed.train.steps = 6
    whole = make_config("whole", train=dict(steps=6), schedule=constant)
    states = []
    for config, start in ((resumed, 3), (whole, None)):
        trainer = train_lib.Trainer(train_lib.prepare(config))
        try:
            assert trainer.run()["resumed_from"] == start
            states.append(_flat(trainer.state.gates))
        finally:
            trainer.close()
    for k, v in states[0].items():
        np.testing.assert_allclose(v, states[1][k], rtol=1e-6, atol=1e-7, err_msg=str(k))


def test_resuming_over_other_task_folders_names_them(make_config, plain_world, tmp_path):
    """Without adapters the tasks are the data root's folders: a resume over a root that gained one
    names it (it failed on the data position, blaming the settings)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(plain_world.data_root, root)
    config = make_config(data=dict(root=str(root)), train=dict(steps=2))
    train_lib.train(config)
    shutil.copytree(root / "arith", root / "arith2")
    config.train.steps = 4
    with pytest.raises(train_lib.TrainError, match=r"trained on the tasks \['arith', 'reverse', 'shout'\]; data.root .* "
                                                   r"now holds .* \(added \['arith2'\], removed \[\]\)"):
        train_lib.train(config)
    shutil.rmtree(root / "shout")
    with pytest.raises(train_lib.TrainError, match=r"\(added \['arith2'\], removed \['shout'\]\)"):
        train_lib.train(config)


def test_gates_and_experts_train_together(tmp_path, float32_matmuls):
    """MeteoRA adapters on the attention projections and MixLoRA experts on the FFN: the gates, the
    router and the experts all train, on lm + coef * gate + aux_coef * balance (value and update
    against that objective by hand)."""
    config = _config_file("tiny")
    config.model.meteora.targets = ATTENTION
    config.model.mixlora.update(num_experts=2, rank=2, top_k=1)
    config.tiny_world = str(tmp_path / "world")  # (the paths follow it)
    config.workdir = str(tmp_path / "run")
    config.train.update(steps=2, eval_every=-1)
    config.logging.update(progress=False, tensorboard=False)
    config.checkpoint.update(export_gates=False)
    setup = train_lib.prepare(config)
    assert setup.adapter_names == list(TASKS)
    trainable, frozen = split_params(setup.params)
    assert {k[-1] for k in _flat(trainable)} == MIXLORA_LEAVES | {"gate"}
    model = LlamaForCausalLM(setup.model_config)
    trainable, batch = _with_random_b(trainable), _batch(setup, 6)
    state, metrics = _sgd_step(model, trainable, frozen, batch, aux_coef=0.2)
    (value, (balance, _)), grads = jax.value_and_grad(_objective(model, frozen, 0.2, gate_coef=50.0), has_aux=True)(
        trainable, batch)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    np.testing.assert_allclose(metrics["balance_loss"], balance, rtol=1e-5)
    assert metrics["balance_loss"] >= 1.0 - 1e-6  # top-1: 1 when balanced
    _check_update(state.gates, trainable, grads)


def test_a_checkpoint_with_experts_gives_them_to_the_run(make_config, plain_world, tmp_path, no_compute):
    """A checkpoint that has experts gives the run those (the config's model.mixlora may leave them off
    or name the same ones, with its own top_k); a config asking for other experts (another count, rank
    or alpha) is refused."""
    metadata = read_metadata(plain_world.model)
    stored = model_config_of(plain_world.model, metadata).replace(mixlora=MixLoRAConfig(num_experts=3, rank=2))
    path = str(tmp_path / "with_experts")
    params = init_params(stored, jax.random.key(1))
    save_checkpoint(path, params, stored, metadata)

    setup = train_lib.prepare(make_config(model_checkpoint=path, model=dict(mixlora=dict(num_experts=0))))
    assert setup.model_config.mixlora == stored.mixlora
    key = ("layers", "mlp", "gate_proj", "expert_lora_a")
    np.testing.assert_array_equal(_flat(setup.params)[key], np.asarray(traverse_util.flatten_dict(params)[key]))
    same = make_config(model_checkpoint=path, model=dict(mixlora=dict(num_experts=3, rank=2, alpha=16.0, top_k=1)))
    assert train_lib.prepare(same).model_config.mixlora.top_k == 1
    with pytest.raises(train_lib.TrainError, match=r"has MixLoRA experts \(num_experts=3, rank=2, alpha=16.0\); "
                                                   r"model.mixlora asks for num_experts=4, rank=4, alpha=8.0"):
        train_lib.train(make_config(model_checkpoint=path))
    for change in (dict(rank=4), dict(alpha=8.0)):
        asked = make_config(model_checkpoint=path, model=dict(mixlora={"num_experts": 3, "rank": 2, "alpha": 16.0, **change}))
        with pytest.raises(train_lib.TrainError, match=r"has MixLoRA experts \(num_experts=3, rank=2, alpha=16.0\)"):
            train_lib.train(asked)


def test_bad_mixlora_settings_are_refused(make_config, tmp_path, no_compute):
    """Before any compute, one message naming the setting."""
    def expect(config, match):
        with pytest.raises(train_lib.TrainError, match=match):
            train_lib.train(config)

    expect(make_config(model=dict(mixlora=dict(num_experts=0))), "has no adapters .* and model.mixlora has no experts")
    expect(make_config(model=dict(mixlora=dict(top_k=5))),
           r"model.mixlora: mixlora.top_k=5 must be between 1 and num_experts=4")
    expect(make_config(model=dict(mixlora=dict(alpha=-1.0))), r"model.mixlora: mixlora.alpha=-1.0")
    expect(make_config(train=dict(router_aux_loss_coef=-0.1)), r"train.router_aux_loss_coef=-0.1 must be a finite")
    # A checkpoint whose adapters sit on the FFN: the experts would share those projections.
    tiny = _config_file("tiny")
    world = build_tiny_world(tmp_path / "adapted", ModelConfig.from_dict(tiny.model))
    config = make_config(model_checkpoint=world.model)
    config.model.meteora.num_adapters = 3
    expect(config, r"puts experts on the FFN, where the adapters of model checkpoint .* sit too "
                   r"\(\['gate_proj', 'up_proj', 'down_proj'\]\)")


def test_an_export_with_broken_mixlora_settings_is_refused(make_config, plain_world, tmp_path):
    """settings.json's mixlora section is checked when the export is loaded, naming the file."""
    config = make_config(train=dict(steps=1), checkpoint=dict(export_gates=True))
    gates_dir = train_lib.train(config)["gates_dir"]
    settings_path = os.path.join(gates_dir, "settings.json")
    with open(settings_path) as f:
        settings = json.load(f)
    for broken, match in (({**settings["mixlora"], "rank": 0}, r"'mixlora' holds settings this checkpoint cannot take "
                                                              r"\(.*rank >= 1"),
                          ({**settings["mixlora"], "experts": 4}, r"'mixlora' holds settings .*experts"),
                          ({**settings["mixlora"], "num_experts": 2}, "expert_lora_a has shape"),
                          ({**settings["mixlora"], "num_experts": 0}, r"hold MixLoRA experts, and .*settings.json, which "
                                                                      r"says how they were built, has no 'mixlora' experts"),
                          ("4 experts", r"settings.json: 'mixlora' must be an object")):
        with open(settings_path, "w") as f:
            json.dump({**settings, "mixlora": broken}, f)
        with pytest.raises(ValueError, match=match):
            load_for_inference(plain_world.model, gates_dir)
    os.remove(settings_path)
    with pytest.raises(ValueError, match=r"hold MixLoRA experts, and .*settings.json, .* is missing"):
        load_for_inference(plain_world.model, gates_dir)


def test_evaluate_weighs_every_eval_batch(make_config):
    """The eval's expert shares are the loads summed over every eval batch, and its balance loss the
    batches' values weighted by their unpadded tokens (not the last batch's, nor an equal mean)."""
    trainer = train_lib.Trainer(train_lib.prepare(make_config(train=dict(eval_every=0, eval_batch_size=4))))
    try:
        got = trainer.evaluate()
        loads, weighted, tokens = 0.0, 0.0, 0.0
        for batch in data_lib.eval_batches(trainer.setup.eval_data, 4):
            with trainer._context():
                m = jax.device_get(trainer.eval_step(trainer.state.gates, trainer.frozen,
                                                     sharding_lib.put_batch(batch, trainer.batch_sharding)))
            loads = loads + m["expert_tokens"]
            weighted += float(m["balance_loss"]) * float(m["router_tokens"])
            tokens += float(m["router_tokens"])
    finally:
        trainer.close()
    np.testing.assert_allclose([got[f"expert_share/{e}"] for e in range(4)], loads / loads.sum(), rtol=1e-6)
    np.testing.assert_allclose(got["balance_loss"], weighted / tokens, rtol=1e-6)


def test_a_checkpoint_lacking_a_base_leaf_is_refused(plain_world):
    """Only MixLoRA's leaves may be new: a checkpoint without an FFN kernel would have trained over a
    random frozen one."""
    config = model_config_of(plain_world.model, read_metadata(plain_world.model))
    stored = traverse_util.flatten_dict(jax.eval_shape(lambda: init_params(config, jax.random.key(0))))
    del stored[("layers", "mlp", "up_proj", "kernel")]
    with pytest.raises(train_lib.TrainError, match=r"lacks \['layers/mlp/up_proj/kernel'\]"):
        train_lib._new_leaves(config.replace(mixlora=MixLoRAConfig(num_experts=2)), traverse_util.unflatten_dict(stored),
                              "ckpt")


def test_new_leaves_are_float32_over_a_bf16_model():
    """They train in float32 (as the gates): made in bf16 they would start rounded."""
    config = ModelConfig.from_dict(_config_file("mixlora_tiny").model).replace(param_dtype="bfloat16")
    stored = jax.eval_shape(lambda: init_params(config.replace(mixlora=MixLoRAConfig()), jax.random.key(0)))
    new = train_lib._new_leaves(config, stored, "ckpt")
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    leaves = _flat(train_lib._init_new_leaves(config, new, jax.tree.map(lambda _: one_device, new), 0))
    assert {k[-1] for k in leaves} == MIXLORA_LEAVES and all(v.dtype == np.float32 for v in leaves.values())


def test_the_train_script_reports_the_lm_and_balance_losses(plain_world, tmp_path):
    """scripts/train.py's last line, for a model without gates: the eval LM loss and balance loss."""
    command = [sys.executable, os.path.join(REPO, "scripts", "train.py"),
               f"--config={os.path.join(REPO, 'configs', 'mixlora_tiny.py')}", "--config.tiny_world=",
               f"--config.model_checkpoint={plain_world.model}", f"--config.tokenizer={plain_world.tokenizer}",
               f"--config.data.root={plain_world.data_root}", f"--config.workdir={tmp_path / 'run'}",
               "--config.train.steps=1", "--config.train.eval_every=0", "--config.train.eval_max_batches=1",
               "--config.logging.progress=False", "--config.logging.tensorboard=False"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=child_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"done at step 1, eval LM loss \d+\.\d{3}, balance loss \d+\.\d{3}; gates: .*gates", last), last
