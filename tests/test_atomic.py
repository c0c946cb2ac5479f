"""Output paths are checked before any work (a clear ConfigError, never an OSError), and
atomic writes leave files with the permissions a plain open() would give."""

import os
import stat

import pytest
import torch

from flipsafe import atomic, checkpoint
from flipsafe.errors import ConfigError
from flipsafe.models import build


def test_a_new_folder_or_file_under_existing_folders_is_fine(tmp_path):
    assert atomic.check_output(tmp_path / "a" / "b", folder=True) == tmp_path / "a" / "b"
    assert atomic.check_output(tmp_path / "a" / "r.html", folder=False) == tmp_path / "a" / "r.html"
    assert not (tmp_path / "a").exists()  # checking creates nothing
    (tmp_path / "r.html").write_text("old")
    atomic.check_output(tmp_path / "r.html", folder=False)  # an existing file is replaced
    atomic.check_output(tmp_path, folder=True)  # an existing folder is reused


@pytest.mark.parametrize("folder", [True, False])
def test_a_path_under_a_file_is_refused(tmp_path, folder):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        atomic.check_output(tmp_path / "f" / "sub" / "out", folder=folder)
    with pytest.raises(ConfigError, match="'/dev/null' is"):
        atomic.check_output("/dev/null/x", folder=folder)


def test_wrong_kinds_of_existing_paths_are_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="existing file"):
        atomic.check_output(tmp_path / "f", folder=True)
    with pytest.raises(ConfigError, match="is a folder"):
        atomic.check_output(tmp_path, folder=False)
    with pytest.raises(ConfigError, match="not a regular file"):
        atomic.check_output("/dev/null", folder=False)


def test_writers_raise_config_errors(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError):
        atomic.write_text(tmp_path / "f" / "out.txt", "hello")
    with pytest.raises(ConfigError):
        atomic.make_folder(tmp_path / "f")
    assert atomic.make_folder(tmp_path / "d" / "e").is_dir()
    assert (tmp_path / "f").read_text() == "x"


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_checkpoint_weights_and_config_share_the_umask_permissions(tmp_path, umask_027):
    torch.manual_seed(0)
    folder = checkpoint.save(build("mlp", 10, in_channels=1, image_size=8), tmp_path / "m",
                             {"arch": "mlp", "num_classes": 10, "in_channels": 1, "image_size": 8})
    expected = 0o666 & ~umask_027  # 0o640
    assert _mode(folder / checkpoint.WEIGHTS) == expected
    assert _mode(folder / checkpoint.CONFIG) == expected


def test_a_writer_that_makes_private_files_still_gets_open_permissions(tmp_path):
    path = tmp_path / "x.bin"

    def private(f):
        os.fchmod(f.fileno(), 0o600)
        f.write(b"x")

    atomic.write_bytes(path, private)
    mask = os.umask(0)
    os.umask(mask)
    assert _mode(path) == 0o666 & ~mask
    with open(tmp_path / "plain", "w") as f:
        f.write("x")
    assert _mode(path) == _mode(tmp_path / "plain")


def test_a_place_that_refuses_files_is_a_config_error_not_a_crash(tmp_path):
    import errno

    target = tmp_path / "r.html"
    # What /proc does: the folder is there, but no file can be created in it.
    refused = "cannot write .*r.html.*choose another output path"
    with pytest.raises(ConfigError, match=refused), atomic.atomic_path(target) as tmp:
        raise OSError(errno.ENOENT, "No such file or directory", str(tmp))
    assert not list(tmp_path.iterdir())
    # A full disk is left to the caller, which words it (exit 1).
    with pytest.raises(OSError) as err, atomic.atomic_path(target) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert not isinstance(err.value, ConfigError)
