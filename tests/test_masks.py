"""Segmentation masks (site/masks.py) and NRRD images (readers.py), each against a reference that does not use the code
under test: pynrrd's own reading and an affine computed here from the NRRD header; the NumPy arrays a mask was
written from; highdicom writing a DICOM SEG from a pydicom series (tests/dicomgen.py). The real cases are three of
pyradiomics' test volumes (data/pyradiomics_cases, BSD-3)."""

from __future__ import annotations

import os
import warnings

import nibabel as nib
import numpy as np
import nrrd
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from conftest import REPO
from dicomgen import write_series
from fedopal.site.masks import DecodeMaskd, check_pair, decode_mask, is_empty
from fedopal.site.readers import DataError, DecodeOptions, decode, format_of

CASES = os.path.join(REPO, "data", "pyradiomics_cases")
REAL = ("brain1", "breast1", "lung1")


def header_affine(header: dict) -> np.ndarray:
    """The NRRD header's index -> patient mapping (a column per axis, then the origin), LPS turned to RAS, float64."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(header["space directions"], dtype=np.float64).T
    affine[:3, 3] = np.asarray(header["space origin"], dtype=np.float64)
    assert header["space"] == "left-posterior-superior"
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def test_the_real_cases_are_the_published_bytes():
    import hashlib

    for line in open(os.path.join(CASES, "SHA256SUMS")):
        digest, name = line.split()
        assert hashlib.sha256(open(os.path.join(CASES, name), "rb").read()).hexdigest() == digest, name


@pytest.mark.parametrize("case", REAL)
def test_real_nrrd_image_and_label_match_pynrrd(case):
    image_path, label_path = (os.path.join(CASES, f"{case}_{kind}.nrrd") for kind in ("image", "label"))
    raw, header = nrrd.read(image_path)  # index order F: x, y, z, as the header's sizes
    labels, label_header = nrrd.read(label_path)
    assert format_of(image_path) == format_of(label_path) == "nrrd"

    image, info = decode(image_path, DecodeOptions(3, 1))
    ref = (raw.astype(np.float64) - raw.min()) / (raw.max() - raw.min())  # int16: min-max per file, as NIfTI
    assert info.format == "nrrd" and info.dtype == "int16" and info.shape == raw.shape
    assert np.allclose(image[0].numpy(), ref, atol=1e-6)
    affine = header_affine(header)
    assert np.allclose(image.affine.numpy(), affine, atol=1e-6)
    assert np.allclose(np.linalg.norm(image.affine.numpy()[:3, :3], axis=0),
                       np.linalg.norm(np.asarray(header["space directions"], dtype=np.float64), axis=1))

    mask, minfo = decode_mask(label_path, 3, num_classes=2)
    assert mask.dtype.is_floating_point and mask.shape == (1, *labels.shape)
    assert np.array_equal(mask[0].numpy(), labels.astype(np.float32))
    assert minfo.labels == tuple(np.unique(labels)) == (0, 1)
    assert np.allclose(mask.affine.numpy(), header_affine(label_header), atol=1e-6)
    assert not is_empty(mask) and is_empty(mask * 0)
    assert check_pair(image_path, label_path, 3, num_classes=2, image_info=(image, info)) == []


def test_a_real_label_with_the_wrong_image_is_named():
    image_path = os.path.join(CASES, "breast1_image.nrrd")
    label_path = os.path.join(CASES, "brain1_label.nrrd")
    shape, spacing, orientation = check_pair(image_path, label_path, 3, 2)  # brain1's y axis runs the other way
    assert shape.startswith(f"{label_path} (mask of {image_path}): the mask is 256x256x25 voxels, its image 45x120x21")
    assert spacing.startswith(f"{label_path} (mask of {image_path}): voxel spacing 0.7812 x 0.7812 x 6.5 mm in the "
                              "mask, 0.6641 x 0.6641 x 2.1 mm in its image")
    assert orientation.endswith("orientation LAS in the mask, LPS in its image (nibabel axis codes). Fix: export the "
                                "mask on its image's grid (same size, spacing, orientation and origin), e.g. resample "
                                "it onto the image with nearest-neighbour interpolation (3D Slicer, or MONAI's "
                                "ResampleToMatch mode='nearest').")
    assert all("Fix:" in p and "\n" not in p for p in (shape, spacing))


def test_a_nifti_mask_off_its_image_grid_names_both_files(tmp_path):
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[:3, 3] = (-40.0, -30.0, 10.0)
    image = np.random.default_rng(0).normal(size=(20, 16, 8)).astype(np.float32)
    labels = np.zeros((20, 16, 8), np.uint8)
    labels[5:9, 4:8, 2:5] = 1
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "ok.nii.gz")
    shifted = affine.copy()
    shifted[:3, 3] += (1.6, 0.0, 0.0)
    nib.save(nib.Nifti1Image(labels, shifted), tmp_path / "shifted.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.diag([1.0, 1.0, 2.0, 1.0]) @ affine), tmp_path / "spacing.nii.gz")
    nib.save(nib.Nifti1Image(labels[::-1].copy(), np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine), tmp_path / "flip.nii.gz")
    nib.save(nib.Nifti1Image(labels[:, :, :6], affine), tmp_path / "short.nii.gz")
    img = str(tmp_path / "img.nii.gz")

    mask, info = decode_mask(str(tmp_path / "ok.nii.gz"), 3)
    assert np.array_equal(mask[0].numpy(), labels) and np.allclose(info.affine, affine)
    assert check_pair(img, str(tmp_path / "ok.nii.gz"), 3, 2) == []
    expected = {"shifted": "its origin is 1.6 mm from its image's",
                "spacing": "voxel spacing 0.8 x 0.8 x 4 mm in the mask, 0.8 x 0.8 x 2 mm in its image",
                "flip": "orientation LAS in the mask, RAS in its image",
                "short": "the mask is 20x16x6 voxels, its image 20x16x8"}
    for name, needle in expected.items():
        path = str(tmp_path / f"{name}.nii.gz")
        problems = check_pair(img, path, 3, 2)
        assert problems and all(p.startswith(f"{path} (mask of {img}): ") for p in problems), (name, problems)
        assert any(needle in p for p in problems), (name, problems)
        assert all("Fix:" in p and "\n" not in p for p in problems)


def test_png_masks_out_of_range_labels_and_refusals(tmp_path):
    labels = np.zeros((24, 20), np.uint8)
    labels[3:9, 4:10] = 1
    labels[12:15, 2:6] = 3
    Image.fromarray(labels).save(tmp_path / "mask.png")
    palette = Image.fromarray(labels, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.save(tmp_path / "palette.png")
    Image.fromarray(labels.astype(np.uint16) * 1000).save(tmp_path / "sixteen.png")
    Image.fromarray(np.stack([labels] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray((labels * 60).astype(np.uint8)).save(tmp_path / "image.png")

    for name in ("mask", "palette"):
        mask, info = decode_mask(str(tmp_path / f"{name}.png"), 2)
        assert np.array_equal(mask[0].numpy(), labels) and info.labels == (0, 1, 3) and info.affine is None
    assert decode_mask(str(tmp_path / "palette.png"), 2)[1].dtype == "palette"
    assert decode_mask(str(tmp_path / "sixteen.png"), 2)[1].labels == (0, 1000, 3000)

    image, mask = str(tmp_path / "image.png"), str(tmp_path / "mask.png")
    (problem,) = check_pair(image, mask, 2, num_classes=2)
    assert problem.startswith(f"{mask} (mask of {image}): label values [3] outside 0..1 (data.num_classes 2)")
    assert check_pair(image, mask, 2, num_classes=4) == []
    with pytest.raises(DataError, match=r"label values \[3\] outside 0..1.*Fix: set data.num_classes: 4"):
        decode_mask(mask, 2, num_classes=2)
    with pytest.raises(DataError, match=r"rgb.png: a RGB PNG mask \(colours, not class indices\). Fix:"):
        decode_mask(str(tmp_path / "rgb.png"), 2)


def test_npy_masks_integer_values_only(tmp_path):
    labels = np.zeros((6, 7, 5), np.int64)
    labels[1:3, 2:5, 1:4] = 2
    np.save(tmp_path / "int.npy", labels)
    np.save(tmp_path / "float.npy", labels.astype(np.float32))
    np.save(tmp_path / "prob.npy", labels * 0.3)
    np.save(tmp_path / "neg.npy", labels - 1)
    np.save(tmp_path / "onehot.npy", np.stack([labels == 0, labels == 2], -1))
    for name in ("int", "float"):
        mask, info = decode_mask(str(tmp_path / f"{name}.npy"), 3)
        assert np.array_equal(mask[0].numpy(), labels) and info.labels == (0, 2)
    for name, needle in (("prob", "non-integer mask values"), ("neg", "negative mask values"),
                         ("onehot", "a mask of 4 axes")):
        with pytest.raises(DataError, match=needle) as err:
            decode_mask(str(tmp_path / f"{name}.npy"), 3)
        assert str(err.value).startswith(str(tmp_path / f"{name}.npy")) and "Fix:" in str(err.value)
    out = DecodeMaskd(["label"], 3)({"label": str(tmp_path / "int.npy")})["label"]
    assert np.array_equal(out[0].numpy(), labels)


# -- DICOM SEG, written with highdicom from a pydicom series ----------------------------------------------------

def _ct_series(folder, volume):
    """dicomgen's CT series, with the study, frame of reference and patient module a SEG's source images need."""
    write_series(folder, volume, slope=1.0, intercept=-1024.0)
    study, frame = generate_uid(), generate_uid()
    datasets = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = study, frame
        ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "Anonymous^Test", "", ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "000000", "1", ""
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.Manufacturer = "", 1, "test"
        ds.save_as(path, enforce_file_format=True)
        datasets.append(ds)
    return datasets


def _write_seg(path, sources, frames_by_segment: np.ndarray, kind="BINARY"):
    import highdicom as hd

    code = hd.sr.CodedConcept
    algorithm = hd.AlgorithmIdentificationSequence(name="test", version="1",
                                                   family=code("123109", "DCM", "Manual Processing"))
    descriptions = [hd.seg.SegmentDescription(
        segment_number=k + 1, segment_label=f"segment {k + 1}",
        segmented_property_category=code("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=code("10200004", "SCT", "Liver"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for k in range(frames_by_segment.shape[-1])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames_by_segment, segmentation_type=kind,
            segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=2,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test",
            manufacturer_model_name="test", software_versions="1", device_serial_number="1",
            max_fractional_value=255)
    seg.save_as(path)
    return str(path)


def test_dicom_seg_from_highdicom_is_the_mask_it_was_written_from(tmp_path):
    volume = np.random.default_rng(1).integers(0, 1000, (12, 10, 6)).astype(np.int16)  # rows, columns, slices
    sources = _ct_series(tmp_path / "series", volume)
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))  # highdicom wants them in slice order
    labels = np.zeros((12, 10, 6), np.uint8)
    labels[2:5, 3:7, 1:3] = 1
    labels[7:9, 1:4, 2:5] = 2  # slices 0 and 5 empty: highdicom omits their frames
    frames = np.moveaxis(labels, -1, 0)  # (frames, rows, columns), frame k is source slice k
    seg = _write_seg(tmp_path / "seg.dcm", sources, np.stack([frames == 1, frames == 2], -1))
    series = str(tmp_path / "series")
    image, info = decode(series, DecodeOptions(3, 1))

    mask, minfo = decode_mask(seg, 3, num_classes=3, like=image)  # on the image's grid
    assert minfo.format == "dicom-seg" and minfo.labels == (0, 1, 2)
    assert np.array_equal(mask[0].numpy(), labels)
    assert np.allclose(mask.affine.numpy(), image.affine.numpy(), atol=1e-6)
    assert check_pair(series, seg, 3, num_classes=3) == []
    (problem,) = check_pair(series, seg, 3, num_classes=2)
    assert problem.startswith(f"{seg} (mask of {series}): label values [2] outside 0..1")

    alone, _ = decode_mask(seg, 3)  # its own frames only: slices 1..4, one slice further along
    assert np.array_equal(alone[0].numpy(), labels[..., 1:5])
    shifted = image.affine.numpy().copy()
    shifted[:3, 3] += shifted[:3, 2]
    assert np.allclose(alone.affine.numpy(), shifted, atol=1e-6)

    both = np.stack([frames == 1, (frames == 1) | (frames == 2)], -1)
    overlapping = _write_seg(tmp_path / "overlap.dcm", sources, both)
    with pytest.raises(DataError, match=r"overlap.dcm: segments \[1, 2\] overlap \(\d+ voxels\).*Fix:"):
        decode_mask(overlapping, 3)
    with pytest.raises(DataError, match="not a Segmentation"):
        decode_mask(os.path.join(series, sorted(os.listdir(series))[0]), 3)
    with pytest.raises(DataError, match="a DICOM Segmentation object, not an image. Fix: list it as a mask"):
        decode(seg, DecodeOptions(3, 1))


def test_dicom_seg_fractional_segments_threshold_at_half(tmp_path):
    volume = np.zeros((8, 8, 4), np.int16)
    sources = sorted(_ct_series(tmp_path / "series", volume), key=lambda ds: float(ds.ImagePositionPatient[2]))
    probability = np.zeros((4, 8, 8), np.float32)
    probability[:, 2:5, 2:5] = 0.8
    probability[:, 6, 6] = 0.3
    seg = _write_seg(tmp_path / "frac.dcm", sources, probability[..., None], kind="FRACTIONAL")
    image, _ = decode(str(tmp_path / "series"), DecodeOptions(3, 1))
    mask, info = decode_mask(seg, 3, like=image)
    assert np.array_equal(mask[0].numpy(), np.moveaxis(probability > 0.5, 0, -1))
    assert info.dtype.startswith("FRACTIONAL")
