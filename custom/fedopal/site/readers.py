"""Decode what the file says: every supported file -> a float32, channel-first array in [0, 1].

The same picture stored as PNG (8 or 16 bit, gray, RGB or palette), JPEG, NPY, NIfTI or DICOM gives the same
array, in the axis order of the library that reads that format (PIL's and pydicom's rows x columns, NumPy's and
nibabel's array as stored). MONAI's readers do the reading (PILReader, NumpyReader, NibabelReader, PydicomReader);
what they leave to the caller is written here, because no library step does it per file:

- intensity from the file's own encoding: 8-bit -> /255, 16-bit -> /65535, DICOM from BitsStored and
  PixelRepresentation through RescaleSlope/Intercept (or its own WindowCenter/Width when data.window_from_file),
  MONOCHROME1 inverted; signed or float arrays min-max per file; data.intensity_range overrides all of these;
- the layout: trailing singleton axes squeezed, a trailing axis of data.in_channels read as channels, an image's
  alpha dropped; channels first;
- then, after the spatial steps, the channels adapted per file to the backbone (gray repeated, RGB to gray by
  luminance), so one job can hold an RGB-JPEG site and a 16-bit gray one.

Each failure is a DataError whose one line names the file, what was found and the fix.
"""

from __future__ import annotations

import os
import warnings
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
           ".dcm": "dicom", ".dicom": "dicom"}
FAMILY = {"png": "image", "jpeg": "image", "npy": "array", "nifti": "nifti", "dicom": "dicom"}
# ITU-R 601-2 luma, the weights PIL's convert("L") uses: RGB -> gray gives what a viewer's grayscale shows
LUMA = (0.299, 0.587, 0.114)


def suffix_of(path: str) -> str:
    lower = path.lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else os.path.splitext(lower)[1]


def format_of(path: str) -> str | None:
    """png, jpeg, npy, nifti, dicom (a .dcm file, a file with the DICOM preamble, or a folder: one series), or None."""
    if os.path.isdir(path):
        return "dicom"
    fmt = FORMATS.get(suffix_of(path))
    if fmt is None and os.path.isfile(path):
        import pydicom

        if pydicom.misc.is_dicom(path):  # PACS exports often have no suffix
            return "dicom"
    return fmt


@dataclass(frozen=True)
class FileInfo:
    """What validate reports per file: the format, how its values are stored, its channels and shape."""

    format: str
    dtype: str  # e.g. uint8, uint16 (12 bit), float32, palette
    channels: int  # after dropping an image's alpha
    shape: tuple  # spatial shape, as decoded

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


def _by_dtype(arr: np.ndarray, opts: DecodeOptions, bits: int | None = None) -> np.ndarray:
    if opts.intensity_range:
        return _scale(arr, *opts.intensity_range)
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        return _scale(arr, 0.0, float(2 ** (bits or 8 * arr.dtype.itemsize) - 1))
    # signed integers and floats have no natural range: min-max per file (set data.intensity_range for a window)
    return _scale(arr, float(arr.min()), float(arr.max())) if arr.size else arr.astype(np.float32)


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
    info = FileInfo(format_of(path) or "image", dtype, channels, spatial)
    return _channels_first(_by_dtype(arr, opts), spatial, channels), None, info


# -- NPY, NIfTI --------------------------------------------------------------------------------------------

def _read_npy(path: str, opts: DecodeOptions):
    from monai.data import NumpyReader

    try:
        arr, _ = NumpyReader().get_data(NumpyReader().read(path))
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: unreadable .npy ({_first_line(err)}). Fix: re-save it with numpy.save.") from None
    arr = np.asarray(arr)
    spatial, channels = layout(arr.shape, opts, path)
    return (_channels_first(_by_dtype(arr, opts), spatial, channels), None,
            FileInfo("npy", str(arr.dtype), channels, spatial))


def _read_nifti(path: str, opts: DecodeOptions):
    from monai.data import NibabelReader

    reader = NibabelReader()
    try:
        arr, meta = reader.get_data(reader.read(path))  # the voxels as stored (scaled to float if scl_slope says so)
    except Exception as err:  # nibabel raises many types for a truncated or foreign file
        raise DataError(f"{path}: corrupt or truncated NIfTI ({type(err).__name__}: {_first_line(err)}). "
                        "Fix: re-export the volume or remove its row.") from None
    arr = np.asarray(arr)
    spatial, channels = layout(arr.shape, opts, path)
    return (_channels_first(_by_dtype(arr, opts), spatial, channels), meta.get("affine"),
            FileInfo("nifti", str(arr.dtype), channels, spatial))


# -- DICOM -------------------------------------------------------------------------------------------------

