"""Segmentation end to end on real data: HC18 sites (fetal-head ultrasound, sonographers' ellipses) in the FLARE
simulator, then `fedopal predict` on a site's test split and HC18's head-circumference measure; the three real NRRD
tumour volumes (pyradiomics) through validate, training and a NIfTI mask written on the input's own grid."""

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedopal.config import config_from_dict
from fedopal.site.predict import main as predict_main
from fedopal.tools.hc18 import build_federation, measure
from fedopal.tools.job import simulate
from fedopal.tools.report import summarize

from conftest import REPO

pytestmark = pytest.mark.slow
TINY_VIT = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 3}


def test_hc18_federation_trains_in_the_simulator_and_predicts_masks(tmp_path):
    fed = tmp_path / "fed"
    build_federation(f"{REPO}/data/hc18/hc18_small.npz", str(fed), num_sites=2, seed=0, train_per_site=8,
                     val_per_site=4, test_per_site=6)
    cfg = config_from_dict({
        "name": "fedopal_seg_test",
        "data": {"task": "segmentation", "root": str(fed), "image_size": 32, "batch_size": 4,
                 "class_names": ["background", "head"]},
        "model": {"backbone": "unetr", "pretrained": False, "lora_rank": 4, "vit": TINY_VIT},
        "train": {"method": "fedopal_w", "num_rounds": 2, "local_steps": 2, "lr": 0.005},
        "federation": {"num_sites": 2},
    })
    job_ws = simulate(cfg, str(tmp_path / "ws"))
    summary = summarize(job_ws, cfg, 0.0)
    assert [r["rounds"] for r in summary["sites"]] == [2, 2]
    assert all(0.0 <= r["dice_personalized"] <= 1.0 for r in summary["sites"])
    assert "| site | best val round | Dice personalized |" in summary["markdown"]
    with open(os.path.join(job_ws, "server", "simulate_job", "app_server", "fedopal_updates.jsonl")) as f:
        received = [json.loads(line) for line in f]
    # the decoder is fedopal_w's personal head: only the global adapter travels
    assert len(received) == 4 and all(r["accepted"] for r in received)
    assert not any(k.startswith("head.") or ".personal." in k for r in received for k in r["keys"])

    # predict with the site's best export: one PNG mask per test image, on the image's own grid, Dice per file
    state = os.path.join(str(tmp_path / "ws"), "fedopal_seg_test_site_state")
    out = tmp_path / "pred.csv"
    assert predict_main(["--model", os.path.join(state, "site-1", "export", "best", "personalized"),
                         "--manifest", str(fed / "site-1" / "manifest.csv"), "--split", "test",
                         "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 6
    for row in rows:
        written, image = np.asarray(Image.open(row["mask_written"])), np.asarray(Image.open(row["path"]))
        assert written.shape == image.shape and set(np.unique(written)) <= {0, 1}
        reference = np.asarray(Image.open(row["reference"])) > 0
        predicted = written > 0
        expected = 2 * (predicted & reference).sum() / max(predicted.sum() + reference.sum(), 1)
        assert float(row["dice"]) == pytest.approx(expected, abs=1e-5)  # numpy's Dice on the written files

    # HC18's own measure over both sites: an ellipse per predicted mask, in mm
    hc = measure(state, str(fed), str(tmp_path / "hc"))
    assert set(hc["sites"]) == {"site-1", "site-2"}
    assert os.path.isfile(tmp_path / "hc" / "hc.md")

    # a late joiner (site-2's data as a new site) from the federation's global model: its own decoder + adapter
    from fedopal.site.latejoin import main as latejoin_main

    global_model = os.path.join(job_ws, "server", "simulate_job", "app_server", "FL_global_model.pt")
    config = tmp_path / "seg.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    assert latejoin_main(["--global-model", global_model, "--site-dir", str(fed / "site-2"), "--out",
                          str(tmp_path / "late"), "--config", str(config), "--set", "train.num_rounds=1"]) == 0
    records = [json.loads(line) for line in open(tmp_path / "late" / "metrics.jsonl")]
    assert records[-1]["method"] == "late_join" and "personalized/test/dice" in records[-1]


def test_real_nrrd_tumour_volumes_validate_train_and_predict_on_their_own_grid(tmp_path):
    from fedopal.model.adapters import build_model
    from fedopal.site.data import build_datasets
    from fedopal.site.segment_predict import predict_masks
    from fedopal.site.train import SiteTrainer
    from fedopal.site.validate import inspect_site
    from fedopal.specs.methods import get_method

    cases = f"{REPO}/data/pyradiomics_cases"
    site = tmp_path / "site-1"
    site.mkdir()
    (site / "manifest.csv").write_text("path,mask,split\n" + "".join(
        f"{cases}/{name}_image.nrrd,{cases}/{name}_label.nrrd,{split}\n"
        for name, split in (("brain1", "train"), ("breast1", "val"), ("lung1", "test"))))
    cfg = config_from_dict({
        "data": {"task": "segmentation", "root": str(tmp_path), "spatial_dims": 3, "image_size": 32,
                 "orientation": "RAS", "batch_size": 1, "augment": False, "class_names": ["background", "tumour"]},
        "model": {"backbone": "unetr", "pretrained": False, "lora_rank": 4, "vit": TINY_VIT},
        "train": {"method": "fedavg_lora", "local_steps": 1},
        "federation": {"num_sites": 1}})
    check = inspect_site(cfg, "site-1")
    assert not check.problems.items, check.problems.items  # image and label share grid and affine
    assert check.mask_classes["test"][1] == 1  # lung1's label holds the tumour
    model = build_model(cfg, get_method("fedavg_lora"), "site-1")
    datasets = build_datasets(cfg.data, check.samples, 1, None)
    SiteTrainer(model, datasets, cfg.train, 1).train_round()
    rows = predict_masks(model, cfg, [s for s in check.samples if s.split == "test"], str(tmp_path / "masks"))
    written = nib.load(rows[0]["mask_written"])
    import nrrd

    data, header = nrrd.read(f"{cases}/lung1_image.nrrd")
    assert written.shape == data.shape  # the input's own grid, not the model's 32^3
    # the NRRD's geometry in RAS from its own header (space directions are columns, LPS flips x and y)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    directions = np.asarray(header["space directions"], dtype=np.float64).T
    expected = np.eye(4)
    expected[:3, :3] = lps_to_ras @ directions
    expected[:3, 3] = lps_to_ras @ np.asarray(header["space origin"], dtype=np.float64)
    np.testing.assert_allclose(written.affine, expected, atol=1e-4)
    assert 0.0 <= rows[0]["dice"] <= 1.0 and "volume_mm3/tumour" in rows[0]
