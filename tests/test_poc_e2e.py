"""FedOPAL on a real FLARE deployment in POC mode: a provisioned server and 2 sites, jobs submitted headlessly.

One POC (scratch HOME, workspace under tmp_path, a free port) serves every slow test here. It runs two jobs:
- the tiny job as exported, submitted with the FLARE API (what an admin script does);
- a privacy job submitted with `nvflare job submit`, whose site script sends its personal tensors and which carries
  no result filter of its own: only the sites' local/privacy.json stands between those tensors and the server.
The teardown stops the POC and fails if any of its processes, recorded by pid while it ran, is still alive.
"""

import contextlib
import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import psutil
import numpy as np
import pytest
import torch
import yaml
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext

from fedopal.model.adapters import build_model
from fedopal.tools.job import PRIVACY_SCOPE, export_job
from fedopal.specs.methods import get_method
from fedopal.policy.privacy import update_epsilon
from fedopal.site.state import METRICS_FILE, PERSONAL_FILE

from conftest import REPO, tiny_config

sys.path.insert(0, os.path.join(REPO, "poc_setup"))
import poc  # noqa: E402

SITES = ["site-1", "site-2"]
COMPLETED = "FINISHED:COMPLETED"


def _received_updates(result_dir: str) -> list[dict]:
    """What the server's aggregator got, from the downloaded job result."""
    with open(os.path.join(result_dir, "workspace", "app_server", "fedopal_updates.jsonl")) as f:
        return [json.loads(line) for line in f]


# -- the deployment files, without a POC ----------------------------------------------------------
def test_poc_project_is_the_consortium_on_one_machine():
    with open(poc.CONSORTIUM_PROJECT) as f:
        consortium = yaml.safe_load(f)
    project = poc.poc_project(consortium, SITES, 41234)
    by_type = lambda p, t: [x for x in p["participants"] if x["type"] == t]  # noqa: E731
    (server,) = by_type(project, "server")
    assert server["name"] == "server" and server["fed_learn_port"] == server["admin_port"] == 41234
    assert [c["name"] for c in by_type(project, "client")] == SITES
    assert {c["org"] for c in by_type(project, "client")} <= {c["org"] for c in by_type(consortium, "client")}
    assert by_type(project, "admin") == by_type(consortium, "admin")
    assert {a["role"] for a in by_type(consortium, "admin")} == {"project_admin", "org_admin", "lead", "member"}
    assert len(by_type(consortium, "client")) == 4


def test_a_taken_port_is_refused_at_prepare_in_one_line_before_anything_is_written(tmp_path):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = subprocess.run([sys.executable, os.path.join(REPO, "poc_setup", "poc.py"), "prepare", "--workspace",
                               str(tmp_path / "ws"), "--home", str(tmp_path / "home"), "--port", str(port)],
                              capture_output=True, text=True, timeout=120,
                              env=os.environ)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert f"port {port} is already in use" in proc.stderr and "Fix:" in proc.stderr
    assert not (tmp_path / "ws").exists()


def test_poc_refuses_repeated_site_names():
    with open(poc.CONSORTIUM_PROJECT) as f:
        consortium = yaml.safe_load(f)
    with pytest.raises(poc.PocError, match="distinct"):
        poc.poc_project(consortium, ["site-1", "site-1"], 41234)


def test_committed_job_selects_the_scope_every_site_defines():
    with open(os.path.join(REPO, "jobs", "fedopal_demo", "meta.json")) as f:
        meta = json.load(f)
    with open(poc.SITE_PRIVACY) as f:
        privacy = json.load(f)
    assert meta["scope"] == PRIVACY_SCOPE == privacy["default_scope"]
    assert [s["name"] for s in privacy["scopes"]] == [PRIVACY_SCOPE]


def _installed_filters(kit):
    """The site's privacy.json filters, built as FLARE builds them: by class path, from the installed runtime."""
    with open(kit / "local" / "privacy.json") as f:
        confs = json.load(f)["scopes"][0]["task_result_filters"]
    built = []
    for conf in confs:
        module_name, class_name = conf["path"].rsplit(".", 1)
        built.append(getattr(importlib.import_module(module_name), class_name)(**conf["args"]))
    return built


def test_installed_site_policy_lets_only_the_global_adapter_leave(tmp_path, tiny_cfg):
    kit = tmp_path / "site-9"
    (kit / "local").mkdir(parents=True)
    poc.install_site_policy(str(kit))
    (site_filter,) = _installed_filters(kit)
    assert type(site_filter).__module__ == "fedopal.policy.filters"  # the installed runtime's policy package

    everything = build_model(tiny_cfg, get_method("fedopal_w"), "site-9").state_dict()
    shareable = DXO(data_kind=DataKind.WEIGHT_DIFF, data={k: v.numpy() for k, v in everything.items()}).to_shareable()
    sent = from_shareable(site_filter.process(shareable, FLContext())).data
    assert any(".personal." in k for k in everything) and any(k.startswith("head.") for k in everything)
    assert set(sent) == {k for k in everything if ".lora_A.global." in k or ".lora_B.global." in k}


