"""`make gpu-check` rots unless it runs: its --smoke mode runs the same code on the CPU with a tiny ViT."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_runs_every_part_and_writes_its_summary(tmp_path):
    env = {**os.environ, "FEDOPAL_HOME": REPO}
    proc = subprocess.run([sys.executable, "-m", "fedopal.tools.gpucheck", "--smoke", "--device", "cpu", "--out",
                           str(tmp_path)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "summary.json"))
    assert set(summary["loops"]) == {"fedavg_lora", "dual_lora", "fedopal_w", "fedopal_r"}
    for by_batch in summary["loops"].values():
        assert set(by_batch) == {"4", "8"}
        for row in by_batch.values():
            assert row["bare_img_per_s"] > 0 and row["site_img_per_s"] > 0
            assert row["ratio"] == pytest.approx(row["site_img_per_s"] / row["bare_img_per_s"], abs=1e-3)
    sites = summary["simulator"]["sites"]
    assert sorted(sites) == ["site-1", "site-2"]
    assert all(s["device"].startswith("cpu") and len(s["round_wall_s"]) == 2 for s in sites.values())
    assert "| fedopal_r | 8 |" in proc.stdout and "lowest (b)/(a)" in proc.stdout
    seg = summary["seg3d"]["unetr"]  # (d): 3D segmentation, the tiny UNETR at 16³
    assert seg["bare_voxels_per_s"] > 0 and seg["site_voxels_per_s"] > 0 and seg["patch"] == "16³"
    assert seg["ratio"] == pytest.approx(seg["site_voxels_per_s"] / seg["bare_voxels_per_s"], abs=2e-3)
    assert summary["min_ratio"] <= seg["ratio"] and "| unetr | 16³ | 2 |" in proc.stdout


@pytest.mark.parametrize("backbone", ["unetr", "swin_unetr"])
def test_the_bare_3d_segmentation_loop_trains_what_the_site_trains(backbone):
    """(d)'s bare MONAI + peft network adapts the same encoder layers and trains as many parameters as FedOPAL's
    model (tiny sizes, built only: the GPU run's networks differ in width, not in structure)."""
    from fedopal.model.adapters import build_model
    from fedopal.specs.methods import get_method
    from fedopal.tools.gpucheck import seg3d_config
    from fedopal.tools.perf import _lora_layers, bare_seg_net

    cfg = seg3d_config(backbone, 64, 2, "cpu", "bf16", smoke=True)
    bare, site = bare_seg_net(cfg), build_model(cfg, get_method("fedopal_w", "personal"), "site-1")
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (bare, site)]
    assert trainable[0] == trainable[1] > 0
    assert len(_lora_layers(bare)) == len(list(site.lora_layers())) > 0
    assert all(set(layer.lora_A) == {"global", "personal"} for _, layer in _lora_layers(bare))
