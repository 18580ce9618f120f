"""A job killed mid-run resumes from the last global checkpoint and every site's last personal state; the
round counter continues."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml

from fedopal.tools.report import collect_site_records, metrics_files
from fedopal.site.state import PERSONAL_FILE, simulation_state_root

from conftest import REPO, tiny_config

pytestmark = pytest.mark.slow
ENV = dict(os.environ)


def job_cmd(config, ws, *extra):
    return [sys.executable, "-m", "fedopal.tools.job", "--config", str(config), "--simulate", "--workspace", str(ws), *extra]


def kill_tree(pid):
    """SIGKILL a process and every descendant (the simulator starts its server and sites in new sessions)."""
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    procs = parent.children(recursive=True) + [parent]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    return [p.pid for p in procs]


def rounds_done(job_ws):
    return {s: [r["round"] for r in rs] for s, rs in collect_site_records(job_ws).items()}


def test_killed_job_resumes_where_it_stopped(small_federation, tmp_path):
    root, _ = small_federation
    raw = tiny_config(root).model_dump(mode="json")
    raw["train"].update(num_rounds=4, local_steps=2, lr_schedule="cosine", warmup_steps=1)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    ws = tmp_path / "ws"
    job_ws = ws / raw["name"]
    ckpt = job_ws / "server" / "simulate_job" / "app_server" / "FL_global_model.pt"

    # 1. run, and kill the whole simulator (server and sites) once round 2 has been aggregated
    proc = subprocess.Popen(job_cmd(config, ws), env=ENV, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.time() < deadline, "round 2 never finished"
            if ckpt.exists():
                try:
                    if torch.load(ckpt, map_location="cpu", weights_only=False)["meta_props"]["current_round"] >= 1:
                        break
                except Exception:  # the persistor may be replacing the file right now
                    pass
            time.sleep(0.5)
        killed = kill_tree(proc.pid)  # a crash of every FLARE process at once
        proc.wait(timeout=30)
    finally:
        kill_tree(proc.pid)
    assert not [p for p in killed if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    last = torch.load(ckpt, map_location="cpu", weights_only=False)
    last_round = last["meta_props"]["current_round"]
    assert last_round < 3, "the job finished before the kill"
    saved = {s: torch.load(os.path.join(simulation_state_root(str(job_ws)), s, PERSONAL_FILE), weights_only=True)
             for s in ("site-1", "site-2")}

    # 2. resume: the round counter continues, sites start from their saved personal state
    proc = subprocess.run(job_cmd(config, ws, "--resume"), env=ENV, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = rounds_done(str(job_ws))
    assert all(rounds == [1, 2, 3, 4] for rounds in done.values()), done  # metrics.jsonl counts from 1
    records = [json.loads(line) for p in metrics_files(str(job_ws)) for line in open(p)]
    resumed = [r for r in records if r.get("resumed_from_round") is not None]
    assert {r["round"] for r in resumed} == set(range(last_round + 2, 5))  # last_round: FLARE's, from 0
    for site, ckpt_saved in saved.items():
        first = min((r for r in resumed if r["site"] == site), key=lambda r: r["round"])
        assert first["resumed_from_round"] == ckpt_saved["round"] + 1  # personal_state.pt keeps FLARE's count
        # the global tensors received after the restart are the checkpoint's, not a fresh init
        expected = sum(float((torch.as_tensor(v, dtype=torch.float64) ** 2).sum())
                       for v in last["model"].values()) ** 0.5
        assert first["received_norm"] == pytest.approx(expected, rel=1e-6)
    final = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert final["meta_props"]["current_round"] == 3
    # the cosine learning rate continues across the restart: round k starts at step 2(k-1) of 8 (warm-up 1 step);
    # after the restart it continues from the saved personal state (2 steps per round it holds), so a round that
    # trained before the kill and again after it (the state was saved, the aggregate was not) starts further on
    first_after = {s: min(r["round"] for r in resumed if r["site"] == s) for s in saved}
    for r in records:
        step = (2 * (r["round"] - 1) if r.get("resumed_from_round") is None
                else 2 * (r["resumed_from_round"] + r["round"] - first_after[r["site"]]))
        expected = raw["train"]["lr"] * (step / 1 if step < 1 else 0.5 * (1 + math.cos(math.pi * (step - 1) / 7)))
        assert r["lr_first"] == pytest.approx(expected, abs=1e-12), (r["site"], r["round"])


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, small_federation):
    root, _ = small_federation
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root).model_dump(mode="json")))
    proc = subprocess.run(job_cmd(config, tmp_path / "ws", "--resume"), env=ENV, cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "no global checkpoint to resume from" in proc.stderr
    assert "Traceback" not in proc.stderr
