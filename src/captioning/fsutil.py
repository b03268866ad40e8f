"""Writes that a reader sees whole or not at all."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder to fill; when the block ends without error it becomes `path`.

    The folder is a temporary sibling of `path`, so the final rename is atomic: a reader sees
    all of `path` or nothing, and a block that raises (or a killed process) leaves no `path`.
    Of two processes writing the same `path` at once, the second to finish drops its copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
