"""imagefolder:<dir> datasets from PNG files written with Pillow."""

import pytest
import torch
from PIL import Image

from flipsafe.data import load
from flipsafe.errors import ConfigError, DataError, UnknownNameError

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def write(folder, name, colour, size=(10, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(folder / name)


def make_flat(root, per_class=5):
    for cls, colour in (("red", RED), ("blue", BLUE)):
        for i in range(per_class):
            write(root / cls, f"{i}.png", colour, size=(10 + i, 40 - i))
    return root


def pixels(split, bundle):
    """Images back on the 0..255 scale."""
    images, labels = split.tensors()
    mean = torch.tensor(bundle.mean).reshape(-1, 1, 1)
    std = torch.tensor(bundle.std).reshape(-1, 1, 1)
    return (images * std + mean) * 255, labels


def test_flat_folder_split_classes_and_content(tmp_path):
    bundle = load(f"imagefolder:{make_flat(tmp_path / 'flat')}")
    assert bundle.classes == ["blue", "red"]  # sorted folder names
    assert (bundle.in_channels, bundle.image_size) == (3, 32)
    assert len(bundle.train) == 8 and len(bundle.test) == 2  # 1 of 5 per class held out
    assert sorted(bundle.test.labels.tolist()) == [0, 1]
    image, label = bundle.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and type(label) is int
    for split in (bundle.train, bundle.test):
        values, labels = pixels(split, bundle)
        for img, y in zip(values, labels):
            colour = BLUE if y == 0 else RED
            expected = torch.tensor(colour, dtype=torch.float32).reshape(3, 1, 1).expand(3, 32, 32)
            torch.testing.assert_close(img, expected, atol=1e-3, rtol=0)
    # Every source file is named, and it lives in the folder of its class.
    for path, y in zip(bundle.test.sources, bundle.test.labels.tolist()):
        assert f"/{bundle.classes[y]}/" in path


def test_normalised_with_train_statistics(tmp_path):
    bundle = load(f"imagefolder:{make_flat(tmp_path / 'flat')}")
    # Half the train images are pure red and half pure blue: R and B have mean 0.5,
    # G is always 0; R over 8 * 32 * 32 = 8192 pixels, half 0 and half 1, has sample
    # std 0.5 * sqrt(8192 / 8191). The blank G channel is centred but not scaled.
    assert bundle.mean == pytest.approx((0.5, 0.0, 0.5), abs=1e-6)
    assert bundle.std[0] == pytest.approx(0.5 * (8192 / 8191) ** 0.5, abs=1e-9)
    assert bundle.std[1] == 1.0
    assert torch.isfinite(bundle.train.tensors()[0]).all()


def test_split_is_deterministic(tmp_path):
    root = make_flat(tmp_path / "flat", per_class=10)
    a, b = load(f"imagefolder:{root}"), load(f"imagefolder:{root}", seed=7)
    assert a.test.sources == b.test.sources


def test_size_and_grayscale_options(tmp_path):
    root = make_flat(tmp_path / "flat")
    bundle = load(f"imagefolder:{root}?size=16&channels=1")
    assert (bundle.in_channels, bundle.image_size) == (1, 16)
    assert bundle.train[0][0].shape == (1, 16, 16)
    values, labels = pixels(bundle.train, bundle)
    # ITU-R 601 luma, as Pillow's "L" conversion: red 255*0.299 = 76, blue 255*0.114 = 29.
    for img, y in zip(values, labels):
        assert img.round().unique().tolist() == ([29.0] if y == 0 else [76.0])


def test_train_and_test_folders_used_as_given(tmp_path):
    root = tmp_path / "split"
    for i in range(3):
        write(root / "train" / "cat", f"{i}.png", RED)
        write(root / "train" / "dog", f"{i}.png", BLUE)
    write(root / "val" / "cat", "a.png", GREEN)
    write(root / "val" / "dog", "a.png", GREEN)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()
    bundle = load(f"imagefolder:{root}")
    assert bundle.classes == ["cat", "dog"]
    assert len(bundle.train) == 6 and len(bundle.test) == 2
    values, _ = pixels(bundle.test, bundle)
    assert values[:, 1].round().unique().tolist() == [255.0]  # the green val images


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(f"imagefolder:{tmp_path / 'nowhere'}")


def test_folder_without_class_folders(tmp_path):
    with pytest.raises(DataError, match="no class sub-folders"):
        load(f"imagefolder:{tmp_path}")


def test_folder_with_one_class_is_refused_as_such(tmp_path):
    for i in range(4):
        write(tmp_path / "red", f"{i}.png", RED)
    with pytest.raises(DataError, match=r"has one class sub-folder \(red\); .*at least two"):
        load(f"imagefolder:{tmp_path}")


def test_class_folders_without_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        load(f"imagefolder:{tmp_path}")


def test_class_folder_without_training_images(tmp_path):
    make_flat(tmp_path)
    (tmp_path / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra"):
        load(f"imagefolder:{tmp_path}")


def test_unreadable_image_is_named(tmp_path):
    make_flat(tmp_path)
    (tmp_path / "red" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="broken.png"):
        load(f"imagefolder:{tmp_path}")


def test_class_folders_differ_between_train_and_test(tmp_path):
    write(tmp_path / "train" / "cat", "0.png", RED)
    write(tmp_path / "train" / "dog", "0.png", RED)
    write(tmp_path / "test" / "cat", "0.png", RED)
    write(tmp_path / "test" / "cow", "0.png", RED)
    with pytest.raises(DataError, match="differ") as err:
        load(f"imagefolder:{tmp_path}")
    assert "dog" in str(err.value) and "cow" in str(err.value)


def test_train_without_test_folder(tmp_path):
    write(tmp_path / "train" / "cat", "0.png", RED)
    with pytest.raises(DataError, match="test/ or val/"):
        load(f"imagefolder:{tmp_path}")


def test_too_few_images_to_split(tmp_path):
    write(tmp_path / "a", "0.png", RED)
    write(tmp_path / "b", "0.png", BLUE)
    with pytest.raises(DataError, match="at least 2"):
        load(f"imagefolder:{tmp_path}")


@pytest.mark.parametrize("query,error", [
    ("size=0", ConfigError), ("size=big", ConfigError), ("channels=2", ConfigError),
    ("colour=1", UnknownNameError),
])
def test_bad_options(tmp_path, query, error):
    with pytest.raises(error):
        load(f"imagefolder:{make_flat(tmp_path)}?{query}")


def test_rgb_pixels_are_contiguous(tmp_path):
    # Channels-last pixels once crashed every conv-layer campaign on image folders.
    bundle = load(f"imagefolder:{make_flat(tmp_path / 'flat')}?size=8")
    for split in (bundle.train, bundle.test):
        assert split.pixels.is_contiguous()
        assert split.tensors()[0].is_contiguous()


def test_size_over_the_stated_maximum_is_refused_before_reading(tmp_path):
    from flipsafe.data import MAX_IMAGE_SIZE

    root = make_flat(tmp_path / "flat")
    with pytest.raises(ConfigError, match=f"at most {MAX_IMAGE_SIZE}"):
        load(f"imagefolder:{root}?size=100000")
    assert load(f"imagefolder:{root}?size={MAX_IMAGE_SIZE}&channels=1").image_size == MAX_IMAGE_SIZE


def test_a_dataset_that_cannot_fit_in_memory_is_refused_before_reading(tmp_path, monkeypatch):
    from flipsafe.data import imagefolder

    root = make_flat(tmp_path / "flat")  # 10 RGB images
    # 10 images x 3 x 64 x 64 float32 = 491,520 bytes; allow just less than that.
    fraction = imagefolder.MEMORY_FRACTION
    read = imagefolder._read
    monkeypatch.setattr(imagefolder, "available_memory_bytes", lambda: int(491_520 / fraction) - 1)
    monkeypatch.setattr(imagefolder, "_read",
                        lambda *a: pytest.fail("images were read before the memory check"))
    with pytest.raises(ConfigError, match="smaller size") as err:
        load(f"imagefolder:{root}?size=64")
    assert "10 images" in str(err.value)
    monkeypatch.setattr(imagefolder, "available_memory_bytes", lambda: int(491_520 / fraction) + 1)
    monkeypatch.setattr(imagefolder, "_read", read)
    assert load(f"imagefolder:{root}?size=64").image_size == 64


def test_available_memory_is_read_from_the_system():
    from flipsafe.data import imagefolder

    free = imagefolder.available_memory_bytes()
    assert free is None or 1 << 20 < free < 1 << 50
