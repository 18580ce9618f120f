"""One product for all active LoRA adapters of a layer (`model.fused_adapters`, on by default).

peft runs each active adapter on its own: every adapter re-reads the layer's input x and adds its own output, scaled
on the full d_out width. With adapters a = 1..k (for FedOPAL: global and personal) the sum is one product of rank
r_1 + ... + r_k, reading x once:

    sum_a s_a B_a A_a x  =  [B_1 | ... | B_k] · (s ⊙ z),    z = [A_1 ; ... ; A_k] x,   s = (s_1 1_{r_1}, ..., s_k 1_{r_k})

(s_a = alpha_a / r_a, peft's scaling). For a convolution, A is the layer's k×k conv and B a 1×1 conv (as peft builds
them), which concatenate the same way along the rank channels. z, r_1 + ... + r_k numbers per position, is also
all the representation loss needs (orthogonality.RepresentationOrthogonality): u_a = B_a z_a.

The layers keep peft's classes (a subclass is swapped in), parameters and state-dict keys exactly, so exports, key
groups, the result filter and the aggregator see no difference. peft's own forward runs instead wherever the fused
one would not be exact: adapters disabled or merged, a LoRA dropout active in training (peft draws one mask per
adapter), DoRA or another LoRA variant, a LoRA bias, grouped convolutions, mixed-adapter batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as peft_lora
from torch import nn


class FusedLoraForward:
    """Mixin put before a peft LoRA layer class (see `fuse_lora_layers`). Two plain attributes steer it:

    - `rank_space_recorder`: while set (RepresentationOrthogonality, during training), each fused forward hands it
      (layer, active adapters, z), z of shape (..., r_total) for a Linear, (N, r_total, *spatial) for a conv;
    - `instance_weights`: {adapter: (N,) weights} multiplies that adapter's output per instance (FedDPA's weighting,
      FedOpalModel.personal_scaled); the per-instance weight scales z's block of that adapter, since B is linear.
    """

    rank_space_recorder = None
    instance_weights = None

    def fusable(self, active: list[str]) -> bool:
        for name in active:
            dropout = self.lora_dropout[name]
            if not (isinstance(dropout, nn.Identity) or not dropout.training):
                return False  # peft draws a separate dropout mask per adapter
            if name in self.lora_variant or self.lora_bias.get(name, False):
                return False
            if getattr(self.lora_B[name], "groups", 1) != 1:
                return False
        return len({self.lora_A[name].weight.dtype for name in active}) == 1

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if (self.disable_adapters or self.merged or not active or kwargs.get("adapter_names") is not None
                or not self.fusable(active)):
            return super().forward(x, *args, **kwargs)
        for key in peft_lora.VARIANT_KWARG_KEYS:
            kwargs.pop(key, None)
        result = self.base_layer(x, *args, **kwargs)
        x = self._cast_input_dtype(x, self.lora_A[active[0]].weight.dtype)
        a_weights = [self.lora_A[a].weight for a in active]
        z = self.project_in(x, a_weights[0] if len(active) == 1 else torch.cat(a_weights, dim=0), active[0])
        if self.rank_space_recorder is not None:
            self.rank_space_recorder.record(self, active, z)
        b_weights = [self.lora_B[a].weight for a in active]
        b = b_weights[0] if len(active) == 1 else torch.cat(b_weights, dim=1)
        out = self.project_out(z * self.rank_scale(active, z), b)
        return (result + out).to(result.dtype)

    def rank_scale(self, active: list[str], z: torch.Tensor) -> torch.Tensor:
        """s (and any instance weights) shaped to broadcast over z's rank axis. s is built once per adapter set,
        dtype and device (a few tiny kernels per layer and step otherwise)."""
        key = (tuple(active), tuple(float(self.scaling[a]) for a in active), z.dtype, z.device, z.dim())
        cache = self.__dict__.setdefault("_rank_scale_cache", {})
        scale = cache.get(key)
        if scale is None:
            shape = [1] * z.dim()
            shape[self.rank_dim] = -1
            scale = torch.cat([torch.full((self.r[a],), float(self.scaling[a]), dtype=z.dtype, device=z.device)
                               for a in active]).view(shape)
            cache[key] = scale
        if self.instance_weights:
            per_instance = torch.ones(z.shape[0], scale.numel(), dtype=z.dtype, device=z.device)
            start = 0
            for a in active:
                if a in self.instance_weights:
                    per_instance[:, start:start + self.r[a]] = self.instance_weights[a].to(z.dtype).view(-1, 1)
                start += self.r[a]
            inst_shape = [z.shape[0]] + [1] * (z.dim() - 1)
            inst_shape[self.rank_dim] = -1
            scale = scale * per_instance.view(inst_shape)
        return scale


class FusedLinear(FusedLoraForward, peft_lora.Linear):
    rank_dim = -1

    def project_in(self, x, a, first):
        return F.linear(x, a)

    def project_out(self, z, b):
        return F.linear(z, b)


class _FusedConv(FusedLoraForward):
    rank_dim = 1

    def project_in(self, x, a, first):
        conv = self.lora_A[first]  # every adapter's A has the base layer's kernel, stride and padding
        return self.conv_fn(x, a, None, conv.stride, conv.padding, conv.dilation)

    def project_out(self, z, b):
        return self.conv_fn(z, b)  # B: 1x1, stride 1


class FusedConv2d(_FusedConv, peft_lora.Conv2d):
    pass


class FusedConv3d(_FusedConv, peft_lora.Conv3d):
    pass


FUSED = {peft_lora.Linear: FusedLinear, peft_lora.Conv2d: FusedConv2d, peft_lora.Conv3d: FusedConv3d}


def fuse_lora_layers(module: nn.Module) -> tuple[int, list[str]]:
    """Swap the fused forward into every peft LoRA Linear/Conv2d/Conv3d layer of `module` (in place; nothing else
    changes). Returns (layers fused, names of LoRA layers of other types, which keep peft's forward)."""
    fused, other = 0, []
    for name, layer in module.named_modules():
        if not isinstance(layer, peft_lora.LoraLayer) or isinstance(layer, FusedLoraForward):
            continue
        target = FUSED.get(type(layer))
        if target is None:
            other.append(name)
        else:
            layer.__class__ = target
            fused += 1
    return fused, other


def unfuse_lora_layers(module: nn.Module) -> None:
    """Back to peft's classes (the reference path)."""
    back = {v: k for k, v in FUSED.items()}
    for layer in module.modules():
        if type(layer) in back:
            layer.__class__ = back[type(layer)]
