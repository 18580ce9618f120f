"""Site data: a manifest CSV (path,label,split) -> MONAI dictionary transforms -> CacheDataset per split.

The manifest is validated before any training starts (a bad row costs seconds here, hours in round 7).
Paths in a manifest are relative to the manifest's folder, or absolute.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandFlipd,
    RandSpatialCropd,
    Resized,
    ResizeWithPadOrCropd,
    Spacingd,
)

from fedopal.config import near_misses
from fedopal.site.readers import (FAMILY, FORMATS, AdaptChannelsd, DataError, DecodeImaged, DecodeOptions, format_of,
                                  fix_for, layout, suffix_of, unsupported_reason)

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("path", "label", "split")
SEGMENTATION_COLUMNS = ("path", "mask", "split")  # data.task segmentation: a label map per image, no label
# the whole words a spreadsheet may use for a split: named as near misses, never accepted silently
SPLIT_WORDS = {"training": "train", "validation": "val", "valid": "val", "testing": "test", "dev": "val"}
PATIENT_COLUMN = "patient_id"  # optional: whose images a row holds (splits by patient, DP-SGD per patient)
# the readers behind each family (readers.py): PNG/JPEG MONAI's PILReader, NPY MONAI's NumpyReader, NIfTI nibabel,
# DICOM pydicom. One family per site.
READERS = FORMATS


def resolve_path(path: str) -> str:
    """Relative data/state paths resolve against $FEDOPAL_HOME (set by the launchers), else the cwd."""
    return path if os.path.isabs(path) else os.path.join(os.environ.get("FEDOPAL_HOME", os.getcwd()), path)


def site_manifest_path(cfg, site: str) -> str:
    return os.path.join(resolve_path(cfg.data.root), site, cfg.data.manifest)


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    split: str
    patient: str | None = None  # the manifest's patient_id, where it has that column
    row: int = 0  # its row in the manifest (the header is row 1), for messages; 0: not from a manifest
    mask: str | None = None  # segmentation: the label map's path


class Problems:
    """Every problem found in one pass over a site's data, each a one-line message (file, row, what, fix), by kind.

    fedopal validate prints them all, grouped; a site starting a job stops on them with the first one and the count.
    Without a collector (`problems=None`), a reading function raises the first problem as it always did."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []  # (kind, message)

    def add(self, kind: str, message: str) -> None:
        self.items.append((kind, message))

    def __len__(self) -> int:
        return len(self.items)

    def by_kind(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for kind, message in self.items:
            out.setdefault(kind, []).append(message)
        return out

    def raise_first(self) -> None:
        if self.items:
            more = len(self.items) - 1
            raise DataError(self.items[0][1] + (f" (+{more} more problem{'s' if more > 1 else ''} in this site's "
                                                "data: fedopal validate lists them all)" if more else ""))


def _report(problems: Problems | None, kind: str, message: str) -> None:
    if problems is None:
        raise DataError(message)
    problems.add(kind, message)


def read_csv(manifest_path: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """(header, [(row number, row)]): a spreadsheet's CSV as it comes (UTF-8 with or without a BOM, CRLF or LF),
    header names and cells stripped of spaces, fully empty rows skipped."""
    try:
        with open(manifest_path, newline="", encoding="utf-8-sig") as f:
            lines = list(csv.reader(f))
    except UnicodeDecodeError as err:
        raise DataError(f"{manifest_path}: not UTF-8 text (byte {err.start}). Fix: save the manifest as "
                        "'CSV UTF-8'.") from None
    header = [h.strip() for h in (lines[0] if lines else [])]
    rows = [(n, dict(zip(header, (v.strip() for v in line)))) for n, line in enumerate(lines[1:], start=2)
            if any(v.strip() for v in line)]
    return header, rows


def parse_label(text: str, num_classes: int, class_names, where: str) -> int:
    """A class index, or (with data.class_names) a class name: both map to the same index on every site."""
    if class_names and text in class_names:
        return list(class_names).index(text)
    try:
        label = int(text)
    except (TypeError, ValueError):
        if class_names:
            close = near_misses(text, class_names)
            fix = (f"Fix: did you mean '{close[0]}'? Correct the label" if close else "Fix: correct the label")
            raise DataError(f"{where}: label {text!r} is neither one of data.class_names ({', '.join(class_names)}) "
                            f"nor a class index 0..{num_classes - 1}. {fix}, or add the class to "
                            "data.class_names.") from None
        raise DataError(f"{where}: label {text!r} is not an integer. Fix: use class indices 0..{num_classes - 1}, "
                        "or name the classes in data.class_names.") from None
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} is out of range 0..{num_classes - 1}. "
                        "Fix: correct the label or set data.num_classes.")
    return label


