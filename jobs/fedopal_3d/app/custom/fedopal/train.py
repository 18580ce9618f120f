"""Local training and evaluation: one trainer for every method (the spec decides what trains).

    L = L_task + lambda * L_orth      (L_orth from the spec's regularizer; none -> 0)
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from fedopal.adapters import FedOpalModel
from fedopal.data import loader
from fedopal.orthogonality import RepresentationOrthogonality, weight_orthogonality


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Balanced accuracy (headline), accuracy, ROC-AUC, defined for any subset of the classes present in `labels`:

    - accuracy: always;
    - balanced accuracy: the mean recall over the classes present; NaN (reported n/a) with one class present;
    - AUC: NaN with one class; with exactly two of the classes, the binary AUC of those two (each score
      renormalized over the pair); with more, one-vs-rest over the classes present (sklearn's ovr with
      labels=present treats two labels as a binary problem and then rejects a 2-column score array).
    """
    labels = np.asarray(labels).reshape(-1).astype(int)
    preds = probs.argmax(axis=1)
    present = np.unique(labels)
    nan = float("nan")
    if len(labels) == 0:
        return {"balanced_accuracy": nan, "accuracy": nan, "auc": nan}
    if len(present) < 2:
        bacc = auc = nan
    else:
        bacc = float(np.mean([np.mean(preds[labels == c] == c) for c in present]))
        pair = probs[:, present]
        pair = pair / np.clip(pair.sum(1, keepdims=True), 1e-12, None)
        if len(present) == 2:
            auc = float(roc_auc_score(labels == present[1], pair[:, 1]))
        else:
            auc = float(roc_auc_score(labels, pair, multi_class="ovr", labels=present))
    return {"balanced_accuracy": bacc, "accuracy": float(np.mean(preds == labels)), "auc": auc}


class InstanceWeighting:
    """FedDPA's instance-wise dynamic weighting, as we read it (README, "Methods"): the personal adapter's
    weight for a test instance is the mean cosine similarity between its frozen-backbone features and those
    of its k nearest training instances of this site, clipped to [0, 1]; the global adapter keeps weight 1.
    In-distribution inputs get the personalized model, unfamiliar ones fall back toward the global one."""

    def __init__(self, model: FedOpalModel, train_set, batch_size: int, k: int = 5):
        feats = [model.base_features(b["image"]) for b in loader(train_set, batch_size * 2, shuffle=False)]
        self.bank = F.normalize(torch.cat(feats), dim=1)  # the backbone is frozen: computed once per job
        self.k = min(k, len(self.bank))
        self.model = model

    @torch.no_grad()
    def weights(self, x: torch.Tensor) -> torch.Tensor:
        sims = F.normalize(self.model.base_features(x), dim=1) @ self.bank.T
        return sims.topk(self.k, dim=1).values.mean(dim=1).clamp(0.0, 1.0)


class SiteTrainer:
    def __init__(self, model: FedOpalModel, datasets: dict, train_cfg, batch_size: int):
        self.model = model
        self.datasets = datasets
        self.cfg = train_cfg
        self.batch_size = batch_size
        self.rounds_done = 0
        self._weighting: InstanceWeighting | None = None

    @property
    def num_train_samples(self) -> int:
        return len(self.datasets["train"])

    def _class_weights(self, num_classes: int) -> torch.Tensor | None:
        """Inverse class frequency of this site's training split (absent classes get weight 0)."""
        if self.cfg.class_weights == "none":
            return None
        labels = torch.tensor([int(item["label"]) for item in self.datasets["train"].data])
        counts = torch.bincount(labels, minlength=num_classes).float()
        weights = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), 0.0)
        return weights

    def _orth_loss(self, rep: RepresentationOrthogonality | None) -> torch.Tensor | None:
        regularizer = self.model.spec.regularizer
        if regularizer == "weight":
            return weight_orthogonality(self.model.lora_layers(), self.cfg.orth_on, self.cfg.orth_normalize)
        if regularizer == "representation":
            return rep.loss()
        return None

    def train_round(self, progress=None) -> dict[str, float]:
        """Train the spec's trainable tensors for local_epochs (or local_steps); return mean losses."""
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        data = loader(self.datasets["train"], self.batch_size, shuffle=True,
                      seed=self.cfg.seed * 100003 + self.rounds_done)
        max_steps = self.cfg.local_steps or self.cfg.local_epochs * math.ceil(self.num_train_samples / self.batch_size)
        use_rep = model.spec.regularizer == "representation" and self.cfg.orth_lambda > 0
        rep_ctx = RepresentationOrthogonality(model.lora_layers()) if use_rep else nullcontext()
        class_weights = self._class_weights(model.head.out_features)
        sums = {"task_loss": 0.0, "orth_loss": 0.0}
        steps, start = 0, time.time()
        model.train()
        with rep_ctx as rep:
            while steps < max_steps:
                for batch in data:
                    logits = model(batch["image"])
                    task = F.cross_entropy(logits, batch["label"].long(), weight=class_weights)
                    loss = task
                    if self.cfg.orth_lambda > 0:
                        orth = self._orth_loss(rep)
                        if orth is not None:
                            loss = task + self.cfg.orth_lambda * orth
                            sums["orth_loss"] += orth.item()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    sums["task_loss"] += task.item()
                    steps += 1
                    if progress:
                        progress(steps, max_steps)
                    if steps >= max_steps:
                        break
        self.rounds_done += 1
        return {k: v / max(steps, 1) for k, v in sums.items()} | {"steps": steps, "train_s": time.time() - start}

    def _forward(self, x: torch.Tensor, personalized: bool) -> torch.Tensor:
        if personalized and self.model.spec.inference_weighting == "instance_similarity":
            if self._weighting is None:
                self._weighting = InstanceWeighting(self.model, self.datasets["train"], self.batch_size)
            with self.model.personal_scaled(self._weighting.weights(x)):
                return self.model(x)
        return self.model(x)

    @torch.no_grad()
    def predict(self, split: str, personalized: bool = True) -> tuple[np.ndarray, np.ndarray]:
        self.model.eval()
        labels, probs = [], []
        for batch in loader(self.datasets[split], self.batch_size * 2, shuffle=False):
            probs.append(torch.softmax(self._forward(batch["image"], personalized), dim=1).numpy())
            labels.append(batch["label"].numpy().reshape(-1))
        return np.concatenate(labels).astype(int), np.concatenate(probs)

    def evaluate(self, splits=("val", "test")) -> dict[str, float]:
        """Personalized model (all adapters) and, where a personal adapter exists, the global-only model.

        Keys look like `personalized/test/balanced_accuracy`.
        """
        views = {"personalized": None}
        if "personal" in self.model.spec.adapters and "global" in self.model.spec.adapters:
            views["global_only"] = ["global"]
        out = {}
        for view, adapters in views.items():
            ctx = self.model.only_adapters(adapters) if adapters else nullcontext()
            with ctx:
                for split in splits:
                    labels, probs = self.predict(split, personalized=adapters is None)
                    for name, value in classification_metrics(labels, probs).items():
                        out[f"{view}/{split}/{name}"] = value
        return out
