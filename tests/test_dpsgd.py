"""DP-SGD in the one training loop: per-patient clipping against a float64 reference, every method under DP-SGD,
patient-level splits."""

import copy
import csv
import math
import os

import pytest
import torch
import torch.nn.functional as F

from fedopal.config import config_from_dict
from fedopal.model.adapters import build_model
from fedopal.site.data import DataError, build_datasets, patient_index, read_manifest
from fedopal.site.train import SiteTrainer
from fedopal.specs.methods import METHODS, get_method

from conftest import tiny_config

PATIENT_SIZE = 3  # images per patient in these tests (rows i, i+1, i+2 of a split)


def with_patients(site_dir, out_dir, size=PATIENT_SIZE, move=None):
    """A copy of a site's manifest with a patient_id column (consecutive rows of a split share a patient); `move`:
    (row number, new split) to put one image of a patient in another split."""
    rows = list(csv.DictReader(open(os.path.join(site_dir, "manifest.csv"))))
    counters = {}
    for row in rows:
        n = counters.get(row["split"], 0)
        counters[row["split"]] = n + 1
        row["patient_id"] = f"{row['split']}-p{n // size}"
        row["path"] = os.path.join(site_dir, row["path"])
    if move:
        rows[move[0] - 2]["split"] = move[1]  # manifest row numbers count the header as row 1
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "manifest.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return os.path.join(out_dir, "manifest.csv")


def dp_config(method="fedavg_lora", **privacy):
    raw = tiny_config(method=method, local_steps=1, lr=1e-3).model_dump(mode="json")
    raw["data"]["augment"] = False
    raw["privacy"] = {"mode": "dpsgd", "noise_multiplier": 1.0, "clip_norm": 0.05, **privacy}
    return config_from_dict(raw)


def trainer_for(cfg, manifest, batch_size=None, privacy=None):
    samples = read_manifest(manifest, 2)
    model = build_model(cfg, get_method(cfg.train.method, cfg.model.head), "site-1")
    datasets = build_datasets(cfg.data, samples, model.in_channels, model.normalization)
    return SiteTrainer(model, datasets, cfg.train, batch_size or cfg.data.batch_size, privacy=privacy or cfg.privacy,
                       patient_of=patient_index(samples)), samples


def test_per_patient_clipping_matches_a_float64_reference(small_federation, tmp_path):
    """One DP-SGD step with every patient in the batch (sample rate 1) and no noise: the gradient the optimizer
    applies is sum over patients of clip(sum of the patient's per-image gradients, C), over the number of patients,
    computed here independently in float64 with plain autograd, one patient at a time."""
    root, _ = small_federation
    cfg = dp_config()
    manifest = with_patients(str(root / "site-1"), str(tmp_path / "site-1"))
    no_noise = cfg.privacy.model_copy(update={"noise_multiplier": 0.0})
    trainer, samples = trainer_for(cfg, manifest, batch_size=10_000, privacy=no_noise)
    assert trainer.sample_rate == 1.0 and trainer.dp_unit == "patient"
    reference_model = copy.deepcopy(trainer.model).double()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.train_round()
    applied = [p.grad.double() for p in params]

    train = trainer.datasets["train"]
    images = torch.stack([train[i]["image"] for i in range(len(train))]).double()
    labels = torch.tensor([int(train[i]["label"]) for i in range(len(train))])
    patients = torch.tensor(patient_index(samples))
    ref_params = [p for p in reference_model.parameters() if p.requires_grad]
    reference_model.train()
    total = [torch.zeros_like(p) for p in ref_params]
    clip = cfg.privacy.clip_norm
    for patient in patients.unique():
        rows = patients == patient
        loss = F.cross_entropy(reference_model(images[rows]), labels[rows], reduction="sum")
        grads = torch.autograd.grad(loss, ref_params)
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
        factor = min(1.0, clip / (norm + 1e-6))  # Opacus's clip factor
        total = [t + g * factor for t, g in zip(total, grads)]
    expected = [t / len(patients.unique()) for t in total]
    for got, want in zip(applied, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    assert len(patients.unique()) == math.ceil(len(train) / PATIENT_SIZE)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("full_ft", "late_join")])
def test_every_method_trains_a_round_under_dpsgd(small_federation, tmp_path, method):
    root, _ = small_federation
    cfg = dp_config(method)
    trainer, _ = trainer_for(cfg, str(root / "site-1" / "manifest.csv"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    stats = trainer.train_round()
    after = trainer.model.state_dict()
    trained = [k for k in after if trainer.model.spec.is_trainable(k)]
    assert trained and all(not torch.equal(before[k], after[k]) for k in trained)  # noise moves every trained tensor
    assert not any(not torch.equal(before[k], after[k]) for k in after if k not in trained)
    assert 0 < stats["epsilon"] < math.inf and stats["unit"] == "image" and stats["dp_steps"] == 1
    if trainer.model.spec.regularizer == "weight":
        assert stats["orth_loss"] > 0  # added after the noise: post-processing
    if trainer.model.spec.regularizer == "projection":
        for _, layer in trainer.model.lora_layers():  # fedopal_p: A_p stays in the complement of A_g's rows
            a_g = layer.lora_A["global"].weight.reshape(layer.lora_A["global"].weight.shape[0], -1).double()
            a_p = layer.lora_A["personal"].weight.reshape(a_g.shape[0], -1).double()
            assert float((a_p @ a_g.T).abs().max()) < 1e-5


def test_epsilon_is_per_patient_with_a_patient_id_and_per_image_without(small_federation, tmp_path):
    root, _ = small_federation
    cfg = dp_config()
    per_image, _ = trainer_for(cfg, str(root / "site-1" / "manifest.csv"))
    per_patient, _ = trainer_for(cfg, with_patients(str(root / "site-1"), str(tmp_path / "s1")))
    for trainer, unit in ((per_image, "image"), (per_patient, "patient")):
        trainer.train_round()
        record = trainer.dp_record()
        assert record["unit"] == unit and record["steps"] == 1 and "sample_rate" not in record


def test_a_patient_in_two_splits_is_refused_naming_the_patient_and_the_rows(small_federation, tmp_path):
    root, _ = small_federation
    manifest = with_patients(str(root / "site-1"), str(tmp_path / "site-1"), move=(2, "test"))
    with pytest.raises(DataError) as err:
        read_manifest(manifest, 2)
    message = str(err.value)
    assert "patient 'train-p0' has images in 2 splits" in message and "row 2" in message and "rows 3, 4" in message
    assert "\n" not in message and "Fix:" in message


def test_an_empty_patient_id_is_refused_in_one_line(small_federation, tmp_path):
    root, _ = small_federation
    manifest = with_patients(str(root / "site-1"), str(tmp_path / "site-1"))
    lines = open(manifest).read().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ","
    open(manifest, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"manifest.csv:4: empty patient_id"):
        read_manifest(manifest, 2)