def _exists(path: str) -> bool:
    return os.path.isfile(path) or os.path.isdir(path)  # a folder is one DICOM series


def _row_path(base: str, text: str, where: str, what: str = "image") -> str:
    if not text:
        raise DataError(f"{where}: the {what} path is empty. Fix: give the {what}'s path (relative to the manifest's "
                        "folder) or remove the row.")
    path = text if os.path.isabs(text) else os.path.join(base, text)
    if _exists(path):
        return path
    if "\\" in text and os.sep == "/":  # a path written on Windows: on this machine a backslash is part of a name
        posix = text.replace("\\", "/")
        found = posix if os.path.isabs(posix) else os.path.join(base, posix)
        there = f"; {found} exists" if _exists(found) else ""
        raise DataError(f"{where}: {text!r} is a Windows path (backslashes), which names no file here{there}. "
                        f"Fix: write the manifest's paths with forward slashes ({posix}).")
    raise DataError(f"{where}: {what} file not found: {path}. Fix: restore the file or remove the row.")


def _manifest_not_found(manifest_path: str, sites=()) -> str:
    """The message for a missing manifest, with the near misses a person makes: the site's folder named a little
    differently (hospital_a for hospital-a; never another of the federation's `sites`), or the manifest
    (Manifest.csv, manifest.csv.txt)."""
    folder, name = os.path.split(os.path.abspath(manifest_path))
    root, site = os.path.split(folder)
    hint = ""
    if not os.path.isdir(folder) and os.path.isdir(root):
        close = near_misses(site, [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                                   and d not in sites])
        if close:
            hint = (f" Found the folder '{close[0]}' in {root}: rename it to '{site}', or set "
                    "federation.site_names to the folders' names.")
    elif os.path.isdir(folder):
        close = near_misses(name, [f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))],
                            max_distance=4)
        if close:
            hint = f" Found '{close[0]}' in {folder}: rename it to '{name}', or set data.manifest: {close[0]}."
    return (f"{manifest_path}: manifest not found.{hint or ' Fix: create it (columns path,label,split) or point '}"
            + ("" if hint else "data.root at the folder holding one sub-folder per site."))


