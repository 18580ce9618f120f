"""Segmentation networks as FedOPAL models: MONAI's UNETR / SwinUNETR (2D, 3D) and a transformers ViT with a light
decoder, LoRA on the encoder, the decoder as the head. The reference is MONAI's own forward with the same weights."""

import pytest
import torch
from monai.networks.nets import UNETR, SwinUNETR

from fedopal.config import ConfigError, config_from_dict
from fedopal.model.adapters import build_model
from fedopal.model.backbones import BackboneError, build_backbone
from fedopal.specs.methods import METHODS, get_method, group_of

TINY_VIT = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 3}


def seg_cfg(backbone="unetr", dims=2, size=32, **model):
    return config_from_dict({"data": {"task": "segmentation", "spatial_dims": dims, "image_size": size,
                                      "class_names": ["background", "organ", "lesion"]},
                             "model": {"backbone": backbone, "pretrained": False, "vit": TINY_VIT, "lora_rank": 4,
                                       **model}})


def _monai_reference(cfg, backbone):
    """The MONAI network the split model came from, rebuilt with its weights (encoder + decoder state)."""
    if cfg.model.backbone == "unetr":
        net = UNETR(in_channels=1, out_channels=3, img_size=(cfg.data.image_size,) * cfg.data.spatial_dims,
                    feature_size=16, hidden_size=48, mlp_dim=96, num_heads=3, spatial_dims=cfg.data.spatial_dims)
    else:
        s = cfg.model.swin
        net = SwinUNETR(in_channels=1, out_channels=3, feature_size=s.feature_size, depths=s.depths,
                        num_heads=s.num_heads, spatial_dims=cfg.data.spatial_dims)
    state = {**backbone.module.state_dict(), **backbone.decoder.state_dict()}
    net.load_state_dict(state)  # strict: the two halves hold exactly the network's tensors
    return net.eval()


@pytest.mark.parametrize("backbone,dims,size", [("unetr", 2, 32), ("unetr", 3, 32), ("swin_unetr", 2, 64),
                                                ("swin_unetr", 3, 64)])
def test_split_network_equals_monai_forward(backbone, dims, size):
    cfg = seg_cfg(backbone, dims, size)
    torch.manual_seed(0)
    parts = build_backbone(cfg)
    net = _monai_reference(cfg, parts)
    x = torch.randn(2 if dims == 2 else 1, 1, *(size,) * dims)
    with torch.no_grad():
        ours = parts.decoder.eval()(parts.module.eval()(x))
        theirs = net(x)
    assert ours.shape == (len(x), 3, *(size,) * dims)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backbone", ["unetr", "swin_unetr"])
def test_decoder_is_the_head_group_and_lora_sits_on_encoder_linears(backbone):
    model = build_model(seg_cfg(backbone, 2, 64), get_method("fedopal_w"), "site-1")
    groups = {}
    for key in model.state_dict():
        groups.setdefault(group_of(key), []).append(key)
    assert all(k.startswith("head.") for k in groups["head"])
    assert any(".decoder" in k or ".out." in k for k in groups["head"])  # the decoder's own blocks
    adapted = [name for name, _ in model.lora_layers()]
    assert adapted and all(name.split(".")[-1] in ("qkv", "out_proj", "proj", "linear1", "linear2")
                           for name in adapted)
    # the encoder's own weights are frozen; only adapters and the decoder train
    trainable = {group_of(k) for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"global.A", "global.B", "personal.A", "personal.B", "head"}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "late_join"])
def test_every_method_trains_a_segmentation_model(method):
    """One optimizer step per method: logits have the mask's shape, the loss is finite, and exactly the spec's
    trainable tensors move."""
    from fedopal.site.segment import dice_ce_loss

    model = build_model(seg_cfg("unetr", 2, 32), get_method(method), "site-1")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, mask = torch.randn(2, 1, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    loss = dice_ce_loss()(model(x), mask)
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    moved = {group_of(k) for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    spec = get_method(method)
    # B starts at zero: A gets no gradient in the first step (peft's init); B and the head always do
    assert moved <= set(spec.trainable) and "head" in moved


def test_hf_vit_with_light_decoder(tmp_path):
    from transformers import ViTConfig, ViTModel

    folder = tmp_path / "vit"
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_channels=3), add_pooling_layer=False).save_pretrained(folder)
    cfg = config_from_dict({"data": {"task": "segmentation", "image_size": 32},
                            "model": {"backbone": "hf", "hf_model": str(folder), "decoder_channels": 16}})
    model = build_model(cfg, get_method("fedopal_r"), "site-1")
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 2, 32, 32)
    assert len(list(model.lora_layers())) == 2 * 6  # q, k, v, o, fc1, fc2 per layer
    assert model.base_features(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_encoder_checkpoint_loads_and_a_wrong_one_is_named(tmp_path):
    cfg = seg_cfg("swin_unetr", 2, 64)
    torch.manual_seed(1)
    source = build_backbone(cfg)
    path = tmp_path / "swinvit.pt"
    # an encoder-only checkpoint, as SwinUNETR's self-supervised weights come (keys without the swinViT. prefix)
    torch.save({"state_dict": {f"module.{k.removeprefix('swinViT.')}": v
                               for k, v in source.module.state_dict().items()}}, path)
    loaded = build_backbone(cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": str(path)})}))
    for key, value in source.module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[key], value, rtol=0, atol=0)
    bigger = seg_cfg("swin_unetr", 2, 64, swin={"feature_size": 24})
    with pytest.raises(BackboneError, match="wrong shape"):
        build_backbone(bigger.model_copy(update={"model": bigger.model.model_copy(update={"checkpoint": str(path)})}))


def test_sizes_and_task_mismatches_are_one_line_errors():
    with pytest.raises(BackboneError, match="multiple of 16"):
        build_backbone(seg_cfg("unetr", 2, 40))
    with pytest.raises(BackboneError, match="multiple of 32, at least 64"):
        build_backbone(seg_cfg("swin_unetr", 2, 48))
    with pytest.raises(ConfigError, match="has no decoder"):
        config_from_dict({"data": {"task": "segmentation"}, "model": {"backbone": "efficientnet_lite0"}})
    with pytest.raises(ConfigError, match="segmentation network"):
        config_from_dict({"model": {"backbone": "unetr"}})
