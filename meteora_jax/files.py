"""Output files written whole or not at all.

    with written_whole("runs/eval/results.json") as f:
        json.dump(results, f)

The data goes to a uniquely named hidden `.partial` file beside the target, renamed over it only
once the block has finished: an error (bad input found late, a full disk, Ctrl-C) leaves the
earlier file as it was and no partial file behind, and two writers of one path never share a
temporary file. A symlink is followed (its target is replaced) and an existing file keeps its
permissions; a path that is not a regular file (a FIFO, /dev/stdout) is written directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def written_whole(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Yields a file opened in `mode` ("w": UTF-8 text, "wb": bytes) that replaces `path` when the
    block ends without an error; its folder is created if missing."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}; choose 'w' or 'wb'")
    encoding = None if "b" in mode else "utf-8"
    path = os.path.realpath(os.fspath(path))  # a symlink's target is replaced, not the link
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO or device (/dev/stdout): written as is
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
