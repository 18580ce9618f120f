"""Privacy end to end in the real FLARE simulator (tiny ViT, 2 sites, 2 rounds): what the server actually received."""

import glob
import math
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedopal.config import config_from_dict, job_dict
from fedopal.tools.job import simulate
from fedopal.policy.privacy import accountant_epsilon, update_epsilon
from fedopal.tools.report import cross_site_matrix, summarize, updates_log, write_summary
from fedopal.site.state import read_metrics, simulation_state_root

from conftest import tiny_config

pytestmark = pytest.mark.slow
SIGMA, CLIP = 1.0, 0.5
ALLOWED_UNDER_DP = ["personalized/test/*", "global_only/test/*"]


def _job(root, ws, method, **sections):
    raw = job_dict(tiny_config(root, method=method))
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    cfg = config_from_dict(raw)
    return cfg, simulate(cfg, str(ws))


@pytest.fixture(scope="module")
def update_dp_job(small_federation, tmp_path_factory):
    """Update-mode DP, NVFlare float16 quantization and cross-site evaluation in one job; the test metrics are allowed
    by name (outside epsilon), so that cross-site evaluation has something to show."""
    root, _ = small_federation
    return _job(root, tmp_path_factory.mktemp("dp_update"), "fedopal_w",
                privacy={"mode": "update", "noise_multiplier": SIGMA, "clip_norm": CLIP,
                         "allow_fields": ALLOWED_UNDER_DP},
                federation={"num_sites": 2, "quantization": "float16", "cross_site_eval": True})


def test_the_server_received_noised_float16_updates_of_global_tensors_only(update_dp_job):
    cfg, job_ws = update_dp_job
    received = updates_log(job_ws)
    assert len(received) == 4 and all(r["accepted"] and r["params_type"] == "DIFF" for r in received)
    assert all(".personal." not in k for r in received for k in r["keys"])
    global_model = torch.load(os.path.join(job_ws, "server", "simulate_job", "app_server", "FL_global_model.pt"),
                              map_location="cpu", weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in global_model.values())  # the server keeps float32
    d = sum(v.numel() for v in global_model.values())
    for r in received:
        assert r["wire_bytes"] == r["bytes"] // 2  # float16 on the wire, float32 when averaged
        # noise of sd sigma*C per coordinate dominates a clipped update of norm <= C: ||received|| ~ sqrt(d) sigma C
        assert abs(r["norm"] - math.sqrt(d) * SIGMA * CLIP) <= CLIP + 5 * SIGMA * CLIP
        (record,) = r["dp"]
        assert record["releases"] == r["round"]  # both from 1
        assert r["epsilon"] == pytest.approx(update_epsilon(SIGMA, r["round"], 1e-5, "prv"), rel=1e-9)


def test_epsilon_reaches_tensorboard_the_summary_and_its_table(update_dp_job, tmp_path):
    cfg, job_ws = update_dp_job
    summary = summarize(job_ws, cfg, 1.0)
    final = update_epsilon(SIGMA, 2, 1e-5)
    assert summary["epsilon"] == {"site-1": pytest.approx(final), "site-2": pytest.approx(final)}
    assert "| epsilon |" in summary["markdown"] and f"{final:.3f}" in summary["markdown"]
    for site in ("site-1", "site-2"):
        events = EventAccumulator(os.path.join(job_ws, "server", "simulate_job", "tb_events", site))
        events.Reload()
        assert [e.value for e in events.Scalars("privacy/epsilon")] == pytest.approx(
            [update_epsilon(SIGMA, t, 1e-5) for t in (1, 2)], rel=1e-6)  # TensorBoard stores float32
        assert [e.step for e in events.Scalars("privacy/epsilon")] == [1, 2]  # the round, from 1
    write_summary(summary, str(tmp_path))
    assert os.path.getsize(tmp_path / "cross_site.png") > 1000


def test_cross_site_matrix_has_the_global_row_and_a_personalized_diagonal(update_dp_job):
    cfg, job_ws = update_dp_job
    matrix = summarize(job_ws, cfg, 1.0)["cross_site"]
    assert matrix["rows"] == ["global", "site-1", "site-2"] and matrix["columns"] == ["site-1", "site-2"]
    values = matrix["values"]
    assert all(v is not None for v in values[0])  # the global model on every site
    assert values[1][1] is None and values[2][0] is None  # a personalized model never left its site
    assert values[1][0] is not None and values[2][1] is not None
    # the sites evaluated the final global model NVFlare sent them: their validate answers are the server's record
    assert glob.glob(os.path.join(job_ws, "server", "simulate_job", "cross_site_val", "cross_val_results.json"))


def test_a_job_without_cross_site_evaluation_has_no_matrix(tmp_path):
    # FLARE leaves an empty cross_val_results.json in a job that ran no cross-site evaluation (the 3D demo's)
    folder = tmp_path / "server" / "simulate_job" / "cross_site_val"
    folder.mkdir(parents=True)
    (folder / "cross_val_results.json").write_text("{}")
    assert cross_site_matrix(str(tmp_path)) is None


def test_dpsgd_sites_account_their_subsampled_steps(small_federation, tmp_path):
    root, _ = small_federation
    cfg, job_ws = _job(root, tmp_path, "ffa_lora", privacy={"mode": "dpsgd", "noise_multiplier": 1.2, "clip_norm": 1.0})
    received = updates_log(job_ws)
    assert len(received) == 4 and all(r["accepted"] for r in received)
    for site in ("site-1", "site-2"):
        records = read_metrics(os.path.join(simulation_state_root(job_ws), site))
        q = cfg.data.batch_size / records[0]["n_train"]
        for r in records:
            steps = r["round"] * cfg.train.local_steps
            assert r["dp_steps"] == steps and r["sample_rate"] == pytest.approx(q)
            assert r["epsilon"] == pytest.approx(accountant_epsilon(1.2, q, steps, 1e-5, "prv"), rel=1e-9)
        server_side = [x for x in received if x["site"] == site]
        assert [x["dp"][0]["mode"] for x in server_side] == ["dpsgd", "dpsgd"]
        assert [x["epsilon"] for x in server_side] == pytest.approx([r["epsilon"] for r in records])
        assert all(x["dp"][0]["unit"] == "image" for x in server_side)  # no patient_id column: per image
    from test_wire_audit import audit

    result = audit(job_ws, cfg)
    assert not [f for f in result["fields"] if f["from_data"] and f["dp"] != "noised"]


def test_under_update_dp_only_the_noised_update_and_epsilon_leave(update_dp_job):
    from test_wire_audit import audit

    cfg, job_ws = update_dp_job
    result = audit(job_ws, cfg)
    data_derived = {f["name"] for f in result["fields"] if f["from_data"] and f["dp"] != "noised"}
    # no validation metric, loss, diagnostic or image count: only the test metrics the policy names
    assert data_derived == {f"{v}/test/{m}" for v in ("personalized", "global_only")
                            for m in ("balanced_accuracy", "accuracy", "auc")}
    tags = {f["name"] for f in result["fields"] if f["where"] == "event_tag"}
    assert "privacy/epsilon" in tags  # and settings (learning rate, random baselines): not computed from the data
    assert {f["name"] for f in result["fields"] if f["where"] == "event_tag" and f["from_data"]} == data_derived
    metas = {f["name"] for f in result["fields"] if f["where"] == "meta" and f["task"] == "train"}
    assert "fedopal_dp.epsilon" in metas and not {"fedopal_dp.update_norm", "fedopal_dp.clipped"} & metas
