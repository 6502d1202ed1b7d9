"""meteora_jax.generate against independent references: full (uncached, unpadded) forward passes,
one-prompt-at-a-time runs, a plain LLaMA with one adapter merged into its weights in numpy, a
numpy nucleus, and a count of compilations."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meteora_jax import LlamaForCausalLM, MeteoRAConfig, ModelConfig, Routing, init_params
from meteora_jax.generate import Generator, bucket_length, encode_prompt, sample_token, token_routing

pytestmark = pytest.mark.usefixtures("float32_matmuls_module")  # float32 parity, also on a GPU (no TF32)

CONFIG = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    meteora=MeteoRAConfig(num_adapters=3, rank=4, top_k=2),
)
# Lengths 4, 8, 13: alone (with min_prompt_bucket=1) the first two need no padding at all, in a
# batch they are left-padded by 12 and 8 slots.
PROMPTS = [[5, 17, 3, 40], [9, 8, 7, 6, 5, 4, 3, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
NEW = 10


def _params(seed=0):
    params = init_params(CONFIG, jax.random.key(seed))
    # Distinct, non-unit adapter scalings so that the scaling is exercised.
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    scales = np.array([0.5, 1.5, 2.5], np.float32)
    out = {}
    for path, leaf in flat:
        keys = tuple(p.key for p in path)
        if keys[-1] == "lora_scaling":
            leaf = jnp.broadcast_to(jnp.asarray(scales), leaf.shape)
        out[keys] = leaf
    from flax import traverse_util

    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def params():
    return _params()


@pytest.fixture(scope="module")
def generator(params):
    return Generator(CONFIG, params, pad_token_id=0)


@pytest.fixture(scope="module")
def batch_out(generator):
    return generator.generate(PROMPTS, max_new_tokens=NEW, return_logits=True)


def _full_logits(config, params, rows, length=32, routing_temperature=1.0):
    """Uncached forward of each row alone (right-padded to `length`: causal, so the padding never
    reaches a real position) -> list of [len(row), V]."""
    model = LlamaForCausalLM(config, collect_gate_logits=False)
    ids = np.zeros((len(rows), length), np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
    routing = Routing(temperature=jnp.float32(routing_temperature))
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x, routing=routing).logits)(params, jnp.asarray(ids))
    return [np.asarray(logits[b, : len(r)]) for b, r in enumerate(rows)]


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 16, 17, 100, 256, 257, 300, 385)] == [16, 16, 32, 128, 256, 384, 384, 512]
    assert bucket_length(3, minimum=1) == 4


def test_cached_decoding_matches_full_recompute(params, batch_out):
    # Step j's logits must be those of the full sequence prompt + tokens[:j], recomputed from scratch.
    rows = [p + list(batch_out.tokens[b]) for b, p in enumerate(PROMPTS)]
    full = _full_logits(CONFIG, params, rows)
    for b, p in enumerate(PROMPTS):
        want = full[b][len(p) - 1 : len(p) - 1 + NEW]
        np.testing.assert_allclose(batch_out.logits[b], want, rtol=2e-4, atol=2e-4)
        np.testing.assert_array_equal(batch_out.tokens[b], want.argmax(-1))


def test_padded_batch_equals_one_by_one(params, generator, batch_out):
    single = Generator(CONFIG, params, pad_token_id=0, min_prompt_bucket=1)
    for b, p in enumerate(PROMPTS):
        alone = single.generate([p], max_new_tokens=NEW, return_logits=True)
        np.testing.assert_array_equal(alone.tokens[0], batch_out.tokens[b])
        np.testing.assert_allclose(alone.logits[0], batch_out.logits[b], rtol=1e-4, atol=1e-4)
    # The same prompts right-padded in arrays give the same result.
    ids = np.zeros((3, 14), np.int32)
    mask = np.zeros((3, 14), np.int32)
    for b, p in enumerate(PROMPTS):
        ids[b, : len(p)], mask[b, : len(p)] = p, 1
    right = generator.generate((ids, mask), max_new_tokens=NEW)
    np.testing.assert_array_equal(right.tokens, batch_out.tokens)


def test_greedy_is_deterministic(generator, batch_out):
    again = generator.generate(PROMPTS, max_new_tokens=NEW, return_logits=True)
    np.testing.assert_array_equal(again.tokens, batch_out.tokens)
    np.testing.assert_array_equal(again.logits, batch_out.logits)


def test_split_prefill_equals_single_prefill(params, batch_out):
    split = Generator(CONFIG, params, max_prefill_logits_bytes=0)  # always prefill in two calls
    out = split.generate(PROMPTS, max_new_tokens=NEW, return_logits=True)
    np.testing.assert_array_equal(out.tokens, batch_out.tokens)
    np.testing.assert_allclose(out.logits, batch_out.logits, rtol=1e-4, atol=1e-4)
    # The prompt's routing too (the two halves' gate choices were joined in either order unnoticed).
    kw = dict(max_new_tokens=4, return_routing=True, eos_token_ids=[-5])
    whole = Generator(CONFIG, params).generate(PROMPTS, **kw)
    for got, want in zip(split.generate(PROMPTS, **kw).routing, whole.routing):
        np.testing.assert_array_equal(got, want)


def test_routing_temperature_reaches_generation(params, generator, batch_out):
    """The gate softmax temperature (the original's 15-30 for composite prompts) changes the mixture:
    cached generation at T = 15 gives a full forward's logits at T = 15, not T = 1's."""
    hot = generator.generate(PROMPTS, max_new_tokens=NEW, return_logits=True, routing_temperature=15.0)
    rows = [p + list(hot.tokens[b]) for b, p in enumerate(PROMPTS)]
    want_hot = _full_logits(CONFIG, params, rows, routing_temperature=15.0)
    want_cold = _full_logits(CONFIG, params, rows)
    for b, p in enumerate(PROMPTS):
        positions = slice(len(p) - 1, len(p) - 1 + NEW)
        np.testing.assert_allclose(hot.logits[b], want_hot[b][positions], rtol=2e-4, atol=2e-4)
        assert np.max(np.abs(want_hot[b][positions] - want_cold[b][positions])) > 1e-2  # T matters here


def _merged_plain_params(params, adapter: int):
    """numpy: kernel + s_i * A_i @ B_i for every adapted projection; no adapter or gate leaves."""
    def merge(node):
        if "kernel" in node and "lora_a" in node:
            a = np.asarray(node["lora_a"])[:, adapter]  # [n_layers, d_in, r]
            b = np.asarray(node["lora_b"])[:, adapter]  # [n_layers, r, d_out]
            s = np.asarray(node["lora_scaling"])[:, adapter]  # [n_layers]
            return {"kernel": np.asarray(node["kernel"]) + s[:, None, None] * np.einsum("lir,lro->lio", a, b)}
        return {k: merge(v) if isinstance(v, dict) else np.asarray(v) for k, v in node.items()}

    return merge(params)


def test_forced_adapter_equals_merged_weights(generator, params):
    plain_config = CONFIG.replace(meteora=MeteoRAConfig(num_adapters=0))
    results = []
    for adapter in (0, 2):
        plain = Generator(plain_config, _merged_plain_params(params, adapter), pad_token_id=0)
        want = plain.generate(PROMPTS, max_new_tokens=NEW, return_logits=True)
        got = generator.generate(PROMPTS, max_new_tokens=NEW, return_logits=True, force_adapter=adapter)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.logits, want.logits, rtol=1e-3, atol=1e-3)
        results.append(got.tokens)
    assert not np.array_equal(results[0], results[1]), "the adapters should change the generation"


def test_scanned_and_unrolled_layouts_generate_alike(params, generator, batch_out):
    # The default generator runs the unrolled layout; scan_layers=True the scanned one on the same
    # weights. Same greedy tokens and routing; logits equal up to fp32 fusion differences (1e-5).
    scanned = Generator(CONFIG, params, pad_token_id=0, scan_layers=True)
    assert "layers_0" in generator.params and "layers" in scanned.params
    want = scanned.generate(PROMPTS, max_new_tokens=NEW, return_logits=True)
    np.testing.assert_array_equal(batch_out.tokens, want.tokens)
    np.testing.assert_allclose(batch_out.logits, want.logits, rtol=1e-5, atol=1e-5)
    for options in (dict(force_adapter=1), dict(routing_temperature=15.0, return_routing=True)):
        got = generator.generate(PROMPTS, max_new_tokens=NEW, **options)
        want = scanned.generate(PROMPTS, max_new_tokens=NEW, **options)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        if want.routing is not None:
            for g, w in zip(got.routing, want.routing):
                np.testing.assert_array_equal(g, w)


def test_compiler_options_reach_the_program(params, batch_out):
    """compiler_options go to the generation program's compile: an option that changes no result
    leaves the tokens as they are, an unknown one fails naming itself."""
    tuned = Generator(CONFIG, params, pad_token_id=0, compiler_options={"xla_gpu_autotune_level": 0})
    np.testing.assert_array_equal(tuned.generate(PROMPTS, max_new_tokens=NEW).tokens, batch_out.tokens)
    broken = Generator(CONFIG, params, pad_token_id=0, compiler_options={"xla_no_such_option": 1})
    with pytest.raises(Exception, match="xla_no_such_option"):
        broken.generate(PROMPTS, max_new_tokens=NEW)


def test_sample_token_matches_numpy_nucleus():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 12)).astype(np.float32) * 2
    temperature, top_p = 0.7, 0.6
    keys = jax.random.split(jax.random.key(1), 4000)
    draws = np.asarray(
        jax.jit(jax.vmap(lambda k: sample_token(jnp.asarray(logits), k, jnp.float32(temperature), jnp.float32(top_p))))(keys)
    )  # [4000, 2]
    for b in range(2):
        z = logits[b] / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        n_keep = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix with mass >= top_p
        nucleus = order[:n_keep]
        want = np.zeros_like(p)
        want[nucleus] = p[nucleus] / p[nucleus].sum()
        freq = np.bincount(draws[:, b], minlength=12) / len(draws)
        assert set(np.flatnonzero(freq)) <= set(nucleus.tolist())
        np.testing.assert_allclose(freq, want, atol=0.03)


def test_top_p_to_zero_is_greedy_and_seeds_reproduce(generator, batch_out):
    for seed in (0, 1):
        out = generator.generate(PROMPTS, max_new_tokens=NEW, temperature=1.0, top_p=1e-6, seed=seed)
        np.testing.assert_array_equal(out.tokens, batch_out.tokens)
    a = generator.generate(PROMPTS, max_new_tokens=NEW, temperature=5.0, top_p=1.0, seed=7)
    b = generator.generate(PROMPTS, max_new_tokens=NEW, temperature=5.0, top_p=1.0, seed=7)
    c = generator.generate(PROMPTS, max_new_tokens=NEW, temperature=5.0, top_p=1.0, seed=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert not np.array_equal(a.tokens, batch_out.tokens)


def test_top_p_without_temperature_warns(generator, batch_out):
    """Greedy decoding ignores top_p: the user who set one is told so (and still gets greedy)."""
    with pytest.warns(UserWarning, match="top_p=0.9 has no effect with temperature=0") as caught:
        out = generator.generate(PROMPTS, max_new_tokens=NEW, temperature=0.0, top_p=0.9)
    assert len(caught) == 1 and caught[0].filename == __file__  # once, pointing at the call
    np.testing.assert_array_equal(out.tokens, batch_out.tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sampling uses it: no warning
        generator.generate(PROMPTS, max_new_tokens=NEW, temperature=0.5, top_p=0.9)


def test_filler_rows_start_done(generator):
    """The rows that fill a batch of 3 up to its bucket of 4 generate nothing (only pad after the
    first slot), so a sampled batch stops when its real rows do; the real rows still sample."""
    run, rows, _ = generator.device_call(PROMPTS[:3], max_new_tokens=8, temperature=1.0, seed=3, eos_token_ids=[-5])
    tokens = np.asarray(run()["tokens"])
    assert len(rows) == 3 and tokens.shape[0] == 4
    assert (tokens[3, 1:] == generator.pad_token_id).all()
    assert (tokens[:3, 1:] != generator.pad_token_id).any()


def test_eos_stops_each_row(generator, batch_out):
    eos = int(batch_out.tokens[0, 3])  # row 0 emits it at step 3 at the latest
    out = generator.generate(PROMPTS, max_new_tokens=NEW, eos_token_ids=[eos])
    for b in range(len(PROMPTS)):
        hits = np.flatnonzero(batch_out.tokens[b] == eos)
        if len(hits):
            stop = hits[0] + 1
            assert out.finished[b] and out.lengths[b] == stop
            np.testing.assert_array_equal(out.tokens[b, :stop], batch_out.tokens[b, :stop])
            assert (out.tokens[b, stop:] == 0).all()  # padding after the EOS
            assert out.sequences()[b] == list(batch_out.tokens[b, : stop - 1])
        else:
            assert not out.finished[b] and out.lengths[b] == NEW
            np.testing.assert_array_equal(out.tokens[b], batch_out.tokens[b])
    assert out.finished[0] and out.lengths[0] <= 4


def test_no_recompilation_within_a_bucket(params):
    gen = Generator(CONFIG, params, pad_token_id=0)
    # Prompt lengths 1..16 share the prompt bucket 16, max_new_tokens 1..16 the bucket 16, batches
    # of 3 and 4 the batch bucket 4; the sampling, routing and EOS settings are traced values.
    gen.generate([[1, 2, 3]] * 3, max_new_tokens=5)
    assert gen.num_traces == 1 and gen._jitted._cache_size() == 1
    gen.generate([list(range(1, 17))] * 4, max_new_tokens=16)
    gen.generate([[7]] * 3, max_new_tokens=1, routing_temperature=20.0, eos_token_ids=[4])
    gen.generate([[4, 5, 6, 7, 8, 9, 10]] * 4, max_new_tokens=9, eos_token_ids=[3])
    assert gen.num_traces == 1 and gen._jitted._cache_size() == 1
    gen.generate([[1, 2, 3]] * 3, max_new_tokens=5, force_adapter=0)
    gen.generate([[1, 2, 3, 4]] * 3, max_new_tokens=7, force_adapter=2)  # another adapter: same program
    assert gen.num_traces == 2
    gen.generate([list(range(1, 18))] * 3, max_new_tokens=5)  # prompt length 17: the next bucket
    assert gen.num_traces == 3 and gen._jitted._cache_size() == 3


def test_returned_routing_equals_a_full_forward(generator, params):
    out = generator.generate(PROMPTS[:2], max_new_tokens=6, return_routing=True, eos_token_ids=[-5])
    for b, p in enumerate(PROMPTS[:2]):
        seq = p + list(out.tokens[b])
        want = token_routing(CONFIG, params, seq)  # [T, n_layers, n_proj]
        assert out.routing[b].shape == (len(seq), CONFIG.num_layers, 7)
        np.testing.assert_array_equal(out.routing[b], want)
    assert len(set(np.unique(np.concatenate([r.ravel() for r in out.routing])))) > 1


def test_encode_prompt_is_the_training_prefix(tiny_tokenizer):
    from meteora_jax.data import encode_example

    for chat in (False, True):
        ids = encode_prompt(tiny_tokenizer, "what is 12 + 30?", chat_template=chat)
        arrays, _ = encode_example(
            tiny_tokenizer, "what is 12 + 30?", "42", seq_len=64, task_index=0, chat_template=chat
        )
        n_prompt = int((arrays["lm_mask"] == 0).sum() - (arrays["attention_mask"] == 0).sum())
        assert list(arrays["input_ids"][: len(ids)]) == ids
        assert len(ids) == n_prompt
    assert encode_prompt(tiny_tokenizer, "hi", chat_template=False)[0] == tiny_tokenizer.bos_token_id


def test_force_adapter_lookup_and_unknown_name():
    from types import SimpleNamespace

    from meteora_jax.generate import cli_options, resolve_force_adapter

    names = ["arith", "reverse", "shout"]
    assert resolve_force_adapter(None, names) is None
    assert resolve_force_adapter("reverse", names) == 1
    assert resolve_force_adapter("2", names) == 2 and resolve_force_adapter(0, names) == 0
    with pytest.raises(ValueError, match=r"'poetry' is not an adapter.*0=arith, 1=reverse, 2=shout"):
        resolve_force_adapter("poetry", names)
    with pytest.raises(ValueError, match=r"3 is out of range.*0=arith, 1=reverse, 2=shout"):
        resolve_force_adapter("3", names)
    tok = SimpleNamespace(pad_token_id=None, eos_token_id=None)
    opts = cli_options(tok, names, force_adapter="shout", chat_template="no")
    assert (opts.force_adapter, opts.chat_template, opts.pad_token_id) == (2, False, 0)
    assert cli_options(SimpleNamespace(pad_token_id=5, eos_token_id=2), names).pad_token_id == 5
    with pytest.raises(ValueError, match="chat_template='maybe'"):
        cli_options(tok, names, chat_template="maybe")


def test_readme_python_example_runs(tiny_inference_world):
    """README.md's "Use from Python" block, run on the tiny world (without trained gates: the checkpoint's
    own), and what its comments say: gate logits per projection, and forcing an adapter changes the output."""
    import os
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    code = re.search(r"## Use from Python\n\n```python\n(.*?)```", readme, re.S).group(1)
    paths = '"runs/tiny_world/model", gates="runs/tiny/gates"'
    assert paths in code
    scope = {}
    exec(code.replace(paths, f"{tiny_inference_world.model!r}, gates=None"), scope)  # noqa: S102
    out, num_layers = scope["out"], scope["config"].num_layers
    assert out.logits.shape == (1, 3, scope["config"].vocab_size)
    assert sorted(out.gate_logits) == sorted(scope["config"].meteora.targets)
    assert all(v.shape == (num_layers, 1, 3, len(tiny_inference_world.adapter_names)) for v in out.gate_logits.values())
    model, params, ids = scope["model"], scope["params"], scope["ids"]
    forced = model.apply({"params": params}, ids, routing=scope["Routing"].force_adapter(1, 3)).logits
    assert not np.allclose(np.asarray(forced), np.asarray(out.logits))


def test_generator_and_model_reject_bad_inputs():
    """Token ids past the vocabulary (which read NaN from the embedding, silently), a bad pad id,
    a routing temperature <= 0, and inputs of the wrong form: one ValueError each."""
    config = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=8, max_position_embeddings=64,
                         meteora=MeteoRAConfig(num_adapters=3, rank=2, top_k=2))
    params = init_params(config, jax.random.key(0))
    gen = Generator(config, params, pad_token_id=0)
    for prompts, kwargs, message in (
        ([[1, 2, 32]], {}, r"prompt token 32 is not an id in the model's vocabulary \[0, 32\)"),
        ([[1, -5]], {}, "prompt token -5 is not an id"),
        ([[1.7, 2]], {}, "prompt token 1.7 is not an id"),
        ([1, 2, 3], {}, "prompts must be a list of token-id lists"),
        (["reverse lamp"], {}, "prompts must be a list of token-id lists"),
        ((np.ones((2, 3), np.int32), np.ones((2, 4), bool)), {}, r"input_ids \(2, 3\) and attention_mask \(2, 4\)"),
        ([[1, 2]], {"routing_temperature": 0.0}, "routing temperature must be a finite number > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            gen.generate(prompts, max_new_tokens=2, **kwargs)
    with pytest.raises(ValueError, match=r"pad_token_id=32 is outside the model's vocabulary \[0, 32\)"):
        Generator(config, params, pad_token_id=32)
    with pytest.raises(ValueError, match="prompt token 32 is not an id"):  # the same checks, without generating
        gen.check_prompts([[1, 2], [1, 32]], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=64"):
        gen.check_prompts([[1, 2] * 32], max_new_tokens=2)

    model = LlamaForCausalLM(config)
    ids = jnp.array([[1, 2, 3, 4]])
    for args, message in (
        ((jnp.array([[1, 2, 3, 32]]),), r"input_ids holds 32, outside the vocabulary \[0, 32\)"),
        ((jnp.array([1, 2, 3]),), r"input_ids must be \[B, S\], got shape \(3,\)"),
        ((ids.astype(jnp.float32),), "input_ids must hold integer token ids"),
        ((ids, jnp.ones((1, 3))), r"attention_mask must have input_ids' shape \(1, 4\), got \(1, 3\)"),
        ((ids, None, jnp.arange(4)), r"positions must have input_ids' shape \(1, 4\), got \(4,\)"),
    ):
        with pytest.raises(ValueError, match=message):
            model.apply({"params": params}, *args)
    for index, message in ((1.5, "adapter index must be an integer, got 1.5"), (3, "out of range for 3 adapters")):
        with pytest.raises(ValueError, match=message):
            Routing.force_adapter(index, 3)
    for weights in ([0.5, -0.5, 0.0], [float("inf"), 0.0, 0.0], [float("nan"), 1.0, 0.0]):  # inf gave NaN logits
        with pytest.raises(ValueError, match="finite and >= 0 with a non-zero entry"):
            Routing(forced_weights=jnp.array(weights))
