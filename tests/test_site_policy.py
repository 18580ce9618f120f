"""`fedopal site-policy`: a site's rules in its real (provisioned) startup kit; the allow-list covers every class a
FedOPAL job names."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from fedopal.policy.install import FEDOPAL_JOB_CLASSES, NOT_ALLOWED
from fedopal.tools.job import export_job

from conftest import REPO, tiny_config


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    """The consortium of poc_setup/project.yml, provisioned by NVFlare itself: one startup kit per participant."""
    out = tmp_path_factory.mktemp("provision")
    proc = subprocess.run([sys.executable, "-m", "nvflare.cli", "provision", "-p",
                           os.path.join(REPO, "poc_setup", "project.yml"), "-w", str(out)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (prod,) = glob.glob(str(out / "fedopal" / "prod_*"))
    return prod


def site_policy(*args):
    return subprocess.run([sys.executable, "-m", "fedopal", "site-policy", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120)


def test_a_hospital_installs_its_policy_allow_list_and_no_byoc(kits):
    kit = os.path.join(kits, "hospital-a")
    proc = site_policy(kit, "--policy", os.path.join(REPO, "poc_setup", "site_privacy.json"), "--deny-byoc")
    assert proc.returncode == 0, proc.stderr
    local = os.path.join(kit, "local")
    assert json.load(open(os.path.join(local, "privacy.json"))) == json.load(open(
        os.path.join(REPO, "poc_setup", "site_privacy.json")))
    resources = json.load(open(os.path.join(local, "resources.json")))
    default = json.load(open(os.path.join(local, "resources.json.default")))
    assert set(FEDOPAL_JOB_CLASSES) <= set(resources["class_allow_list"])
    assert not set(NOT_ALLOWED) & set(resources["class_allow_list"])
    assert resources["allow_log_streaming"] is False and default["allow_log_streaming"] is True
    assert {k: v for k, v in resources.items() if k not in ("class_allow_list", "allow_log_streaming")} == \
        {k: v for k, v in default.items() if k not in ("class_allow_list", "allow_log_streaming")}
    authz = json.load(open(os.path.join(local, "authorization.json")))["permissions"]
    before = json.load(open(os.path.join(local, "authorization.json.default")))["permissions"]
    assert all(rights["byoc"] == "none" for rights in authz.values())
    assert authz["lead"] == {**before["lead"], "byoc": "none"}  # every other right as it was
    assert authz["project_admin"]["submit_job"] == "any"


def test_the_server_kit_gets_the_allow_list_only(kits):
    kit = os.path.join(kits, "fedopal-server.example.org")
    assert site_policy(kit).returncode == 0
    local = os.path.join(kit, "local")
    assert not os.path.exists(os.path.join(local, "privacy.json"))
    resources = json.load(open(os.path.join(local, "resources.json")))
    assert set(FEDOPAL_JOB_CLASSES) <= set(resources["class_allow_list"])
    assert resources.get("allow_log_streaming") is not False  # the server keeps its own setting


def test_a_policy_with_a_typo_is_refused_in_one_line_and_nothing_is_written(kits, tmp_path):
    kit = os.path.join(kits, "hospital-b")
    policy = json.load(open(os.path.join(REPO, "poc_setup", "site_privacy.json")))
    policy["components"][0]["args"]["allow_groups"] = ["global.a"]
    bad = tmp_path / "privacy.json"
    bad.write_text(json.dumps(policy))
    proc = site_policy(kit, "--policy", str(bad))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown tensor group" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(os.path.join(kit, "local", "privacy.json"))
    assert site_policy(os.path.join(kits, "no-such-kit"), "--policy", str(bad)).returncode == 2


@pytest.mark.parametrize("overrides", [{}, {"privacy": {"noise_multiplier": 1.0}},
                                        {"federation": {"quantization": "float16", "cross_site_eval": True}}])
def test_every_class_a_fedopal_job_names_is_allowed(tmp_path, overrides):
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    from fedopal.config import config_from_dict

    raw = tiny_config().model_dump(mode="json")
    for section, values in overrides.items():
        raw[section].update(values)
    job = export_job(config_from_dict(raw), str(tmp_path))
    text = "".join(open(p).read() for p in glob.glob(os.path.join(job, "*", "config", "*.json")))
    named = set(re.findall(r'"(?:class_)?path": "([\w.]+)"', text))
    allowed = (set(DEFAULT_CLASS_ALLOW_LIST) - set(NOT_ALLOWED)) | set(FEDOPAL_JOB_CLASSES)
    assert named and named <= allowed, named - allowed
