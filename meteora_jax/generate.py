"""Batched KV-cache generation: left-padded prompts, one prefill, then a jitted decode loop.

    gen = Generator(config, params, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=0)
    out = gen.generate([[1, 17, 42], [1, 5]], max_new_tokens=32)               # greedy
    out = gen.generate(prompts, max_new_tokens=32, temperature=0.8, top_p=0.9, seed=1)
    out = gen.generate(prompts, routing_temperature=15.0)                       # composite prompts
    out = gen.generate(prompts, force_adapter=2)                                # PEFT-style baseline
    out = gen.generate(prompts, return_routing=True)                            # for routing pictures
    out.sequences()   # [[generated ids, EOS excluded], ...]
    out.routing[b]    # [P_b + n_b, num_layers, num_projections] top-1 adapter of every token

Shapes are bucketed (batch and prompt length to powers of two, `max_new_tokens` to a power of two
up to 256 and to multiples of 128 beyond; see `bucket_length`), and prefill plus the whole decode
loop (`jax.lax.while_loop`) live in one `jax.jit`: a new prompt length, a new `max_new_tokens`,
temperature, top-p, seed, routing temperature or forced adapter within a bucket reuses the
compiled program. `Generator.num_traces` counts the traces (= compilations).

Layout: the generator takes params in the scanned (checkpoint) layout and, by default, converts
them once to the unrolled one (`meteora_jax.model.unstack_layers`), where every layer's weights are
separate arguments that XLA reads in place instead of slicing them out of stacked arrays at every
decode step, and then to the fused one (`meteora_jax.fused_layout`), where the projections that
share an input run as one GEMM with the MeteoRA deltas folded in. `fused_projections=False` keeps
the separate projections; `scan_layers=True` keeps the scanned model.

Padding: prompts are left-padded into [B, P]; a prompt's positions are `cumsum(mask) - 1`, so a
left-padded row sees exactly the positions it would alone. Rows stop independently at any EOS id
(the EOS is kept in `tokens`, later slots hold `pad_token_id`); the loop ends when every row has
stopped or after `max_new_tokens`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from meteora_jax.config import ALL_PROJECTIONS, DTYPES, MixLoRAConfig, ModelConfig
from meteora_jax.fused_layout import fuse_projections
from meteora_jax.gates import (GATE_SETTINGS_FILE, MIXLORA_LEAVES, check_gates_fit, load_gate_settings, load_gates,
                               merge_params)
from meteora_jax.model import KVCache, LlamaForCausalLM, init_params, unstack_layers
from meteora_jax.routing import Routing
from pallas_kernels.routed_lora import check_routing_temperature

__all__ = [
    "CliOptions",
    "GenerationOutput",
    "Generator",
    "add_inference_arguments",
    "bucket_length",
    "cli_options",
    "encode_prompt",
    "encode_turns",
    "generator_for_cli",
    "generator_from_args",
    "load_for_inference",
    "resolve_force_adapter",
    "sample_token",
    "token_routing",
]


def bucket_length(n: int, minimum: int = 16) -> int:
    """The compiled length for `n`: the next power of two >= max(n, minimum) up to 256, then the
    next multiple of 128 (so long prompts waste at most 127 slots)."""
    n = max(int(n), int(minimum), 1)
    if n <= 256:
        return 1 << (n - 1).bit_length()
    return -(-n // 128) * 128


def sample_token(
    logits: jax.Array,  # [B, V] float32
    rng: jax.Array,  # a PRNG key
    temperature: jax.Array,  # [] > 0
    top_p: jax.Array,  # [] in (0, 1]
) -> jax.Array:  # [B] int32
    """Samples from softmax(logits / temperature) restricted to the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p` (the
    most likely token is always in it, so top_p -> 0 is greedy).
    """
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    keep = keep.at[:, 0].set(True)
    # The smallest kept logit is the cut-off (ties with it stay in).
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    masked = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    return jax.random.categorical(rng, masked, axis=-1).astype(jnp.int32)


def _projections(config: ModelConfig) -> tuple[str, ...]:
    return tuple(p for p in ALL_PROJECTIONS if config.meteora.adapts(p))


def _top1(gate_logits: dict, projections: tuple[str, ...]) -> jax.Array:
    """{proj: [n_layers, B, S, L]} -> [B, S, n_layers, n_proj] int32 top-1 adapter."""
    stacked = jnp.stack([jnp.argmax(gate_logits[p], axis=-1) for p in projections], axis=-1)
    return jnp.transpose(stacked, (1, 2, 0, 3)).astype(jnp.int32)


def _top1_expert(router_logits: jax.Array) -> jax.Array:
    """MixLoRA's router logits [n_layers, B, S, E] -> [B, S, n_layers] int32 top-1 expert."""
    return jnp.transpose(jnp.argmax(router_logits, axis=-1), (1, 2, 0)).astype(jnp.int32)


@dataclasses.dataclass
class GenerationOutput:
    """What `Generator.generate` returns (numpy, one row per prompt)."""

    tokens: np.ndarray  # [B, N] int32 generated ids; after a row's EOS (kept) or N: pad_token_id
    lengths: np.ndarray  # [B] generated tokens per row, EOS included
    finished: np.ndarray  # [B] bool: the row stopped at an EOS
    prompt_lengths: np.ndarray  # [B]
    logits: Optional[np.ndarray] = None  # [B, N, V] float32: the logits each token was chosen from
    routing: Optional[list[np.ndarray]] = None  # per row [P_b + n_b, n_layers, n_proj] top-1 adapter
    projections: tuple[str, ...] = ()  # names of the last routing axis
    expert_routing: Optional[list[np.ndarray]] = None  # per row [P_b + n_b, n_layers] top-1 MixLoRA expert

    def sequences(self, include_eos: bool = False) -> list[list[int]]:
        """Generated ids of each row, without padding (and without the EOS unless asked)."""
        out = []
        for row, n, fin in zip(self.tokens, self.lengths, self.finished):
            keep = int(n) if (include_eos or not fin) else int(n) - 1
            out.append([int(t) for t in row[:keep]])
        return out


def inference_params(params: Any, config: ModelConfig, *, scan_layers: bool, fused_projections: bool) -> Any:
    """Scanned-layout params converted on the device to the layout a `Generator` runs: unrolled
    (`unstack_layers`) unless scan_layers, then fused (`fuse_projections`) if fused_projections."""
    if not scan_layers:
        params = jax.jit(unstack_layers, static_argnums=1)(params, config.num_layers)
    return fuse_projections(params, config) if fused_projections else params


class Generator:
    """Jitted batched generation for one model (config + params)."""

    def __init__(
        self,
        config: ModelConfig,
        params: Any,
        *,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int = 0,
        min_prompt_bucket: int = 16,
        min_new_tokens_bucket: int = 16,
        max_prefill_logits_bytes: int = 1 << 30,
        scan_layers: bool = False,
        fused_projections: Optional[bool] = None,
        compiler_options: Optional[dict[str, Any]] = None,
    ):
        """params: the scanned layout (as checkpoints and training hold them).

        max_prefill_logits_bytes: when the prefill's [B, P, V] float32 logits would exceed it,
        the prompt is prefilled in two calls (all but the last token, whose logits XLA then never
        computes, and the last token), so a long batched prefill does not hold all vocabulary logits.
        scan_layers: False (default) converts `params` once, on the device, to the unrolled layout
        and keeps only that copy (`self.params`); True runs the scanned model on `params` as given.
        fused_projections: the fused projection layout (`meteora_jax.fused_layout`) on top of the
        unrolled one; default: True unless scan_layers.
        compiler_options: XLA options for the generation program (`jax.jit(compiler_options=...)`),
        e.g. {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS"}; an unknown name fails at the first
        compile.
        """
        self.config = config
        self.scan_layers = bool(scan_layers)
        self.fused_projections = not self.scan_layers if fused_projections is None else bool(fused_projections)
        if self.scan_layers and self.fused_projections:
            raise ValueError("fused_projections needs the unrolled layout (scan_layers=False)")
        self.params = inference_params(params, config, scan_layers=self.scan_layers,
                                       fused_projections=self.fused_projections)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids if t is not None)
        self.pad_token_id = int(pad_token_id)
        if not 0 <= self.pad_token_id < config.vocab_size:  # past the embedding it reads NaN (every padded row)
            raise ValueError(f"pad_token_id={self.pad_token_id} is outside the model's vocabulary "
                             f"[0, {config.vocab_size})")
        self.min_prompt_bucket = int(min_prompt_bucket)
        self.min_new_tokens_bucket = int(min_new_tokens_bucket)
        self.max_prefill_logits_bytes = int(max_prefill_logits_bytes)
        self.projections = _projections(config)
        self.num_traces = 0
        layout = dict(scan_layers=self.scan_layers, fused_projections=self.fused_projections)
        self._fast = LlamaForCausalLM(config, collect_gate_logits=False, **layout)
        self._routed = LlamaForCausalLM(config, collect_gate_logits=True, **layout)
        self._jitted = jax.jit(
            self._generate,
            static_argnames=("max_new_bucket", "do_sample", "collect_routing", "return_logits", "split_prefill"),
            compiler_options=compiler_options,
        )

    # ------------------------------------------------------------------------------------------
    # The traced program

    def _generate(
        self,
        params,
        input_ids,  # [B, P] int32, left-padded
        attention_mask,  # [B, P] bool
        num_rows,  # [] int32: rows past it fill the batch bucket and start done
        max_new_tokens,  # [] int32 <= max_new_bucket
        temperature,  # [] float32
        top_p,  # [] float32
        rng,  # PRNG key
        routing: Routing,
        eos_ids,  # [E] int32
        *,
        max_new_bucket: int,
        do_sample: bool,
        collect_routing: bool,
        return_logits: bool,
        split_prefill: bool,
    ):
        self.num_traces += 1  # Python side effect: runs once per trace, never per call
        cfg = self.config
        model = self._routed if collect_routing else self._fast
        variables = {"params": params}
        batch, prompt_len = input_ids.shape
        pad = jnp.int32(self.pad_token_id)
        mask = attention_mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
        n_prompt = jnp.sum(mask, axis=-1).astype(jnp.int32)
        cache = KVCache.init(cfg, batch, prompt_len + max_new_bucket, per_layer=not self.scan_layers)

        def is_eos(tok):
            return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

        def choose(logits, key):
            if do_sample:
                return sample_token(logits, key, temperature, top_p)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)

        # Prefill.
        if split_prefill and prompt_len > 1:
            head = model.apply(
                variables, input_ids[:, :-1], mask[:, :-1], positions[:, :-1], cache, routing=routing
            )
            last = model.apply(
                variables, input_ids[:, -1:], mask[:, -1:], positions[:, -1:], head.cache, routing=routing
            )
            # (gate logits [n_layers, B, S, L], router logits [n_layers, B, S, E]: S is axis 2)
            gate_logits, router_logits = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=2),
                                                      (head.gate_logits, head.router_logits),
                                                      (last.gate_logits, last.router_logits))
            cache, last_logits = last.cache, last.logits[:, -1]
        else:
            out = model.apply(variables, input_ids, mask, positions, cache, routing=routing)
            gate_logits, router_logits, cache, last_logits = out.gate_logits, out.router_logits, out.cache, out.logits[:, -1]

        rng, key = jax.random.split(rng)
        first = choose(last_logits, key)
        n_buf = max_new_bucket + 1  # slot N takes the token sampled after the last one (dropped)
        tokens = jnp.full((batch, n_buf), pad, jnp.int32).at[:, 0].set(first)
        # Filler rows start done: sampled, they would otherwise keep the loop running after every real row stopped.
        filler = jnp.arange(batch) >= num_rows
        state = dict(i=jnp.int32(0), tok=first, done=filler, cache=cache, tokens=tokens, rng=rng)
        if return_logits:
            state["logits"] = jnp.zeros((batch, n_buf, cfg.vocab_size), jnp.float32).at[:, 0].set(last_logits)
        adapters, experts = collect_routing and bool(self.projections), collect_routing and router_logits is not None
        if adapters:
            prompt_routing = jnp.where(mask[:, :, None, None], _top1(gate_logits, self.projections), -1)
            state["routing"] = jnp.full((batch, n_buf, cfg.num_layers, len(self.projections)), -1, jnp.int32)
        if experts:
            prompt_experts = jnp.where(mask[:, :, None], _top1_expert(router_logits), -1)
            state["expert_routing"] = jnp.full((batch, n_buf, cfg.num_layers), -1, jnp.int32)

        # With routing pictures every generated token is also fed once (its routing is recorded);
        # otherwise the last one never needs a forward pass.
        limit = max_new_tokens - 1 + int(collect_routing)

        def cond(s):
            stopped = s["done"] if collect_routing else s["done"] | is_eos(s["tok"])
            return (s["i"] < limit) & ~jnp.all(stopped)

        def body(s):
            i, tok = s["i"], s["tok"]
            out = model.apply(
                variables,
                tok[:, None],
                jnp.ones((batch, 1), bool),
                (n_prompt + i)[:, None],
                s["cache"],
                routing=routing,
            )
            new = dict(s)
            if adapters:
                top1 = jnp.where(s["done"][:, None, None], -1, _top1(out.gate_logits, self.projections)[:, 0])
                new["routing"] = jax.lax.dynamic_update_index_in_dim(s["routing"], top1, i, axis=1)
            if experts:
                top1 = jnp.where(s["done"][:, None], -1, _top1_expert(out.router_logits)[:, 0])
                new["expert_routing"] = jax.lax.dynamic_update_index_in_dim(s["expert_routing"], top1, i, axis=1)
            done = s["done"] | is_eos(tok)
            rng, key = jax.random.split(s["rng"])
            nxt = jnp.where(done, pad, choose(out.logits[:, 0], key))
            new["tokens"] = jax.lax.dynamic_update_index_in_dim(s["tokens"], nxt, i + 1, axis=1)
            if return_logits:
                new["logits"] = jax.lax.dynamic_update_index_in_dim(s["logits"], out.logits[:, 0], i + 1, axis=1)
            new.update(i=i + 1, tok=nxt, done=done, cache=out.cache, rng=rng)
            return new

        state = jax.lax.while_loop(cond, body, state)
        in_range = jnp.arange(max_new_bucket) < max_new_tokens
        result = {"tokens": jnp.where(in_range[None], state["tokens"][:, :max_new_bucket], pad)}
        if return_logits:
            result["logits"] = state["logits"][:, :max_new_bucket]
        if adapters:
            result["prompt_routing"] = prompt_routing
            result["routing"] = state["routing"][:, :max_new_bucket]
        if experts:
            result["prompt_expert_routing"] = prompt_experts
            result["expert_routing"] = state["expert_routing"][:, :max_new_bucket]
        return result

    # ------------------------------------------------------------------------------------------
    # Host side

    def check_prompts(self, prompts, max_new_tokens: int) -> list[list[int]]:
        """Everything `generate` checks of its prompts (their form, token ids, lengths with
        max_new_tokens), without generating: raises ValueError; returns the unpadded rows."""
        rows = self._rows(prompts)
        self.check_lengths(rows, max_new_tokens)
        return rows

    def _pack(self, prompts) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
        """Prompts (lists of ids, or (ids [B, P], mask [B, P]) padded either side) -> left-padded
        bucketed arrays and the unpadded rows."""
        rows = self._rows(prompts)
        batch = bucket_length(len(rows), minimum=1)
        length = bucket_length(max(len(r) for r in rows), self.min_prompt_bucket)
        ids = np.full((batch, length), self.pad_token_id, np.int32)
        mask = np.zeros((batch, length), bool)
        for b in range(batch):
            r = rows[b] if b < len(rows) else rows[0]  # filler rows repeat the first prompt
            ids[b, length - len(r) :] = r
            mask[b, length - len(r) :] = True
        return ids, mask, rows

    def _rows(self, prompts) -> list[list[int]]:
        """Prompts (as `_pack` takes them) -> validated unpadded rows of token ids."""
        if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
            ids, mask = np.asarray(prompts[0]), np.asarray(prompts[1]).astype(bool)
            if ids.shape != mask.shape:
                raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must have one shape [B, P]")
            rows = [r[m] for r, m in zip(ids, mask)]
        elif isinstance(prompts, (str, bytes)) or any(np.ndim(p) != 1 or isinstance(p, (str, bytes)) for p in prompts):
            raise ValueError("prompts must be a list of token-id lists (encode text first: `encode_prompt`), "
                             "or an (input_ids [B, P], attention_mask [B, P]) pair")
        else:
            rows = [np.asarray(p) for p in prompts]
        if not rows:
            raise ValueError("no prompts given")
        if any(len(r) == 0 for r in rows):
            raise ValueError("every prompt needs at least one token")
        for r in rows:  # an id past the embedding reads NaN, silently
            if not np.issubdtype(r.dtype, np.integer) or r.min() < 0 or r.max() >= self.config.vocab_size:
                bad = r if not np.issubdtype(r.dtype, np.integer) else r[(r < 0) | (r >= self.config.vocab_size)]
                raise ValueError(f"prompt token {bad[0].item()!r} is not an id in the model's vocabulary "
                                 f"[0, {self.config.vocab_size})")
        return [[int(t) for t in r] for r in rows]

    def check_lengths(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """Raises ValueError if the longest prompt (token ids) plus max_new_tokens exceeds the model's
        positions."""
        longest = max((len(p) for p in prompts), default=0)
        if longest + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )

    def device_call(
        self,
        prompts,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | jax.Array = 0,
        routing_temperature: float = 1.0,
        force_adapter: Optional[int] = None,
        return_routing: bool = False,
        return_logits: bool = False,
        eos_token_ids: Optional[Sequence[int]] = None,
    ):
        """The compiled program bound to its (device-resident) inputs: returns `(run, rows, eos)`
        where `run()` executes prefill + decode and returns the device outputs without waiting or
        copying them to the host (for benchmarks: `jax.block_until_ready(run())`). Arguments as
        `generate`."""
        check_sampling_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               routing_temperature=routing_temperature)
        L = self.config.meteora.num_adapters
        if return_routing and L == 0 and not self.config.mixlora.num_experts:
            raise ValueError("return_routing needs a model with adapters (num_adapters > 0) or MixLoRA experts")
        eos = self.eos_token_ids if eos_token_ids is None else tuple(int(t) for t in eos_token_ids)
        ids, mask, rows = self._pack(prompts)
        self.check_lengths(rows, max_new_tokens)
        forced = None if force_adapter is None else Routing.force_adapter(force_adapter, L).forced_weights
        routing = Routing(temperature=jnp.float32(routing_temperature), forced_weights=forced)
        rng = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
        batch, plen = ids.shape
        split = batch * plen * self.config.vocab_size * 4 > self.max_prefill_logits_bytes
        args = (
            self.params,
            jnp.asarray(ids),
            jnp.asarray(mask),
            jnp.int32(len(rows)),
            jnp.int32(max_new_tokens),
            jnp.float32(max(temperature, 0.0)),
            jnp.float32(top_p),
            rng,
            routing,
            jnp.asarray(eos or (-1,), jnp.int32),
        )
        static = dict(
            max_new_bucket=bucket_length(max_new_tokens, self.min_new_tokens_bucket),
            do_sample=temperature > 0,
            collect_routing=bool(return_routing),
            return_logits=bool(return_logits),
            split_prefill=bool(split),
        )
        return (lambda: self._jitted(*args, **static)), rows, eos

    def generate(self, prompts, *, max_new_tokens: int = 64, **options) -> GenerationOutput:
        """Generates up to `max_new_tokens` for each prompt.

        prompts: a list of token-id lists (any lengths), or `(input_ids [B, P], attention_mask
          [B, P])` padded on either side.
        temperature (0.0): 0 is greedy; > 0 samples (with the `top_p` (1.0) nucleus) from a PRNG
          key made from `seed` (an int or a key).
        routing_temperature (1.0): the gate softmax temperature (MeteoRA); force_adapter (None):
          route every token to that adapter with weight 1.
        return_routing (False): also return the gate's top-1 adapter of every prompt and generated
          token per layer and projection (computed even when routing is forced), and with MixLoRA
          experts the router's top-1 expert per layer (`expert_routing`).
        return_logits (False): also return the logits each generated token was chosen from.
        eos_token_ids (None): overrides the generator's EOS ids for this call (same count: no
          recompilation).
        """
        if options.get("temperature", 0.0) == 0 and options.get("top_p", 1.0) < 1:  # (told once, at the caller)
            warnings.warn(f"top_p={options['top_p']} has no effect with temperature=0 (greedy decoding): set a "
                          "temperature > 0 to sample from the nucleus", UserWarning, stacklevel=2)
        run, rows, eos = self.device_call(prompts, max_new_tokens=max_new_tokens, **options)
        result = jax.device_get(run())
        n = len(rows)
        tokens = np.asarray(result["tokens"][:n, :max_new_tokens])
        is_eos = np.isin(tokens, eos) if eos else np.zeros_like(tokens, bool)
        finished = is_eos.any(axis=1)
        lengths = np.where(finished, is_eos.argmax(axis=1) + 1, max_new_tokens).astype(np.int32)
        out = GenerationOutput(
            tokens=tokens,
            lengths=lengths,
            finished=finished,
            prompt_lengths=np.array([len(r) for r in rows], np.int32),
            projections=self.projections,
        )
        if "logits" in result:
            out.logits = np.asarray(result["logits"][:n, :max_new_tokens])

        def per_row(prompt_part, generated):  # each row's prompt (left-padded) and its generated tokens
            plen = prompt_part.shape[1]
            return [np.concatenate([prompt_part[b, plen - len(rows[b]) :], generated[b, : lengths[b]]]) for b in range(n)]

        if "routing" in result:
            out.routing = per_row(result["prompt_routing"], result["routing"])
        if "expert_routing" in result:
            out.expert_routing = per_row(result["prompt_expert_routing"], result["expert_routing"])
        return out


# ----------------------------------------------------------------------------------------------
# Helpers shared by the CLIs, evaluation and pictures


@functools.lru_cache(maxsize=8)
def _routing_forward(config: ModelConfig):
    model = LlamaForCausalLM(config, collect_gate_logits=True)
    projections = _projections(config)

    @jax.jit
    def forward(params, ids, routing):
        out = model.apply({"params": params}, ids, routing=routing)
        return _top1(out.gate_logits, projections)[0]

    return forward


def token_routing(
    config: ModelConfig,
    params: Any,
    token_ids: Sequence[int],
    routing: Routing = Routing(),
) -> np.ndarray:  # [T, n_layers, n_proj] int32
    """Top-1 adapter of every token of one sequence (e.g. a prompt + a reference answer) per layer
    and projection, from one full forward pass. Projections in `ALL_PROJECTIONS` order."""
    if config.meteora.num_adapters == 0:
        raise ValueError("token_routing needs a model with adapters (num_adapters > 0)")
    ids = jnp.asarray([list(token_ids)], jnp.int32)
    check_routing_temperature(routing.temperature)  # concrete here; traced (unchecked) under the jit below
    routing = Routing(temperature=jnp.float32(routing.temperature), forced_weights=routing.forced_weights)
    return np.asarray(_routing_forward(config)(params, ids, routing))


def encode_prompt(tokenizer, prompt: str, *, chat_template: bool | None = None) -> list[int]:
    """Token ids that a model trained on `meteora_jax.data` examples continues with the response.

    chat_template: True renders a user turn plus the generation prompt (as training with
    `data.chat_template`); False is [BOS if the tokenizer adds one] + prompt; None uses the
    template when the tokenizer has one.
    """
    return encode_turns(tokenizer, [prompt], [], chat_template=chat_template)


def uses_chat_template(tokenizer, chat_template: bool | None) -> bool:
    """Whether prompts are rendered with the chat template: as given, or (None) when the
    tokenizer has one."""
    return bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else bool(chat_template)


def encode_turns(
    tokenizer, prompts: Sequence[str], answers: Sequence[str], *, chat_template: bool | None = None
) -> list[int]:
    """Token ids of one conversation: prompts[i] answered by answers[i] for every earlier turn, then
    the last prompt awaiting its answer (len(answers) == len(prompts) - 1; one prompt and no answers
    is `encode_prompt`).

    With a chat template: alternating user / assistant turns plus the generation prompt. Without
    one: the turns as training examples would be, back to back ([BOS] p1 a1 EOS p2 a2 EOS ... pn).
    """
    if len(answers) != len(prompts) - 1:
        raise ValueError(f"{len(prompts)} prompts need {len(prompts) - 1} earlier answers, got {len(answers)}")
    chat_template = uses_chat_template(tokenizer, chat_template)
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        messages = []
        for p, a in zip(prompts, answers):
            messages += [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": prompts[-1]})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    from meteora_jax.data import tokenizer_adds_bos  # imports `datasets`: kept off the benchmark path

    def ids(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    out = ([tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []) + ids(prompts[0])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for a, p in zip(answers, prompts[1:]):
        out += ids(a) + eos + ids(p)
    return out


def eos_ids_of(tokenizer) -> list[int]:
    """The tokenizer's EOS id plus, for chat templates, the end-of-turn token if it has one."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def load_for_inference(
    checkpoint: str,
    gates: Optional[str] = None,
    *,
    dtype: Optional[str] = None,
    top_k: Optional[int] = None,
) -> tuple[Any, ModelConfig, list[str]]:
    """(params, config, adapter_names) from a model checkpoint (`meteora_jax.checkpoint`), with
    trained gates (a `gates/` folder written by training) merged in when given. The params keep
    the scanned layout; `Generator` converts them for generation.

    With gates, the config routes as the training run did: its top_k and compute dtype (recorded
    with the gates, see `meteora_jax.train.run_settings`) replace the checkpoint's. Explicit
    `dtype` / `top_k` arguments (MeteoRA's top_k) win over both. Gates of a run that trained
    MixLoRA experts carry them and their settings: the config gets those experts.
    """
    from meteora_jax.checkpoint import abstract_params, adapter_names, model_config_of, read_metadata, restore_checkpoint

    # Everything that can be wrong is checked on the metadata, before the weights are read.
    metadata = read_metadata(checkpoint)
    config, names = model_config_of(checkpoint, metadata), adapter_names(metadata)
    if top_k is not None and not names:  # (it changed nothing: MixLoRA's top_k is its export's)
        raise ValueError(f"top_k={top_k} routes MeteoRA's adapters, and the checkpoint {checkpoint!r} has none")
    if gates:
        gate_tree, gate_names = load_gates(gates)
        if names and list(gate_names) != names:
            raise ValueError(f"gates in {gates!r} are for adapters {gate_names}, the checkpoint has {names}")
        settings = load_gate_settings(gates)
        abstract = abstract_params(metadata)
        if "mixlora" in settings:  # experts the training run added: the checkpoint lacks them
            config = _with_mixlora(config, settings["mixlora"], gates)
            abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
        experts = any(key[-1] in MIXLORA_LEAVES for key in traverse_util.flatten_dict(gate_tree))
        if experts and not config.mixlora.num_experts:  # (else: "the checkpoint has no expert_lora_a")
            settings_path = os.path.join(gates, GATE_SETTINGS_FILE)
            problem = "has no 'mixlora' experts" if os.path.exists(settings_path) else "is missing"
            raise ValueError(f"gates in {gates!r} hold MixLoRA experts, and {settings_path}, which says how they were "
                             f"built, {problem}")
        check_gates_fit(gate_tree, abstract, repr(gates))
        if dtype is None:
            dtype = settings.get("dtype")
        if top_k is None:
            top_k = settings.get("top_k")
    if dtype is not None:
        config = config.replace(dtype=dtype)
    if top_k is not None:
        config = config.replace(meteora=dataclasses.replace(config.meteora, top_k=int(top_k)))
    params, _, _ = restore_checkpoint(checkpoint)
    if gates:
        params = merge_params(gate_tree, params)
    return params, config, names


def _with_mixlora(config: ModelConfig, settings: Mapping[str, Any], gates: str) -> ModelConfig:
    """`config` with the MixLoRA experts of a gate export's settings.json."""
    try:
        return config.replace(mixlora=MixLoRAConfig(**settings))
    except (TypeError, ValueError) as e:  # an unknown key; values a MixLoRAConfig refuses
        raise ValueError(f"{os.path.join(gates, GATE_SETTINGS_FILE)}: 'mixlora' holds settings this checkpoint "
                         f"cannot take ({e})") from None


_CHAT_FLAGS = {"auto": None, "yes": True, "no": False}


@dataclasses.dataclass(frozen=True)
class CliOptions:
    """Inference options the CLIs (scripts/generate.py, scripts/evaluate.py) resolve alike."""

    force_adapter: Optional[int]  # adapter index or None (learned routing)
    chat_template: Optional[bool]  # for `encode_prompt`: None = the tokenizer decides
    pad_token_id: int


def resolve_force_adapter(force_adapter: Optional[str | int], names: Sequence[str]) -> Optional[int]:
    """An adapter name or index (as a CLI gives it) -> its index; ValueError naming the adapters."""
    if force_adapter is None:
        return None
    names = list(names)
    choices = ", ".join(f"{i}={n}" for i, n in enumerate(names)) or "none: the model has no adapters"
    text = str(force_adapter).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(names):
            raise ValueError(f"--force-adapter {index} is out of range; adapters: {choices}")
        return index
    if text not in names:
        raise ValueError(f"--force-adapter {text!r} is not an adapter of this model; adapters: {choices}")
    return names.index(text)


def cli_options(
    tokenizer,
    names: Sequence[str],
    *,
    force_adapter: Optional[str] = None,
    chat_template: Optional[str] = None,
    gates: Optional[str] = None,
) -> CliOptions:
    """Force-adapter index, chat-template flag and pad id for the CLIs.

    chat_template: "yes" / "no" force it; "auto" lets the tokenizer decide (template if it has
    one); None (the CLI default) uses what the training run recorded with `gates`, and "auto" when
    no gates (or gates without recorded settings) are given.
    """
    if chat_template is None:
        recorded = None
        if gates:
            recorded = load_gate_settings(gates).get("chat_template")
        chat = None if recorded is None else bool(recorded)
    elif chat_template in _CHAT_FLAGS:
        chat = _CHAT_FLAGS[chat_template]
    else:
        raise ValueError(f"chat_template={chat_template!r}; choose one of {sorted(_CHAT_FLAGS)} or None")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return CliOptions(resolve_force_adapter(force_adapter, names), chat, int(pad))


# Generator layouts by name: fused (the default), unrolled (separate projections), scan.
LAYER_LAYOUTS = ("fused", "unrolled", "scan")


def check_sampling_options(*, max_new_tokens: int, temperature: float, top_p: float,
                           routing_temperature: float = 1.0) -> None:
    """Raises ValueError for sampling options `Generator.generate` cannot take."""
    check_routing_temperature(routing_temperature)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if not temperature >= 0:  # NaN too
        raise ValueError(f"temperature={temperature} must be >= 0")


def add_inference_arguments(parser) -> None:
    """The options scripts/generate.py and scripts/evaluate.py share: how the checkpoint is loaded
    and routed (`generator_from_args` reads them back)."""
    parser.add_argument("--gates", default=None, help="trained gates folder (<workdir>/gates) to merge in")
    parser.add_argument("--force-adapter", default=None, help="adapter name or index: route every token to it")
    parser.add_argument("--chat-template", choices=("auto", "yes", "no"), default=None,
                        help="default: as the training run recorded with --gates; auto (the tokenizer's template "
                        "if it has one) without gates")
    parser.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                        help="compute dtype override (default: the gates' run, else the checkpoint's)")
    parser.add_argument("--layer-layout", choices=LAYER_LAYOUTS, default="fused",
                        help="fused (default): per-layer weights with the projections that share an input as one "
                        "GEMM, fastest; unrolled: per-layer weights, one GEMM per projection; scan: one scanned "
                        "layer, much shorter compiles (better when many prompt-length buckets meet a small model)")
    parser.add_argument("--top-k", type=int, default=None, help="MeteoRA's routing top-k (default: the gates' run)")


def generator_from_args(args):
    """`generator_for_cli` with `args.checkpoint`, `args.tokenizer` and the options of
    `add_inference_arguments`."""
    return generator_for_cli(
        args.checkpoint,
        args.tokenizer,
        gates=args.gates,
        dtype=args.dtype,
        top_k=args.top_k,
        force_adapter=args.force_adapter,
        chat_template=args.chat_template,
        layer_layout=args.layer_layout,
    )


def generator_for_cli(
    checkpoint: str,
    tokenizer_dir: str,
    *,
    gates: Optional[str] = None,
    dtype: Optional[str] = None,
    top_k: Optional[int] = None,
    force_adapter: Optional[str] = None,
    chat_template: Optional[str] = None,
    layer_layout: str = "fused",
):
    """What scripts/generate.py and scripts/evaluate.py both start from: the checkpoint (with trained
    gates and their recorded settings), its tokenizer, a `Generator` in `layer_layout` (one of
    LAYER_LAYOUTS), the adapter names and the resolved `CliOptions`. Bad options raise ValueError
    with a message for the user."""
    from meteora_jax.checkpoint import model_config_of, read_metadata
    from meteora_jax.data import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)  # first: the cheaper check
    # Another model's tokenizer ran, giving noise (ids past the embedding, or the wrong words), exit 0.
    vocab_size = model_config_of(checkpoint, read_metadata(checkpoint)).vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer {tokenizer_dir!r} has {len(tokenizer)} tokens but the model in {checkpoint!r} "
                         f"has vocab_size {vocab_size}: it belongs to another model")
    params, config, names = load_for_inference(checkpoint, gates, dtype=dtype, top_k=top_k)
    opts = cli_options(tokenizer, names, force_adapter=force_adapter, chat_template=chat_template, gates=gates)
    if layer_layout not in LAYER_LAYOUTS:
        raise ValueError(f"layer_layout={layer_layout!r}; choose one of {LAYER_LAYOUTS}")
    generator = Generator(config, params, eos_token_ids=eos_ids_of(tokenizer), pad_token_id=opts.pad_token_id,
                          scan_layers=layer_layout == "scan", fused_projections=layer_layout == "fused")
    return generator, tokenizer, names, opts
