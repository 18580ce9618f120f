"""Foundation models behind one registry: HF encoders from a local folder, MONAI ViT 2D/3D, checkpoints."""

import pytest
import torch
from transformers import (CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel)

from fedopal.model.adapters import build_model
from fedopal.model.backbones import CLIP, IMAGENET, BackboneError
from fedopal.config import ConfigError, config_from_dict
from fedopal.specs.methods import get_method
from fedopal.model.orthogonality import RepresentationOrthogonality, weight_orthogonality

from conftest import tiny_config

HF_FAMILIES = {
    "vit": (ViTConfig, ViTModel, {"intermediate_size": 64}, IMAGENET),
    "dinov2": (Dinov2Config, Dinov2Model, {"mlp_ratio": 2}, IMAGENET),
    "clip": (CLIPVisionConfig, CLIPVisionModel, {"intermediate_size": 64}, CLIP),
}


def save_tiny_hf(family, folder):
    config_cls, model_cls, extra, _ = HF_FAMILIES[family]
    model = model_cls(config_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                 patch_size=8, **extra))
    model.save_pretrained(folder)  # exactly what a hospital's local copy of a hub model looks like
    return model


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_hf_encoder_from_local_folder_trains_one_step(tmp_path, family):
    saved = save_tiny_hf(family, tmp_path)
    cfg = config_from_dict({"data": {"image_size": 32}, "model": {"backbone": "hf", "hf_model": str(tmp_path),
                                                                  "lora_rank": 4}})
    model = build_model(cfg, get_method("fedopal_w"), "site-1")
    assert model.normalization == HF_FAMILIES[family][3] and model.in_channels == 3
    # the pretrained weights were loaded, not re-initialised
    ref = {k: v for k, v in saved.state_dict().items() if k.endswith("fc1.weight")}
    got = {k.split("net.", 1)[1].replace(".base_layer", ""): v for k, v in model.state_dict().items()
           if k.endswith("fc1.base_layer.weight")}
    assert ref and all(torch.equal(ref[k], got[k]) for k in ref)
    assert len(list(model.lora_layers())) == 12  # q, k, v, o + fc1, fc2 in 2 layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(model.train()(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 0, 1]))
    loss = loss + weight_orthogonality(model.lora_layers())
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k or k.startswith("head.") for k in changed)


def test_hf_encoder_at_another_resolution_interpolates(tmp_path):
    save_tiny_hf("vit", tmp_path)
    cfg = config_from_dict({"data": {"image_size": 48}, "model": {"backbone": "hf", "hf_model": str(tmp_path)}})
    assert build_model(cfg, get_method("dual_lora"), "s").eval()(torch.randn(1, 3, 48, 48)).shape == (1, 2)


def test_hf_missing_folder_is_a_clear_error(tmp_path):
    cfg = config_from_dict({"model": {"backbone": "hf", "hf_model": str(tmp_path / "nowhere")}})
    with pytest.raises(BackboneError, match="model.hf_model.*Fix"):
        build_model(cfg, get_method("fedopal_w"))


def test_hf_needs_a_model_name():
    with pytest.raises(ConfigError, match="model.hf_model is required"):
        config_from_dict({"model": {"backbone": "hf"}})


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "hf"])
def test_2d_pretrained_backbone_with_3d_data_is_refused(backbone):
    with pytest.raises(ConfigError, match="2D-pretrained"):
        config_from_dict({"data": {"spatial_dims": 3}, "model": {"backbone": backbone, "hf_model": "x"}})


@pytest.mark.parametrize("method", ["fedopal_w", "fedopal_r"])
def test_tiny_3d_vit_trains_with_both_adapters_and_orthogonality(method):
    cfg = tiny_config(method=method)
    cfg = config_from_dict({**cfg.model_dump(), "data": {**cfg.data.model_dump(), "spatial_dims": 3,
                                                         "image_size": 16}})
    model = build_model(cfg, get_method(method), "site-1").train()
    x = torch.randn(2, 1, 16, 16, 16)
    with RepresentationOrthogonality(model.lora_layers()) as rep:
        with torch.no_grad():
            for _, layer in model.lora_layers():
                layer.lora_B["personal"].weight.normal_(0, 0.1)
                layer.lora_B["global"].weight.normal_(0, 0.1)
        logits = model(x)
        orth = rep.loss() if method == "fedopal_r" else weight_orthogonality(model.lora_layers())
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])) + 0.1 * orth
    loss.backward()
    grads = {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".global." in k for k in grads) and any(".personal." in k for k in grads)
    assert not any(k.startswith("backbone.") and ".lora_" not in k for k in grads)


def test_checkpoint_loads_into_the_backbone(tmp_path):
    cfg = tiny_config()
    donor = build_model(cfg, get_method("fedopal_w"))
    net = donor.backbone.base_model.model.net
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    state = {k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if "lora_" not in k}
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = build_model(config_from_dict({**cfg.model_dump(), "model": {**cfg.model.model_dump(),
                                                                          "checkpoint": str(tmp_path / "ckpt.pt")}}),
                         get_method("fedopal_w"))
    w = "backbone.base_model.model.net.patch_embedding.patch_embeddings.weight"
    assert torch.equal(loaded.state_dict()[w], donor.state_dict()[w])


def test_mismatched_checkpoint_lists_offending_keys(tmp_path):
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3), "bogus.weight": torch.zeros(1)}, tmp_path / "c.pt")
    cfg = tiny_config()
    cfg = config_from_dict({**cfg.model_dump(), "model": {**cfg.model.model_dump(), "checkpoint": str(tmp_path / "c.pt")}})
    with pytest.raises(BackboneError) as err:
        build_model(cfg, get_method("fedopal_w"))
    msg = str(err.value)
    assert "bogus.weight" in msg and "wrong shape" in msg and "blocks.0.attn.qkv.weight" in msg and "Fix" in msg


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    cfg = tiny_config()
    cfg = config_from_dict({**cfg.model_dump(), "model": {**cfg.model.model_dump(), "checkpoint": str(tmp_path / "c.pt")}})
    with pytest.raises(BackboneError, match="not a readable torch checkpoint"):
        build_model(cfg, get_method("fedopal_w"))


def test_target_regex_overrides_the_family_default():
    cfg = tiny_config()
    cfg = config_from_dict({**cfg.model_dump(), "model": {**cfg.model.model_dump(),
                                                          "target_modules": r"net\.blocks\.1\.mlp\.linear2"}})
    model = build_model(cfg, get_method("fedopal_w"))
    assert [n for n, _ in model.lora_layers()] == ["base_model.model.net.blocks.1.mlp.linear2"]
