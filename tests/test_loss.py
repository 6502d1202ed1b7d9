"""meteora_jax.loss against explicit per-token loops in numpy (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax import loss as L

B, S, V, N_ADAPTERS = 3, 7, 11, 4
LAYERS = {"q_proj": 2, "down_proj": 3}  # projections with different layer counts: 5 gates in all


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, S, V)).astype(np.float32) * 3
    gates = {p: rng.normal(size=(n, B, S, N_ADAPTERS)).astype(np.float32) * 2 for p, n in LAYERS.items()}
    lengths = np.array([7, 5, 3])  # right padding after these many tokens
    valid = (np.arange(S)[None] < lengths[:, None]).astype(np.int32)
    lm_mask = valid.copy()
    lm_mask[:, :2] = 0  # a 2-token "prompt" that is not a target
    task = np.array([0, 2, 2])
    batch = {
        "lm_labels": rng.integers(0, V, size=(B, S)).astype(np.int32),
        "lm_mask": lm_mask,
        "gate_labels": np.repeat(task[:, None], S, axis=1).astype(np.int32),
        "gate_mask": valid,
    }
    return logits, gates, batch


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def _reference(logits, gates, batch, coef, top_k):
    lm_terms = []
    for b in range(B):
        for t in range(S - 1):
            if batch["lm_mask"][b, t + 1]:
                lm_terms.append(-_log_softmax(logits[b, t])[batch["lm_labels"][b, t + 1]])
    lm = np.mean(lm_terms) if lm_terms else 0.0

    per_gate, top1, topk = [], [], []
    task_correct, task_count = np.zeros(N_ADAPTERS), np.zeros(N_ADAPTERS)
    n_layers = max(g.shape[0] for g in gates.values())
    layer_correct, layer_count = np.zeros(n_layers), np.zeros(n_layers)
    for proj in sorted(gates):
        for layer in range(gates[proj].shape[0]):
            terms = []
            for b in range(B):
                for t in range(S):
                    if not batch["gate_mask"][b, t]:
                        continue
                    g, y = gates[proj][layer, b, t], batch["gate_labels"][b, t]
                    terms.append(-_log_softmax(g)[y])
                    order = sorted(range(N_ADAPTERS), key=lambda i: -g[i])
                    top1.append(order[0] == y)
                    topk.append(y in order[:top_k])
                    task_correct[y] += order[0] == y
                    task_count[y] += 1
                    layer_correct[layer] += order[0] == y
                    layer_count[layer] += 1
            per_gate.append(np.mean(terms))
    gate = np.mean(per_gate)
    return {
        "loss": lm + coef * gate,
        "lm_loss": lm,
        "gate_loss": gate,
        "gate_acc_top1": np.mean(top1),
        "gate_acc_topk": np.mean(topk),
        "gate_task_correct": task_correct,
        "gate_task_count": task_count,
        "gate_layer_correct": layer_correct,
        "gate_layer_count": layer_count,
        "lm_tokens": len(lm_terms),
        "gate_tokens": batch["gate_mask"].sum(),
    }


@pytest.mark.parametrize("top_k", [1, 2])
def test_joint_loss_matches_hand_computation(top_k):
    logits, gates, batch = _batch()
    expect = _reference(logits, gates, batch, coef=50.0, top_k=top_k)
    loss, metrics = L.joint_loss(logits, gates, batch, coef=50.0, top_k=top_k)
    np.testing.assert_allclose(float(loss), expect["loss"], rtol=1e-5)
    assert set(expect) <= set(metrics)
    for k, v in expect.items():
        np.testing.assert_allclose(np.asarray(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
    # Sanity of the reference itself: the batch has absent tasks and both hits and misses.
    assert expect["gate_task_count"][1] == 0 and 0 < expect["gate_acc_top1"] < 1
    acc = L.per_task_accuracy(metrics["gate_task_correct"], metrics["gate_task_count"])
    assert np.isnan(acc[1]) and np.isnan(acc[3])
    np.testing.assert_allclose(acc[0], expect["gate_task_correct"][0] / expect["gate_task_count"][0], rtol=1e-6)


@pytest.mark.parametrize("pad_label", ["random", -100])
def test_padding_changes_nothing(pad_label):
    """Padding positions (masks 0) change no value, whatever their logits and labels: -100 is HF's
    ignore label, which made the loss NaN (an out-of-range label's cross-entropy times a mask of 0)."""
    logits, gates, batch = _batch(seed=1)
    _, base = L.joint_loss(logits, gates, batch)
    rng = np.random.default_rng(5)
    pad = 4  # extra positions at the end of every row, with arbitrary content and masks 0
    p_logits = np.concatenate([logits, rng.normal(size=(B, pad, V)).astype(np.float32) * 10], axis=1)
    p_gates = {
        k: np.concatenate([g, rng.normal(size=(*g.shape[:2], pad, N_ADAPTERS)).astype(np.float32) * 10], axis=2)
        for k, g in gates.items()
    }
    label = lambda high: rng.integers(0, high, size=(B, pad)) if pad_label == "random" else np.full((B, pad), pad_label)  # noqa: E731
    p_batch = {
        "lm_labels": np.concatenate([batch["lm_labels"], label(V)], axis=1).astype(np.int32),
        "lm_mask": np.pad(batch["lm_mask"], ((0, 0), (0, pad))),
        "gate_labels": np.concatenate([batch["gate_labels"], label(N_ADAPTERS)], axis=1).astype(np.int32),
        "gate_mask": np.pad(batch["gate_mask"], ((0, 0), (0, pad))),
    }
    _, padded = L.joint_loss(p_logits, p_gates, p_batch)
    for k in base:
        np.testing.assert_allclose(np.asarray(padded[k]), np.asarray(base[k]), rtol=1e-6, atol=1e-6, err_msg=k)
    # and the gradient reaching the logits is finite (it is zero at the padding)
    grads = jax.grad(lambda lg, g: L.joint_loss(lg, g, p_batch)[0], argnums=(0, 1))(p_logits, p_gates)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(grads))


