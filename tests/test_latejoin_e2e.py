"""End to end in the real FLARE simulator: every site exports its models; the exports predict from the command line;
a third site that never trained joins from the server's FL_global_model.pt."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedopal.site.export import ADAPTERS, MANIFEST, MERGED
from fedopal.tools.job import simulate
from fedopal.site.latejoin import main as latejoin_main
from fedopal.tools.prepare import build_federation
from fedopal.site.state import read_metrics, simulation_state_root

from conftest import NPZ, REPO, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """3 sites on disk, the federation trains on site-1 and site-2 (2 rounds, merged copies on); site-3 is new."""
    root = tmp_path_factory.mktemp("fed3")
    build_federation(NPZ, str(root), num_sites=3, seed=2, train_per_site=48, val_per_site=16, test_per_site=16,
                     min_test_per_class=6, min_val_per_class=4)
    cfg = tiny_config(root, method="fedopal_w")
    cfg.export.merged = True
    job_ws = simulate(cfg, str(tmp_path_factory.mktemp("sim")))
    return cfg, root, job_ws, simulation_state_root(job_ws)


def run(module, *args):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


def test_every_site_exports_its_last_and_best_models_each_round(finished_job):
    cfg, _, _, state_root = finished_job
    for site in ("site-1", "site-2"):
        export = os.path.join(state_root, site, "export")
        records = read_metrics(os.path.join(state_root, site))
        for view in ("personalized", "global_only"):
            last = json.load(open(os.path.join(export, "last", view, MANIFEST)))
            best = json.load(open(os.path.join(export, "best", view, MANIFEST)))
            assert last["round"] == cfg.train.num_rounds == last["total_rounds"]  # counted from 1
            assert os.path.isfile(os.path.join(export, "last", view, MERGED))
            best_round = max(records, key=lambda r: r[f"{view}/val/balanced_accuracy"])["round"]
            assert best["round"] == best_round and best["site"] == site  # both from 1
            assert best["metrics"]["test/balanced_accuracy"] == records[best_round - 1][f"{view}/test/balanced_accuracy"]


def test_the_best_export_predicts_the_test_metrics_the_site_recorded(finished_job, tmp_path):
    _, root, _, state_root = finished_job
    best = os.path.join(state_root, "site-1", "export", "best", "personalized")
    manifest = json.load(open(os.path.join(best, MANIFEST)))
    # the merged copy, from the command line (tests/test_predict.py covers the adapter model in-process)
    proc = run("fedopal.site.predict", "--model", best, "--manifest", root / "site-1" / "manifest.csv", "--split", "test",
               "--out", tmp_path / "pred.csv", "--merged")
    assert proc.returncode == 0, proc.stderr
    printed = float(re.search(r"balanced accuracy ([0-9.]+)", proc.stdout).group(1))
    assert printed == pytest.approx(manifest["metrics"]["test/balanced_accuracy"], abs=1e-3)


def test_a_new_site_joins_from_the_servers_global_model(finished_job, tmp_path, capsys):
    cfg, root, job_ws, _ = finished_job
    global_path = os.path.join(job_ws, "server", "simulate_job", "app_server", "FL_global_model.pt")
    config = tmp_path / "federation.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "site-3"
    proc = run("fedopal.site.latejoin", "--global-model", global_path, "--config", config, "--site-dir", root / "site-3",
               "--out", out)
    assert proc.returncode == 0, proc.stderr
    server = torch.load(global_path, map_location="cpu", weights_only=True)["model"]
    joined = load_file(os.path.join(out, "export", "best", "personalized", ADAPTERS))
    global_keys = [k for k in server if ".global." in k]
    assert global_keys and all(torch.equal(joined[k], server[k]) for k in global_keys)
    # a damaged global model stops with one line, and nothing is written
    damaged = tmp_path / "FL_global_model.pt"
    damaged.write_bytes(open(global_path, "rb").read()[:1000])
    code = latejoin_main(["--global-model", str(damaged), "--config", str(config), "--site-dir",
                          str(root / "site-3"), "--out", str(tmp_path / "other")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a readable torch file" in err and len(err.splitlines()) == 1
    assert not glob.glob(str(tmp_path / "other"))
