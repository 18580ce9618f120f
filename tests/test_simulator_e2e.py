"""End to end in the real FLARE simulator: tiny ViT, 2 sites, 2 rounds, workspace under tmp_path."""

import glob
import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedopal.tools.job import simulate
from fedopal.tools.report import summarize
from fedopal.tools.report import collect_site_records, metrics_files
from fedopal.site.state import PERSONAL_FILE, simulation_state_root

from fedopal.config import config_from_dict

from conftest import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_job(small_federation, tmp_path_factory):
    root, _ = small_federation
    raw = tiny_config(root, method="fedopal_w").model_dump(mode="json")
    raw["data"]["sites"] = {"site-2": {"intensity_range": [0, 255]}}  # the same values as 8 bits' own: site-2's own
    raw["federation"] |= {"tracking": "both", "site_mlflow": True}  # TensorBoard and MLflow, and each site's own
    cfg = config_from_dict(raw)
    ws = tmp_path_factory.mktemp("sim")
    job_ws = simulate(cfg, str(ws))  # raises if the simulator fails
    return cfg, job_ws


def test_job_completed_and_every_round_ran_on_every_site(finished_job):
    cfg, job_ws = finished_job
    summary = summarize(job_ws, cfg, 0.0)
    assert [r["site"] for r in summary["sites"]] == ["site-1", "site-2"]
    assert all(r["rounds"] == cfg.train.num_rounds for r in summary["sites"])
    assert 0.0 <= summary["mean"]["bacc_personalized"] <= 1.0


def test_global_model_file_holds_only_global_keys(finished_job):
    _, job_ws = finished_job
    path = os.path.join(job_ws, "server", "simulate_job", "app_server", "FL_global_model.pt")
    keys = list(torch.load(path, map_location="cpu", weights_only=False)["model"])
    assert keys and all(".lora_A.global." in k or ".lora_B.global." in k or k.startswith("head.") for k in keys)


def test_personal_checkpoints_exist_and_differ_between_sites(finished_job):
    _, job_ws = finished_job
    states = {}
    for site in ("site-1", "site-2"):
        path = os.path.join(simulation_state_root(job_ws), site, PERSONAL_FILE)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["round"] == 1 and ckpt["method"] == "fedopal_w"
        states[site] = ckpt["state"]
    personal = [k for k in states["site-1"] if ".personal." in k]
    assert personal and any(not torch.equal(states["site-1"][k], states["site-2"][k]) for k in personal)


def test_server_received_no_personal_tensor(finished_job):
    _, job_ws = finished_job
    with open(os.path.join(job_ws, "server", "simulate_job", "app_server", "fedopal_updates.jsonl")) as f:
        received = [json.loads(line) for line in f]
    assert len(received) == 4 and all(r["accepted"] for r in received)
    keys = {k for r in received for k in r["keys"]}
    assert keys and not any(".personal." in k for k in keys)
    sent = [json.loads(line) for p in metrics_files(job_ws) for line in open(p)]
    assert {r["bytes"] for r in received} == {r["bytes_sent"] for r in sent}


def test_metrics_reached_tensorboard_event_files(finished_job):
    _, job_ws = finished_job
    for site in ("site-1", "site-2"):
        events = glob.glob(os.path.join(job_ws, "server", "simulate_job", "tb_events", site, "**", "events.*"),
                           recursive=True)
        assert events, site
        acc = EventAccumulator(os.path.dirname(events[0]))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert "personalized/test/balanced_accuracy" in tags and "train/orth_loss" in tags
        assert [e.step for e in acc.Scalars("personalized/test/balanced_accuracy")] == [1, 2]  # rounds from 1


def _mlflow_runs(db: str) -> dict:
    """{run name: {metric: [(step, value)]}} read back with MLflow's own client from an SQLite tracking store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    out = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            out[run.info.run_name] = {"tags": run.data.tags, "experiment": experiment, "metrics": {
                key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                for key in run.data.metrics}}
    return out


def test_metrics_reached_mlflow_on_the_server_and_at_each_site(finished_job):
    """MLflow (federation.tracking both, site_mlflow): one server run per site and one run at each site, each
    holding, per round, the metrics the site logged in metrics.jsonl, and the config and version as tags/note."""
    import fedopal

    cfg, job_ws = finished_job
    records = collect_site_records(job_ws)
    (server_db,) = glob.glob(os.path.join(job_ws, "server", "**", "mlflow.db"), recursive=True)
    server = _mlflow_runs(server_db)
    for site, rs in records.items():
        (run,) = [r for name, r in server.items() if name.startswith(f"{site}-")]
        assert run["tags"]["fedopal_version"] == fedopal.__version__ and run["tags"]["method"] == "fedopal_w"
        assert "num_rounds: 2" in run["experiment"].tags["mlflow.note.content"]
        for key in ("personalized/test/balanced_accuracy", "global_only/val/auc"):
            assert run["metrics"][key] == [(r["round"], pytest.approx(r[key])) for r in rs]
        (site_db,) = glob.glob(os.path.join(job_ws, site, "**", "mlflow.db"), recursive=True)
        (own,) = _mlflow_runs(site_db).values()
        assert own["metrics"]["personalized/test/balanced_accuracy"] == \
            run["metrics"]["personalized/test/balanced_accuracy"]


def test_the_same_seed_gives_the_same_metrics(finished_job, tmp_path):
    """Determinism: a second run with the same config and seed reproduces every site's metrics (CPU, one
    thread per site; tolerance 1e-6)."""
    cfg, job_ws = finished_job
    again = simulate(cfg, str(tmp_path / "again"))
    first, second = collect_site_records(job_ws), collect_site_records(again)
    keys = [k for k in first["site-1"][0] if k.startswith(("personalized/", "global_only/")) or k.endswith("_loss")]
    for site in first:
        for a, b in zip(first[site], second[site]):
            for k in keys:
                assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True), (site, a["round"], k)


def test_the_wire_audit_finds_only_what_the_contract_allows(finished_job):
    from test_wire_audit import audit

    cfg, job_ws = finished_job
    result = audit(job_ws, cfg)
    assert result["messages"]["train"] == 4 and result["messages"]["event"] > 0


def test_each_site_decodes_with_its_own_settings_and_its_exports_keep_them(finished_job):
    """data.sites.site-2 reaches site-2 only: its exported model (what fedopal predict loads) carries its range."""
    _, job_ws = finished_job
    stored = {}
    for site in ("site-1", "site-2"):
        with open(os.path.join(simulation_state_root(job_ws), site, "export", "best", "personalized",
                               "manifest.json")) as f:
            stored[site] = json.load(f)["config"]["data"]["intensity_range"]
    assert stored == {"site-1": None, "site-2": [0, 255]}
