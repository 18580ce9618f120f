"""Each baseline trains and shares exactly what its paper says (METHOD.md's table)."""

import pytest
import torch

from fedopal.model.adapters import build_model
from fedopal.site.data import build_datasets, read_manifest
from fedopal.specs.methods import get_method
from fedopal.site.train import InstanceWeighting, SiteTrainer

from conftest import tiny_config


def trained(federation, method, site, rounds=2):
    root, _ = federation
    cfg = tiny_config(root, method=method, local_steps=3, lr=5e-3)
    model = build_model(cfg, get_method(method), site)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    samples = read_manifest(str(root / site / "manifest.csv"), 2)
    trainer = SiteTrainer(model, build_datasets(cfg.data, samples, model.in_channels, model.normalization),
                          cfg.train, 16)
    for _ in range(rounds):
        trainer.train_round()
    return model, initial, trainer


def test_ffa_lora_A_never_changes_and_is_identical_on_every_site(small_federation):
    m1, init1, _ = trained(small_federation, "ffa_lora", "site-1")
    m2, _, _ = trained(small_federation, "ffa_lora", "site-2")
    a_keys = [k for k in m1.state_dict() if ".lora_A.global." in k]
    b_keys = [k for k in m1.state_dict() if ".lora_B.global." in k]
    assert a_keys and all(torch.equal(m1.state_dict()[k], init1[k]) for k in a_keys)
    assert all(torch.equal(m1.state_dict()[k], m2.state_dict()[k]) for k in a_keys)
    assert any(not torch.equal(m1.state_dict()[k], init1[k]) for k in b_keys)  # B does train
    assert set(m1.shared_state()) == set(b_keys) | {"head.weight", "head.bias"}


def test_fedsa_lora_never_sends_B(small_federation):
    model, init, _ = trained(small_federation, "fedsa_lora", "site-1")
    shared = model.shared_state()
    assert shared and all(".lora_A.global." in k for k in shared)
    kept = model.site_state()
    assert any(".lora_B.global." in k for k in kept) and "head.weight" in kept
    assert any(not torch.equal(model.state_dict()[k], init[k]) for k in kept if ".lora_B." in k)


def test_local_sends_nothing(tiny_cfg):
    model = build_model(tiny_cfg, get_method("local"), "site-1")
    assert model.shared_state() == {} and model.site_state()


def test_full_ft_shares_everything_and_trains_the_backbone(small_federation):
    model, init, _ = trained(small_federation, "full_ft", "site-1", rounds=1)
    assert set(model.shared_state()) == set(model.state_dict())
    assert not any(".lora_" in k for k in model.state_dict())
    backbone = [k for k, p in model.named_parameters() if k.startswith("backbone.")]
    assert any(not torch.equal(model.state_dict()[k], init[k]) for k in backbone)


def test_feddpa_weights_the_personal_adapter_per_instance(small_federation):
    model, _, trainer = trained(small_federation, "feddpa", "site-1", rounds=1)
    model.eval()
    with torch.no_grad():
        for _, layer in model.lora_layers():
            layer.lora_B["personal"].weight.normal_(0, 0.5)
    x = torch.stack([trainer.datasets["test"][i]["image"] for i in range(4)])
    weights = InstanceWeighting(model, trainer.datasets["train"], 16).weights(x)
    assert weights.shape == (4,) and bool(((weights >= 0) & (weights <= 1)).all())
    with torch.no_grad():
        full = model(x)
        with model.only_adapters(["global"]):
            global_only = model(x)
        with model.personal_scaled(torch.zeros(4)):
            assert torch.allclose(model(x), global_only, atol=1e-5)
        with model.personal_scaled(torch.ones(4)):
            assert torch.allclose(model(x), full, atol=1e-5)
    metrics = trainer.evaluate()
    assert "personalized/test/balanced_accuracy" in metrics and "global_only/test/balanced_accuracy" in metrics


@pytest.mark.parametrize("method", ["ffa_lora", "fedsa_lora", "feddpa", "full_ft"])
def test_every_baseline_runs_a_round(small_federation, method):
    _, _, trainer = trained(small_federation, method, "site-2", rounds=1)
    assert 0.0 <= trainer.evaluate()["personalized/test/balanced_accuracy"] <= 1.0
