"""Output paths checked up front, and atomic file writes: a crash leaves the old file or
the new one, never a partial one."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

from flipsafe.errors import ConfigError, is_disk_full


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


def check_output(path, folder: bool, what: str = "output") -> Path:
    """Return `path` if it can be written as a folder (folder=True) or a file, else raise
    ConfigError saying why; creates nothing, so a command can check before its work."""
    path = Path(path).expanduser()
    if path.is_symlink() or path.exists():
        if folder and not path.is_dir():
            raise ConfigError(f"{what} '{path}' is an existing file; give a folder path")
        if not folder and path.is_dir():
            raise ConfigError(f"{what} '{path}' is a folder; give a file path")
        if not folder and not stat.S_ISREG(path.stat().st_mode):
            raise ConfigError(f"{what} '{path}' exists and is not a regular file; "
                              "give a file path")
        if not os.access(path if folder else path.parent, os.W_OK):
            raise ConfigError(f"cannot write {what} '{path}': permission denied")
        return path
    ancestor = path.parent
    # Path.exists() is False both for a missing path and for one under a file.
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"cannot create {what} '{path}': '{ancestor}' is a file, not a "
                          "folder; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create {what} '{path}': no permission to write in "
                          f"'{ancestor}'")
    return path


def make_folder(path, what: str = "output folder") -> Path:
    """Create folder `path` (and its parents) if needed; ConfigError if it cannot be."""
    path = check_output(path, folder=True, what=what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {what} '{path}': {exc.strerror or exc}") from exc
    return path


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
    path = check_output(path, folder=False)
    make_folder(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        # A place that refuses files (a pseudo file system, a read-only mount) is a bad
        # output path, not a crash; a full disk stays an OSError for the caller to word.
        if not is_disk_full(exc) and exc.filename in (str(tmp), str(path)):
            raise ConfigError(f"cannot write '{path}' ({exc.strerror}); choose another "
                              "output path") from exc
        raise
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
