"""Segmentation's loss, inference and metrics, all MONAI's (the trainer calls them where classification uses
cross-entropy, softmax and classification_metrics).

- loss: `monai.losses.DiceCELoss` (soft Dice + cross-entropy, equal weights; Isensee et al., nnU-Net, 2021);
- inference: the whole image in one forward, or, with data.roi_size, `monai.inferers.sliding_window_inference`
  (patches of roi_size, 25 % overlap, Gaussian-weighted blending) over the image at data.image_size;
- metrics per image and foreground class: `monai.metrics.DiceMetric` and `HausdorffDistanceMetric(percentile=95)`
  (HD95, in pixels/voxels of the model's grid, data.image_size per axis). A class absent from both the reference and
  the prediction has Dice 1 (nothing to find, nothing found; MONAI's ignore_empty=False) and no HD95 (NaN, left out of
  means); a class present in one of them only has Dice 0 and no HD95.

Site metrics: `dice` (the mean over images of each image's mean Dice over foreground classes: the headline),
`dice/<class>`, `hd95`, `hd95/<class>` (means over the images where defined); the test split adds a 95 % percentile
bootstrap interval of `dice` over its images (site.intervals' level and count).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot

SW_OVERLAP = 0.25
SW_BATCH = 4


def dice_ce_loss() -> DiceCELoss:
    """logits (N, K, *spatial), mask (N, 1, *spatial) of class indices -> a scalar."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def segment(forward, x: torch.Tensor, roi_size: int | None) -> torch.Tensor:
    """Logits (N, K, *spatial) for images x (N, C, *spatial): one forward, or a sliding window of roi_size patches."""
    if not roi_size or all(s <= roi_size for s in x.shape[2:]):
        return forward(x)
    dims = x.dim() - 2
    return sliding_window_inference(x, (roi_size,) * dims, SW_BATCH, forward, overlap=SW_OVERLAP, mode="gaussian")


def per_image_scores(logits: torch.Tensor, mask: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(dice, hd95), each (N, num_classes - 1) float64 over the foreground classes, for logits (N, K, *spatial) and
    a reference mask (N, 1, *spatial) of class indices."""
    pred = one_hot(logits.argmax(dim=1, keepdim=True), num_classes)
    ref = one_hot(mask.long(), num_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(pred, ref)
    empty = (pred[:, 1:].flatten(2).sum(-1) == 0) | (ref[:, 1:].flatten(2).sum(-1) == 0)
    if bool(empty.all()):
        hd = torch.full_like(dice, float("nan"))
    else:
        import warnings

        with warnings.catch_warnings():  # MONAI warns for every empty class; those are NaN by definition here
            warnings.simplefilter("ignore")
            hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(pred, ref)
        hd = torch.where(empty, torch.full_like(hd, float("nan")), hd)
    return dice.double().cpu().numpy(), hd.double().cpu().numpy()


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def segmentation_metrics(dice: np.ndarray, hd95: np.ndarray, class_name) -> dict[str, float]:
    """Site metrics from the per-image scores (N, K - 1): dice, hd95 and both per class (`class_name(k)` names
    foreground class k, 1-based)."""
    if len(dice) == 0:
        return {"dice": float("nan"), "hd95": float("nan")}
    defined = ~np.isnan(hd95)
    rows = defined.any(axis=1)  # each image's mean HD95 over the classes where it is defined
    per_image_hd = np.where(defined, hd95, 0.0).sum(axis=1)[rows] / defined.sum(axis=1)[rows]
    out = {"dice": float(dice.mean(axis=1).mean()), "hd95": _nanmean(per_image_hd)}
    for k in range(dice.shape[1]):
        name = class_name(k + 1)
        out[f"dice/{name}"] = float(dice[:, k].mean())
        out[f"hd95/{name}"] = _nanmean(hd95[:, k])
    return out


def dice_interval(dice: np.ndarray, n_boot: int, level: float, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean Dice over images (each image's mean over foreground classes);
    (nan, nan) with fewer than two images."""
    per_image = dice.mean(axis=1) if len(dice) else dice
    if len(per_image) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = per_image[rng.integers(0, len(per_image), size=(n_boot, len(per_image)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
