"""notebooks/inference.ipynb runs top to bottom (nbclient) on the tiny default world."""

from __future__ import annotations

import json
import os
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import TINY_CHAT_TEMPLATE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inference_notebook_executes(tiny_inference_world, tmp_path, monkeypatch):
    """With gates whose run recorded chat_template=False for a tokenizer that has a template, the
    notebook prompts as that run trained (and as the CLIs do), not as the tokenizer alone would."""
    from transformers import AutoTokenizer

    from meteora_jax.gates import export_gates, split_params
    from meteora_jax.generate import load_for_inference

    world = tmp_path / "world"  # the tiny world, its tokenizer given a chat template: False is a choice
    shutil.copytree(tiny_inference_world.root, world)
    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(world / "tokenizer")
    params, _, names = load_for_inference(tiny_inference_world.model)
    export_gates(tmp_path / "gates", split_params(params)[0], names, {"chat_template": False})
    monkeypatch.setenv("METEORA_TINY_WORLD", str(world))
    monkeypatch.setenv("METEORA_TINY_GATES", str(tmp_path / "gates"))
    monkeypatch.setenv("METEORA_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(os.path.join(REPO, "notebooks", "inference.ipynb"), as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert text.count("compiled programs so far: 1") == 2  # the second batch reused the first program
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert (tmp_path / "out" / "routing.png").stat().st_size > 1000
    assert "arith" in (tmp_path / "out" / "routing.html").read_text()
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["settings"]["chat_template"] is False
    assert "trained gates: True" in text
