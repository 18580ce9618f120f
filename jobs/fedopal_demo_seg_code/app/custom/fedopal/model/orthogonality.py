"""Orthogonality between the global and personal adapters (METHOD.md, "Loss").

weight:          L = sum_l ||A_g^l (A_p^l)^T||_F^2       (orth_on A; B uses ||(B_g^l)^T B_p^l||_F^2)
representation:  L = mean_l mean_t cos^2(u_g, u_p),  u = B A x: in rank space from the fused forward's
                 z = [A_g; A_p] x (fused_lora), or from forward hooks on peft's lora_B[<adapter>] modules.
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
    """sum over the batch of ||g p^T||_F^2, for row-vector sets g (L x r_g x d) and p (L x r_p x d); cosine form if
    normalized."""
    if normalize:
        g = F.normalize(g, dim=-1, eps=EPS)
        p = F.normalize(p, dim=-1, eps=EPS)
    return (g @ p.transpose(-1, -2)).pow(2).sum()


def weight_orthogonality(layers, orth_on: str = "A", normalize: bool = False) -> torch.Tensor:
    """Sum over adapted layers. The global adapter is detached: within a round the personal adapter
    moves away from the shared subspace, not the reverse (the shared one is averaged by the server).
    Layers whose factors have equal shapes are stacked and penalized in one batched product (dozens of tiny
    products per step would be launch-bound on a GPU)."""
    pairs: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for _, layer in layers:
        if "global" not in layer.lora_A or "personal" not in layer.lora_A:
            continue
        if orth_on in ("A", "AB"):
            a_g = _as_matrix(layer.lora_A["global"].weight).detach()
            a_p = _as_matrix(layer.lora_A["personal"].weight)
            pairs.setdefault(("A", a_g.shape, a_p.shape), []).append((a_g, a_p))
        if orth_on in ("B", "AB"):
            # columns of B span the output subspace: compare B^T rows
            b_g = _as_matrix(layer.lora_B["global"].weight).T.detach()
            b_p = _as_matrix(layer.lora_B["personal"].weight).T
            pairs.setdefault(("B", b_g.shape, b_p.shape), []).append((b_g, b_p))
    if not pairs:
        raise ValueError("weight orthogonality needs layers holding both a 'global' and a 'personal' adapter")
    return sum(_pair_penalty(torch.stack([g for g, _ in group]), torch.stack([p for _, p in group]), normalize)
               for group in pairs.values())


def cos_squared(u_g: torch.Tensor, u_p: torch.Tensor, feature_dim: int) -> torch.Tensor:
    """cos^2 between two adapter outputs at every position, with EPS in the denominator; in float32 at least (under
    bf16/fp16 autocast the outputs arrive in that dtype, too coarse for a cosine near 0)."""
    if u_g.dtype in (torch.float16, torch.bfloat16):
        u_g, u_p = u_g.float(), u_p.float()
    dot = (u_g * u_p).sum(dim=feature_dim)
    return dot.pow(2) / ((u_g.pow(2).sum(dim=feature_dim) + EPS) * (u_p.pow(2).sum(dim=feature_dim) + EPS))


class RepresentationOrthogonality:
    """Captures what each adapted layer's two adapters produce during a forward pass; `loss()` then averages cos^2.

    Two capture paths give the same loss (tests compare them in float64, to 1e-6 relative):
    - fused layers (fused_lora, the default) hand over z = [A_g; A_p] x, r_g + r_p numbers per position, and
      the loss is computed in rank space: with u_g = B_g z_g and u_p = B_p z_p,
          <u_g, u_p> = z_g^T (B_g^T B_p) z_p,   ||u_g||^2 = z_g^T (B_g^T B_g) z_g,   ||u_p||^2 likewise,
      so the d_out-wide outputs never exist (the Gram blocks are r x r). Layers are batched by shape: one Gram
      product per group of equal B shapes, one cos^2 evaluation per group of equal z shapes, not a loop of small
      products per layer.
    - other layers (peft's own forward, `model.fused_adapters: false`): forward hooks on lora_B[<adapter>] record
      u_g and u_p themselves (the reference path).
    u is lora_B's output before peft's scaling (alpha / r), in both paths, with EPS in the denominator.
    Use as a context manager around the training loop: hooks and recorders are removed on exit.
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
        self._ranks: dict[int, tuple[nn.Module, list[str], torch.Tensor]] = {}
        self._handles = []

    def __enter__(self):
        for name, layer in self._layers:
            for adapter in ("global", "personal"):
                self._handles.append(layer.lora_B[adapter].register_forward_hook(self._recorder(name, adapter)))
            if hasattr(layer, "rank_space_recorder"):
                layer.rank_space_recorder = self
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for _, layer in self._layers:
            if hasattr(layer, "rank_space_recorder"):
                layer.rank_space_recorder = None
        self._outputs.clear()
        self._ranks.clear()

    def _recorder(self, layer_name: str, adapter: str):
        def hook(module: nn.Module, inputs, output):
            self._outputs.setdefault(layer_name, {})[adapter] = output
        return hook

    def record(self, layer: nn.Module, active: list[str], z: torch.Tensor) -> None:
        """Called by a fused layer's forward (fused_lora.FusedLoraForward)."""
        if "global" in active and "personal" in active:
            self._ranks[id(layer)] = (layer, list(active), z)

    def loss(self) -> torch.Tensor:
        per_layer = []
        for name, pair in self._outputs.items():
            if len(pair) < 2:
                continue
            u_g, u_p = pair["global"], pair["personal"]
            per_layer.append(cos_squared(u_g, u_p, self._feature_dim[name]).mean().reshape(1))
        if self._ranks:
            per_layer.append(rank_space_cos_squared(list(self._ranks.values())))
        self._outputs.clear()
        self._ranks.clear()
        if not per_layer:
            raise RuntimeError("no adapter outputs recorded: call loss() after a forward pass inside the context")
        return torch.cat(per_layer).mean()


def _rank_blocks(layer: nn.Module, active: list[str], z: torch.Tensor):
    """(z_g, z_p) as (positions, r) matrices, and B_g, B_p as (d_out, r), from one fused layer's record."""
    z = z.movedim(layer.rank_dim, -1).reshape(-1, z.shape[layer.rank_dim])
    start, blocks = 0, {}
    for a in active:
        blocks[a] = z[:, start:start + layer.r[a]]
        start += layer.r[a]
    b_g, b_p = (_as_matrix(layer.lora_B[a].weight) for a in ("global", "personal"))
    return blocks["global"], blocks["personal"], b_g, b_p


def rank_space_cos_squared(records: list) -> torch.Tensor:
    """(L,) per-layer means of cos^2(u_g, u_p) over positions, from rank space (RepresentationOrthogonality).

    Computed in float32 at least (z arrives in the autocast dtype under bf16/fp16)."""
    items = [_rank_blocks(*r) for r in records]
    dtype = torch.promote_types(items[0][0].dtype, torch.float32)
    # Gram blocks of [B_g | B_p], one batched product per group of equal shapes
    grams: list[torch.Tensor | None] = [None] * len(items)
    by_shape: dict[tuple, list[int]] = {}
    for i, (_, _, b_g, b_p) in enumerate(items):
        by_shape.setdefault((tuple(b_g.shape), tuple(b_p.shape)), []).append(i)
    for indices in by_shape.values():
        b = torch.stack([torch.cat([items[i][2], items[i][3]], dim=1) for i in indices]).to(dtype)
        gram = b.transpose(1, 2) @ b  # (layers, r_g + r_p, r_g + r_p)
        for j, i in enumerate(indices):
            grams[i] = gram[j]
    # cos^2 per position, one evaluation per group of equal z shapes
    means: list[torch.Tensor | None] = [None] * len(items)
    by_shape = {}
    for i, (z_g, z_p, _, _) in enumerate(items):
        by_shape.setdefault((tuple(z_g.shape), tuple(z_p.shape)), []).append(i)
    for indices in by_shape.values():
        r_g = items[indices[0]][0].shape[1]
        z_g = torch.stack([items[i][0] for i in indices]).to(dtype)  # (layers, positions, r_g)
        z_p = torch.stack([items[i][1] for i in indices]).to(dtype)
        gram = torch.stack([grams[i] for i in indices])
        g_gg, g_gp, g_pp = gram[:, :r_g, :r_g], gram[:, :r_g, r_g:], gram[:, r_g:, r_g:]
        dot = ((z_g @ g_gp) * z_p).sum(-1)
        norm_g = ((z_g @ g_gg) * z_g).sum(-1).clamp_min(0.0)  # a Gram form is >= 0; rounding may dip below
        norm_p = ((z_p @ g_pp) * z_p).sum(-1).clamp_min(0.0)
        cos2 = dot.pow(2) / ((norm_g + EPS) * (norm_p + EPS))
        for j, i in enumerate(indices):
            means[i] = cos2[j].mean()
    return torch.stack(means)
