"""The committed job folders are exactly what the job builder exports (no drift), and hold no local paths."""

import filecmp
import glob
import json
import os
import subprocess
import sys

import pytest

from fedopal.config import load_config
from fedopal.tools.job import config_of_job, export_both, glob_files
from fedopal.tools.job import main as job_main

from conftest import REPO

COMMITTED = {"fedopal_demo": "app_configs/demo.yaml", "fedopal_3d": "app_configs/demo_3d.yaml"}
FLAVORS = {"": "no-code", "_code": "code"}


def _tree(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if not f.endswith(".pyc")]
    return sorted(out)


@pytest.mark.parametrize("job,config", COMMITTED.items())
def test_committed_jobs_match_a_fresh_export_in_both_flavors(tmp_path, job, config):
    fresh_jobs = export_both(load_config(os.path.join(REPO, config)), str(tmp_path))
    for fresh, suffix in zip(fresh_jobs, FLAVORS):
        committed = os.path.join(REPO, "jobs", job + suffix)
        assert os.path.basename(fresh) == job + suffix
        assert _tree(fresh) == _tree(committed), "file list drifted: run `make export` and commit jobs/"
        for rel in _tree(fresh):
            assert filecmp.cmp(os.path.join(fresh, rel), os.path.join(committed, rel), shallow=False), (
                f"jobs/{job + suffix}/{rel} drifted: run `make export` and commit jobs/")


@pytest.mark.parametrize("job", [j + s for j in COMMITTED for s in FLAVORS])
def test_job_holds_no_path_of_this_machine(job):
    for rel in _tree(os.path.join(REPO, "jobs", job)):
        text = open(os.path.join(REPO, "jobs", job, rel)).read()
        assert REPO not in text and "/tmp/" not in text, rel


@pytest.mark.parametrize("job", COMMITTED)
def test_the_no_code_job_is_configuration_only_and_the_code_job_ships_only_what_runs(job):
    no_code, code = os.path.join(REPO, "jobs", job), os.path.join(REPO, "jobs", job + "_code")
    assert glob_files(no_code, "custom") == [] and not glob.glob(os.path.join(no_code, "*", "custom"))
    shipped = {os.path.relpath(p, "app/custom") for p in glob_files(code, "custom")}
    assert "fedopal/site/client.py" in shipped and "fedopal/__init__.py" in shipped
    assert not any(p.startswith(("fedopal/tools/", "fedopal/cli")) for p in shipped)  # never the tools
    # the same job: the same config, the same server and site components (the code job's name says its flavor)
    assert config_of_job(code).model_copy(update={"name": job}) == config_of_job(no_code)


def test_job_cli_rejects_a_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  num_rounds: 0\n")
    proc = subprocess.run([sys.executable, "-m", "fedopal.tools.job", "--config", str(bad), "--export", str(tmp_path)],
                          capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "'train.num_rounds'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_exported_job_can_continue_an_aborted_one(tmp_path):
    import json

    import torch

    ckpt = tmp_path / "FL_global_model.pt"
    torch.save({"model": {}, "meta_props": {"current_round": 2}}, ckpt)
    cfg = load_config(os.path.join(REPO, "app_configs", "demo.yaml"), {"train.num_rounds": 6})
    from fedopal.tools.job import main as job_main

    assert job_main(["--config", os.path.join(REPO, "app_configs", "demo.yaml"), "--set", "train.num_rounds=6",
                     "--export", str(tmp_path / "jobs"), "--resume-from", str(ckpt)]) == 0
    server = json.load(open(tmp_path / "jobs" / cfg.name / "app" / "config" / "config_fed_server.json"))
    assert "--resume-round 2" in json.dumps(json.load(open(tmp_path / "jobs" / cfg.name / "app" / "config" /
                                                           "config_fed_client.json")))
    controller = server["workflows"][0]["args"]
    assert controller["start_round"] == 3 and controller["num_rounds"] == 3
    assert str(ckpt) in json.dumps(server)
    assert job_main(["--config", os.path.join(REPO, "app_configs", "demo.yaml"), "--export", str(tmp_path / "j2"),
                     "--resume-from", str(tmp_path / "missing.pt")]) == 2


def test_a_consortium_job_in_one_command(tmp_path):
    """Three named hospitals: the exported job's site list, min_clients and data root fit; jobs/ is not touched."""
    committed = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(REPO, "jobs", "**"), recursive=True)}
    assert job_main(["--config", os.path.join(REPO, "app_configs", "demo.yaml"), "--sites", "hospital-a",
                     "hospital-b", "hospital-c", "--data-root", "/srv/fedopal/data", "--set", "name=consortium",
                     "--export", str(tmp_path)]) == 0
    for name in ("consortium", "consortium_code"):
        meta = json.load(open(tmp_path / name / "meta.json"))
        assert meta["min_clients"] == 3
        # --sites is the deploy map: the server and exactly these hospitals, never @ALL (a fourth would join)
        assert meta["deploy_map"] == {"app": ["server", "hospital-a", "hospital-b", "hospital-c"]}
        shipped = config_of_job(str(tmp_path / name))
        assert shipped.federation.site_names == ["hospital-a", "hospital-b", "hospital-c"]
        assert shipped.federation.num_sites == 3 and shipped.data.root == "/srv/fedopal/data"
    assert {p: os.path.getmtime(p) for p in committed} == committed


def test_site_names_and_num_sites_cannot_disagree(tmp_path, capsys):
    assert job_main(["--config", os.path.join(REPO, "app_configs", "demo.yaml"), "--set",
                     "federation.site_names=[a, b]", "--export", str(tmp_path)]) == 2
    assert "federation.num_sites is 4 but federation.site_names lists 2 sites" in capsys.readouterr().err
    assert not os.listdir(tmp_path)
