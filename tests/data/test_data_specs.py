"""Dataset spec strings that name nothing loadable."""

import pytest

from flipsafe.data import load
from flipsafe.errors import DataError, FlipsafeError, UnknownNameError


@pytest.mark.parametrize("spec", ["mnist", "digits:extra", "/data/images", "cifar:x"])
def test_unknown_dataset_lists_choices(spec):
    with pytest.raises(UnknownNameError) as err:
        load(spec)
    message = str(err.value)
    for choice in ("digits", "imagefolder:<dir>", "cifar10:<dir>", "cifar100:<dir>"):
        assert choice in message


@pytest.mark.parametrize("spec", ["imagefolder:", "cifar10:", "cifar100"])
def test_folder_required(spec):
    with pytest.raises(DataError, match="needs a folder"):
        load(spec)


def test_errors_are_flipsafe_errors():
    with pytest.raises(FlipsafeError):
        load("nothing")
