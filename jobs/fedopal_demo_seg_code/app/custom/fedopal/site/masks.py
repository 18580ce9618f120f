"""Segmentation masks: every supported mask file -> a label map, and the checks that pair it with its image.

A label map is one value per voxel, the class index: 0 is background, 1..K-1 the structures (data.num_classes K
counts the background). It is decoded as a float32 MetaTensor (1, *spatial) holding those integers, with the file's
affine (RAS, as readers.decode gives the image's), so MONAI's spatial transforms move image and mask alike (a mask is
resampled with nearest-neighbour interpolation).

The type is read from the content with readers' sniffing; each format is read by its own library:

- PNG (Pillow): 8- or 16-bit gray, bilevel, or palette (the palette *indices*, not its colours); RGB is refused
  (colours are not class indices);
- NPY (NumPy): an integer, boolean or integral float array;
- NIfTI (nibabel) and NRRD (MONAI's NrrdReader on pynrrd: LPS -> RAS), as readers.py reads images;
- DICOM SEG (highdicom `segread`, then `Segmentation.get_volume`): binary or fractional (> 0.5) segments -> segment
  number k is label k; overlapping segments are refused; a LABELMAP SEG is read as stored. A SEG often omits its empty
  frames, so its own volume covers only the slices that hold a segment: given its image (`like`), the label map is
  placed on the image's grid (highdicom's `Volume.match_geometry`: permuted, flipped, padded with 0, never resampled).

Values that are no class index (negative, fractional, NaN) are refused when decoding; values >= num_classes too, when
num_classes is given. `check_pair` lists what makes a mask unusable with its image: shape, spacing, orientation (axis
codes) or position, and labels outside 0..num_classes-1, one line each naming both files and the fix.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from fedopal.site.readers import (DICOMDIR_REASON, SEGMENTATION_UID, DataError, DecodeOptions, FileInfo,
                                  _first_line, _load_nifti, _pil_bomb_message, _sniff, decode, fix_for, load_nrrd)

MASK_FIX = ("store the mask as a PNG (8/16-bit gray or palette), NPY, NIfTI, NRRD or DICOM SEG file of class indices "
            "(0 background), or remove its row")
GRID_FIX = ("export the mask on its image's grid (same size, spacing, orientation and origin), e.g. resample it onto "
            "the image with nearest-neighbour interpolation (3D Slicer, or MONAI's ResampleToMatch mode='nearest')")
RTOL = 1e-3  # geometry tolerance: a share of the voxel size (exports round positions and spacings)


@dataclass(frozen=True)
class MaskInfo:
    """What a mask file holds: its format, how its values are stored, its spatial shape, the label values found."""

    format: str  # png, npy, nifti, nrrd, dicom-seg
    dtype: str  # as stored: uint8, palette, int32, float32, BINARY (2 segments), ...
    shape: tuple  # spatial shape, as decoded
    labels: tuple[int, ...]  # sorted unique values
    affine: np.ndarray | None = field(default=None, compare=False)  # 4x4 RAS; None for PNG/NPY (the identity)


# -- per format ------------------------------------------------------------------------------------------

def _png(path: str) -> tuple[np.ndarray, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                mode, arr = img.mode, np.asarray(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(_pil_bomb_message(path, err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: corrupt or unreadable PNG mask ({type(err).__name__}: {_first_line(err)}). "
                        "Fix: re-export the mask or remove its row.") from None
    if mode in ("LA", "PA"):  # alpha says how to composite, not which class
        arr, mode = arr[..., 0], mode[0]
    if mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise DataError(f"{path}: a {mode} PNG mask (colours, not class indices). Fix: save the mask as an 8-bit "
                        "gray or palette PNG whose values are the class indices (0 background), e.g. "
                        "Image.fromarray(labels.astype(np.uint8)).save(path).")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr, {"P": "palette", "1": "bilevel"}.get(mode, str(arr.dtype))


def _npy(path: str) -> tuple[np.ndarray, str]:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - a damaged header fails in NumPy's parser with its own types
        raise DataError(f"{path}: unreadable .npy mask ({_first_line(err)}). Fix: re-save it with numpy.save.") \
            from None
    return np.asarray(arr), arr.dtype.name


def _nifti(path: str) -> tuple[np.ndarray, str, np.ndarray]:
    try:
        img = _load_nifti(path)
        with np.errstate(all="ignore"):
            arr = np.asarray(np.asanyarray(img.dataobj))
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for a truncated or foreign file
        raise DataError(f"{path}: corrupt or truncated NIfTI mask ({type(err).__name__}: {_first_line(err)}). "
                        "Fix: re-export the mask or remove its row.") from None
    return arr, arr.dtype.name, affine


def _lps_ras(affine: np.ndarray) -> np.ndarray:
    out = np.array(affine, dtype=np.float64)
    out[:2] *= -1  # LPS <-> RAS: x and y negated, as readers' DICOM affines and MONAI's orientation_ras_lps
    return out


def _dicom_seg(path: str, spatial_dims: int, like) -> tuple[np.ndarray, str, np.ndarray | None]:
    """A DICOM SEG -> (label map in readers' DICOM axis order: rows, columns, slices; dtype; RAS affine)."""
    import highdicom as hd

    if os.path.isdir(path):
        raise DataError(f"{path}: a folder where a mask is one file. Fix: point the row at the DICOM SEG file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pydicom

            sop = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).get("SOPClassUID", ""))
            if sop != SEGMENTATION_UID:
                raise DataError(f"{path}: a DICOM file that is not a Segmentation (SOP class {sop or 'missing'}). "
                                f"Fix: list the DICOM SEG object as the mask, or export the mask as NIfTI or NRRD.")
            seg = hd.seg.segread(path)
            kind = seg.segmentation_type
            numbers = list(seg.segment_numbers)
            if not numbers:
                raise DataError(f"{path}: a DICOM SEG without segments. Fix: export it again from its source.")
            if kind == hd.seg.SegmentationTypeValues.LABELMAP:
                vol = seg.get_volume(combine_segments=True, relabel=False)
                labels = np.asarray(vol.array)
            else:
                vol = seg.get_volume(combine_segments=False, rescale_fractional=True)
                stack = np.asarray(vol.array)  # (slices, rows, columns, segments)
                on = stack > 0.5 if kind == hd.seg.SegmentationTypeValues.FRACTIONAL else stack > 0
                overlap = on.sum(-1) > 1
                if overlap.any():
                    where = np.argwhere(overlap)[0]
                    both = [numbers[k] for k in np.flatnonzero(on[tuple(where)])]
                    raise DataError(f"{path}: segments {both} overlap ({int(overlap.sum()):,} voxels), so the SEG is "
                                    "no label map (one class per voxel). Fix: export non-overlapping segments, or "
                                    "one SEG per structure.")
                labels = (on * np.asarray(numbers)).sum(-1)
            vol = vol.with_array(labels.astype(np.int32), channels=None)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - pydicom/highdicom raise many types for a damaged or irregular SEG
        raise DataError(f"{path}: a DICOM SEG that does not read as one volume ({type(err).__name__}: "
                        f"{_first_line(err)}). Fix: export the SEG again from its source (one regularly spaced "
                        "stack of frames), or as NIfTI/NRRD.") from None
    vol = vol.permute_spatial_axes([1, 2, 0])  # highdicom's (slices, rows, columns) -> readers' (rows, columns, slices)
    a = vol.affine
    if np.dot(a[:3, 2], np.cross(a[:3, 1], a[:3, 0])) < 0:  # slices ascending along the normal, as readers orders them
        vol = vol.flip_spatial(2)
    dtype = f"{kind.value} ({len(numbers)} segment{'s' if len(numbers) > 1 else ''})"
    if spatial_dims == 2:  # one frame, like one DICOM image (readers gives a single file no affine)
        return np.asarray(vol.array), dtype, None
    if like is not None and getattr(like, "affine", None) is not None and len(like.shape) == 4:
        target = hd.VolumeGeometry(_lps_ras(np.asarray(like.affine, dtype=np.float64)), tuple(like.shape[1:]),
                                   coordinate_system="PATIENT")
        try:
            vol = vol.match_geometry(target)
        except (RuntimeError, ValueError):
            pass  # not a sub-grid of the image: check_pair names the difference
    return np.asarray(vol.array), dtype, _lps_ras(vol.affine)


