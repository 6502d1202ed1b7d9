"""Gate training: train state, optimizer, sharded train/eval steps, the loop, checkpoints, metrics.

    result = train(config)        # config: an ml_collections ConfigDict (configs/*.py)

Only the MeteoRA gates (`params[...]["gate"]`, `[n_layers, d_in, L]` float32) are trained, and,
when the model has MixLoRA FFN experts (`model.mixlora`, docs/mixlora.md), their router and LoRA
experts with them (`gates.TRAINABLE_LEAVES`; "gates" below means that whole trainable tree). Params
are split into a trainable tree and a frozen tree (base weights, MeteoRA's LoRAs, scalings); only
the trainable tree is differentiated and has optimizer state. Compute runs in `model.dtype`
(bf16 on the big configs); trained leaves, gradients and AdamW moments stay float32.

    loss = lm + train.loss_coef * gate + train.router_aux_loss_coef * balance

gate: MeteoRA's gate cross-entropy against each token's task (0 without adapters); balance:
MixLoRA's load-balancing loss over the routers (absent without experts).

The step is `jax.jit`ted with explicit in/out shardings over a named mesh (`meteora_jax.sharding`):
frozen params FSDP-sharded by the logical rules, gates and optimizer state sharded alike, batches
over the data axes. Gradient accumulation scans over micro-batches inside the step.

Everything the config asks for is checked (`prepare`) before any compute, and errors are
`TrainError`, `DataError` or `ConfigError` (all `ValueError`s) with a readable message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import time
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils

from meteora_jax import checkpoint as model_ckpt
from meteora_jax import data as data_lib
from meteora_jax import sharding as sharding_lib
from meteora_jax.cli import unwritable
from meteora_jax.config import MLP_PROJECTIONS, ConfigError, MixLoRAConfig, ModelConfig, describe_changes
from meteora_jax.convert.common import sha256_file
from meteora_jax.files import written_whole
from meteora_jax.gates import (MIXLORA_LEAVES, export_gates, is_trainable, load_gate_settings, load_gates, merge_params,
                               split_params)
from meteora_jax.loss import joint_loss, per_task_accuracy
from meteora_jax.mixlora import expert_counts, load_balancing_loss
from meteora_jax.model import LlamaForCausalLM, param_logical_axes
from meteora_jax.routing import Routing

__all__ = [
    "NonFiniteLossError",
    "Setup",
    "TrainError",
    "TrainState",
    "Trainer",
    "export_gates",
    "is_trainable",
    "load_gate_settings",
    "load_gates",
    "make_optimizer",
    "make_schedule",
    "merge_params",
    "prepare",
    "run_settings",
    "split_params",
    "train",
]

_SUMMED_METRICS = ("gate_task_correct", "gate_task_count", "lm_tokens", "gate_tokens", "router_tokens", "expert_tokens")
_SCHEDULES = ("cosine", "linear", "constant")


class TrainError(ValueError):
    """A training config or input that cannot work; raised before any compute."""


class NonFiniteLossError(TrainError):
    """The loss became nan/inf; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------
# Optimizer


def make_schedule(schedule_cfg, optimizer_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to optimizer.learning_rate, then cosine / linear decay to end_factor * lr."""
    kind, peak = schedule_cfg.kind, float(optimizer_cfg.learning_rate)
    warmup = min(int(schedule_cfg.warmup_steps), total_steps)
    end = peak * float(schedule_cfg.end_factor)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end)
    if kind == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.linear_schedule(peak, end, max(total_steps - warmup, 1))],
            [warmup],
        )
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup])
    raise TrainError(f"schedule.kind={kind!r}; choose one of {_SCHEDULES}")


def make_optimizer(optimizer_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (moments in float32, as the gates)."""
    parts = []
    if optimizer_cfg.clip_norm:  # 0: no clipping
        parts.append(optax.clip_by_global_norm(float(optimizer_cfg.clip_norm)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optimizer_cfg.b1),
            b2=float(optimizer_cfg.b2),
            eps=float(optimizer_cfg.eps),
            weight_decay=float(optimizer_cfg.weight_decay),
            mu_dtype=jnp.float32,
        )
    )
    return optax.chain(*parts)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer steps taken
    gates: Any  # trainable params, float32: the gates [n_layers, d_in, L] (+ MixLoRA's router and experts)
    opt_state: Any  # optax state of `gates` only
    rng: jax.Array  # [2] uint32, split every step (the LoRA dropout keys; resumed exactly)


# ----------------------------------------------------------------------------------------------
# Preparation: every check before any compute


@dataclasses.dataclass
class Setup:
    """What `prepare` checked and loaded: enough to build a `Trainer`."""

    config: Any  # the ml_collections ConfigDict
    model_config: ModelConfig
    params: Any  # full params (host or default device)
    adapter_names: list[str]  # the checkpoint's, in gate-column order ([] for MixLoRA alone)
    train_data: dict  # {task: datasets.Dataset}; the tasks are the adapters, or the data root's folders
    eval_data: dict | None
    mesh: jax.sharding.Mesh
    rules: tuple
    param_shardings: Any  # NamedSharding per param (prepare checked them against the mesh once)
    train_files: dict = dataclasses.field(default_factory=dict)  # {task: sha256 of its train.jsonl}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise TrainError(message)


