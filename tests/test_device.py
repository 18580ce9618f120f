"""train.device: auto and cpu train here; a GPU asked for where there is none stops every command with one line,
exit 2, and nothing written."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from fedopal.model.adapters import build_model
from fedopal.config import ConfigError, config_from_dict
from fedopal.site.device import DeviceError, cpu_copy, describe, resolve_device
from fedopal.specs.methods import get_method

from conftest import REPO, tiny_config

ENV = dict(os.environ)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def test_auto_is_the_gpu_when_torch_sees_one_else_the_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert describe(torch.device("cpu"), "bf16", 1) == "cpu (1 thread), bf16"


@pytest.mark.parametrize("value", ["gpu", "cuda:", "CUDA", "cuda:x", "tpu"])
def test_device_names_outside_the_list_are_config_errors(value):
    with pytest.raises(ConfigError, match=r"train\.device.*allowed: auto, cpu, cuda, cuda:N"):
        config_from_dict({"train": {"device": value}})


def test_a_pinned_gpu_with_several_processes_is_a_config_error():
    with pytest.raises(ConfigError, match="nproc_per_site"):
        config_from_dict({"train": {"device": "cuda:1", "nproc_per_site": 2}})


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_one_line_naming_the_key_and_the_fix(name):
    with pytest.raises(DeviceError) as err:
        resolve_device(name)
    text = str(err.value)
    assert "\n" not in text and "train.device" in text and "Fix: set train.device: auto" in text


def test_cpu_copy_is_an_independent_equal_copy(tiny_cfg):
    model = build_model(tiny_cfg, get_method("fedopal_w", "shared"), "site-1")
    twin = cpu_copy(model)
    own, copied = model.state_dict(), twin.state_dict()
    assert list(copied) == list(own) and all(torch.equal(own[k], copied[k]) for k in own)
    with torch.no_grad():
        next(p for p in twin.parameters() if p.requires_grad).add_(1.0)
    assert any(not torch.equal(own[k], v) for k, v in twin.state_dict().items())
    assert all(p.requires_grad == q.requires_grad for p, q in zip(model.parameters(), twin.parameters()))


def run(args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", *args], env=ENV, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.device" in errors[0] and "Fix:" in errors[0], proc.stderr[-2000:]


@no_cuda
def test_simulate_on_a_missing_gpu_stops_before_anything_is_written(small_federation, tmp_path):
    root, _ = small_federation
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root).model_dump(mode="json")))
    ws, results = tmp_path / "ws", tmp_path / "results"
    proc = run(["fedopal.tools.job", "--config", str(config), "--simulate", "--workspace", str(ws), "--results",
                str(results), "--set", "train.device=cuda"])
    assert_one_line_error(proc)
    assert not ws.exists() and not results.exists()


@no_cuda
def test_bench_on_a_missing_gpu_stops_before_anything_is_written(small_federation, tmp_path):
    root, _ = small_federation
    raw = tiny_config(root).model_dump(mode="json")
    raw["bench"] = {"methods": ["fedavg_lora"], "seeds": [0], "out_dir": str(tmp_path / "bench")}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = run(["fedopal.tools.bench", "--config", str(config), "--workspace", str(tmp_path / "ws"),
                "--set", "train.device=cuda:1"])
    assert_one_line_error(proc)
    assert not (tmp_path / "bench").exists() and not (tmp_path / "ws").exists()


@no_cuda
def test_predict_on_a_missing_gpu_writes_no_predictions(small_federation, tmp_path):
    from fedopal.site.export import export_site_model

    root, _ = small_federation
    cfg = tiny_config(root)
    model = build_model(cfg, get_method("fedopal_w", "shared"), "site-1")
    folder = export_site_model(model, cfg, str(tmp_path / "export"), 0, {})["personalized"]
    out = tmp_path / "predictions.csv"
    proc = run(["fedopal.site.predict", "--model", folder, "--input", str(root / "site-1" / "images"), "--out", str(out),
                "--device", "cuda"])
    assert_one_line_error(proc)
    assert not out.exists()
