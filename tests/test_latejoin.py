"""A late-joining site: the federation's global adapter frozen, its own personal adapter and head trained."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fedopal.site.export import ADAPTERS, MANIFEST, export_site_model
from fedopal.site.data import read_manifest
from fedopal.site.latejoin import limit_train, main
from fedopal.specs.methods import get_method
from fedopal.site.predict import main as predict_main

from test_export import trained_site_model


def test_late_join_trains_only_the_personal_adapter_and_head_and_sends_nothing():
    spec = get_method("late_join", "shared")  # the head mode cannot make it share anything
    assert spec.adapters == ("global", "personal")
    assert set(spec.trainable) == {"personal.A", "personal.B", "head"}
    assert spec.shared == () and spec.regularizer == "weight"


@pytest.fixture(scope="module")
def federation_global(small_federation, tmp_path_factory):
    """What a finished federation leaves: the server's FL_global_model.pt (a dict whose "model" holds the shared
    tensors) and the config it trained with; here from a model trained a few steps on site-1."""
    cfg, model, _, metrics = trained_site_model(small_federation, site="site-1")
    folder = tmp_path_factory.mktemp("fed")
    path = folder / "FL_global_model.pt"
    torch.save({"model": model.shared_state(), "meta_props": {"current_round": 1}}, path)
    config = folder / "fed.json"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    views = export_site_model(model, cfg, str(folder / "export"), 1, metrics)
    return path, config, views, model.shared_state()


def test_late_joiner_keeps_the_global_adapter_frozen_and_learns_its_own(small_federation, federation_global,
                                                                        tmp_path, capsys):
    global_path, config, _, shared = federation_global
    site_dir = small_federation[0] / "site-2"
    out = tmp_path / "site-2-state"
    assert main(["--global-model", str(global_path), "--config", str(config), "--site-dir", str(site_dir),
                 "--out", str(out)]) == 0
    assert "site-2 joined: test balanced accuracy" in capsys.readouterr().out
    last = out / "export" / "last" / "personalized"
    tensors = load_file(last / ADAPTERS)
    global_keys = [k for k in shared if ".global." in k]
    assert global_keys and all(torch.equal(tensors[k], shared[k]) for k in global_keys)  # frozen
    assert any(tensors[k].abs().sum() > 0 for k in tensors if ".lora_B.personal." in k)  # B left zero: it trained
    assert not torch.equal(tensors["head.weight"], shared["head.weight"])  # the head started global, then trained
    manifest = json.load(open(last / MANIFEST))
    assert manifest["method"] == "late_join" and manifest["site"] == "site-2"
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    # round 0: the starting model (the global model, exactly), so that validation may choose not to train
    assert [r["round"] for r in records] == [0, 1, 2] and all(r["bytes_sent"] == 0 for r in records)
    assert all(r["method"] == records[0]["method"] and r["n_train"] > 0 for r in records)
    assert records[0]["personalized/test/auc"] == pytest.approx(records[0]["global_only/test/auc"])
    # the late joiner's model is a site export like any other
    assert predict_main(["--model", str(out / "export" / "best" / "personalized"), "--manifest", str(site_dir / "manifest.csv"), "--split", "test",
                         "--out", str(tmp_path / "pred.csv")]) == 0


def test_a_global_only_export_brings_its_own_config(small_federation, federation_global, tmp_path):
    _, _, views, _ = federation_global
    out = tmp_path / "joined"
    assert main(["--global-model", views["global_only"], "--site-dir", str(small_federation[0] / "site-2"),
                 "--out", str(out), "--set", "train.num_rounds=1"]) == 0
    assert len(open(out / "metrics.jsonl").readlines()) == 2  # before training, round 1


def test_compare_reports_global_only_late_join_and_local_only(small_federation, federation_global, tmp_path):
    global_path, config, _, _ = federation_global
    out = tmp_path / "compare"
    assert main(["--compare", "--global-model", str(global_path), "--config", str(config), "--site-dir",
                 str(small_federation[0] / "site-2"), "--out", str(out), "--seeds", "0", "1",
                 "--set", "train.num_rounds=1", "--train-limit", "12"]) == 0
    summary = json.load(open(out / "compare.json"))
    assert summary["train_images"] == 12
    assert [len(summary["results"][k]) for k in ("global_only", "late_join", "local")] == [1, 2, 2]
    # a fair comparison: the same tensors train (personal adapter + head); only the frozen global adapter differs
    assert summary["results"]["late_join"][0]["trainable_params"] == summary["results"]["local"][0]["trainable_params"]
    table = open(out / "compare.md").read()
    for row in ("global model, no training", "late join", "local only"):
        assert row in table
    # the global model was exported, and the predict path scored it on the new site's test split
    assert os.path.isfile(out / "global_model" / MANIFEST)


def test_a_smaller_hospital_keeps_every_class_and_the_same_subset_for_every_run(small_federation):
    samples = read_manifest(str(small_federation[0] / "site-1" / "manifest.csv"), 2)
    small = limit_train(samples, 10)
    train = [s for s in small if s.split == "train"]
    assert abs(len(train) - 10) <= 1 and {s.label for s in train} == {0, 1}
    assert [s for s in small if s.split != "train"] == [s for s in samples if s.split != "train"]
    assert limit_train(samples, 10) == small


@pytest.mark.parametrize("case,expected", [
    ("other rank", "does not fit the model of this config"),
    ("personalized export", "a personalized export holds another site's personal adapter"),
    ("missing file", "global model not found"),
    ("no config", "carries no config. Fix: pass --config"),
    ("previous run", "already holds a run"),
])
def test_bad_global_model_or_output_is_one_line_and_nothing_is_overwritten(small_federation, federation_global,
                                                                         tmp_path, capsys, case, expected):
    global_path, config, views, _ = federation_global
    out = tmp_path / "out"
    args = {"other rank": ["--global-model", str(global_path), "--config", str(config), "--set", "model.lora_rank=2"],
            "personalized export": ["--global-model", views["personalized"]],
            "missing file": ["--global-model", str(tmp_path / "FL_global_model.pt"), "--config", str(config)],
            "no config": ["--global-model", str(global_path)],
            "previous run": ["--global-model", str(global_path), "--config", str(config)]}[case]
    if case == "previous run":
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"round": 0}\n')
    code = main(args + ["--site-dir", str(small_federation[0] / "site-2"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and "Fix:" in err and len(err.splitlines()) == 1
    if case == "previous run":
        assert (out / "metrics.jsonl").read_text() == '{"round": 0}\n' and sorted(os.listdir(out)) == ["metrics.jsonl"]
    else:
        assert not out.exists()