def _check_train_config(config) -> None:
    t = config.train
    _check(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _check(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be >= 1")
    _check(t.grad_accum_steps >= 1, f"train.grad_accum_steps={t.grad_accum_steps} must be >= 1")
    _check(
        t.batch_size % t.grad_accum_steps == 0,
        f"train.batch_size={t.batch_size} is not a multiple of train.grad_accum_steps={t.grad_accum_steps}",
    )
    _check(t.eval_batch_size >= 1, f"train.eval_batch_size={t.eval_batch_size} must be >= 1")
    _check(0 <= t.lora_dropout < 1, f"train.lora_dropout={t.lora_dropout} must be in [0, 1)")
    _check(config.schedule.kind in _SCHEDULES, f"schedule.kind={config.schedule.kind!r}; choose one of {_SCHEDULES}")
    _check(t.eval_max_batches >= 0, f"train.eval_max_batches={t.eval_max_batches} must be >= 0 (0: the whole split)")
    o = config.optimizer
    _check(0 < o.learning_rate < math.inf, f"optimizer.learning_rate={o.learning_rate} must be a finite number > 0")
    _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optimizer.b1={o.b1}, optimizer.b2={o.b2} must be in [0, 1)")
    for key in ("eps", "weight_decay"):
        _check(0 <= o[key] < math.inf, f"optimizer.{key}={o[key]} must be a finite number >= 0")
    _check(0 <= o.clip_norm < math.inf, f"optimizer.clip_norm={o.clip_norm} must be a finite number >= 0 (0: no clipping)")
    _check(config.schedule.warmup_steps >= 0, f"schedule.warmup_steps={config.schedule.warmup_steps} must be >= 0")
    _check(0 <= config.schedule.end_factor <= 1, f"schedule.end_factor={config.schedule.end_factor} must be in [0, 1]")
    _check(0 <= config.seed < 2**32, f"seed={config.seed} must be in [0, 2**32)")  # numpy's Generator and PRNGKey
    _check(config.checkpoint.every >= 0, f"checkpoint.every={config.checkpoint.every} must be >= 0 (0: only at the end)")
    _check(config.checkpoint.keep >= 1, f"checkpoint.keep={config.checkpoint.keep} must be >= 1")
    _check(config.logging.every >= 1, f"logging.every={config.logging.every} must be >= 1")
    _check(config.data.seq_len >= 2, f"data.seq_len={config.data.seq_len} must be >= 2")
    _check(
        config.data.gate_scope in data_lib.GATE_SCOPES,
        f"data.gate_scope={config.data.gate_scope!r}; choose one of {data_lib.GATE_SCOPES}",
    )
    # (A negative coefficient trains the gates away from each token's task; NaN stopped at step 1.)
    for key in ("loss_coef", "router_aux_loss_coef"):
        _check(0 <= t[key] < math.inf, f"train.{key}={t[key]} must be a finite number >= 0")
    _check(bool(config.workdir), "config.workdir is empty: give the run's folder")
    for key in ("workdir", "tiny_world"):  # before the world is built and the step compiled
        built = key == "tiny_world" and config[key] and os.path.isfile(os.path.join(str(config[key]), "WORLD.json"))
        problem = config[key] and not built and unwritable(f"config.{key}", str(config[key]), folder=True)
        _check(not problem, str(problem))
    # A workdir in the data root put checkpoints/, gates/ and tb/ among the task folders: the next
    # run read them as tasks.
    if config.data.root:
        root, workdir = os.path.realpath(str(config.data.root)), os.path.realpath(str(config.workdir))
        _check(os.path.commonpath([root, workdir]) != root,
               f"config.workdir={config.workdir!r} lies inside config.data.root={config.data.root!r}: give it its own folder")


def _runtime_model_config(stored: ModelConfig, model_section, mixlora: MixLoRAConfig) -> ModelConfig:
    """The checkpoint's architecture with the config's run-time choices (dtype, remat, routing)
    and the run's MixLoRA experts (`_mixlora_of`)."""
    meteora = dataclasses.replace(
        stored.meteora, top_k=int(model_section.meteora.top_k), kernel_impl=str(model_section.meteora.kernel_impl)
    )
    return stored.replace(dtype=str(model_section.dtype), remat=str(model_section.remat), meteora=meteora,
                          mixlora=mixlora)


def _mixlora_of(stored: MixLoRAConfig, section) -> MixLoRAConfig:
    """The run's MixLoRA experts. Over a checkpoint without experts: the config's (training adds
    them). Over one with experts: the checkpoint's, routed with the config's top_k / kernel_impl
    where the config turns them on too; a config asking for other experts is an error."""
    try:
        wanted = MixLoRAConfig(**dict(section))
    except (ConfigError, TypeError) as e:  # a bad value; an unknown key
        raise TrainError(f"model.mixlora: {e}") from None
    if not stored.num_experts:
        return wanted
    if not wanted.num_experts:
        return stored
    shape = ("num_experts", "rank", "alpha")
    if any(getattr(stored, k) != getattr(wanted, k) for k in shape):
        have = ", ".join(f"{k}={getattr(stored, k)}" for k in shape)
        asked = ", ".join(f"{k}={getattr(wanted, k)}" for k in shape)
        raise TrainError(f"the model checkpoint has MixLoRA experts ({have}); model.mixlora asks for {asked}: "
                         "give the checkpoint's, or model.mixlora.num_experts=0 to train them as they are")
    try:
        return dataclasses.replace(stored, top_k=wanted.top_k, kernel_impl=wanted.kernel_impl)
    except ConfigError as e:
        raise TrainError(f"model.mixlora: {e}") from None


def _load_tokenizer(path: str):
    _check(bool(path), "config.tokenizer is empty: give the base model's HF tokenizer folder")
    try:
        return data_lib.load_tokenizer(path)
    except data_lib.DataError as e:
        raise TrainError(str(e)) from None


def prepare(config) -> Setup:
    """Validates the config and inputs and loads model, tokenizer and data; no compute.

    Order: config values, mesh, model checkpoint (+ architecture vs. seq_len/top_k, the mesh vs. the
    parameter shapes), tokenizer, task data (all JSONL files validated before tokenising).
    """
    _check_train_config(config)
    try:  # before the tiny world: building it initialises and writes a model
        mesh = sharding_lib.make_mesh(dict(config.mesh.shape))
        rules = sharding_lib.logical_rules(config.mesh.rules, mesh)
    except sharding_lib.ShardingError as e:
        raise TrainError(str(e)) from None
    dp = sharding_lib.data_parallel_size(mesh, rules)
    micro = config.train.batch_size // config.train.grad_accum_steps
    _check(
        micro % dp == 0,
        f"micro-batch {micro} (train.batch_size / grad_accum_steps) is not a multiple of the {dp} data-parallel devices",
    )
    _check(
        config.train.eval_batch_size % dp == 0,
        f"train.eval_batch_size={config.train.eval_batch_size} is not a multiple of the {dp} data-parallel devices",
    )
    if config.tiny_world:
        from meteora_jax.tiny import TinyWorldError, build_tiny_world

        try:
            # The world's model is a converted checkpoint: without MixLoRA experts (training adds them).
            tiny_config = ModelConfig.from_dict(config.model).replace(mixlora=MixLoRAConfig())
        except ConfigError as e:
            raise TrainError(f"config.model: {e}") from None
        try:
            build_tiny_world(config.tiny_world, tiny_config)
        except TinyWorldError as e:
            raise TrainError(f"config.tiny_world={config.tiny_world!r}: {e}") from None

    path = config.model_checkpoint
    _check(bool(path), "config.model_checkpoint is empty: give a converted model checkpoint (scripts/convert.py)")
    _check(os.path.exists(path), f"model checkpoint {path!r} does not exist")
    metadata = model_ckpt.read_metadata(path)  # no arrays read yet
    try:
        stored_config = model_ckpt.model_config_of(path, metadata)
    except model_ckpt.CheckpointError as e:
        raise TrainError(str(e)) from None
    names = model_ckpt.adapter_names(metadata)
    L = stored_config.meteora.num_adapters
    _check(len(names) == L, f"model checkpoint {path!r}: metadata names {len(names)} adapters but it holds {L}")
    mixlora = _mixlora_of(stored_config.mixlora, config.model.mixlora)
    experts = mixlora.num_experts
    ffn_adapters = [p for p in MLP_PROJECTIONS if stored_config.meteora.adapts(p)]
    _check(not (experts and ffn_adapters),
           f"model.mixlora puts experts on the FFN, where the adapters of model checkpoint {path!r} sit too "
           f"({ffn_adapters}): give a checkpoint whose adapters leave the FFN alone, or a plain base model")
    _check(L > 0 or experts, f"model checkpoint {path!r} has no adapters (num_adapters=0) and model.mixlora has no "
                             "experts: nothing to train (give adapters, or model.mixlora.num_experts > 0)")
    top_k = int(config.model.meteora.top_k)
    _check(not L or 1 <= top_k <= L,
           f"model.meteora.top_k={top_k} exceeds the checkpoint's {L} adapters (need 1 <= top_k <= {L})")
    try:
        model_config = _runtime_model_config(stored_config, config.model, mixlora)
    except ConfigError as e:
        raise TrainError(str(e)) from None
    # The mesh against the model's dimensions (abstract shapes only), before any data is tokenised.
    stored_abstract = model_ckpt.abstract_params(metadata)
    new_abstract = _new_leaves(model_config, stored_abstract, path)
    try:
        shardings = sharding_lib.param_shardings(param_logical_axes(model_config),
                                                 merge_params(new_abstract, stored_abstract), mesh, rules)
    except sharding_lib.ShardingError as e:
        raise TrainError(str(e)) from None
    seq_len = int(config.data.seq_len)
    _check(
        seq_len <= model_config.max_position_embeddings,
        f"data.seq_len={seq_len} exceeds the model's max_position_embeddings={model_config.max_position_embeddings}",
    )

    tokenizer = _load_tokenizer(config.tokenizer)
    _check(
        len(tokenizer) <= model_config.vocab_size,
        f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model_config.vocab_size}",
    )
    kw = dict(
        seq_len=seq_len,
        chat_template=bool(config.data.chat_template),
        lm_on_prompt=bool(config.data.lm_on_prompt),
        gate_scope=str(config.data.gate_scope),
    )
    _check(bool(config.data.root), "data.root is empty: give the folder of <task>/{train,test}.jsonl")
    # The tasks are the adapters (a task's gate label is its adapter); without adapters (MixLoRA
    # alone) they are whatever tasks the data root holds.
    tasks = names or data_lib.task_folders(config.data.root)
    # Validate every file of both splits before tokenising any.
    for split in ["train"] + ([config.data.eval_split] if config.train.eval_every >= 0 else []):
        for p in data_lib.find_task_dirs(config.data.root, tasks, split=split).values():
            data_lib.read_jsonl(p)
    train_data = data_lib.load_task_datasets(config.data.root, tasks, tokenizer, split="train", **kw)
    # Recorded with every checkpoint: a resume over edited files is told so.
    train_files = {task: sha256_file(p) for task, p in data_lib.find_task_dirs(config.data.root, tasks).items()}
    eval_data = None
    if config.train.eval_every >= 0:
        eval_data = data_lib.load_task_datasets(config.data.root, tasks, tokenizer, split=config.data.eval_split, **kw)
    data_lib.BalancedBatchIterator(train_data, config.train.batch_size, seed=config.seed, mixing=config.data.mixing)

    # Last: read the weights straight into their shardings (I/O only), then make the new leaves.
    new_shardings, stored_shardings = _split_like(shardings, new_abstract)
    params, _, _ = model_ckpt.restore_checkpoint(path, shardings=stored_shardings)
    if new_abstract:
        params = merge_params(_init_new_leaves(model_config, new_abstract, new_shardings, int(config.seed)), params)
    return Setup(config, model_config, params, names, train_data, eval_data, mesh, rules, shardings, train_files)


_NEW_LEAVES_STREAM = 1  # folded into the seed's key: the new leaves' init draws apart from the dropout keys


def _init_model(model_config: ModelConfig):
    """key -> every param of the model, unboxed, with trained leaves made in float32 (as they train)."""
    model = LlamaForCausalLM(model_config.replace(param_dtype="float32"))
    return lambda key: nn.unbox(model.init(key, jnp.zeros((1, 1), jnp.int32))["params"])


def _new_leaves(model_config: ModelConfig, stored_abstract, path: str) -> dict:
    """The params the model has and the checkpoint lacks, as ShapeDtypeStructs: MixLoRA's router
    and experts, when the run adds them to a checkpoint without. Anything else missing is an error."""
    stored = traverse_util.flatten_dict(stored_abstract)
    full = traverse_util.flatten_dict(jax.eval_shape(_init_model(model_config), jax.random.key(0)))
    new = {k: v for k, v in full.items() if k not in stored}
    odd = ["/".join(k) for k in new if k[-1] not in MIXLORA_LEAVES]  # (the only leaves training adds)
    _check(not odd, f"model checkpoint {path!r} lacks {odd[:3]}, which its own architecture has: a damaged checkpoint?")
    return traverse_util.unflatten_dict(new)


def _split_like(tree, like) -> tuple[dict, dict]:
    """tree -> (its leaves at the paths of `like`, the others)."""
    flat, keys = traverse_util.flatten_dict(tree), traverse_util.flatten_dict(like).keys()
    return (traverse_util.unflatten_dict({k: v for k, v in flat.items() if k in keys}),
            traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in keys}))


