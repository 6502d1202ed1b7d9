"""Conversion of PEFT adapters and reference MeteoRA checkpoints, through the real CLI.

Oracles: PEFT's `PeftModel` (one adapter active) and transformers' LlamaForCausalLM with weights
merged by hand from PEFT's own LoRA modules (mixtures, reference checkpoints). Tolerance: relative
error (Frobenius, over all logits) <= 1e-4 in fp32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from meteora_jax import LlamaForCausalLM, Routing
from meteora_jax.checkpoint import is_checkpoint, read_metadata, restore_checkpoint
from meteora_jax.config import ALL_PROJECTIONS
from meteora_jax.convert.cli import main
from meteora_jax.convert.hf_base import hf_projection_name
from conftest import TINY_PEFT_ADAPTERS, child_env, make_peft_adapter, make_tiny_hf_llama
from torch_reference import hf_logits, relative_error

TOL = 1e-4
REPO = Path(__file__).resolve().parent.parent
NAMES = list(TINY_PEFT_ADAPTERS)


def _batch(vocab, seed=0, batch=2, seq=11):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    mask[1, :3] = 0  # left padding
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    return ids, mask, positions


@pytest.fixture(scope="module")
def base_ckpt(tiny_hf_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "base"
    assert main(["base", str(tiny_hf_llama_dir), "-o", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def converted(base_ckpt, tiny_peft_adapters, tmp_path_factory):
    """The three adapters converted in-process onto the base checkpoint: (params, config, metadata)."""
    out = tmp_path_factory.mktemp("ckpt") / "loras"
    pairs = [f"{name}={path}" for name, path in tiny_peft_adapters]
    assert main(["loras", "--base", str(base_ckpt), "--adapters", *pairs, "-o", str(out), "--seed", "3", "--quiet"]) == 0
    return restore_checkpoint(out)


@pytest.fixture(scope="module")
def peft_model(tiny_hf_llama_dir, tiny_peft_adapters):
    from peft import PeftModel
    from transformers import LlamaForCausalLM as HFLlama

    (first, first_dir), *rest = tiny_peft_adapters
    model = PeftModel.from_pretrained(HFLlama.from_pretrained(tiny_hf_llama_dir), first_dir, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def apply_fn():
    """Our model's logits, with fp32 matmuls at full precision (GPUs default to TF32, which alone
    gives ~5e-4 relative error: the tests here are about the conversion being exact)."""
    jitted = jax.jit(lambda config, params, ids, mask, pos, routing: LlamaForCausalLM(config).apply(
        {"params": params}, ids, mask, pos, routing=routing).logits, static_argnums=0)

    def apply(*args):
        with jax.default_matmul_precision("highest"):
            return jitted(*args)

    return apply


def _peft_merged_model(tiny_hf_llama_dir, peft_model, weights: dict[str, float]):
    """transformers' LLaMA whose projections are W + sum_name weights[name] * scaling * B @ A, taken
    from PEFT's own LoRA modules (its scalings, ranks and patterns), independent of our converter."""
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM as HFLlama

    merged = HFLlama.from_pretrained(tiny_hf_llama_dir).eval()
    state = merged.state_dict()
    for module_name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.base_layer.weight.detach().double().clone()
        for name, w in weights.items():
            if name in module.lora_A:
                a, b = module.lora_A[name].weight.double(), module.lora_B[name].weight.double()
                weight += w * module.scaling[name] * (b @ a)
        state[f"{module_name}.weight"] = weight.float()
    merged.load_state_dict(state)
    return merged


# ---------------------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
def test_forced_adapter_matches_peft(converted, peft_model, apply_fn, index):
    params, config, _ = converted
    ids, mask, positions = _batch(config.vocab_size, seed=index)
    peft_model.set_adapter(NAMES[index])
    want = hf_logits(peft_model, ids, mask, positions)
    got = apply_fn(config, params, ids, mask, positions, Routing.force_adapter(index, len(NAMES)))
    err = relative_error(got, want, mask)
    print(f"adapter {NAMES[index]}: relative error {err:.2e}")
    assert err <= TOL
    # The adapter really changes the output (the comparison is not of two base models).
    peft_model.set_adapter(NAMES[(index + 1) % len(NAMES)])
    assert relative_error(hf_logits(peft_model, ids, mask, positions), want, mask) > 100 * TOL


def test_two_adapter_mixture_matches_merged_weights(converted, peft_model, tiny_hf_llama_dir, apply_fn):
    params, config, _ = converted
    assert config.meteora.top_k == 2
    weights = {"alpha": 0.3, "gamma": 0.7}
    forced = np.array([weights.get(name, 0.0) for name in NAMES], np.float32)
    ids, mask, positions = _batch(config.vocab_size, seed=7)
    want = hf_logits(_peft_merged_model(tiny_hf_llama_dir, peft_model, weights), ids, mask, positions)
    got = apply_fn(config, params, ids, mask, positions, Routing(forced_weights=forced))
    err = relative_error(got, want, mask)
    print(f"mixture 0.3*alpha + 0.7*gamma: relative error {err:.2e}")
    assert err <= TOL


def test_layout_config_and_metadata(converted, tiny_peft_adapters):
    params, config, meta = converted
    m = config.meteora
    assert (m.num_adapters, m.rank, m.top_k, m.targets) == (3, 8, 2, ALL_PROJECTIONS)
    assert [a["name"] for a in meta["adapters"]] == NAMES
    by_name = {a["name"]: a for a in meta["adapters"]}
    assert [by_name[n]["rank"] for n in NAMES] == [4, 8, 2]
    assert [by_name[n]["max_rank"] for n in NAMES] == [4, 8, 6]
    assert [by_name[n]["lora_alpha"] for n in NAMES] == [8.0, 16.0, 4.0]
    assert [by_name[n]["use_rslora"] for n in NAMES] == [False, True, False]
    assert by_name["alpha"]["target_modules"] == ["q_proj", "v_proj"]
    assert by_name["gamma"]["target_modules"] == ["o_proj", "up_proj", "down_proj"]
    for name, path in tiny_peft_adapters:
        weights = Path(path) / "adapter_model.safetensors"
        assert by_name[name]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert by_name[name]["source"] == str(Path(path).resolve())
    assert meta["gates"] == {"init": "normal", "std": 0.02, "seed": 3}
    layers = params["layers"]
    # Scalings: alpha/r, alpha/sqrt(r) for rsLoRA, alpha_pattern for gamma's layer-1 up_proj.
    np.testing.assert_array_equal(layers["self_attn"]["q_proj"]["lora_scaling"], np.float32([[2.0, 16 / np.sqrt(8), 0.0]] * 2))
    np.testing.assert_allclose(layers["mlp"]["up_proj"]["lora_scaling"], [[0, 16 / np.sqrt(8), 2.0], [0, 16 / np.sqrt(8), 5.0]], rtol=1e-7)
    np.testing.assert_array_equal(layers["mlp"]["down_proj"]["lora_scaling"][:, 2], np.float32([4 / 6, 4 / 6]))
    # Zero padding beyond each adapter's rank, zeros where an adapter does not adapt a projection.
    q_a, down_a = np.asarray(layers["self_attn"]["q_proj"]["lora_a"]), np.asarray(layers["mlp"]["down_proj"]["lora_a"])
    assert not q_a[:, 0, :, 4:].any() and q_a[:, 0, :, :4].all() and not q_a[:, 2].any()
    assert not down_a[:, 2, :, 6:].any() and down_a[:, 2, :, :6].all()
    assert not np.asarray(layers["self_attn"]["k_proj"]["lora_b"])[:, [0, 2]].any()
    gate = np.asarray(layers["self_attn"]["q_proj"]["gate"])
    assert gate.dtype == np.float32 and 0.01 < gate.std() < 0.03