def read_manifest(manifest_path: str, num_classes: int, class_names=None,
                  problems: Problems | None = None, sites=(), task: str = "classification") -> list[Sample]:
    """The site's rows as Samples. Every bad row is a problem naming the manifest, the row and the fix: with a
    `problems` collector all of them are collected (and the bad rows left out), without one the first is raised.
    sites: the federation's site names (a missing site folder's near miss is never another site's folder).
    task segmentation: the columns are path,mask,split (a label map per image, no label)."""
    segmentation = task == "segmentation"
    required = SEGMENTATION_COLUMNS if segmentation else REQUIRED_COLUMNS
    if not os.path.isfile(manifest_path):
        _report(problems, "manifest", _manifest_not_found(manifest_path, sites))
        return []
    base = os.path.dirname(os.path.abspath(manifest_path))
    header, rows = read_csv(manifest_path)
    missing = [c for c in required if c not in header]
    if missing:
        close = {c: near_misses(c, header) for c in missing}
        renames = ", ".join(f"'{v[0]}' -> '{c}'" for c, v in close.items() if v)
        hint = " (data.task is segmentation)" if segmentation else ""
        _report(problems, "manifest", f"{manifest_path}: missing column(s) {missing}; found {header}{hint}. Fix: "
                + (f"rename {renames}; " if renames else "") + f"the header must be {','.join(required)} (and "
                "optionally patient_id).")
        return []
    samples, seen = [], {}
    with_patients = PATIENT_COLUMN in header
    patient_rows: dict[str, dict[str, list[int]]] = {}  # patient -> split -> rows
    for row_no, row in rows:
        where = f"{manifest_path}:{row_no}"
        patient = row.get(PATIENT_COLUMN, "") if with_patients else None
        ok = True
        if with_patients and not patient:
            ok = False
            _report(problems, "patient_id", f"{where}: empty {PATIENT_COLUMN}. Fix: give every row its patient's id "
                                            "(or drop the column: splits and DP-SGD then count images, not patients).")
        label, mask = 0, None
        try:
            if segmentation:
                mask = _row_path(base, row.get("mask", ""), where, "mask")
            else:
                label = parse_label(row.get("label", ""), num_classes, class_names, where)
        except DataError as err:
            ok = False
            _report(problems, "mask file not found" if segmentation else "label", str(err))
        split = row.get("split", "")
        if split not in SPLITS:
            ok = False
            close = [SPLIT_WORDS[split.lower()]] if split.lower() in SPLIT_WORDS else near_misses(split, SPLITS)
            _report(problems, "split", f"{where}: split {split!r} is not one of {', '.join(SPLITS)}. Fix: "
                                       + (f"did you mean '{close[0]}'? " if close else "") + "correct the row.")
        try:
            path = _row_path(base, row.get("path", ""), where)
        except DataError as err:
            _report(problems, "file not found", str(err))
            continue
        key = os.path.realpath(path)
        if ok and key in seen and seen[key][1] == split:
            _report(problems, "file listed twice",
                    f"{where}: {path} is listed again (first at row {seen[key][0]}, also '{split}'). Fix: remove the "
                    "repeated row (it would count the image twice in training and in the metrics).")
            continue
        if ok and key in seen and seen[key][1] != split:
            first_row, first_split = seen[key]
            _report(problems, "file in two splits",
                    f"{where}: {path} is in the '{split}' split and, at row {first_row}, in the '{first_split}' "
                    "split. Fix: keep each file in one split (a file in train and test inflates the test metrics).")
            continue
        if not ok:
            continue
        seen.setdefault(key, (row_no, split))
        samples.append(Sample(path, label, split, patient, row_no, mask))
        if with_patients:
            patient_rows.setdefault(patient, {}).setdefault(split, []).append(row_no)
    if not rows:
        _report(problems, "manifest", f"{manifest_path}: the site has no rows. Fix: list this site's images in the "
                                      "manifest.")
        return []
    for patient, splits in patient_rows.items():
        if len(splits) > 1:
            where = "; ".join(f"{split} (row{'s' if len(r) > 1 else ''} {', '.join(map(str, r[:5]))}"
                              f"{', ...' if len(r) > 5 else ''})" for split, r in splits.items())
            _report(problems, "patient in two splits",
                    f"{manifest_path}: patient {patient!r} has images in {len(splits)} splits: {where}. Fix: keep all "
                    "of a patient's images in one split (a patient in train and test inflates the test metrics).")
    for split in SPLITS:
        if not any(r.get("split", "") == split for _, r in rows):
            _report(problems, "manifest", f"{manifest_path}: the '{split}' split is empty. Fix: assign rows to every "
                                          "split (train, val, test).")
    return samples


def row_of(manifest_path: str, sample: Sample) -> str:
    """`manifest:row` of a sample read from a manifest, else the source given."""
    return f"{manifest_path}:{sample.row}" if sample.row else manifest_path