def _init_new_leaves(model_config: ModelConfig, new_abstract, shardings, seed: int) -> dict:
    """The new leaves initialised as the model initialises them (MixLoRA: B zero, so the model
    starts as the checkpoint), float32, from the run's seed, straight into their shardings. Under
    jit only these leaves are computed: the rest of the model's init is dead code."""
    init = _init_model(model_config)

    def new_only(key):
        flat = traverse_util.flatten_dict(init(key))
        return traverse_util.unflatten_dict({k: flat[k] for k in traverse_util.flatten_dict(new_abstract)})

    key = jax.random.fold_in(jax.random.PRNGKey(seed), _NEW_LEAVES_STREAM)
    return jax.jit(new_only, out_shardings=shardings)(key)


# ----------------------------------------------------------------------------------------------
# Steps


def _loss_fn(model, coef: float, top_k: int, lora_dropout: float = 0.0, aux_coef: float = 0.0):
    """(gates, frozen, batch[, dropout key]) -> (loss, metrics); the key only with lora_dropout > 0.

    loss = lm + coef * gate (`joint_loss`), + aux_coef * balance with MixLoRA experts: their
    load-balancing loss over every layer's router and the unpadded tokens (metrics balance_loss,
    router_tokens: the tokens it averages over, and expert_tokens [E]: the experts' loads)."""
    routing = Routing(lora_dropout=lora_dropout)

    def loss_fn(gates, frozen, batch, dropout_key=None):
        rngs = {"dropout": dropout_key} if lora_dropout else None
        out = model.apply({"params": merge_params(gates, frozen)}, batch["input_ids"], batch["attention_mask"],
                          routing=routing, rngs=rngs)
        loss, metrics = joint_loss(out.logits, out.gate_logits, batch, coef=coef, top_k=top_k)
        if not out.gate_logits:  # no adapters (MixLoRA alone): no gate terms to report
            metrics = {k: v for k, v in metrics.items() if k not in _GATE_ONLY}
        if out.router_logits is not None:
            mask, k = batch["attention_mask"], model.config.mixlora.top_k
            balance = load_balancing_loss(out.router_logits, mask, k)
            loss = loss + aux_coef * balance
            metrics.update(loss=loss, balance_loss=balance, router_tokens=jnp.sum(mask.astype(jnp.float32)),
                           expert_tokens=expert_counts(out.router_logits, mask, k))
        return loss, metrics

    return loss_fn


