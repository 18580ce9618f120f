"""Decode what the file says: every reader agrees with an independent reference (PIL, NumPy, nibabel, pydicom reading
the same file) on pixel values and axis order, so the same picture stored in any format gives the same tensor.
DICOM files are written here with pydicom (tests/dicomgen.py), anonymized; none are committed."""

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_windowing
from pydicom.uid import JPEGLSLossless, RLELossless

from fedopal.config import config_from_dict
from fedopal.site.data import build_transforms
from fedopal.site.readers import DataError, DecodeOptions, decode

from dicomgen import write_dicom, write_series

RNG = np.random.default_rng(7)
PICTURE = RNG.integers(0, 256, (24, 24)).astype(np.uint8)  # not symmetric: a transpose would show


def eval_pipeline(tmp_files, size=24, model_channels=1, **data):
    """The site's evaluation pipeline at the picture's own size (crop/pad to the same size is the identity)."""
    cfg = config_from_dict({"data": {"image_size": size, "spatial_mode": "crop", **data}})
    t = build_transforms(cfg.data, model_channels, None, train=False)
    return {name: t({"image": path, "label": 0})["image"].numpy() for name, path in tmp_files.items()}


def stored_two_ways(tmp_path):
    """The same picture in every format; the reference reads each file with its own library."""
    p = tmp_path
    Image.fromarray(PICTURE).save(p / "gray.png")
    Image.fromarray(PICTURE.astype(np.uint16) * 257).save(p / "gray16.png")  # I;16
    palette = Image.new("P", PICTURE.shape[::-1])
    palette.putpalette([v for k in range(256) for v in (255 - k,) * 3])  # index k shows gray 255 - k
    palette.putdata(list((255 - PICTURE).ravel()))
    palette.save(p / "palette.png")
    Image.fromarray(np.stack([PICTURE] * 3, -1)).save(p / "rgb_gray.png")
    Image.fromarray(np.dstack([PICTURE, np.full_like(PICTURE, 7)])).convert("LA").save(p / "alpha.png")
    np.save(p / "array.npy", PICTURE)
    nib.save(nib.Nifti1Image(PICTURE[..., None], np.eye(4)), str(p / "slice.nii.gz"))  # (24, 24, 1)
    write_dicom(p / "image.dcm", PICTURE)
    write_dicom(p / "mono1.dcm", 255 - PICTURE, photometric="MONOCHROME1")
    files = {k: str(p / f) for k, f in [("png", "gray.png"), ("png16", "gray16.png"), ("palette", "palette.png"),
                                        ("rgb", "rgb_gray.png"), ("alpha", "alpha.png"), ("npy", "array.npy"),
                                        ("nifti", "slice.nii.gz"), ("dicom", "image.dcm"), ("mono1", "mono1.dcm")]}
    refs = {
        "png": np.asarray(Image.open(files["png"])) / 255.0,
        "png16": np.asarray(Image.open(files["png16"])) / 65535.0,
        "palette": np.asarray(Image.open(files["palette"]).convert("L")) / 255.0,
        "rgb": np.asarray(Image.open(files["rgb"]).convert("L")) / 255.0,
        "alpha": np.asarray(Image.open(files["alpha"]).convert("L")) / 255.0,
        "npy": np.load(files["npy"]) / 255.0,
        "nifti": nib.load(files["nifti"]).get_fdata()[..., 0] / 255.0,
        "dicom": pydicom.dcmread(files["dicom"]).pixel_array / 255.0,
        "mono1": 1.0 - pydicom.dcmread(files["mono1"]).pixel_array / 255.0,
    }
    return files, refs


