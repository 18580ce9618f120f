"""`python -m fedopal.site.predict`: an exported model on a manifest or on files, probabilities to CSV, metrics if labelled."""

import csv
import os
import shutil

import numpy as np
import pytest

from fedopal.model.adapters import build_model
from fedopal.config import config_from_dict
from fedopal.site.export import ADAPTERS, export_site_model
from fedopal.specs.methods import get_method
from fedopal.site.predict import evaluate_export, main
from fedopal.tools.prepare import build_federation

from conftest import REPO
from test_export import trained_site_model


@pytest.fixture(scope="module")
def site_export(small_federation, tmp_path_factory):
    """site-1's model after a few real steps, exported with its merged copy, and what the site measured."""
    cfg, model, trainer, metrics = trained_site_model(small_federation)
    views = export_site_model(model, cfg, str(tmp_path_factory.mktemp("export")), 0, metrics, merged=True,
                              site="site-1")
    return views, metrics, small_federation[0] / "site-1"


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("view", ["personalized", "global_only"])
def test_predict_reproduces_the_sites_own_test_metrics(site_export, view, tmp_path, capsys):
    views, metrics, site_dir = site_export
    out = tmp_path / "pred.csv"
    code = main(["--model", views[view], "--manifest", str(site_dir / "manifest.csv"), "--split", "test",
                 "--out", str(out)])
    assert code == 0
    rows = read_rows(out)
    assert len(rows) == 16 and {r["split"] for r in rows} == {"test"}
    probs = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [int(r["prediction"]) for r in rows] == list(probs.argmax(axis=1))
    printed = capsys.readouterr().out
    assert f"balanced accuracy {metrics[f'{view}/test/balanced_accuracy']:.3f}" in printed
    assert f"AUC {metrics[f'{view}/test/auc']:.3f}" in printed


def test_evaluate_export_gives_the_metrics_the_site_recorded(site_export):
    views, metrics, site_dir = site_export
    got = evaluate_export(views["global_only"], str(site_dir / "manifest.csv"), split="val")
    for name in ("balanced_accuracy", "accuracy", "auc"):
        assert got[name] == pytest.approx(metrics[f"global_only/val/{name}"], abs=1e-6)


def test_merged_copy_predicts_the_same_classes(site_export, tmp_path):
    views, _, site_dir = site_export
    for merged in (False, True):
        args = ["--model", views["personalized"], "--manifest", str(site_dir / "manifest.csv"),
                "--out", str(tmp_path / f"{merged}.csv")]
        assert main(args + (["--merged"] if merged else [])) == 0
    plain, merged = read_rows(tmp_path / "False.csv"), read_rows(tmp_path / "True.csv")
    assert len(plain) == 48 + 16 + 16
    assert [r["prediction"] for r in plain] == [r["prediction"] for r in merged]
    np.testing.assert_allclose([float(r["prob_1"]) for r in plain], [float(r["prob_1"]) for r in merged], atol=1e-4)


def test_unlabelled_folder_gets_probabilities_and_no_metrics(site_export, tmp_path, capsys):
    views, _, site_dir = site_export
    scans = tmp_path / "scans" / "nested"
    shutil.copytree(site_dir / "images", scans)
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    out = tmp_path / "pred.csv"
    assert main(["--model", views["personalized"], "--input", str(tmp_path / "scans"), "--out", str(out)]) == 0
    rows = read_rows(out)
    assert len(rows) == len(os.listdir(scans)) and list(rows[0]) == ["path", "prediction", "prob_0", "prob_1"]
    assert "balanced accuracy" not in capsys.readouterr().out


def test_predict_reads_3d_volumes(tmp_path):
    fed = tmp_path / "fed3d"
    build_federation(f"{REPO}/data/medmnist/adrenalmnist3d.npz", str(fed), num_sites=1, seed=0, train_per_site=4,
                     val_per_site=2, test_per_site=4, min_test_per_class=2, min_val_per_class=1, skew_prior="global")
    cfg = config_from_dict({"data": {"spatial_dims": 3, "image_size": 16, "batch_size": 4},
                            "model": {"backbone": "monai_vit", "pretrained": False, "lora_rank": 2,
                                      "vit": {"patch_size": 8, "hidden_size": 24, "mlp_dim": 48, "num_layers": 1,
                                              "num_heads": 2}}})
    model = build_model(cfg, get_method("fedopal_w"), "site-1")
    views = export_site_model(model, cfg, str(tmp_path / "export"), 0, {})
    out = tmp_path / "pred.csv"
    assert main(["--model", views["personalized"], "--manifest", str(fed / "site-1" / "manifest.csv"),
                 "--split", "test", "--out", str(out)]) == 0
    rows = read_rows(out)
    test_rows = [r for r in read_rows(fed / "site-1" / "manifest.csv") if r["split"] == "test"]
    assert len(rows) == len(test_rows) and all(r["path"].endswith(".nii.gz") for r in rows)


def _damage(views, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(views["personalized"], folder)
    (folder / ADAPTERS).write_bytes((folder / ADAPTERS).read_bytes()[:200])
    return str(folder)


def _bad_manifest(tmp_path, text):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "missing export folder": (lambda v, s, t: ["--model", str(t / "nowhere"), "--manifest", str(s / "manifest.csv")],
                              "export folder not found"),
    "corrupt safetensors": (lambda v, s, t: ["--model", _damage(v, t), "--manifest", str(s / "manifest.csv")],
                            "adapters.safetensors: corrupt"),
    "label out of range": (lambda v, s, t: ["--model", v["personalized"], "--manifest",
                                            _bad_manifest(t, f"path,label\n{_an_image(s)},7\n")],
                           "bad.csv:2: label 7 is out of range"),
    "missing image file": (lambda v, s, t: ["--model", v["personalized"], "--manifest",
                                            _bad_manifest(t, "path\nmissing.png\n")],
                           "bad.csv:2: image file not found"),
    "missing input": (lambda v, s, t: ["--model", v["personalized"], "--input", str(t / "no_such_scan.png")],
                      "no_such_scan.png: input file or folder not found"),
    "split without split column": (lambda v, s, t: ["--model", v["personalized"], "--split", "test", "--manifest",
                                                    _bad_manifest(t, f"path\n{_an_image(s)}\n")],
                                   "no 'split' column"),
    "unreadable image": (lambda v, s, t: ["--model", v["personalized"], "--manifest",
                                          _bad_manifest(t, f"path\n{_fake_png(t)}\n")],
                         "fake.png: corrupt or unreadable image"),
}


def _an_image(site_dir):
    return sorted((site_dir / "images").iterdir())[0]


def _fake_png(tmp_path):
    path = tmp_path / "fake.png"
    path.write_bytes(b"this is not a PNG")
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_file_and_the_fix_and_keeps_previous_output(site_export, tmp_path, capsys,
                                                                                   case):
    views, _, site_dir = site_export
    make_args, expected = BAD_INPUTS[case]
    out = tmp_path / "predictions.csv"
    out.write_text("earlier results\n")
    code = main(make_args(views, site_dir, tmp_path) + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err and "Fix:" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert out.read_text() == "earlier results\n"
