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
    printed = capsys.readouterr().out
    assert "balanced accuracy" not in printed
    n = len(rows)
    assert f"{n + 1} files: {n} predicted, 1 skipped (1 not a" in printed  # readers.unsupported_reason's words
    assert f"), listed in {tmp_path / 'pred.skipped.csv'}" in printed
    assert [r["path"] for r in read_rows(tmp_path / "pred.skipped.csv")] == [str(tmp_path / "scans" / "notes.txt")]


def _pacs_export(folder, pngs):
    """What a PACS export looks like: a DICOMDIR and one suffixless DICOM file per image in PT*/ST*/SE*/ folders
    (pydicom's FileSet writes both), the pixels of `pngs`; plus the clutter a real folder holds."""
    from PIL import Image
    from pydicom import dcmread
    from pydicom.fileset import FileSet

    from dicomgen import write_dicom

    staging, fs = folder.parent / "staging", FileSet()
    staging.mkdir()
    for k, png in enumerate(pngs):
        path = write_dicom(staging / f"{k}.dcm", np.asarray(Image.open(png)), instance=k + 1)
        ds = dcmread(path)
        ds.PatientID, ds.StudyDate, ds.StudyTime, ds.StudyID, ds.SeriesNumber = f"P{k}", "20260101", "120000", "1", 1
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        fs.add(ds)
    fs.write(folder)
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "README.txt").write_text("exported by the PACS")
    (folder / "broken.dcm").write_bytes((staging / "0.dcm").read_bytes()[:-100])  # a DICOM whose pixels are cut
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.startswith("IM"))


def test_pacs_folder_predicts_suffixless_dicom_and_lists_every_other_file(site_export, tmp_path, capsys):
    """Suffixless DICOM files are found by their content and predicted as their PNGs are; the DICOMDIR, the empty
    file, the note and the file that fails to decode are each listed with a reason, and the rest still predicted."""
    from pydicom import dcmread

    views, _, site_dir = site_export
    pngs = sorted((site_dir / "images").iterdir())[:3]
    images = _pacs_export(tmp_path / "export", pngs)
    out = tmp_path / "predictions.csv"
    assert main(["--model", views["personalized"], "--input", str(tmp_path / "export"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if " files: " in line)  # the kinds are readers' words
    assert line.startswith("7 files: 3 predicted, 4 skipped (1 DICOMDIR, 1 empty file, 1 ")
    assert line.endswith(f", 1 unreadable), listed in {tmp_path / 'predictions.skipped.csv'}")
    skipped = {os.path.basename(r["path"]): r["reason"] for r in read_rows(tmp_path / "predictions.skipped.csv")}
    assert set(skipped) == {"DICOMDIR", "empty.dcm", "README.txt", "broken.dcm"}
    assert "DICOMDIR" in skipped["DICOMDIR"] and "0 bytes" in skipped["empty.dcm"]
    assert "DICOM" in skipped["broken.dcm"] and "Fix:" in skipped["broken.dcm"]  # the decoder's own one line

    rows = read_rows(out)  # joined back by the identifiers pydicom reads from each file
    assert list(rows[0])[:5] == ["path", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"]
    assert [r["path"] for r in rows] == [str(p) for p in images]
    for row, image in zip(rows, images):
        ds = dcmread(image)
        assert (row["SOPInstanceUID"], row["StudyInstanceUID"], row["SeriesInstanceUID"], row["PatientID"]) == (
            ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID)
    # the same pixels as PNG files: the same probabilities
    assert main(["--model", views["personalized"], "--input", *map(str, pngs), "--out", str(tmp_path / "png.csv")]) == 0
    by_patient = {r["PatientID"]: float(r["prob_1"]) for r in rows}
    from_png = [float(r["prob_1"]) for r in read_rows(tmp_path / "png.csv")]
    np.testing.assert_allclose([by_patient[f"P{k}"] for k in range(3)], from_png, atol=1e-5)
    assert "PatientID" not in read_rows(tmp_path / "png.csv")[0]


def test_dicom_ids_of_a_series_folder_are_the_series_and_no_sop(tmp_path):
    from pydicom import dcmread

    from dicomgen import write_series
    from fedopal.site.predict import dicom_ids

    folder = write_series(tmp_path / "series", np.zeros((8, 8, 4), np.uint16))
    ds = dcmread(next(p for p in (tmp_path / "series").iterdir()))
    assert dicom_ids(folder) == {"SOPInstanceUID": "", "StudyInstanceUID": ds.StudyInstanceUID,
                                 "SeriesInstanceUID": ds.SeriesInstanceUID, "PatientID": ds.PatientID}
    (tmp_path / "a.png").write_bytes(b"")
    assert dicom_ids(str(tmp_path / "a.png")) is None


def test_nothing_predictable_is_one_line_and_keeps_previous_predictions(site_export, tmp_path, capsys):
    views, _, _ = site_export
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("x")
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "predictions.csv"
    out.write_text("earlier results\n")
    assert main(["--model", views["personalized"], "--input", str(tmp_path / "in"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "none of the 2 files can be predicted (" in err and "Fix:" in err
    assert out.read_text() == "earlier results\n"
    assert len(read_rows(tmp_path / "predictions.skipped.csv")) == 2


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
                                          _bad_manifest(t, f"path\n{_cut_png(s, t)}\n")],
                         "cut.png: corrupt or unreadable image"),
    "not an image": (lambda v, s, t: ["--model", v["personalized"], "--manifest",
                                      _bad_manifest(t, f"path\n{_fake_png(t)}\n")],
                     "fake.png: not a supported image"),
}


def _an_image(site_dir):
    return sorted((site_dir / "images").iterdir())[0]


def _cut_png(site_dir, tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(_an_image(site_dir).read_bytes()[:60])  # the PNG signature and header, no pixels
    return path


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
