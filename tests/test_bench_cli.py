"""The benchmark scripts' command lines (scripts/bench_*.py, scripts/profile_decode.py): bad input stops
a script before any weights are made or anything compiles, with exit status 2, one error line naming the
option, no traceback and no output file; the defaults still pass those checks."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough that a script which failed to stop early would finish (or fail) in seconds on a CPU.
TINY_GENERATE = ["--tiny", "--num-layers", "1", "--batches", "1", "--prompt-len", "4", "--new-tokens", "3",
                 "--reps", "1", "--layouts", "unrolled"]
TINY_PROFILE = ["--tiny", "--num-layers", "1", "--batches", "1", "--reps", "1", "--cache-len", "8"]

# (script, argv, the option the error names); "{out}" is a results path in a folder that does not
# exist yet (the scripts make it when they write), "{file}" an existing file, "{dir}" an existing folder.
BAD_INPUTS = {
    "kernels_row_T0": ("bench_kernels", ["--no-check", "--rows", "64:8:0", "--only", "base", "--out", "{dir}/r.json"],
                       "--rows"),
    "kernels_variant_column": ("bench_kernels", ["--no-check", "--rows", "64:8:4", "--only", "pallas_sorted",
                                                 "--out", "{dir}/r.json"], "--only"),
    "kernels_check_only_no_check": ("bench_kernels", ["--check-only", "--no-check", "--out", "{out}"], "--no-check"),
    "kernels_out_under_file": ("bench_kernels", ["--no-check", "--rows", "64:8:4", "--only", "base",
                                                 "--out", "{file}/x.json"], "--out"),
    "generate_batches": ("bench_generate", TINY_GENERATE + ["--batches", "1,,2", "--out", "{out}"], "--batches"),
    "generate_models": ("bench_generate", TINY_GENERATE + ["--models", "bogus", "--out", "{out}"], "--models"),
    # Past the model's positions: a traceback after the weights were built and T(1) timed.
    "generate_too_long": ("bench_generate", TINY_GENERATE + ["--prompt-len", "8190", "--out", "{out}"], "--prompt-len"),
    "profile_blocks": ("profile_decode", TINY_PROFILE + ["--routed-blocks", "block_k=x", "--out", "{out}"],
                       "--routed-blocks"),
    "profile_compare_without_meteora": ("profile_decode", TINY_PROFILE + ["--compare", "--models", "base",
                                                                          "--out", "{out}"], "--compare"),
    "routed_shapes": ("bench_routed_lora", ["--shapes", "4096", "--tokens", "1", "--out", "{out}"], "--shapes"),
    "side_gemm_layers_0": ("bench_side_gemm", ["--groups", "o", "--tokens", "1", "--variants", "one", "--layers", "0",
                                               "--out", "{out}"], "--layers"),
    "train_json_is_folder": ("bench_train", ["--timeout", "1", "--json", "{dir}"], "--json"),
    "train_dropout_one": ("bench_train", ["--timeout", "1", "--lora-dropout", "1", "--json", "{out}"], "--lora-dropout"),
    "train_expert_top_k": ("bench_train", ["--timeout", "1", "--mixlora-impls", "auto", "--experts", "2",
                                           "--expert-top-k", "3", "--json", "{out}"], "--expert-top-k"),
    "train_mixlora_impl": ("bench_train", ["--timeout", "1", "--mixlora-impls", "xla_gather", "--json", "{out}"],
                           "--mixlora-impls"),
}


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_early_with_one_line(case, tmp_path):
    script, argv, option = BAD_INPUTS[case]
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()
    paths = dict(out=tmp_path / "new" / "result.json", file=tmp_path / "a_file", dir=tmp_path / "a_dir")
    argv = [a.format(**paths) for a in argv]
    before = _files(tmp_path)
    env = dict(os.environ, OUT=str(tmp_path / "default_out"), JAX_PLATFORMS="cpu")  # default --out paths too
    proc = subprocess.run([sys.executable, os.path.join("scripts", f"{script}.py"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-2000:], proc.stdout[-2000:])
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"{script}.py: error: ") and option in errors[0], err
    assert err.rstrip().endswith(errors[0]), err  # the message is the last line, not buried in a usage block
    assert _files(tmp_path) == before and not os.path.exists(tmp_path / "new")


class _Reached(Exception):
    """Raised in place of the first device call: the command line passed every check."""


def test_defaults_pass_the_checks(tmp_path, monkeypatch):
    """Each script with its default options gets past its checks to its first device call (or, for
    bench_train's --mode all, to its first child process), without making any file or folder first."""
    import jax

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(jax, "devices", reached)
    monkeypatch.setattr(jax.random, "key", reached)  # bench_side_gemm's first device call
    monkeypatch.setattr(subprocess, "run", reached)  # bench_train's --mode all children
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    for script in ("bench_generate", "profile_decode", "bench_routed_lora", "bench_side_gemm", "bench_kernels",
                   "bench_train"):
        main = runpy.run_path(os.path.join(REPO, "scripts", f"{script}.py"), run_name="cli_script")["main"]
        monkeypatch.setattr(sys, "argv", [f"{script}.py"])  # bench_kernels and bench_train read sys.argv
        with pytest.raises(_Reached):
            main() if script in ("bench_kernels", "bench_train") else main([])
    assert not os.path.exists(tmp_path / "out")


def test_bench_train_mixlora_one_is_one_expert_at_top_1():
    """mixlora_one, the one-LoRA baseline, has one expert at top-1 whatever --experts / --expert-top-k
    say (at top-2 of 1 expert it could not be built), with the same rank and impl as mixlora."""
    import types

    bench = runpy.run_path(os.path.join(REPO, "scripts", "bench_train.py"), run_name="bench")
    args = types.SimpleNamespace(experts=8, expert_rank=16, expert_top_k=2, kernel_impl="xla")
    got = {mode: bench["_model_config"](os.path.join(REPO, "configs", "tiny.py"), 1, 0, bench["_mixlora_of"](mode, args))[1]
           for mode in ("mixlora", "mixlora_one")}
    assert [(c.mixlora.num_experts, c.mixlora.top_k, c.mixlora.rank, c.mixlora.kernel_impl) for c in got.values()] == [
        (8, 2, 16, "xla"), (1, 1, 16, "xla")]
