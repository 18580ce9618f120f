"""End to end in 3D: real NIfTI sites, tiny MONAI ViT 3D, 2 sites, 2 rounds in the FLARE simulator."""

import json
import os

import pytest

from fedopal.config import config_from_dict
from fedopal.tools.job import simulate
from fedopal.tools.prepare import build_federation
from fedopal.tools.report import summarize

from conftest import REPO

pytestmark = pytest.mark.slow


def test_3d_job_runs_on_nifti_sites(tmp_path):
    build_federation(f"{REPO}/data/medmnist/adrenalmnist3d.npz", str(tmp_path / "fed"), num_sites=2, seed=0,
                     train_per_site=24, val_per_site=8, test_per_site=8, min_test_per_class=4,
                     min_val_per_class=3, skew_prior="global")
    cfg = config_from_dict({
        "name": "fedopal_3d_test",
        "data": {"root": str(tmp_path / "fed"), "spatial_dims": 3, "image_size": 16, "batch_size": 8},
        "model": {"backbone": "monai_vit", "pretrained": False, "lora_rank": 4,
                  "vit": {"patch_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 3}},
        "train": {"method": "fedopal_r", "num_rounds": 2, "local_steps": 2, "class_weights": "balanced"},
        "federation": {"num_sites": 2},
    })
    job_ws = simulate(cfg, str(tmp_path / "ws"))
    summary = summarize(job_ws, cfg, 0.0)
    assert [r["rounds"] for r in summary["sites"]] == [2, 2]
    with open(os.path.join(job_ws, "server", "simulate_job", "app_server", "fedopal_updates.jsonl")) as f:
        received = [json.loads(line) for line in f]
    assert len(received) == 4 and all(r["accepted"] for r in received)
    assert not any(".personal." in k for r in received for k in r["keys"])
