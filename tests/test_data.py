"""Site data: the demo federation builder and the MONAI pipeline from a manifest, on real PNG files."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fedopal.model.backbones import IMAGENET
from fedopal.config import config_from_dict
from fedopal.site.data import DataError, build_datasets, build_transforms, label_counts, read_manifest
from fedopal.tools.prepare import build_federation

from conftest import NPZ


def test_demo_federation_is_real_pngs_with_per_site_splits(small_federation):
    root, summary = small_federation
    for site in ("site-1", "site-2"):
        samples = read_manifest(str(root / site / "manifest.csv"), 2)
        assert {s.split for s in samples} == {"train", "val", "test"}
        img = Image.open(samples[0].path)
        assert img.format == "PNG" and img.size == (28, 28)
    assert summary["sites"]["site-1"]["shift"] != summary["sites"]["site-2"]["shift"]


def test_default_demo_federation_has_30_test_images_per_class(tmp_path):
    summary = build_federation(NPZ, str(tmp_path / "fed"), num_sites=4, seed=0)
    for site, info in summary["sites"].items():
        assert min(info["test"]) >= 30, site
        samples = read_manifest(str(tmp_path / "fed" / site / "manifest.csv"), 2)
        assert label_counts(samples, "test") == dict(enumerate(info["test"]))
    fractions = [info["class_fractions"][0] for info in summary["sites"].values()]
    assert max(fractions) - min(fractions) > 0.1  # label skew across sites
    assert json.load(open(tmp_path / "fed" / "federation.json"))["seed"] == 0


def test_federation_is_deterministic_by_seed(tmp_path):
    a = build_federation(NPZ, str(tmp_path / "a"), num_sites=2, seed=3, train_per_site=20, val_per_site=8,
                         test_per_site=8, min_test_per_class=2, min_val_per_class=2)
    b = build_federation(NPZ, str(tmp_path / "b"), num_sites=2, seed=3, train_per_site=20, val_per_site=8,
                         test_per_site=8, min_test_per_class=2, min_val_per_class=2)
    assert a == b
    img_a = np.array(Image.open(tmp_path / "a" / "site-2" / "images" / "train_00000.png"))
    img_b = np.array(Image.open(tmp_path / "b" / "site-2" / "images" / "train_00000.png"))
    assert np.array_equal(img_a, img_b)


def test_pipeline_resizes_repeats_channels_and_normalizes(small_federation):
    root, _ = small_federation
    cfg = config_from_dict({"data": {"image_size": 64, "in_channels": 1}})
    samples = read_manifest(str(root / "site-1" / "manifest.csv"), 2)
    ds = build_datasets(cfg.data, samples, model_in_channels=3, normalization=IMAGENET)
    item = ds["test"][0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["image"].min() < 0  # ImageNet mean subtracted
    assert int(item["label"]) in (0, 1)
    raw = build_transforms(cfg.data, 1, None, train=False)({"image": samples[0].path, "label": 0})
    assert raw["image"].shape == (1, 64, 64) and 0.0 <= raw["image"].min() and raw["image"].max() <= 1.0


def test_augmentation_only_on_train(small_federation):
    cfg = config_from_dict({"data": {"image_size": 32}})
    names = lambda t: [type(s).__name__ for s in t.transforms]  # noqa: E731
    assert "RandAffined" in names(build_transforms(cfg.data, 1, None, train=True))
    assert "RandAffined" not in names(build_transforms(cfg.data, 1, None, train=False))


def _manifest(tmp_path, rows, header=("path", "label", "split")):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / name)
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.mark.parametrize("rows,header,needle", [
    ([("a.png", 0, "train")], ("path", "label"), "missing column"),
    ([("a.png", "x", "train")], None, "not an integer"),
    ([("a.png", 5, "train")], None, "out of range"),
    ([("a.png", 0, "training")], None, "not one of"),
    ([("missing.png", 0, "train")], None, "not found"),
    ([("a.png", 0, "train"), ("b.png", 1, "val")], None, "'test' split is empty"),
])
def test_bad_manifest_gets_a_clear_error(tmp_path, rows, header, needle):
    path = _manifest(tmp_path, rows, header or ("path", "label", "split"))
    with pytest.raises(DataError, match=needle) as err:
        read_manifest(path, num_classes=2)
    assert "manifest.csv" in str(err.value) and "Fix" in str(err.value) and "\n" not in str(err.value)


def test_channel_mismatch_without_repeat_is_an_error():
    cfg = config_from_dict({"data": {"in_channels": 1, "channel_adapt": "error"}})
    with pytest.raises(DataError, match="channel"):
        build_transforms(cfg.data, 3, IMAGENET, train=False)


@pytest.mark.parametrize("source,data_channels,model_channels", [
    ("retinamnist.npz", 3, 3),    # RGB files, RGB backbone (EfficientNet, HF ViT/DINOv2): the case that drifted
    ("pneumoniamnist.npz", 1, 1),  # grayscale files, a normalized 1-channel backbone: drifted too
    ("pneumoniamnist.npz", 1, 3),  # grayscale files repeated to RGB: the repeat made a copy, never drifted
])
def test_reading_the_training_split_never_changes_it(tmp_path, source, data_channels, model_channels):
    """Pass after pass (a new augmentation seed each, as the trainer sets them) every training image stays within
    its reference: the PNG read by PIL, scaled to [0, 1] and normalized once in float64. Augmentation (RandAffine:
    bilinear, border padding) only mixes neighbouring pixels, so no value may leave the reference's range, and an
    image the augmentation left alone equals its reference. Regression: the cached tensors were normalized again
    on every pass where RandAffine did not fire (x 4.4 per pass with the ImageNet statistics)."""
    images = np.load(os.path.join(os.path.dirname(NPZ), source))["train_images"][:10]
    rows = []
    for i, array in enumerate(images):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
        rows.append((f"{i}.png", i % 2, "train" if i < 8 else ("val", "test")[i - 8]))
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    cfg = config_from_dict({"data": {"image_size": 28, "in_channels": data_channels}})
    samples = read_manifest(str(tmp_path / "manifest.csv"), 2)
    train = build_datasets(cfg.data, samples, model_in_channels=model_channels, normalization=IMAGENET)["train"]
    mean, std = (np.array(v[:model_channels], np.float64).reshape(-1, 1, 1) for v in IMAGENET)
    refs = []
    for array in images[:8]:  # the training split
        x = np.asarray(array, np.float64) / 255.0
        x = x.transpose(2, 0, 1) if x.ndim == 3 else np.repeat(x[None], model_channels, axis=0)
        refs.append((x - mean) / std)
    untouched = 0
    for augment_seed in range(4):
        train.augment_seed = augment_seed
        for i, ref in enumerate(refs):
            image = train[i]["image"].numpy().astype(np.float64)
            assert np.array_equal(image, train[i]["image"].numpy()), "same seed, same image"
            low, high = ref.min(axis=(1, 2), keepdims=True), ref.max(axis=(1, 2), keepdims=True)
            assert (image >= low - 1e-4).all() and (image <= high + 1e-4).all(), (augment_seed, i)
            untouched += bool(np.allclose(image, ref, atol=1e-4))
    assert untouched >= 6  # RandAffine fires with p = 0.5: about half of the 32 reads leave the image as it was
