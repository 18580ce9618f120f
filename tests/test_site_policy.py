"""`fedopal site-policy`: a site's rules in its real (provisioned) startup kit; the allow-list covers every class a
FedOPAL job names."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from fedopal.policy.install import FEDOPAL_JOB_CLASSES, NOT_ALLOWED, shipped_policy
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
    proc = site_policy(kit, "--policy", "global-only", "--deny-byoc")
    assert proc.returncode == 0, proc.stderr
    local = os.path.join(kit, "local")
    assert json.load(open(os.path.join(local, "privacy.json"))) == json.load(open(shipped_policy("global-only")))
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


def _typo(path, edit):
    policy = json.load(open(shipped_policy("global-only")))
    edit(policy)
    with open(path, "w") as f:
        json.dump(policy, f)
    return str(path)


TYPOS = {
    "unknown tensor group": lambda p: p["components"][0]["args"].update(allow_groups=["global.a"]),
    "no class 'fedopal.policy.enforcer.WireContractEnforcr'": lambda p: p["components"][0].update(
        path="fedopal.policy.enforcer.WireContractEnforcr"),
    "no class 'fedopal.policy.filters.TensorGroupFiltr'": lambda p: p["scopes"][0]["task_result_filters"][0].update(
        path="fedopal.policy.filters.TensorGroupFiltr"),
    "unknown key(s) ['component']": lambda p: p.update(component=p.pop("components")),
    "unexpected keyword argument 'alow'": lambda p: p["scopes"][0]["task_result_filters"][0].update(
        args={"alow": ["global.A"]}),
    "default_scope 'fedopl' names no scope": lambda p: p.update(default_scope="fedopl"),
    "require_dp must be true or false": lambda p: p["components"][0]["args"].update(require_dp="false"),
}


@pytest.mark.parametrize("needle", TYPOS)
def test_a_policy_with_a_typo_is_refused_in_one_line_and_nothing_is_written(kits, tmp_path, needle):
    kit = os.path.join(kits, "hospital-b")
    before = sorted(os.listdir(os.path.join(kit, "local")))
    proc = site_policy(kit, "--policy", _typo(tmp_path / "privacy.json", TYPOS[needle]), "--deny-byoc")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and sorted(os.listdir(os.path.join(kit, "local"))) == before


def test_not_a_kit_an_admin_kit_or_options_on_the_server_kit_are_refused_and_nothing_is_written(kits):
    assert site_policy(os.path.join(kits, "no-such-kit"), "--policy", "global-only").returncode == 2
    admin = os.path.join(kits, "admin@coordinator.example.org")
    before = sorted(os.listdir(os.path.join(admin, "local"))) if os.path.isdir(os.path.join(admin, "local")) else None
    proc = site_policy(admin, "--policy", "global-only", "--deny-byoc")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    after = sorted(os.listdir(os.path.join(admin, "local"))) if os.path.isdir(os.path.join(admin, "local")) else None
    assert after == before
    server = site_policy(os.path.join(kits, "fedopal-server.example.org"), "--deny-byoc")
    assert server.returncode == 2 and "server's kit" in server.stderr


def test_deny_byoc_alone_on_a_site_still_turns_log_streaming_off(kits):
    kit = os.path.join(kits, "hospital-d")
    assert site_policy(kit, "--deny-byoc").returncode == 0
    assert json.load(open(os.path.join(kit, "local", "resources.json")))["allow_log_streaming"] is False


@pytest.mark.parametrize("overrides", [{}, {"privacy": {"noise_multiplier": 1.0}},
                                        {"federation": {"quantization": "float16", "cross_site_eval": True}},
                                        {"federation": {"encryption": "he"}, "privacy": {"noise_multiplier": 1.0}}])
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
