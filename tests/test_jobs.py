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

COMMITTED = {"fedopal_demo": "app_configs/demo.yaml", "fedopal_3d": "app_configs/demo_3d.yaml",
             "fedopal_demo_seg": "app_configs/demo_seg.yaml"}
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


SERVER_SIDE = r"""
import importlib, json, sys
import numpy as np

def build(node):
    # what FLARE's configurator does with a job config: a dict naming a class path is built, its args first
    if isinstance(node, dict):
        path = node.get("path") or node.get("class_path")
        args = {k: build(v) for k, v in node.get("args", {}).items()} if path else None
        if path:
            module, name = path.rsplit(".", 1)
            return getattr(importlib.import_module(module), name)(**args)
        return {k: build(v) for k, v in node.items()}
    if isinstance(node, list):
        return [build(v) for v in node]
    return node

server = json.load(open(sys.argv[1]))
controller = build(server["workflows"][0])
persistor = build(next(c for c in server["components"] if c["id"] == "persistor"))
build(next(c for c in server["components"] if c["id"] == "fedopal_wire_recorder"))
shared = persistor.model.state_dict()
aggregator = controller.aggregator
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
for site, fill in (("a", 1.0), ("b", 3.0)):
    aggregator.accept_model(FLModel(params={k: np.full(tuple(v.shape), fill, np.float32) for k, v in shared.items()},
                                    params_type=ParamsType.DIFF, meta={"client_name": site}))
mean = aggregator.aggregate_model()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("peft", "monai", "transformers", "efficientnet_lite_pytorch")
                or m.startswith(("fedopal.model", "fedopal.site")))
print(json.dumps({"keys": sorted(shared), "mean": sorted({float(v.flat[0]) for v in mean.params.values()}),
                  "loaded": loaded}))
"""


def test_the_server_side_of_a_job_runs_without_the_foundation_model(tmp_path):
    """The job's server components, built from its exported config as FLARE builds them, in a fresh process, with the
    model's checkpoint deleted: they load the shared tensors the job carries, average updates, and import no model
    code (no peft, MONAI or transformers)."""
    import torch

    from fedopal.model.adapters import build_model
    from fedopal.specs.methods import get_method

    from conftest import tiny_config

    cfg = tiny_config().model_copy(deep=True)
    checkpoint = tmp_path / "backbone.pt"  # the foundation model: at the sites, not on the server
    from fedopal.model.backbones import build_backbone

    torch.save(build_backbone(cfg).module.net.state_dict(), checkpoint)  # MONAI ViT's own keys
    cfg.model.checkpoint = str(checkpoint)
    cfg.train.method = "fedopal_w"
    cfg.federation.aggregation_weights = "equal"
    job = export_both(cfg, str(tmp_path / "jobs"))[0]
    expected = sorted(build_model(cfg, get_method("fedopal_w", cfg.model.head)).shared_state())
    checkpoint.unlink()
    proc = subprocess.run([sys.executable, "-c", SERVER_SIDE, os.path.join(job, "app", "config",
                                                                          "config_fed_server.json")],
                          capture_output=True, text=True, env=dict(os.environ), cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["keys"] == expected and out["mean"] == [2.0]  # equal weights: (1 + 3) / 2
    assert out["loaded"] == []
