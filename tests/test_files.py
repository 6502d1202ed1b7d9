"""meteora_jax.files.written_whole: an output file is replaced whole or not at all."""

from __future__ import annotations

import os

import pytest

from meteora_jax.files import written_whole


def test_an_error_mid_write_keeps_the_old_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "out" / "results.json"  # the folder is created
    with written_whole(path) as f:
        f.write("old ü")
    assert path.read_text(encoding="utf-8") == "old ü"
    for error in (OSError("No space left on device"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with written_whole(path) as f:
                f.write("new, cut short")
                raise error
        assert path.read_text(encoding="utf-8") == "old ü"
        assert os.listdir(path.parent) == ["results.json"]
    with written_whole(path, "wb") as f:
        f.write(b"\x89PNG")
    assert path.read_bytes() == b"\x89PNG" and os.listdir(path.parent) == ["results.json"]
    with pytest.raises(ValueError, match="choose 'w' or 'wb'"):
        with written_whole(path, "a"):
            pass