_GATE_SUMS = ("gate_task_correct", "gate_task_count", "gate_layer_correct", "gate_layer_count")  # [L], [n_layers]
_GATE_ONLY = ("gate_loss", "gate_acc_top1", "gate_acc_topk") + _GATE_SUMS
# Each token-averaged metric and the count it averages over (accumulation weighs the micro-batches by it).
_AVERAGED_OVER = {"lm_loss": "lm_tokens", "gate_loss": "gate_tokens", "gate_acc_top1": "gate_tokens",
                  "gate_acc_topk": "gate_tokens", "balance_loss": "router_tokens"}


def _token_totals(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The counts of `_AVERAGED_OVER` for a whole batch, counted as `_loss_fn` counts them."""
    return {"lm_tokens": jnp.sum(batch["lm_mask"][:, 1:].astype(jnp.float32)),
            "gate_tokens": jnp.sum(batch["gate_mask"].astype(jnp.float32)),
            "router_tokens": jnp.sum(batch["attention_mask"].astype(jnp.float32))}


def _token_weights(metrics: Mapping[str, jax.Array], totals: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """A part's share of the whole, per count: {count: its count / the whole's}."""
    return {k: metrics[k] / jnp.maximum(totals[k], 1.0) for k in totals if k in metrics}


def _weighted_metrics(metrics: Mapping[str, jax.Array], weights: Mapping[str, jax.Array]) -> dict:
    """Per-part metrics scaled so that summing them over the parts gives the whole's metrics
    (token-weighted means; counts stay sums). `loss` is left out: rebuild it with `_with_loss`."""
    out = {}
    for k, v in metrics.items():
        if k in _AVERAGED_OVER:
            out[k] = v * weights[_AVERAGED_OVER[k]]
        elif k in _SUMMED_METRICS:
            out[k] = v
    return out


def _combined_loss(metrics: Mapping, coef: float, aux_coef: float) -> jax.Array:
    """lm + coef * gate (+ aux_coef * balance, with MixLoRA experts) of (weighted) metrics."""
    loss = metrics["lm_loss"] + coef * metrics.get("gate_loss", 0.0)
    return loss + aux_coef * metrics["balance_loss"] if "balance_loss" in metrics else loss


def _with_loss(metrics: Mapping, coef: float, aux_coef: float = 0.0) -> dict:
    return dict(metrics, loss=_combined_loss(metrics, coef, aux_coef))


def make_train_step(model, tx, *, coef: float, top_k: int, grad_accum_steps: int, batch_spec=None,
                    lora_dropout: float = 0.0, aux_coef: float = 0.0):
    """(state, frozen, batch [B, S]) -> (state, metrics). Pure; jit it with shardings.

    lora_dropout > 0: the adapters' input is dropped out (`Routing.lora_dropout`) with a key drawn
    from state.rng each step (and folded with the micro-batch index).

    With grad_accum_steps = A > 1 the batch is split into A micro-batches and the step optimises the
    same objective as A = 1: lm is the masked mean over all LM targets of the batch and gate the
    masked mean over all its gate tokens. Each micro-batch's lm (gate) loss is weighted by its share
    of the batch's LM targets (gate tokens), and the weighted gradients are summed. MixLoRA's
    balance loss is weighted by the micro-batch's share of unpadded tokens: the mean of its
    micro-batches' values, not its value on the whole batch (a product of two means is not
    additive; MixLoRA's own training, an HF Trainer, averages the micro-batches' values too, with
    equal weights).
    """
    loss_fn = _loss_fn(model, coef, top_k, lora_dropout, aux_coef)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def weighted_loss(gates, frozen, mb, totals, dropout_key):
        _, m = loss_fn(gates, frozen, mb, dropout_key)
        weighted = _weighted_metrics(m, _token_weights(m, totals))
        return _combined_loss(weighted, coef, aux_coef), weighted

    weighted_grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)

    def step(state: TrainState, frozen, batch):
        rng, dropout_key = jax.random.split(state.rng)
        if grad_accum_steps == 1:
            (_, metrics), grads = grad_fn(state.gates, frozen, batch, dropout_key)
        else:
            A = grad_accum_steps
            totals = _token_totals(batch)  # of the whole batch, before splitting

            def split(x):  # [B, S] -> [A, B/A, S]: micro-batch a = rows a, a+A, ... (stays spread)
                x = x.reshape(x.shape[0] // A, A, *x.shape[1:]).swapaxes(0, 1)
                if batch_spec is not None:
                    x = jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(None, *batch_spec))
                return x

            micro = jax.tree.map(split, batch)
            first = jax.tree.map(lambda x: x[0], micro)
            (_, m_shape), g_shape = jax.eval_shape(weighted_grad_fn, state.gates, frozen, first, totals, dropout_key)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (m_shape, g_shape))

            def body(acc, indexed):
                a, mb = indexed
                key = jax.random.fold_in(dropout_key, a)
                (_, m), g = weighted_grad_fn(state.gates, frozen, mb, totals, key)
                return jax.tree.map(jnp.add, acc, (m, g)), None

            (metrics, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(A), micro))
            metrics = _with_loss(metrics, coef, aux_coef)
        updates, opt_state = tx.update(grads, state.opt_state, state.gates)
        gates = optax.apply_updates(state.gates, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return TrainState(step=state.step + 1, gates=gates, opt_state=opt_state, rng=rng), metrics

    return step


def make_eval_step(model, *, coef: float, top_k: int, aux_coef: float = 0.0):
    """(gates, frozen, batch) -> metrics of the batch (loss terms, gate accuracy sums per task)."""
    loss_fn = _loss_fn(model, coef, top_k, aux_coef=aux_coef)

    def step(gates, frozen, batch):
        _, metrics = loss_fn(gates, frozen, batch)
        return metrics

    return step


# ----------------------------------------------------------------------------------------------
# Gates on their own (the files: meteora_jax.gates)


def run_settings(config, mixlora: MixLoRAConfig = MixLoRAConfig()) -> dict:
    """What inference needs to route and prompt as training did, exported with the gates
    (`gates.export_gates`): the run-time top_k, kernel_impl and compute dtype (config.model), and
    data.chat_template / lm_on_prompt / gate_scope; with MixLoRA experts, their settings (the
    model's `mixlora`), which the model checkpoint lacks when training added them."""
    settings = {
        "top_k": int(config.model.meteora.top_k),
        "kernel_impl": str(config.model.meteora.kernel_impl),
        "dtype": str(config.model.dtype),
        "chat_template": bool(config.data.chat_template),
        "lm_on_prompt": bool(config.data.lm_on_prompt),
        "gate_scope": str(config.data.gate_scope),
    }
    if mixlora.num_experts:
        settings["mixlora"] = dataclasses.asdict(mixlora)
    return settings


def _flat_config(config) -> dict:
    """The run's config as {"section.key": value}, JSON-normalised (kept in each train checkpoint)."""
    return json.loads(json.dumps(traverse_util.flatten_dict(config.to_dict(), sep="."), default=str))


# ----------------------------------------------------------------------------------------------
# Loop helpers


def _start_over(checkpoints: str) -> None:
    """checkpoint.resume=False: an earlier run's checkpoints are removed (kept, their steps would
    mix with this run's: a later resume would take the old run's latest step, and a save of a step
    they hold would fail)."""
    earlier = os.path.isdir(checkpoints) and bool(os.listdir(checkpoints))
    if jax.process_count() > 1:  # process 0's view, for all: on a shared disk it may be removing them already
        earlier = bool(multihost_utils.broadcast_one_to_all(np.int32(earlier)))
    if earlier:
        if jax.process_index() == 0:
            warnings.warn(f"checkpoint.resume=False: removing the earlier run's checkpoints in {checkpoints}")
            shutil.rmtree(checkpoints)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("meteora_jax.train: earlier checkpoints removed")


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and returns."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._old = {}
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def agreed(self, blocking: bool = True) -> int | None:
        """The signal to stop on, the same in every process (None: go on). A signal can reach the
        hosts of a multi-host run at different steps; one that stopped alone would leave the others
        waiting in the next step's collectives. Every process must call it at the same point.

        With several processes agreeing is a host sync, which waits for the queued step: at a step
        that does not block anyway (`blocking=False`: no log, save or eval due) it is skipped, so a
        signal takes effect at the next logging step at the latest.
        """
        if jax.process_count() == 1:
            return self.signum
        if not blocking:
            return None
        signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
        return int(np.max(signums)) or None

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _truncate_jsonl(path: str, keep_up_to: int) -> None:
    """Rewrites metrics.jsonl without the records of steps > keep_up_to (and any torn last line)."""
    if not os.path.exists(path):
        return
    kept, dropped = [], False
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = int(record["step"]) <= keep_up_to
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped = True
    if dropped:
        with written_whole(path) as f:
            f.writelines(kept)


class _MetricLog:
    """JSONL + TensorBoard (tensorboardX, when installed) writers, on process 0 only."""

    def __init__(self, workdir: str, logging_cfg, keep_up_to: int = 0):
        """keep_up_to: the step the run starts from; older records of later steps (written by a run
        that went past the checkpoint resumed from) are dropped, so each step is logged once."""
        self.lead = jax.process_index() == 0
        self.jsonl = self.tb = None
        if not self.lead:
            return
        if logging_cfg.jsonl:
            path = os.path.join(workdir, "metrics.jsonl")
            _truncate_jsonl(path, keep_up_to)
            self.jsonl = open(path, "a")
        if logging_cfg.tensorboard:
            try:
                from tensorboardX import SummaryWriter

                # purge_step: TensorBoard drops the earlier events of the steps this run logs again
                self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=keep_up_to + 1)
            except ImportError:
                warnings.warn("tensorboardX is not installed: no TensorBoard events (metrics.jsonl is written)")

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        if self.jsonl is not None:
            # null, not NaN: strict JSON readers refuse NaN (a task without eval tokens has no accuracy)
            finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in scalars.items()}
            self.jsonl.write(json.dumps({"step": step, "split": split, **finite}, allow_nan=False) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, step)
            self.tb.flush()

    def close(self):
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    """Holds the mesh, shardings, jitted steps, frozen params and the checkpoint manager."""

    def __init__(self, setup: Setup):
        self.setup = setup
        cfg = self.config = setup.config
        self.mesh, self.rules = setup.mesh, setup.rules
        self.model = LlamaForCausalLM(setup.model_config)
        self.schedule = make_schedule(cfg.schedule, cfg.optimizer, int(cfg.train.steps))
        self.tx = make_optimizer(cfg.optimizer, self.schedule)

        self.gate_shardings, self.frozen_shardings = split_params(setup.param_shardings)
        gates, frozen = split_params(setup.params)
        self.frozen = jax.device_put(frozen, self.frozen_shardings)
        setup.params = None  # the host copy is no longer needed
        gates = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), gates)
        gates = jax.device_put(gates, self.gate_shardings)

        rep = sharding_lib.replicated(self.mesh)
        opt_abstract = jax.eval_shape(self.tx.init, gates)
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, opt_abstract, self.gate_shardings, transform_non_params=lambda _: rep
        )
        self.state_shardings = TrainState(step=rep, gates=self.gate_shardings, opt_state=opt_shardings, rng=rep)
        self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules)
        batch_shardings = {k: self.batch_sharding for k in data_lib.ARRAY_KEYS}

        init = jax.jit(
            lambda g, key: TrainState(step=jnp.zeros((), jnp.int32), gates=g, opt_state=self.tx.init(g), rng=key),
            out_shardings=self.state_shardings,
        )
        self.state = init(gates, jax.random.PRNGKey(int(cfg.seed)))

        top_k = setup.model_config.meteora.top_k
        coef, aux_coef = float(cfg.train.loss_coef), float(cfg.train.router_aux_loss_coef)
        batch_spec = tuple(self.batch_sharding.spec)
        step = make_train_step(
            self.model, self.tx, coef=coef, top_k=top_k, grad_accum_steps=int(cfg.train.grad_accum_steps), batch_spec=batch_spec,
            lora_dropout=float(cfg.train.lora_dropout), aux_coef=aux_coef,
        )
        with self._context():
            self.train_step = jax.jit(
                step,
                in_shardings=(self.state_shardings, self.frozen_shardings, batch_shardings),
                out_shardings=(self.state_shardings, rep),
                donate_argnums=(0,) if jax.default_backend() != "cpu" else (),
            )
            self.eval_step = jax.jit(
                make_eval_step(self.model, coef=coef, top_k=top_k, aux_coef=aux_coef),
                in_shardings=(self.gate_shardings, self.frozen_shardings, batch_shardings),
                out_shardings=rep,
            )
        self.iterator = data_lib.BalancedBatchIterator(
            setup.train_data, int(cfg.train.batch_size), seed=int(cfg.seed), mixing=cfg.data.mixing
        )
        self.workdir = os.path.abspath(cfg.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        checkpoints = os.path.join(self.workdir, "checkpoints")
        if not cfg.checkpoint.resume:
            _start_over(checkpoints)
        self.manager = ocp.CheckpointManager(
            checkpoints,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=int(cfg.checkpoint.keep),
                create=True,
                enable_async_checkpointing=bool(cfg.checkpoint.async_save),
                cleanup_tmp_directories=True,
            ),
        )

    @contextlib.contextmanager
    def _context(self):
        """Mesh + logical rules for tracing (activation sharding constraints in the model)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    # -- checkpoints -----------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {"adapter_names": self.setup.adapter_names, "tasks": list(self.setup.train_data),
                "model_checkpoint": self.config.model_checkpoint, "config": _flat_config(self.config),
                "train_files": self.setup.train_files}

    def save(self, step: int) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(self.state),
                data=ocp.args.JsonSave(self.iterator.state_dict()),
                meta=ocp.args.JsonSave(self._meta()),
            ),
            force=True,
        )

    def maybe_restore(self) -> int | None:
        """Restores the latest complete train checkpoint (if resuming); returns its step."""
        if not self.config.checkpoint.resume:
            return None
        step = self.manager.latest_step()
        if step is None:
            return None
        where = f"checkpoint step {step} in {self.workdir}"
        start_over = "use another workdir, or --config.checkpoint.resume=False to start over"
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if meta.get("adapter_names") != self.setup.adapter_names:
            raise TrainError(
                f"checkpoint in {self.workdir} was trained with adapters {meta.get('adapter_names')}, "
                f"this run has {self.setup.adapter_names}; use another workdir"
            )
        tasks = list(self.setup.train_data)  # (without adapters: the data root's folders)
        if "tasks" in meta and meta["tasks"] != tasks:  # (older checkpoints do not record them)
            added, removed = [t for t in tasks if t not in meta["tasks"]], [t for t in meta["tasks"] if t not in tasks]
            raise TrainError(f"checkpoint in {self.workdir} was trained on the tasks {meta['tasks']}; data.root "
                             f"{self.config.data.root!r} now holds {tasks} (added {added}, removed {removed}): "
                             "give the data root it trained on, or use another workdir")
        changes = describe_changes(meta["config"], _flat_config(self.config)) if meta.get("config") else ""
        edited = [t for t, digest in meta.get("train_files", {}).items() if self.setup.train_files.get(t) != digest]
        edits = f"the train.jsonl of {edited} changed since the checkpoint was written" if edited else ""
        cause = "; ".join(filter(None, [changes and f"it was written by a run with other settings: {changes}", edits]))
        cause = cause or "it was probably trained for another model"
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, self.state_shardings
        )
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
            )
        except ValueError as e:  # e.g. gates of another model's shapes (orbax names the shapes)
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise TrainError(f"{where} cannot be restored for this run ({reason}); {cause}: {start_over}") from None
        try:
            self.iterator.load_state_dict(restored.data)
        except data_lib.DataError as e:
            raise TrainError(f"{where}: the data position does not fit this run ({e}); {cause}: {start_over}") from None
        if changes:
            warnings.warn(f"resuming from step {step} in {self.workdir}, written by a run with other settings: {changes}")
        if edited:
            warnings.warn(f"resuming from step {step} in {self.workdir}: {edits}; training continues from the saved "
                          "data position over the new files")
        self.state = restored.state
        return int(step)

    # -- eval ------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Loss and gate accuracy (overall, per task and per decoder layer) on the eval split; with
        MixLoRA experts, their balance loss and each expert's share of the choices (expert_share/e,
        1 / E each when balanced)."""
        cfg = self.config
        # Token-weighted: each metric over all the tokens it counts (`_AVERAGED_OVER`), and loss =
        # lm + coef * gate (+ aux * balance) of those, as one batch holding the whole eval set would
        # give (the balance loss: the token-weighted mean of the batches' values).
        sums, totals, vectors = {}, {}, {}
        for i, batch in enumerate(data_lib.eval_batches(self.setup.eval_data, int(cfg.train.eval_batch_size))):
            if cfg.train.eval_max_batches and i >= cfg.train.eval_max_batches:
                break
            with self._context():
                m = jax.device_get(self.eval_step(self.state.gates, self.frozen, sharding_lib.put_batch(batch, self.batch_sharding)))
            for k, count_key in _AVERAGED_OVER.items():
                if k in m:
                    sums[k] = sums.get(k, 0.0) + float(m[k]) * float(m[count_key])
            for k in set(_AVERAGED_OVER.values()) & m.keys():
                totals[k] = totals.get(k, 0.0) + float(m[k])
            for k in set(_GATE_SUMS + ("expert_tokens",)) & m.keys():
                vectors[k] = vectors.get(k, 0.0) + m[k]
        out = {k: v / max(totals[_AVERAGED_OVER[k]], 1.0) for k, v in sums.items()}
        out = _with_loss(out, float(cfg.train.loss_coef), float(cfg.train.router_aux_loss_coef))
        if "expert_tokens" in vectors:
            loads = np.asarray(vectors.pop("expert_tokens"))
            for e, share in enumerate(loads / max(loads.sum(), 1.0)):
                out[f"expert_share/{e}"] = float(share)
        if vectors:
            per_task = np.asarray(per_task_accuracy(jnp.asarray(vectors["gate_task_correct"]),
                                                    jnp.asarray(vectors["gate_task_count"])))
            for name, acc in zip(self.setup.adapter_names, np.atleast_1d(per_task)):
                out[f"gate_acc/{name}"] = float(acc)
            per_layer = np.asarray(per_task_accuracy(jnp.asarray(vectors["gate_layer_correct"]),
                                                     jnp.asarray(vectors["gate_layer_count"])))
            for i, acc in enumerate(np.atleast_1d(per_layer)):
                out[f"gate_acc_layer/{i}"] = float(acc)
        return out

    # -- loop ------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Trains to train.steps (resuming if a checkpoint exists). Returns a summary dict.

        summary: status ("done" | "interrupted"), step, resumed_from (the step of the checkpoint this
        run started from, or None), saved_step, signal (the number of the signal that interrupted
        the run, or None), train (last logged scalars), eval (last eval), history (every logged
        train/eval record), gates_dir (exported gates or None).
        """
        cfg = self.config
        total = int(cfg.train.steps)
        start = self.maybe_restore() or 0
        if start > total:
            raise TrainError(f"the checkpoint in {self.workdir} is at step {start}, past train.steps={total}: give "
                             f"train.steps >= {start}, or another workdir")
        metric_log = _MetricLog(self.workdir, cfg.logging, keep_up_to=start)
        history, last_train, last_eval = [], {}, {}
        eval_every, ckpt_every, log_every = int(cfg.train.eval_every), int(cfg.checkpoint.every), int(cfg.logging.every)
        saved_step = start if start else None
        status = "done"

        bar = None
        if cfg.logging.progress and jax.process_index() == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

        window: list[dict] = []
        t_window = time.perf_counter()
        pending: tuple[int, Any] | None = None  # (step, device metrics) not yet checked

        def check(step_metrics) -> dict:
            step_no, m = step_metrics
            m = jax.device_get(m)
            # A finite loss can come with an inf gradient (clipping then makes the update nan).
            if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                last = self.manager.latest_step()
                raise NonFiniteLossError(
                    f"loss is {float(m['loss'])}, grad_norm is {float(m['grad_norm'])} at step {step_no}; "
                    f"stopping. Last good checkpoint: "
                    f"{'step ' + str(last) if last is not None else 'none'} in {self.manager.directory}"
                )
            return m

        def flush_window(step_no: int) -> None:
            nonlocal window, t_window, last_train
            if not window:
                return
            now = time.perf_counter()
            scal = {k: float(np.mean([w[k] for w in window])) for k in window[0] if np.ndim(window[0][k]) == 0}
            scal["tokens_per_s"] = float(sum(w["gate_tokens"] for w in window)) / max(now - t_window, 1e-9)
            scal["lr"] = float(self.schedule(step_no - 1))
            for k in ("lm_tokens", "gate_tokens", "router_tokens"):
                scal.pop(k, None)
            last_train = scal
            history.append({"step": step_no, "split": "train", **scal})
            metric_log.write(step_no, "train", scal)
            if bar is not None:
                routing = {"gate_acc": scal["gate_acc_top1"]} if "gate_acc_top1" in scal else {}
                if "balance_loss" in scal:
                    routing["balance"] = scal["balance_loss"]
                bar.set_postfix(loss=f"{scal['loss']:.3f}", **{k: f"{v:.3f}" for k, v in routing.items()},
                                tok_s=f"{scal['tokens_per_s']:.0f}")
            window, t_window = [], now

        def run_eval(step_no: int) -> None:
            nonlocal last_eval
            if self.setup.eval_data is None:
                return
            last_eval = self.evaluate()
            history.append({"step": step_no, "split": "eval", **last_eval})
            metric_log.write(step_no, "eval", last_eval)
            shown = [k for k in last_eval if (k.startswith("gate_acc") and "layer/" not in k) or k in ("loss", "balance_loss")]
            layers = [v for k, v in last_eval.items() if k.startswith("gate_acc_layer/")]
            msg = " ".join(f"{k}={last_eval[k]:.3f}" for k in shown)
            if layers:  # per-layer values go to the metric log; the line shows their range
                msg += f" gate_acc_layer=[{min(layers):.3f}..{max(layers):.3f}]"
            shares = [v for k, v in last_eval.items() if k.startswith("expert_share/")]
            if shares:
                msg += f" expert_share=[{min(shares):.3f}..{max(shares):.3f}]"
            (bar.write if bar is not None else print)(f"eval step {step_no}: {msg}")

        try:
            with _StopRequest() as stop:
                step, stopped_by = start, None
                while step < total:
                    batch = sharding_lib.put_batch(next(self.iterator), self.batch_sharding)
                    with self._context():
                        self.state, metrics = self.train_step(self.state, self.frozen, batch)
                    step += 1
                    if pending is not None:
                        window.append(check(pending))
                    pending = (step, metrics)
                    at_end = step == total
                    due_log = step % log_every == 0 or at_end
                    due_ckpt = (ckpt_every and step % ckpt_every == 0) or at_end
                    due_eval = (eval_every > 0 and step % eval_every == 0) or (at_end and eval_every >= 0)
                    if due_log or due_ckpt or due_eval:
                        window.append(check(pending))
                        pending = None
                    if bar is not None:
                        bar.update(1)
                    if due_log:
                        flush_window(step)
                    if due_ckpt:
                        self.save(step)
                        saved_step = step
                    if due_eval and (at_end or stop.agreed() is None):  # a stopping run saves first
                        run_eval(step)
                    # Checked after the blocking work above: a signal that came during it stops
                    # here too, and the step is saved whatever was due.
                    stopped_by = None if at_end else stop.agreed(blocking=due_log or due_ckpt or due_eval)
                    if stopped_by is not None:
                        status = "interrupted"
                        if pending is not None:
                            window.append(check(pending))  # never save a non-finite state
                            pending = None
                        flush_window(step)
                        if saved_step != step:
                            self.save(step)
                            saved_step = step
                        msg = f"signal {signal.Signals(stopped_by).name}: saved step {step} in {self.manager.directory}"
                        (bar.write if bar is not None else print)(msg)
                        break
                if pending is not None:
                    window.append(check(pending))
                flush_window(step)
        finally:
            self.manager.wait_until_finished()
            if bar is not None:
                bar.close()
            metric_log.close()

        gates_dir = None
        if status == "done" and cfg.checkpoint.export_gates:
            gates_dir = export_gates(
                os.path.join(self.workdir, "gates"), self.state.gates, self.setup.adapter_names,
                run_settings(cfg, self.setup.model_config.mixlora)
            )
        return {
            "status": status,
            "step": step,
            "resumed_from": start or None,
            "saved_step": saved_step,
            "signal": stopped_by,  # set only where the loop stopped on it
            "train": last_train,
            "eval": last_eval,
            "history": history,
            "gates_dir": gates_dir,
        }

    def close(self):
        self.manager.close()


def train(config) -> dict:
    """prepare + Trainer.run: the whole job of `scripts/train.py`. Returns `Trainer.run`'s summary."""
    if config.distributed:
        jax.distributed.initialize()
    setup = prepare(config)
    trainer = Trainer(setup)
    try:
        return trainer.run()
    finally:
        trainer.close()