def file_format(samples: list[Sample], spatial_dims: int, manifest_path: str = "", in_channels: int = 1,
                problems: Problems | None = None, one_family: bool = True) -> str | None:
    """The site's one format family, each file's type decided by its content (readers.format_of); 2D files in a 3D
    config (and the reverse) stop here, before training. With `problems`, every file of an unsupported type is one
    problem naming its row, and the bad files are left for the caller to skip; None if no file is usable.
    one_family: a site's training data is one format family (so its images are decoded alike); files to predict
    (one_family=False) may mix them, each decoded by its own format."""
    formats = {}
    for s in samples:
        fmt = format_of(s.path)
        if fmt is None:
            reason = unsupported_reason(s.path)
            _report(problems, "unsupported file", f"{row_of(manifest_path, s)}: {s.path}: {reason}. Fix: "
                                                  f"{fix_for(reason)} (the type is read from the file's content).")
        else:
            formats[s.path] = fmt
    if not formats:
        return None
    by_family: dict[str, list[str]] = {}
    for path, fmt in formats.items():
        by_family.setdefault(FAMILY[fmt], []).append(path)
    family = max(by_family, key=lambda f: len(by_family[f]))
    if len(by_family) > 1 and one_family:
        others = ", ".join(f"{len(paths)} {f} (e.g. {paths[0]})" for f, paths in by_family.items() if f != family)
        _report(problems, "mixed file types",
                f"{manifest_path}: mixed file types: {len(by_family[family])} {family} files and {others}. "
                "Fix: one format family per site (PNG/JPEG, NPY, NIfTI or DICOM).")
    if spatial_dims == 3 and family == "image":
        _report(problems, "shape", f"{manifest_path}: data.spatial_dims is 3 but the site holds 2D images "
                                   f"({sorted({suffix_of(p) or 'no suffix' for p in by_family[family]})}). Fix: point "
                                   "the manifest at NIfTI volumes or DICOM series, or set data.spatial_dims: 2.")
        return None
    first = by_family[family][0]
    if family in ("nifti", "array"):  # the header says the shape: a 2D/3D mix-up stops before any decoding
        try:
            if family == "nifti":
                import nibabel as nib

                shape = nib.load(first).shape
            else:
                shape = np.load(first, mmap_mode="r").shape
            layout(tuple(shape), DecodeOptions(spatial_dims, in_channels), first)
        except DataError as err:
            _report(problems, "shape", str(err))
            return None
        except Exception:  # nibabel and numpy raise several types for a truncated or foreign file: decoding names it
            pass
    return family


class SitePipeline(Compose):
    """A Compose whose failure, in any step, is one line naming the file (MONAI wraps a step's error in
    `applying transform <... object at 0x...>`, which names neither the file nor the cause)."""

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except Exception as err:
            raise pipeline_error(err, input_) from None


def pipeline_error(err: BaseException, item) -> DataError:
    chain, cause = [], err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for e in chain:
        if isinstance(e, DataError):
            text = str(e)
            path = _item_path(item)
            return e if not path or path in text else DataError(f"{path}: {text}")
    step = next((m.group(1).rsplit(".", 1)[-1] for e in chain for m in [re.search(r"<([\w.]+) object", str(e))] if m),
                "a pipeline step")
    root = chain[-1]
    return DataError(f"{_item_path(item) or 'an input'}: failed in {step} ({type(root).__name__}: "
                     f"{_first_line(root)}). Fix: run fedopal validate --deep on this site; re-export "
                     "the file or remove its row.")


def _item_path(item) -> str:
    image = item.get("image") if isinstance(item, dict) else None
    if isinstance(image, str):
        return image
    return str(getattr(image, "meta", {}).get("filename_or_obj", "") or "")


