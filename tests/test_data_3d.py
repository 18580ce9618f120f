"""3D volumes: NIfTI through nibabel and MONAI, the 3D demo federation, and 2D/3D mix-ups caught up front."""

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fedopal.config import config_from_dict
from fedopal.site.data import DataError, build_datasets, build_transforms, file_format, read_manifest
from fedopal.tools.prepare import build_federation, nifti_affine

from conftest import REPO

NPZ_3D = f"{REPO}/data/medmnist/adrenalmnist3d.npz"


def cfg3d(**data):
    return config_from_dict({"data": {"spatial_dims": 3, "image_size": 16, **data},
                             "model": {"backbone": "monai_vit", "pretrained": False}})


def write_volume(path, vol, affine):
    nib.save(nib.Nifti1Image(vol, affine), str(path))
    return str(path)


def test_nifti_round_trip_keeps_shape_affine_and_intensities(tmp_path):
    vol = np.zeros((20, 24, 28), np.float32)
    vol[5:10, 6:12, 7:14] = 100.0
    affine = np.diag([0.8, 0.9, 1.0, 1.0])
    affine[:3, 3] = [-8.0, -10.0, 12.0]
    path = write_volume(tmp_path / "v.nii.gz", vol, affine)
    cfg = cfg3d(spatial_mode="crop", image_size=28, intensity_range=[0.0, 100.0])
    out = build_transforms(cfg.data, 1, None, train=False, family="nifti")({"image": path, "label": 1})
    assert out["image"].shape == (1, 28, 28, 28)
    loaded = build_transforms(cfg.data, 1, None, train=False, family="nifti").transforms[0]({"image": path})["image"]
    assert np.allclose(loaded.affine.numpy(), affine)  # MONAI kept nibabel's affine
    img = out["image"][0]
    assert float(img.max()) == 1.0 and float(img.min()) == 0.0
    assert int((img == 1.0).sum()) == 5 * 6 * 7  # the block survived crop/pad intact


def test_orientation_and_spacing_steps(tmp_path):
    vol = np.random.default_rng(0).random((10, 10, 10)).astype(np.float32)
    path = write_volume(tmp_path / "v.nii", vol, np.diag([2.0, 2.0, 2.0, 1.0]))
    cfg = cfg3d(orientation="LPS", spacing=[1.0, 1.0, 1.0], spatial_mode="crop", image_size=20)
    t = build_transforms(cfg.data, 1, None, train=False, family="nifti")
    names = [type(s).__name__ for s in t.transforms]
    assert names[1:3] == ["Orientationd", "Spacingd"]
    out = t({"image": path, "label": 0})
    assert out["image"].shape == (1, 20, 20, 20)


def test_3d_federation_is_real_nifti_with_the_nominal_affine(tmp_path):
    summary = build_federation(NPZ_3D, str(tmp_path / "fed"), num_sites=2, seed=0, train_per_site=10,
                               val_per_site=4, test_per_site=6, min_test_per_class=3, min_val_per_class=2,
                               skew_prior="global")
    samples = read_manifest(str(tmp_path / "fed" / "site-1" / "manifest.csv"), 2)
    assert samples[0].path.endswith(".nii.gz") and summary["image_shape"] == [28, 28, 28]
    img = nib.load(samples[0].path)
    assert img.shape == (28, 28, 28) and np.allclose(img.affine, nifti_affine(28))
    assert set(np.unique(np.asarray(img.dataobj))) <= set(range(256))
    cfg = cfg3d(image_size=16)
    ds = build_datasets(cfg.data, samples, 1, None)
    item = ds["train"][0]
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32


def _manifest(tmp_path, files):
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for i, name in enumerate(files):
            w.writerow([name, i % 2, ("train", "val", "test")[i % 3]])
    return str(path)


def test_2d_images_in_a_3d_config_are_refused(tmp_path):
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"{i}.png")
    samples = read_manifest(_manifest(tmp_path, [f"{i}.png" for i in range(3)]), 2)
    with pytest.raises(DataError, match="spatial_dims is 3 but the site holds 2D images"):
        file_format(samples, 3, "manifest.csv")


def test_3d_volumes_in_a_2d_config_are_refused(tmp_path):
    for i in range(3):
        write_volume(tmp_path / f"{i}.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    samples = read_manifest(_manifest(tmp_path, [f"{i}.nii.gz" for i in range(3)]), 2)
    with pytest.raises(DataError, match="a 3D array .8x8x8. in a config with data.spatial_dims 2. Fix: set data.spatial_dims: 3"):
        file_format(samples, 2, "manifest.csv")


def test_truncated_nifti_is_a_clear_error(tmp_path):
    good = write_volume(tmp_path / "0.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    data = open(good, "rb").read()
    (tmp_path / "0.nii.gz").write_bytes(data[: len(data) // 3])
    for i in (1, 2):
        write_volume(tmp_path / f"{i}.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    samples = read_manifest(_manifest(tmp_path, [f"{i}.nii.gz" for i in range(3)]), 2)
    with pytest.raises(DataError, match="0.nii.gz.*Fix"):
        build_datasets(cfg3d().data, samples, 1, None, "manifest.csv")
