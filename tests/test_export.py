"""A site's model as files: safetensors + manifest per view, reloadable with the same outputs, merged or not."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedopal.model.adapters import build_model
from fedopal.config import ConfigError, config_from_dict
from fedopal.site.data import build_datasets, read_manifest
from fedopal.site.export import (ADAPTERS, MANIFEST, MERGED, ExportError, SiteExporter, export_site_model, load_exported,
                            replace_folder)
from fedopal.specs.methods import METHODS, get_method, group_of
from fedopal.site.train import SiteTrainer

from conftest import tiny_config

X = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def trained_site_model(federation, site="site-1", method="fedopal_w", steps=3, augment=True, **train):
    """A tiny model really trained a few steps on one site of the small federation, and its evaluation."""
    root, _ = federation
    cfg = tiny_config(root, method=method, local_steps=steps, lr=5e-3, **train)
    cfg.data.augment = augment
    model = build_model(cfg, get_method(method, cfg.model.head), site)
    samples = read_manifest(str(root / site / "manifest.csv"), 2)
    trainer = SiteTrainer(model, build_datasets(cfg.data, samples, model.in_channels, model.normalization),
                          cfg.train, cfg.data.batch_size)
    trainer.train_round()
    return cfg, model, trainer, trainer.evaluate()


def perturbed(method, head="shared"):
    """A tiny model whose every trainable tensor moved away from its init (B is no longer zero)."""
    cfg = tiny_config(method=method)
    model = build_model(cfg, get_method(method, head), "site-1")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return cfg, model.eval()


def outputs(model, view):
    with torch.no_grad(), model.only_adapters(["global"]) if view == "global_only" else torch.no_grad():
        return model(X)


@pytest.fixture(scope="module")
def exported(small_federation, tmp_path_factory):
    cfg, model, trainer, metrics = trained_site_model(small_federation)
    folder = tmp_path_factory.mktemp("export")
    views = export_site_model(model, cfg, str(folder), 0, metrics, merged=True, site="site-1", total_rounds=2)
    return cfg, model.eval(), metrics, views


def test_each_view_is_safetensors_plus_a_manifest_of_method_config_round_and_metrics(exported):
    cfg, _, metrics, views = exported
    assert set(views) == {"personalized", "global_only"}
    for view, folder in views.items():
        assert sorted(os.listdir(folder)) == [ADAPTERS, MANIFEST, MERGED]
        manifest = json.load(open(os.path.join(folder, MANIFEST)))
        assert manifest["method"] == "fedopal_w" and manifest["view"] == view and manifest["site"] == "site-1"
        assert manifest["round"] == 1 and manifest["total_rounds"] == 2  # counted from 1, as the tables
        assert manifest["config"]["model"] == cfg.model_dump(mode="json")["model"]
        assert manifest["metrics"]["test/balanced_accuracy"] == metrics[f"{view}/test/balanced_accuracy"]
        assert manifest["backbone"]["family"] == "monai_vit" and len(manifest["backbone"]["sha256"]) == 64


def test_adapter_file_references_the_backbone_instead_of_copying_it(exported):
    _, _, _, views = exported
    personalized = {group_of(k) for k in load_file(os.path.join(views["personalized"], ADAPTERS))}
    global_only = {group_of(k) for k in load_file(os.path.join(views["global_only"], ADAPTERS))}
    assert personalized == {"global.A", "global.B", "personal.A", "personal.B", "head"}
    assert global_only == {"global.A", "global.B", "head"}  # nothing personal: it can go to another site
    assert json.load(open(os.path.join(views["global_only"], MANIFEST)))["shared_only"] is True
    assert os.path.getsize(os.path.join(views["personalized"], ADAPTERS)) < \
        os.path.getsize(os.path.join(views["personalized"], MERGED)) / 3


@pytest.mark.parametrize("view", ["personalized", "global_only"])
def test_exported_model_gives_the_trained_models_outputs(exported, view):
    _, model, _, views = exported
    loaded, _, _ = load_exported(views[view])
    with torch.no_grad():
        assert torch.equal(loaded(X), outputs(model, view))


@pytest.mark.parametrize("view", ["personalized", "global_only"])
def test_merged_model_matches_adapter_model(exported, view):
    _, _, _, views = exported
    adapter_model, _, _ = load_exported(views[view])
    merged_model, _, _ = load_exported(views[view], merged=True)
    assert not any(".lora_" in k for k in merged_model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged_model(X), adapter_model(X), atol=1e-5, rtol=1e-4)


def test_merged_model_loads_without_peft(exported, monkeypatch):
    _, model, _, views = exported
    monkeypatch.setitem(sys.modules, "peft", None)  # any `import peft` now raises ImportError
    monkeypatch.setitem(sys.modules, "fedopal.model.adapters", None)
    merged_model, _, _ = load_exported(views["personalized"], merged=True)
    with torch.no_grad():
        torch.testing.assert_close(merged_model(X), outputs(model, "personalized"), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "feddpa"])
def test_every_method_round_trips_through_its_export(method, tmp_path):
    cfg, model = perturbed(method, head="personal")
    views = export_site_model(model, cfg, str(tmp_path), 3, {}, merged=True)
    for view, folder in views.items():
        expected = outputs(model, view)
        for merged in (False, True):
            loaded, _, manifest = load_exported(folder, merged=merged)
            with torch.no_grad():
                torch.testing.assert_close(loaded(X), expected, atol=1e-5, rtol=1e-4)
        assert manifest["method"] == method and manifest["round"] == 4


def test_feddpa_export_leaves_the_patient_derived_feature_bank_out_unless_asked(small_federation, tmp_path):
    cfg, model, trainer, metrics = trained_site_model(small_federation, method="feddpa", augment=False)
    assert not cfg.export.feature_bank  # the default
    views = SiteExporter(model, cfg, str(tmp_path), "site-1", trainer.datasets["train"]).write(0, metrics)
    loaded, _, manifest = load_exported(views["personalized"])
    assert manifest["inference_weighting"] is None and "not exported" in manifest["feature_bank"]
    assert not any("instance_bank" in k for k in load_file(
        os.path.join(views["personalized"], ADAPTERS)))
    with torch.no_grad():  # the personal adapter at weight 1: the plain personalized model
        torch.testing.assert_close(loaded(X), outputs(model, "personalized"), atol=1e-5, rtol=1e-4)


def test_feddpa_export_keeps_the_instance_weighting_when_asked(small_federation, tmp_path):
    # No augmentation: FedDPA's feature bank is computed through the training pipeline, so with augmentation on,
    # every computation of it (the trainer's, the exporter's) draws other images.
    cfg, model, trainer, metrics = trained_site_model(small_federation, method="feddpa", augment=False)
    cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"feature_bank": True})})
    exporter = SiteExporter(model, cfg, str(tmp_path), "site-1", trainer.datasets["train"])
    views = exporter.write(0, metrics)
    loaded, _, manifest = load_exported(views["personalized"])
    assert manifest["inference_weighting"]["kind"] == "instance_similarity"
    assert manifest["feature_bank"].startswith(f"exported: {len(trainer.datasets['train'])} backbone embeddings")
    assert not os.path.exists(os.path.join(views["personalized"], MERGED))  # per-input weights cannot be folded
    _, expected = trainer.predict("test", personalized=True)  # what the site measured, FedDPA weighting included
    with torch.no_grad():
        images = torch.cat([b["image"] for b in torch.utils.data.DataLoader(trainer.datasets["test"], batch_size=32)])
        torch.testing.assert_close(torch.softmax(loaded(images), dim=1).numpy(), expected, atol=1e-5, rtol=1e-4)


def test_best_export_follows_validation_never_test(tmp_path):
    cfg, model = perturbed("fedopal_w")
    exporter = SiteExporter(model, cfg, str(tmp_path), "site-1", run_id="job-1")
    val_test = [(0.60, 0.90), (0.80, 0.50), (0.70, 0.99), (0.80, 0.10)]
    for round_num, (val, test) in enumerate(val_test):
        metrics = {f"{v}/{split}/balanced_accuracy": score for v in ("personalized", "global_only")
                   for split, score in (("val", val), ("test", test))}
        exporter.write(round_num, metrics, total_rounds=4)
    best = json.load(open(tmp_path / "export" / "best" / "personalized" / MANIFEST))
    last = json.load(open(tmp_path / "export" / "last" / "personalized" / MANIFEST))
    assert best["round"] == 2  # the first of the two best validation rounds, as report.py selects (from 1)
    assert last["round"] == 4
    assert not [n for n in os.listdir(tmp_path / "export" / "best") if n.startswith(".")]  # no temp left behind


def test_views_are_written_only_when_best_changes_and_at_the_last_round(tmp_path):
    cfg, model = perturbed("fedopal_w")
    exporter = SiteExporter(model, cfg, str(tmp_path), "site-1", run_id="job-1")
    best = tmp_path / "export" / "best" / "personalized" / MANIFEST
    last = tmp_path / "export" / "last" / "personalized" / MANIFEST
    written = []
    for round_num, val in enumerate([0.6, 0.8, 0.7, 0.8]):
        before = os.stat(best).st_mtime_ns if best.exists() else None
        views = exporter.write(round_num, {"personalized/val/balanced_accuracy": val,
                                           "global_only/val/balanced_accuracy": val}, total_rounds=4)
        written.append(sorted(views))
        assert last.exists() == (round_num == 3)
        if round_num in (2, 3):  # no improvement: best untouched
            assert os.stat(best).st_mtime_ns == before
    assert written == [["global_only", "personalized"]] * 2 + [[]] + [["global_only", "personalized"]]
    assert json.load(open(best))["round"] == 2 and json.load(open(last))["round"] == 4


def test_a_new_run_replaces_the_best_export_of_an_earlier_run(tmp_path):
    cfg, model = perturbed("fedopal_w")
    metrics = {"personalized/val/balanced_accuracy": 0.9, "global_only/val/balanced_accuracy": 0.9}
    SiteExporter(model, cfg, str(tmp_path), "site-1", run_id="job-1").write(4, metrics)
    SiteExporter(model, cfg, str(tmp_path), "site-1", run_id="job-2").write(0, {})
    assert json.load(open(tmp_path / "export" / "best" / "personalized" / MANIFEST))["run_id"] == "job-2"


def test_a_failed_export_leaves_the_previous_one_intact(tmp_path):
    target = tmp_path / "view"
    replace_folder(lambda tmp: open(os.path.join(tmp, "a.txt"), "w").write("first"), str(target))

    def broken(tmp):
        open(os.path.join(tmp, "a.txt"), "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        replace_folder(broken, str(target))
    assert open(target / "a.txt").read() == "first"
    assert os.listdir(tmp_path) == ["view"]


def test_corrupt_safetensors_is_refused_with_the_file_and_the_fix(exported, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(exported[3]["personalized"], folder)
    data = bytearray((folder / ADAPTERS).read_bytes())
    data[100:110] = b"\xff" * 10
    (folder / ADAPTERS).write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"adapters\.safetensors: corrupt .*Fix:"):
        load_exported(str(folder))
    manifest = json.load(open(folder / MANIFEST))
    manifest["files"] = {}  # no recorded hash: the safetensors reader itself must refuse the file
    json.dump(manifest, open(folder / MANIFEST, "w"))
    (folder / ADAPTERS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ExportError, match=r"not a readable safetensors file.*Fix:"):
        load_exported(str(folder))


def test_a_backbone_that_differs_from_the_reference_is_refused(exported, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(exported[3]["personalized"], folder)
    manifest = json.load(open(folder / MANIFEST))
    manifest["config"]["train"]["seed"] = 7  # a random-init ViT from another seed: other backbone weights
    json.dump(manifest, open(folder / MANIFEST, "w"))
    with pytest.raises(ExportError, match="differs from the one this model was trained on. Fix:"):
        load_exported(str(folder))
    load_exported(str(folder), merged=True)  # the merged copy carries its own backbone


def test_missing_folder_or_manifest_says_which_folder_to_pass(exported, tmp_path):
    with pytest.raises(ExportError, match=r"export folder not found\. Fix:"):
        load_exported(str(tmp_path / "nowhere"))
    root = os.path.dirname(exported[3]["personalized"])
    with pytest.raises(ExportError, match="views inside: global_only, personalized"):
        load_exported(root)


def test_export_merged_is_a_validated_config_key():
    assert config_from_dict({}).export.merged is False
    assert config_from_dict({"export": {"merged": True}}).export.merged is True
    with pytest.raises(ConfigError, match="invalid value for 'export.merged'"):
        config_from_dict({"export": {"merged": "sometimes"}})
    with pytest.raises(ConfigError, match="unknown key 'export.merge'. Did you mean 'merged'\? Allowed keys here: merged"):
        config_from_dict({"export": {"merge": True}})


def test_under_update_dp_round_one_never_becomes_the_best_export(tmp_path):
    """Round 1 trains from the clean initial global model; under update-mode DP it is not eligible, even when its
    validation score is the best (selection.first_eligible_round)."""
    cfg, model = perturbed("fedopal_w")
    exporter = SiteExporter(model, cfg, str(tmp_path), "site-1", run_id="job-1", first_eligible_round=2)
    for round_num, val in enumerate((0.95, 0.60, 0.70)):
        metrics = {f"{v}/{s}/balanced_accuracy": val for v in ("personalized", "global_only") for s in ("val", "test")}
        exporter.write(round_num, metrics, total_rounds=3)
    best = json.load(open(tmp_path / "export" / "best" / "personalized" / MANIFEST))
    assert best["round"] == 3  # the best eligible validation round (0.70), counted from 1
