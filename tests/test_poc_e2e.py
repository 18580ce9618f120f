"""FedOPAL on a real FLARE deployment in POC mode: a provisioned server and 3 sites, jobs submitted headlessly.

One POC (scratch HOME, workspace under tmp_path, a free port) serves every slow test here; `poc_run` says which
site has which policy and which four jobs it runs (no-code, code-shipping at a site that denies bring-your-own-code,
a leaking site script held back by the site's own policy, a version mismatch). The teardown stops the POC and fails
if any of its processes, recorded by pid while it ran, is still alive.
"""

import contextlib
import glob
import importlib
import json
import math
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import numpy as np
import pytest
import torch
import yaml
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext

from fedopal.model.adapters import build_model
from fedopal.config import config_from_dict
from fedopal.tools.job import PRIVACY_SCOPE, export_job
from fedopal.tools.select import FlareSession, SelectError, select
from fedopal.specs.methods import get_method
from fedopal.policy.privacy import update_epsilon
from fedopal.policy.install import shipped_policy
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
    with open(shipped_policy(poc.SITE_PRIVACY)) as f:
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
    (kit / "startup").mkdir()
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
    (kit / "startup").mkdir()
    poc.install_site_policy(str(kit), poc.SITE_PRIVACY_DP)
    allow, dp = _installed_filters(kit)
    assert type(dp).__module__ == "fedopal.policy.privacy" and dp.source == "site policy"
    update = {"backbone.x.lora_A.global.weight": np.full((4, 4), 10.0, np.float32)}
    out = from_shareable(dp.process(DXO(data_kind=DataKind.WEIGHT_DIFF, data=update).to_shareable(), FLContext()))
    (record,) = out.get_meta_prop("fedopal_dp")
    assert record["source"] == "site policy" and record["epsilon"] > 0 and "update_norm" not in record
    assert np.linalg.norm(out.data["backbone.x.lora_A.global.weight"]) < 40  # clipped to 1, then noised (sd 2)


# -- one real POC: provisioned, started, four jobs, stopped ------------------------------------------
EXTRA = "site-3"  # connected to the POC, named in no job: it must get nothing


def _patch_executor_arg(job, key, value):
    path = os.path.join(job, "app", "config", "config_fed_client.json")
    with open(path) as f:
        client = json.load(f)
    client["executors"][0]["executor"]["args"][key] = value
    with open(path, "w") as f:
        json.dump(client, f, indent=4)


