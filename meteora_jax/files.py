"""Output files written whole or not at all.

    with written_whole("runs/eval/results.json") as f:
        json.dump(results, f)

The data goes to a uniquely named `.partial` file beside the target, renamed over it only once the
block has finished: an error (bad input found late, a full disk, Ctrl-C) leaves the earlier file as
it was and no partial file behind, and two writers of one path never share a temporary file.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def written_whole(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Yields a file opened in `mode` ("w": UTF-8 text, "wb": bytes) that replaces `path` when the
    block ends without an error; its folder is created if missing."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}; choose 'w' or 'wb'")
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{uuid.uuid4().hex[:8]}.partial"
    try:
        with open(partial, mode.replace("w", "x"), encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise
