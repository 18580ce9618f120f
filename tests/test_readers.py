"""Decode what the file says: every reader agrees with an independent reference (PIL, NumPy, nibabel, pydicom reading
the same file) on pixel values and axis order, so the same picture stored in any format gives the same tensor.
DICOM files are written here with pydicom (tests/dicomgen.py), anonymized; none are committed."""

import gzip
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_windowing
from pydicom.uid import JPEGLosslessSV1, RLELossless

from fedopal.config import config_from_dict
from fedopal.site.data import build_transforms
from fedopal.site.readers import DataError, DecodeOptions, decode, format_of, unsupported_reason

from dicomgen import write_dicom, write_series

PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")  # shipped, never downloaded
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


def test_a_dicom_series_is_one_volume_in_slice_order(tmp_path):
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
    (lambda p: write_dicom(p / "ljpeg.dcm", PICTURE, transfer_syntax=JPEGLosslessSV1), "JPEG Lossless"),
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


# -- what a file is: its content, not its name ------------------------------------------------------------------

def one_line_naming(err, path, *needles):
    message = str(err.value)
    assert path in message and "\n" not in message and "Fix:" in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_the_content_decides_the_type_and_the_suffix_is_only_a_hint(tmp_path):
    Image.fromarray(PICTURE).save(tmp_path / "really.jpg", format="JPEG")
    shutil.copy(tmp_path / "really.jpg", tmp_path / "looks_like.png")
    np.save(tmp_path / "array.npy", PICTURE)
    shutil.copy(tmp_path / "array.npy", tmp_path / "array.dat")
    nib.save(nib.Nifti1Image(PICTURE.astype(np.int16)[..., None], np.eye(4)), str(tmp_path / "v.nii.gz"))
    shutil.copy(tmp_path / "v.nii.gz", tmp_path / "scan")  # gzipped NIfTI, no suffix
    write_dicom(tmp_path / "slice.dcm", PICTURE)
    shutil.copy(tmp_path / "slice.dcm", tmp_path / "IM0001")  # PACS exports often have no suffix
    cases = {"looks_like.png": ("jpeg", "really.jpg"), "array.dat": ("npy", "array.npy"),
             "scan": ("nifti", "v.nii.gz"), "IM0001": ("dicom", "slice.dcm")}
    for name, (fmt, twin) in cases.items():
        path = str(tmp_path / name)
        assert format_of(path) == fmt and unsupported_reason(path) == "", name
        image, info = decode(path, DecodeOptions(2, 1))
        assert info.format == fmt
        np.testing.assert_array_equal(image.numpy(), decode(str(tmp_path / twin), DecodeOptions(2, 1))[0].numpy())
    jpeg = np.asarray(Image.open(tmp_path / "looks_like.png")) / 255.0  # PIL's JPEG decoder: the reference
    np.testing.assert_allclose(decode(str(tmp_path / "looks_like.png"), DecodeOptions(2, 1))[0][0], jpeg, atol=1e-6)


def test_dicom_without_its_preamble_is_dicom(tmp_path):
    """pydicom.misc.is_dicom looks for 'DICM' at byte 128 only; old exports and pydicom's own test files start with
    the first data element."""
    ds = pydicom.dcmread(write_dicom(tmp_path / "plain.dcm", PICTURE))
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(tmp_path / "bare", ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert not pydicom.misc.is_dicom(tmp_path / "bare") and format_of(str(tmp_path / "bare")) == "dicom"
    image = decode(str(tmp_path / "bare"), DecodeOptions(2, 1))[0][0].numpy()
    reference = pydicom.dcmread(tmp_path / "bare", force=True)
    reference.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian  # as written above
    np.testing.assert_allclose(image, reference.pixel_array / 255.0, atol=1e-6)
    no_meta = os.path.join(PYDICOM_FILES, "ExplVR_LitEndNoMeta.dcm")
    assert not pydicom.misc.is_dicom(no_meta) and format_of(no_meta) == "dicom"


def written(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def dicom_bytes(p) -> bytes:
    return open(write_dicom(p / "full.dcm", PICTURE), "rb").read()


def window_bytes(p) -> bytes:
    return open(write_dicom(p / "full.dcm", PICTURE, window=(40.0, 400.0)), "rb").read()


def png_bytes(p) -> bytes:
    Image.fromarray(PICTURE).save(p / "full.png")
    return (p / "full.png").read_bytes()


def nifti_bytes(p) -> bytes:
    nib.save(nib.Nifti1Image(RNG.random((16, 16, 8)).astype(np.float32), np.eye(4)), str(p / "full.nii"))
    return (p / "full.nii").read_bytes()


def nifti_pair(p) -> str:
    nib.save(nib.Nifti1Pair(PICTURE[..., None], np.eye(4)), str(p / "pair.img"))
    return str(p / "pair.hdr")


def tiff(p) -> str:
    Image.fromarray(PICTURE).save(p / "x.tif")
    return str(p / "x.tif")


@pytest.mark.parametrize("make,reason", [
    (lambda p: written(p / "empty.dcm", b""), "empty file (0 bytes)"),
    (lambda p: written(p / "notes.png", b"scanner notes"), "not a supported image (starts with b'scanner note'"),
    (lambda p: shutil.copy(os.path.join(PYDICOM_FILES, "dicomdirtests", "DICOMDIR"), p / "DICOMDIR"),
     "a DICOMDIR (an index of a DICOM media, not an image)"),
    (lambda p: written(p / "ct.dcm.gz", gzip.compress(dicom_bytes(p))), "a gzip-compressed DICOM file"),
    (nifti_pair, "a NIfTI header whose voxels are in a separate .img file"),
    (tiff, "a TIFF image, not one of the supported formats"),
])
def test_an_unsupported_file_says_what_it_is(tmp_path, make, reason):
    path = str(make(tmp_path))
    assert format_of(path) is None and unsupported_reason(path).startswith(reason)
    with pytest.raises(DataError) as err:
        decode(path, DecodeOptions(2, 1))
    message = one_line_naming(err, path, reason)
    assert "force=True" not in message  # pydicom's advice for a file it could not parse is not ours


@pytest.mark.parametrize("make,needle", [
    (lambda p: written(p / "cut.png", png_bytes(p)[:200]), "corrupt or unreadable image"),
    (lambda p: written(p / "cut.nii", nifti_bytes(p)[:400]), "corrupt or truncated NIfTI"),
    (lambda p: written(p / "cut.dcm", dicom_bytes(p)[:-100]), "truncated DICOM (pixel data 476 of 576 bytes)"),
    (lambda p: written(p / "cut.dcm", dicom_bytes(p)[:400]), "truncated DICOM (its element"),  # pydicom: no word
    (lambda p: written(p / "cut.npy", np.lib.format.magic(1, 0) + b"\x10\x00{'descr': '<f4'"), "unreadable .npy"),
    (lambda p: written(p / "cut.dcm", window_bytes(p).replace(b"400.0", b"400a0")), "corrupt DICOM (ValueError"),
])
def test_a_damaged_file_is_one_line_naming_it(tmp_path, make, needle):
    """pydicom parses an element when it is first used: a damaged value fails there, deep in the reader."""
    path = make(tmp_path)
    with pytest.raises(DataError) as err:
        decode(path, DecodeOptions(2, 1, window_from_file=True))
    one_line_naming(err, path, needle)


# -- NaN and infinity ------------------------------------------------------------------------------------------

def test_nan_and_infinity_are_refused_before_any_scaling(tmp_path):
    """Fault: min-max scaling turned NaN into 0 before the finite check ran, so a NaN-holding volume trained."""
    values = RNG.random((24, 24)).astype(np.float32)
    values[3, :5] = np.nan
    values[7, 7] = np.inf
    np.save(tmp_path / "a.npy", values)
    nib.save(nib.Nifti1Image(values[..., None], np.eye(4)), str(tmp_path / "a.nii.gz"))
    ds = pydicom.dcmread(write_dicom(tmp_path / "f.dcm", np.zeros((24, 24), np.uint16)))
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.FloatPixelData = values.tobytes()  # a parametric map: float pixel data
    ds.save_as(tmp_path / "f.dcm")
    for name in ("a.npy", "a.nii.gz", "f.dcm"):
        with pytest.raises(DataError) as err:
            decode(str(tmp_path / name), DecodeOptions(2, 1))
        one_line_naming(err, str(tmp_path / name), "6 of 576 values are NaN or infinite")


# -- DICOM: palette, series, what is not an image ---------------------------------------------------------------

def test_a_palette_dicom_is_read_through_its_colour_table(tmp_path):
    ds = pydicom.dcmread(write_dicom(tmp_path / "pal.dcm", PICTURE, photometric="PALETTE COLOR"))
    red, green = np.arange(256, dtype=np.uint8)[::-1], (np.arange(256) // 2).astype(np.uint8)
    for colour, table in (("Red", red), ("Green", green), ("Blue", np.zeros(256, np.uint8))):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 8])
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.tobytes())
        ds[f"{colour}PaletteColorLookupTableData"].VR = "OW"
    ds.save_as(tmp_path / "pal.dcm")
    image, info = decode(str(tmp_path / "pal.dcm"), DecodeOptions(2, 3))
    assert info.channels == 3 and info.dtype == "uint8 palette"
    expected = np.stack([red[PICTURE], green[PICTURE], np.zeros_like(PICTURE)]) / 255.0  # the lookup, by hand
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-6)
    real = os.path.join(PYDICOM_FILES, "examples_palette.dcm")  # 16-bit table entries
    ds = pydicom.dcmread(real)
    depth = ds.RedPaletteColorLookupTableDescriptor[2]
    reference = pydicom.pixels.apply_color_lut(ds.pixel_array, ds) / (2.0 ** depth - 1)
    np.testing.assert_allclose(decode(real, DecodeOptions(2, 3))[0].numpy(), np.moveaxis(reference, -1, 0), atol=1e-6)


OBLIQUE = (0.8, 0.6, 0.0, 0.0, 0.0, -1.0)  # rows along (0.8, 0.6, 0), columns down the patient: a tilted coronal


def oblique_series(folder, volume, instance_numbers, names, spacing=3.0):
    """One slice per file, the geometry by the DICOM standard: slice k at k * spacing along the normal."""
    os.makedirs(folder, exist_ok=True)
    normal = np.cross(OBLIQUE[:3], OBLIQUE[3:])
    origin = np.array([10.0, -5.0, 40.0])
    uid = pydicom.uid.generate_uid()
    for k in range(volume.shape[-1]):
        path = write_dicom(os.path.join(folder, names[k]), volume[..., k], bits_stored=12, series_uid=uid,
                           instance=instance_numbers[k], position=tuple(origin + k * spacing * normal))
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = list(OBLIQUE)
        ds.save_as(path)
    return str(folder)


def reference_volume(folder):
    """pydicom's pixel arrays, stacked by the projection of ImagePositionPatient on the slice normal."""
    slices = [pydicom.dcmread(os.path.join(folder, n)) for n in os.listdir(folder)]

    def along_normal(ds):
        orientation = np.array(ds.ImageOrientationPatient, dtype=float)
        return float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), np.cross(orientation[:3], orientation[3:])))

    slices.sort(key=along_normal)
    return np.stack([ds.pixel_array for ds in slices], axis=-1) / 4095.0


def test_a_series_is_ordered_along_the_slice_normal_not_by_name_or_instance_number(tmp_path):
    vol = RNG.integers(0, 4096, (10, 12, 7)).astype(np.uint16)
    folder = oblique_series(tmp_path / "a", vol, instance_numbers=[7, 3, 1, 6, 2, 5, 4],  # as a scanner restarting
                            names=[f"x{k}" for k in (5, 1, 6, 0, 3, 2, 4)])
    image, info = decode(folder, DecodeOptions(3, 1))
    np.testing.assert_allclose(image[0].numpy(), reference_volume(folder), atol=1e-6)
    np.testing.assert_allclose(image[0].numpy(), vol / 4095.0, atol=1e-6)
    shutil.copytree(folder, tmp_path / "b")
    for k, name in enumerate(sorted(os.listdir(tmp_path / "b"))):  # renamed and shuffled: the same volume
        os.rename(tmp_path / "b" / name, tmp_path / "b" / f"slice_{(k * 5) % 7:03d}.dcm")
    np.testing.assert_array_equal(decode(str(tmp_path / "b"), DecodeOptions(3, 1))[0].numpy(), image.numpy())
    assert info.shape == (10, 12, 7)


def test_a_well_formed_series_has_monais_affine(tmp_path):
    """Where InstanceNumber follows the slice normal, MONAI's PydicomReader (which orders by it) is the reference."""
    from monai.data import PydicomReader

    vol = RNG.integers(0, 4096, (10, 12, 5)).astype(np.uint16)
    folder = oblique_series(tmp_path / "s", vol, instance_numbers=[1, 2, 3, 4, 5], names=list("edcba"))
    reader = PydicomReader(swap_ij=False)
    _, meta = reader.get_data(reader.read(folder))
    image, _ = decode(folder, DecodeOptions(3, 1))
    np.testing.assert_allclose(image.affine.numpy(), meta["affine"], atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(image.affine.numpy()[:3, 2]), 3.0)


def rewrite(path, **tags):
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)


@pytest.mark.parametrize("spoil,needles", [
    (lambda f: rewrite(f / "s2", SeriesInstanceUID=pydicom.uid.generate_uid()), ["2 series (SeriesInstanceUIDs)"]),
    (lambda f: rewrite(f / "s2", ImageOrientationPatient=[1, 0, 0, 0, 1, 0]), ["2 orientations"]),
    (lambda f: shutil.copy(f / "s2", f / "s2_copy"), ["s2 and s2_copy are at the same position"]),
    (lambda f: os.remove(f / "s2"), ["unevenly spaced: 6 mm between s1 and s3", "median step is 3 mm"]),
])
def test_a_series_that_is_not_one_volume_is_refused_in_one_line(tmp_path, spoil, needles):
    vol = RNG.integers(0, 4096, (6, 6, 5)).astype(np.uint16)
    folder = oblique_series(tmp_path / "case", vol, instance_numbers=[1, 2, 3, 4, 5], names=[f"s{k}" for k in range(5)])
    spoil(tmp_path / "case")
    with pytest.raises(DataError) as err:
        decode(folder, DecodeOptions(3, 1))
    one_line_naming(err, folder, *needles)