@pytest.fixture(scope="module")
def poc_run(small_federation, tmp_path_factory):
    """site-1: the DP site policy (clip + noise, only the global adapter, no metrics), byoc allowed.
    site-2: the plain site policy (the global adapter and metrics), bring-your-own-code denied.
    site-3: connected, in no job's deploy map. Jobs:
    - plain: the no-code job for site-1 and site-2 (equal weights: site-1's policy keeps its image count home);
    - code: the same job, code-shipping: site-2 refuses it (FLARE's BYOC check);
    - leak: a code-shipping job for site-1 whose site script sends personal tensors and more, with no job policy;
    - version: the no-code job for site-1, claiming another fedopal version."""
    root, _ = small_federation
    tmp = tmp_path_factory.mktemp("poc")
    cfg = tiny_config(root, method="fedopal_w").model_copy(deep=True)
    cfg.model.head = "personal"  # the sites send only their global adapter
    cfg.federation.aggregation_weights = "equal"
    jobs = {"plain": export_job(cfg, str(tmp / "jobs"), "no-code"),
            "code": export_job(cfg, str(tmp / "jobs"), "code")}
    one_site = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"site_names": ["site-1"],
                                                                                      "num_sites": 1})})
    leak_cfg = one_site.model_copy(update={"name": "leak", "site_state_dir": str(tmp / "leak_state")})
    jobs["leak"] = export_job(leak_cfg, str(tmp / "jobs"), "code", site_script="leaky_client.py",
                              extra_files=(os.path.join(REPO, "tests", "leaky_client.py"),), site_policy_only=True)
    with open(os.path.join(jobs["leak"], "app", "config", "config_fed_client.json")) as f:
        client = json.load(f)
    client["task_result_filters"] = [{"tasks": ["train"], "filters": [{"path": "leaky_client.LeakyFilter",
                                                                       "args": {}}]}]  # the job's own, after the site's
    with open(os.path.join(jobs["leak"], "app", "config", "config_fed_client.json"), "w") as f:
        json.dump(client, f, indent=4)
    jobs["version"] = export_job(one_site.model_copy(update={"name": "version"}), str(tmp / "jobs"), "no-code")
    _patch_executor_arg(jobs["version"], "built_for", "0.0.1")

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
        deployment = poc.Poc.prepare(workspace, home, SITES + [EXTRA])  # a free port; each site's own policy
        poc.install_site_policy(os.path.join(deployment.prod_dir, "site-1"), poc.SITE_PRIVACY_DP)
        poc.install_site_policy(os.path.join(deployment.prod_dir, "site-2"), poc.SITE_PRIVACY, deny_byoc=True)
        deployment.start()
        record_processes()
        status, results, job_ids = {}, {}, {}
        for name in ("plain", "code", "leak", "version"):
            job_ids[name] = deployment.submit(jobs[name])  # the FLARE API, headless, as the project admin
            if name == "version":  # the site stops the job at start; the server would wait for it: abort once said
                log = os.path.join(deployment.prod_dir, "site-1", job_ids[name], "log.txt")
                deadline = time.time() + 180
                while time.time() < deadline and not (os.path.isfile(log) and "does not run it" in open(log).read()):
                    time.sleep(1)
                with deployment.session() as sess:
                    sess.abort_job(job_ids[name])
            with deployment.session() as sess:
                _, meta = sess.monitor_job_and_return_job_meta(job_ids[name], timeout=300, poll_interval=1.0,
                                                                cb=record_processes)
                status[name] = meta["status"] if meta else "TIMEOUT"
                results[name] = sess.download_job_result(job_ids[name], str(tmp / "results"))
        # fedopal select: two candidates, one round each, on site-2 and site-3 (policies that let validation metrics
        # out; site-3 reads site-1's data); then on site-1 and site-2, where site-1's DP policy keeps them home
        select_root = tmp / "select_federation"
        select_root.mkdir()
        os.symlink(root / "site-2", select_root / "site-2")
        os.symlink(root / "site-1", select_root / "site-3")
        flare = FlareSession(deployment.state.admin, deployment.admin_kit, 300)

        def select_cfg(data_root, sites):
            raw = tiny_config(data_root).model_dump(mode="json")
            raw["federation"] = {"site_names": sites}
            return config_from_dict(raw)
        chosen = select(select_cfg(select_root, ["site-2", "site-3"]), ["fedavg_lora", "local"], 1, flare,
                        str(tmp / "select"))
        try:
            select(select_cfg(root, SITES), ["dual_lora"], 1, flare, str(tmp / "select_blocked"))
            refusal = None
        except SelectError as err:
            refusal = str(err)
        yield SimpleNamespace(poc=deployment, home=home, jobs=jobs, status=status, results=results, job_ids=job_ids,
                              commands=commands, leak_state=str(tmp / "leak_state"), cfg=cfg, select=chosen,
                              select_refusal=refusal, select_dir=str(tmp / "select"))
    finally:
        if deployment is None and os.path.isfile(os.path.join(workspace, poc.STATE_FILE)):
            deployment = poc.Poc.load(workspace)
        if deployment is not None:
            deployment.stop()
            seen.update(poc.find_poc_processes(deployment.prod_dir))
            assert not poc.alive(seen), f"POC processes still running after stop: {poc.alive(seen)}"


def _site_log(poc_run, site, name):
    path = os.path.join(poc_run.poc.prod_dir, site, poc_run.job_ids[name], "log.txt")
    return open(path).read() if os.path.isfile(path) else ""


def _server_log(poc_run, name):
    return open(os.path.join(poc_run.poc.server_job_dir(poc_run.job_ids[name]), "log.txt")).read()


def _wire(poc_run, name):
    from fedopal.server.recorder import read_wire_log

    return read_wire_log(os.path.join(poc_run.results[name], "workspace", "app_server", "fedopal_wire.jsonl"))


@pytest.mark.slow
def test_the_no_code_and_the_leak_job_completed_the_others_did_not(poc_run):
    assert poc_run.status["plain"] == COMPLETED and poc_run.status["leak"] == COMPLETED
    assert poc_run.status["code"] != COMPLETED and poc_run.status["version"] != COMPLETED