def test_empty_masks_are_zero_not_nan():
    logits, gates, batch = _batch()
    empty = {k: (np.zeros_like(v) if k.endswith("mask") else v) for k, v in batch.items()}
    loss, m = L.joint_loss(logits, gates, empty)
    assert float(loss) == 0.0 and float(m["lm_loss"]) == 0.0 and float(m["gate_acc_top1"]) == 0.0
    assert float(m["lm_tokens"]) == 0.0 and np.all(np.asarray(m["gate_task_count"]) == 0)


def test_bf16_logits_are_reduced_in_float32():
    logits, gates, batch = _batch(seed=2)
    lb = jnp.asarray(logits, jnp.bfloat16)
    got = L.lm_loss(lb, batch["lm_labels"], batch["lm_mask"])
    assert got.dtype == jnp.float32
    # Reference on the same bf16-rounded values, in float64: only fp32 rounding may differ.
    expect = _reference(np.asarray(lb.astype(jnp.float32)), gates, batch, 50.0, 2)["lm_loss"]
    np.testing.assert_allclose(float(got), expect, rtol=1e-6)


def test_jit_and_flat_token_layout():
    logits, gates, batch = _batch(seed=3)
    eager, m_eager = L.joint_loss(logits, gates, batch, coef=7.0, top_k=2)
    jitted = jax.jit(L.joint_loss, static_argnames="top_k")
    loss, m = jitted(logits, gates, batch, 7.0, top_k=2)
    np.testing.assert_allclose(float(loss), float(eager), rtol=1e-6)
    # Gate logits as routing returns them per layer, tokens flattened: [n_layers, B*S, L].
    flat = {k: g.reshape(g.shape[0], B * S, N_ADAPTERS) for k, g in gates.items()}
    loss_flat, _ = L.joint_loss(logits, flat, batch, coef=7.0, top_k=2)
    np.testing.assert_allclose(float(loss_flat), float(eager), rtol=1e-6)
    np.testing.assert_allclose(float(m["gate_acc_topk"]), float(m_eager["gate_acc_topk"]), rtol=1e-6)


def test_gradient_reaches_gate_logits_only_where_masked():
    logits, gates, batch = _batch(seed=4)

    def f(g):
        return L.joint_loss(logits, g, batch)[0]

    grads = jax.grad(f)({k: jnp.asarray(v) for k, v in gates.items()})
    pad = batch["gate_mask"] == 0
    for g in grads.values():
        g = np.asarray(g)
        assert np.all(g[:, pad] == 0)
        assert np.all(np.abs(g[:, ~pad]).sum(-1) > 0)
