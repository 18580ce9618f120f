"""Site data: a manifest CSV (path,label,split) -> MONAI dictionary transforms -> CacheDataset per split.

The manifest is validated before any training starts (a bad row costs seconds here, hours in round 7).
Paths in a manifest are relative to the manifest's folder, or absolute.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import torch
from monai.data import CacheDataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    RandAffined,
    RepeatChanneld,
    Resized,
    ScaleIntensityRanged,
)

from fedopal.backbones import IMAGENET_MEAN, IMAGENET_STD

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("path", "label", "split")


class DataError(ValueError):
    """Bad site data; the message names the file, the row or field, and the fix."""


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
    for split in SPLITS:
        if not any(s.split == split for s in samples):
            raise DataError(f"{manifest_path}: the '{split}' split is empty. Fix: assign rows to every split "
                            "(train, val, test).")
    return samples


def build_transforms(data_cfg, model_in_channels: int, normalization: str, train: bool) -> Compose:
    """The 2D pipeline, declared: load, channel first, scale to [0,1], resize, (augment), adapt channels, normalize."""
    keys = ["image"]
    size = (data_cfg.image_size,) * 2
    steps = [
        LoadImaged(keys, reader="PILReader", image_only=True),
        EnsureChannelFirstd(keys, channel_dim="no_channel" if data_cfg.in_channels == 1 else -1),
        ScaleIntensityRanged(keys, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
        Resized(keys, spatial_size=size, mode="bilinear"),
    ]
    if train and data_cfg.augment:
        steps.append(RandAffined(keys, prob=0.5, rotate_range=0.15, scale_range=0.1, translate_range=2,
                                 padding_mode="border"))
    if model_in_channels != data_cfg.in_channels:
        if data_cfg.in_channels == 1 and data_cfg.channel_adapt == "repeat":
            steps.append(RepeatChanneld(keys, repeats=model_in_channels))
        else:
            raise DataError(
                f"data.in_channels={data_cfg.in_channels} but the backbone expects {model_in_channels} channels "
                f"(data.channel_adapt={data_cfg.channel_adapt}). Fix: convert the images, or use 1-channel data "
                "with channel_adapt: repeat."
            )
    if normalization == "imagenet":
        mean = IMAGENET_MEAN[:model_in_channels]
        std = IMAGENET_STD[:model_in_channels]
        steps.append(NormalizeIntensityd(keys, subtrahend=mean, divisor=std, channel_wise=True))
    steps.append(EnsureTyped(keys + ["label"], track_meta=False))
    return Compose(steps)


def build_datasets(data_cfg, samples: list[Sample], model_in_channels: int, normalization: str,
                   manifest_path: str = "") -> dict[str, CacheDataset]:
    """One CacheDataset per split; the deterministic steps are cached once per job, augmentation runs per epoch."""
    datasets = {}
    for split in SPLITS:
        items = [{"image": s.path, "label": s.label} for s in samples if s.split == split]
        transform = build_transforms(data_cfg, model_in_channels, normalization, train=split == "train")
        try:
            datasets[split] = CacheDataset(items, transform, cache_rate=data_cfg.cache_rate, num_workers=0,
                                           progress=False, copy_cache=False)
        except Exception as err:  # MONAI wraps reader errors; name the file for the user
            raise DataError(f"{manifest_path}: could not read an image of the '{split}' split: "
                            f"{_first_line(err)}. Fix: replace or remove the corrupt file.") from None
    return datasets


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def loader(dataset, batch_size: int, shuffle: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       num_workers=0, drop_last=False)


def label_counts(samples: list[Sample], split: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for s in samples:
        if s.split == split:
            counts[s.label] = counts.get(s.label, 0) + 1
    return dict(sorted(counts.items()))
