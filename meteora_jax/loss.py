"""The masked joint loss of DESIGN.md section 5 and its gate metrics. Pure jnp, jit-friendly.

    loss = lm + coef * gate
    lm   = CE(logits[:, :-1], lm_labels[:, 1:]) averaged over lm_mask[:, 1:]
    gate = mean over every gate (layer x projection) of CE(gate_logits, gate_labels) averaged over
           gate_mask

Masks select tokens; padding (mask 0) contributes nothing, and an all-zero mask gives 0, not nan.
All reductions run in float32 whatever the logits dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

__all__ = ["gate_loss", "joint_loss", "lm_loss", "per_task_accuracy"]


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` where mask is 1, over all axes; 0 for an empty mask."""
    mask = mask.astype(jnp.float32)
    count = jnp.sum(mask)
    return jnp.sum(values * mask) / jnp.maximum(count, 1.0)


def lm_loss(
    logits: jax.Array,  # [B, S, V]
    lm_labels: jax.Array,  # [B, S] int
    lm_mask: jax.Array,  # [B, S], 1 on tokens to predict
) -> jax.Array:
    """Next-token cross-entropy: position t predicts token t+1, over lm_mask[:, 1:]. Scalar fp32."""
    # A masked position's label is not read: HF's ignore label -100 there made the loss NaN (NaN * 0).
    labels = jnp.where(lm_mask[:, 1:] > 0, lm_labels[:, 1:], 0)
    # Upcast before the log-softmax: bf16 log-probabilities lose the small ones.
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), labels)
    return _masked_mean(ce, lm_mask[:, 1:])


def _stack_gates(gate_logits: Mapping[str, jax.Array], batch: int, seq: int) -> jax.Array:
    """{proj: [n_layers, B, S, L] (or [n_layers, B*S, L])} -> [G, B, S, L] fp32, G = all gates."""
    parts = []
    for name in sorted(gate_logits):  # fixed order: the result must not depend on dict order
        x = gate_logits[name]
        parts.append(x.astype(jnp.float32).reshape(-1, batch, seq, x.shape[-1]))
    return jnp.concatenate(parts, axis=0)


def gate_loss(
    gate_logits: Mapping[str, jax.Array],  # {proj: [n_layers, B, S, L]}
    gate_labels: jax.Array,  # [B, S] int, adapter index of each token's task
    gate_mask: jax.Array,  # [B, S], 1 on non-padding tokens
    *,
    top_k: int = 2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over all gates of the masked gate cross-entropy, plus accuracy metrics.

    Metrics (accuracies averaged over every gate and masked token):
      gate_acc_top1, gate_acc_topk: scalars; `topk` = label among the `top_k` largest logits.
      gate_task_correct [L], gate_task_count [L]: top-1 hits and (gate x token) counts per label,
        to sum across batches; `per_task_accuracy` turns them into rates.
      gate_layer_correct [n_layers], gate_layer_count [n_layers]: the same per decoder layer (over
        the projections gated at that layer), to see where in depth the routing goes wrong.
    """
    batch, seq = gate_labels.shape
    mask = gate_mask.astype(jnp.float32)
    if not gate_logits:  # L = 0: a plain LLaMA has no gates to train
        zero = jnp.zeros((), jnp.float32)
        empty = jnp.zeros((0,), jnp.float32)
        metrics = {"gate_acc_top1": zero, "gate_acc_topk": zero}
        return zero, metrics | {k: empty for k in _GATE_SUMS}
    logits = _stack_gates(gate_logits, batch, seq)  # [G, B, S, L]
    n_gates, n_adapters = logits.shape[0], logits.shape[-1]
    labels = jnp.broadcast_to(jnp.where(mask > 0, gate_labels, 0), logits.shape[:-1])  # [G, B, S] (masked: unread)

    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [G, B, S]
    per_gate = jnp.sum(ce * mask, axis=(1, 2)) / jnp.maximum(jnp.sum(mask), 1.0)  # [G]
    loss = jnp.mean(per_gate)

    _, top_idx = jax.lax.top_k(logits, min(top_k, n_adapters))  # [G, B, S, k]
    hit_top1 = (top_idx[..., 0] == labels).astype(jnp.float32)  # ties resolved as argmax does
    hit_topk = jnp.any(top_idx == labels[..., None], axis=-1).astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(mask) * n_gates, 1.0)
    onehot = jax.nn.one_hot(gate_labels, n_adapters, dtype=jnp.float32)  # [B, S, L]
    layer_correct, layer_count = _per_layer(hit_top1, mask, [gate_logits[p].shape[0] for p in sorted(gate_logits)])
    metrics = {
        "gate_acc_top1": jnp.sum(hit_top1 * mask) / denom,
        "gate_acc_topk": jnp.sum(hit_topk * mask) / denom,
        "gate_task_correct": jnp.einsum("bs,bsl->l", jnp.sum(hit_top1, axis=0) * mask, onehot),
        "gate_task_count": jnp.einsum("bs,bsl->l", mask, onehot) * n_gates,
        "gate_layer_correct": layer_correct,
        "gate_layer_count": layer_count,
    }
    return loss, metrics


_GATE_SUMS = ("gate_task_correct", "gate_task_count", "gate_layer_correct", "gate_layer_count")


def _per_layer(hits: jax.Array, mask: jax.Array, layers_per_proj: list[int]) -> tuple[jax.Array, jax.Array]:
    """hits [G, B, S] (projection-major, as `_stack_gates`), mask [B, S] -> masked hit sums and
    (gate x token) counts per decoder layer, [max layers] each."""
    n_layers = max(layers_per_proj)
    correct = jnp.zeros((n_layers,), jnp.float32)
    count = jnp.zeros((n_layers,), jnp.float32)
    start = 0
    for n in layers_per_proj:
        correct = correct.at[:n].add(jnp.sum(hits[start : start + n] * mask, axis=(1, 2)))
        count = count.at[:n].add(jnp.sum(mask))
        start += n
    return correct, count


def per_task_accuracy(correct: jax.Array, count: jax.Array) -> jax.Array:
    """[L] sums -> [L] rates; nan for a task with no tokens (absent, not 'zero accuracy')."""
    return jnp.where(count > 0, correct / jnp.maximum(count, 1.0), jnp.nan)


def joint_loss(
    logits: jax.Array,  # [B, S, V]
    gate_logits: Mapping[str, jax.Array],  # {proj: [n_layers, B, S, L]}
    batch: Mapping[str, jax.Array],  # lm_labels, lm_mask, gate_labels, gate_mask: [B, S]
    coef: float = 50.0,
    top_k: int = 2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """loss = lm + coef * gate (coef = 50 as the original). Returns (loss, metrics).

    Metrics: loss, lm_loss, gate_loss, gate_acc_top1, gate_acc_topk, gate_task_correct [L],
    gate_task_count [L], lm_tokens (targets counted by the LM loss), gate_tokens. `top_k` is static
    under jit.
    """
    lm = lm_loss(logits, batch["lm_labels"], batch["lm_mask"])
    gate, metrics = gate_loss(gate_logits, batch["gate_labels"], batch["gate_mask"], top_k=top_k)
    loss = lm + coef * gate
    metrics.update(
        loss=loss,
        lm_loss=lm,
        gate_loss=gate,
        lm_tokens=jnp.sum(batch["lm_mask"][:, 1:].astype(jnp.float32)),
        gate_tokens=jnp.sum(batch["gate_mask"].astype(jnp.float32)),
    )
    return loss, metrics
