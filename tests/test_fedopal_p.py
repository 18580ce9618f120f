"""fedopal_p keeps the personal adapter in the orthogonal complement of the global one's input subspace, exactly,
through training, a new global adapter and a restart; the diagnostics measure subspace overlap as the principal
angles define it (known subspaces, and chance against its closed form)."""

import math

import pytest
import torch

from fedopal.model.adapters import build_model
from fedopal.model.backbones import BackboneError
from fedopal.site.data import build_datasets, read_manifest
from fedopal.model.diagnostics import adapter_overlaps, subspace_overlap
from fedopal.specs.methods import get_method
from fedopal.site.train import SiteTrainer

from conftest import tiny_config


def max_overlap(model) -> float:
    """max over layers of |A_g A_p^T| (0 when every personal row is orthogonal to every global row)."""
    worst = 0.0
    for _, layer in model.lora_layers():
        a_g = layer.lora_A["global"].weight.detach().reshape(layer.lora_A["global"].weight.shape[0], -1).double()
        a_p = layer.lora_A["personal"].weight.detach().reshape(layer.lora_A["personal"].weight.shape[0], -1).double()
        worst = max(worst, float((a_g @ a_p.T).abs().max() / (a_g.norm() * a_p.norm())))
    return worst


def trainer_for(federation, method="fedopal_p", **train):
    root, _ = federation
    cfg = tiny_config(root, method=method, **train)
    model = build_model(cfg, get_method(method, cfg.model.head), "site-1")
    samples = read_manifest(str(root / "site-1" / "manifest.csv"), 2)
    return SiteTrainer(model, build_datasets(cfg.data, samples, model.in_channels, model.normalization),
                       cfg.train, cfg.data.batch_size)


def test_fedopal_p_is_a_dual_method_sharing_only_the_global_adapter():
    spec = get_method("fedopal_p")
    assert spec.adapters == ("global", "personal") and spec.regularizer == "projection"
    assert set(spec.trainable) == {"global.A", "global.B", "personal.A", "personal.B", "head"}
    assert set(spec.shared) == {"global.A", "global.B"} and spec.head == "personal"
    assert "head" in get_method("fedopal_p", "shared").shared


def test_the_personal_adapter_stays_orthogonal_through_training_a_new_global_adapter_and_a_restart(small_federation):
    trainer = trainer_for(small_federation, local_steps=4, lr=2e-2)
    model = trainer.model
    assert max_overlap(model) < 1e-6  # from the start
    before = {k: v.clone() for k, v in model.site_state().items()}
    trainer.train_round()
    assert max_overlap(model) < 1e-6
    assert any(not torch.equal(before[k], v) for k, v in model.site_state().items()), "the personal adapter trains"
    # the server sends another global adapter: the personal one leaves its new row space at once
    gen = torch.Generator().manual_seed(5)
    model.load_shared({k: torch.randn(v.shape, generator=gen) for k, v in model.shared_state().items()})
    assert max_overlap(model) < 1e-6
    # a restarted site loads its saved personal state; still orthogonal to whatever A_g it holds
    other = trainer_for(small_federation).model
    other.load_site_state(model.site_state())
    assert max_overlap(other) < 1e-6


def test_without_projection_the_adapters_overlap(small_federation):
    trainer = trainer_for(small_federation, method="dual_lora", local_steps=4, lr=2e-2)
    trainer.train_round()
    assert max_overlap(trainer.model) > 1e-3  # so the test above measures something


def test_too_little_room_for_two_orthogonal_adapters_is_a_one_line_error():
    cfg = tiny_config(method="fedopal_p")
    cfg.model.lora_rank = 30  # 2 x 30 > 48, the tiny ViT's width
    with pytest.raises(BackboneError, match=r"2 x model\.lora_rank"):
        build_model(cfg, get_method("fedopal_p"), "site-1")


def test_principal_angles_of_known_subspaces():
    eye = torch.eye(6, dtype=torch.float64)
    assert subspace_overlap(eye[:, :2], eye[:, 2:4]) == pytest.approx(0.0, abs=1e-12)  # orthogonal
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert subspace_overlap(x, x @ torch.randn(3, 3, dtype=torch.float64)) == pytest.approx(1.0, abs=1e-9)
    # one shared direction of two: cos^2 of the angles are 1 and 0, mean 0.5
    assert subspace_overlap(eye[:, [0, 1]], eye[:, [0, 2]]) == pytest.approx(0.5, abs=1e-12)
    # a 45 degree angle: cos^2 = 1/2
    assert subspace_overlap(eye[:, [0]], (eye[:, [0]] + eye[:, [1]])) == pytest.approx(0.5, abs=1e-12)
    assert math.isnan(subspace_overlap(torch.zeros(6, 2), eye[:, :2]))  # B = 0 has no column space


def test_random_subspaces_overlap_as_chance_predicts():
    """E[mean cos^2] = r / d for two random r-dim subspaces of R^d (Monte Carlo against the closed form)."""
    gen = torch.Generator().manual_seed(1)
    d, r = 40, 4
    samples = [subspace_overlap(torch.randn(d, r, generator=gen), torch.randn(d, r, generator=gen))
               for _ in range(400)]
    assert sum(samples) / len(samples) == pytest.approx(r / d, rel=0.1)


def test_adapter_overlaps_of_a_model(small_federation):
    trainer = trainer_for(small_federation, local_steps=3, lr=2e-2)
    trainer.train_round()
    diag = trainer.diagnostics()
    assert diag["overlap_A"] == pytest.approx(0.0, abs=1e-10)  # by construction
    assert 0.0 <= diag["overlap_B"] <= 1.0 and 0.0 <= diag["overlap_u"] <= 1.0
    # chance at these widths: r / d_in averaged over the tiny ViT's layers (48 or 96 wide, r = 4)
    widths = [layer.lora_A["global"].weight.shape[1] for _, layer in trainer.model.lora_layers()]
    assert diag["random_A"] == pytest.approx(sum(4 / w for w in widths) / len(widths))
    assert adapter_overlaps(trainer_for(small_federation, method="fedavg_lora").model.lora_layers()) == {}
