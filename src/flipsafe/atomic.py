"""Atomic file writes: a crash leaves the old file or the new one, never a partial one."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def _fsync(path: Path) -> None:
    # A directory fsync makes the rename itself durable; not every platform allows it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; once the body succeeds it is synced to disk
    and renamed over `path`, and if the body fails it is removed. The file gets the
    permissions open() would give a new file (0666 less the umask), whatever the
    writer used (safetensors, for one, creates 0600 files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def write_bytes(path, write) -> None:
    """Atomically write `path` by calling write(binary file object)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
