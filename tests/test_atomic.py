"""Output paths are checked before any work: a clear ConfigError, never an OSError."""

import pytest

from flipsafe import atomic
from flipsafe.errors import ConfigError


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
