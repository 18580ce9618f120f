"""Real files nobody here wrote: every file shipped inside the installed pydicom (pydicom/data: its test files,
palettes and character-set files; and each folder of them, read as a series) and every NIfTI (and DICOM) file in
nibabel's own test data. Read where they are installed; nothing is downloaded (pydicom's get_testdata_file would
fetch the files it does not ship, so the folders are globbed instead) and nothing is written.

Each one is either decoded to what an independent reference computed here in float64 says (pydicom's pixel_array ->
apply_modality_lut -> the photometric interpretation, scaled as readers.py documents; nibabel's get_fdata()), within
float32 tolerance, or refused with a one-line DataError that names it. The verdicts are pinned in EXPECTED, so a
change in what is read or why something is refused fails here, and docs/data.md shows the same table.
`python tests/test_readers_real.py` prints that section.
"""

from __future__ import annotations

import glob
import os
import pprint
import sys
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from fedopal.site.readers import DataError, DecodeOptions, decode

PYDICOM_ROOT = os.path.dirname(os.path.dirname(pydicom.__file__))  # site-packages: labels start at pydicom/
NIBABEL_ROOT = os.path.dirname(os.path.dirname(nib.__file__))
DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "data.md")
SECTION = "## Real files: what is read and what is refused"


def real_inputs() -> dict[str, str]:
    """label (the path under site-packages; a folder ends in /) -> path."""
    data = os.path.join(PYDICOM_ROOT, "pydicom", "data")
    files = [p for p in glob.glob(os.path.join(data, "**", "*"), recursive=True)
             if os.path.isfile(p) and not p.endswith((".py", ".pyc"))]
    folders = sorted({os.path.dirname(p) for p in files if pydicom.misc.is_dicom(p)})  # each one a series to read
    nibabel = [p for pattern in ("tests/data/*.nii", "tests/data/*.nii.gz", "tests/data/*.hdr", "tests/data/*.dcm",
                                 "nicom/tests/data/*.dcm", "nicom/tests/data/*.dcm.gz")
               for p in glob.glob(os.path.join(NIBABEL_ROOT, "nibabel", pattern))]
    labels = {os.path.relpath(p, PYDICOM_ROOT): p for p in files}
    labels.update({os.path.relpath(p, PYDICOM_ROOT) + "/": p for p in folders})
    labels.update({os.path.relpath(p, NIBABEL_ROOT): p for p in nibabel})
    return dict(sorted(labels.items()))


def options(path: str) -> DecodeOptions:
    three_d = os.path.isdir(path) or path.endswith((".nii", ".nii.gz"))
    return DecodeOptions(3 if three_d else 2, 1)


# -- the references: the libraries' own reading, scaled here in float64 ------------------------------------------

def dicom_dataset(path: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:  # a file without meta: the encoding it was read in
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def dicom_files(folder: str) -> list[str]:
    paths = (os.path.join(folder, name) for name in os.listdir(folder))
    return [p for p in paths if os.path.isfile(p) and pydicom.misc.is_dicom(p)]


def stored_range(ds) -> tuple[float, float]:
    """What BitsStored and PixelRepresentation can hold, through the modality LUT (PS3.3 C.11.1)."""
    if "ModalityLUTSequence" in ds:
        return 0.0, 2.0 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    lo, hi = (-2.0 ** (bits - 1), 2.0 ** (bits - 1) - 1) if ds.PixelRepresentation else (0.0, 2.0 ** bits - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        lo, hi = sorted((lo * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
                         hi * float(ds.RescaleSlope) + float(ds.RescaleIntercept)))
    return lo, hi


def ybr_to_rgb(ybr: np.ndarray) -> np.ndarray:
    """YBR_FULL to RGB, PS3.3 C.7.6.3.1.2 (ITU-R BT.601, full range)."""
    y, cb, cr = (ybr[..., k].astype(np.float64) for k in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)],
                   axis=-1)
    return np.clip(rgb, 0, 255)


def dicom_reference(ds) -> np.ndarray:
    """(C, rows, cols) in [0, 1], float64."""
    photometric = ds.PhotometricInterpretation
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(ds.pixel_array, ds)[..., :3].astype(np.float64)
        return np.moveaxis(rgb / (2.0 ** ds.RedPaletteColorLookupTableDescriptor[2] - 1), -1, 0)
    if ds.get("SamplesPerPixel", 1) == 3:  # pydicom's pixel_array gives YBR as RGB: checked on its own below
        rgb = ds.pixel_array.astype(np.float64)
        return np.moveaxis(rgb / (2.0 ** int(ds.get("BitsStored") or ds.BitsAllocated) - 1), -1, 0)
    lo, hi = stored_range(ds)
    unit = np.clip((apply_modality_lut(ds.pixel_array, ds).astype(np.float64) - lo) / (hi - lo), 0, 1)
    return (1.0 - unit if photometric == "MONOCHROME1" else unit)[None]


def series_reference(folder: str) -> np.ndarray:
    """The slices by the projection of ImagePositionPatient on the normal of ImageOrientationPatient."""
    slices = [dicom_dataset(p) for p in dicom_files(folder)]

    def along_normal(ds):
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        return float(np.asarray(ds.ImagePositionPatient, dtype=np.float64) @ np.cross(orientation[:3], orientation[3:]))

    slices.sort(key=along_normal)
    return np.stack([dicom_reference(ds)[0] for ds in slices], axis=-1)[None]


