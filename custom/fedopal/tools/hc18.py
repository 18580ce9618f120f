"""HC18 fetal head ultrasound: the committed small bundle, the segmentation demo federation, head circumference.

    python -m fedopal.tools.hc18 bundle --src /path/to/hc18 --out data/hc18/hc18_small.npz
    python -m fedopal.tools.hc18 federation --npz data/hc18/hc18_small.npz --out data/demo_federation_seg --sites 4

Source: the HC18 Grand Challenge training set (van den Heuvel et al., PLoS ONE 13(8): e0200412, 2018; Zenodo record
1327317; CC BY 4.0): 999 frames of 806 subjects (`NNN_HC`, `NNN_2HC`, ... are frames of subject `NNN`), each with the
skull drawn by a sonographer as an ellipse outline, plus the pixel size and the head circumference (HC) in mm.

bundle: every frame at SMALL_SIZE (width x height), image by LANCZOS; the mask is the outline filled at full
resolution (scipy.ndimage.binary_fill_holes), then area-averaged down (PIL BOX) and thresholded at 0.5.

federation: N sites (site-1 .. site-N), split by SUBJECT: all frames of a subject go to one site and one split.
Each site gets one simulated acquisition/annotation shift (SHIFTS, site i gets the i-th, cycling): ultrasound
machine settings (gain, speckle, depth i.e. zoom) and contouring conventions (masks drawn wider or narrower).
Output per site: images/<name>.png (8-bit gray), masks/<name>.png (uint8 label map, 0 background, 1 head),
manifest.csv (path,mask,split,patient_id), hc_reference.csv (path,pixel_size_x_mm,pixel_size_y_mm,hc_mm); and
federation.json. Deterministic by seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

SMALL_SIZE = (128, 86)  # width x height: 800x540 / 6.25 (aspect 1.488 vs 1.481: pixels 0.5 % anisotropic)
CSV_NAME = "training_set_pixel_size_and_HC.csv"
_NAME = re.compile(r"^(\d{3})_(\d*)HC$")


# ---------------------------------------------------------------------------------------------- head circumference
def _largest_component(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask) > 0
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def ramanujan_perimeter(a: float, b: float) -> float:
    """Ramanujan's second approximation of an ellipse's perimeter (semi-axes a, b):
    P = pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h))), h = ((a - b) / (a + b))^2 (relative error < 4e-5 even at b/a = 0.1)."""
    if a + b == 0:
        return 0.0
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1.0 + 3.0 * h / (10.0 + math.sqrt(4.0 - 3.0 * h)))


def ellipse_axes_mm(mask: np.ndarray, pixel_size_xy) -> tuple[float, float]:
    """Semi-axes (a >= b, mm) of the ellipse with the same second moments as the mask's largest connected component
    (holes filled). Coordinates are pixel centres times the pixel size (x: columns, y: rows); each pixel counts as a
    uniform square, which adds pixel_size^2 / 12 to each axis' variance. For a filled ellipse the covariance has
    eigenvalues a^2/4 and b^2/4, so a = 2 sqrt(lambda_1), b = 2 sqrt(lambda_2) (e.g. R. Haralick, L. Shapiro, Computer
    and Robot Vision I, 1992, ch. 3; the same convention as skimage.measure.regionprops' axis lengths).
    (nan, nan) for an empty mask."""
    region = ndimage.binary_fill_holes(_largest_component(mask))
    if not region.any():
        return float("nan"), float("nan")
    sx, sy = float(pixel_size_xy[0]), float(pixel_size_xy[1])
    rows, cols = np.nonzero(region)
    pts = np.stack([cols * sx, rows * sy]).astype(np.float64)
    cov = np.cov(pts, bias=True) + np.diag([sx * sx / 12.0, sy * sy / 12.0])
    lam = np.clip(np.linalg.eigvalsh(cov), 0.0, None)
    return 2.0 * math.sqrt(lam[1]), 2.0 * math.sqrt(lam[0])


def ellipse_circumference_mm(mask: np.ndarray, pixel_size_xy) -> float:
    """Head circumference (mm) from a binary mask: the moment ellipse of its largest connected component
    (`ellipse_axes_mm`: semi-axes a = 2 sqrt(lambda_1), b = 2 sqrt(lambda_2) of the covariance of the filled region in
    mm) and its perimeter by Ramanujan's second approximation (S. Ramanujan, "Modular equations and approximations to
    pi", Quart. J. Pure Appl. Math. 45, 1914: P = pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h))), h = ((a-b)/(a+b))^2).
    pixel_size_xy: (x, y) pixel size in mm. NaN for an empty mask."""
    a, b = ellipse_axes_mm(mask, pixel_size_xy)
    if math.isnan(a):
        return float("nan")
    return ramanujan_perimeter(a, b)


def read_hc_reference(reference_csv: str) -> dict[str, dict]:
    with open(reference_csv, newline="") as f:
        return {row["path"]: {"pixel_size_x_mm": float(row["pixel_size_x_mm"]),
                              "pixel_size_y_mm": float(row["pixel_size_y_mm"]), "hc_mm": float(row["hc_mm"])}
                for row in csv.DictReader(f)}


def hc_errors(pred_masks: dict, reference_csv: str) -> list[dict]:
    """Per-frame HC error of predicted masks against a site's hc_reference.csv. pred_masks: {path: 2D array}, where
    path is the reference's `path` (images/<name>.png), or any path with the same file name (e.g. a prediction
    folder's masks/<name>.png); nonzero = head. Returns one dict per prediction: path, hc_pred_mm, hc_ref_mm,
    abs_error_mm (NaN for an empty prediction). KeyError for a prediction the reference does not list."""
    ref = read_hc_reference(reference_csv)
    by_name = {os.path.basename(p): p for p in ref}
    rows = []
    for path, mask in pred_masks.items():
        key = path if path in ref else by_name.get(os.path.basename(str(path)))
        if key is None:
            raise KeyError(f"{path}: not in {reference_csv}")
        r = ref[key]
        hc = ellipse_circumference_mm(np.asarray(mask), (r["pixel_size_x_mm"], r["pixel_size_y_mm"]))
        rows.append({"path": key, "hc_pred_mm": hc, "hc_ref_mm": r["hc_mm"], "abs_error_mm": abs(hc - r["hc_mm"])})
    return rows


def hc_summary(rows: list[dict]) -> dict:
    """mean / median absolute HC error (mm) over rows of `hc_errors`; n_empty counts predictions with no head."""
    err = np.array([r["abs_error_mm"] for r in rows], dtype=float)
    ok = err[~np.isnan(err)]
    return {"n": int(len(err)), "n_empty": int(np.isnan(err).sum()),
            "mean_abs_error_mm": float(ok.mean()) if ok.size else float("nan"),
            "median_abs_error_mm": float(np.median(ok)) if ok.size else float("nan")}


def hc_table(pred_dir: str, reference_csv: str) -> dict:
    """Every PNG in pred_dir (a label map, nonzero = head) against reference_csv, matched by file name:
    {"rows": hc_errors(...), **hc_summary(rows)}."""
    preds = {name: np.array(Image.open(os.path.join(pred_dir, name)))
             for name in sorted(os.listdir(pred_dir)) if name.endswith(".png")}
    rows = hc_errors(preds, reference_csv)
    return {"rows": rows, **hc_summary(rows)}


# ---------------------------------------------------------------------------------------------------------- bundle
def fill_outline(outline: np.ndarray) -> np.ndarray:
    """The filled ellipse of an HC18 annotation (outline > 0). Where the ellipse runs out of the frame (4 of the 999
    frames: the outline touches the top or bottom edge) the outline is open; the frame edges it touches then close
    it, so the mask is the part of the head inside the frame."""
    outline = outline > 0
    filled = ndimage.binary_fill_holes(outline)
    if filled.sum() > 2 * outline.sum():
        return filled
    edges = {"top": outline[0].any(), "bottom": outline[-1].any(), "left": outline[:, 0].any(),
             "right": outline[:, -1].any()}
    padded = np.pad(outline, 1)
    if edges["top"]:
        padded[0] = True
    if edges["bottom"]:
        padded[-1] = True
    if edges["left"]:
        padded[:, 0] = True
    if edges["right"]:
        padded[:, -1] = True
    return ndimage.binary_fill_holes(padded)[1:-1, 1:-1]


def _fill_and_shrink(outline: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    filled = fill_outline(outline).astype(np.float32)
    small = np.asarray(Image.fromarray(filled, mode="F").resize(size, Image.BOX))
    return (small >= 0.5).astype(np.uint8)


def build_bundle(src: str, out_path: str, size: tuple[int, int] = SMALL_SIZE) -> dict:
    """The HC18 training set (src: the folder holding training_set/ and the CSV) -> one compressed .npz."""
    with open(os.path.join(src, CSV_NAME), newline="") as f:
        table = [row for row in csv.reader(f)][1:]
    w, h = size
    n = len(table)
    images = np.zeros((n, h, w), np.uint8)
    masks = np.zeros((n, h, w), np.uint8)
    names, subjects = [], []
    orig = np.zeros((n, 2), np.int32)
    pix = np.zeros((n, 2), np.float64)
    hc = np.zeros(n, np.float64)
    for i, (filename, pixel_mm, hc_mm) in enumerate(table):
        stem = filename[:-4]
        m = _NAME.match(stem)
        if m is None:
            raise ValueError(f"{filename}: not NNN_HC.png / NNN_kHC.png")
        img = Image.open(os.path.join(src, "training_set", filename)).convert("L")
        outline = np.array(Image.open(os.path.join(src, "training_set", f"{stem}_Annotation.png")).convert("L"))
        if outline.shape != (img.height, img.width):
            raise ValueError(f"{filename}: annotation {outline.shape[::-1]} != image {img.size}")
        images[i] = np.asarray(img.resize(size, Image.LANCZOS))
        masks[i] = _fill_and_shrink(outline, size)
        names.append(stem)
        subjects.append(m.group(1))
        orig[i] = img.size
        pix[i] = (float(pixel_mm) * img.width / w, float(pixel_mm) * img.height / h)
        hc[i] = float(hc_mm)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez_compressed(out_path, images=images, masks=masks, names=np.array(names), subjects=np.array(subjects),
                        orig_width=orig[:, 0], orig_height=orig[:, 1], pixel_size_x_mm=pix[:, 0],
                        pixel_size_y_mm=pix[:, 1], hc_mm=hc)
    return bundle_agreement(out_path)


def bundle_agreement(npz_path: str) -> dict:
    """HC from the bundle's small filled masks vs the CSV reference (abs error, mm)."""
    with np.load(npz_path) as z:
        est = np.array([ellipse_circumference_mm(m, (sx, sy)) for m, sx, sy in
                        zip(z["masks"], z["pixel_size_x_mm"], z["pixel_size_y_mm"])])
        err = np.abs(est - z["hc_mm"])
        rel = err / z["hc_mm"]
        return {"n": int(len(err)), "median_abs_error_mm": round(float(np.median(err)), 3),
                "p95_abs_error_mm": round(float(np.percentile(err, 95)), 3),
                "max_abs_error_mm": round(float(err.max()), 3),
                "median_rel_error": round(float(np.median(rel)), 5), "p95_rel_error": round(float(np.percentile(rel, 95)), 5),
                "subjects": int(len(set(z["subjects"].tolist())))}


# ------------------------------------------------------------------------------------------------------ federation
@dataclass(frozen=True)
class Shift:
    description: str
    gain: tuple[float, float, float] | None = None  # out = offset + scale * img ** gamma (img in [0, 1])
    speckle_shape: float | None = None  # multiplicative Gamma(k, 1/k) noise: mean 1, sd 1/sqrt(k)
    zoom: float = 1.0  # depth setting: crop 1/zoom of the frame (holding the head where it fits), resize back
    contour_px: int = 0  # contouring convention: +k dilate, -k erode the mask by k px (3x3 cross, at SMALL_SIZE)


# site i gets SHIFTS[i % len(SHIFTS)]: different ultrasound machines / settings and annotation habits
SHIFTS = {
    "reference": Shift("no change"),
    "gain_wide_contour": Shift("higher gain: 0.08 + 0.85 * img^0.7 (brighter, lower contrast); masks drawn 2 px "
                               "wider (dilation, e.g. the outer edge of the skull)", gain=(0.08, 0.85, 0.7),
                               contour_px=2),
    "speckle_narrow_contour": Shift("speckle: multiplicative Gamma noise (shape 8: mean 1, sd 0.35); masks drawn "
                                    "1 px narrower (erosion, e.g. the inner edge of the skull)", speckle_shape=8.0,
                                    contour_px=-1),
    "depth_zoom": Shift("shallower depth / zoom x1.15: a 111x75 crop holding the head (random where it fits; 1.7 % "
                        "of heads do not), resized back to 128x86; image and mask alike; pixel size x0.87",
                        zoom=1.15),
}


def site_names(n: int) -> list[str]:
    return [f"site-{i + 1}" for i in range(n)]


def _crop_box(mask: np.ndarray, cw: int, ch: int, rng) -> tuple[int, int]:
    """Top-left corner of a cw x ch window inside the frame that holds the mask's bounding box where it fits
    (uniformly among such windows); otherwise the window centred on the box (clamped to the frame)."""
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return (w - cw) // 2, (h - ch) // 2

    def pick(lo_box, hi_box, extent, size):  # window [o, o + size) must hold [lo_box, hi_box]
        lo, hi = max(0, hi_box + 1 - size), min(extent - size, lo_box)
        if lo <= hi:
            return int(rng.integers(lo, hi + 1))
        return int(np.clip(round((lo_box + hi_box + 1) / 2 - size / 2), 0, extent - size))

    return pick(cols.min(), cols.max(), w, cw), pick(rows.min(), rows.max(), h, ch)


def apply_shift(img: np.ndarray, mask: np.ndarray, shift: Shift, rng) -> tuple[np.ndarray, np.ndarray, tuple, bool]:
    """uint8 image and {0,1} mask at SMALL_SIZE -> shifted (image, mask), pixel-size factors (x, y) and whether the
    depth crop cut the head."""
    h, w = img.shape
    scale = (1.0, 1.0)
    clipped = False
    if shift.zoom != 1.0:
        cw, ch = int(round(w / shift.zoom)), int(round(h / shift.zoom))
        x0, y0 = _crop_box(mask, cw, ch, rng)
        box = (x0, y0, x0 + cw, y0 + ch)
        clipped = int(mask.sum()) != int(mask[y0:y0 + ch, x0:x0 + cw].sum())
        img = np.asarray(Image.fromarray(img).resize((w, h), Image.LANCZOS, box=box))
        soft = np.asarray(Image.fromarray(mask.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR, box=box))
        mask = (soft >= 0.5).astype(np.uint8)
        scale = (cw / w, ch / h)
    x = img.astype(np.float64) / 255.0
    if shift.gain is not None:
        offset, s, gamma = shift.gain
        x = offset + s * np.power(x, gamma)
    if shift.speckle_shape is not None:
        k = shift.speckle_shape
        x = x * rng.gamma(k, 1.0 / k, size=x.shape)
    img = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    if shift.contour_px:
        structure = ndimage.generate_binary_structure(2, 1)
        op = ndimage.binary_dilation if shift.contour_px > 0 else ndimage.binary_erosion
        mask = op(mask > 0, structure=structure, iterations=abs(shift.contour_px)).astype(np.uint8)
    return img, mask, scale, clipped


def _assign_subjects(subjects: np.ndarray, plan: list[tuple[str, str, int]], rng) -> dict[tuple[str, str], list[str]]:
    """Shuffle the subjects and fill each (site, split) in turn up to exactly its number of frames, taking whole
    subjects (one that would overshoot is left for a later slot)."""
    frames: dict[str, int] = {}
    for s in subjects.tolist():
        frames[s] = frames.get(s, 0) + 1
    pool = [str(s) for s in rng.permutation(sorted(frames))]
    out = {}
    for site, split, n in plan:
        taken, rest, left = [], [], n
        for s in pool:
            if left > 0 and frames[s] <= left:
                taken.append(s)
                left -= frames[s]
            else:
                rest.append(s)
        if left:
            raise ValueError(f"too few subjects left for {site}/{split} (need {n} frames). "
                             "Fix: fewer sites or smaller --*-per-site.")
        out[(site, split)] = taken
        pool = rest
    return out


def build_federation(npz_path: str, out_dir: str, num_sites: int = 4, seed: int = 0, train_per_site: int = 60,
                     val_per_site: int = 20, test_per_site: int = 40, shifts: bool = True) -> dict:
    if not os.path.isfile(npz_path):
        raise FileNotFoundError(f"{npz_path}: HC18 bundle not found. Fix: run from the repository root.")
    with np.load(npz_path) as z:
        data = {k: z[k] for k in z.files}
    names = data["names"].tolist()
    subjects = data["subjects"]
    sites = site_names(num_sites)
    sizes = {"train": train_per_site, "val": val_per_site, "test": test_per_site}
    rng = np.random.default_rng(seed)
    plan = [(site, split, n) for site in sites for split, n in sizes.items()]
    assigned = _assign_subjects(subjects, plan, rng)
    by_subject: dict[str, list[int]] = {}
    for idx, s in enumerate(subjects.tolist()):
        by_subject.setdefault(s, []).append(idx)

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    shift_names = list(SHIFTS)
    summary = {"source": os.path.basename(npz_path),
               "source_dataset": "HC18 training set (van den Heuvel et al., PLoS ONE 13(8): e0200412, 2018; Zenodo "
                                 "record 1327317; CC BY 4.0)",
               "seed": seed, "task": "segmentation", "num_classes": 2, "classes": {"0": "background", "1": "head"},
               "image_size": [int(data["images"].shape[2]), int(data["images"].shape[1])], "split_by": "subject",
               "shifts": shifts, "sites": {}}
    for i, site in enumerate(sites):
        shift_name = shift_names[i % len(shift_names)] if shifts else "reference"
        shift = SHIFTS[shift_name]
        site_rng = np.random.default_rng([seed, i])
        site_dir = os.path.join(out_dir, site)
        os.makedirs(os.path.join(site_dir, "images"))
        os.makedirs(os.path.join(site_dir, "masks"))
        rows, refs, clipped, counts = [], [], 0, {}
        for split in sizes:
            subs = sorted(assigned[(site, split)])
            counts[split] = {"images": sum(len(by_subject[s]) for s in subs), "subjects": len(subs)}
            for s in subs:
                for idx in by_subject[s]:
                    img, mask, (fx, fy), cut = apply_shift(data["images"][idx], data["masks"][idx], shift, site_rng)
                    clipped += cut
                    path, mpath = f"images/{names[idx]}.png", f"masks/{names[idx]}.png"
                    Image.fromarray(img).save(os.path.join(site_dir, path))
                    Image.fromarray(mask).save(os.path.join(site_dir, mpath))
                    rows.append((path, mpath, split, s))
                    refs.append((path, f"{data['pixel_size_x_mm'][idx] * fx:.6f}",
                                 f"{data['pixel_size_y_mm'][idx] * fy:.6f}", f"{data['hc_mm'][idx]:.2f}"))
        with open(os.path.join(site_dir, "manifest.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "mask", "split", "patient_id"])
            writer.writerows(rows)
        with open(os.path.join(site_dir, "hc_reference.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "pixel_size_x_mm", "pixel_size_y_mm", "hc_mm"])
            writer.writerows(refs)
        summary["sites"][site] = {"shift": shift_name, "shift_description": shift.description,
                                  "contour_px": shift.contour_px, "zoom": shift.zoom,
                                  "heads_cut_by_depth_crop": int(clipped), **counts}
    with open(os.path.join(out_dir, "federation.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def format_summary(summary: dict) -> str:
    lines = ["| site | shift | train (images / subjects) | val | test |", "|---|---|---|---|---|"]
    for site, s in summary["sites"].items():
        cells = " | ".join(f"{s[k]['images']} / {s[k]['subjects']}" for k in ("train", "val", "test"))
        lines.append(f"| {site} | {s['shift']} | {cells} |")
    return "\n".join(lines)


def measure(state_root: str, federation: str, out_dir: str, view: str = "personalized") -> dict:
    """HC18's own clinical measure for a trained demo: each site's best export segments its test split
    (`fedopal predict`'s segment_predict), an ellipse is fitted to every predicted mask and to the site's own
    reference mask, and both head circumferences are compared with the sonographers' (hc_reference.csv, mm).
    Writes <out_dir>/hc.md and hc.json; returns the summary."""
    from fedopal.site.data import read_input_manifest
    from fedopal.site.export import load_exported
    from fedopal.site.masks import decode_mask
    from fedopal.site.segment_predict import predict_masks

    sites = sorted(d for d in os.listdir(federation) if os.path.isfile(os.path.join(federation, d, "manifest.csv")))
    out: dict = {"view": view, "sites": {}}
    for site in sites:
        model, cfg, _ = load_exported(os.path.join(state_root, site, "export", "best", view))
        manifest = os.path.join(federation, site, "manifest.csv")
        samples = [s for s in read_input_manifest(manifest, cfg.data.num_classes, cfg.data.class_names)
                   if s.split == "test"]
        rows = predict_masks(model, cfg, samples, os.path.join(out_dir, "masks", site))
        reference_csv = os.path.join(federation, site, "hc_reference.csv")
        relative = {os.path.relpath(s.path, os.path.join(federation, site)): s for s in samples}
        predicted = hc_errors({rel: np.asarray(Image.open(r["mask_written"])) for rel, r in
                               zip(relative, rows)}, reference_csv)
        drawn = hc_errors({rel: decode_mask(s.mask, 2)[0][0].numpy() for rel, s in relative.items()}, reference_csv)
        out["sites"][site] = {"dice": float(np.mean([r["dice"] for r in rows])),
                              "predicted": hc_summary(predicted), "site_masks": hc_summary(drawn)}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "hc.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(out_dir, "hc.md"), "w") as f:
        f.write(format_measure(out) + "\n")
    return out


def format_measure(summary: dict) -> str:
    lines = ["| site | test Dice (input grid) | HC error of the model, median / mean (mm) | HC error of the site's own "
             "masks, median (mm) | empty predictions |", "|---|---|---|---|---|"]
    for site, s in summary["sites"].items():
        p, d = s["predicted"], s["site_masks"]
        lines.append(f"| {site} | {s['dice']:.3f} | {p['median_abs_error_mm']:.1f} / {p['mean_abs_error_mm']:.1f} | "
                     f"{d['median_abs_error_mm']:.1f} | {p['n_empty']} of {p['n']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="the HC18 training set -> the small .npz (run once; the result is committed)")
    b.add_argument("--src", required=True, help="folder with training_set/ and " + CSV_NAME)
    b.add_argument("--out", default="data/hc18/hc18_small.npz")
    fed = sub.add_parser("federation", help="the segmentation demo federation from the bundle")
    fed.add_argument("--npz", default="data/hc18/hc18_small.npz")
    fed.add_argument("--out", default="data/demo_federation_seg")
    fed.add_argument("--sites", type=int, default=4)
    fed.add_argument("--seed", type=int, default=0)
    fed.add_argument("--train-per-site", type=int, default=60)
    fed.add_argument("--val-per-site", type=int, default=20)
    fed.add_argument("--test-per-site", type=int, default=40)
    fed.add_argument("--no-shifts", action="store_true", help="every site's images and masks as bundled")
    m = sub.add_parser("measure", help="head circumference (mm) of a trained demo's test predictions, per site")
    m.add_argument("--state", required=True, help="the job's site-state root (<workspace>/<job>_site_state)")
    m.add_argument("--federation", default="data/demo_federation_seg")
    m.add_argument("--out", default="results/demo_seg")
    m.add_argument("--view", default="personalized", choices=("personalized", "global_only"))
    args = p.parse_args(argv)
    try:
        if args.command == "measure":
            print(format_measure(measure(args.state, args.federation, args.out, args.view)))
            return 0
        if args.command == "bundle":
            print(json.dumps(build_bundle(args.src, args.out), indent=2))
            return 0
        summary = build_federation(args.npz, args.out, args.sites, args.seed, args.train_per_site,
                                   args.val_per_site, args.test_per_site, shifts=not args.no_shifts)
    except (FileNotFoundError, ValueError) as err:
        print(f"hc18: {err}", file=sys.stderr)
        return 2
    print(f"Segmentation federation written to {args.out} ({args.sites} sites, split by subject):")
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