def test_installed_dp_policy_clips_and_noises_the_update(tmp_path):
    kit = tmp_path / "site-9"
    (kit / "local").mkdir(parents=True)
    poc.install_site_policy(str(kit), poc.SITE_PRIVACY_DP)
    allow, dp = _installed_filters(kit)
    assert type(dp).__module__ == "fedopal.policy.privacy" and dp.source == "site policy"
    update = {"backbone.x.lora_A.global.weight": np.full((4, 4), 10.0, np.float32)}
    out = from_shareable(dp.process(DXO(data_kind=DataKind.WEIGHT_DIFF, data=update).to_shareable(), FLContext()))
    (record,) = out.get_meta_prop("fedopal_dp")
    assert record["source"] == "site policy" and record["epsilon"] > 0 and "update_norm" not in record
    assert np.linalg.norm(out.data["backbone.x.lora_A.global.weight"]) < 40  # clipped to 1, then noised (sd 2)


# -- one real POC: provisioned, started, two jobs, stopped -------------------------------------------
@pytest.fixture(scope="module")
def poc_run(small_federation, tmp_path_factory):
    root, _ = small_federation
    tmp = tmp_path_factory.mktemp("poc")
    cfg = tiny_config(root, method="fedopal_w")
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"head": "personal"})})  # the site sends
    plain_job = export_job(cfg, str(tmp / "jobs"))                                         # only its global adapter
    leak_cfg = cfg.model_copy(update={"name": "fedopal_site_filter_test", "site_state_dir": str(tmp / "leak_state")})
    leak_job = export_job(leak_cfg, str(tmp / "jobs"), site_filter_only=True, test_leak_personal=True)

    workspace, home = str(tmp / "nvflare_poc"), str(tmp / "home")
    seen: dict[int, float] = {}  # every POC process observed: pid -> start time
    commands: dict[int, str] = {}

    def record_processes(*_args, **_kwargs) -> bool:  # also FLARE's monitor callback: True = keep monitoring
        for pid, started in poc.find_poc_processes(deployment.prod_dir).items():
            seen[pid] = started
            with contextlib.suppress(psutil.Error):
                commands[pid] = " ".join(psutil.Process(pid).cmdline())
        return True

    deployment = None
    try:
        deployment = poc.Poc.prepare(workspace, home, SITES)  # a free port
        for site in SITES:  # each site's own policy: only the global adapter leaves, clipped and noised
            poc.install_site_policy(os.path.join(deployment.prod_dir, site), poc.SITE_PRIVACY_DP)
        deployment.start()
        record_processes()

        cli = subprocess.run(
            [sys.executable, "-m", "nvflare.cli", "job", "submit", "-j", leak_job, "--startup-kit",
             deployment.admin_kit], env=poc.cli_env(workspace, home), capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        leak_id = re.search(r"job_id:\s*(\S+)", cli.stdout).group(1)

        plain_id = deployment.submit(plain_job)  # the FLARE API, headless, as the project admin
        with deployment.session() as sess:
            status, results = {}, {}
            for name, job_id in (("plain", plain_id), ("leak", leak_id)):
                _, meta = sess.monitor_job_and_return_job_meta(job_id, timeout=300, poll_interval=1.0,
                                                                cb=record_processes)
                status[name] = meta["status"] if meta else "TIMEOUT"
                results[name] = sess.download_job_result(job_id, str(tmp / "results"))
        yield SimpleNamespace(poc=deployment, home=home, plain_job=plain_job, status=status, results=results,
                              job_ids={"plain": plain_id, "leak": leak_id}, commands=commands,
                              leak_state=str(tmp / "leak_state"))
    finally:
        if deployment is None and os.path.isfile(os.path.join(workspace, poc.STATE_FILE)):
            deployment = poc.Poc.load(workspace)
        if deployment is not None:
            deployment.stop()
            seen.update(poc.find_poc_processes(deployment.prod_dir))
            assert not poc.alive(seen), f"POC processes still running after stop: {poc.alive(seen)}"


@pytest.mark.slow
def test_both_jobs_completed(poc_run):
    assert poc_run.status == {"plain": COMPLETED, "leak": COMPLETED}


@pytest.mark.slow
def test_submitting_leaves_the_job_folder_as_exported(poc_run):
    assert not glob.glob(os.path.join(poc_run.plain_job, "**", ".__nvfl_*"), recursive=True)  # FLARE's signatures


@pytest.mark.slow
def test_poc_is_isolated_on_a_free_port_with_its_own_home(poc_run):
    state = poc_run.poc.state
    assert state.port not in (8002, 8003)
    with open(os.path.join(poc_run.home, ".nvflare", "config.conf")) as f:
        assert poc_run.poc.workspace in f.read()  # FLARE's CLI wrote to the scratch HOME, not the user's


@pytest.mark.slow
def test_server_site_and_job_processes_were_recorded_by_pid(poc_run):
    # What the teardown's "all gone" check covers: start.sh daemons, FLARE's server and site processes, job processes.
    commands = list(poc_run.commands.values())
    assert sum("sub_start.sh" in c for c in commands) == 1 + len(SITES)
    assert sum("server_train" in c for c in commands) == 1 and sum("client_train" in c for c in commands) == len(SITES)
    assert any("runner_process" in c for c in commands) and any("worker_process" in c for c in commands)


@pytest.mark.slow
def test_server_received_only_shared_tensors(poc_run):
    received = _received_updates(poc_run.results["plain"])
    assert len(received) == 2 * len(SITES) and all(r["accepted"] for r in received)
    keys = {k for r in received for k in r["keys"]}
    assert keys and not any(".personal." in k for k in keys)
    model = torch.load(os.path.join(poc_run.results["plain"], "workspace", "app_server", "FL_global_model.pt"),
                       map_location="cpu", weights_only=False)["model"]
    assert set(model) == keys


@pytest.mark.slow
def test_personal_state_stays_in_each_site_workspace(poc_run):
    for site in SITES:
        path = os.path.join(poc_run.poc.prod_dir, site, "fedopal_site_state", site, PERSONAL_FILE)
        state = torch.load(path, map_location="cpu", weights_only=True)["state"]
        assert any(".personal." in k for k in state) and all(".personal." in k or k.startswith("head.") for k in state)
    assert not glob.glob(os.path.join(poc_run.results["plain"], "**", PERSONAL_FILE), recursive=True)


@pytest.mark.slow
def test_site_privacy_filter_alone_stops_leaked_personal_tensors(poc_run):
    leak_id = poc_run.job_ids["leak"]
    (submitted,) = glob.glob(os.path.join(poc_run.results["leak"], "job", "*"))  # as the server stored it
    with open(os.path.join(submitted, "meta.json")) as f:
        assert json.load(f)["scope"] == PRIVACY_SCOPE
    with open(os.path.join(submitted, "app", "config", "config_fed_client.json")) as f:
        assert json.load(f)["task_result_filters"] == []  # the job itself lets everything through
    received = _received_updates(poc_run.results["leak"])
    for site in SITES:
        sent = [json.loads(line) for line in open(os.path.join(poc_run.leak_state, site, METRICS_FILE))]
        got = [r for r in received if r["site"] == site]
        assert len(sent) == len(got) == 2
        # The site script sent its personal adapter too; the server got strictly less, and no personal key.
        assert all(s["bytes_sent"] > g["bytes"] for s, g in zip(sent, got))
        assert all(g["accepted"] and not any(".personal." in k for k in g["keys"]) for g in got)
        with open(os.path.join(poc_run.poc.prod_dir, site, leak_id, "log.txt")) as f:
            assert "dropped" in f.read()  # the site policy's own log line (what it dropped, by group)


@pytest.mark.slow
def test_the_site_policy_noises_updates_the_job_did_not_ask_to_noise(poc_run):
    """The plain job has no privacy settings; each site's privacy.json clips and noises its update anyway, logs
    epsilon in the site's own log, and the server records the site policy's epsilon."""
    with open(poc_run.plain_job + "/app/custom/fedopal_job.json") as f:
        assert json.load(f)["privacy"]["noise_multiplier"] == 0
    with open(poc.SITE_PRIVACY_DP) as f:
        args = json.load(f)["scopes"][0]["task_result_filters"][1]["args"]
    received = _received_updates(poc_run.results["plain"])
    for r in received:
        (record,) = r["dp"]
        assert record["source"] == "site policy" and record["noise_multiplier"] == args["noise_multiplier"]
        assert r["epsilon"] == pytest.approx(update_epsilon(args["noise_multiplier"], record["releases"],
                                                            args["delta"]), rel=1e-9)
        # what arrived is the clipped update plus noise of sd sigma*C in every coordinate: its norm is that of the
        # noise, sqrt(d) * sigma * C, give or take the (at most C) update and the chi distribution's spread
        d = sum(v.numel() for v in torch.load(os.path.join(poc_run.results["plain"], "workspace", "app_server",
                                                           "FL_global_model.pt"), weights_only=True)["model"].values())
        expected = math.sqrt(d) * args["noise_multiplier"] * args["clip_norm"]
        assert abs(r["norm"] - expected) <= args["clip_norm"] + 5 * args["noise_multiplier"] * args["clip_norm"]
    for site in SITES:
        with open(os.path.join(poc_run.poc.prod_dir, site, poc_run.job_ids["plain"], "log.txt")) as f:
            log = f.read()
        assert "differential privacy (site policy)" in log and "epsilon" in log
