"""Segmentation networks split into a frozen encoder (the backbone LoRA adapts) and a decoder (the task's head).

FedOPAL's methods speak of a backbone and a head. For a segmentation network the encoder is the foundation model and
the decoder plays the head's part: it is the `head` tensor group (methods.GROUP_PATTERNS), shared or personal as each
method says, so every method of `methods.py` runs unchanged. A network is built whole by MONAI, then its modules are
handed to two wrappers without copying a weight; `EncoderOutput` carries what the decoder's skips need.

- UNETR (Hatamizadeh et al., WACV 2022; `monai.networks.nets.UNETR`): encoder = its ViT; decoder = the convolutional
  skips (encoder1-4), up-blocks (decoder2-5) and output block. Its forward is mirrored below (monai 1.6.1) and a test
  checks the split network against `UNETR.forward` with the same weights.
- SwinUNETR (Hatamizadeh et al., BrainLes 2021; `monai.networks.nets.SwinUNETR`): encoder = its swinViT; decoder =
  encoder1-4, encoder10, decoder1-5, out, mirrored from `SwinUNETR.forward` the same way.
- A transformers ViT/DINOv2 (2D): encoder = the HF model, its patch tokens laid out as a grid; decoder = a light
  progressive-upsampling decoder (SETR-PUP, Zheng et al., CVPR 2021: conv, norm, ReLU, x2 upsampling per stage).

Shapes: input (N, C, *spatial) with spatial (H, W) or (D, H, W); logits (N, num_classes, *spatial).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class EncoderOutput:
    """What an encoder hands its decoder: the input image (UNETR's and SwinUNETR's first skip) and the encoder's
    feature maps or token sequences, in the order the decoder reads them; `pooled` (N, feature_dim) is one vector
    per image (FedDPA's instance similarity reads it)."""

    image: torch.Tensor
    features: tuple
    pooled: torch.Tensor


class UnetrEncoder(nn.Module):
    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        tokens, hidden = self.vit(x)
        return EncoderOutput(x, (tokens, hidden[3], hidden[6], hidden[9]), tokens.mean(dim=1))


class UnetrDecoder(nn.Module):
    """UNETR's decoder (monai 1.6.1 UNETR.forward from `enc1 = self.encoder1(x_in)` on)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        for name in ("encoder1", "encoder2", "encoder3", "encoder4", "decoder5", "decoder4", "decoder3", "decoder2",
                     "out"):
            setattr(self, name, getattr(net, name))
        self.proj_axes = net.proj_axes
        self.proj_view_shape = list(net.proj_view_shape)

    def proj_feat(self, x: torch.Tensor) -> torch.Tensor:
        return x.view([x.size(0)] + self.proj_view_shape).permute(self.proj_axes).contiguous()

    def forward(self, enc: EncoderOutput) -> torch.Tensor:
        x, x2, x3, x4 = enc.features
        enc1 = self.encoder1(enc.image)
        enc2 = self.encoder2(self.proj_feat(x2))
        enc3 = self.encoder3(self.proj_feat(x3))
        enc4 = self.encoder4(self.proj_feat(x4))
        dec3 = self.decoder5(self.proj_feat(x), enc4)
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        return self.out(self.decoder2(dec1, enc1))


class SwinEncoder(nn.Module):
    def __init__(self, swin_vit: nn.Module, normalize: bool):
        super().__init__()
        self.swinViT = swin_vit
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        hidden = self.swinViT(x, self.normalize)
        return EncoderOutput(x, tuple(hidden), hidden[4].flatten(2).mean(dim=2))


class SwinDecoder(nn.Module):
    """SwinUNETR's decoder (monai 1.6.1 SwinUNETR.forward from `enc0 = self.encoder1(x_in)` on)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        for name in ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder5", "decoder4",
                     "decoder3", "decoder2", "decoder1", "out"):
            setattr(self, name, getattr(net, name))

    def forward(self, enc: EncoderOutput) -> torch.Tensor:
        hidden = enc.features
        enc0 = self.encoder1(enc.image)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec4 = self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return self.out(self.decoder1(dec0, enc0))


class HFGridEncoder(nn.Module):
    """A transformers ViT/DINOv2: the last hidden state's patch tokens (the [CLS] and any register tokens dropped) as
    a (N, hidden, H/p, W/p) grid."""

    def __init__(self, net: nn.Module, patch_size: int, interpolate: bool):
        super().__init__()
        self.net = net
        self.patch_size = patch_size
        self.interpolate = interpolate

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        tokens = self.net(pixel_values=x, **kwargs).last_hidden_state
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = tokens[:, tokens.shape[1] - h * w:]  # the patch tokens come last (after [CLS] and registers)
        grid = patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return EncoderOutput(x, (grid,), patches.mean(dim=1))


class LightDecoder(nn.Module):
    """SETR-PUP-style decoder: log2(patch) stages of 3x3 conv, GroupNorm, ReLU and x2 bilinear upsampling from the
    patch grid to the input's size, then a 1x1 conv to the classes."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, patch_size: int):
        super().__init__()
        stages = max(1, int(round(math.log2(patch_size))))
        layers, width = [], in_channels
        for _ in range(stages):
            layers += [nn.Conv2d(width, channels, 3, padding=1), nn.GroupNorm(min(8, channels), channels), nn.ReLU()]
            width = channels
        self.stages = nn.ModuleList(nn.Sequential(*layers[i:i + 3]) for i in range(0, len(layers), 3))
        self.out = nn.Conv2d(channels, num_classes, 1)

    def forward(self, enc: EncoderOutput) -> torch.Tensor:
        x = enc.features[0]
        for stage in self.stages:
            x = F.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)
        return self.out(F.interpolate(x, size=enc.image.shape[-2:], mode="bilinear", align_corners=False))
