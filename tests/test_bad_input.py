"""The bad-input catalogue: each case stops before training with one line naming the file, row or field
and the fix, a non-zero exit, and nothing already saved overwritten."""

import contextlib
import csv
import importlib
import io
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, tiny_config

ENV = dict(os.environ)


def make_site(root, site="site-1", n=6, rgb=False, suffix=".png", rows=None):
    folder = root / site
    (folder / "images").mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        name = f"images/{i}{suffix}"
        if suffix == ".png":
            arr = np.full((12, 12, 3) if rgb else (12, 12), i * 20, np.uint8)
            Image.fromarray(arr).save(folder / name)
        elif suffix == ".npy":
            np.save(folder / name, np.full((12, 12, 2) if rgb else (12, 12), i, np.float32))
        else:
            nib.save(nib.Nifti1Image(np.full((8, 8, 8), i, np.uint8), np.eye(4)), str(folder / name))
        written.append((name, i % 2, ("train", "val", "test")[i % 3]))
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(written if rows is None else rows)
    return folder


def write_config(tmp_path, root, **sections):
    raw = tiny_config(root).model_dump(mode="json")
    raw["federation"] = {"num_sites": 1}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def run(module, *args):
    """The module's CLI entry point, in-process (a subprocess per case would cost seconds of imports)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = importlib.import_module(module).main(list(args))
    return code, err.getvalue().strip()


def test_the_cli_exits_non_zero_with_one_line(tmp_path):
    make_site(tmp_path / "fed", rows=[("images/0.png", 5, "train")])
    proc = subprocess.run([sys.executable, "-m", "fedopal.site.validate", "--config", write_config(tmp_path, tmp_path / "fed")],
                          capture_output=True, text=True, env=ENV, cwd=REPO)
    assert_one_line_error(proc.returncode, proc.stderr.strip(), "manifest.csv:2", "out of range")


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert "Fix" in err, err
    for needle in needles:
        assert needle in err, err


def corrupt_png(root):
    folder = make_site(root)
    (folder / "images" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return "3.png"


def truncated_nifti(root):
    folder = make_site(root, suffix=".nii.gz")
    data = (folder / "images" / "4.nii.gz").read_bytes()
    (folder / "images" / "4.nii.gz").write_bytes(data[: len(data) // 2])
    return "4.nii.gz"


def huge_png(root):
    folder = make_site(root)
    Image.new("1", (13600, 13600)).save(folder / "images" / "2.png")  # 1 bit per pixel: cheap to write
    return "2.png: too large to decode safely"


def dicom_site(root, **tags):
    from dicomgen import write_dicom

    folder = make_site(root, rows=[(f"images/{i}.dcm", i % 2, ("train", "val", "test")[i % 3]) for i in range(3)])
    for i in range(3):
        write_dicom(folder / "images" / f"{i}.dcm", np.full((12, 12), i * 20, np.uint8))
    write_dicom(folder / "images" / "1.dcm", **tags)
    return "1.dcm"


CASES = {
    "missing image file": (lambda r: make_site(r, rows=[("images/0.png", 0, "train"), ("images/nope.png", 1, "val"),
                                                          ("images/2.png", 0, "test")]) and "nope.png", {}),
    "corrupt png": (corrupt_png, {}),
    "truncated nifti": (truncated_nifti, {"data": {"spatial_dims": 3, "image_size": 16}}),
    "2d data in a 3d config": (lambda r: make_site(r) and "spatial_dims is 3", {"data": {"spatial_dims": 3}}),
    "3d data in a 2d config": (lambda r: make_site(r, suffix=".nii.gz") and "spatial_dims 2. Fix: set "
                               "data.spatial_dims: 3", {}),
    "label out of range": (lambda r: make_site(r, rows=[("images/0.png", 7, "train")]) and "manifest.csv:2", {}),
    "non-integer label": (lambda r: make_site(r, rows=[("images/0.png", "pneumonia", "train")])
                          and "'pneumonia'", {}),
    "empty site": (lambda r: make_site(r, rows=[]) and "no rows", {}),
    "empty split": (lambda r: make_site(r, rows=[("images/0.png", 0, "train"), ("images/1.png", 1, "val")])
                    and "'test' split is empty", {}),
    "channel mismatch": (lambda r: make_site(r, rgb=True, suffix=".npy")
                         and "the last axis holds channels", {}),
    "huge image": (huge_png, {}),
    "file in two splits": (lambda r: make_site(r, rows=[("images/0.png", 0, "train"), ("images/0.png", 0, "test")])
                           and "in the 'test' split and, at row 2, in the 'train' split", {}),
    "unknown class name": (lambda r: make_site(r, rows=[("images/0.png", "covid", "train")])
                           and "'covid' is neither one of data.class_names (normal, pneumonia)",
                           {"data": {"class_names": ["normal", "pneumonia"]}}),
    "multi-frame dicom": (lambda r: dicom_site(r, pixels=np.zeros((2, 12, 12), np.uint8), frames=2)
                          and "multi-frame DICOM (2 frames)", {}),
    "undecodable dicom": (lambda r: dicom_site(r, pixels=np.zeros((12, 12), np.uint16),
                                               transfer_syntax=pydicom.uid.JPEGLosslessSV1)
                          and "'JPEG Lossless, Non-Hierarchical, First-Order Prediction", {}),
    "dicom window asked, none in the file": (lambda r: dicom_site(r, pixels=np.zeros((12, 12), np.uint8))
                                             and "no WindowCenter/WindowWidth", {"data": {"window_from_file": True}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_site_data_is_refused_by_the_validator(tmp_path, case):
    make, sections = CASES[case]
    needle = make(tmp_path / "fed")
    code, err = run("fedopal.site.validate", "--config", write_config(tmp_path, tmp_path / "fed", **sections))
    assert_one_line_error(code, err, needle)


def test_a_missing_manifest_column_is_named(tmp_path):
    folder = make_site(tmp_path / "fed")
    (folder / "manifest.csv").write_text("file,label,split\nimages/0.png,0,train\n")
    code, err = run("fedopal.site.validate", "--config", write_config(tmp_path, tmp_path / "fed"))
    assert_one_line_error(code, err, "missing column(s) ['path']")


def test_unreadable_and_mismatched_checkpoints_stop_the_job_before_it_starts(tmp_path):
    make_site(tmp_path / "fed")
    (tmp_path / "bad.pt").write_bytes(b"nonsense")
    code, err = run("fedopal.tools.job", "--config", write_config(tmp_path, tmp_path / "fed",
                    model={"checkpoint": str(tmp_path / "bad.pt")}), "--simulate", "--workspace", str(tmp_path / "ws"))
    assert_one_line_error(code, err, "bad.pt", "not a readable torch checkpoint")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pt")
    code, err = run("fedopal.tools.job", "--config", write_config(tmp_path, tmp_path / "fed",
                    model={"checkpoint": str(tmp_path / "other.pt")}), "--simulate", "--workspace", str(tmp_path / "ws"))
    assert_one_line_error(code, err, "other.pt", "foo.weight")


@pytest.mark.parametrize("text,needle", [("train:\n  num_round: 3\n", "'train.num_round'"),
                                         ("train:\n  num_rounds: 0\n", "'train.num_rounds'"),
                                         ("train:\n  num_rounds: -2\n", "'train.num_rounds'")])
def test_config_mistakes_stop_every_entry_point(tmp_path, text, needle):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    for module in ("fedopal.tools.job", "fedopal.site.validate", "fedopal.tools.bench"):
        extra = ["--simulate"] if module == "fedopal.tools.job" else []
        code, err = run(module, "--config", str(path), *extra)
        assert_one_line_error(code, err, needle, "cfg.yaml")


def test_a_failed_start_overwrites_nothing(tmp_path):
    """A previous run's workspace and results survive a run that fails validation."""
    make_site(tmp_path / "fed", rows=[("images/0.png", 9, "train")])
    previous = tmp_path / "ws" / "fedopal_tiny_test"
    previous.mkdir(parents=True)
    (previous / "FL_global_model.pt").write_bytes(b"precious")
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.md").write_text("previous table")
    code, err = run("fedopal.tools.job", "--config", write_config(tmp_path, tmp_path / "fed"), "--simulate",
                    "--workspace", str(tmp_path / "ws"), "--results", str(results))
    assert_one_line_error(code, err, "out of range")
    assert (previous / "FL_global_model.pt").read_bytes() == b"precious"
    assert (results / "summary.md").read_text() == "previous table"
    shutil.rmtree(tmp_path / "ws")