@pytest.mark.slow
def test_a_site_with_byoc_denied_runs_the_no_code_job_and_refuses_the_code_job(poc_run):
    # the no-code job ran at site-2 to the end: its rounds in its own metrics log, its updates on the server
    records = [json.loads(line) for line in open(os.path.join(
        poc_run.poc.prod_dir, "site-2", "fedopal_site_state", "site-2", METRICS_FILE))]
    assert [r["round"] for r in records if r["job"].startswith("fedopal_tiny_test@")] == [1, 2]
    assert {r["site"] for r in _received_updates(poc_run.results["plain"])} == set(SITES)
    # the code-shipping job was refused at site-2, in FLARE's own words, and never started there
    logs = glob.glob(os.path.join(poc_run.poc.prod_dir, "**", "log.txt"), recursive=True)
    refusals = [line for log in logs for line in open(log, errors="replace") if "BYOC not permitted" in line]
    assert refusals and all(poc_run.job_ids["code"] in line or "site-2" in line for line in refusals), refusals[:3]
    assert not os.path.isdir(os.path.join(poc_run.poc.prod_dir, "site-2", poc_run.job_ids["code"]))


@pytest.mark.slow
def test_the_deploy_map_is_the_sites_an_extra_connected_site_gets_nothing(poc_run):
    with open(os.path.join(poc_run.jobs["plain"], "meta.json")) as f:
        assert json.load(f)["deploy_map"] == {"app": ["server", *SITES]}
    for job_id in poc_run.job_ids.values():
        assert not os.path.exists(os.path.join(poc_run.poc.prod_dir, EXTRA, job_id))
    assert {line["site"] for line in _wire(poc_run, "plain")} == set(SITES)


@pytest.mark.slow
def test_the_wire_audit_under_the_job_policy_and_each_site_policy(poc_run):
    from fedopal.policy.install import read_policy, site_enforcer
    from fedopal.specs.contract import WirePolicy, policy_for_job
    from fedopal.tools.report import wire_fields

    lines = _wire(poc_run, "plain")
    job = policy_for_job(get_method("fedopal_w", "personal").shared, False)
    for site, policy_file in (("site-1", poc.SITE_PRIVACY_DP), ("site-2", poc.SITE_PRIVACY)):
        args = site_enforcer(read_policy(shipped_policy(policy_file)))["args"]
        site_policy = WirePolicy(tuple(args["allow_groups"]), tuple(args["allow_fields"]), args["require_dp"])
        mine = [line for line in lines if line["site"] == site]
        for policy in (job, site_policy):
            assert wire_fields(mine, policy)["violations"] == []
        metrics = {n for line in mine for w, n in line["fields"] if w == "metric"}
        assert bool(metrics) == (site == "site-2")  # the DP site sends no metric; the other site allows them
    dp = [line["meta_values"] for line in lines if line["site"] == "site-1" and line["kind"] == "task_result"]
    assert dp and all(m["fedopal_dp.source"] == "site policy" and "NUM_STEPS_CURRENT_ROUND" not in m for m in dp)


@pytest.mark.slow
def test_the_site_policy_alone_stops_a_leaking_site_script(poc_run):
    lines = _wire(poc_run, "leak")
    sent = {(w, n) for line in lines for w, n in line["fields"]}
    assert not [n for w, n in sent if w == "tensor" and ".personal." in n]
    assert not [n for w, n in sent if "personal_norm" in n or n.startswith("leak/") or "added_by_job_filter" in n]
    assert not [n for w, n in sent if w == "metric"] and ("meta", "NUM_STEPS_CURRENT_ROUND") not in sent
    with open(os.path.join(poc_run.results["leak"], "job", os.listdir(os.path.join(
            poc_run.results["leak"], "job"))[0], "app", "config", "config_fed_client.json")) as f:
        job_config = f.read()
    assert "WireContractEnforcer" not in job_config and "leaky_client.LeakyFilter" in job_config
    log = _site_log(poc_run, "site-1", "leak")
    # the site's scope filter drops the personal tensors first; its enforcer, last, everything else the script added
    assert re.search(r"site policy \(allow global.A, global.B\): dropped \d+ tensor\(s\) .*personal\.A", log)
    removed = [line for line in log.splitlines() if "wire contract (site policy): removed from the train result" in line]
    assert removed and all("personal_norm" in line and "NUM_STEPS_CURRENT_ROUND" in line and "metric(s)" in line
                           and "added_by_job_filter" in line for line in removed)  # the job's own filter came after
    assert "held back the fed.analytix_log_stats event 'leak/personal_norm'" in log


