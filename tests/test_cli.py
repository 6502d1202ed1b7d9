"""meteora_jax.cli.unwritable: an output path that cannot be written is named before any work."""

from __future__ import annotations

import os

from meteora_jax.cli import unwritable


def test_unwritable_names_the_file_or_its_folder(tmp_path, monkeypatch):
    out = tmp_path / "runs" / "results.json"  # missing folders are made at write time
    assert unwritable("--output", str(out)) is None
    out.parent.mkdir()
    out.write_text("{}")
    assert unwritable("--output", str(out)) is None
    assert unwritable("--output", str(out.parent)) == f"--output {out.parent} is a folder; give a file path"
    assert unwritable("--pictures", str(out), folder=True) == f"--pictures {out} is a file; give a folder path"
    assert "is a file, not a folder" in unwritable("--output", str(out / "x.json"))
    # os.access with a denied path (this suite may run as root, whom the kernel lets write anywhere)
    denied = set()
    monkeypatch.setattr(os, "access", lambda p, mode: os.fspath(p) not in denied)
    denied.add(str(out.parent))  # a writable file in a read-only folder: the rename into place fails
    assert unwritable("--output", str(out)) == f"--output {out}: its folder {out.parent} is not writable"
    assert unwritable("--pictures", str(out.parent), folder=True) == f"--pictures {out.parent} is not writable"
    denied.clear()
    denied.add(str(tmp_path))  # an existing folder is written into, whatever its parent allows
    assert unwritable("--pictures", str(out.parent), folder=True) is None
    denied.clear()
    denied.add(str(out))
    assert unwritable("--output", str(out)) == f"--output {out} is not writable"