def build_transforms(data_cfg, model_in_channels: int, normalization, train: bool, family: str = "image",
                     track_meta: bool = False) -> Compose:
    """One declared pipeline for 2D and 3D, whatever the format: the two differ only in the steps listed.

    decode (per file: read, layout, intensity to [0, 1]; readers.py) -> (orientation, spacing: 3D) -> size
    -> (augment: train) -> channels adapted to the backbone (per file) -> the backbone's normalization -> tensors.
    `family` is kept for callers; each file is read by the reader of its own format. track_meta: the output keeps
    MONAI's metadata and the record of spatial steps (what Invertd needs to map a prediction back to the file).
    """
    segmentation = data_cfg.task == "segmentation"
    keys = ["image", "mask"] if segmentation else ["image"]
    image_mode = "bilinear" if data_cfg.spatial_dims == 2 else "trilinear"
    # a mask moves with its image, by nearest neighbour (its values are class indices)
    modes = {"resize": (image_mode, "nearest"), "spacing": ("bilinear", "nearest"),
             "affine": ("bilinear", "nearest"), "padding": ("border", "zeros")} if segmentation else \
        {"resize": image_mode, "spacing": "bilinear", "affine": "bilinear", "padding": "border"}
    dims = data_cfg.spatial_dims
    size = (data_cfg.image_size,) * dims
    adapt = data_cfg.channel_adapt != "error"
    if not adapt and model_in_channels != data_cfg.in_channels:
        raise DataError(
            f"data.in_channels={data_cfg.in_channels} but the backbone expects {model_in_channels} channels "
            "(data.channel_adapt=error). Fix: convert the images, or set data.channel_adapt: adapt.")
    steps = [DecodeImaged(["image"], DecodeOptions.from_config(data_cfg))]
    if segmentation:
        from fedopal.site.masks import DecodeMaskd

        steps.append(DecodeMaskd(["mask"], dims, data_cfg.num_classes, image_key="image"))
    if dims == 3 and data_cfg.orientation:
        steps.append(Orientationd(keys, axcodes=data_cfg.orientation))
    if dims == 3 and data_cfg.spacing:
        steps.append(Spacingd(keys, pixdim=data_cfg.spacing, mode=modes["spacing"]))
    if data_cfg.spatial_mode == "resize":
        steps.append(Resized(keys, spatial_size=size, mode=modes["resize"]))
    else:
        steps.append(ResizeWithPadOrCropd(keys, spatial_size=size))
    if train and segmentation and data_cfg.roi_size:  # patches of the image; whole images by sliding window
        steps.append(RandSpatialCropd(keys, roi_size=(data_cfg.roi_size,) * dims, random_size=False))
    if train and data_cfg.augment:
        steps.append(RandAffined(keys, prob=0.5, rotate_range=(0.15,) * (1 if dims == 2 else 3),
                                 scale_range=(0.1,) * dims, translate_range=(2,) * dims, mode=modes["affine"],
                                 padding_mode=modes["padding"]))
        if dims == 3:
            steps.append(RandFlipd(keys, prob=0.5, spatial_axis=0))
    steps.append(AdaptChannelsd(["image"], model_in_channels, allow=adapt))
    if normalization is not None:
        mean, std = normalization
        steps.append(NormalizeIntensityd(["image"], subtrahend=mean[:model_in_channels],
                                         divisor=std[:model_in_channels], channel_wise=True))
    steps.append(EnsureTyped(keys + ["label"], track_meta=track_meta))
    return SitePipeline(steps)


class SeededCacheDataset(CacheDataset):
    """A CacheDataset whose random transforms are seeded per item, from (`augment_seed`, the item's index).

    An item's augmented image then depends only on the seed, the pass over the data and the item: not on which
    process or data-loading worker reads it, nor on what was read before. So data.num_workers and DDP processes
    (train.nproc_per_site) see exactly the images one process would. The trainer sets `augment_seed` before each
    pass; workers are started per pass and copy it. MONAI's own worker seeding (monai.data.DataLoader) seeds per
    worker, not per item, which would tie the draws to the number of workers."""

    augment_seed: int = 0

    def _transform(self, index: int):
        seed = np.random.SeedSequence([self.augment_seed, index]).generate_state(1)[0]
        self.transform.set_random_state(seed=int(seed))
        return super()._transform(index)


def item_of(sample: Sample) -> dict:
    """A sample as the pipeline's input dictionary (image, label, and the mask where there is one)."""
    item = {"image": sample.path, "label": sample.label}
    return item | {"mask": sample.mask} if sample.mask else item