# -- decoding -------------------------------------------------------------------------------------------

def _label_values(arr: np.ndarray, path: str) -> np.ndarray:
    """Integer class indices, or a DataError naming what is not one."""
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.dtype.kind == "c" or arr.dtype.kind not in "uif":
        raise DataError(f"{path}: a {arr.dtype} mask. Fix: store class indices as integers (0 background).")
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            raise DataError(f"{path}: {arr.size - int(finite.sum()):,} mask values are NaN or infinite. Fix: store "
                            "class indices as integers (0 background).")
        fractional = arr != np.round(arr)
        if fractional.any():
            raise DataError(f"{path}: non-integer mask values (e.g. {arr[fractional].flat[0]:g}): probabilities or a "
                            "resampled mask, not class indices. Fix: store class indices as integers (threshold or "
                            "argmax the probabilities; resample masks with nearest-neighbour interpolation).")
    out = arr.astype(np.int64)
    if out.size and out.min() < 0:
        raise DataError(f"{path}: negative mask values (min {int(out.min())}). Fix: store class indices 0..K-1 "
                        "(0 background).")
    return out


def _mask_layout(arr: np.ndarray, spatial_dims: int, path: str) -> np.ndarray:
    shape = arr.shape
    while arr.ndim > spatial_dims and arr.shape[-1] == 1:
        arr = arr[..., 0]
    shown = "x".join(map(str, shape))
    if arr.ndim == spatial_dims:
        return arr
    if arr.ndim < spatial_dims:
        raise DataError(f"{path}: a {arr.ndim}D mask ({shown}) in a config with data.spatial_dims {spatial_dims}. "
                        f"Fix: use {spatial_dims}D masks, as their images.")
    raise DataError(f"{path}: a mask of {arr.ndim} axes ({shown}) where data.spatial_dims {spatial_dims} allows "
                    f"{spatial_dims}: one-hot or several label maps? Fix: store one label map per file, the class "
                    "index in each voxel (argmax of a one-hot mask).")