@pytest.mark.slow
def test_a_job_built_for_another_fedopal_stops_at_the_site_in_one_line(poc_run):
    import fedopal

    line = (f"fedopal {fedopal.__version__} is installed at this site, but the job was built for fedopal 0.0.1: "
            "this site does not run it.")
    assert line in _site_log(poc_run, "site-1", "version")
    assert not _wire(poc_run, "version")  # nothing was sent


@pytest.mark.slow
def test_submitting_leaves_the_job_folder_as_exported(poc_run):
    assert not glob.glob(os.path.join(poc_run.jobs["plain"], "**", ".__nvfl_*"), recursive=True)  # FLARE's signatures


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
    assert sum("sub_start.sh" in c for c in commands) == 2 + len(SITES)
    assert sum("server_train" in c for c in commands) == 1
    assert sum("client_train" in c for c in commands) == len(SITES) + 1
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
def test_the_dp_site_policy_noises_updates_the_job_did_not_ask_to_noise(poc_run):
    """The plain job has no privacy settings; site-1's privacy.json clips and noises its update anyway, logs epsilon
    in the site's own log, and the server records the site policy's epsilon."""
    assert not poc_run.cfg.privacy.enabled
    with open(shipped_policy(poc.SITE_PRIVACY_DP)) as f:
        args = json.load(f)["scopes"][0]["task_result_filters"][1]["args"]
    received = [r for r in _received_updates(poc_run.results["plain"]) if r["site"] == "site-1"]
    d = sum(v.numel() for v in torch.load(os.path.join(poc_run.results["plain"], "workspace", "app_server",
                                                       "FL_global_model.pt"), weights_only=True)["model"].values())
    for r in received:
        (record,) = r["dp"]
        assert record["source"] == "site policy" and record["noise_multiplier"] == args["noise_multiplier"]
        assert r["epsilon"] == pytest.approx(update_epsilon(args["noise_multiplier"], record["releases"],
                                                            args["delta"]), rel=1e-9)
        # what arrived is the clipped update plus noise of sd sigma*C in every coordinate: its norm is that of the
        # noise, sqrt(d) * sigma * C, give or take the (at most C) update and the chi distribution's spread
        expected = math.sqrt(d) * args["noise_multiplier"] * args["clip_norm"]
        assert abs(r["norm"] - expected) <= args["clip_norm"] + 5 * args["noise_multiplier"] * args["clip_norm"]
    log = _site_log(poc_run, "site-1", "plain")
    assert "differential privacy (site policy)" in log and "epsilon" in log


@pytest.mark.slow
def test_select_chooses_on_the_validation_metrics_the_sites_themselves_logged(poc_run):
    """Each candidate ran as a real job; the value select read for a site (from the server's tracking events) is the
    site's own metrics.jsonl value at that round; the choice is the highest site mean; the table says how to go on."""
    summary = poc_run.select
    assert [r["method"] for r in summary["rows"]] == ["fedavg_lora", "local"]
    for row in summary["rows"]:
        for site in ("site-2", "site-3"):
            logged = [json.loads(line) for line in open(os.path.join(
                poc_run.poc.prod_dir, site, "fedopal_site_state", site, METRICS_FILE))]
            mine = [r for r in logged if r["method"] == row["method"] and r["job"].startswith(
                f"fedopal_tiny_test_select_{row['method']}@")]
            assert len(mine) == 1 and mine[0]["round"] == row["best_round"][site] == 1
            assert row["val"][site] == pytest.approx(mine[0]["personalized/val/balanced_accuracy"], abs=1e-6)
    best = max(summary["rows"], key=lambda r: np.mean(list(r["val"].values())))
    assert summary["chosen"] == best["method"]
    md = open(os.path.join(poc_run.select_dir, "select.md")).read()
    assert f"| **{best['method']}** |" in md and f"--set train.method={best['method']} --export jobs" in md
    assert json.load(open(os.path.join(poc_run.select_dir, "select.json")))["chosen"] == best["method"]


@pytest.mark.slow
def test_select_stops_in_one_line_where_a_site_keeps_validation_metrics_home(poc_run):
    assert poc_run.select_refusal is not None and poc_run.select_refusal.count("\n") == 0
    assert poc_run.select_refusal.startswith("site(s) site-1 sent no personalized/val/balanced_accuracy")
    assert "Fix: ask those sites to allow 'personalized/val/*' by name" in poc_run.select_refusal
