"""The site model: frozen backbone + peft LoRA adapters named by the method spec + a task head.

"global" and "personal" are two names in peft's lora_A/lora_B ModuleDicts, both active in one
forward pass. Which tensors train, and which travel, is read from the MethodSpec; nothing here
branches on a method's name.

Key names are stable: `backbone.base_model.model.<layer>.lora_A.global.weight`, `head.weight`, ...
(see methods.GROUP_PATTERNS).
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from typing import Iterator

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedopal.model.backbones import Backbone, BackboneError, build_backbone
from fedopal.model.fused_lora import FusedLoraForward, fuse_lora_layers
from fedopal.specs.methods import MethodSpec, group_of


class FedOpalModel(nn.Module):
    def __init__(self, backbone: Backbone, spec: MethodSpec, num_classes: int, lora_rank: int, lora_alpha: float,
                 lora_dropout: float, target_modules: str | None = None, fused_adapters: bool = True):
        """fused_adapters: run each adapted layer's active adapters as one product (fused_lora); the
        parameters and keys are peft's either way, and false runs peft's own forward (the reference path)."""
        super().__init__()
        self.spec = spec
        self.in_channels = backbone.in_channels
        self.normalization = backbone.normalization
        module = backbone.module
        if spec.adapters:
            targets = target_modules or backbone.lora_targets
            lora = dict(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets)
            first, *others = spec.adapters
            module = get_peft_model(module, LoraConfig(**lora), adapter_name=first)
            for name in others:
                module.add_adapter(name, LoraConfig(**lora))
            # PeftModel.set_adapter(list) raises; the LoraModel underneath takes a list.
            module.base_model.set_adapter(list(spec.adapters))
            if fused_adapters:
                fuse_lora_layers(module)
        self.backbone = module
        # segmentation: the decoder is the head (model.segmentation), its keys the `head` group like a linear head's
        self.head = backbone.decoder if backbone.decoder is not None else nn.Linear(backbone.feature_dim, num_classes)
        self.segmentation = backbone.decoder is not None
        if spec.regularizer == "projection":
            self._check_projection_room(lora_rank)
            self.project_personal()
        # transformers' checkpointed layers recompute only while their own `training` flag is set (see train())
        self._checkpointed_layers = list(backbone.checkpointed_layers)
        self.apply_trainable()

    # -- which tensors train -------------------------------------------------------------------
    def apply_trainable(self) -> None:
        for key, param in self.named_parameters():
            param.requires_grad_(self.spec.is_trainable(key))

    @property
    def backbone_frozen(self) -> bool:
        return "backbone" not in self.spec.trainable

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.backbone_frozen:
            # A frozen backbone stays in eval mode: no BatchNorm statistics drift, no drop-connect.
            self.backbone.eval()
            for name, module in self.backbone.named_modules():
                if name.endswith("lora_dropout"):
                    module.train(True)
            # Gradient checkpointing (model.gradient_checkpointing) of a transformers backbone: its
            # GradientCheckpointingLayer checks only its own flag, so set that one; its dropouts stay in eval mode.
            for layer in self._checkpointed_layers:
                layer.training = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    # -- adapters ------------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """Every adapted layer (a peft LoRA layer holding lora_A/lora_B dicts)."""
        for name, module in self.backbone.named_modules():
            if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict) and len(module.lora_A):
                yield name, module

    @contextmanager
    def only_adapters(self, names: list[str]):
        """Run with a subset of adapters active (e.g. global-only evaluation), then restore."""
        if not self.spec.adapters:
            yield
            return
        self.backbone.base_model.set_adapter(list(names))
        try:
            yield
        finally:
            self.backbone.base_model.set_adapter(list(self.spec.adapters))
            self.apply_trainable()  # set_adapter flips requires_grad; the spec decides

    @contextmanager
    def personal_scaled(self, weight: torch.Tensor):
        """Scale the personal adapter's output per instance (weight: (N,), batch first) during the context.

        A fused layer scales the personal block of z (B is linear); a layer on peft's path, through a forward
        hook on lora_B["personal"] (which a fused forward never calls, so each layer is scaled once)."""
        def hook(module, inputs, output):
            return output * weight.to(output.dtype).view(-1, *([1] * (output.dim() - 1)))

        layers = [layer for _, layer in self.lora_layers() if "personal" in layer.lora_B]
        handles = [layer.lora_B["personal"].register_forward_hook(hook) for layer in layers]
        fused = [layer for layer in layers if isinstance(layer, FusedLoraForward)]
        for layer in fused:
            layer.instance_weights = {"personal": weight}
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for layer in fused:
                layer.instance_weights = None

    @torch.no_grad()
    def base_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features (N, feature_dim) of the frozen foundation model alone (every adapter off); a segmentation
        encoder's pooled features."""
        if not self.spec.adapters:
            out = self.backbone(x)
        else:
            with self.backbone.disable_adapter():
                out = self.backbone(x)
        return out.pooled if self.segmentation else out

    # -- state split ---------------------------------------------------------------------------
    def trainable_keys(self) -> list[str]:
        return [k for k in self.state_dict() if self.spec.is_trainable(k)]

    def shared_state(self, transfer_dtype: str = "float32") -> dict[str, torch.Tensor]:
        """What leaves the site: exactly the spec's shared groups, CPU tensors (floating ones in the transfer dtype,
        float32 by default, whatever the device and autocast precision)."""
        return {k: to_transfer_dtype(v.detach().to("cpu", copy=True), transfer_dtype)
                for k, v in self.state_dict().items() if self.spec.is_shared(k)}

    def site_state(self) -> dict[str, torch.Tensor]:
        """What a site keeps: trained tensors that are not shared (personal adapter, personal head, ...), on the CPU."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.state_dict().items()
                if self.spec.is_trainable(k) and not self.spec.is_shared(k)}

    def state_by_group(self) -> dict[str, dict[str, torch.Tensor]]:
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in self.state_dict().items():
            groups.setdefault(group_of(k), {})[k] = v
        return groups

    def load_shared(self, state: dict) -> None:
        """Load tensors received from the server; refuse anything that is not a shared key of this model."""
        own = self.state_dict()
        bad = [k for k in state if k not in own or not self.spec.is_shared(k)]
        if bad:
            raise KeyError(f"received tensors that are not shared keys of this model: {bad[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(torch.as_tensor(v, dtype=own[k].dtype).reshape(own[k].shape))
        self.project_personal()  # a new A_g: the personal adapter leaves its row space again (fedopal_p)

    # -- orthogonality by construction (fedopal_p) ----------------------------------------------------
    def _check_projection_room(self, rank: int) -> None:
        tight = [(name, layer.lora_A["global"].weight[0].numel()) for name, layer in self.lora_layers()
                 if "personal" in layer.lora_A and layer.lora_A["global"].weight[0].numel() < 2 * rank]
        if tight:
            name, d_in = tight[0]
            raise BackboneError(f"{self.spec.name} keeps the personal adapter in the complement of the global one's "
                             f"input subspace, which needs 2 x model.lora_rank <= the layer's input width; {name} has "
                             f"{d_in} < 2 x {rank} ({len(tight)} such layers). Fix: lower model.lora_rank, or narrow "
                             "model.target_modules.")

    @torch.no_grad()
    def project_personal(self) -> None:
        """fedopal_p: A_p <- A_p (I - Q_g Q_g^T) in every adapted layer, Q_g an orthonormal basis of A_g's row space
        (A flattened to r x d_in for a conv), computed detached from the current A_g. Afterwards A_g A_p^T = 0 up to
        float rounding: the personal adapter reads only what the global one does not. A no-op for other methods.
        Called after every optimizer step (SiteTrainer) and whenever A_g changes (load_shared, load_site_state, init).
        Needs 2 r <= d_in (checked at build): with r_g + r_p > d_in the complement cannot hold r_p directions."""
        if self.spec.regularizer != "projection":
            return
        for _, layer in self.lora_layers():
            if "global" not in layer.lora_A or "personal" not in layer.lora_A:
                continue
            a_g = layer.lora_A["global"].weight
            a_p = layer.lora_A["personal"].weight
            g = a_g.reshape(a_g.shape[0], -1).double()
            q, _ = torch.linalg.qr(g.T)  # (d_in, r_g): an orthonormal basis of A_g's row space
            p = a_p.reshape(a_p.shape[0], -1).double()
            a_p.copy_((p - (p @ q) @ q.T).reshape(a_p.shape).to(a_p.dtype))

    def load_site_state(self, state: dict) -> None:
        own = self.state_dict()
        bad = [k for k in state if k not in own or tuple(own[k].shape) != tuple(state[k].shape)]
        if bad:
            raise KeyError(f"site checkpoint does not fit this model (first keys: {bad[:5]})")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)
        self.project_personal()

    def reseed_personal(self, site_name: str, seed: int) -> None:
        """Personal adapters start from a seed derived from the site name (A random, B zero, as peft does)."""
        digest = int(hashlib.sha256(f"{seed}:{site_name}".encode()).hexdigest()[:8], 16)
        gen = torch.Generator().manual_seed(digest)
        with torch.no_grad():
            for _, layer in self.lora_layers():
                if "personal" in layer.lora_A:
                    nn.init.kaiming_uniform_(layer.lora_A["personal"].weight, a=math.sqrt(5), generator=gen)
                    nn.init.zeros_(layer.lora_B["personal"].weight)
        self.project_personal()


def to_transfer_dtype(tensor: torch.Tensor, transfer_dtype: str) -> torch.Tensor:
    """float16 transfer halves the bytes on the wire; integer buffers (BatchNorm counters) are left alone."""
    return tensor.to(torch.float16) if transfer_dtype == "float16" and tensor.is_floating_point() else tensor


def count_params(state: dict) -> int:
    return int(sum(v.numel() for v in state.values()))


def nbytes(state: dict) -> int:
    """Bytes on the wire: sum of numel x itemsize (numpy arrays or torch tensors)."""
    total = 0
    for v in state.values():
        total += int(v.nbytes) if hasattr(v, "nbytes") else int(v.numel() * v.element_size())
    return total


def tensor_norm(state: dict) -> float:
    """L2 norm over all tensors of a state (a fingerprint of what a site received)."""
    return float(sum(float((torch.as_tensor(v, dtype=torch.float64) ** 2).sum()) for v in state.values()) ** 0.5)


def build_model(cfg, spec: MethodSpec, site_name: str | None = None) -> FedOpalModel:
    """Same config + seed -> the same global adapter and head init on the server and every site."""
    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(cfg)
    model = FedOpalModel(
        backbone, spec, cfg.data.num_classes, cfg.model.lora_rank, cfg.model.lora_alpha,
        cfg.model.lora_dropout, cfg.model.target_modules, cfg.model.fused_adapters,
    )
    if site_name is not None:
        model.reseed_personal(site_name, cfg.train.seed)
    return model
