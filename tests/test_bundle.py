"""A site's model as a MONAI bundle: MONAI's bundle runner, on real images, gives what `fedopal predict` gives.

Classification on PneumoniaMNIST PNGs (a tiny MONAI ViT), segmentation on HC18 ultrasound frames (a tiny UNETR with
sliding-window inference): each bundle runs in its own process, as a hospital runs it."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fedopal.cli import main as fedopal
from fedopal.config import config_from_dict
from fedopal.model.adapters import build_model
from fedopal.site.data import find_inputs
from fedopal.site.export import ADAPTERS, MANIFEST, MERGED, export_site_model, load_exported
from fedopal.site.predict import predict_probabilities
from fedopal.site.segment_predict import predict_masks
from fedopal.specs.methods import get_method

from conftest import NPZ, REPO

HC18 = os.path.join(REPO, "data", "hc18", "hc18_small.npz")


class BundleRun:
    """`python -m monai.bundle run` on a bundle in a fresh process of the project's Python, started now; result()
    waits for it (MONAI's command line, on `fire`, pinned)."""

    def __init__(self, bundle, output_dir, **overrides):
        args = ["--config_file", os.path.join(bundle, "configs", "inference.json"), "--bundle_root", str(bundle),
                "--output_dir", str(output_dir)]
        for key, value in overrides.items():
            args += [f"--{key}", str(value)]
        command = [sys.executable, "-m", "monai.bundle", "run"]
        self.output_dir, self.log = output_dir, f"{output_dir}.log"
        with open(self.log, "w") as log:  # a file, not a pipe: two runs at once never block on a full pipe
            self.process = subprocess.Popen(command + args, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def result(self):
        returncode = self.process.wait(timeout=300)
        assert returncode == 0, open(self.log).read()[-4000:]
        return self.output_dir


def moved(model, scale, seed=0):
    """A trained-looking model: every trainable tensor (B, the head or decoder) moved away from its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def classification(tmp_path_factory):
    """A tiny ViT's export (with its merged copy), its bundle by `fedopal export-bundle`, and 8 real chest X-rays."""
    root = tmp_path_factory.mktemp("classification")
    cfg = config_from_dict({
        "data": {"image_size": 32, "class_names": ["normal", "pneumonia"], "batch_size": 4},
        "model": {"backbone": "monai_vit", "pretrained": False, "lora_rank": 4,
                  "vit": {"patch_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 3}},
        "train": {"method": "fedopal_w", "num_rounds": 3}})
    model = moved(build_model(cfg, get_method("fedopal_w"), "site-1"), 0.05)
    metrics = {"personalized/val/balanced_accuracy": 0.81, "personalized/test/balanced_accuracy": 0.78}
    views = export_site_model(model, cfg, str(root / "export"), 1, metrics, merged=True, site="site-1",
                              total_rounds=3)
    images = root / "images"
    images.mkdir()
    xrays = np.load(NPZ)["test_images"]
    for k in range(8):
        Image.fromarray(xrays[k]).save(images / f"xray_{k}.png")
    bundle = root / "bundle"
    assert fedopal(["export-bundle", "--model", views["personalized"], "--out", str(bundle)]) == 0
    return views["personalized"], bundle, images


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory):
    """A tiny UNETR's export (patches of 16 in images of 32: sliding window), its bundle, and 4 real HC18 frames."""
    root = tmp_path_factory.mktemp("segmentation")
    cfg = config_from_dict({
        "data": {"task": "segmentation", "image_size": 32, "roi_size": 16, "class_names": ["background", "head"]},
        "model": {"backbone": "unetr", "pretrained": False, "lora_rank": 4,
                  "vit": {"hidden_size": 48, "mlp_dim": 96, "num_heads": 3, "num_layers": 2}},
        "train": {"method": "fedopal_w", "num_rounds": 3}})
    model = moved(build_model(cfg, get_method("fedopal_w"), "site-2"), 0.05)
    views = export_site_model(model, cfg, str(root / "export"), 2, {}, merged=False, site="site-2", total_rounds=3)
    images = root / "images"
    images.mkdir()
    hc18 = np.load(HC18)
    for k in (0, 50, 100, 150):  # 86 x 128 frames of different subjects
        Image.fromarray(hc18["images"][k]).save(images / f"{hc18['names'][k]}.png")
    bundle = root / "bundle"
    assert fedopal(["export-bundle", "--model", views["personalized"], "--out", str(bundle)]) == 0
    return views["personalized"], bundle, images


@pytest.fixture(scope="module")
def bundle_runs(classification, segmentation, tmp_path_factory):
    """Both bundles run at once, each in its own process, on its real images (the two cores work in parallel)."""
    out = tmp_path_factory.mktemp("runs")
    runs = {task: BundleRun(bundle, out / task, dataset_dir=images)
            for task, (_, bundle, images) in (("classification", classification), ("segmentation", segmentation))}
    yield runs
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


def read_predictions(path):
    """SaveClassificationd's CSV: path, then one probability per class."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return [row[0] for row in rows], np.array([[float(v) for v in row[1:]] for row in rows])


def test_the_bundle_holds_monai_metadata_an_inference_config_the_export_and_a_readme(classification):
    view, bundle, _ = classification
    files = sorted(os.path.relpath(os.path.join(d, f), bundle) for d, _, names in os.walk(bundle) for f in names)
    assert files == ["configs/inference.json", "configs/logging.conf", "configs/metadata.json", "docs/README.md",
                     f"models/{ADAPTERS}", f"models/{MANIFEST}"]
    meta = json.load(open(bundle / "configs" / "metadata.json"))
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright"):
        assert meta[key], key
    assert {"fedopal", "peft", "safetensors", "einops"} <= set(meta["required_packages_version"])
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["num_channels"], image["spatial_shape"], image["is_patch_data"]) == (1, [32, 32], False)
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert (pred["type"], pred["num_channels"], pred["value_range"]) == ("probabilities", 2, [0, 1])
    assert pred["channel_def"] == {"0": "normal", "1": "pneumonia"}  # data.class_names
    manifest = json.load(open(os.path.join(view, MANIFEST)))
    facts = meta["fedopal"]
    assert (facts["site"], facts["view"], facts["method"], facts["round"], facts["total_rounds"]) == \
        ("site-1", "personalized", "fedopal_w", 2, 3)
    assert facts["backbone"]["sha256"] == manifest["backbone"]["sha256"] and facts["merged"] is False
    assert meta["eval_metrics"] == {"val/balanced_accuracy": 0.81, "test/balanced_accuracy": 0.78}
    readme = open(bundle / "docs" / "README.md").read()
    for said in ("site-1", "fedopal_w", "round 2 of 3", "python -m monai.bundle run", "| 1 | pneumonia |",
                 "patient-derived", "hospital's governance"):
        assert said in readme, said


def test_monai_bundle_run_gives_fedopal_predicts_probabilities_on_real_xrays(classification, bundle_runs):
    view, _, images = classification
    paths, probs = read_predictions(bundle_runs["classification"].result() / "predictions.csv")
    model, cfg, _ = load_exported(view)
    samples, _ = find_inputs([str(images)])
    expected = predict_probabilities(model, cfg, samples, device="cpu")
    assert paths == [s.path for s in samples] and len(paths) == 8
    assert np.abs(probs - expected).max() <= 1e-5
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-6)


def test_monai_bundle_run_gives_fedopal_predicts_masks_on_real_hc18_frames(segmentation, bundle_runs, tmp_path):
    view, bundle, images = segmentation
    meta = json.load(open(bundle / "configs" / "metadata.json"))
    assert meta["network_data_format"]["outputs"]["pred"]["format"] == "segmentation"
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 16]  # one sliding-window patch
    assert json.load(open(bundle / "configs" / "inference.json"))["inferer"]["_target_"] == "SlidingWindowInferer"
    masks = bundle_runs["segmentation"].result()
    model, cfg, _ = load_exported(view)
    samples, _ = find_inputs([str(images)])
    rows = predict_masks(model, cfg, samples, str(tmp_path / "predict_masks"), device="cpu")
    for row in rows:
        expected = np.asarray(Image.open(row["mask_written"]))
        mask = np.asarray(Image.open(masks / os.path.basename(row["mask_written"])))
        assert mask.shape == expected.shape == (86, 128)  # on the frame's own grid
        assert set(np.unique(expected)) == {0, 1}  # both classes: the comparison means something
        np.testing.assert_array_equal(mask, expected)


def test_the_inference_config_has_every_property_monai_expects_of_an_inference_bundle(segmentation):
    from monai.bundle import ConfigWorkflow

    _, bundle, images = segmentation
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"), workflow_type="inference",
                              logging_file=False, bundle_root=str(bundle), dataset_dir=str(images))
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.version == "1.0.0" and workflow.channel_def == {"0": "background", "1": "head"}


@pytest.mark.filterwarnings("ignore:parsing config_file")  # MONAI's note on configs from elsewhere: ours
def test_a_merged_bundle_holds_only_the_merged_weights_and_gives_the_merged_models_probabilities(classification,
                                                                                                  tmp_path):
    from monai.bundle import run

    view, _, images = classification
    bundle = tmp_path / "merged"
    assert fedopal(["export-bundle", "--model", view, "--out", str(bundle), "--merged"]) == 0
    assert sorted(os.listdir(bundle / "models")) == [MANIFEST, MERGED]
    meta = json.load(open(bundle / "configs" / "metadata.json"))
    assert meta["fedopal"]["merged"] and "peft" not in meta["required_packages_version"]
    chosen = sorted(str(p) for p in images.iterdir())[:3]
    run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), logging_file=False,
        datalist=chosen, output_dir=str(tmp_path / "out"))  # --datalist: these files only
    paths, probs = read_predictions(tmp_path / "out" / "predictions.csv")
    model, cfg, _ = load_exported(view, merged=True)
    samples, _ = find_inputs(chosen)
    assert paths == chosen
    assert np.abs(probs - predict_probabilities(model, cfg, samples, device="cpu")).max() <= 1e-5


def test_export_bundle_refuses_a_folder_that_is_not_a_bundle_and_a_view_without_its_merged_copy(segmentation,
                                                                                                tmp_path, capsys):
    view, _, _ = segmentation
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    assert fedopal(["export-bundle", "--model", view, "--out", str(notes)]) == 2
    assert "exists and is not a FedOPAL bundle" in capsys.readouterr().err
    assert os.listdir(notes) == ["todo.txt"]  # left as it was
    assert fedopal(["export-bundle", "--model", view, "--out", str(tmp_path / "b"), "--merged"]) == 2
    err = capsys.readouterr().err
    assert MERGED in err and "Fix:" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
