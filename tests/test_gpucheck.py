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
