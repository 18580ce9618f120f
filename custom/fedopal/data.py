"""Site data: a manifest CSV (path,label,split) -> MONAI dictionary transforms -> CacheDataset per split.

The manifest is validated before any training starts (a bad row costs seconds here, hours in round 7).
Paths in a manifest are relative to the manifest's folder, or absolute.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandFlipd,
    RepeatChanneld,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
)

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("path", "label", "split")
# file suffix -> (MONAI reader, format family); one family per site
READERS = {".png": ("PILReader", "image"), ".jpg": ("PILReader", "image"), ".jpeg": ("PILReader", "image"),
           ".npy": ("NumpyReader", "array"), ".nii": ("NibabelReader", "nifti"), ".nii.gz": ("NibabelReader", "nifti")}


class DataError(ValueError):
    """Bad site data; the message names the file, the row or field, and the fix."""


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


def read_manifest(manifest_path: str, num_classes: int) -> list[Sample]:
    if not os.path.isfile(manifest_path):
        raise DataError(f"{manifest_path}: manifest not found. Fix: create it (columns path,label,split) "
                        "or point data.root at the folder holding one sub-folder per site.")
    base = os.path.dirname(os.path.abspath(manifest_path))
    with open(manifest_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{manifest_path}: missing column(s) {missing}; found {reader.fieldnames}. "
                            "Fix: the header must be path,label,split.")
        samples = []
        for row_no, row in enumerate(reader, start=2):  # row 1 is the header
            where = f"{manifest_path}:{row_no}"
            try:
                label = int(row["label"])
            except (TypeError, ValueError):
                raise DataError(f"{where}: label {row['label']!r} is not an integer. "
                                f"Fix: use class indices 0..{num_classes - 1}.") from None
            if not 0 <= label < num_classes:
                raise DataError(f"{where}: label {label} is out of range 0..{num_classes - 1}. "
                                "Fix: correct the label or set data.num_classes.")
            split = (row["split"] or "").strip()
            if split not in SPLITS:
                raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}. Fix: correct the row.")
            path = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
            if not os.path.isfile(path):
                raise DataError(f"{where}: image file not found: {path}. Fix: restore the file or remove the row.")
            samples.append(Sample(path, label, split))
    if not samples:
        raise DataError(f"{manifest_path}: the site has no rows. Fix: list this site's images in the manifest.")
    for split in SPLITS:
        if not any(s.split == split for s in samples):
            raise DataError(f"{manifest_path}: the '{split}' split is empty. Fix: assign rows to every split "
                            "(train, val, test).")
    return samples


def suffix_of(path: str) -> str:
    lower = path.lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else os.path.splitext(lower)[1]


def file_format(samples: list[Sample], spatial_dims: int, manifest_path: str = "") -> str:
    """The site's one format family; 2D files in a 3D config (and the reverse) stop here, before training."""
    suffixes = {suffix_of(s.path) for s in samples}
    unknown = sorted(suffixes - set(READERS))
    if unknown:
        raise DataError(f"{manifest_path}: unsupported file type(s) {unknown}. "
                        f"Fix: use one of {', '.join(READERS)}.")
    families = {READERS[x][1] for x in suffixes}
    if len(families) > 1:
        raise DataError(f"{manifest_path}: mixed file types {sorted(suffixes)}. Fix: one format per site.")
    family = families.pop()
    if spatial_dims == 3 and family == "image":
        raise DataError(f"{manifest_path}: data.spatial_dims is 3 but the site holds 2D images ({sorted(suffixes)}). "
                        "Fix: point the manifest at NIfTI volumes, or set data.spatial_dims: 2.")
    if family == "nifti":
        import nibabel as nib

        first = samples[0].path
        try:
            shape = nib.load(first).shape
        except Exception as err:  # nibabel raises several types for a truncated or foreign file
            raise DataError(f"{first}: not a readable NIfTI file ({type(err).__name__}: {_first_line(err)}). "
                            "Fix: re-export the volume or remove its row.") from None
        ndim = len([d for d in shape if d > 1])
        if ndim != spatial_dims:
            raise DataError(f"{first}: a {ndim}D NIfTI in a config with data.spatial_dims {spatial_dims}. "
                            f"Fix: set data.spatial_dims: {ndim}, or use {spatial_dims}D files.")
    return family