def decode_mask(path: str, spatial_dims: int, num_classes: int | None = None,
                like=None) -> tuple[MetaTensor, MaskInfo]:
    """A mask file -> (float32 MetaTensor (1, *spatial) of class indices with the file's affine, MaskInfo).
    like: the decoded image (a MetaTensor with its affine) whose grid a DICOM SEG is placed on (the module docstring
    says why)."""
    fmt, reason = _sniff(path)
    if fmt is None:
        fix = fix_for(reason) if reason == DICOMDIR_REASON or reason.startswith(("empty", "truncated", "unreadable",
                                                                                  "a gzip-compressed")) else MASK_FIX
        raise DataError(f"{path}: {reason}. Fix: {fix}.")
    affine = None
    if fmt == "png":
        arr, dtype = _png(path)
    elif fmt == "npy":
        arr, dtype = _npy(path)
    elif fmt == "nifti":
        arr, dtype, affine = _nifti(path)
    elif fmt == "nrrd":
        arr, affine, _ = load_nrrd(path)
        dtype = arr.dtype.name
    elif fmt == "dicom":
        arr, dtype, affine = _dicom_seg(path, spatial_dims, like)
        fmt = "dicom-seg"
    else:
        raise DataError(f"{path}: a {fmt.upper()} file, which holds no class indices. Fix: {MASK_FIX}.")
    labels = _mask_layout(_label_values(np.asarray(arr), path), spatial_dims, path)
    values = np.unique(labels)
    if num_classes is not None and values.size and values[-1] >= num_classes:
        bad = [int(v) for v in values if v >= num_classes]
        raise DataError(f"{path}: label values {bad} outside 0..{num_classes - 1} (data.num_classes {num_classes}). "
                        f"Fix: {_labels_fix(num_classes, bad)}.")
    tensor = MetaTensor(torch.from_numpy(np.ascontiguousarray(labels[None], dtype=np.float32)),
                        meta={"filename_or_obj": path},
                        affine=torch.as_tensor(affine, dtype=torch.float64) if affine is not None else None)
    return tensor, MaskInfo(fmt, dtype, tuple(labels.shape), tuple(int(v) for v in values), affine)


def _labels_fix(num_classes: int, bad: list[int]) -> str:
    return (f"set data.num_classes: {max(bad) + 1} if the mask has that many classes (background included), or "
            "remap its values to 0..num_classes-1 (0 background)")


def is_empty(mask) -> bool:
    """Whether a label map holds background only (a case without the structure: fine, but worth counting)."""
    return not bool((torch.as_tensor(mask) > 0).any())