def test_order_file_subprocess_and_plain_projections(base_ckpt, tiny_peft_adapters, tmp_path, apply_fn, peft_model):
    """`python scripts/convert.py` with --adapter-dir + adapters.txt; alpha and gamma together leave
    k_proj and gate_proj plain; the warnings name each adapter once."""
    parent = tmp_path / "adapters"
    parent.mkdir()
    for name, path in tiny_peft_adapters:
        if name != "beta":
            shutil.copytree(path, parent / name)
    (parent / "adapters.txt").write_text("# index order\ngamma\nalpha\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/convert.py"), "loras", "--base", str(base_ckpt), "--adapter-dir",
         str(parent), "-o", str(out), "--top-k", "1", "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for name, missing in (("alpha", "o_proj, up_proj, down_proj"), ("gamma", "q_proj, v_proj")):
        assert proc.stderr.count(f"adapter {name!r} does not adapt {missing}; it contributes zero there") == 1
    params, config, meta = restore_checkpoint(out)
    assert [a["name"] for a in meta["adapters"]] == ["gamma", "alpha"]
    assert config.meteora.targets == ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    assert config.meteora.top_k == 1 and config.meteora.rank == 6
    assert set(params["layers"]["self_attn"]["k_proj"]) == {"kernel"}
    assert set(params["layers"]["mlp"]["gate_proj"]) == {"kernel"}
    ids, mask, positions = _batch(config.vocab_size, seed=11)
    peft_model.set_adapter("alpha")
    want = hf_logits(peft_model, ids, mask, positions)
    got = apply_fn(config, params, ids, mask, positions, Routing.force_adapter(1, 2))
    assert relative_error(got, want, mask) <= TOL
    listing = subprocess.run([sys.executable, str(REPO / "scripts/convert.py"), "inspect", str(out)],
                             capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0 and "[ 0] gamma" in listing.stdout and "layers/mlp/down_proj/lora_a" in listing.stdout


def test_bf16_output_from_hf_base(tiny_hf_llama_dir, tiny_peft_adapters, tmp_path):
    out = tmp_path / "bf16"
    name, path = tiny_peft_adapters[0]
    rc = main(["loras", "--base", str(tiny_hf_llama_dir), "--adapters", f"{name}={path}", "-o", str(out), "--dtype", "bf16", "--quiet"])
    assert rc == 0
    params, config, _ = restore_checkpoint(out)
    assert config.param_dtype == config.dtype == "bfloat16" and config.meteora.top_k == 1
    q = params["layers"]["self_attn"]["q_proj"]
    assert q["kernel"].dtype == q["lora_a"].dtype == jax.numpy.bfloat16
    assert q["gate"].dtype == q["lora_scaling"].dtype == np.float32

    # A bf16 base checkpoint keeps its dtype when --dtype is not given (it was upcast to fp32, twice
    # the memory); --dtype still overrides; the metadata names the stored dtype.
    base = tmp_path / "bf16-base"
    assert main(["base", str(tiny_hf_llama_dir), "-o", str(base), "--dtype", "bf16", "--quiet"]) == 0
    for extra, want in (([], "bfloat16"), (["--dtype", "fp32"], "float32")):
        out = tmp_path / f"from-base-{want}"
        assert main(["loras", "--base", str(base), "--adapters", f"{name}={path}", "-o", str(out), "--quiet", *extra]) == 0
        params, config, meta = restore_checkpoint(out)
        assert config.param_dtype == config.dtype == meta["dtype"] == want
        assert params["layers"]["self_attn"]["q_proj"]["kernel"].dtype == np.dtype(want)


def test_bin_weights_and_key_variants(converted, base_ckpt, tiny_peft_adapters, tmp_path):
    """adapter_model.bin with keys lacking `base_model.model.` and carrying `.default` converts to
    the same factors as the safetensors original."""
    from safetensors.torch import load_file

    _, source = tiny_peft_adapters[0]
    variant = tmp_path / "alpha-bin"
    variant.mkdir()
    shutil.copy(Path(source) / "adapter_config.json", variant)
    tensors = load_file(Path(source) / "adapter_model.safetensors")
    renamed = {k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    assert all(k.startswith("model.layers.") and k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in renamed)
    torch.save(renamed, variant / "adapter_model.bin")
    out = tmp_path / "out"
    assert main(["loras", "--base", str(base_ckpt), "--adapters", str(variant), "-o", str(out), "--quiet"]) == 0
    params, config, meta = restore_checkpoint(out)
    assert meta["adapters"][0]["name"] == "alpha-bin" and meta["adapters"][0]["weights_file"] == "adapter_model.bin"
    want = converted[0]["layers"]["self_attn"]
    for projection in ("q_proj", "v_proj"):
        got = params["layers"]["self_attn"][projection]
        np.testing.assert_array_equal(got["lora_a"][:, 0], want[projection]["lora_a"][:, 0, :, :4])
        np.testing.assert_array_equal(got["lora_b"][:, 0], want[projection]["lora_b"][:, 0, :4])
        np.testing.assert_array_equal(got["lora_scaling"][:, 0], want[projection]["lora_scaling"][:, 0])


def test_pissa_adapter_refused_until_peft_converts_it(tiny_hf_llama_dir, base_ckpt, tmp_path, apply_fn, capsys):
    """PiSSA rewrites the base (W - s*B@A) at initialisation, so its adapter does not fit the original
    base: refused. PEFT's path_initial_model_for_weight_conversion turns it into a plain LoRA, which
    converts and reproduces the trained PiSSA model on the original base."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    model = get_peft_model(HFLlama.from_pretrained(tiny_hf_llama_dir), config)
    model.save_pretrained(tmp_path / "init")
    with torch.no_grad():  # stands in for training
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "pissa")
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))

    out = tmp_path / "out"
    capsys.readouterr()  # transformers' progress bars
    assert main(["loras", "--base", str(base_ckpt), "--adapters", f"p={tmp_path / 'pissa'}", "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "key 'init_lora_weights' = 'pissa'" in err and "path_initial_model_for_weight_conversion" in err
    assert err.count("\n") == 1 and not out.exists()

    assert main(["loras", "--base", str(base_ckpt), "--adapters", f"p={tmp_path / 'lora'}", "-o", str(out), "--quiet"]) == 0
    params, config, _ = restore_checkpoint(out)
    ids, mask, positions = _batch(config.vocab_size, seed=3)
    want = hf_logits(model.eval(), ids, mask, positions)  # the trained PiSSA model, on its residual base
    got = apply_fn(config, params, ids, mask, positions, Routing.force_adapter(0, 1))
    assert relative_error(got, want, mask) <= TOL


def test_peft_target_rules(tiny_hf_llama_dir, base_ckpt, tiny_peft_adapters, tmp_path, apply_fn):
    """As in PEFT: a full module name in target_modules is adapted whatever layers_to_transform says,
    and the "all-linear" shorthand is matched in any case."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM as HFLlama

    exact = make_peft_adapter(tiny_hf_llama_dir, tmp_path / "exact", seed=5, r=4, lora_alpha=8,
                              target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])
    out = tmp_path / "out"
    assert main(["loras", "--base", str(base_ckpt), "--adapters", f"exact={exact}", "-o", str(out), "--quiet"]) == 0
    params, config, _ = restore_checkpoint(out)
    attn = params["layers"]["self_attn"]
    np.testing.assert_array_equal(attn["q_proj"]["lora_scaling"], [[2.0], [0.0]])
    np.testing.assert_array_equal(attn["v_proj"]["lora_scaling"], [[0.0], [2.0]])
    peft = PeftModel.from_pretrained(HFLlama.from_pretrained(tiny_hf_llama_dir), exact).eval()
    ids, mask, positions = _batch(config.vocab_size, seed=4)
    got = apply_fn(config, params, ids, mask, positions, Routing.force_adapter(0, 1))
    assert relative_error(got, hf_logits(peft, ids, mask, positions), mask) <= TOL

    beta = tmp_path / "beta"  # adapts all seven projections in every layer
    shutil.copytree(dict(tiny_peft_adapters)["beta"], beta)
    _edit_config(beta, target_modules="ALL-LINEAR")
    assert main(["loras", "--base", str(base_ckpt), "--adapters", f"beta={beta}", "-o", str(tmp_path / "all"), "--quiet"]) == 0
    assert read_metadata(tmp_path / "all")["adapters"][0]["target_modules"] == list(ALL_PROJECTIONS)

    # A generic target list (entries for other architectures, which match nothing here) and bias="lora_only"
    # (LLaMA's projections have no bias: nothing extra is trained) convert as the plain adapter does.
    alpha = dict(tiny_peft_adapters)["alpha"]
    generic = tmp_path / "generic"
    shutil.copytree(alpha, generic)
    targets = json.loads((Path(alpha) / "adapter_config.json").read_text())["target_modules"]
    _edit_config(generic, target_modules=[*targets, "query_key_value", "c_attn"], bias="lora_only")
    for name, path in (("plain", alpha), ("generic", generic)):
        assert main(["loras", "--base", str(base_ckpt), "--adapters", f"a={path}", "-o", str(tmp_path / f"{name}.ckpt"), "--quiet"]) == 0
    plain, generic_params = (restore_checkpoint(tmp_path / f"{name}.ckpt")[0] for name in ("plain", "generic"))
    for want, got in zip(jax.tree.leaves(plain), jax.tree.leaves(generic_params), strict=True):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------- reference


def _reference_state(config, num=3, rank=4, targets=("q_proj", "v_proj", "down_proj"), seed=0):
    """Known stacked A [L*r, d_in], B [d_out, L*r] and gates [L, d_in] in the reference layout."""
    from meteora_jax.convert.hf_base import projection_shape

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(config.num_layers):
        for projection in targets:
            d_in, d_out = projection_shape(config, projection)
            prefix = hf_projection_name(layer, projection)
            state[f"{prefix}.lora_A.weight"] = 0.1 * torch.randn(num * rank, d_in, generator=gen)
            state[f"{prefix}.lora_B.weight"] = 0.1 * torch.randn(d_out, num * rank, generator=gen)
            state[f"{prefix}.moe_gate.weight"] = torch.randn(num, d_in, generator=gen)
    return state


def _reference_merged_model(tiny_hf_llama_dir, state, index, rank, scaling):
    from transformers import LlamaForCausalLM as HFLlama

    model = HFLlama.from_pretrained(tiny_hf_llama_dir).eval()
    weights = model.state_dict()
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            b = state[f"{prefix}.lora_B.weight"]
            rows = slice(index * rank, (index + 1) * rank)
            weights[f"{prefix}.weight"] = weights[f"{prefix}.weight"] + scaling * (b[:, rows].double() @ a[rows].double()).float()
    model.load_state_dict(weights)
    return model


def test_reference_checkpoint_round_trip(base_ckpt, tiny_hf_llama_dir, tmp_path, apply_fn, capsys):
    from safetensors.torch import save_file

    _, base_config, _ = restore_checkpoint(base_ckpt)
    state = _reference_state(base_config)
    save_file(state, tmp_path / "meteora.safetensors")
    # The same tensors as a wrapped torch pickle with base weights mixed in (skipped) and a prefix.
    from transformers import LlamaForCausalLM as HFLlama

    with_base = {f"base_model.model.{k}": v for k, v in state.items()}
    with_base.update({f"base_model.model.{k}": v for k, v in HFLlama.from_pretrained(tiny_hf_llama_dir).state_dict().items()})
    torch.save({"state_dict": with_base}, tmp_path / "meteora.pt")
    # And as the original's FSDP training saves it: a torch.distributed.checkpoint folder of {"model": ...}.
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": with_base}, checkpoint_id=str(tmp_path / "pytorch_model_fsdp_0"))

    outs = {}
    for source in ("meteora.safetensors", "meteora.pt", "pytorch_model_fsdp_0"):
        out = tmp_path / f"out-{source}"
        quiet = [] if source == "meteora.pt" else ["--quiet"]
        rc = main(["reference", "--base", str(base_ckpt), str(tmp_path / source), "--lora-alpha", "8",
                   "--names", "x,y,z", "-o", str(out), *quiet])
        assert rc == 0
        outs[source] = restore_checkpoint(out)
        bars = capsys.readouterr().err
        for bar in ("read reference", "stack adapters", "hash reference files"):  # (a multi-GB read showed none)
            assert (bar in bars) == (not quiet), (source, bar)
    (params, config, meta), (params_pt, _, _), (params_dcp, _, meta_dcp) = outs.values()
    jax.tree.map(np.testing.assert_array_equal, params, params_pt)
    jax.tree.map(np.testing.assert_array_equal, params, params_dcp)
    assert [Path(f["path"]).name for f in meta_dcp["reference"]["files"]] == [".metadata", "__0_0.distcp"]
    damaged = tmp_path / "damaged_fsdp"
    shutil.copytree(tmp_path / "pytorch_model_fsdp_0", damaged)
    (damaged / "__0_0.distcp").write_bytes((damaged / "__0_0.distcp").read_bytes()[:100])
    assert main(["reference", "--base", str(base_ckpt), str(damaged), "--lora-alpha", "8", "-o", str(tmp_path / "no"),
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"reference checkpoint {damaged}: cannot read the torch.distributed.checkpoint folder" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "no").exists()
    assert [a["name"] for a in meta["adapters"]] == ["x", "y", "z"]
    assert (config.meteora.num_adapters, config.meteora.rank, config.meteora.targets) == (3, 4, ("q_proj", "v_proj", "down_proj"))
    assert meta["reference"]["files"][0]["sha256"] == hashlib.sha256((tmp_path / "meteora.safetensors").read_bytes()).hexdigest()
    for layer in range(config.num_layers):  # trained gates kept exactly: gate = moe_gate.T
        for projection, block in (("q_proj", "self_attn"), ("down_proj", "mlp")):
            want = state[f"{hf_projection_name(layer, projection)}.moe_gate.weight"].numpy().T
            np.testing.assert_array_equal(params["layers"][block][projection]["gate"][layer], want)
    np.testing.assert_array_equal(params["layers"]["mlp"]["down_proj"]["lora_scaling"], np.full((2, 3), 2.0))
    ids, mask, positions = _batch(config.vocab_size, seed=5)
    for index in range(3):
        want = hf_logits(_reference_merged_model(tiny_hf_llama_dir, state, index, rank=4, scaling=2.0), ids, mask, positions)
        got = apply_fn(config, params, ids, mask, positions, Routing.force_adapter(index, 3))
        err = relative_error(got, want, mask)
        print(f"reference adapter {index}: relative error {err:.2e}")
        assert err <= TOL


def test_reference_rslora_scaling_per_projection_rank(base_ckpt, tmp_path):
    """--lora-alpha a0 a1 a2 --rslora stores lora_scaling = alpha_l / sqrt(r) per adapter, with r the
    rank of each projection (4 for q/v_proj, 9 for down_proj here): guards against rsLoRA being
    stored as alpha / r, against the alphas taken in another order, and against one rank for all
    projections. Compared with float32 values, rtol 1e-6."""
    from safetensors.torch import save_file

    rng = np.random.default_rng()
    _, base_config, _ = restore_checkpoint(base_ckpt)
    seed = int(rng.integers(2**31))
    state = _reference_state(base_config, rank=4, targets=("q_proj", "v_proj"), seed=seed)
    state.update(_reference_state(base_config, rank=9, targets=("down_proj",), seed=seed + 1))
    save_file(state, tmp_path / "meteora.safetensors")
    alphas = [float(a) for a in rng.uniform(1.0, 32.0, 3)]
    out = tmp_path / "out"
    assert main(["reference", "--base", str(base_ckpt), str(tmp_path / "meteora.safetensors"),
                 "--lora-alpha", *map(repr, alphas), "--rslora", "--names", "x,y,z", "-o", str(out), "--quiet"]) == 0
    params, config, meta = restore_checkpoint(out)
    assert config.meteora.rank == 9
    ranks = {"q_proj": 4, "v_proj": 4, "down_proj": 9}
    for projection, r in ranks.items():
        want = [a / np.sqrt(r) for a in alphas]
        block = "mlp" if projection == "down_proj" else "self_attn"
        got = params["layers"][block][projection]["lora_scaling"]
        assert got.shape == (config.num_layers, 3)
        np.testing.assert_allclose(got, np.broadcast_to(np.float32(want), got.shape), rtol=1e-6, err_msg=projection)
        for l, adapter in enumerate(meta["adapters"]):
            np.testing.assert_allclose(adapter["scaling"][projection], want[l], rtol=1e-12, err_msg=(projection, l))
    assert [(a["name"], a["lora_alpha"], a["use_rslora"]) for a in meta["adapters"]] == [
        ("x", alphas[0], True), ("y", alphas[1], True), ("z", alphas[2], True)]
    assert [a["ranks"] for a in meta["adapters"]] == [ranks] * 3


def test_reference_per_adapter_scalings_keep_their_order(base_ckpt, tiny_hf_llama_dir, tmp_path, apply_fn):
    """--scaling s0 s1 s2 (distinct) stores s_l as adapter l's lora_scaling in every projection and
    layer and in the metadata, and adapter l forced on matches the base merged with s_l * B_l A_l
    (relative error <= 1e-4): guards against the scalings stored in another order (e.g. reversed)."""
    from safetensors.torch import save_file

    rng = np.random.default_rng()
    _, base_config, _ = restore_checkpoint(base_ckpt)
    state = _reference_state(base_config, seed=int(rng.integers(2**31)))
    save_file(state, tmp_path / "meteora.safetensors")
    scalings = [float(s) for s in rng.permutation([0.5, 2.0, 3.5]) * rng.uniform(0.8, 1.25)]
    out = tmp_path / "out"
    assert main(["reference", "--base", str(base_ckpt), str(tmp_path / "meteora.safetensors"),
                 "--scaling", *map(repr, scalings), "--names", "x,y,z", "-o", str(out), "--quiet"]) == 0
    params, config, meta = restore_checkpoint(out)
    for projection in config.meteora.targets:
        block = "mlp" if projection == "down_proj" else "self_attn"
        got = params["layers"][block][projection]["lora_scaling"]
        np.testing.assert_array_equal(got, np.broadcast_to(np.float32(scalings), (config.num_layers, 3)), err_msg=projection)
    assert [a["name"] for a in meta["adapters"]] == ["x", "y", "z"]
    assert [a["scaling"] for a in meta["adapters"]] == [{p: s for p in config.meteora.targets} for s in scalings]
    ids, mask, positions = _batch(config.vocab_size, seed=int(rng.integers(2**31)))
    for index, scaling in enumerate(scalings):
        want = hf_logits(_reference_merged_model(tiny_hf_llama_dir, state, index, rank=4, scaling=scaling), ids, mask, positions)
        got = apply_fn(config, params, ids, mask, positions, Routing.force_adapter(index, 3))
        err = relative_error(got, want, mask)
        print(f"reference adapter {index} (scaling {scaling:.3f}): relative error {err:.2e}")
        assert err <= TOL


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda s: s.pop("model.layers.1.self_attn.v_proj.moe_gate.weight"), "'model.layers.1.self_attn.v_proj.moe_gate.weight' is missing"),
        (lambda s: s.__setitem__("model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(13, 64)), "want [L*r, 64] with L=3"),
        (lambda s: s.__setitem__("model.layers.0.self_attn.q_proj.weird.weight", torch.zeros(1)), "'model.layers.0.self_attn.q_proj.weird.weight' is not a MeteoRA tensor"),
        (lambda s: s["model.layers.0.mlp.down_proj.lora_B.weight"].__setitem__((0, 0), float("inf")), "non-finite"),
        (lambda s: s.__setitem__("model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(0, 64)),
         "bad.safetensors: key 'model.layers.0.self_attn.q_proj.lora_A.weight' has shape (0, 64), want [L*r, 64] with L=3, r >= 1"),
        (lambda s: s.__setitem__("model.layers.0.self_attn.q_proj.lora_A.weight", torch.from_numpy(
            np.random.default_rng().integers(-3, 4, (12, 64)).astype(np.int32))),
         "bad.safetensors: key 'model.layers.0.self_attn.q_proj.lora_A.weight' has dtype int32; weights must be floating point"),
    ],
    ids=["missing-key", "bad-shape", "unknown-key", "non-finite", "rank-zero", "integer"],
)
def test_reference_bad_input(base_ckpt, tmp_path, capsys, mutate, message):
    from safetensors.torch import save_file

    _, base_config, _ = restore_checkpoint(base_ckpt)
    state = _reference_state(base_config)
    mutate(state)
    save_file(state, tmp_path / "bad.safetensors")
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    assert main(["reference", "--base", str(base_ckpt), str(tmp_path / "bad.safetensors"), "--scaling", "1",
                 "-o", str(outdir / "out"), "--quiet"]) == 1
    assert message in capsys.readouterr().err
    assert os.listdir(outdir) == []


@pytest.mark.parametrize("flag", [["--lora-alpha", "nan"], ["--scaling", "inf"], ["--lora-alpha", "-16"],
                                  ["--scaling", "0"], ["--scaling", "1", "0", "2"]], ids=" ".join)
def test_reference_bad_scaling(base_ckpt, tmp_path, capsys, flag):
    """A scaling or alpha that is not a finite positive number is refused, not stored."""
    from safetensors.torch import save_file

    _, base_config, _ = restore_checkpoint(base_ckpt)
    save_file(_reference_state(base_config), tmp_path / "ref.safetensors")
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    assert main(["reference", "--base", str(base_ckpt), str(tmp_path / "ref.safetensors"), *flag,
                 "-o", str(outdir / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    bad = next(v for v in flag[1:] if not 0 < float(v) < float("inf"))
    assert f"{flag[0]}: {float(bad)} must be a finite number > 0" in err and err.count("\n") == 1, err
    assert os.listdir(outdir) == []


def test_reference_missing_checkpoint_named_before_the_base_loads(base_ckpt, tmp_path, capsys, monkeypatch):
    """The reference checkpoint is looked for first: the base (a 13B dequantisation, minutes) was
    loaded before it was found missing."""
    import meteora_jax.convert.cli as convert_cli

    def no_base(*a, **k):
        raise AssertionError("the base was loaded before the reference checkpoint was checked")

    monkeypatch.setattr(convert_cli, "load_base", no_base)
    assert main(["reference", "--base", str(base_ckpt), str(tmp_path / "nope.safetensors"), "--scaling", "1",
                 "-o", str(tmp_path / "out"), "--quiet"]) == 1
    assert f"reference checkpoint {tmp_path / 'nope.safetensors'} not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- bad input


def _edit_config(path, **changes):
    config_path = Path(path) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


def _edit_tensors(path, fn):
    from safetensors.numpy import load_file, save_file

    weights = Path(path) / "adapter_model.safetensors"
    tensors = load_file(weights)
    fn(tensors)
    save_file(tensors, weights)


KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"


def _other_base_adapter(path, tmp_path):
    base = tmp_path / "other-base"
    make_tiny_hf_llama(base, seed=1, hidden=48)
    shutil.rmtree(path)
    make_peft_adapter(base, path, seed=0, **TINY_PEFT_ADAPTERS["alpha"])


def _integer_factor(dtype):
    """Replaces KEY by random integers (or booleans) of its shape, fresh on every run: astype(float32)
    used to turn them into 0/1 or integer weights without a word."""
    def breaker(path, tmp_path):
        rng = np.random.default_rng()
        _edit_tensors(path, lambda d: d.__setitem__(KEY, rng.integers(-3, 4, d[KEY].shape).astype(dtype)))
    return breaker


BAD_ADAPTERS = {
    "missing-config": (lambda p, t: os.remove(p / "adapter_config.json"), ["adapter 'alpha'", "adapter_config.json is missing"]),
    "missing-weights": (lambda p, t: os.remove(p / "adapter_model.safetensors"), ["adapter 'alpha'", "has no adapter_model.safetensors or adapter_model.bin"]),
    "other-base": (_other_base_adapter, ["adapter 'alpha'", "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape (4, 48)", "different base"]),
    "dora": (lambda p, t: _edit_config(p, use_dora=True), ["adapter 'alpha'", "key 'use_dora'", "DoRA"]),
    "bias-tensor": (lambda p, t: (_edit_config(p, bias="lora_only"), _edit_tensors(p, lambda d: d.__setitem__(
        "base_model.model.model.layers.0.self_attn.q_proj.bias", np.zeros(64, np.float32)))),
        ["adapter 'alpha'", "key 'base_model.model.model.layers.0.self_attn.q_proj.bias' is a trained bias "
         "(adapter_config.json bias='lora_only')"]),
    "resized-vocab": (lambda p, t: _edit_tensors(p, lambda d: d.__setitem__("base_model.model.lm_head.weight", np.zeros(
        (136, 64), np.float32))), ["key 'base_model.model.lm_head.weight' is a full (136, 64) weight", "resized vocabulary"]),
    "alpha-nan": (lambda p, t: _edit_config(p, lora_alpha=float("nan")), ["key 'lora_alpha' must be a finite number > 0, got nan"]),
    "alpha-inf": (lambda p, t: _edit_config(p, lora_alpha=float("inf")), ["key 'lora_alpha' must be a finite number > 0, got inf"]),
    "alpha-pattern-inf": (lambda p, t: _edit_config(p, alpha_pattern={"v_proj": float("inf")}), ["key 'alpha_pattern' must be an object of finite numbers > 0"]),
    "rank-true": (lambda p, t: _edit_config(p, r=True), ["key 'r' must be a positive integer, got True"]),
    "rank-float": (lambda p, t: _edit_config(p, r=4.0), ["key 'r' must be a positive integer, got 4.0"]),
    "modules-to-save": (lambda p, t: _edit_config(p, modules_to_save=["lm_head"]), ["adapter 'alpha'", "key 'modules_to_save'"]),
    "embedding-target": (lambda p, t: _edit_config(p, target_modules=["q_proj", "embed_tokens"]), ["key 'target_modules' lists 'embed_tokens'"]),
    "rank-pattern-mismatch": (lambda p, t: _edit_config(p, rank_pattern={"v_proj": 2}), ["key 'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight' has shape (4, 64) but adapter_config.json implies rank 2"]),
    "missing-key": (lambda p, t: _edit_tensors(p, lambda d: d.pop(KEY)), [f"{KEY!r} is missing"]),
    "untargeted-key": (lambda p, t: _edit_config(p, target_modules=["q_proj"]), ["adapts model.layers.0.self_attn.v_proj, which adapter_config.json does not target (target_modules=['q_proj'])"]),
    "untargeted-layer": (lambda p, t: _edit_config(p, layers_to_transform=[1]), ["adapts model.layers.0.self_attn.q_proj, which adapter_config.json does not target (target_modules=", "layers_to_transform=[1])"]),
    "fewer-layers": (lambda p, t: _edit_tensors(p, lambda d: [d.pop(k) for k in list(d) if ".layers.1." in k]), ["key 'base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight' is missing", "its keys stop at layer 0, the base model has 2 layers: trained on a different base?"]),
    "non-finite": (lambda p, t: _edit_tensors(p, lambda d: d[KEY].__setitem__((0, 3), np.nan)), ["adapter 'alpha'", f"tensor {KEY!r} has 1 non-finite values"]),
    **{f"lora-a-{np.dtype(dtype).name}": (_integer_factor(dtype), ["adapter 'alpha'", "adapter_model.safetensors): key "
       f"{KEY!r} has dtype {np.dtype(dtype).name}; weights must be floating point"]) for dtype in (np.bool_, np.int8, np.int32)},
    "truncated": (lambda p, t: _truncate(p / "adapter_model.safetensors"), ["adapter 'alpha'", "adapter_model.safetensors: cannot read weights, the file is truncated or corrupt"]),
    "corrupt-header": (lambda p, t: _corrupt(p / "adapter_model.safetensors"), ["adapter 'alpha'", "truncated or corrupt"]),
    "prefix-tuning": (lambda p, t: _edit_config(p, peft_type="PREFIX_TUNING", target_modules=None), ["adapter 'alpha'", "key 'peft_type' is 'PREFIX_TUNING'; only LORA adapters"]),
    "config-not-object": (lambda p, t: (p / "adapter_config.json").write_text("[1, 2]"), ["adapter 'alpha'", "holds a JSON list, not an object"]),
    "config-not-utf8": (lambda p, t: (p / "adapter_config.json").write_bytes(b'{"r": "\xff"}'), ["adapter 'alpha'", "is not valid UTF-8 JSON"]),
    "targets-not-strings": (lambda p, t: _edit_config(p, target_modules=[1, 2]), ["key 'target_modules' must be a string or a list of strings, got [1, 2]"]),
    "rank-pattern-not-object": (lambda p, t: _edit_config(p, rank_pattern=["x"]), ["key 'rank_pattern' must be an object of positive integers"]),
    "olora": (lambda p, t: _edit_config(p, init_lora_weights="OLoRA"), ["adapter 'alpha'", "key 'init_lora_weights' = 'OLoRA'", "modifies the base weights", "path_initial_model_for_weight_conversion"]),
    "corda": (lambda p, t: _edit_config(p, init_lora_weights="corda"), ["key 'init_lora_weights' = 'corda'", "path_initial_model_for_weight_conversion"]),
    "lora-ga": (lambda p, t: _edit_config(p, init_lora_weights="lora_ga"), ["key 'init_lora_weights' = 'lora_ga'", "path_initial_model_for_weight_conversion"]),
    "loftq": (lambda p, t: _edit_config(p, init_lora_weights="loftq", loftq_config={"loftq_bits": 4}), ["key 'init_lora_weights' = 'loftq'", "LoftQ's quantised base"]),
    "bad-target-regex": (lambda p, t: _edit_config(p, target_modules="model.*(q_proj|v_proj"), ["adapter_config.json): key 'target_modules' holds 'model.*(q_proj|v_proj', not a valid regular expression"]),
    "bad-exclude-regex": (lambda p, t: _edit_config(p, exclude_modules="("), ["key 'exclude_modules' holds '(', not a valid regular expression"]),
    "bad-rank-pattern-regex": (lambda p, t: _edit_config(p, rank_pattern={"q_proj(": 4}), ["key 'rank_pattern' holds 'q_proj(', not a valid regular expression"]),
    "bad-alpha-pattern-regex": (lambda p, t: _edit_config(p, alpha_pattern={"[v_proj": 8}), ["key 'alpha_pattern' holds '[v_proj', not a valid regular expression"]),
    "regex-with-layers": (lambda p, t: _edit_config(p, target_modules=r".*\.(q|v)_proj", layers_to_transform=[1]), ["key 'layers_to_transform' cannot be used when 'target_modules' is a string"]),
}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_is_refused(case, base_ckpt, tiny_peft_adapters, tmp_path, capsys):
    breaker, messages = BAD_ADAPTERS[case]
    adapters = {}
    for name, path in tiny_peft_adapters[:2]:
        adapters[name] = tmp_path / name
        shutil.copytree(path, adapters[name])
    breaker(adapters["alpha"], tmp_path)
    capsys.readouterr()  # what building a broken adapter printed
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    rc = main(["loras", "--base", str(base_ckpt), "--adapters", *(f"{n}={p}" for n, p in adapters.items()),
               "-o", str(outdir / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1, err
    for message in messages:
        assert message in err
    assert err.count("\n") == 1, err
    assert os.listdir(outdir) == []


def _convert_in_child(base_ckpt, adapter, output):
    """Starts `meteora-convert loras` in a child process and returns it once it is inside the save,
    held open by a sleep after Orbax has written (its staging folder then holds the checkpoint)."""
    import time

    name, path = adapter
    # SIGINT as in a terminal: a child started in the background of a shell may inherit it ignored.
    script = textwrap.dedent(f"""
        import signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import meteora_jax.checkpoint as checkpoint
        real = checkpoint._checkpointer
        class Slow:
            def save(self, *a, **k):
                real().save(*a, **k)
                time.sleep(60)
            def restore(self, *a, **k):
                return real().restore(*a, **k)
        checkpoint._checkpointer = Slow
        from meteora_jax.convert.cli import console_main
        sys.argv = ["meteora-convert", "loras", "--base", {str(base_ckpt)!r}, "--adapters", "{name}={path}",
                    "-o", {str(output)!r}, "--top-k", "1", "--quiet"]
        sys.exit(console_main())
    """)
    staged = f".{output.name}.tmp-*/checkpoint/metadata"
    before = set(output.parent.glob(staged))  # (another run's)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    deadline = time.monotonic() + 120
    while not set(output.parent.glob(staged)) - before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    return proc


@pytest.mark.parametrize("signame,status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_stopped_during_the_save_leaves_nothing(base_ckpt, tiny_peft_adapters, tmp_path, capsys, signame, status):
    """SIGTERM (a scheduler's time limit) or Ctrl-C while the checkpoint is being written: the command
    exits 143 / 130 with one line (Ctrl-C printed a KeyboardInterrupt traceback and exited -2) and
    leaves no hidden staging folder beside the output (it stayed, a model's size, for every later
    run). An in-process `main` call keeps the caller's SIGTERM handling."""
    import signal

    outdir = tmp_path / "outdir"
    outdir.mkdir()
    proc = _convert_in_child(base_ckpt, tiny_peft_adapters[0], outdir / "ck")
    proc.send_signal(getattr(signal, signame))
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == status, err
    assert err == f"meteora-convert: stopped by {signame}; nothing written\n"
    assert os.listdir(outdir) == []
    before = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    assert main(["inspect", str(base_ckpt)]) == 0 and signal.getsignal(signal.SIGTERM) is before
    assert "meteora: no adapters (a plain LLaMA)" in capsys.readouterr().out  # not "0 adapters, padded rank 8"


def test_the_next_run_cleans_up_after_a_killed_save(base_ckpt, tiny_peft_adapters, tmp_path, caplog, capsys):
    """kill -9 during the save leaves its hidden staging folder (no cleanup can run); the next
    conversion to that output removes it and says so (it stayed, a model's size, unmentioned). The
    staging folder of a save still running is left alone, as is a folder that only looks alike. One
    holding the old checkpoint (moved aside by --overwrite just before the kill) is put back."""
    import signal

    outdir = tmp_path / "outdir"
    outdir.mkdir()
    out = outdir / "ck"
    (outdir / ".ck.tmp-notours").mkdir()
    killed = _convert_in_child(base_ckpt, tiny_peft_adapters[0], out)
    killed.kill()
    killed.communicate(timeout=120)
    [stale] = outdir.glob(".ck.tmp-????????")
    running = _convert_in_child(base_ckpt, tiny_peft_adapters[1], out)  # removes it, then is killed mid-save
    [live] = outdir.glob(".ck.tmp-????????")
    assert live != stale
    name, path = tiny_peft_adapters[2]
    args = ["loras", "--base", str(base_ckpt), "--adapters", f"{name}={path}", "-o", str(out), "--quiet"]
    assert main(args) == 0  # leaves the running save's folder alone
    assert sorted(os.listdir(outdir)) == sorted([".ck.tmp-notours", live.name, "ck"])
    assert read_metadata(out)["adapters"][0]["name"] == name
    running.send_signal(signal.SIGTERM)
    err = running.communicate(timeout=120)[1]
    assert running.returncode == 143, err
    assert f"removed {stale}, left by a save of {out} that was interrupted" in err
    assert sorted(os.listdir(outdir)) == [".ck.tmp-notours", "ck"]

    # Killed between moving the old checkpoint aside and renaming the new one into place.
    shutil.move(out, outdir / ".ck.tmp-0123abcd" / "previous")
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="meteora_jax"):
        assert main(args) == 1
    assert f"put {out} back from {outdir / '.ck.tmp-0123abcd' / 'previous'}" in caplog.text
    assert f"{out} exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(outdir)) == [".ck.tmp-notours", "ck"]
    assert read_metadata(out)["adapters"][0]["name"] == name


def test_duplicate_names_and_missing_order(base_ckpt, tiny_peft_adapters, tmp_path, capsys):
    (_, alpha), (_, beta) = tiny_peft_adapters[:2]
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    rc = main(["loras", "--base", str(base_ckpt), "--adapters", f"a={alpha}", f"a={beta}", "-o", str(outdir / "o")])
    assert rc == 1 and "adapter name 'a' is given twice" in capsys.readouterr().err
    rc = main(["loras", "--base", str(base_ckpt), "--adapter-dir", str(Path(alpha).parent), "-o", str(outdir / "o")])
    assert rc == 1 and "the adapter order must be explicit" in capsys.readouterr().err
    assert os.listdir(outdir) == []


def test_existing_output_needs_overwrite(base_ckpt, tiny_peft_adapters, tmp_path, capsys):
    """--overwrite replaces a checkpoint, never another folder or an input; a location that cannot be
    written is refused before any work."""
    (name, path), (other, other_path) = tiny_peft_adapters[:2]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["loras", "--base", str(base_ckpt), "--adapters", f"{name}={path}", "-o", str(out), "--quiet"]
    assert main(args) == 1
    assert f"{out} exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 1
    assert f"{out} exists and is not a meteora-jax checkpoint" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"] and os.listdir(tmp_path) == ["out"]

    ckpt = tmp_path / "ckpt"
    args[6] = str(ckpt)
    assert main(args) == 0 and read_metadata(ckpt)["adapters"][0]["name"] == name
    args[4] = f"{other}={other_path}"
    assert main([*args, "--overwrite"]) == 0  # a checkpoint is replaced
    assert read_metadata(ckpt)["adapters"][0]["name"] == other and sorted(os.listdir(tmp_path)) == ["ckpt", "out"]

    for output, message in ((base_ckpt, "is, or holds, the input"), (Path(path).parent, "is, or holds, the input"),
                            (out / "keep.txt" / "x", "is not a writable folder")):
        assert main(["loras", "--base", str(base_ckpt), "--adapters", f"{name}={path}", "-o", str(output),
                     "--overwrite", "--quiet"]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert is_checkpoint(base_ckpt) and os.listdir(path) and os.listdir(out) == ["keep.txt"]


def test_adapters_checked_before_the_base_loads(tiny_peft_adapters, tmp_path, capsys, monkeypatch):
    """Adapter directories, --top-k and --gate-std are checked before the (slow) base model load."""
    from meteora_jax.convert import cli

    monkeypatch.setattr(cli, "load_base", lambda *a, **k: pytest.fail("the base model loaded first"))
    name, path = tiny_peft_adapters[0]
    base = ["loras", "--base", str(tmp_path / "no-base"), "-o", str(tmp_path / "out"), "--quiet"]
    for extra, message in (
        (["--adapters", f"{name}={tmp_path / 'missing'}"], f"adapter {name!r}: {tmp_path / 'missing'} is not a directory"),
        (["--adapters", f"{name}={path}", "--top-k", "0"], "--top-k 0 must be >= 1"),
        (["--adapters", f"{name}={path}", "--gate-std", "nan"], "--gate-std nan must be a finite number >= 0"),
        (["--adapters", f"{name}={path}", "--seed", "-1"], "--seed -1 must be >= 0"),
    ):
        assert main(base + extra) == 1
        assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_order_file_with_bom_and_identical_adapters(base_ckpt, tiny_peft_adapters, tmp_path, caplog):
    """An adapters.txt saved with a UTF-8 BOM and a trailing '/' on a name; two names for one
    adapter's weights convert with a warning."""
    (name, path), (other, other_path) = tiny_peft_adapters[:2]
    folder = tmp_path / "loras"
    folder.mkdir()
    for n, p in ((name, path), (other, other_path)):
        shutil.copytree(p, folder / n)
    shutil.copytree(path, folder / "copy")
    (folder / "adapters.txt").write_bytes("\ufeff".encode() + f"{name}/\n{other}\ncopy\n".encode())
    with caplog.at_level(logging.WARNING, logger="meteora_jax"):
        assert main(["loras", "--base", str(base_ckpt), "--adapter-dir", str(folder), "-o", str(tmp_path / "o"),
                     "--quiet"]) == 0
    assert [a["name"] for a in read_metadata(tmp_path / "o")["adapters"]] == [name, other, "copy"]
    assert f"adapters {name!r} and 'copy' have identical weights" in caplog.text


def test_order_file_not_utf8(tiny_peft_adapters, tmp_path, capsys):
    name, path = tiny_peft_adapters[0]
    folder = tmp_path / "loras"
    shutil.copytree(path, folder / name)
    (folder / "adapters.txt").write_bytes(f"{name}\n".encode() + b"\xff\xfe b\n")
    assert main(["loras", "--base", str(tmp_path / "no-base"), "--adapter-dir", str(folder), "-o", str(tmp_path / "o"),
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"order file {folder / 'adapters.txt'} is not UTF-8 text" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["loras"]


def test_bare_adapter_dir_named_after_the_link(base_ckpt, tiny_peft_adapters, tmp_path):
    """A bare DIR is named after its folder as given, not after a symlink's target."""
    name, path = tiny_peft_adapters[0]
    (tmp_path / "links").mkdir()
    os.symlink(path, tmp_path / "links" / "math")
    assert main(["loras", "--base", str(base_ckpt), "--adapters", str(tmp_path / "links" / "math"), "-o",
                 str(tmp_path / "o"), "--quiet"]) == 0
    assert read_metadata(tmp_path / "o")["adapters"][0]["name"] == "math" != name


def test_base_config_without_a_required_key(tiny_hf_llama_dir, tmp_path, capsys):
    src = tmp_path / "base"
    shutil.copytree(tiny_hf_llama_dir, src)
    config = json.loads((src / "config.json").read_text())
    del config["hidden_size"]
    (src / "config.json").write_text(json.dumps(config))
    assert main(["base", str(src), "-o", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{src / 'config.json'}: HF config lacks integer keys ['hidden_size']" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["base"]


@pytest.fixture(scope="module")
def sharded_hf_llama_dir(tiny_hf_llama_dir, tmp_path_factory):
    """The tiny HF LLaMA saved in several safetensors shards with a model.safetensors.index.json."""
    from transformers import LlamaForCausalLM as HFLlama

    path = tmp_path_factory.mktemp("sharded")
    HFLlama.from_pretrained(tiny_hf_llama_dir).save_pretrained(path, max_shard_size="50KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def _edit_json(path, fn):
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def _edit_hf_config(**changes):
    return lambda d: _edit_json(d / "config.json", lambda c: {**c, **changes})


def _integer_base_weight(name, dtype):
    """Replaces the base tensor `name` by random integers (or booleans) of its shape, fresh on every run."""
    def breaker(d):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(d / "model.safetensors")
        tensors[name] = np.random.default_rng().integers(-3, 4, tensors[name].shape).astype(dtype)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return breaker


_INDEX = "model.safetensors.index.json"
BAD_BASES = {  # case: (sharded source?, breaker(dir), file named in the error, message)
    "weight-map-list": (True, lambda d: _edit_json(d / _INDEX, lambda j: {**j, "weight_map": list(j["weight_map"])}),
                        _INDEX, "key 'weight_map' must be an object of tensor name -> shard file name"),
    "index-not-object": (True, lambda d: (d / _INDEX).write_text("[]"), _INDEX, "holds a JSON list, not an object"),
    "eps-string": (False, _edit_hf_config(rms_norm_eps="x"), "config.json",
                   "HF config key 'rms_norm_eps' must be a finite positive number, got 'x'"),
    "max-positions-string": (False, _edit_hf_config(max_position_embeddings="2048"), "config.json",
                             "HF config key 'max_position_embeddings' must be a positive integer, got '2048'"),
    "size-bool": (False, _edit_hf_config(hidden_size=True), "config.json", "HF config lacks integer keys ['hidden_size']"),
    "tie-string": (False, _edit_hf_config(tie_word_embeddings="false"), "config.json",
                   "HF config key 'tie_word_embeddings' must be true or false, got 'false'"),
    "rope-theta-string": (False, _edit_hf_config(rope_parameters={"rope_type": "default", "rope_theta": "ten thousand"}),
                          "config.json", "HF config key 'rope_parameters.rope_theta' must be a finite positive number"),
    "llama3-missing-keys": (False, _edit_hf_config(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}),
                            "config.json", "HF config key 'rope_parameters' (rope_type 'llama3') lacks "
                            "['low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings']"),
    "int8-weight": (False, _integer_base_weight("model.layers.1.mlp.down_proj.weight", np.int8), "model.safetensors",
                    "tensor 'model.layers.1.mlp.down_proj.weight' has dtype int8; weights must be floating point"),
    "bool-norm": (False, _integer_base_weight("model.norm.weight", np.bool_), "model.safetensors",
                  "tensor 'model.norm.weight' has dtype bool; weights must be floating point"),
    "more-layers-than-config": (False, _edit_hf_config(num_hidden_layers=1), "model.safetensors",
                                "is for layer 1, but {src}/config.json says num_hidden_layers=1"),
}


@pytest.mark.parametrize("case", list(BAD_BASES))
def test_bad_base_is_refused(case, tiny_hf_llama_dir, sharded_hf_llama_dir, tmp_path, capsys):
    sharded, breaker, file, message = BAD_BASES[case]
    src = tmp_path / "base"
    shutil.copytree(sharded_hf_llama_dir if sharded else tiny_hf_llama_dir, src)
    breaker(src)
    assert main(["base", str(src), "-o", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"error: {src / file}: " in err and message.format(src=src) in err and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["base"]


def test_base_tensors_the_model_does_not_use(tmp_path, caplog):
    """Recomputed rotary buffers and a tied lm_head.weight equal to the embeddings pass silently;
    any other unused tensor, or a tied lm_head.weight of its own, is named in a warning."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "base"
    make_tiny_hf_llama(src, tie=True)
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, src / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="meteora_jax"):
        assert main(["base", str(src), "-o", str(tmp_path / "silent"), "--quiet"]) == 0
    assert [r.getMessage() for r in caplog.records if r.name.startswith("meteora_jax")] == []

    tensors["lm_head.weight"] += 1
    tensors["model.vision_tower.weight"] = torch.ones(2)
    save_file(tensors, src / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="meteora_jax"):
        assert main(["base", str(src), "-o", str(tmp_path / "warned"), "--quiet"]) == 0
    assert "lm_head.weight differs from the embeddings, but config.json ties them" in caplog.text
    assert "1 tensors are not used by the model and are ignored: model.vision_tower.weight" in caplog.text


def test_help_documents_everything(capsys):
    for argv, words in (
        ([], ["base", "loras", "reference", "inspect", "--overwrite"]),
        (["loras"], ["--adapters", "--order-file", "--adapter-dir", "--seed", "--gate-std", "--dtype", "sqrt(r)", "DoRA"]),
        (["reference"], ["lora_A.weight     [L*r, d_in]", "moe_gate.weight", "--lora-alpha", "--scaling", "--rslora"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for word in words:
            assert word in out, (argv, word)
