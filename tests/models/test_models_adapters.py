"""torchvision/timm adapters, tested against stand-in modules (the real ones are not installed)."""

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from torch import nn

from flipsafe.errors import FlipsafeError, UnknownNameError
from flipsafe.models import build


def small_cnn(num_classes, in_chans=3):
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(in_chans, 8, 3, stride=2, padding=1, bias=False)),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


@pytest.fixture
def fake_torchvision(monkeypatch):
    calls = []

    def resnet18(*, weights, num_classes):  # like torchvision: no image_size argument
        calls.append({"name": "resnet18", "weights": weights, "num_classes": num_classes})
        return small_cnn(num_classes)

    def vit_b_16(*, weights, num_classes, image_size=224):
        calls.append({"name": "vit_b_16", "weights": weights, "num_classes": num_classes,
                      "image_size": image_size})
        return small_cnn(num_classes)

    builders = {"resnet18": resnet18, "vit_b_16": vit_b_16}
    models = types.ModuleType("torchvision.models")
    models.list_models = lambda module=None: sorted(builders)
    models.get_model = lambda name, **config: builders[name](**config)
    package = types.ModuleType("torchvision")
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return calls


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []

    def create_model(name, pretrained=True, num_classes=1000, in_chans=3, **kwargs):
        if kwargs:  # a CNN constructor rejects img_size, as in timm
            raise TypeError(f"ResNet.__init__() got an unexpected keyword argument "
                            f"'{next(iter(kwargs))}'")
        calls.append({"name": name, "pretrained": pretrained, "num_classes": num_classes,
                      "in_chans": in_chans})
        return small_cnn(num_classes, in_chans)

    timm = types.ModuleType("timm")
    timm.create_model = create_model
    timm.list_models = lambda: ["resnet18", "resnet34"]
    monkeypatch.setitem(sys.modules, "timm", timm)
    return calls


def test_torchvision_untrained_with_class_count(fake_torchvision):
    model = build("torchvision:resnet18", 7, in_channels=3, image_size=32)
    assert fake_torchvision == [{"name": "resnet18", "weights": None, "num_classes": 7}]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_torchvision_passes_image_size_when_accepted(fake_torchvision):
    build("torchvision:vit_b_16", 4, image_size=32)
    assert fake_torchvision[-1]["image_size"] == 32 and fake_torchvision[-1]["weights"] is None


def test_torchvision_stem_gets_requested_channels(fake_torchvision):
    model = build("torchvision:resnet18", 5, in_channels=1, image_size=8)
    conv = model[0][0]
    assert conv.in_channels == 1
    assert (conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == \
        (8, (3, 3), (2, 2), (1, 1))
    assert conv.bias is None
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 5)


def test_torchvision_unknown_name_suggests(fake_torchvision):
    with pytest.raises(UnknownNameError, match="resnet18"):
        build("torchvision:resnet19", 5)


def test_timm_untrained(fake_timm):
    model = build("timm:resnet18", 6, in_channels=1, image_size=8)
    assert fake_timm == [{"name": "resnet18", "pretrained": False, "num_classes": 6,
                          "in_chans": 1}]
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 6)
    with pytest.raises(UnknownNameError, match="timm"):
        build("timm:not_a_model", 6)


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_missing_library_says_how_to_install(monkeypatch, library):
    # None in sys.modules makes `import library` fail even where it is installed.
    monkeypatch.setitem(sys.modules, library, None)
    monkeypatch.setitem(sys.modules, f"{library}.models", None)
    with pytest.raises(FlipsafeError, match=r"pip install -c constraints.txt 'flipsafe\[vision\]'"):
        build(f"{library}:resnet18", 10)


def test_importing_flipsafe_models_does_not_import_vision_libraries(tmp_path):
    # Importable stand-ins on the path: an eager import would put them in sys.modules.
    for name in ("torchvision", "timm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    code = textwrap.dedent("""
        import sys
        import flipsafe.models
        flipsafe.models.build("resnet20", 10)
        assert "torchvision" not in sys.modules and "timm" not in sys.modules
        import torchvision  # the stand-in is importable, so the check above means something
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