def _check_dicom(ds, name: str) -> None:
    """Refuse, before decoding, what the pinned pydicom cannot decode or would decode into the wrong thing."""
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds:
        raise DataError(f"{name}: a DICOM file without pixel data (SOP class {ds.get('SOPClassUID', '?')}). "
                        "Fix: list image files only (remove reports, structured reports, DICOMDIR).")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(f"{name}: a multi-frame DICOM ({frames} frames) is not supported. Fix: export the series "
                        "as one file per slice, in one folder per volume.")
    uid = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if uid is not None and uid.is_compressed:
        try:
            available = get_decoder(uid).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise DataError(f"{name}: DICOM transfer syntax '{uid.name}' ({uid}) cannot be decoded by the installed "
                            "pydicom and Pillow. Fix: re-export it uncompressed (Explicit VR Little Endian), e.g. "
                            "with DCMTK's dcmdjpls/dcmdjpeg or GDCM's gdcmconv --raw.")
    if int(ds.get("SamplesPerPixel", 1)) not in (1, 3):
        raise DataError(f"{name}: {ds.SamplesPerPixel} samples per pixel. Fix: export 1 (gray) or 3 (RGB).")


def _dicom_range(ds) -> tuple[float, float]:
    """The values the file can hold: BitsStored (12 of 16 bits, say) and PixelRepresentation, through the rescale."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if int(ds.get("PixelRepresentation", 0)) else (0, 2 ** bits - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1.0) or 1.0), float(ds.get("RescaleIntercept", 0.0) or 0.0)
    lo, hi = lo * slope + intercept, hi * slope + intercept
    return (min(lo, hi), max(lo, hi))


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


def _read_dicom(path: str, opts: DecodeOptions):
    import pydicom
    from monai.data import PydicomReader

    if os.path.isdir(path) and not any(pydicom.misc.is_dicom(os.path.join(path, n)) for n in os.listdir(path)
                                       if os.path.isfile(os.path.join(path, n))):
        raise DataError(f"{path}: a folder with no DICOM files. Fix: point the row at a folder holding one "
                        "series (one file per slice), or at a DICOM file.")
    # rows x columns as pydicom gives them (swap_ij=False); a series stacks slices on the last axis by InstanceNumber
    reader = PydicomReader(swap_ij=False, fname_regex=None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 2D files need no ImageOrientationPatient; MONAI warns for each
            read = reader.read(path)
            datasets = read if isinstance(read, list) else [read]
            names = reader.filenames[0] if isinstance(reader.filenames[0], list) else [str(reader.filenames[0])]
            for ds, name in zip(datasets, names):
                _check_dicom(ds, name)
            if len(datasets) > 1:
                missing = [n for ds, n in zip(datasets, names) if "InstanceNumber" not in ds]
                if missing:  # MONAI would skip such a slice with a warning: a volume with a hole
                    raise DataError(f"{missing[0]}: a slice of the series {path} without InstanceNumber, so its "
                                    "place in the volume is unknown. Fix: re-export the series with instance numbers.")
                shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
                if len(shapes) > 1:
                    raise DataError(f"{path}: the series mixes slice sizes {sorted(shapes)}. Fix: one series per "
                                    "folder, every slice the same size.")
                if int(datasets[0].get("SamplesPerPixel", 1)) != 1:
                    raise DataError(f"{path}: an RGB DICOM series. Fix: export gray slices, or 2D RGB files.")
            arr, meta = reader.get_data(read)
    except DataError:
        raise
    except Exception as err:  # pydicom raises many types for a truncated or foreign file
        raise DataError(f"{path}: unreadable DICOM ({type(err).__name__}: {_first_line(err)}). "
                        "Fix: re-export the image or remove its row.") from None
    first = datasets[0]
    arr = np.asarray(arr)
    photometric = str(first.get("PhotometricInterpretation", ""))
    spatial, channels = layout(arr.shape, opts, path, channels=int(first.get("SamplesPerPixel", 1)))
    if opts.window_from_file:
        unit = _dicom_window(arr, first, path)
    elif opts.intensity_range:
        unit = _scale(arr, *opts.intensity_range)
    else:
        unit = _scale(arr, *_dicom_range(first))
    if photometric == "MONOCHROME1":  # the lowest value is white: invert to the usual sense
        unit = 1.0 - unit
    allocated, bits = int(first.get("BitsAllocated", 16)), int(first.get("BitsStored", 16))
    dtype = f"{'int' if int(first.get('PixelRepresentation', 0)) else 'uint'}{allocated}"
    dtype += (f" ({bits} bit)" if bits != allocated else "") + (" MONOCHROME1" if photometric == "MONOCHROME1" else "")
    affine = np.asarray(meta["affine"]) if len(datasets) > 1 and "affine" in meta else None
    return _channels_first(unit, spatial, channels), affine, FileInfo("dicom", dtype, channels, spatial)


# -- the transforms ----------------------------------------------------------------------------------------

READ = {"image": _read_image, "array": _read_npy, "nifti": _read_nifti, "dicom": _read_dicom}


def decode(path: str, opts: DecodeOptions) -> tuple[MetaTensor, FileInfo]:
    """One file (or DICOM series folder) -> (float32 MetaTensor (C, *spatial) in [0, 1] with its affine, FileInfo)."""
    fmt = format_of(path)
    if fmt is None:
        raise DataError(f"{path}: unsupported file type '{suffix_of(path)}'. "
                        f"Fix: use one of {', '.join(FORMATS)} (or a folder holding one DICOM series).")
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
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__
