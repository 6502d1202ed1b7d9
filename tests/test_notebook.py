"""notebooks/inference.ipynb runs top to bottom (nbclient) on the tiny default world."""

from __future__ import annotations

import os
import time

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inference_notebook_executes(tiny_inference_world, tmp_path, monkeypatch):
    monkeypatch.setenv("METEORA_TINY_WORLD", tiny_inference_world.root)
    monkeypatch.setenv("METEORA_TINY_GATES", str(tmp_path / "no_gates"))
    monkeypatch.setenv("METEORA_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(os.path.join(REPO, "notebooks", "inference.ipynb"), as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()
    elapsed = time.perf_counter() - start

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert text.count("compiled programs so far: 1") == 2  # the second batch reused the first program
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert (tmp_path / "out" / "routing.png").stat().st_size > 1000
    assert "arith" in (tmp_path / "out" / "routing.html").read_text()
    assert (tmp_path / "out" / "eval.json").is_file()
    assert elapsed < 90, f"the notebook took {elapsed:.0f} s"
