"""Orthogonality between the global and personal adapters (METHOD.md, "Loss").

weight:          L = sum_l ||A_g^l (A_p^l)^T||_F^2       (orth_on A; B uses ||(B_g^l)^T B_p^l||_F^2)
representation:  L = mean_l mean_t cos^2(u_g, u_p),  u = B A x, captured by forward hooks on peft's
                 lora_B[<adapter>] modules (the base model is not patched).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Conv LoRA A is (r, d_in, 1, 1) and B is (d_out, r, 1, 1); flatten to 2-D like the Linear case."""
    return weight.reshape(weight.shape[0], -1)


def _pair_penalty(g: torch.Tensor, p: torch.Tensor, normalize: bool) -> torch.Tensor:
    """||g p^T||_F^2 for row-vector sets g (r_g x d) and p (r_p x d); cosine form if normalized."""
    if normalize:
        g = F.normalize(g, dim=1, eps=EPS)
        p = F.normalize(p, dim=1, eps=EPS)
    return (g @ p.T).pow(2).sum()


def weight_orthogonality(layers, orth_on: str = "A", normalize: bool = False) -> torch.Tensor:
    """Sum over adapted layers. The global adapter is detached: within a round the personal adapter
    moves away from the shared subspace, not the reverse (the shared one is averaged by the server)."""
    total = None
    for _, layer in layers:
        if "global" not in layer.lora_A or "personal" not in layer.lora_A:
            continue
        terms = []
        if orth_on in ("A", "AB"):
            a_g = _as_matrix(layer.lora_A["global"].weight).detach()
            a_p = _as_matrix(layer.lora_A["personal"].weight)
            terms.append(_pair_penalty(a_g, a_p, normalize))
        if orth_on in ("B", "AB"):
            # columns of B span the output subspace: compare B^T rows
            b_g = _as_matrix(layer.lora_B["global"].weight).T.detach()
            b_p = _as_matrix(layer.lora_B["personal"].weight).T
            terms.append(_pair_penalty(b_g, b_p, normalize))
        for t in terms:
            total = t if total is None else total + t
    if total is None:
        raise ValueError("weight orthogonality needs layers holding both a 'global' and a 'personal' adapter")
    return total


def cos_squared(u_g: torch.Tensor, u_p: torch.Tensor, feature_dim: int) -> torch.Tensor:
    """cos^2 between two adapter outputs at every position, with EPS in the denominator; in float32 at least (under
    bf16/fp16 autocast the outputs arrive in that dtype, too coarse for a cosine near 0)."""
    if u_g.dtype in (torch.float16, torch.bfloat16):
        u_g, u_p = u_g.float(), u_p.float()
    dot = (u_g * u_p).sum(dim=feature_dim)
    return dot.pow(2) / ((u_g.pow(2).sum(dim=feature_dim) + EPS) * (u_p.pow(2).sum(dim=feature_dim) + EPS))


class RepresentationOrthogonality:
    """Records u_g and u_p of every adapted layer during a forward pass; `loss()` then averages cos^2.

    Use as a context manager around the training loop: hooks are removed on exit.
    """

    def __init__(self, layers):
        self._layers = [(name, layer) for name, layer in layers
                        if "global" in layer.lora_B and "personal" in layer.lora_B]
        if not self._layers:
            raise ValueError("representation orthogonality needs layers with both 'global' and 'personal' adapters")
        # Conv outputs are (N, C, ...): features on dim 1. Linear outputs are (..., D): the last dim.
        self._feature_dim = {name: 1 if isinstance(layer.lora_B["global"], nn.modules.conv._ConvNd) else -1
                             for name, layer in self._layers}
        self._outputs: dict[str, dict[str, torch.Tensor]] = {}
        self._handles = []

    def __enter__(self):
        for name, layer in self._layers:
            for adapter in ("global", "personal"):
                self._handles.append(layer.lora_B[adapter].register_forward_hook(self._recorder(name, adapter)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._outputs.clear()

    def _recorder(self, layer_name: str, adapter: str):
        def hook(module: nn.Module, inputs, output):
            self._outputs.setdefault(layer_name, {})[adapter] = output
        return hook

    def loss(self) -> torch.Tensor:
        per_layer = []
        for name, pair in self._outputs.items():
            if len(pair) < 2:
                continue
            u_g, u_p = pair["global"], pair["personal"]
            per_layer.append(cos_squared(u_g, u_p, self._feature_dim[name]).mean())
        self._outputs.clear()
        if not per_layer:
            raise RuntimeError("no adapter outputs recorded: call loss() after a forward pass inside the context")
        return torch.stack(per_layer).mean()