def test_every_reader_agrees_with_its_reference_and_every_format_gives_the_same_tensor(tmp_path):
    files, refs = stored_two_ways(tmp_path)
    out = eval_pipeline(files)
    for name, ref in refs.items():
        assert out[name].shape == (1, 24, 24), name
        np.testing.assert_allclose(out[name][0], ref, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(out[name][0], PICTURE / 255.0, atol=1e-6, err_msg=name)


def test_a_16_bit_png_is_scaled_by_its_bit_depth_not_clipped_at_255(tmp_path):
    """Fault 1: I;16 through 0..255 -> [0, 1] clipped made almost every pixel 1.0."""
    full = (RNG.random((24, 24)) * 65535).astype(np.uint16)
    Image.fromarray(full).save(tmp_path / "x.png")
    out = eval_pipeline({"x": str(tmp_path / "x.png")})["x"][0]
    np.testing.assert_allclose(out, np.asarray(Image.open(tmp_path / "x.png")) / 65535.0, atol=1e-6)
    assert (out == 1.0).mean() < 0.01


def test_a_palette_png_is_read_through_its_palette(tmp_path):
    """Fault 2: a palette mapping index k to gray 255 - k arrived inverted (the indices)."""
    files, refs = stored_two_ways(tmp_path)
    out = eval_pipeline({"palette": files["palette"]})["palette"][0]
    np.testing.assert_allclose(out, refs["palette"], atol=1e-6)
    assert not np.allclose(out, np.asarray(Image.open(files["palette"])) / 255.0)  # not the indices


def test_channels_are_adapted_per_file_to_the_backbone(tmp_path):
    rgb = RNG.integers(0, 256, (24, 24, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((24, 24), 9, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(PICTURE).save(tmp_path / "gray.png")
    files = {k: str(tmp_path / f"{k}.png") for k in ("rgb", "rgba", "gray")}
    gray_model = eval_pipeline(files, model_channels=1)
    luminance = np.asarray(Image.open(files["rgb"]).convert("L")) / 255.0  # PIL rounds to 8 bits
    np.testing.assert_allclose(gray_model["rgb"][0], luminance, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(gray_model["rgba"], gray_model["rgb"], atol=1e-6)  # alpha dropped
    rgb_model = eval_pipeline(files, model_channels=3)
    np.testing.assert_allclose(rgb_model["rgb"], np.moveaxis(rgb, -1, 0) / 255.0, atol=1e-6)
    np.testing.assert_allclose(rgb_model["rgba"], rgb_model["rgb"], atol=1e-6)
    assert rgb_model["gray"].shape == (3, 24, 24) and np.allclose(rgb_model["gray"][2], PICTURE / 255.0, atol=1e-6)


# -- shapes ----------------------------------------------------------------------------------------------------

def test_trailing_singleton_axes_are_squeezed(tmp_path):
    """Fault 3: (16,16,16,1) volumes and (32,32,1) NIfTI slices passed validate, then died in Resized."""
    vol = RNG.random((16, 12, 10, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii.gz"))
    cfg = config_from_dict({"data": {"spatial_dims": 3, "image_size": 8},
                            "model": {"backbone": "monai_vit", "pretrained": False}})
    out = build_transforms(cfg.data, 1, None, train=False)({"image": str(tmp_path / "v.nii.gz"), "label": 0})
    assert out["image"].shape == (1, 8, 8, 8)
    ref = nib.load(str(tmp_path / "v.nii.gz")).get_fdata()[..., 0]
    decoded = decode(str(tmp_path / "v.nii.gz"), DecodeOptions(3, 1))[0][0].numpy()
    np.testing.assert_allclose(decoded, (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-6)


def test_a_trailing_axis_of_in_channels_is_channels_and_errors_suggest_only_real_values(tmp_path):
    """Fault 4: (16,16,16,2) with data.in_channels 2 was refused with `set data.spatial_dims: 4`."""
    vol = RNG.random((10, 9, 8, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii.gz"))
    image, info = decode(str(tmp_path / "v.nii.gz"), DecodeOptions(3, 2))
    ref = nib.load(str(tmp_path / "v.nii.gz")).get_fdata()
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    np.testing.assert_allclose(image.numpy(), np.moveaxis(ref, -1, 0), atol=1e-6)
    assert info.channels == 2 and info.shape == (10, 9, 8)
    with pytest.raises(DataError) as err:
        decode(str(tmp_path / "v.nii.gz"), DecodeOptions(3, 1))
    assert "data.in_channels: 2" in str(err.value) and "spatial_dims: 4" not in str(err.value)
    nib.save(nib.Nifti1Image(RNG.random((6, 6, 6, 2, 7)).astype(np.float32), np.eye(4)), str(tmp_path / "w.nii"))
    with pytest.raises(DataError) as err:
        decode(str(tmp_path / "w.nii"), DecodeOptions(3, 1))
    message = str(err.value)
    assert "w.nii" in message and "Fix" in message and "spatial_dims: 4" not in message
    assert "spatial_dims: 5" not in message and "in_channels: 7" not in message


# -- DICOM -----------------------------------------------------------------------------------------------------

def ct_slice(tmp_path, **tags):
    stored = RNG.integers(0, 4096, (20, 28)).astype(np.uint16)  # 12 bits in 16
    return write_dicom(tmp_path / "ct.dcm", stored, bits_stored=12, slope=1.0, intercept=-1024.0, **tags)


def test_dicom_applies_the_rescale_and_scales_by_bits_stored(tmp_path):
    path = ct_slice(tmp_path)
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)  # pydicom's rescale: the reference
    out = decode(path, DecodeOptions(2, 1))[0][0].numpy()
    np.testing.assert_allclose(out, (hu + 1024.0) / 4095.0, atol=1e-6)  # 12-bit range through the rescale
    window = decode(path, DecodeOptions(2, 1, intensity_range=(-160.0, 240.0)))[0][0].numpy()
    np.testing.assert_allclose(window, np.clip((hu + 160.0) / 400.0, 0, 1), atol=1e-6)


def test_dicom_window_from_the_file_matches_pydicom(tmp_path):
    path = ct_slice(tmp_path, window=(40.0, 400.0))
    ds = pydicom.dcmread(path)
    ref = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds)  # output in the rescaled stored range
    lo, hi = -1024.0, 4095.0 - 1024.0
    out = decode(path, DecodeOptions(2, 1, window_from_file=True))[0][0].numpy()
    np.testing.assert_allclose(out, (ref - lo) / (hi - lo), atol=1e-5)
    plain = write_dicom(tmp_path / "plain.dcm", PICTURE)
    with pytest.raises(DataError, match="no WindowCenter/WindowWidth.*Fix"):
        decode(plain, DecodeOptions(2, 1, window_from_file=True))


def test_a_dicom_series_is_one_volume_in_instance_number_order(tmp_path):
    vol = RNG.integers(0, 4096, (12, 10, 6)).astype(np.uint16)
    folder = write_series(tmp_path / "case_001", vol, bits_stored=12)  # file names shuffled
    slices = sorted((pydicom.dcmread(str(f)) for f in (tmp_path / "case_001").iterdir()),
                    key=lambda ds: int(ds.InstanceNumber))
    ref = np.stack([ds.pixel_array for ds in slices], axis=-1) / 4095.0
    image, info = decode(folder, DecodeOptions(3, 1))
    np.testing.assert_allclose(image[0].numpy(), ref, atol=1e-6)
    assert info.shape == (12, 10, 6) and image.affine[2, 2] == pytest.approx(2.5)  # slice spacing from positions


def test_rle_compressed_dicom_decodes_like_the_uncompressed_file(tmp_path):
    plain = write_dicom(tmp_path / "plain.dcm", PICTURE)
    ds = pydicom.dcmread(plain)
    ds.compress(RLELossless)  # pydicom's own RLE encoder and decoder: no plugin needed
    ds.save_as(tmp_path / "rle.dcm")
    np.testing.assert_allclose(decode(str(tmp_path / "rle.dcm"), DecodeOptions(2, 1))[0].numpy(),
                               decode(plain, DecodeOptions(2, 1))[0].numpy())


@pytest.mark.parametrize("make,needle", [
    (lambda p: write_dicom(p / "mf.dcm", np.stack([PICTURE] * 3), frames=3), "multi-frame DICOM (3 frames)"),
    (lambda p: write_dicom(p / "jls.dcm", PICTURE, transfer_syntax=JPEGLSLossless), "JPEG-LS Lossless"),
])
def test_dicom_the_pinned_stack_cannot_decode_is_refused_in_one_line(tmp_path, make, needle):
    path = make(tmp_path)
    with pytest.raises(DataError) as err:
        decode(path, DecodeOptions(2, 1))
    message = str(err.value)
    assert needle in message and path in message and "Fix" in message and "\n" not in message


def test_a_huge_image_is_refused_with_the_file_named(tmp_path):
    """Fault 5: a 13600 x 13600 PNG gave a DecompressionBombError traceback."""
    Image.new("1", (13600, 13600)).save(tmp_path / "huge.png")  # 1 bit per pixel: 23 MB in memory
    with pytest.raises(DataError) as err:
        decode(str(tmp_path / "huge.png"), DecodeOptions(2, 1))
    message = str(err.value)
    assert "huge.png" in message and "Fix: downsample" in message and "\n" not in message


def test_decoded_tensors_are_float32_in_unit_range(tmp_path):
    files, _ = stored_two_ways(tmp_path)
    for path in files.values():
        image = decode(path, DecodeOptions(2, 1))[0]
        assert image.dtype == torch.float32 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