def nifti_reference(path: str) -> np.ndarray:
    img = nib.load(path)
    values = img.get_fdata()
    stored, scaled = img.get_data_dtype(), img.dataobj.slope != 1 or img.dataobj.inter != 0
    if not scaled and stored in (np.uint8, np.uint16):
        return (values / (2.0 ** (8 * stored.itemsize) - 1))[None]
    return ((values - values.min()) / (values.max() - values.min()))[None]  # signed or float: min-max per file


def reference(path: str) -> np.ndarray:
    if os.path.isdir(path):
        return series_reference(path)
    if path.endswith((".nii", ".nii.gz")):
        return nifti_reference(path)
    return dicom_reference(dicom_dataset(path))


# -- what each file is, and its verdict ----------------------------------------------------------------------------

def what_it_is(path: str) -> str:
    """Modality, transfer syntax, photometric interpretation and bits; or what else the file is."""
    if os.path.isdir(path):
        headers = [dicom_dataset(p) for p in dicom_files(path)]
        series = {str(ds.get("SeriesInstanceUID", "")) for ds in headers}
        return f"folder: {len(headers)} DICOM file(s), {len(series)} series"
    if path.endswith((".nii", ".nii.gz", ".hdr")):
        img = nib.load(path) if not path.endswith(".hdr") else None
        header = getattr(img, "nifti_header", None) or getattr(img, "header", None)  # a CIFTI-2 file: its NIfTI-2
        if header is None:
            with open(path, "rb") as f:
                raw = f.read(540)
            sizes = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
            return "NIfTI-2 header" if 540 in sizes else "NIfTI-1 header" if raw[344:347] == b"ni1" else \
                "Analyze 7.5 header"
        kind = "NIfTI-2" if isinstance(header, nib.Nifti2Header) else "NIfTI-1"
        kind = f"CIFTI-2 in {kind}" if isinstance(img, nib.Cifti2Image) else kind
        return f"{kind}, {'x'.join(map(str, header.get_data_shape()))}, {header.get_data_dtype().name}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:  # noqa: BLE001
        ds = None
    looks_dicom = ds is not None and (pydicom.misc.is_dicom(path) or any(t.group == 0x0008 for t in ds.keys()))
    if not looks_dicom:
        return {".txt": "text", ".json": "JSON", ".md": "Markdown", ".dump": "text (a DICOM dump)", "": "text",
                ".icc": "ICC colour profile", ".gz": "gzip", ".dcm": "bytes pydicom cannot parse as DICOM"}.get(
            os.path.splitext(path)[1], "other")
    ts = ds.file_meta.get("TransferSyntaxUID")
    sop = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    parts = [str(ds.get("Modality") or "-"), ts.name if ts else "no meta"]
    if "PhotometricInterpretation" in ds:
        bits = f"{ds.get('BitsStored', '?')}/{ds.get('BitsAllocated', '?')} bit"
        parts += [str(ds.PhotometricInterpretation), bits + (" signed" if ds.get("PixelRepresentation") else "")]
        if str(ds.get("NumberOfFrames", "1") or "1") != "1":
            parts.append(f"{ds.NumberOfFrames} frames")
    else:
        parts.append(sop.name.removesuffix(" Storage") if sop else "no SOP class")
    return ", ".join(parts)


def verdict(label: str, path: str) -> str:
    """'read' (with the reader's notes, short) after checking the values against the reference, or 'refused: why'."""
    try:
        image, info = decode(path, options(path))
    except DataError as err:
        message = str(err)
        assert "\n" not in message and path in message and " Fix: " in message, message
        why = message.split(" Fix: ")[0].removeprefix(f"{path}: ").replace(path + os.sep, "").rstrip(".")
        return f"refused: {why.replace(path, 'this folder')}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's word on excess padding, say: the values are what is checked
        ref = reference(path)
    assert image.shape == ref.shape, label
    np.testing.assert_allclose(image.numpy(), ref, atol=1e-6, err_msg=label)
    notes = "; ".join(note.removeprefix(f"{path}: ").split(";")[0] for note in info.notes)
    return "read" + (f" (note: {notes})" if notes else "")


def verdicts() -> dict[str, str]:
    return {label: verdict(label, path) for label, path in real_inputs().items()}


KINDS = (  # refusal -> its kind in the summary: the first pattern found in the reason
    ("a folder that is not one 3D series", "\0folder"),
    ("not a supported file (text, JSON, ICC profile, ...)", "not a supported image"),
    ("a DICOM object that is not an image (SEG, RT, SR, waveform, palette)", ", not an image"),
    ("a DICOMDIR", "DICOMDIR"), ("a DICOM file without pixel data", "without pixel data"),
    ("pixel data without Rows/Columns/BitsAllocated", "pixel data without"),
    ("a transfer syntax no installed decoder handles (JPEG Lossless)", "cannot be decoded by the installed"),
    ("compressed pixel data its decoder fails on", "could not be decoded"), ("truncated", "truncated"),
    ("multi-frame", "multi-frame"), ("gzip-compressed DICOM", "gzip-compressed"),
    ("a .hdr/.img pair (NIfTI or Analyze)", ".hdr/.img pair"), ("4D NIfTI in a 3D config", "4 axes"),
    ("NaN in the voxels", "NaN"), ("CIFTI-2", "CIFTI-2"),
)


