"""Build a demo federation from a MedMNIST .npz: N sites, label skew, one "scanner" shift per site.

    fedopal prepare --npz data/medmnist/pneumoniamnist.npz --out data/demo_federation --sites 4
    fedopal prepare --npz data/medmnist/adrenalmnist3d.npz --out data/demo_federation_3d --skew-prior global

All official splits are pooled, then every site draws its own train/val/test without replacement:
- label skew: class proportions q ~ Dirichlet(alpha * K * prior), clipped to [min_frac, 1 - min_frac]; the
  prior is uniform, or the pooled class frequencies (`--skew-prior global`, for rare classes);
- test: at least `min_test_per_class` images of every class (METHOD.md: one image must not move
  balanced accuracy by several points);
- acquisition shift, one per site, cycling (documented in SHIFTS).
Output: real PNG files (2D) or NIfTI volumes (3D, .nii.gz with an affine), plus `<site>/manifest.csv`
(path,label,split) and `federation.json`. Deterministic by seed.

MedMNIST 3D does not publish the original voxel size. Volumes are written on a nominal isotropic grid with
the same 28 mm field of view at every resolution (1 mm at 28^3, 0.4375 mm at 64^3), centred on the origin.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter


def _reference(img, rng):
    return img


def _low_contrast_gamma(img, rng):
    return 0.15 + 0.7 * np.power(img, 1.6)


def _blur(img, rng):
    return gaussian_filter(img, sigma=0.9)


def _noise(img, rng):
    return img + 0.05 + rng.normal(0.0, 0.07, img.shape)


# site i gets SHIFTS[i % len(SHIFTS)]: different "scanners"
SHIFTS = {
    "reference": (_reference, "no change"),
    "gamma_low_contrast": (_low_contrast_gamma, "gamma 1.6, contrast x0.7, offset +0.15"),
    "blur": (_blur, "Gaussian blur sigma 0.9 px (softer detector)"),
    "noise": (_noise, "Gaussian noise sd 0.07, brightness +0.05"),
}


def site_names(n: int) -> list[str]:
    return [f"site-{i + 1}" for i in range(n)]


FIELD_OF_VIEW_MM = 28.0


def nifti_affine(size: int) -> np.ndarray:
    spacing = FIELD_OF_VIEW_MM / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (size - 1) / 2.0
    return affine


def _write_image(img: np.ndarray, path: str) -> None:
    """img in [0, 1]; 2D (gray, or RGB channels last) -> 8-bit PNG, 3D -> uint8 NIfTI (.nii.gz) with the nominal
    affine."""
    data = np.round(img * 255).astype(np.uint8)
    if img.ndim == 2 or (img.ndim == 3 and img.shape[-1] == 3):
        Image.fromarray(data).save(path)
    else:
        import nibabel as nib

        nib.save(nib.Nifti1Image(data, nifti_affine(img.shape[0])), path)


def _class_fractions(rng, prior: np.ndarray, alpha: float, min_frac: float) -> np.ndarray:
    q = rng.dirichlet(alpha * len(prior) * prior)
    q = np.clip(q, min_frac, 1.0 - min_frac)
    return q / q.sum()


def _counts(q: np.ndarray, total: int, minimum: int) -> np.ndarray:
    return np.maximum(minimum, np.round(q * total).astype(int))


def build_federation(npz_path: str, out_dir: str, num_sites: int = 4, seed: int = 0, alpha: float = 0.5,
                     min_frac: float = 0.12, train_per_site: int = 400, val_per_site: int = 100,
                     test_per_site: int = 120, min_test_per_class: int = 30, min_val_per_class: int = 10,
                     skew_prior: str = "uniform", thresholds: list[int] | None = None, shifts: bool = True) -> dict:
    """thresholds: concept shift. Site i labels an image 1 when its source label (an ordinal grade, e.g.
    RetinaMNIST's 0..4) is >= thresholds[i], else 0: hospitals with different referral rules label the same kind of
    image differently. A site draws each of its two classes from the grades on that side of its own threshold.
    shifts: apply the per-site acquisition shifts (SHIFTS); off keeps every site's images as stored."""
    if not os.path.isfile(npz_path):
        raise FileNotFoundError(f"{npz_path}: MedMNIST file not found. Fix: run from the repository root.")
    with np.load(npz_path) as npz:
        images = np.concatenate([npz[f"{s}_images"] for s in ("train", "val", "test")])
        labels = np.concatenate([npz[f"{s}_labels"] for s in ("train", "val", "test")]).reshape(-1).astype(int)
    if thresholds is not None and len(thresholds) != num_sites:
        raise ValueError(f"{len(thresholds)} thresholds for {num_sites} sites. Fix: give one --thresholds per site.")
    grades = labels
    num_grades = int(grades.max()) + 1
    num_classes = 2 if thresholds is not None else num_grades
    suffix = ".png" if images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3) else ".nii.gz"
    rng = np.random.default_rng(seed)
    pools = {g: list(rng.permutation(np.flatnonzero(grades == g))) for g in range(num_grades)}

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    shift_names = list(SHIFTS)
    summary = {"source": os.path.basename(npz_path), "seed": seed, "alpha": alpha, "skew_prior": skew_prior,
               "num_classes": num_classes, "image_shape": list(images.shape[1:]), "shifts": shifts,
               "thresholds": thresholds, "sites": {}}
    for i, site in enumerate(site_names(num_sites)):
        # which source labels make up each of this site's classes
        members = ({0: list(range(thresholds[i])), 1: list(range(thresholds[i], num_grades))} if thresholds
                   else {c: [c] for c in range(num_classes)})
        sizes = np.array([sum(int((grades == g).sum()) for g in members[c]) for c in range(num_classes)], dtype=float)
        prior = sizes / sizes.sum() if skew_prior == "global" else np.full(num_classes, 1.0 / num_classes)
        q = _class_fractions(rng, prior, alpha, min_frac)
        plan = {
            "train": _counts(q, train_per_site, 1),
            "val": _counts(q, val_per_site, min_val_per_class),
            "test": _counts(q, test_per_site, min_test_per_class),
        }
        shift = shift_names[i % len(shift_names)] if shifts else "reference"
        shift_fn = SHIFTS[shift][0]
        site_rng = np.random.default_rng([seed, i])
        site_dir = os.path.join(out_dir, site)
        os.makedirs(os.path.join(site_dir, "images"))
        rows = []
        for split, counts in plan.items():
            for c, n in enumerate(counts):
                drawn = _draw(pools, members[c], int(n), rng)
                if drawn is None:
                    raise ValueError(f"class {c} has too few images left for {site}/{split} (need {n}). "
                                     "Fix: fewer sites or smaller --*-per-site.")
                for idx in drawn:
                    img = images[idx].astype(np.float32) / 255.0
                    img = np.clip(shift_fn(img, site_rng), 0.0, 1.0)
                    name = f"images/{split}_{len(rows):05d}{suffix}"
                    _write_image(img, os.path.join(site_dir, name))
                    rows.append((name, c, split))
        with open(os.path.join(site_dir, "manifest.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "split"])
            writer.writerows(rows)
        summary["sites"][site] = {
            **({"threshold": thresholds[i], "class_grades": {str(c): g for c, g in members.items()}}
               if thresholds else {}),
            "shift": shift,
            "shift_description": SHIFTS[shift][1],
            "class_fractions": [round(float(x), 3) for x in q],
            **{split: [int(n) for n in counts] for split, counts in plan.items()},
        }
    with open(os.path.join(out_dir, "federation.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _draw(pools: dict[int, list], grades: list[int], n: int, rng) -> list | None:
    """n images from the pools of `grades` (removed from them), each grade in proportion to what it has left;
    None if they hold fewer than n. One grade: the next n of its (already shuffled) pool."""
    if len(grades) == 1:
        pool = pools[grades[0]]
        return [pool.pop() for _ in range(n)] if len(pool) >= n else None
    available = [(g, idx) for g in grades for idx in pools[g]]
    if len(available) < n:
        return None
    chosen = [available[k] for k in rng.permutation(len(available))[:n]]
    for g, idx in chosen:
        pools[g].remove(idx)
    return [idx for _, idx in chosen]


def format_summary(summary: dict) -> str:
    lines = ["| site | shift | train per class | val per class | test per class |", "|---|---|---|---|---|"]
    for site, s in summary["sites"].items():
        lines.append(f"| {site} | {s['shift']} | {s['train']} | {s['val']} | {s['test']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--npz", default="data/medmnist/pneumoniamnist.npz")
    p.add_argument("--out", default="data/demo_federation")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more skew)")
    p.add_argument("--skew-prior", choices=("uniform", "global"), default="uniform",
                   help="centre of the label skew: uniform, or the pooled class frequencies")
    p.add_argument("--train-per-site", type=int, default=400)
    p.add_argument("--val-per-site", type=int, default=100)
    p.add_argument("--test-per-site", type=int, default=120)
    p.add_argument("--min-test-per-class", type=int, default=30)
    p.add_argument("--min-val-per-class", type=int, default=10)
    p.add_argument("--thresholds", type=int, nargs="+", default=None,
                   help="concept shift: site i's label is 1 when the source grade >= its threshold (one per site)")
    p.add_argument("--no-shifts", action="store_true", help="no acquisition shift: every site's images as stored")
    args = p.parse_args(argv)
    try:
        summary = build_federation(args.npz, args.out, args.sites, args.seed, args.alpha,
                                   train_per_site=args.train_per_site, val_per_site=args.val_per_site,
                                   test_per_site=args.test_per_site, min_test_per_class=args.min_test_per_class,
                                   min_val_per_class=args.min_val_per_class, skew_prior=args.skew_prior,
                                   thresholds=args.thresholds, shifts=not args.no_shifts)
    except (FileNotFoundError, ValueError) as err:
        print(f"prepare: {err}", file=sys.stderr)
        return 2
    print(f"Federation written to {args.out} ({args.sites} sites, every test class >= {args.min_test_per_class} "
          "samples):")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