def build_transforms(data_cfg, model_in_channels: int, normalization, train: bool, family: str = "image") -> Compose:
    """One declared pipeline for 2D and 3D: the two differ only in the steps listed.

    load -> channel first -> (orientation, spacing: 3D) -> intensity to [0, 1] -> size -> (augment: train)
    -> channel adaptation -> normalization of the backbone's pretraining -> tensors
    """
    keys = ["image"]
    dims = data_cfg.spatial_dims
    size = (data_cfg.image_size,) * dims
    reader = {"image": "PILReader", "array": "NumpyReader", "nifti": "NibabelReader"}[family]
    steps = [
        LoadImaged(keys, reader=reader, image_only=True),
        EnsureChannelFirstd(keys, channel_dim="no_channel" if data_cfg.in_channels == 1 else -1),
    ]
    if dims == 3 and data_cfg.orientation:
        steps.append(Orientationd(keys, axcodes=data_cfg.orientation))
    if dims == 3 and data_cfg.spacing:
        steps.append(Spacingd(keys, pixdim=data_cfg.spacing, mode="bilinear"))
    if data_cfg.intensity_range:
        lo, hi = data_cfg.intensity_range
        steps.append(ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    elif family == "image":
        steps.append(ScaleIntensityRanged(keys, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True))
    else:
        steps.append(ScaleIntensityd(keys, minv=0.0, maxv=1.0))
    if data_cfg.spatial_mode == "resize":
        steps.append(Resized(keys, spatial_size=size, mode="bilinear" if dims == 2 else "trilinear"))
    else:
        steps.append(ResizeWithPadOrCropd(keys, spatial_size=size))
    if train and data_cfg.augment:
        steps.append(RandAffined(keys, prob=0.5, rotate_range=(0.15,) * (1 if dims == 2 else 3),
                                 scale_range=(0.1,) * dims, translate_range=(2,) * dims, padding_mode="border"))
        if dims == 3:
            steps.append(RandFlipd(keys, prob=0.5, spatial_axis=0))
    if model_in_channels != data_cfg.in_channels:
        if data_cfg.in_channels == 1 and data_cfg.channel_adapt == "repeat":
            steps.append(RepeatChanneld(keys, repeats=model_in_channels))
        else:
            raise DataError(
                f"data.in_channels={data_cfg.in_channels} but the backbone expects {model_in_channels} channels "
                f"(data.channel_adapt={data_cfg.channel_adapt}). Fix: convert the images, or use 1-channel data "
                "with channel_adapt: repeat."
            )
    if normalization is not None:
        mean, std = normalization
        steps.append(NormalizeIntensityd(keys, subtrahend=mean[:model_in_channels], divisor=std[:model_in_channels],
                                         channel_wise=True))
    steps.append(EnsureTyped(keys + ["label"], track_meta=False))
    return Compose(steps)


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


def build_datasets(data_cfg, samples: list[Sample], model_in_channels: int, normalization,
                   manifest_path: str = "", seed: int = 0) -> dict[str, CacheDataset]:
    """One CacheDataset per split; the deterministic steps are cached once per job, augmentation of the training
    split runs per pass, seeded per item (SeededCacheDataset: the same seed gives the same augmented images)."""
    family = file_format(samples, data_cfg.spatial_dims, manifest_path)
    datasets = {}
    for split in SPLITS:
        items = [{"image": s.path, "label": s.label} for s in samples if s.split == split]
        transform = build_transforms(data_cfg, model_in_channels, normalization, train=split == "train",
                                     family=family)
        transform.set_random_state(seed=seed)
        try:
            datasets[split] = SeededCacheDataset(items, transform, cache_rate=data_cfg.cache_rate, num_workers=0,
                                                 progress=False, copy_cache=False)
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


def label_counts(samples: list[Sample], split: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for s in samples:
        if s.split == split:
            counts[s.label] = counts.get(s.label, 0) + 1
    return dict(sorted(counts.items()))


# -- inputs for prediction (fedopal.predict): labels and splits are optional, files are read lazily ----------

UNLABELED = -1  # the label of an input that has none (new scans to predict)


def find_inputs(inputs: list[str]) -> list[Sample]:
    """Files and folders (searched recursively, sorted) -> unlabeled samples of the supported file types."""
    paths = []
    for given in inputs:
        if os.path.isfile(given):
            paths.append(given)
        elif os.path.isdir(given):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(given) for name in names
                           if suffix_of(name) in READERS)
            if not found:
                raise DataError(f"{given}: no image files ({', '.join(READERS)}) in this folder. "
                                "Fix: point --input at the images, or list them with --manifest.")
            paths += found
        else:
            raise DataError(f"{given}: input file or folder not found. Fix: check the path.")
    return [Sample(os.path.abspath(p), UNLABELED, "") for p in paths]


def read_input_manifest(manifest_path: str, num_classes: int) -> list[Sample]:
    """A manifest of images to predict: `path` is required; `label` and `split` are optional (a site's training
    manifest works as it is). Rows are checked as in read_manifest; labels may be left empty."""
    if not os.path.isfile(manifest_path):
        raise DataError(f"{manifest_path}: manifest not found. Fix: pass a CSV with a 'path' column "
                        "(optional: label, split).")
    base = os.path.dirname(os.path.abspath(manifest_path))
    with open(manifest_path, newline="") as f:
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []):
            raise DataError(f"{manifest_path}: no 'path' column; found {reader.fieldnames}. "
                            "Fix: the header must name a path column (optional: label, split).")
        samples = []
        for row_no, row in enumerate(reader, start=2):  # row 1 is the header
            where = f"{manifest_path}:{row_no}"
            text = (row.get("label") or "").strip()
            try:
                label = int(text) if text else UNLABELED
            except ValueError:
                raise DataError(f"{where}: label {text!r} is not an integer. "
                                f"Fix: use class indices 0..{num_classes - 1}, or leave it empty.") from None
            if label != UNLABELED and not 0 <= label < num_classes:
                raise DataError(f"{where}: label {label} is out of range 0..{num_classes - 1}. "
                                "Fix: correct the label, or leave it empty.")
            path = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
            if not os.path.isfile(path):
                raise DataError(f"{where}: image file not found: {path}. Fix: restore the file or remove the row.")
            samples.append(Sample(path, label, (row.get("split") or "").strip()))
    if not samples:
        raise DataError(f"{manifest_path}: no rows. Fix: list the images to predict, one per row.")
    return samples


class _NamedFileDataset(Dataset):
    """Reads lazily (inputs can be many); a file that fails in any pipeline step is named in the error."""

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as err:  # MONAI wraps reader errors in several types
            raise DataError(f"{self.data[index]['image']}: could not be read ({_first_line(err)}). "
                            "Fix: replace or remove the file.") from None


def build_inference_dataset(data_cfg, samples: list[Sample], model_in_channels: int, normalization,
                            source: str = "") -> Dataset:
    """The evaluation pipeline (no augmentation) over a list of samples, labelled or not."""
    family = file_format(samples, data_cfg.spatial_dims, source)
    transform = build_transforms(data_cfg, model_in_channels, normalization, train=False, family=family)
    return _NamedFileDataset([{"image": s.path, "label": s.label} for s in samples], transform)