class DecodeMaskd(MapTransform):
    """Load a mask per decode_mask; with image_key, a DICOM SEG lands on the grid of the image decoded under it."""

    def __init__(self, keys: KeysCollection, spatial_dims: int, num_classes: int | None = None,
                 image_key: str | None = None):
        super().__init__(keys)
        self.spatial_dims, self.num_classes, self.image_key = spatial_dims, num_classes, image_key

    def __call__(self, data):
        d = dict(data)
        like = d.get(self.image_key) if self.image_key else None
        for key in self.key_iterator(d):
            d[key] = decode_mask(str(d[key]), self.spatial_dims, self.num_classes,
                                 like=like if isinstance(like, MetaTensor) else None)[0]
        return d


# -- a mask beside its image ----------------------------------------------------------------------------

def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(affine[:3, :3], axis=0)


def _shown(values) -> str:
    return " x ".join(f"{v:.4g}" for v in values)


def check_pair(image_path: str, mask_path: str, spatial_dims: int, num_classes: int,
               image_info: tuple[MetaTensor, FileInfo] | None = None,
               opts: DecodeOptions | None = None) -> list[str]:
    """One line per problem that makes the mask unusable with its image (each names both files, what differs and the
    fix); [] when they pair. image_info: what readers.decode returned for the image, if it was decoded already."""
    import nibabel as nib

    if image_info is None:
        try:
            image_info = decode(image_path, opts or DecodeOptions(spatial_dims, 1))
        except DataError as err:
            return [f"{err} (the image of mask {mask_path})"]
    image = image_info[0]
    try:
        mask, info = decode_mask(mask_path, spatial_dims, like=image)
    except DataError as err:
        text = str(err)
        head = f"{mask_path}: "
        return [f"{mask_path} (mask of {image_path}): {text[len(head):]}" if text.startswith(head)
                else f"{text} (mask of {image_path})"]
    pair = f"{mask_path} (mask of {image_path})"
    problems = []
    img_shape, mask_shape = tuple(image.shape[1:]), tuple(mask.shape[1:])
    if img_shape != mask_shape:
        problems.append(f"{pair}: the mask is {'x'.join(map(str, mask_shape))} voxels, its image "
                        f"{'x'.join(map(str, img_shape))}. Fix: {GRID_FIX}.")
    a_img = np.asarray(image.affine, dtype=np.float64) if _has_affine(image_path, image) else None
    a_mask = info.affine
    if a_img is not None and a_mask is not None:
        s_img, s_mask = _spacing(a_img), _spacing(a_mask)
        scale = float(max(s_img.max(), 1e-6))
        if not np.allclose(s_mask, s_img, rtol=RTOL, atol=0):
            problems.append(f"{pair}: voxel spacing {_shown(s_mask)} mm in the mask, {_shown(s_img)} mm in its "
                            f"image. Fix: {GRID_FIX}.")
        codes_img, codes_mask = nib.orientations.aff2axcodes(a_img), nib.orientations.aff2axcodes(a_mask)
        if codes_img != codes_mask:
            problems.append(f"{pair}: orientation {''.join(codes_mask)} in the mask, {''.join(codes_img)} in its "
                            f"image (nibabel axis codes). Fix: {GRID_FIX}.")
        elif not problems:
            diff = np.abs(a_mask[:3] - a_img[:3])
            if diff.max() > RTOL * scale:
                origin = np.linalg.norm(a_mask[:3, 3] - a_img[:3, 3])
                what = (f"its origin is {origin:.4g} mm from its image's" if diff[:, :3].max() <= RTOL * scale
                        else f"its axes differ from its image's by up to {diff[:, :3].max():.3g} mm per voxel "
                             f"(origin {origin:.4g} mm apart)")
                problems.append(f"{pair}: the mask does not lie on its image's grid: {what}. Fix: {GRID_FIX}.")
    bad = [v for v in info.labels if v >= num_classes]
    if bad:
        problems.append(f"{pair}: label values {bad} outside 0..{num_classes - 1} (data.num_classes {num_classes}). "
                        f"Fix: {_labels_fix(num_classes, bad)}.")
    return problems


def _has_affine(image_path: str, image) -> bool:
    """Whether readers.decode gave the image a real affine (NIfTI, NRRD, a DICOM series), not the identity default."""
    from fedopal.site.readers import format_of

    fmt = format_of(image_path)
    return fmt in ("nifti", "nrrd") or (fmt == "dicom" and os.path.isdir(image_path) and image.dim() == 4)
