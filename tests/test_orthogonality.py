"""Both orthogonality variants, as METHOD.md fixes them."""

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedopal.model.adapters import build_model
from fedopal.site.data import build_datasets, read_manifest
from fedopal.specs.methods import get_method
from fedopal.model.orthogonality import RepresentationOrthogonality, weight_orthogonality
from fedopal.site.train import SiteTrainer

from conftest import tiny_config


def toy_dual_lora(r=2, d_in=6, d_out=5):
    base = nn.Sequential(nn.Linear(d_in, d_out))
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=r, target_modules=["0"]), adapter_name="global")
    model.add_adapter("personal", LoraConfig(r=r, lora_alpha=r, target_modules=["0"]))
    model.base_model.set_adapter(["global", "personal"])
    layer = model.base_model.model[0]
    return model, [("0", layer)], layer


def test_weight_loss_is_zero_for_orthogonal_and_positive_otherwise():
    _, layers, layer = toy_dual_lora()
    eye = torch.eye(6)
    with torch.no_grad():
        layer.lora_A["global"].weight.copy_(eye[:2])
        layer.lora_A["personal"].weight.copy_(eye[2:4])
    assert weight_orthogonality(layers).item() == 0.0
    with torch.no_grad():
        layer.lora_A["personal"].weight.copy_(eye[1:3])  # shares row e1 with global
    assert weight_orthogonality(layers).item() == 1.0
    assert weight_orthogonality(layers, normalize=True).item() == 1.0


def test_weight_loss_sends_no_gradient_to_the_global_adapter():
    _, layers, layer = toy_dual_lora()
    for orth_on in ("A", "B", "AB"):
        with torch.no_grad():
            for name in ("global", "personal"):
                layer.lora_B[name].weight.normal_()
        for p in layer.parameters():
            p.grad = None
        weight_orthogonality(layers, orth_on).backward()
        assert layer.lora_A["global"].weight.grad is None and layer.lora_B["global"].weight.grad is None
        touched = layer.lora_A["personal"].weight.grad if orth_on != "B" else layer.lora_B["personal"].weight.grad
        assert touched is not None and touched.abs().sum() > 0


def test_weight_loss_on_B_matches_formula():
    _, layers, layer = toy_dual_lora()
    with torch.no_grad():
        layer.lora_B["global"].weight.normal_()
        layer.lora_B["personal"].weight.normal_()
    bg, bp = layer.lora_B["global"].weight, layer.lora_B["personal"].weight
    expected = (bg.T @ bp).pow(2).sum()
    assert torch.allclose(weight_orthogonality(layers, "B"), expected)


def test_representation_loss_matches_independent_computation():
    model, layers, layer = toy_dual_lora()
    with torch.no_grad():
        for name in ("global", "personal"):
            layer.lora_B[name].weight.normal_()
    x = torch.randn(3, 4, 6)  # batch 3, 4 tokens
    with RepresentationOrthogonality(layers) as rep:
        model(x)
        loss = rep.loss()
    u_g = x @ layer.lora_A["global"].weight.T @ layer.lora_B["global"].weight.T
    u_p = x @ layer.lora_A["personal"].weight.T @ layer.lora_B["personal"].weight.T
    cos = nn.functional.cosine_similarity(u_g, u_p, dim=-1, eps=0)
    assert torch.allclose(loss, cos.pow(2).mean(), atol=1e-5)


def test_representation_hooks_are_removed_on_exit():
    model, layers, layer = toy_dual_lora()
    with RepresentationOrthogonality(layers):
        pass
    assert not layer.lora_B["global"]._forward_hooks and not layer.lora_B["personal"]._forward_hooks


def _orth_losses(federation, method, rounds=4):
    root, _ = federation
    cfg = tiny_config(root, method=method, orth_lambda=1.0, local_steps=6, lr=3e-3)
    spec = get_method(method)
    model = build_model(cfg, spec, "site-1")
    samples = read_manifest(str(root / "site-1" / "manifest.csv"), 2)
    trainer = SiteTrainer(model, build_datasets(cfg.data, samples, model.in_channels, model.normalization),
                          cfg.train, 16)
    return [trainer.train_round()["orth_loss"] for _ in range(rounds)]


def test_weight_orthogonality_falls_during_training(small_federation):
    losses = _orth_losses(small_federation, "fedopal_w")
    assert losses[-1] < losses[0] * 0.9, losses


def test_representation_orthogonality_falls_during_training(small_federation):
    losses = _orth_losses(small_federation, "fedopal_r")
    assert losses[0] > 0 and losses[-1] < losses[0], losses
