"""HC18 segmentation data: head circumference from masks (real annotations, analytic ellipse) and the federation."""

import csv
import hashlib
import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from scipy.special import ellipe

from fedopal.tools.hc18 import build_federation, ellipse_circumference_mm, hc_errors, hc_summary, hc_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(ROOT, "data", "hc18", "hc18_small.npz")


def test_bundle_masks_give_the_sonographers_head_circumference():
    """The committed small filled masks vs the CSV's HC (an independent measurement: the challenge's reference from
    the full-resolution ellipse parameters). Over all 999 frames: median 1.12 mm, 95th percentile 2.16 mm, max 3.9 mm
    (data/hc18/README.md); here 40 frames spread over the set."""
    with np.load(BUNDLE) as z:
        assert z["images"].shape == z["masks"].shape == (999, 86, 128)
        assert len(set(z["subjects"].tolist())) == 806
        assert set(np.unique(z["masks"]).tolist()) == {0, 1}
        idx = np.linspace(0, 998, 40).astype(int)
        est = np.array([ellipse_circumference_mm(z["masks"][i], (z["pixel_size_x_mm"][i], z["pixel_size_y_mm"][i]))
                        for i in idx])
        err = np.abs(est - z["hc_mm"][idx])
    assert np.median(err) < 2.0 and err.max() < 5.0, err


@pytest.mark.parametrize("a,b", [(40.0, 40.0), (60.0, 25.0), (80.0, 12.0)])
def test_circumference_of_a_rasterized_ellipse(a, b):
    """Semi-axes a, b (mm) drawn at 0.1 mm (x) x 0.125 mm (y) pixels, rotated 30 degrees; the exact perimeter is the
    complete elliptic integral of the second kind, 4 a E(1 - b^2/a^2) (not Ramanujan's formula the code uses)."""
    sx, sy = 0.1, 0.125
    h, w = int(2.2 * a / sy), int(2.2 * a / sx)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    x, y = (xx - w / 2) * sx, (yy - h / 2) * sy
    t = math.radians(30)
    u, v = x * math.cos(t) + y * math.sin(t), -x * math.sin(t) + y * math.cos(t)
    mask = ((u / a) ** 2 + (v / b) ** 2 <= 1.0).astype(np.uint8)
    exact = 4.0 * a * ellipe(1.0 - (b / a) ** 2)
    assert ellipse_circumference_mm(mask, (sx, sy)) == pytest.approx(exact, rel=0.005)
    # a speck elsewhere does not count: the largest component
    mask[0:3, 0:3] = 1
    assert ellipse_circumference_mm(mask, (sx, sy)) == pytest.approx(exact, rel=0.005)


def test_empty_mask_is_nan():
    assert math.isnan(ellipse_circumference_mm(np.zeros((10, 12), np.uint8), (1.0, 1.0)))


def _tree_digest(root) -> str:
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, root).encode())
            digest.update(open(path, "rb").read())
    return digest.hexdigest()


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_federation_splits_by_subject_with_label_maps_and_shifts(tmp_path):
    out = tmp_path / "fed"
    summary = build_federation(BUNDLE, str(out), num_sites=4, seed=0, train_per_site=6, val_per_site=2,
                               test_per_site=4)
    assert json.load(open(out / "federation.json")) == json.loads(json.dumps(summary))
    where = {}
    with np.load(BUNDLE) as z:
        bundled = {n: item for n, *item in zip(z["names"].tolist(), z["masks"], z["hc_mm"], z["pixel_size_x_mm"])}
    for site, info in summary["sites"].items():
        rows = _rows(out / site / "manifest.csv")
        assert list(rows[0]) == ["path", "mask", "split", "patient_id"]
        assert {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")} == \
            {"train": 6, "val": 2, "test": 4}
        for r in rows:
            assert where.setdefault(r["patient_id"], (site, r["split"])) == (site, r["split"]), r
            assert os.path.basename(r["path"]).startswith(r["patient_id"] + "_")
            img, mask = Image.open(out / site / r["path"]), Image.open(out / site / r["mask"])
            assert img.mode == "L" and img.size == mask.size == (128, 86)
            m = np.array(mask)
            assert set(np.unique(m).tolist()) <= {0, 1} and m.any()
        ref = _rows(out / site / "hc_reference.csv")
        assert [r["path"] for r in ref] == [r["path"] for r in rows]
        for r in ref:
            assert float(r["hc_mm"]) == pytest.approx(bundled[os.path.basename(r["path"])[:-4]][1], abs=0.01)

        # contouring conventions: the same frame's mask is larger (dilated) or smaller (eroded) than the bundle's
        area = sum(int(np.array(Image.open(out / site / r["mask"])).sum()) for r in rows)
        bundle_area = sum(int(bundled[os.path.basename(r["mask"])[:-4]][0].sum()) for r in rows)
        if info["contour_px"] > 0:
            assert area > 1.1 * bundle_area
        elif info["contour_px"] < 0:
            assert area < 0.97 * bundle_area
        elif info["zoom"] == 1.0:
            assert area == bundle_area
        else:  # depth: zoomed in, the head covers more pixels, and each pixel is smaller
            assert area > 1.15 * bundle_area
            for r in ref:
                assert float(r["pixel_size_x_mm"]) == pytest.approx(
                    bundled[os.path.basename(r["path"])[:-4]][2] * 111 / 128, rel=1e-5)

        # the HC helper on the site's own masks: unshifted masks give the reference back
        masks = {r["mask"]: np.array(Image.open(out / site / r["mask"])) for r in rows}
        errs = hc_errors(masks, str(out / site / "hc_reference.csv"))
        assert len(errs) == len(rows)
        table = hc_table(str(out / site / "masks"), str(out / site / "hc_reference.csv"))
        assert table["median_abs_error_mm"] == pytest.approx(hc_summary(errs)["median_abs_error_mm"])
        if info["contour_px"] == 0:
            assert table["median_abs_error_mm"] < 4.0, (site, table)
        elif info["contour_px"] > 0:
            assert np.median([e["hc_pred_mm"] - e["hc_ref_mm"] for e in errs]) > 0
    assert [s["shift"] for s in summary["sites"].values()][0] == "reference"

    again = tmp_path / "again"
    build_federation(BUNDLE, str(again), num_sites=4, seed=0, train_per_site=6, val_per_site=2, test_per_site=4)
    assert _tree_digest(out) == _tree_digest(again)
    other = tmp_path / "other"
    build_federation(BUNDLE, str(other), num_sites=4, seed=1, train_per_site=6, val_per_site=2, test_per_site=4)
    assert _rows(other / "site-1" / "manifest.csv") != _rows(out / "site-1" / "manifest.csv")


def test_too_many_images_per_site_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="too few subjects"):
        build_federation(BUNDLE, str(tmp_path / "fed"), num_sites=4, train_per_site=300)