def kind_of(label: str, found_verdict: str) -> str:
    text = "\0folder" if label.endswith("/") else found_verdict
    return next(kind for kind, pattern in KINDS if pattern in text)


def markdown(found: dict[str, str]) -> str:
    inputs = real_inputs()
    read = [label for label, v in found.items() if v.startswith("read")]
    kinds: dict[str, int] = {}
    for label, v in found.items():
        if v.startswith("refused"):
            kinds[kind_of(label, v)] = kinds.get(kind_of(label, v), 0) + 1
    files = sum(not label.endswith("/") for label in found)
    lines = [SECTION, "",
             "`tests/test_readers_real.py` runs the readers on every file shipped inside the installed pydicom "
             "(`pydicom/data`: its test files, palettes and character-set files; and each folder of them, read as a "
             f"series) and on every NIfTI (and DICOM) file in nibabel's test data: {files} files and "
             f"{len(found) - files} folders, nothing downloaded. Each file read matches an independent float64 "
             "reference (pydicom's `pixel_array` → `apply_modality_lut` → photometric interpretation, scaled as "
             "above; nibabel's `get_fdata()`), each refusal is one line naming the file. 2D options for DICOM files, "
             "3D for NIfTI and folders. The table is printed by `python tests/test_readers_real.py`; the test fails "
             "when it drifts from what the readers do.", "",
             f"**{len(read)} read, {len(found) - len(read)} refused:**", ""]
    lines += [f"- {count} {kind}" for kind, count in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines += ["", "| file | what it is | verdict |", "|---|---|---|"]
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's word on the invalid values some of these files hold on purpose
        for label, v in found.items():
            lines.append(f"| `{label}` | {cell(what_it_is(inputs[label]))} | {cell(v)} |")
    return "\n".join(lines) + "\n"


def docs_section() -> str:
    text = open(DOCS, encoding="utf-8").read()
    if SECTION not in text:
        return ""
    section = text[text.index(SECTION):]
    following = section.find("\n## ", len(SECTION))
    return section if following < 0 else section[:following + 1]


# -- the tests -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def found() -> dict[str, str]:
    return verdicts()


def test_every_real_file_is_read_as_its_library_says_or_refused_in_one_line(found):
    assert len(found) >= 200
    assert found == EXPECTED


def test_pydicoms_ybr_to_rgb_is_the_standards(found):
    """readers.py leaves YBR_FULL(_422) to pydicom's conversion: here it is checked against PS3.3's own formula on
    the uncompressed file (JPEG files are converted by their decoder)."""
    path = os.path.join(PYDICOM_ROOT, "pydicom", "data", "test_files", "SC_ybr_full_422_uncompressed.dcm")
    ds = dicom_dataset(path)
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    ours = ybr_to_rgb(pixel_array(ds, as_rgb=False))
    np.testing.assert_allclose(ds.pixel_array, ours, atol=1.0)  # pydicom rounds to integers
    image = decode(path, DecodeOptions(2, 3))[0].numpy()
    np.testing.assert_allclose(np.moveaxis(image, 0, -1) * 255, ours, atol=1.0)


def test_the_docs_table_is_what_the_readers_do(found):
    assert docs_section() == markdown(found), "regenerate it: python tests/test_readers_real.py"


# the verdicts, regenerated with `python tests/test_readers_real.py --expected` after a deliberate change
EXPECTED: dict[str, str] = {'nibabel/nicom/tests/data/0.dcm': 'read',
 'nibabel/nicom/tests/data/1.dcm': 'read',
 'nibabel/nicom/tests/data/csa_slice_norm.dcm': 'refused: a DICOM file without pixel data (MR Image; a header-only '
                                                'export, or a file cut before its pixels)',
 'nibabel/nicom/tests/data/decimal_rescale.dcm': 'read',
 'nibabel/nicom/tests/data/philips_mprage.dcm.gz': 'refused: a gzip-compressed DICOM file (gunzip it first)',
 'nibabel/nicom/tests/data/siemens_dwi_0.dcm.gz': 'refused: a gzip-compressed DICOM file (gunzip it first)',
 'nibabel/nicom/tests/data/siemens_dwi_1000.dcm.gz': 'refused: a gzip-compressed DICOM file (gunzip it first)',
 'nibabel/nicom/tests/data/slicethickness_empty_string.dcm': 'read',
 'nibabel/tests/data/0.dcm': 'read',
 'nibabel/tests/data/1.dcm': 'read',
 'nibabel/tests/data/analyze.hdr': 'refused: an Analyze 7.5 header (.hdr/.img pair), not NIfTI',
 'nibabel/tests/data/anatomical.nii': 'read',
 'nibabel/tests/data/example4d.nii.gz': 'refused: 4 axes (128x96x24x2) where data.spatial_dims 3 allows 3 spatial '
                                        'axes plus a last channel axis of data.in_channels (1)',
 'nibabel/tests/data/example_nifti2.nii.gz': 'refused: 4 axes (32x20x12x2) where data.spatial_dims 3 allows 3 '
                                             'spatial axes plus a last channel axis of data.in_channels (1)',
 'nibabel/tests/data/functional.nii': 'refused: 4 axes (17x21x3x20) where data.spatial_dims 3 allows 3 spatial '
                                      'axes plus a last channel axis of data.in_channels (1)',
 'nibabel/tests/data/nifti1.hdr': 'refused: a NIfTI header whose voxels are in a separate .img file (a .hdr/.img '
                                  'pair)',
 'nibabel/tests/data/nifti2.hdr': 'refused: a NIfTI header whose voxels are in a separate .img file (a .hdr/.img '
                                  'pair)',
 'nibabel/tests/data/reoriented_anat_moved.nii': 'read',
 'nibabel/tests/data/resampled_anat_moved.nii': 'refused: 153 of 1,071 values are NaN or infinite',
 'nibabel/tests/data/row_major.dconn.nii': 'refused: a CIFTI-2 file (values on surface vertices and parcels, not a '
                                           'voxel volume)',
 'nibabel/tests/data/standard.nii.gz': 'read',
 'pydicom/data/charset_files/': 'refused: 14 series (SeriesInstanceUIDs) in one folder, where a volume is one '
                                'series',
 'pydicom/data/charset_files/FileInfo.txt': "refused: not a supported image (starts with b'Filename    ')",
 'pydicom/data/charset_files/chrArab.dcm': 'read',
 'pydicom/data/charset_files/chrFren.dcm': 'read',
 'pydicom/data/charset_files/chrFrenMulti.dcm': 'read',
 'pydicom/data/charset_files/chrGerm.dcm': 'read',
 'pydicom/data/charset_files/chrGreek.dcm': 'read',
 'pydicom/data/charset_files/chrH31.dcm': 'read',
 'pydicom/data/charset_files/chrH32.dcm': 'read',
 'pydicom/data/charset_files/chrHbrw.dcm': 'read',
 'pydicom/data/charset_files/chrI2.dcm': 'read',
 'pydicom/data/charset_files/chrJapMulti.dcm': 'refused: a DICOM file without pixel data (Computed Radiography '
                                               'Image; a header-only export, or a file cut before its pixels)',
 'pydicom/data/charset_files/chrJapMultiExplicitIR6.dcm': 'refused: a DICOM file without pixel data (Computed '
                                                          'Radiography Image; a header-only export, or a file cut '
                                                          'before its pixels)',
 'pydicom/data/charset_files/chrKoreanMulti.dcm': 'refused: a DICOM file without pixel data (Computed Radiography '
                                                  'Image; a header-only export, or a file cut before its pixels)',
 'pydicom/data/charset_files/chrRuss.dcm': 'read',
 'pydicom/data/charset_files/chrSQEncoding.dcm': 'refused: a DICOM file without pixel data (MR Image; a '
                                                 'header-only export, or a file cut before its pixels)',
 'pydicom/data/charset_files/chrSQEncoding1.dcm': 'refused: a DICOM file without pixel data (MR Image; a '
                                                  'header-only export, or a file cut before its pixels)',
 'pydicom/data/charset_files/chrX1.dcm': 'read',
 'pydicom/data/charset_files/chrX2.dcm': 'read',
 'pydicom/data/hashes.json': 'refused: not a supported image (starts with b\'{\\n  "693_J2K\')',
 'pydicom/data/palettes/': 'refused: fall.dcm: a DICOM colour palette, not an image, in a series folder',
 'pydicom/data/palettes/README.md': "refused: not a supported image (starts with b'DICOM Well-k')",
 'pydicom/data/palettes/fall.dcm': 'refused: a DICOM colour palette, not an image',
 'pydicom/data/palettes/hotiron.dcm': 'refused: a DICOM colour palette, not an image',
 'pydicom/data/palettes/hotmetalblue.dcm': 'refused: a DICOM colour palette, not an image',
 'pydicom/data/palettes/pet.dcm': 'refused: a DICOM colour palette, not an image',
 'pydicom/data/palettes/pet20step.dcm': 'refused: a DICOM colour palette, not an image',
 'pydicom/data/palettes/spring.dcm': 'refused: a DICOM colour palette, not an image',
 'pydicom/data/palettes/summer.dcm': 'refused: a DICOM colour palette, not an image',
 'pydicom/data/palettes/winter.dcm': 'refused: a DICOM colour palette, not an image',
 'pydicom/data/test_files/': "refused: no_meta.dcm: not a supported image (starts with b' "
                             "\\x08\\x00\\x05\\x00CS\\n\\x00ISO'; its suffix says DICOM, its content does not), in "
                             'a series folder',
 'pydicom/data/test_files/693_J2KI.dcm': 'read',
 'pydicom/data/test_files/CT_small.dcm': 'read (note: most values (-850..673.2) land in 0.503..0.526 of [0, 1] '
                                         '(scaled by the 16-bit stored range))',
 'pydicom/data/test_files/ExplVR_BigEnd.dcm': 'read',
 'pydicom/data/test_files/ExplVR_BigEndNoMeta.dcm': 'refused: a DICOM radiotherapy object (RT Ion Plan), not an '
                                                    'image',
 'pydicom/data/test_files/ExplVR_LitEndNoMeta.dcm': 'refused: a DICOM radiotherapy object (RT Ion Plan), not an '
                                                    'image',
 'pydicom/data/test_files/GDCMJ2K_TextGBR.dcm': 'refused: its JPEG 2000 Image Compression (Lossless Only) pixel '
                                                'data could not be decoded (RuntimeError: pillow: broken data '
                                                'stream when reading image file)',
 'pydicom/data/test_files/J2K_pixelrep_mismatch.dcm': 'read',
 'pydicom/data/test_files/JPEG-lossy.dcm': 'refused: its JPEG Extended (Process 2 and 4) pixel data could not be '
                                           "decoded (RuntimeError: pillow: Pillow does not support 'JPEG Extended' "
                                           'for samples with 12-bit precision)',
 'pydicom/data/test_files/JPEG2000-embedded-sequence-delimiter.dcm': 'refused: its JPEG 2000 Image Compression '
                                                                     'pixel data could not be decoded '
                                                                     '(RuntimeError: pillow: Image size '
                                                                     '(3811783737344 pixels) exceeds limit of '
                                                                     '178956970 pixels, could be decompression '
                                                                     'bomb DOS attack.)',
 'pydicom/data/test_files/JPEG2000.dcm': 'read',
 'pydicom/data/test_files/JPEGLSNearLossless_08.dcm': 'read',
 'pydicom/data/test_files/JPEGLSNearLossless_16.dcm': 'read',
 'pydicom/data/test_files/JPGExtended.dcm': 'refused: its JPEG Extended (Process 2 and 4) pixel data could not be '
                                            "decoded (RuntimeError: pillow: Pillow does not support 'JPEG "
                                            "Extended' for samples with 12-bit precision)",
 'pydicom/data/test_files/MR_small.dcm': 'read (note: most values (153.9..1728) land in 0.502..0.526 of [0, 1] '
                                         '(scaled by the 16-bit stored range))',
 'pydicom/data/test_files/MR_small_RLE.dcm': 'read (note: most values (153.9..1728) land in 0.502..0.526 of [0, 1] '
                                             '(scaled by the 16-bit stored range))',
 'pydicom/data/test_files/MR_small_bigendian.dcm': 'read (note: most values (153.9..1728) land in 0.502..0.526 of '
                                                   '[0, 1] (scaled by the 16-bit stored range))',
 'pydicom/data/test_files/MR_small_expb.dcm': 'read (note: most values (153.9..1728) land in 0.502..0.526 of [0, '
                                              '1] (scaled by the 16-bit stored range))',
 'pydicom/data/test_files/MR_small_implicit.dcm': 'read (note: most values (153.9..1728) land in 0.502..0.526 of '
                                                  '[0, 1] (scaled by the 16-bit stored range))',
 'pydicom/data/test_files/MR_small_jp2klossless.dcm': 'read (note: most values (153.9..1728) land in 0.502..0.526 '
                                                      'of [0, 1] (scaled by the 16-bit stored range))',
 'pydicom/data/test_files/MR_small_jpeg_ls_lossless.dcm': 'read (note: most values (153.9..1728) land in '
                                                          '0.502..0.526 of [0, 1] (scaled by the 16-bit stored '
                                                          'range))',
 'pydicom/data/test_files/MR_small_padded.dcm': 'read (note: most values (153.9..1728) land in 0.502..0.526 of [0, '
                                                '1] (scaled by the 16-bit stored range))',
 'pydicom/data/test_files/MR_truncated.dcm': 'refused: truncated DICOM (pixel data 8,130 of 8,192 bytes)',
 'pydicom/data/test_files/README.txt': "refused: not a supported image (starts with b'Test Files u')",
 'pydicom/data/test_files/SC_jpeg_no_color_transform.dcm': 'read',
 'pydicom/data/test_files/SC_jpeg_no_color_transform_2.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_dcmtk_+eb+cr.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_dcmtk_+eb+cy+n1.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_dcmtk_+eb+cy+n2.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_dcmtk_+eb+cy+np.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_dcmtk_+eb+cy+s2.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_dcmtk_+eb+cy+s4.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_gdcm_KY.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_jls_lossy_line.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_jls_lossy_sample.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_jpeg.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_jpeg_app14_dcmd.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_jpeg_dcmd.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_jpeg_dcmtk.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_jpeg_gdcm.dcm': "refused: DICOM transfer syntax 'JPEG Lossless, Non-Hierarchical, "
                                                 "First-Order Prediction (Process 14 [Selection Value 1])' "
                                                 '(1.2.840.10008.1.2.4.70) cannot be decoded by the installed '
                                                 'pydicom and Pillow',
 'pydicom/data/test_files/SC_rgb_jpeg_lossy_gdcm.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_rle.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_rle_16bit.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_rle_16bit_2frame.dcm': 'refused: a multi-frame DICOM (2 frames) is not supported',
 'pydicom/data/test_files/SC_rgb_rle_2frame.dcm': 'refused: a multi-frame DICOM (2 frames) is not supported',
 'pydicom/data/test_files/SC_rgb_rle_32bit.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_rle_32bit_2frame.dcm': 'refused: a multi-frame DICOM (2 frames) is not supported',
 'pydicom/data/test_files/SC_rgb_small_odd.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_small_odd_big_endian.dcm': 'read',
 'pydicom/data/test_files/SC_rgb_small_odd_jpeg.dcm': 'read',
 'pydicom/data/test_files/SC_ybr_full_422_uncompressed.dcm': 'read',
 'pydicom/data/test_files/UN_sequence.dcm': 'refused: a DICOM file without pixel data (CT Image; a header-only '
                                            'export, or a file cut before its pixels)',
 'pydicom/data/test_files/badVR.dcm': 'refused: a DICOM radiotherapy object (RT Dose), not an image',
 'pydicom/data/test_files/crayons.icc': 'refused: not a supported image (starts with '
                                        'b\'\\x00\\x00"8lcms\\x04\\x00\\x00\\x00\')',
 'pydicom/data/test_files/dicomdirtests/': 'refused: a folder with only 7 DICOMDIR file(s) (indexes), no images',
 'pydicom/data/test_files/dicomdirtests/77654033/CR1/': 'refused: a 2D array (16x16) in a config with '
                                                        'data.spatial_dims 3',
 'pydicom/data/test_files/dicomdirtests/77654033/CR1/6154': 'read',
 'pydicom/data/test_files/dicomdirtests/77654033/CR2/': 'refused: a 2D array (16x16) in a config with '
                                                        'data.spatial_dims 3',
 'pydicom/data/test_files/dicomdirtests/77654033/CR2/6247': 'read',
 'pydicom/data/test_files/dicomdirtests/77654033/CR3/': 'refused: a 2D array (16x16) in a config with '
                                                        'data.spatial_dims 3',
 'pydicom/data/test_files/dicomdirtests/77654033/CR3/6278': 'read',
 'pydicom/data/test_files/dicomdirtests/77654033/CT2/': 'refused: the slices are unevenly spaced: 202.5 mm between '
                                                        '17106 and 17136 where the median step is 1.25 mm (a '
                                                        'missing slice?)',
 'pydicom/data/test_files/dicomdirtests/77654033/CT2/17106': 'read (note: most values (-975.5..72) land in '
                                                             '0.501..0.517 of [0, 1] (scaled by the 16-bit stored '
                                                             'range))',
 'pydicom/data/test_files/dicomdirtests/77654033/CT2/17136': 'read (note: most values (80.1..1302) land in '
                                                             '0.517..0.536 of [0, 1] (scaled by the 16-bit stored '
                                                             'range))',
 'pydicom/data/test_files/dicomdirtests/77654033/CT2/17166': 'read (note: most values (1195..1478) land in '
                                                             '0.534..0.538 of [0, 1] (scaled by the 16-bit stored '
                                                             'range))',
 'pydicom/data/test_files/dicomdirtests/77654033/CT2/17196': 'read (note: most values (538..1358) land in '
                                                             '0.524..0.536 of [0, 1] (scaled by the 16-bit stored '
                                                             'range))',
 'pydicom/data/test_files/dicomdirtests/98892001/CT2N/': 'refused: the slices have 2 orientations '
                                                         '(ImageOrientationPatient), so they do not stack into one '
                                                         'volume (a localizer, or a radial acquisition?)',
 'pydicom/data/test_files/dicomdirtests/98892001/CT2N/6293': 'read (note: most values (229.4..289.9) land in '
                                                             '0.519..0.520 of [0, 1] (scaled by the 16-bit stored '
                                                             'range))',
 'pydicom/data/test_files/dicomdirtests/98892001/CT2N/6924': 'read (note: most values (74.55..217.7) land in '
                                                             '0.517..0.519 of [0, 1] (scaled by the 16-bit stored '
                                                             'range))',
 'pydicom/data/test_files/dicomdirtests/98892001/CT5N/': 'read (note: most values (-857.4..64) land in '
                                                         '0.503..0.517 of [0, 1] (scaled by the 16-bit stored '
                                                         'range))',
 'pydicom/data/test_files/dicomdirtests/98892001/CT5N/2062': 'read (note: most values (-876.6..38.45) land in '
                                                             '0.502..0.516 of [0, 1] (scaled by the 16-bit stored '
                                                             'range))',
 'pydicom/data/test_files/dicomdirtests/98892001/CT5N/2392': 'read (note: most values (-842.1..68.45) land in '
                                                             '0.503..0.517 of [0, 1] (scaled by the 16-bit stored '
                                                             'range))',
 'pydicom/data/test_files/dicomdirtests/98892001/CT5N/2693': 'read (note: most values (-552.8..67.9) land in '
                                                             '0.507..0.517 of [0, 1] (scaled by the 16-bit stored '
                                                             'range))',
 'pydicom/data/test_files/dicomdirtests/98892001/CT5N/3023': 'read (note: most values (-148.3..44) land in '
                                                             '0.513..0.516 of [0, 1] (scaled by the 16-bit stored '
                                                             'range))',
 'pydicom/data/test_files/dicomdirtests/98892001/CT5N/3353': 'read (note: most values (-146.4..36.9) land in '
                                                             '0.513..0.516 of [0, 1] (scaled by the 16-bit stored '
                                                             'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR1/': 'refused: 3 series (SeriesInstanceUIDs) in one folder, '
                                                        'where a volume is one series',
 'pydicom/data/test_files/dicomdirtests/98892003/MR1/15820': 'read (note: most values (289.8..727.5) land in '
                                                             '0.504..0.511 of [0, 1] (scaled by the 16-bit stored '
                                                             'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR1/4919': 'read (note: most values (477.9..797.7) land in '
                                                            '0.507..0.512 of [0, 1] (scaled by the 16-bit stored '
                                                            'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR1/5641': 'read (note: most values (342.8..712.3) land in '
                                                            '0.505..0.511 of [0, 1] (scaled by the 16-bit stored '
                                                            'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR2/': 'refused: 3 series (SeriesInstanceUIDs) in one folder, '
                                                        'where a volume is one series',
 'pydicom/data/test_files/dicomdirtests/98892003/MR2/15970': 'read (note: most values (103..316) land in '
                                                             '0.502..0.505 of [0, 1] (scaled by the 16-bit stored '
                                                             'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR2/4950': 'read (note: most values (490.1..729.3) land in '
                                                            '0.507..0.511 of [0, 1] (scaled by the 16-bit stored '
                                                            'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR2/4981': 'read (note: most values (525.6..737) land in '
                                                            '0.508..0.511 of [0, 1] (scaled by the 16-bit stored '
                                                            'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR2/5011': 'read (note: most values (422.1..796.9) land in '
                                                            '0.506..0.512 of [0, 1] (scaled by the 16-bit stored '
                                                            'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR2/6273': 'read (note: most values (463.1..686) land in '
                                                            '0.507..0.510 of [0, 1] (scaled by the 16-bit stored '
                                                            'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR2/6605': 'read (note: most values (441..674.2) land in '
                                                            '0.507..0.510 of [0, 1] (scaled by the 16-bit stored '
                                                            'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR2/6935': 'read (note: most values (466.6..714.8) land in '
                                                            '0.507..0.511 of [0, 1] (scaled by the 16-bit stored '
                                                            'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR700/': 'refused: the slices have 7 orientations '
                                                          '(ImageOrientationPatient), so they do not stack into '
                                                          'one volume (a localizer, or a radial acquisition?)',
 'pydicom/data/test_files/dicomdirtests/98892003/MR700/4467': 'read (note: most values (50..76.45) land in '
                                                              '0.501..0.501 of [0, 1] (scaled by the 16-bit stored '
                                                              'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR700/4528': 'read (note: most values (49.55..301.3) land in '
                                                              '0.501..0.505 of [0, 1] (scaled by the 16-bit stored '
                                                              'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR700/4558': 'read (note: most values (56.55..335.3) land in '
                                                              '0.501..0.505 of [0, 1] (scaled by the 16-bit stored '
                                                              'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR700/4588': 'read (note: most values (50..96.45) land in '
                                                              '0.501..0.501 of [0, 1] (scaled by the 16-bit stored '
                                                              'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR700/4618': 'read (note: most values (36.75..77.9) land in '
                                                              '0.501..0.501 of [0, 1] (scaled by the 16-bit stored '
                                                              'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR700/4648': 'read (note: most values (0..80.9) land in '
                                                              '0.500..0.501 of [0, 1] (scaled by the 16-bit stored '
                                                              'range))',
 'pydicom/data/test_files/dicomdirtests/98892003/MR700/4678': 'read (note: most values (0..79.35) land in '
                                                              '0.500..0.501 of [0, 1] (scaled by the 16-bit stored '
                                                              'range))',
 'pydicom/data/test_files/dicomdirtests/DICOMDIR': 'refused: a DICOMDIR (an index of a DICOM media, not an image)',
 'pydicom/data/test_files/dicomdirtests/DICOMDIR-bigEnd': 'refused: a DICOMDIR (an index of a DICOM media, not an '
                                                          'image)',
 'pydicom/data/test_files/dicomdirtests/DICOMDIR-empty.dcm': 'refused: a DICOMDIR (an index of a DICOM media, not '
                                                             'an image)',
 'pydicom/data/test_files/dicomdirtests/DICOMDIR-implicit': 'refused: a DICOMDIR (an index of a DICOM media, not '
                                                            'an image)',
 'pydicom/data/test_files/dicomdirtests/DICOMDIR-nooffset': 'refused: a DICOMDIR (an index of a DICOM media, not '
                                                            'an image)',
 'pydicom/data/test_files/dicomdirtests/DICOMDIR-nopatient': 'refused: a DICOMDIR (an index of a DICOM media, not '
                                                             'an image)',
 'pydicom/data/test_files/dicomdirtests/DICOMDIR-reordered': 'refused: a DICOMDIR (an index of a DICOM media, not '
                                                             'an image)',
 'pydicom/data/test_files/dicomdirtests/README.txt': "refused: not a supported image (starts with b'In this dire')",
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/': 'refused: a folder with only 1 DICOMDIR file(s) (indexes), '
                                                      'no images',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/DICOMDIR': 'refused: a DICOMDIR (an index of a DICOM media, not '
                                                              'an image)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/': 'refused: IM000000: a DICOM file '
                                                                                 'without pixel data (CT Image; a '
                                                                                 'header-only export, or a file '
                                                                                 'cut before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000000': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000001': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000002': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000003': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000004': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000005': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000006': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000007': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000008': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000009': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000A': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000B': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000C': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000D': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000E': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000F': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000G': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000H': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000I': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000J': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000K': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000L': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000M': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000N': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000O': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000P': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000Q': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000R': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000S': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000T': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000U': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000V': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000W': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000X': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000Y': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000Z': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000010': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000011': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000012': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000013': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000014': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000015': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000016': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000017': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000018': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000019': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00001A': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00001B': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00001C': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00001D': 'refused: a DICOM file '
                                                                                         'without pixel data (CT '
                                                                                         'Image; a header-only '
                                                                                         'export, or a file cut '
                                                                                         'before its pixels)',
 'pydicom/data/test_files/dicomdirtests/TINY_ALPHA/README': 'refused: not a supported image (starts with '
                                                            'b\'"""Tiny test\')',
 'pydicom/data/test_files/empty_charset_LEI.dcm': 'refused: a DICOM file without pixel data (no SOP class; a '
                                                  'header-only export, or a file cut before its pixels)',
 'pydicom/data/test_files/examples_jpeg2k.dcm': 'read',
 'pydicom/data/test_files/examples_overlay.dcm': 'read',
 'pydicom/data/test_files/examples_palette.dcm': 'read',
 'pydicom/data/test_files/examples_rgb_color.dcm': 'read',
 'pydicom/data/test_files/examples_ybr_color.dcm': 'refused: a multi-frame DICOM (30 frames) is not supported',
 'pydicom/data/test_files/image_dfl.dcm': 'read',
 'pydicom/data/test_files/liver_1frame.dcm': 'refused: a DICOM Segmentation object, not an image',
 'pydicom/data/test_files/liver_expb_1frame.dcm': 'refused: a DICOM Segmentation object, not an image',
 'pydicom/data/test_files/meta_missing_tsyntax.dcm': 'refused: pixel data without Rows, Columns, BitsAllocated, '
                                                     'PhotometricInterpretation, so it cannot be interpreted',
 'pydicom/data/test_files/nested_priv_SQ.dcm': 'refused: pixel data without Rows, Columns, BitsAllocated, '
                                               'PhotometricInterpretation, so it cannot be interpreted',
 'pydicom/data/test_files/no_meta.dcm': "refused: not a supported image (starts with b' "
                                        "\\x08\\x00\\x05\\x00CS\\n\\x00ISO'; its suffix says DICOM, its content "
                                        'does not)',
 'pydicom/data/test_files/no_meta_group_length.dcm': 'refused: a DICOM file without pixel data (RT Image; a '
                                                     'header-only export, or a file cut before its pixels)',
 'pydicom/data/test_files/priv_SQ.dcm': 'refused: a DICOM file without pixel data (MR Image; a header-only export, '
                                        'or a file cut before its pixels)',
 'pydicom/data/test_files/reportsi.dcm': 'refused: a DICOM Structured Report (Basic Text SR), not an image',
 'pydicom/data/test_files/reportsi_with_empty_number_tags.dcm': 'refused: a DICOM Structured Report (Basic Text '
                                                                'SR), not an image',
 'pydicom/data/test_files/rtdose.dcm': 'refused: a DICOM radiotherapy object (RT Dose), not an image',
 'pydicom/data/test_files/rtdose_1frame.dcm': 'refused: a DICOM radiotherapy object (RT Dose), not an image',
 'pydicom/data/test_files/rtdose_expb.dcm': 'refused: a DICOM radiotherapy object (RT Dose), not an image',
 'pydicom/data/test_files/rtdose_expb_1frame.dcm': 'refused: a DICOM radiotherapy object (RT Dose), not an image',
 'pydicom/data/test_files/rtdose_rle.dcm': 'refused: a DICOM radiotherapy object (RT Dose), not an image',
 'pydicom/data/test_files/rtdose_rle_1frame.dcm': 'refused: a DICOM radiotherapy object (RT Dose), not an image',
 'pydicom/data/test_files/rtplan.dcm': 'refused: a DICOM radiotherapy object (RT Plan), not an image',
 'pydicom/data/test_files/rtplan.dump': "refused: not a supported image (starts with b'0000 : 00 00')",
 'pydicom/data/test_files/rtplan_truncated.dcm': 'refused: truncated DICOM (its element (300A,00B0) ends at byte '
                                                 '2,394, the file at 2,129)',
 'pydicom/data/test_files/rtstruct.dcm': 'refused: a DICOM radiotherapy object (RT Structure Set), not an image',
 'pydicom/data/test_files/rtstruct.dump': "refused: not a supported image (starts with b'(0008, 0005)')",
 'pydicom/data/test_files/test-SR.dcm': 'refused: a DICOM Structured Report (Comprehensive SR), not an image',
 'pydicom/data/test_files/test1.json': 'refused: not a supported image (starts with b\'{\\n    "00080\')',
 'pydicom/data/test_files/test_PN.json': 'refused: not a supported image (starts with b\'{\\n    "00080\')',
 'pydicom/data/test_files/waveform_ecg.dcm': 'refused: a DICOM waveform (12-lead ECG Waveform), not an image',
 'pydicom/data/test_files/zipMR.gz': 'refused: a gzip-compressed DICOM file (gunzip it first)',
 'pydicom/data/urls.json': 'refused: not a supported image (starts with b\'{\\n    "693_J\')'}

if __name__ == "__main__":
    result = verdicts()
    if "--expected" in sys.argv:
        print("EXPECTED: dict[str, str] = " + pprint.pformat(result, width=116, sort_dicts=False))
    else:
        print(markdown(result), end="")