def build_datasets(data_cfg, samples: list[Sample], model_in_channels: int, normalization,
                   manifest_path: str = "", seed: int = 0) -> dict[str, CacheDataset]:
    """One CacheDataset per split; the deterministic steps are cached once per job, augmentation of the training
    split runs per pass, seeded per item (SeededCacheDataset: the same seed gives the same augmented images)."""
    family = file_format(samples, data_cfg.spatial_dims, manifest_path, data_cfg.in_channels)
    datasets = {}
    for split in SPLITS:
        items = [item_of(s) for s in samples if s.split == split]
        transform = build_transforms(data_cfg, model_in_channels, normalization, train=split == "train",
                                     family=family)
        transform.set_random_state(seed=seed)
        try:  # copy_cache (MONAI's default) must stay on: the steps after the first random one may write into
            # their input (NormalizeIntensity does, channel-wise), and when RandAffine does not fire and the channels
            # need no adapting, that input is the cached tensor itself: each pass would normalize it once more.
            datasets[split] = SeededCacheDataset(items, transform, cache_rate=data_cfg.cache_rate, num_workers=0,
                                                 progress=False, copy_cache=True)
        except DataError:  # the pipeline's own one line names the file
            raise
        except Exception as err:  # MONAI wraps reader errors; name the file for the user
            raise DataError(f"{manifest_path}: could not read an image of the '{split}' split: "
                            f"{_first_line(err)}. Fix: replace or remove the corrupt file.") from None
        datasets[split].augment_seed = seed
    return datasets


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def shard_sizes(batch_size: int, world: int) -> list[int]:
    """How a batch of `batch_size` items is split over `world` processes: contiguous parts, the first
    batch_size % world of them one item longer (numpy's array_split sizes)."""
    base, extra = divmod(batch_size, world)
    return [base + (1 if rank < extra else 0) for rank in range(world)]


def batch_sizes(num_items: int, batch_size: int) -> list[int]:
    """The sizes of the batches of one pass over `num_items` (the last one may be smaller; nothing is dropped)."""
    return [min(batch_size, num_items - start) for start in range(0, num_items, batch_size)]


class ShardedBatches(torch.utils.data.Sampler):
    """Process `rank`'s part of every batch of `batches` (a BatchSampler): every process draws the same shuffled
    batches and reads only its own items. A process whose part is empty (a last batch with fewer items than
    processes) gets the batch's first item, which the trainer weights 0, so that it still joins the gradient
    all-reduce."""

    def __init__(self, batches: torch.utils.data.BatchSampler, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        for indices in self.batches:
            sizes = shard_sizes(len(indices), self.world)
            start = sum(sizes[:self.rank])
            yield indices[start:start + sizes[self.rank]] or indices[:1]

    def __len__(self) -> int:
        return len(self.batches)


def loader(dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0, pin_memory: bool = False,
           shard: tuple[int, int] | None = None) -> torch.utils.data.DataLoader:
    """Batches of `dataset` in a seeded order. shard=(rank, world): only this process's part of each batch.

    Nothing here draws from torch's global random state (the order has its own generator, and so has the workers'
    base seed), so the order, and with SeededCacheDataset the images, do not depend on num_workers."""
    order = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(dataset, generator=order) if shuffle else \
        torch.utils.data.SequentialSampler(dataset)
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
    if shard is not None and shard[1] > 1:
        batches = ShardedBatches(batches, *shard)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))


def patient_index(samples: list[Sample], split: str = "train") -> list[int] | None:
    """The patient index (0..P-1, in order of first appearance) of each row of `split`, as the split's dataset
    orders them; None when the manifest has no patient_id column."""
    rows = [s for s in samples if s.split == split]
    if not rows or rows[0].patient is None:
        return None
    ids: dict[str, int] = {}
    return [ids.setdefault(s.patient, len(ids)) for s in rows]


