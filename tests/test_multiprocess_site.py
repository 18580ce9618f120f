"""A site with several GPUs trains one model with DDP under torchrun (FLARE's external-process launcher); here on the
CPU with gloo and 2 processes. GPUs reach the sites through FLARE's own options (simulator, POC, resource_spec)."""

import json
import os

import pytest
import torch

from fedopal.tools.job import export_job, simulate
from fedopal.tools.report import collect_site_records
from fedopal.site.state import PERSONAL_FILE, simulation_state_root

from conftest import REPO, tiny_config


def one_site(root, name, **train):
    cfg = tiny_config(root, **train)
    cfg.federation.num_sites = 1
    return cfg.model_copy(update={"name": name})


def global_model(job_ws):
    path = os.path.join(job_ws, "server", "simulate_job", "app_server", "FL_global_model.pt")
    return {k: torch.as_tensor(v) for k, v in torch.load(path, map_location="cpu", weights_only=False)["model"].items()}


@pytest.mark.slow
def test_two_ddp_processes_send_what_one_process_sends(small_federation, tmp_path):
    """One site, one round, augmentation on. A batch of 47 then 1 (48 images), accumulated into one step: the
    processes hold 24/23 images, then 1/0 (the empty part joins the all-reduce with weight 0)."""
    root, _ = small_federation
    train = dict(num_rounds=1, local_steps=2, grad_accum_steps=2, lr=5e-3, device="cpu", orth_lambda=1.0)
    sent, kept = {}, {}
    for nproc in (1, 2):
        cfg = one_site(root, f"ddp_{nproc}", nproc_per_site=nproc, **train)
        cfg.data.batch_size = 47
        # the single process also goes through the simulator's GPU option: a GPU group "0", which a CPU torch ignores
        job_ws = simulate(cfg, str(tmp_path / "ws"), gpus="0" if nproc == 1 else None)
        sent[nproc] = global_model(job_ws)  # one site: the global model is what it sent
        kept[nproc] = torch.load(os.path.join(simulation_state_root(job_ws), "site-1", PERSONAL_FILE),
                                 weights_only=True)["state"]  # rank 0 alone wrote it
        records = collect_site_records(job_ws)["site-1"]
        assert [r["round"] for r in records] == [1] and records[0]["steps"] == 2
        assert records[0]["device"].startswith("2 processes (DDP), rank 0 on cpu" if nproc == 2 else "cpu")
    assert sorted(sent[2]) == sorted(sent[1]) and any(".head." in k or k.startswith("head.") for k in sent[1])
    for k in sent[1]:
        torch.testing.assert_close(sent[2][k], sent[1][k], atol=1e-5, rtol=0)
    # the personal adapter too (its A also takes the orthogonality gradient: the balance of the two losses matters)
    assert sorted(kept[2]) == sorted(kept[1]) and any(".personal." in k for k in kept[1])
    for k in kept[1]:
        torch.testing.assert_close(kept[2][k], kept[1][k], atol=1e-5, rtol=0)
    start = tiny_config(root)  # and they did train: B left zero
    assert any(float(v.abs().max()) > 0 for k, v in sent[1].items() if ".lora_B." in k), start.name


def site_executor(job):
    """The site executor as FLARE builds it at a site: its class, from the exported args."""
    from fedopal.site.executor import FedOpalSiteExecutor

    client = json.load(open(os.path.join(job, "app", "config", "config_fed_client.json")))
    executor = client["executors"][0]["executor"]
    assert executor["path"] == "fedopal.site.executor.FedOpalSiteExecutor"
    return FedOpalSiteExecutor(**executor["args"])


def test_a_multi_process_site_is_launched_by_torchrun_and_asks_flare_for_its_gpus(tmp_path):
    cfg = tiny_config(nproc_per_site=2, device="cuda")  # a job exported here may run on GPU sites
    cfg.federation.gpu_mem_gib = 16
    job = export_job(cfg, str(tmp_path), "no-code")
    executor = site_executor(job)
    assert executor.execution_mode == "external_process"
    command = executor._command
    assert command[:4] == ["python3", "-u", "-m", "torch.distributed.run"] and "--nproc_per_node=2" in command
    assert "--standalone" in command  # a free rendezvous port: two sites on one machine do not collide
    assert command[7:9] == ["-m", "fedopal.site.client"]  # the site's installed runtime, no path of this machine
    meta = json.load(open(os.path.join(job, "meta.json")))
    assert meta["resource_spec"] == {s: {"num_of_gpus": 2, "mem_per_gpu_in_GiB": 16.0} for s in ("site-1", "site-2")}


def test_a_job_for_any_device_asks_for_no_gpu(tmp_path):
    job = export_job(tiny_config(), str(tmp_path), "no-code")  # device auto: CPU sites may run it too
    assert json.load(open(os.path.join(job, "meta.json")))["resource_spec"] == {}
    assert site_executor(job).execution_mode == "in_process"


def test_poc_gpu_ids_reach_nvflare_poc_start_as_its_own_parser_reads_them():
    import argparse
    import sys

    from nvflare.tool.poc.poc_commands import def_poc_parser

    sys.path.insert(0, os.path.join(REPO, "poc_setup"))
    from poc import start_args

    parser = argparse.ArgumentParser()
    def_poc_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(start_args(120, [0, 1]))
    assert args.gpu == [0, 1]
    assert parser.parse_args(start_args(120, None)).gpu is None
