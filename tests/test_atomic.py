"""Atomic writes leave files with the permissions a plain open() would give."""

import os
import stat

import pytest
import torch

from flipsafe import atomic, checkpoint
from flipsafe.models import build


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
