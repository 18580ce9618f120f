"""How far apart a site's two adapters are: the diagnostics of every dual method, per site and round.

    overlap_A   mean over adapted layers of the mean squared cosine of the principal angles between the row
                spaces of A_g and A_p (the input directions each adapter reads): 1 = the same subspace,
                0 = orthogonal subspaces;
    overlap_B   the same between the column spaces of B_g and B_p (the output directions each writes); a layer
                whose B is still 0 has no column space and is left out (n/a while every B is 0);
    overlap_u   the mean cos^2(u_g, u_p) over the validation split, positions and layers (the representation
                loss's quantity, u = B A x).

Principal angles (Bjorck & Golub, 1973): with orthonormal bases Q_x, Q_y, the cosines of the k = min(dim) angles
are the singular values of Q_x^T Q_y, so their mean square is ||Q_x^T Q_y||_F^2 / k.

What chance gives, for comparison (random_A, random_B, random_u): for uniformly random subspaces of dimensions
r_x <= r_y in R^d, E ||Q_x^T Q_y||_F^2 = r_x r_y / d, so the expected mean cos^2 is r_y / d; for two random
directions in R^d, E cos^2 = 1 / d. Averaged over the adapted layers, with d = d_in (A), d_out (B and u).
"""

from __future__ import annotations

import math

import torch

# singular values below this fraction of the largest count as zero (a B that is still 0, a rank-deficient factor)
RANK_TOL = 1e-6


def orthonormal_basis(vectors: torch.Tensor) -> torch.Tensor:
    """(d, k) orthonormal basis of the column space of `vectors` (d, n), in float64; k = its numerical rank."""
    u, s, _ = torch.linalg.svd(vectors.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    return u[:, : int((s > RANK_TOL * s[0]).sum())]


def subspace_overlap(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the column spaces of x (d, n) and y (d, m); NaN when
    either is {0}."""
    qx, qy = orthonormal_basis(x), orthonormal_basis(y)
    k = min(qx.shape[1], qy.shape[1])
    if k == 0:
        return math.nan
    return float((qx.T @ qy).pow(2).sum()) / k


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def adapter_overlaps(layers) -> dict[str, float]:
    """overlap_A, overlap_B and their random baselines over the layers holding both adapters ({} if none)."""
    overlap_a, overlap_b, random_a, random_b, random_u = [], [], [], [], []
    for _, layer in layers:
        if "global" not in layer.lora_A or "personal" not in layer.lora_A:
            continue
        with torch.no_grad():
            a_g, a_p = (layer.lora_A[n].weight.detach().reshape(layer.lora_A[n].weight.shape[0], -1).cpu()
                        for n in ("global", "personal"))
            b_g, b_p = (layer.lora_B[n].weight.detach().reshape(layer.lora_B[n].weight.shape[0], -1).cpu()
                        for n in ("global", "personal"))
        overlap_a.append(subspace_overlap(a_g.T, a_p.T))  # row spaces, in R^{d_in}
        overlap_b.append(subspace_overlap(b_g, b_p))  # column spaces, in R^{d_out}
        d_in, d_out = a_g.shape[1], b_g.shape[0]
        random_a.append(max(a_g.shape[0], a_p.shape[0]) / d_in)
        random_b.append(max(b_g.shape[1], b_p.shape[1]) / d_out)
        random_u.append(1.0 / d_out)
    if not overlap_a:
        return {}
    return {"overlap_A": _mean(overlap_a), "overlap_B": _mean(overlap_b), "random_A": _mean(random_a),
            "random_B": _mean(random_b), "random_u": _mean(random_u)}
