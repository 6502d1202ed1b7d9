"""Output files written whole or not at all.

    with written_whole("runs/eval/results.json") as f:
        json.dump(results, f)

The data goes to a uniquely named hidden `.partial` file beside the target, renamed over it only
once the block has finished: an error (bad input found late, a full disk, Ctrl-C) leaves the
earlier file as it was and no partial file behind, and two writers of one path never share a
temporary file. A symlink is followed (its target is replaced) and an existing file keeps its
permissions; a stream (/dev/stdout, /dev/fd/N), a FIFO or a device is written directly.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from typing import IO


# /dev/stdout's real path can be a pipe that does not exist as a file, or a file the shell redirected
# to, which a rename would replace (losing what was printed before): such paths are written in place.
_STREAM = re.compile(r"/dev/(stdout|stderr|fd/(\d+))|/proc/self/fd/(\d+)")


@contextlib.contextmanager
def written_whole(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Yields a file opened in `mode` ("w": UTF-8 text, "wb": bytes) that replaces `path` when the
    block ends without an error; its folder is created if missing."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}; choose 'w' or 'wb'")
    encoding = None if "b" in mode else "utf-8"
    given = os.path.abspath(os.fspath(path))
    path = os.path.realpath(given)  # a symlink's target is replaced, not the link
    stream = _STREAM.fullmatch(given)
    if stream:  # written through a copy of the descriptor, which shares the stream's position
        fd = {"stdout": 1, "stderr": 2}.get(stream[1]) or int(stream[2] or stream[3])
        sys.stdout.flush()
        sys.stderr.flush()
        with os.fdopen(os.dup(fd), mode, encoding=encoding) as f:
            yield f
        return
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or device: written as is
        with open(path, mode, encoding=encoding) as f:
            yield f
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, f".{name[:64]}.{uuid.uuid4().hex[:8]}.partial")  # (short: any name fits)
    try:
        with open(partial, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
        if os.path.exists(path):
            shutil.copymode(path, partial)  # an existing file keeps its permissions
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise


def replace_folder(new: str | os.PathLike, path: str | os.PathLike, previous: str | os.PathLike) -> None:
    """Renames the finished folder `new` to `path`. An existing `path` is moved to `previous` first,
    put back if the second rename fails, and deleted once `new` is in place."""
    if not os.path.exists(path):
        os.replace(new, path)
        return
    os.replace(path, previous)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(previous, path)
        raise
    shutil.rmtree(previous, ignore_errors=True)