def label_counts(samples: list[Sample], split: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for s in samples:
        if s.split == split:
            counts[s.label] = counts.get(s.label, 0) + 1
    return dict(sorted(counts.items()))


# -- inputs for prediction (fedopal.site.predict): labels and splits are optional, files are read lazily ----------

UNLABELED = -1  # the label of an input that has none (new scans to predict)


def find_inputs(inputs: list[str]) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Files and folders (searched recursively, sorted) -> (unlabeled samples, [(path, reason)] for every other file).

    A file's type is read from its content (readers.format_of: the DICOM preamble, PNG/JPEG/NIfTI/NPY magic), so
    DICOM files without a suffix (PACS exports) are predicted and a DICOMDIR, an empty file or a note is listed with
    its reason, never dropped in silence. A DICOM series (one folder per volume) is listed with --manifest."""
    paths, skipped = [], []
    for given in inputs:
        if os.path.isfile(given):
            found = [given]
        elif os.path.isdir(given):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(given) for name in names)
            if not found:
                raise DataError(f"{given}: an empty folder. Fix: point --input at the images, or list them with "
                                "--manifest.")
        else:
            raise DataError(f"{given}: input file or folder not found. Fix: check the path.")
        for path in found:
            if format_of(path) is None:
                skipped.append((os.path.abspath(path), unsupported_reason(path)))
            else:
                paths.append(path)
    return [Sample(os.path.abspath(p), UNLABELED, "") for p in paths], skipped


def read_input_manifest(manifest_path: str, num_classes: int, class_names=None) -> list[Sample]:
    """A manifest of images to predict: `path` is required; `label`, `split` and (segmentation) `mask`, a reference
    label map, are optional (a site's training manifest works as it is). Rows are checked as in read_manifest;
    labels and masks may be left empty."""
    if not os.path.isfile(manifest_path):
        raise DataError(f"{manifest_path}: manifest not found. Fix: pass a CSV with a 'path' column "
                        "(optional: label, split).")
    base = os.path.dirname(os.path.abspath(manifest_path))
    header, rows = read_csv(manifest_path)
    if "path" not in header:
        raise DataError(f"{manifest_path}: no 'path' column; found {header}. "
                        "Fix: the header must name a path column (optional: label, split).")
    samples = []
    for row_no, row in rows:
        where = f"{manifest_path}:{row_no}"
        text = row.get("label", "")
        label = parse_label(text, num_classes, class_names, where) if text else UNLABELED
        mask = _row_path(base, row["mask"], where, "mask") if row.get("mask") else None  # a reference label map
        samples.append(Sample(_row_path(base, row.get("path", ""), where), label, row.get("split", ""), mask=mask))
    if not samples:
        raise DataError(f"{manifest_path}: no rows. Fix: list the images to predict, one per row.")
    return samples


class _NamedFileDataset(Dataset):
    """Reads lazily (inputs can be many); a file that fails in any pipeline step is named in the error, or, with
    `placeholder` (the shape a good item has), kept out: its item is that many zeros and `unreadable` says why."""

    placeholder: tuple | None = None

    def _transform(self, index: int):
        try:
            item = super()._transform(index)
        except Exception as err:  # the pipeline names the file already; anything else, name it here
            error = pipeline_error(err, self.data[index])
            if self.placeholder is None:
                raise error from None
            return {"image": torch.zeros(self.placeholder), "label": torch.as_tensor(self.data[index]["label"]),
                    "unreadable": str(error)}
        return item | ({"unreadable": ""} if self.placeholder is not None else {})


def build_inference_dataset(data_cfg, samples: list[Sample], model_in_channels: int, normalization,
                            source: str = "", keep_going: bool = False) -> Dataset:
    """The evaluation pipeline (no augmentation) over a list of samples, labelled or not. keep_going: a file that
    fails to decode does not stop the others; its item's `unreadable` holds the one-line reason ('' when read)."""
    family = file_format(samples, data_cfg.spatial_dims, source, data_cfg.in_channels, one_family=False)
    transform = build_transforms(data_cfg, model_in_channels, normalization, train=False, family=family)
    dataset = _NamedFileDataset([{"image": s.path, "label": s.label} for s in samples], transform)
    if keep_going:  # every good item leaves the pipeline this shape (resized, channels adapted)
        dataset.placeholder = (model_in_channels,) + (data_cfg.image_size,) * data_cfg.spatial_dims
    return dataset
