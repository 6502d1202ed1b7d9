"""Gate exports (`meteora_jax.gates`): the split of params into gates and frozen leaves, the
export/load round trip, the errors for folders that are not exports, and that inference can load
gates without the training dependencies. Fresh random gates every run (bit-exact round trip)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import child_env
from meteora_jax import MeteoRAConfig, ModelConfig, init_params
from meteora_jax.gates import export_gates, load_gate_settings, load_gates, merge_params, split_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = np.random.SeedSequence().entropy


def _params():
    config = ModelConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=8, meteora=MeteoRAConfig(num_adapters=3, rank=2))
    return init_params(config, jax.random.key(SEED % 2**31))


def test_split_and_merge_params():
    """The trainable side holds exactly the gates (all 7 projections of the scanned layers), and
    merging puts every leaf back unchanged."""
    params = _params()
    gates, frozen = split_params(params)
    flat_gates = traverse_util.flatten_dict(gates)
    assert len(flat_gates) == 7 and all(path[-1] == "gate" for path in flat_gates)
    assert not any(path[-1] == "gate" for path in traverse_util.flatten_dict(frozen))
    merged = traverse_util.flatten_dict(merge_params(gates, frozen))
    original = traverse_util.flatten_dict(params)
    assert merged.keys() == original.keys()
    for path, leaf in original.items():
        np.testing.assert_array_equal(np.asarray(merged[path]), np.asarray(leaf))


def test_export_load_round_trip(tmp_path):
    """Gates come back bit-exact with their adapter names and settings; an export without settings
    removes those of an older export in the same folder."""
    gates, _ = split_params(_params())
    names = ["arith", "reverse", "shout"]
    settings = {"top_k": 1, "dtype": "bfloat16", "chat_template": True}
    folder = export_gates(tmp_path / "gates_export", gates, names, settings)
    got, got_names = load_gates(folder)
    assert got_names == names
    assert load_gate_settings(folder) == settings
    want = traverse_util.flatten_dict(gates)
    got = traverse_util.flatten_dict(got)
    assert got.keys() == want.keys()
    for path, leaf in want.items():
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(leaf), err_msg=f"seed {SEED}, {path}")
    export_gates(folder, gates, names)
    assert load_gate_settings(folder) == {}


_EXPORT_SHARDED = """
import sys
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from meteora_jax.gates import export_gates

mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("fsdp", "tensor"))
values = np.random.default_rng(int(sys.argv[2])).standard_normal((2, 8, 3)).astype(np.float32)
gates = {"layers": {"self_attn": {"q_proj": {"gate": jax.device_put(values, NamedSharding(mesh, P("tensor", "fsdp", None)))}}}}
export_gates(sys.argv[1], gates, ["a", "b", "c"])
"""


def test_a_failed_export_keeps_the_older_one(tmp_path):
    """An export that fails while Orbax writes (here a leaf it cannot save; a full disk or a killed
    job alike) leaves the older export loadable, its files unchanged and no partial folder (Orbax's
    force=True had deleted gates/ first)."""
    gates, _ = split_params(_params())
    folder = export_gates(tmp_path / "export", gates, ["a", "b", "c"], {"top_k": 2})
    before = sorted(os.listdir(folder))
    broken = jax.tree.map(lambda _: object(), gates)
    with pytest.raises(Exception):
        export_gates(folder, broken, ["x", "y", "z"])
    assert sorted(os.listdir(folder)) == before == ["adapter_names.json", "gates", "settings.json"]
    got, names = load_gates(folder)
    assert names == ["a", "b", "c"] and load_gate_settings(folder) == {"top_k": 2}
    for path, leaf in traverse_util.flatten_dict(gates).items():
        np.testing.assert_array_equal(np.asarray(traverse_util.flatten_dict(got)[path]), np.asarray(leaf))
    # A re-export after the failure replaces it (without settings: the older ones go).
    export_gates(folder, gates, ["d", "e", "f"])
    assert sorted(os.listdir(folder)) == ["adapter_names.json", "gates"] and load_gates(folder)[1] == ["d", "e", "f"]


def test_gates_saved_on_several_devices_load_on_one(tmp_path):
    """A training run on 4 devices exports sharded gates; inference on one device loads them onto
    that device (Orbax restored the saving mesh: a topology-mismatch error)."""
    seed = SEED % 2**31
    env = child_env(JAX_PLATFORMS="cpu",
                    XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", _EXPORT_SHARDED, str(tmp_path / "export"), str(seed)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gates, names = load_gates(tmp_path / "export")
    gate = gates["layers"]["self_attn"]["q_proj"]["gate"]
    assert names == ["a", "b", "c"] and gate.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    want = np.random.default_rng(seed).standard_normal((2, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(gate), want)


def test_folders_that_are_not_exports(tmp_path):
    """Each missing or malformed part is named, as a ValueError (what the CLIs report)."""
    missing = tmp_path / "nothing_here"
    with pytest.raises(ValueError, match=r"gates folder .*nothing_here does not exist"):
        load_gates(missing)
    missing.mkdir()
    with pytest.raises(ValueError, match=r"nothing_here is not a gate export .*gates is missing$"):
        load_gates(missing)
    gates, _ = split_params(_params())
    folder = export_gates(tmp_path / "workdir" / "gates", gates, ["a", "b", "c"], {"top_k": 2})
    with pytest.raises(ValueError, match=r"workdir is not a gate export .*is missing; did you mean .*workdir/gates\?"):
        load_gates(tmp_path / "workdir")  # the training run's workdir, not its export
    names_file = os.path.join(folder, "adapter_names.json")
    with open(names_file, "w") as f:
        f.write('["a", "b"')  # cut short
    with pytest.raises(ValueError, match=r"adapter_names.json: the adapter names is not valid JSON"):
        load_gates(folder)
    with open(names_file, "w") as f:
        json.dump({"a": 0}, f)
    with pytest.raises(ValueError, match=r"adapter_names.json: expected a JSON list of adapter names"):
        load_gates(folder)
    os.remove(names_file)
    with pytest.raises(ValueError, match=r"adapter_names.json is missing"):
        load_gates(folder)
    with open(os.path.join(folder, "settings.json"), "w") as f:
        f.write("[1, 2]")
    with pytest.raises(ValueError, match=r"settings.json: expected a JSON object of run settings"):
        load_gate_settings(folder)
    # A value of the wrong type: 2.7 was cut to top_k 2, "two" failed inside int(); bytes that are not
    # UTF-8 gave a bare codec error naming no file.
    for settings, message in (({"top_k": 2.7}, r"settings.json: 'top_k' must be an integer, got 2.7"),
                              ({"top_k": True}, r"settings.json: 'top_k' must be an integer, got True"),
                              ({"dtype": 16}, r"settings.json: 'dtype' must be a string, got 16"),
                              ({"chat_template": "yes"}, r"settings.json: 'chat_template' must be true or false")):
        with open(os.path.join(folder, "settings.json"), "w") as f:
            json.dump(settings, f)
        with pytest.raises(ValueError, match=message):
            load_gate_settings(folder)
    with open(os.path.join(folder, "settings.json"), "wb") as f:
        f.write(b'{"dtype": "\xff"}')
    with pytest.raises(ValueError, match=r"settings.json: the run settings is not UTF-8 text"):
        load_gate_settings(folder)

    # An empty gates/ (an interrupted copy): one error naming it (it was an AttributeError)
    empty = tmp_path / "empty"
    (empty / "gates").mkdir(parents=True)
    (empty / "adapter_names.json").write_text('["a", "b", "c"]')
    with pytest.raises(ValueError, match=r"empty/gates: holds no Orbax checkpoint metadata"):
        load_gates(empty)


def test_generate_cli_names_a_bad_gates_folder(tiny_inference_world, tmp_path):
    """scripts/generate.py with --gates pointing at a folder that is no export: one line naming it,
    exit status 2."""
    not_gates = tmp_path / "not_gates"
    not_gates.mkdir()
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "generate.py"), "--checkpoint", tiny_inference_world.model,
         "--tokenizer", tiny_inference_world.tokenizer, "--gates", str(not_gates), "--prompt", "hi"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert f"{not_gates} is not a gate export" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gates_of_another_model_are_refused_by_name(tiny_inference_world, tmp_path):
    """Gates trained on another model with the same adapter names: `load_for_inference` names the
    first gate whose shape differs (it was a concatenate / ScopeParamShapeError traceback deep in
    the model), and one missing from an export; scripts/generate.py exits 2 with that line."""
    from meteora_jax.generate import load_for_inference

    names = list(tiny_inference_world.adapter_names)
    gates, _ = split_params(_params())  # intermediate 24: the tiny world's model has 128
    other = export_gates(tmp_path / "other_model", gates, names)
    with pytest.raises(ValueError, match=r"gates in .*other_model.*: layers/mlp/down_proj/gate has shape \(2, 24, 3\), the model checkpoint's is \(2, 128, 3\)"):
        load_for_inference(tiny_inference_world.model, other)

    params, _, _ = load_for_inference(tiny_inference_world.model)
    own = traverse_util.flatten_dict(split_params(params)[0])
    dropped = sorted(own)[0]
    partial = export_gates(tmp_path / "partial", traverse_util.unflatten_dict(
        {k: v for k, v in own.items() if k != dropped}), names)
    with pytest.raises(ValueError, match=f"have no {'/'.join(dropped)}, which the model checkpoint has"):
        load_for_inference(tiny_inference_world.model, partial)

    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "generate.py"), "--checkpoint", tiny_inference_world.model,
         "--tokenizer", tiny_inference_world.tokenizer, "--gates", str(other), "--prompt", "hi"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "the model checkpoint's is" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_inference_uses_the_exported_gate_values(tiny_inference_world, tmp_path):
    """`load_for_inference` with an export returns its gates, not the checkpoint's own untrained ones
    (merged the other way round, every check above still passed); every other leaf is the checkpoint's."""
    from meteora_jax.generate import load_for_inference

    base, _, _ = load_for_inference(tiny_inference_world.model)
    gates, _ = split_params(base)
    rng = np.random.default_rng([SEED % 2**63, 3])
    trained = jax.tree.map(lambda g: np.asarray(rng.standard_normal(g.shape), np.float32), gates)
    folder = export_gates(tmp_path / "gates", trained, list(tiny_inference_world.adapter_names))
    params, _, _ = load_for_inference(tiny_inference_world.model, folder)
    got = traverse_util.flatten_dict(params)
    for path, want in traverse_util.flatten_dict(trained).items():
        np.testing.assert_array_equal(np.asarray(got[path]), want, err_msg=f"seed={SEED}: {'/'.join(path)}")
    for path, want in traverse_util.flatten_dict(split_params(base)[1]).items():
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want), err_msg="/".join(path))


def test_inference_loads_gates_without_training_dependencies(tiny_inference_world, tmp_path):
    """Loading a model with trained gates for generation imports neither the trainer nor its data
    and optimizer libraries (datasets, optax, ml_collections), which an inference-only install may
    lack: `load_for_inference` and `cli_options` with a gate export, in a fresh process."""
    from meteora_jax.checkpoint import restore_checkpoint

    params, _, _ = restore_checkpoint(tiny_inference_world.model)
    gates_dir = export_gates(tmp_path / "gates", split_params(params)[0], tiny_inference_world.adapter_names,
                             {"top_k": 1})
    code = f"""
import sys
from meteora_jax.generate import cli_options, load_for_inference
_, config, names = load_for_inference({tiny_inference_world.model!r}, {gates_dir!r})
assert config.meteora.top_k == 1, config.meteora.top_k
tok = type("Tok", (), dict(pad_token_id=0, eos_token_id=1))()
cli_options(tok, names, gates={gates_dir!r})
print(sorted(m for m in ("datasets", "optax", "ml_collections", "meteora_jax.train", "meteora_jax.data")
             if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
