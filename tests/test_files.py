"""meteora_jax.files.written_whole: an output file is replaced whole or not at all."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from conftest import child_env
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


def test_links_permissions_special_files_and_long_names(tmp_path):
    target = tmp_path / "real.jsonl"
    target.write_text("old")
    os.chmod(target, 0o600)
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with written_whole(link) as f:
        f.write("new")
    assert link.is_symlink() and target.read_text() == "new"  # written through the link
    assert (target.stat().st_mode & 0o777) == 0o600  # kept, as open(path, "w") keeps it
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    with written_whole(fifo) as f:
        f.write("through the pipe")
    assert os.read(reader, 100) == b"through the pipe" and stat.S_ISFIFO(os.stat(fifo).st_mode)
    os.close(reader)
    long_name = tmp_path / ("x" * 250)  # a name open() takes: the temporary name must fit too
    with written_whole(long_name) as f:
        f.write("ok")
    assert long_name.read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["real.jsonl", "link.jsonl", "pipe", "x" * 250])


_PRINT_AROUND = """
import sys
from meteora_jax.files import written_whole
print("printed before", flush=True)
with written_whole(sys.argv[1]) as f:
    f.write("written whole\\n")
print("printed after")
"""


@pytest.mark.parametrize("stream", ["/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"])
def test_stdout_piped_or_redirected(tmp_path, stream):
    """/dev/stdout as the output path (e.g. generate.py --json /dev/stdout), into a pipe and into a
    file the shell redirected to: every line arrives, in order. Through a pipe its real path does not
    exist as a file (a FileNotFoundError after all the work); into a file it was replaced by a rename,
    losing what had been printed before."""
    want = "printed before\nwritten whole\nprinted after\n"
    command = [sys.executable, "-c", _PRINT_AROUND, stream]
    piped = subprocess.run(command, capture_output=True, text=True, timeout=120, env=child_env())
    assert piped.returncode == 0 and piped.stdout == want, piped.stderr[-2000:]
    redirected = tmp_path / "out.txt"
    with open(redirected, "w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.PIPE, text=True, timeout=120, env=child_env())
    assert proc.returncode == 0 and redirected.read_text() == want, proc.stderr[-2000:]
