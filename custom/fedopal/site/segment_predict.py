"""`fedopal predict` for a segmentation model: one label map per input, on the input's own grid, and per-file Dice
against a reference mask where the manifest gives one.

Each input goes through the site's evaluation pipeline with MONAI's metadata kept; the class probabilities are mapped
back to the file's grid by `monai.transforms.Invertd` (undoing resize, crop/pad, spacing and orientation: linear on
probabilities, then argmax), so a mask lands exactly on its image. Written per input format:

- PNG/JPEG (2D): an 8-bit PNG label map (0 background, k class k), rows x columns as the image;
- NIfTI, NRRD, NPY: NIfTI (`.nii.gz`) with the input's affine (NRRD's LPS is stored as RAS, as nibabel does);
- DICOM (a file or a series folder): a DICOM SEG (highdicom, one binary segment per foreground class, referencing the
  source instances), and the same label map as NIfTI beside it.

The CSV (--out) has one row per input: path, the mask written, [split], [reference mask], foreground pixels/voxels
and volume (mm^3, where the file has a voxel size) per class, and with a reference Dice and HD95 (mean and per
class; HD95 in pixels of the input's grid).
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from monai.data import MetaTensor

import fedopal
from monai.transforms import Invertd

from fedopal.site.data import DataError, Sample, build_transforms
from fedopal.site.device import autocast, resolve_device
from fedopal.site.readers import format_of
from fedopal.site.segment import per_image_scores, segment


def _out_name(path: str, used: set) -> str:
    """A file name for the mask of `path` (its own name without the image suffix; a number added if taken)."""
    base = os.path.basename(os.path.normpath(path))
    base = re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.npy|\.png|\.jpe?g|\.dcm)$", "", base, flags=re.IGNORECASE) or "mask"
    name, k = base, 1
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


def _write_png(labels: np.ndarray, path: str) -> str:
    from PIL import Image

    Image.fromarray(labels.astype(np.uint8)).save(path)
    return path


def _write_nifti(labels: np.ndarray, affine, path: str) -> str:
    import nibabel as nib

    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), path)
    return path


def _write_dicom_seg(labels: np.ndarray, source: str, class_names: list[str], path: str) -> str:
    """A DICOM SEG (highdicom) of the label map over the source file or series: one binary segment per foreground
    class present. The label map is (rows, columns[, slices]) in readers.py's order, slices sorted along the normal."""
    import highdicom as hd
    import pydicom

    from fedopal.site.readers import _series

    if os.path.isdir(source):
        names, _ = _series(source)
    else:
        names = [source]
    datasets = [pydicom.dcmread(n) for n in names]
    frames = labels[None] if labels.ndim == 2 else np.moveaxis(labels, -1, 0)  # (slices, rows, columns)
    present = [k for k in range(1, len(class_names)) if (frames == k).any()]
    if not present:
        present = [1]
    pixel_array = np.stack([frames == k for k in present], axis=-1).astype(np.uint8)
    code = hd.sr.CodedConcept
    tissue = code("85756007", "SCT", "Tissue")  # the class names are the site's own: the segment labels carry them
    algorithm = hd.AlgorithmIdentificationSequence(name="FedOPAL", version=fedopal.__version__,
                                                   family=code("123110", "DCM", "Artificial Intelligence"))
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=class_names[k], segmented_property_category=tissue,
        segmented_property_type=tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for i, k in enumerate(present)]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=pixel_array, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="FedOPAL", manufacturer_model_name="fedopal",
        software_versions=fedopal.__version__, device_serial_number="0")
    seg.save_as(path)
    return path


def grid_affine(source: str, back) -> np.ndarray | None:
    """The affine a mask of `source` is written with: the inverted prediction's (the file's own grid), or None for
    PNG, JPEG and NPY inputs, which carry no geometry."""
    return None if format_of(source) in ("png", "jpeg", "npy") else np.asarray(back.affine)


