"""Check a federation's data before any training: seconds here instead of a crash in round 7.

    python -m fedopal.validate --config app_configs/demo.yaml [--site site-1 ...]

For every site: the manifest (columns, labels, splits, files), the file format against data.spatial_dims,
and every file opened and decoded, with its channel count checked against data.in_channels. The client
runs the same check for its own site when a job starts; `fedopal.job --simulate` runs it for all sites
before it touches the workspace.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from fedopal.config import ConfigError, load_config
from fedopal.data import DataError, Sample, file_format, label_counts, read_manifest, site_manifest_path

SPLITS = ("train", "val", "test")


def _image_channels(path: str) -> int:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()  # structure and checksums, without decoding everything
        with Image.open(path) as img:
            img.load()  # a truncated file fails here
            return len(img.getbands())
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: corrupt or unreadable image ({type(err).__name__}: {err}). "
                        "Fix: re-export the image or remove its row.") from None


def _nifti_channels(path: str, spatial_dims: int) -> int:
    import nibabel as nib

    try:
        img = nib.load(path)
        np.asarray(img.dataobj)  # decode the voxels: a truncated .nii.gz fails only here
    except Exception as err:  # nibabel raises many types for foreign or truncated files
        raise DataError(f"{path}: corrupt or truncated NIfTI ({type(err).__name__}). "
                        "Fix: re-export the volume or remove its row.") from None
    shape = [d for d in img.shape if d > 1]
    return shape[spatial_dims] if len(shape) > spatial_dims else 1


def _array_channels(path: str, spatial_dims: int) -> int:
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: unreadable .npy ({err}). Fix: re-save it with numpy.save.") from None
    return arr.shape[-1] if arr.ndim > spatial_dims else 1


def check_files(samples: list[Sample], family: str, data_cfg) -> None:
    for s in samples:
        if family == "image":
            channels = _image_channels(s.path)
        elif family == "nifti":
            channels = _nifti_channels(s.path, data_cfg.spatial_dims)
        else:
            channels = _array_channels(s.path, data_cfg.spatial_dims)
        if channels != data_cfg.in_channels:
            raise DataError(f"{s.path}: {channels} channel(s) but data.in_channels is {data_cfg.in_channels}. "
                            "Fix: convert the image, or set data.in_channels to match every file.")


def check_site(cfg, site: str, manifest: str | None = None) -> list[Sample]:
    """Everything about one site's data that can fail, in one pass; raises DataError with a one-line message."""
    manifest = manifest or site_manifest_path(cfg, site)
    samples = read_manifest(manifest, cfg.data.num_classes)
    family = file_format(samples, cfg.data.spatial_dims, manifest)
    check_files(samples, family, cfg.data)
    return samples


def describe(site: str, samples: list[Sample]) -> str:
    parts = [f"{split} {sum(label_counts(samples, split).values())} {label_counts(samples, split)}" for split in SPLITS]
    return f"{site}: ok ({'; '.join(parts)})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--site", action="append", help="check only these sites (default: the config's sites)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
        for site in args.site or cfg.federation.sites():
            print(describe(site, check_site(cfg, site)))
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