def test_without_geometry_a_series_falls_back_to_instance_number_and_refuses_a_repeat(tmp_path):
    vol = RNG.integers(0, 4096, (6, 7, 4)).astype(np.uint16)
    uid = pydicom.uid.generate_uid()
    (tmp_path / "s").mkdir()
    for k, name in enumerate(["d", "b", "a", "c"]):  # no ImagePositionPatient/ImageOrientationPatient
        write_dicom(tmp_path / "s" / name, vol[..., k], bits_stored=12, instance=k + 1, series_uid=uid)
    np.testing.assert_allclose(decode(str(tmp_path / "s"), DecodeOptions(3, 1))[0][0].numpy(), vol / 4095.0, atol=1e-6)
    rewrite(tmp_path / "s" / "a", InstanceNumber=2)
    with pytest.raises(DataError) as err:
        decode(str(tmp_path / "s"), DecodeOptions(3, 1))
    one_line_naming(err, str(tmp_path / "s"), "a and b share InstanceNumber 2")


@pytest.mark.parametrize("name,needle", [
    ("liver_1frame.dcm", "a DICOM Segmentation object, not an image. Fix: list it as a mask, not as an image."),
    ("rtstruct.dcm", "a DICOM radiotherapy object (RT Structure Set), not an image"),
    ("reportsi.dcm", "a DICOM Structured Report (Basic Text SR), not an image"),
    ("waveform_ecg.dcm", "a DICOM waveform (12-lead ECG Waveform), not an image"),
])
def test_a_dicom_object_that_is_not_an_image_is_refused_for_what_it_is(name, needle):
    path = os.path.join(PYDICOM_FILES, name)
    with pytest.raises(DataError) as err:
        decode(path, DecodeOptions(2, 1))
    message = one_line_naming(err, path, needle)
    assert "broadcast" not in message


def test_a_segmentation_in_a_series_folder_is_named(tmp_path):
    folder = write_series(tmp_path / "case", RNG.integers(0, 4096, (6, 6, 3)).astype(np.uint16), bits_stored=12)
    shutil.copy(os.path.join(PYDICOM_FILES, "liver_1frame.dcm"), tmp_path / "case" / "seg.dcm")
    with pytest.raises(DataError) as err:
        decode(folder, DecodeOptions(3, 1))
    one_line_naming(err, str(tmp_path / "case" / "seg.dcm"), "Segmentation object", "move it out of the folder")


# -- notes: readable, but odd ----------------------------------------------------------------------------------

def test_a_16_bit_file_holding_12_bit_values_gets_a_note_naming_the_range_to_set(tmp_path):
    stored = np.linspace(1665, 3281, 144).reshape(12, 12).astype(np.uint16)
    np.save(tmp_path / "a.npy", stored)
    write_dicom(tmp_path / "ct.dcm", stored, slope=1.0, intercept=-1024.0)  # BitsStored 16, the rescale to HU
    for name, suggested in (("a.npy", "[0, 4095]"), ("ct.dcm", "[-1024, 3071]")):
        path = str(tmp_path / name)
        (note,) = decode(path, DecodeOptions(2, 1))[1].notes
        assert note.startswith(path) and "values 1665..3281 fit 12 bits" in note
        assert f"data.intensity_range: {suggested}" in note
        assert decode(path, DecodeOptions(2, 1, intensity_range=(0, 4095)))[1].notes == ()


def test_signed_ct_in_a_sliver_of_the_unit_range_gets_a_note_naming_window_and_range(tmp_path):
    hu = RNG.integers(-1000, 1000, (16, 16)).astype(np.int16)
    path = write_dicom(tmp_path / "ct.dcm", hu, slope=1.0, intercept=0.0, window=(40.0, 400.0))
    (note,) = decode(path, DecodeOptions(2, 1))[1].notes
    assert note.startswith(path) and "scaled by the 16-bit stored range" in note
    assert "data.window_from_file: true" in note and "data.intensity_range: [" in note
    assert decode(path, DecodeOptions(2, 1, window_from_file=True))[1].notes == ()
    volume = RNG.normal(0.0, 1.0, (8, 8, 8)).astype(np.float32)
    volume[0, 0, 0] = 1e4  # one hot voxel: min-max puts everything else near 0
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "v.nii.gz"))
    (note,) = decode(str(tmp_path / "v.nii.gz"), DecodeOptions(3, 1))[1].notes
    assert "min-max per file" in note and "data.intensity_range: [" in note