def write_mask(labels: np.ndarray, source: str, affine, out_dir: str, class_names: list[str], used: set) -> str:
    """The label map of `source` (on its grid) under `out_dir`, in the input's kind of file (the module docstring);
    `used` holds the names already written in this folder. Returns the path written (DICOM: the SEG)."""
    name = _out_name(source, used)
    fmt = format_of(source)
    if fmt in ("png", "jpeg") and labels.ndim == 2:
        return _write_png(labels, os.path.join(out_dir, name + ".png"))
    written = _write_nifti(labels, affine, os.path.join(out_dir, name + ".nii.gz"))
    if fmt == "dicom":
        written = _write_dicom_seg(labels, source, class_names, os.path.join(out_dir, name + ".seg.dcm"))
    return written


def _volume_per_voxel(affine) -> float | None:
    if affine is None:
        return None
    a = np.asarray(affine, dtype=np.float64)
    return float(abs(np.linalg.det(a[:3, :3])))


@torch.no_grad()
def predict_masks(model: torch.nn.Module, cfg, samples: list[Sample], out_dir: str, device: str = "auto",
                  progress: bool = False) -> list[dict]:
    """Segment every sample, write its mask under `out_dir`, return one CSV row (dict) per sample. A sample with a
    `mask` (a reference) adds Dice and HD95. DataError names a file that cannot be read."""
    from tqdm import tqdm

    from fedopal.site.masks import decode_mask

    data_cfg = cfg.data.model_copy(update={"task": "classification"})  # the image's pipeline alone
    pipeline = build_transforms(data_cfg, model.in_channels, model.normalization, train=False, track_meta=True)
    invert = Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=False)
    where = resolve_device(device)
    model.to(where).eval()
    names = list(cfg.data.class_names or [str(k) for k in range(cfg.data.num_classes)])
    os.makedirs(out_dir, exist_ok=True)
    used: set = set()
    rows = []
    for s in tqdm(samples, unit="image", desc="segment", disable=None if progress else True):
        item = pipeline({"image": s.path, "label": 0})
        image = item["image"]
        with autocast(where, cfg.train.precision):
            logits = segment(model, image.as_tensor()[None].to(where), cfg.data.roi_size)
        probs = torch.softmax(logits.float(), dim=1)[0].cpu()
        pred = MetaTensor(probs, meta=dict(image.meta))
        pred.applied_operations = list(image.applied_operations)
        back = invert({"pred": pred, "image": image})["pred"]
        labels = back.argmax(dim=0).numpy().astype(np.uint8)
        affine = grid_affine(s.path, back)
        written = write_mask(labels, s.path, affine, out_dir, names, used)
        row = {"path": s.path, "mask_written": written}
        if s.split:
            row["split"] = s.split
        per_voxel = _volume_per_voxel(affine)
        for k in range(1, len(names)):
            row[f"pixels/{names[k]}"] = int((labels == k).sum())
            if per_voxel is not None:
                row[f"volume_mm3/{names[k]}"] = round(float((labels == k).sum()) * per_voxel, 3)
        if s.mask:
            reference, _ = decode_mask(s.mask, cfg.data.spatial_dims, cfg.data.num_classes, like=image)
            if tuple(reference.shape[1:]) != labels.shape:
                raise DataError(f"{s.mask}: the reference mask is {tuple(reference.shape[1:])}, its image "
                                f"{labels.shape}. Fix: fedopal validate names what differs.")
            onehot = torch.nn.functional.one_hot(torch.as_tensor(labels).long(), len(names))
            onehot = onehot.movedim(-1, 0)[None].float()
            dice, hd95 = per_image_scores(onehot, reference.as_tensor()[None], len(names))
            row["reference"] = s.mask
            row["dice"] = float(dice[0].mean())
            for k in range(1, len(names)):
                row[f"dice/{names[k]}"] = float(dice[0, k - 1])
                row[f"hd95/{names[k]}"] = float(hd95[0, k - 1])
        rows.append(row)
    return rows
