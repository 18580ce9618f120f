"""Decode what the file says: every supported file -> a float32, channel-first array in [0, 1].

A file's type is read from its content (the suffix is only a hint): PNG and JPEG signatures, the NPY magic, a NIfTI
header (.nii, or gzipped), the NRRD magic (NRRD000x, 3D Slicer's .nrrd), DICOM with or without its 128-byte preamble.
The same picture stored as PNG (8 or 16 bit, gray, RGB or palette), JPEG, NPY, NIfTI, NRRD or DICOM gives the same
array, in the axis order of the library that reads that format (PIL's and pydicom's rows x columns, NumPy's, nibabel's
and pynrrd's array as stored). PNG/JPEG, NPY and NRRD go through MONAI's PILReader, NumpyReader and NrrdReader (its
affine LPS -> RAS, as nibabel's); NIfTI and DICOM through nibabel and pydicom directly (below, why). What is left to
the caller is written here, because no library step does it per file:

- NaN and infinity refused on the raw values (NPY, NIfTI, NRRD, float DICOM), before any scaling could hide them;
- intensity from the file's own encoding: 8-bit -> /255, 16-bit -> /65535, DICOM through its modality LUT (pydicom's
  apply_modality_lut: RescaleSlope/Intercept or a Modality LUT) from the range of BitsStored and PixelRepresentation
  (or its own WindowCenter/Width when data.window_from_file), MONOCHROME1 inverted, PALETTE COLOR through its colour
  table to RGB by the table's bit depth, YBR as RGB (pydicom converts it); signed or float arrays min-max per file;
  data.intensity_range overrides all of these;
- the layout: trailing singleton axes squeezed, a trailing axis of data.in_channels read as channels, an image's
  alpha dropped; channels first;
- a DICOM folder is one series: one SeriesInstanceUID, one orientation, slices ordered by their position along the
  slice normal (InstanceNumber only when the files carry no geometry), no repeated position, even spacing;
- then, after the spatial steps, the channels adapted per file to the backbone (gray repeated, RGB to gray by
  luminance), so one job can hold an RGB-JPEG site and a 16-bit gray one.

Each failure is a DataError whose one line names the file, what was found and the fix. What is odd but readable (a
16-bit file holding 12-bit values, a CT whose values fill a sliver of [0, 1]) is a note on the FileInfo.
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform


class DataError(ValueError):
    """Bad site data; the message names the file, the row or field, and the fix."""


# file suffix -> format; the format's family decides the reader and what a site may mix (one family per site)
FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".npy": "npy", ".nii": "nifti", ".nii.gz": "nifti",
           ".nrrd": "nrrd", ".dcm": "dicom", ".dicom": "dicom"}
FAMILY = {"png": "image", "jpeg": "image", "npy": "array", "nifti": "nifti", "nrrd": "nrrd", "dicom": "dicom"}
# ITU-R 601-2 luma, the weights PIL's convert("L") uses: RGB -> gray gives what a viewer's grayscale shows
LUMA = (0.299, 0.587, 0.114)
# a note when the values use less than this share of what their encoding can hold
NARROW = 1 / 8


def suffix_of(path: str) -> str:
    lower = path.lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else os.path.splitext(lower)[1]


# -- what a file is, by its content ----------------------------------------------------------------------------

SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"\x93NUMPY", "npy"),
              (b"NRRD000", "nrrd"))  # NRRD0001..NRRD0005: the header's version line
# formats recognised only to say what they are when refused
FOREIGN = ((b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"GIF8", "a GIF image"),
           (b"PK\x03\x04", "a ZIP archive (an .npz?)"),
           (b"\x89HDF\r\n\x1a\n", "an HDF5 file"), (b"%PDF", "a PDF document"), (b"BM", "a BMP image"))
DICOMDIR_UID = "1.2.840.10008.1.3.10"
DICOMDIR_REASON = "a DICOMDIR (an index of a DICOM media, not an image)"
HEAD = 1024  # bytes read to tell a file's type


def format_of(path: str) -> str | None:
    """png, jpeg, npy, nifti, nrrd, dicom (by content; a folder: one DICOM series), or None (unsupported_reason says
    why)."""
    return _sniff(path)[0]


def unsupported_reason(path: str) -> str:
    """Why format_of(path) is None, in a few words ("empty file (0 bytes)", "a DICOMDIR (...)"); "" if supported."""
    return _sniff(path)[1]


def _sniff(path: str) -> tuple[str | None, str]:
    if os.path.isdir(path):
        return "dicom", ""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEAD)
    except OSError as err:
        return None, f"unreadable ({err.strerror or type(err).__name__})"
    if size == 0:
        return None, "empty file (0 bytes)"
    for magic, fmt in SIGNATURES:
        if head.startswith(magic):
            return fmt, ""
    if head[128:132] == b"DICM":  # before any other header: a DICOM preamble may hold a TIFF or NIfTI header
        return _dicom_kind(path, preamble=True)
    nifti = _nifti_kind(head)
    if nifti is not None:
        return nifti
    if head.startswith(b"\x1f\x8b"):
        return _gzip_kind(path)
    if _bare_dicom_start(head):
        kind = _dicom_kind(path, preamble=False)
        if kind[0] is not None or kind[1]:
            return kind
    for magic, what in FOREIGN:
        if head.startswith(magic):
            return None, f"{what}, not one of the supported formats"
    hint = FORMATS.get(suffix_of(path))
    said = f"; its suffix says {hint.upper()}, its content does not" if hint else ""
    return None, f"not a supported image (starts with {head[:12]!r}{said})"


def _nifti_kind(head: bytes) -> tuple[str | None, str] | None:
    """NIfTI-1 (sizeof_hdr 348, magic at 344) or NIfTI-2 (540, magic at 4), either byte order; None if neither."""
    if len(head) < 348:
        return None
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        magic = head[344:348] if size == 348 else head[4:8] if size == 540 else b""
        if magic in (b"n+1\x00", b"n+2\x00"):
            return "nifti", ""
        if magic in (b"ni1\x00", b"ni2\x00"):
            return None, "a NIfTI header whose voxels are in a separate .img file (a .hdr/.img pair)"
        if size == 348 and head[38:39] == b"r":  # the "regular" flag of an Analyze header, no NIfTI magic
            return None, "an Analyze 7.5 header (.hdr/.img pair), not NIfTI"
    return None


def _gzip_kind(path: str) -> tuple[str | None, str]:
    try:
        with gzip.open(path, "rb") as f:
            inner = f.read(HEAD)
    except (OSError, EOFError, zlib.error) as err:
        return None, f"a corrupt or truncated gzip file ({_first_line(err)})"
    nifti = _nifti_kind(inner)
    if nifti is not None:
        return nifti
    if inner[128:132] == b"DICM" or _bare_dicom_start(inner):
        return None, "a gzip-compressed DICOM file (gunzip it first)"
    return None, f"a gzip file holding something else (it starts with {inner[:12]!r})"


def _bare_dicom_start(head: bytes) -> bool:
    """Whether the file may be DICOM without its preamble: a first tag in the meta (0002) or identifying (0008) group,
    either byte order. pydicom.misc.is_dicom looks for the preamble only."""
    if len(head) < 8:
        return False
    return any(struct.unpack(order + "H", head[:2])[0] in (0x0002, 0x0008) for order in "<>")


def _dicom_kind(path: str, preamble: bool) -> tuple[str | None, str]:
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if preamble:  # the file meta is enough to tell an image from a DICOMDIR, and cheap
                meta = pydicom.filereader.read_file_meta_info(path)
                sop = str(meta.get("MediaStorageSOPClassUID", ""))
                return (None, DICOMDIR_REASON) if sop == DICOMDIR_UID else ("dicom", "")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for a damaged header
        if preamble:
            return None, f"truncated or corrupt DICOM header ({_first_line(err)})"
        return None, ""
    # forced reading parses almost anything: a real data set names its SOP class or study, or describes pixels
    if "DirectoryRecordSequence" in ds:
        return None, DICOMDIR_REASON
    if any(tag.group == 0x0008 for tag in ds.keys()) or "Rows" in ds:
        return "dicom", ""
    return None, ""



def fix_for(reason: str) -> str:
    """What to do about a file refused for `reason` (unsupported_reason's words)."""
    if reason == DICOMDIR_REASON:
        return "list the image files it indexes (or their series folders), not the DICOMDIR"
    if reason.startswith("a gzip-compressed DICOM"):
        return "decompress it (gunzip) and list the DICOM file"
    if reason.startswith(("empty file", "truncated", "unreadable")):
        return "copy the file again from its source, or remove its row"
    if reason.startswith(("a NIfTI header whose", "an Analyze")):
        return "save the pair as one NIfTI file, e.g. nib.save(nib.load('x.hdr'), 'x.nii.gz')"
    return ("use PNG, JPEG, NPY, NIfTI (.nii, .nii.gz), NRRD (.nrrd) or DICOM files (or a folder holding one DICOM "
            "series), or remove its row")


@dataclass(frozen=True)
class FileInfo:
    """What validate reports per file: the format, how its values are stored, its channels and shape, and notes:
    one-line warnings about a readable but odd file (each names the file, what is odd and the config key to set)."""

    format: str
    dtype: str  # e.g. uint8, uint16 (12 bit), float32, palette
    channels: int  # after dropping an image's alpha
    shape: tuple  # spatial shape, as decoded
    notes: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return f"{self.format} {self.dtype} {self.channels}ch"


@dataclass(frozen=True)
class DecodeOptions:
    spatial_dims: int
    in_channels: int
    intensity_range: tuple | None = None
    window_from_file: bool = False

    @classmethod
    def from_config(cls, data_cfg) -> "DecodeOptions":
        return cls(data_cfg.spatial_dims, data_cfg.in_channels,
                   tuple(data_cfg.intensity_range) if data_cfg.intensity_range else None,
                   data_cfg.window_from_file)

    @property
    def own_encoding(self) -> bool:
        """Whether values are scaled by the file's own encoding (no range or window set): the notes apply."""
        return not self.intensity_range and not self.window_from_file


# -- layout ------------------------------------------------------------------------------------------------

def layout(shape: tuple, opts: DecodeOptions, path: str, channels: int | None = None) -> tuple[tuple, int]:
    """(spatial shape, channels) of an array of `shape`: trailing singleton axes squeezed; a trailing axis is
    channels when the format says so (`channels`, from an image's mode) or when it equals data.in_channels."""
    dims = opts.spatial_dims
    if channels is not None and channels > 1:
        spatial = tuple(shape[:-1])
    else:
        spatial = tuple(shape)
        while len(spatial) > dims and spatial[-1] == 1:
            spatial = spatial[:-1]
        channels = 1
        if len(spatial) == dims + 1 and spatial[-1] == opts.in_channels and opts.in_channels > 1:
            spatial, channels = spatial[:-1], opts.in_channels
    shown = "x".join(map(str, shape))
    if len(spatial) == dims:
        return spatial, channels
    if len(spatial) < dims:
        fix = f"set data.spatial_dims: {len(spatial)}, or use {dims}D files" if len(spatial) == 2 else f"use {dims}D files"
        raise DataError(f"{path}: a {len(spatial)}D array ({shown}) in a config with data.spatial_dims {dims}. "
                        f"Fix: {fix}.")
    if len(spatial) == dims + 1 and dims == 2 and spatial[-1] > 4:
        raise DataError(f"{path}: a 3D array ({shown}) in a config with data.spatial_dims 2. "
                        "Fix: set data.spatial_dims: 3, or use 2D files.")
    last = spatial[-1]
    hint = (f"set data.in_channels: {last} if the last axis holds channels, or " if 1 < last <= 4 else "")
    raise DataError(f"{path}: {len(spatial)} axes ({shown}) where data.spatial_dims {dims} allows {dims} spatial "
                    f"axes plus a last channel axis of data.in_channels ({opts.in_channels}). Fix: {hint}store one "
                    f"{dims}D image per file, channels last.")


def _channels_first(arr: np.ndarray, spatial: tuple, channels: int) -> np.ndarray:
    arr = arr.reshape(spatial + ((channels,) if channels > 1 else ()))
    return np.moveaxis(arr, -1, 0) if channels > 1 else arr[None]


# -- intensity ---------------------------------------------------------------------------------------------

def _scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = (arr.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(arr.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _refuse_non_finite(arr: np.ndarray, path: str) -> None:
    """On the raw values: min-max scaling would turn NaN into 0 and infinity into a flat image, silently."""
    if arr.dtype.kind == "c":
        raise DataError(f"{path}: complex values ({arr.dtype}). Fix: store the magnitude (or one part) as a real "
                        "array.")
    if arr.dtype.kind == "f":
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise DataError(f"{path}: {bad:,} of {arr.size:,} values are NaN or infinite. Fix: re-export it with "
                            "finite values (set the voxels outside the field of view to a number).")


def _by_dtype(arr: np.ndarray, opts: DecodeOptions, path: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """[0, 1] by the array's own encoding, and the notes on it."""
    if opts.intensity_range:
        return _scale(arr, *opts.intensity_range), ()
    if arr.dtype == bool:
        return arr.astype(np.float32), ()
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        bits = 8 * arr.dtype.itemsize
        notes = _bit_depth_note(arr, path) if bits == 16 else ()
        return _scale(arr, 0.0, float(2 ** bits - 1)), notes
    # signed integers and floats have no natural range: min-max per file (set data.intensity_range for a window)
    if not arr.size:
        return arr.astype(np.float32), ()
    unit = _scale(arr, float(arr.min()), float(arr.max()))
    fix = "set data.intensity_range: [{lo}, {hi}] (or the window that suits the task)"
    return unit, _narrow_note(arr, unit, path, "min-max per file", fix)


def _bit_depth_note(stored: np.ndarray, path: str, values=lambda v: v) -> tuple[str, ...]:
    """16-bit values all under 1/8 of 65535: the scanner stores fewer bits (12, often); `values` maps a stored value
    to what data.intensity_range is compared with (a DICOM's rescale)."""
    hi = int(stored.max()) if stored.size else 0
    if not 0 < hi < 65536 * NARROW:
        return ()
    bits = hi.bit_length()
    lo_v, hi_v = sorted((values(0), values(2 ** bits - 1)))
    return (f"{path}: 16-bit values {int(stored.min())}..{hi} fit {bits} bits and fill {hi / 65535:.1%} of [0, 1]; "
            f"if {bits} bits are stored, set data.intensity_range: [{lo_v:g}, {hi_v:g}]",)


def _narrow_note(values: np.ndarray, unit: np.ndarray, path: str, how: str, fix: str) -> tuple[str, ...]:
    """Most values (1st..99th percentile) in under 1/8 of [0, 1]: a window or range would show what they hold."""
    step = max(1, unit.size // 2 ** 20)  # a strided sample: percentiles of a large volume in milliseconds
    u1, u99 = np.percentile(unit.ravel()[::step], (1, 99))
    if u99 - u1 >= NARROW:
        return ()
    v1, v99 = np.percentile(np.asarray(values, dtype=np.float64).ravel()[::step], (1, 99))
    lo, hi = f"{v1:.4g}", f"{v99:.4g}"
    return (f"{path}: most values ({lo}..{hi}) land in {u1:.3f}..{u99:.3f} of [0, 1] ({how}); "
            + fix.format(lo=lo, hi=hi),)


# -- PNG / JPEG --------------------------------------------------------------------------------------------

def _pil_converter(img):
    """Palette images through their palette (gray palettes to L), bilevel to L, CMYK/YCbCr/LAB/HSV to RGB."""
    mode = img.mode
    if mode in ("P", "PA"):
        alpha = mode == "PA" or "transparency" in img.info
        rgb = np.asarray(img.convert("RGB"))
        gray = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
        out = img.convert(("LA" if alpha else "L") if gray else ("RGBA" if alpha else "RGB"))
    elif mode == "1":
        out = img.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        out = img.convert("RGB")
    else:
        return img
    out.info["fedopal_source_mode"] = mode
    return out


def _pil_bomb_message(path: str, err: Exception) -> str:
    from PIL import Image

    return (f"{path}: too large to decode safely ({_first_line(err)}; Pillow's limit is "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels). Fix: downsample it before listing it (the model sees "
            "data.image_size anyway), or remove its row.")


def _read_image(path: str, opts: DecodeOptions):
    from monai.data import PILReader
    from PIL import Image, UnidentifiedImageError

    reader = PILReader(reverse_indexing=False, converter=_pil_converter)  # rows x columns, as PIL and NumPy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = reader.read(path)
            img.load()  # a truncated file fails here
            arr = np.asarray(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(_pil_bomb_message(path, err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: corrupt or unreadable image ({type(err).__name__}: {_first_line(err)}). "
                        "Fix: re-export the image or remove its row.") from None
    source_mode = img.info.get("fedopal_source_mode", img.mode)
    bands = img.getbands()
    if bands[-1] == "A":  # alpha is how to composite the image, not what was imaged
        arr = arr[..., :-1] if len(bands) > 2 else arr[..., 0]
        bands = bands[:-1]
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if img.mode.startswith("I;16"):
        arr = arr.astype(np.uint16)
    spatial, channels = layout(arr.shape, opts, path, channels=len(bands))
    dtype = "palette" if source_mode in ("P", "PA") else str(arr.dtype)
    unit, notes = _by_dtype(arr, opts, path)
    info = FileInfo(format_of(path) or "image", dtype, channels, spatial, notes)
    return _channels_first(unit, spatial, channels), None, info


# -- NPY, NIfTI --------------------------------------------------------------------------------------------

def _read_npy(path: str, opts: DecodeOptions):
    from monai.data import NumpyReader

    try:
        arr, _ = NumpyReader().get_data(NumpyReader().read(path))  # np.load: the NPY magic decides, not the suffix
    except Exception as err:  # noqa: BLE001 - a damaged header fails in NumPy's parser with its own types
        raise DataError(f"{path}: unreadable .npy ({_first_line(err)}). Fix: re-save it with numpy.save.") from None
    arr = np.asarray(arr)
    _refuse_non_finite(arr, path)
    spatial, channels = layout(arr.shape, opts, path)
    unit, notes = _by_dtype(arr, opts, path)
    return _channels_first(unit, spatial, channels), None, FileInfo("npy", arr.dtype.name, channels, spatial, notes)


def _load_nifti(path: str):
    """nibabel's image for a file whose content is NIfTI. nib.load (and so MONAI's NibabelReader) picks the format by
    the suffix, so a NIfTI file under another name is handed to nibabel as bytes; what NibabelReader would return,
    the voxels as stored (np.asanyarray(dataobj), scaled by scl_slope) and the affine, is taken from it here."""
    import nibabel as nib

    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if suffix_of(path) == (".nii.gz" if gz else ".nii"):
        return nib.load(path)
    with (gzip.open if gz else open)(path, "rb") as f:
        raw = f.read()
    nifti2 = 540 in {struct.unpack(order + "i", raw[:4])[0] for order in "<>"}
    return (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_bytes(raw)


def _read_nifti(path: str, opts: DecodeOptions):
    import nibabel as nib

    try:
        img = _load_nifti(path)
        if isinstance(img, nib.cifti2.Cifti2Image):
            raise DataError(f"{path}: a CIFTI-2 file (values on surface vertices and parcels, not a voxel volume). "
                            "Fix: list NIfTI volumes.")
        with np.errstate(all="ignore"):  # a scaled NaN stays NaN: the check below names it
            arr = np.asarray(np.asanyarray(img.dataobj))
        affine = np.asarray(img.affine, dtype=np.float64)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for a truncated or foreign file
        raise DataError(f"{path}: corrupt or truncated NIfTI ({type(err).__name__}: {_first_line(err)}). "
                        "Fix: re-export the volume or remove its row.") from None
    _refuse_non_finite(arr, path)
    spatial, channels = layout(arr.shape, opts, path)
    unit, notes = _by_dtype(arr, opts, path)
    return _channels_first(unit, spatial, channels), affine, FileInfo("nifti", arr.dtype.name, channels, spatial, notes)


# -- NRRD --------------------------------------------------------------------------------------------------
# MONAI's NrrdReader (pynrrd underneath), index order F: the array's axes are the header's `sizes` in order, as
# nibabel's are a NIfTI's. Its affine is the header's `space directions` (one column per axis) and `space origin`,
# turned from LPS to RAS (affine_lps_to_ras, the default: the rows of x and y negated) when the header says
# left-posterior-superior or names no space; a header in another space (RAS, say) is kept as it is.

def load_nrrd(path: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(the voxels as stored, in their own dtype; the 4x4 RAS affine, None without `space directions`; the header),
    or a DataError. An axis without a direction ("none": a channel or list axis) is moved last."""
    from monai.data import NrrdReader

    try:
        img = NrrdReader().read(path)
        arr = np.asarray(img.array)
        header = dict(img.header)
        directions = header.get("space directions")
        affine = None
        if directions is not None and header.get("space origin") is not None:
            directions = np.asarray(directions, dtype=np.float64)
            spatial = np.flatnonzero(np.isfinite(directions).all(axis=1))
            if len(spatial) < directions.shape[0]:  # a "none" row: not a spatial axis
                if len(spatial) + 1 != directions.shape[0]:
                    raise DataError(f"{path}: {directions.shape[0] - len(spatial)} non-spatial axes in the NRRD "
                                    "header. Fix: store one channel axis at most.")
                (other,) = np.flatnonzero(~np.isfinite(directions).all(axis=1))
                arr = np.moveaxis(arr, other, -1)
                header = {**header, "space directions": directions[spatial], "sizes": np.asarray(arr.shape[:-1])}
                img = type(img)(arr[..., 0], header)  # NrrdReader reads the geometry of the spatial axes only
            _, meta = NrrdReader(dtype=arr.dtype).get_data(img)
            affine = np.asarray(meta["affine"], dtype=np.float64)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - pynrrd raises its NRRDError, ValueError, OSError for a damaged file
        raise DataError(f"{path}: corrupt or unreadable NRRD ({type(err).__name__}: {_first_line(err)}). "
                        "Fix: re-export the volume (3D Slicer: Save as .nrrd) or remove its row.") from None
    if affine is not None and affine.shape != (4, 4):  # a 2D space: x, y in the 4x4 of a 3D affine
        full = np.eye(4)
        n = affine.shape[0] - 1
        full[:n, :n], full[:n, 3] = affine[:n, :n], affine[:n, n]
        affine = full
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr, affine, header


def _read_nrrd(path: str, opts: DecodeOptions):
    arr, affine, header = load_nrrd(path)
    _refuse_non_finite(arr, path)
    spatial, channels = layout(arr.shape, opts, path)
    unit, notes = _by_dtype(arr, opts, path)
    return _channels_first(unit, spatial, channels), affine, FileInfo("nrrd", arr.dtype.name, channels, spatial, notes)


# -- DICOM -------------------------------------------------------------------------------------------------
# pydicom directly, not MONAI's PydicomReader: that reader orders a folder by InstanceNumber and takes the slice
# spacing from the z coordinate alone, and cannot be given another order; it reads preamble-less files only with
# force, applies no palette and no Modality LUT. Here a series is ordered by position along the slice normal and
# stacked, and its affine is built with the same formula (nibabel's DICOM orientation page, as MONAI does), LPS to RAS.

SEGMENTATION_UID = "1.2.840.10008.5.1.4.1.1.66.4"
RT_IMAGE_UID = "1.2.840.10008.5.1.4.1.1.481.1"  # a radiotherapy class that is an image (portal images)
NOT_IMAGES = {  # SOP class UID prefix -> what its objects are (none is a picture of the patient to classify)
    "1.2.840.10008.5.1.4.1.1.66.": "a DICOM {name} object",
    "1.2.840.10008.5.1.4.1.1.481.": "a DICOM radiotherapy object ({name})",
    "1.2.840.10008.5.1.4.1.1.88.": "a DICOM Structured Report ({name})",
    "1.2.840.10008.5.1.4.1.1.9.": "a DICOM waveform ({name})",
    "1.2.840.10008.5.1.4.1.1.11.": "a DICOM presentation state ({name})",
    "1.2.840.10008.5.1.4.1.1.104.": "an encapsulated document ({name})",
    "1.2.840.10008.5.1.4.39.": "a DICOM colour palette",
}
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _sop_class(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""))


def _sop_name(sop: str) -> str:
    from pydicom.uid import UID

    name = UID(sop).name if sop else "no SOP class"
    return name.removesuffix(" Storage") if name != sop else f"SOP class {sop}"


def _not_an_image(ds) -> tuple[str, str] | None:
    """(what the object is, the fix) for a DICOM object that is not an image; None for an image."""
    sop = _sop_class(ds)
    if sop == DICOMDIR_UID or "DirectoryRecordSequence" in ds:
        return DICOMDIR_REASON, fix_for(DICOMDIR_REASON)
    if sop == SEGMENTATION_UID or str(ds.get("Modality", "")) == "SEG":
        return "a DICOM Segmentation object, not an image", "list it as a mask, not as an image"
    for prefix, what in NOT_IMAGES.items():
        if sop.startswith(prefix) and sop != RT_IMAGE_UID:
            return what.format(name=_sop_name(sop)) + ", not an image", "list image files only"
    return None


def _dicom_dataset(path: str, headers_only: bool = False):
    """The data set (force: a file without its preamble is DICOM too, once its content said so)."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=headers_only)
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for a damaged file
        raise DataError(f"{path}: corrupt or truncated DICOM ({type(err).__name__}: {_first_line(err)}). "
                        "Fix: copy the file again from its source, or remove its row.") from None
    cut = _cut_short(ds, path)
    if cut:
        raise DataError(f"{path}: {cut}. Fix: copy the file again from its source, or remove its row.")
    return ds


def _cut_short(ds, path: str) -> str | None:
    """pydicom reads a cut file without a word: it keeps a last element whose value the file no longer holds (and drops
    a cut element header). A last element ending past the end of the file is a truncated file; pixel data is counted
    in bytes by _check_dicom."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    if not len(ds):
        return "an empty DICOM data set (nothing after its file meta: truncated?)"
    tag = list(ds.keys())[-1]
    item = ds.get_item(tag)
    tell, length = getattr(item, "value_tell", None), getattr(item, "length", None)
    meta = getattr(ds, "file_meta", None)
    deflated = meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian  # offsets inflated
    if tell is None or length in (None, 0xFFFFFFFF) or deflated or tag.group == 0x7FE0:
        return None
    size = os.path.getsize(path)
    return f"truncated DICOM (its element {tag} ends at byte {tell + length:,}, the file at {size:,})" \
        if tell + length > size else None


def _transfer_syntax(ds):
    """The file meta's transfer syntax; for a file without one, the encoding pydicom read the data set in."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return uid
    implicit, little = ds.original_encoding
    if implicit is None:
        return None
    uid = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid  # pydicom needs it named to interpret the pixel data
    return uid


def _check_dicom(ds, name: str) -> None:
    """Refuse, before decoding, what is not an image, what the pinned pydicom cannot decode or would decode into the
    wrong thing."""
    from pydicom.pixels import get_decoder
    from pydicom.pixels.utils import get_expected_length

    odd = _not_an_image(ds)
    if odd:
        raise DataError(f"{name}: {odd[0]}. Fix: {odd[1]}.")
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise DataError(f"{name}: a DICOM file without pixel data ({_sop_name(_sop_class(ds))}; a header-only "
                        "export, or a file cut before its pixels). Fix: list image files only (remove reports, "
                        "structured reports, DICOMDIR).")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation") if ds.get(k) in (None, "")]
    if missing:
        raise DataError(f"{name}: pixel data without {', '.join(missing)}, so it cannot be interpreted. Fix: "
                        "re-export the image from its source, or remove its row.")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise DataError(f"{name}: NumberOfFrames {ds.NumberOfFrames!r} is not a number. Fix: re-export the image "
                        "from its source, or remove its row.") from None
    if frames > 1:
        raise DataError(f"{name}: a multi-frame DICOM ({frames} frames) is not supported. Fix: export the series "
                        "as one file per slice, in one folder per volume.")
    uid = _transfer_syntax(ds)
    if uid is None:
        raise DataError(f"{name}: no TransferSyntaxUID, so its pixel data cannot be interpreted. Fix: re-export it "
                        "with its file meta (any DICOM tool writes it).")
    if uid.is_compressed:
        try:
            available = get_decoder(uid).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise DataError(f"{name}: DICOM transfer syntax '{uid.name}' ({uid}) cannot be decoded by the installed "
                            "pydicom and Pillow. Fix: re-export it uncompressed (Explicit VR Little Endian), e.g. "
                            "with DCMTK's dcmdjpls/dcmdjpeg or GDCM's gdcmconv --raw.")
    if int(ds.get("SamplesPerPixel", 1) or 1) not in (1, 3):
        raise DataError(f"{name}: {ds.SamplesPerPixel} samples per pixel. Fix: export 1 (gray) or 3 (RGB).")
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds and ds[keyword].value in (None, ""):
            raise DataError(f"{name}: {keyword} is present but empty, so the values' units are unknown. Fix: "
                            "re-export the image from its source, or remove its row.")
    if "PixelData" in ds and not uid.is_compressed:
        expected, found = get_expected_length(ds, "bytes"), len(ds.PixelData)
        if found < expected:
            raise DataError(f"{name}: truncated DICOM (pixel data {found:,} of {expected:,} bytes). Fix: copy the "
                            "file again from its source, or remove its row.")


def _dicom_pixels(ds, name: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(ds.pixel_array)  # YBR is converted to RGB by pydicom (as_rgb)
    except Exception as err:  # noqa: BLE001 - every decoder plugin raises its own types
        uid = _transfer_syntax(ds)
        raise DataError(f"{name}: its {uid.name if uid else ''} pixel data could not be decoded "
                        f"({type(err).__name__}: {_first_line(err)}). Fix: re-export it uncompressed (Explicit VR "
                        "Little Endian), or remove its row.") from None


def _dicom_range(ds) -> tuple[float, float]:
    """The values the file can hold: BitsStored (12 of 16 bits, say) and PixelRepresentation, through the modality
    LUT (the rescale; a Modality LUT's output depth)."""
    from pydicom.pixels import apply_modality_lut

    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2 ** bits - 1)
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0)
    ends = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    lo, hi = apply_modality_lut(np.asarray(ends, dtype=np.float64), ds)
    return float(min(lo, hi)), float(max(lo, hi))


def _dicom_values(arr: np.ndarray, ds, name: str) -> tuple[np.ndarray, tuple[float, float]]:
    """(the values to scale, the range their encoding can hold): gray through the modality LUT, palette through its
    colour table, RGB as stored, float pixel data as stored (min-max)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)[..., :3]  # an alpha table, if any, dropped like an image's alpha
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except Exception as err:  # noqa: BLE001
            raise DataError(f"{name}: PALETTE COLOR without a usable colour table ({_first_line(err)}). Fix: "
                            "re-export it as RGB, or remove its row.") from None
        return rgb, (0.0, float(2 ** bits - 1))  # by the table's own depth: 8-bit entries in 16 bits stay dark
    if arr.dtype.kind == "f":
        _refuse_non_finite(arr, name)
        return arr, (float(arr.min()), float(arr.max()))
    if int(ds.get("SamplesPerPixel", 1) or 1) == 3:
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        return arr, (0.0, float(2 ** bits - 1))
    values = apply_modality_lut(arr, ds)
    if values.dtype.kind == "f":
        _refuse_non_finite(values, name)
    return values, _dicom_range(ds)


def _first_value(value) -> float:
    from pydicom.multival import MultiValue

    return float(value[0]) if isinstance(value, (MultiValue, list, tuple)) else float(value)


def _dicom_window(arr: np.ndarray, ds, name: str) -> np.ndarray:
    """The file's own VOI window (DICOM PS3.3 C.11.2.1.2.1, LINEAR) into [0, 1]."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        raise DataError(f"{name}: data.window_from_file is true but the file has no WindowCenter/WindowWidth. "
                        "Fix: set data.intensity_range: [lo, hi] for these files, or data.window_from_file: false.")
    center, width = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
    if width < 1:
        raise DataError(f"{name}: WindowWidth {width} is below 1. Fix: correct the file's window, or set "
                        "data.window_from_file: false.")
    if width == 1:
        return (arr > center - 0.5).astype(np.float32)
    out = (arr.astype(np.float64) - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _numbers(ds, keyword: str, count: int, name: str) -> np.ndarray:
    try:
        values = np.asarray([float(v) for v in ds[keyword].value], dtype=np.float64)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.shape != (count,) or not np.isfinite(values).all():
        raise DataError(f"{name}: {keyword} {ds.get(keyword)!r} is not {count} numbers. Fix: re-export the series "
                        "from its source.")
    return values


def _series(folder: str) -> tuple[list[str], np.ndarray | None]:
    """The folder's slices in volume order, and the volume's affine (None for a single file)."""
    names, indexes = [], 0
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not os.path.isfile(path):
            continue
        fmt, reason = _sniff(path)
        if fmt == "dicom":
            names.append(path)
        elif reason == DICOMDIR_REASON:
            indexes += 1
        elif suffix_of(path) in (".dcm", ".dicom"):  # a slice that cannot be read, not a README beside the slices
            raise DataError(f"{path}: {reason}, in a series folder. Fix: restore it from its source, or remove it "
                            "from the folder.")
    if not names:
        what = f"only {indexes} DICOMDIR file(s) (indexes), no images" if indexes else "no DICOM files"
        raise DataError(f"{folder}: a folder with {what}. Fix: point the row at a folder holding one series (one "
                        "file per slice), or at a DICOM file.")
    headers = [_dicom_dataset(name, headers_only=True) for name in names]
    for name, ds in zip(names, headers):
        odd = _not_an_image(ds)
        if odd:
            raise DataError(f"{name}: {odd[0]}, in a series folder. Fix: move it out of the folder ({odd[1]}).")
    if len(names) == 1:
        return names, None
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in headers}
    if len(series) > 1:
        raise DataError(f"{folder}: {len(series)} series (SeriesInstanceUIDs) in one folder, where a volume is one "
                        "series. Fix: one series per folder.")
    shapes = {(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for ds in headers}
    if len(shapes) > 1:
        raise DataError(f"{folder}: the series mixes slice sizes {sorted(shapes)}. Fix: one series per folder, "
                        "every slice the same size.")
    if any(int(ds.get("SamplesPerPixel", 1) or 1) != 1 for ds in headers):
        raise DataError(f"{folder}: an RGB DICOM series. Fix: export gray slices, or 2D RGB files.")
    if all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in headers):
        order, affine = _by_position(folder, names, headers)
    else:
        order, affine = _by_instance_number(folder, names, headers)
    return [names[i] for i in order], affine


def _by_position(folder: str, names: list[str], headers: list) -> tuple[np.ndarray, np.ndarray]:
    """Slices ordered by their position along the slice normal (not file name, not InstanceNumber, which scanners
    number in either direction and restart per acquisition)."""
    orientations = [_numbers(ds, "ImageOrientationPatient", 6, n) for n, ds in zip(names, headers)]
    distinct = {tuple(np.round(o, 4) + 0.0) for o in orientations}
    if len(distinct) > 1:
        raise DataError(f"{folder}: the slices have {len(distinct)} orientations (ImageOrientationPatient), so they "
                        "do not stack into one volume (a localizer, or a radial acquisition?). Fix: keep the slices "
                        "of one orientation in the folder.")
    row, col = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, col)
    positions = np.stack([_numbers(ds, "ImagePositionPatient", 3, n) for n, ds in zip(names, headers)])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    repeated = np.flatnonzero(steps < 1e-4)
    if repeated.size:
        a, b = names[order[repeated[0]]], names[order[repeated[0] + 1]]
        raise DataError(f"{folder}: {os.path.basename(a)} and {os.path.basename(b)} are at the same position along "
                        f"the slice normal ({along[order[repeated[0]]]:.3f} mm): a repeated slice, or two "
                        "acquisitions in one series. Fix: keep one slice per position (one acquisition per folder).")
    spacing = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - spacing) > 0.1 * spacing)
    if uneven.size:
        k = uneven[0]
        a, b = names[order[k]], names[order[k + 1]]
        raise DataError(f"{folder}: the slices are unevenly spaced: {steps[k]:.4g} mm between "
                        f"{os.path.basename(a)} and {os.path.basename(b)} where the median step is {spacing:.4g} mm "
                        "(a missing slice?). Fix: restore the missing slices, or export the series again.")
    first = headers[order[0]]
    dr, dc = (_numbers(first, "PixelSpacing", 2, names[order[0]]) if "PixelSpacing" in first else (1.0, 1.0))
    affine = np.eye(4)
    affine[:3, 0] = col * dr  # down the rows: the column direction, by the row spacing
    affine[:3, 1] = row * dc
    affine[:3, 2] = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    affine[:3, 3] = positions[order[0]]
    affine[:2] *= -1  # LPS -> RAS, as NibabelReader's affines (and MONAI's orientation_ras_lps)
    return order, affine


def _by_instance_number(folder: str, names: list[str], headers: list) -> tuple[np.ndarray, np.ndarray]:
    """Without geometry (no ImagePositionPatient/ImageOrientationPatient): InstanceNumber, the only order left."""
    missing = [n for n, ds in zip(names, headers) if ds.get("InstanceNumber") in (None, "")]
    if missing:
        raise DataError(f"{missing[0]}: a slice of the series {folder} without InstanceNumber or "
                        "ImagePositionPatient, so its place in the volume is unknown. Fix: re-export the series with "
                        "its geometry.")
    numbers = np.asarray([int(ds.InstanceNumber) for ds in headers])
    order = np.argsort(numbers, kind="stable")
    repeated = np.flatnonzero(np.diff(numbers[order]) == 0)
    if repeated.size:
        a, b = names[order[repeated[0]]], names[order[repeated[0] + 1]]
        raise DataError(f"{folder}: {os.path.basename(a)} and {os.path.basename(b)} share InstanceNumber "
                        f"{numbers[order[repeated[0]]]}, and the files carry no ImagePositionPatient to order them "
                        "by. Fix: one acquisition per folder, or re-export the series with its geometry.")
    first = headers[order[0]]
    dr, dc = (_numbers(first, "PixelSpacing", 2, names[order[0]]) if "PixelSpacing" in first else (1.0, 1.0))
    dz = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    return order, np.diag([-dr, -dc, dz, 1.0])  # orientation unknown: the axes as stored, LPS -> RAS


def _read_dicom(path: str, opts: DecodeOptions):
    try:
        return _decode_dicom(path, opts)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom converts elements when first used: a damaged one raises then
        raise DataError(f"{path}: corrupt DICOM ({type(err).__name__}: {_first_line(err)}). Fix: copy the file again "
                        "from its source, or remove its row.") from None


def _decode_dicom(path: str, opts: DecodeOptions):
    names, affine = _series(path) if os.path.isdir(path) else ([path], None)
    datasets, stored, values, ranges = [], [], [], []
    for name in names:
        ds = _dicom_dataset(name)
        _check_dicom(ds, name)
        arr = _dicom_pixels(ds, name)
        value, value_range = _dicom_values(arr, ds, name)
        datasets.append(ds)
        stored.append(arr)
        values.append(value)
        ranges.append(value_range)
    first = datasets[0]
    stack = (lambda arrays: np.stack(arrays, axis=-1)) if len(names) > 1 else (lambda arrays: arrays[0])
    values_all, stored_all = stack(values), stack(stored)
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    photometric = str(first.get("PhotometricInterpretation", ""))
    channels_in_file = 3 if photometric == "PALETTE COLOR" else int(first.get("SamplesPerPixel", 1) or 1)
    spatial, channels = layout(values_all.shape, opts, path, channels=channels_in_file)
    if opts.window_from_file:
        unit = _dicom_window(values_all, first, path)
    elif opts.intensity_range:
        unit = _scale(values_all, *opts.intensity_range)
    else:
        unit = _scale(values_all, lo, hi)
    notes = _dicom_notes(first, stored_all, values_all, unit, path) if opts.own_encoding else ()
    if photometric == "MONOCHROME1":  # the lowest value is white: invert to the usual sense
        unit = 1.0 - unit
    info = FileInfo("dicom", _dicom_dtype(first, stored_all), channels, spatial, notes)
    return _channels_first(unit, spatial, channels), affine, info


def _dicom_notes(ds, stored: np.ndarray, values: np.ndarray, unit: np.ndarray, path: str) -> tuple[str, ...]:
    from pydicom.pixels import apply_modality_lut

    if stored.dtype.kind == "f":  # float pixel data: min-max per file, like a float array
        return _narrow_note(values, unit, path, "min-max per file", "set data.intensity_range: [{lo}, {hi}]")
    if not str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME"):
        return ()
    signed = int(ds.get("PixelRepresentation", 0) or 0)
    bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    if not signed and bits == 16 and not ds.get("ModalityLUTSequence"):
        return _bit_depth_note(stored, path, lambda v: float(apply_modality_lut(np.float64(v), ds)))
    if signed and int(ds.BitsAllocated) >= 16 and str(ds.get("Modality", "")) in ("CT", "MR"):
        window = "set data.window_from_file: true (the file has a window) or " if "WindowCenter" in ds else "set "
        return _narrow_note(values, unit, path, f"scaled by the {bits}-bit stored range",
                            window + "data.intensity_range: [{lo}, {hi}]")
    return ()


def _dicom_dtype(ds, stored: np.ndarray) -> str:
    if stored.dtype.kind == "f":
        return stored.dtype.name
    allocated, bits = int(ds.BitsAllocated), int(ds.get("BitsStored") or ds.BitsAllocated)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    dtype = f"{'int' if int(ds.get('PixelRepresentation', 0) or 0) else 'uint'}{allocated}"
    dtype += f" ({bits} bit)" if bits != allocated else ""
    return dtype + {"MONOCHROME1": " MONOCHROME1", "PALETTE COLOR": " palette"}.get(photometric, "")


# -- the transforms ----------------------------------------------------------------------------------------

READ = {"image": _read_image, "array": _read_npy, "nifti": _read_nifti, "nrrd": _read_nrrd, "dicom": _read_dicom}


def decode(path: str, opts: DecodeOptions) -> tuple[MetaTensor, FileInfo]:
    """One file (or DICOM series folder) -> (float32 MetaTensor (C, *spatial) in [0, 1] with its affine, FileInfo)."""
    fmt, reason = _sniff(path)
    if fmt is None:
        raise DataError(f"{path}: {reason}. Fix: {fix_for(reason)}.")
    arr, affine, info = READ[FAMILY[fmt]](path, opts)
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: holds NaN or infinite values. Fix: re-export it with finite values.")
    meta = {"filename_or_obj": path}
    tensor = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr)), meta=meta,
                        affine=torch.as_tensor(affine, dtype=torch.float64) if affine is not None else None)
    return tensor, info


class DecodeImaged(MapTransform):
    """Load and decode a file per `DecodeOptions` (the module docstring says how each format is decoded)."""

    def __init__(self, keys: KeysCollection, opts: DecodeOptions):
        super().__init__(keys)
        self.opts = opts

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = decode(str(d[key]), self.opts)[0]
        return d


def adapt_channels(img: torch.Tensor, target: int, allow: bool = True) -> torch.Tensor:
    """Channels of one decoded file -> the backbone's: gray repeated, RGB to gray by luminance."""
    have = img.shape[0]
    if have == target:
        return img
    if allow and have == 1:
        return img.repeat(target, *([1] * (img.dim() - 1)))
    if allow and have == 3 and target == 1:
        weights = torch.tensor(LUMA, dtype=img.dtype).view(3, *([1] * (img.dim() - 1)))
        return (img * weights).sum(0, keepdim=True)
    how = "" if allow else " and data.channel_adapt is error"
    raise DataError(f"{have} channel(s) in the file but the backbone takes {target}{how}. Fix: convert the images "
                    "to 1 (gray) or 3 (RGB) channels" + (", or set data.channel_adapt: adapt." if not allow else "."))


class AdaptChannelsd(MapTransform):
    def __init__(self, keys: KeysCollection, target: int, allow: bool = True):
        super().__init__(keys)
        self.target, self.allow = target, allow

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = adapt_channels(d[key], self.target, self.allow)
        return d


def _first_line(err: BaseException) -> str:
    text = [line.strip() for line in str(err).strip().splitlines()]
    return text[-1] if text else type(err).__name__
