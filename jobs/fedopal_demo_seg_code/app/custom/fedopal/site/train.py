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

from fedopal.model.adapters import FedOpalModel
from fedopal.site.data import batch_sizes, loader, shard_sizes
from fedopal.site.device import autocast, grad_scaler, module_device, to_device
from fedopal.site.intervals import LEVEL, N_BOOT, interval_keys, metric_intervals
from fedopal.site.segment import (dice_ce_loss, dice_interval, per_image_scores, segment,
                                  segmentation_metrics)
from fedopal.model.diagnostics import adapter_overlaps
from fedopal.model.orthogonality import RepresentationOrthogonality, weight_orthogonality


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
    In-distribution inputs get the personalized model, unfamiliar ones fall back toward the global one.

    The feature bank lives on the model's device; inputs are moved there."""

    def __init__(self, model: FedOpalModel, train_set, batch_size: int, k: int = 5, num_workers: int = 0):
        device = module_device(model)
        feats = [model.base_features(b["image"].to(device)).float()
                 for b in loader(train_set, batch_size * 2, shuffle=False, num_workers=num_workers)]
        self.bank = F.normalize(torch.cat(feats), dim=1)  # the backbone is frozen: computed once per job
        self.k = min(k, len(self.bank))
        self.model = model

    @torch.no_grad()
    def weights(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.base_features(x).float()
        sims = F.normalize(feats, dim=1) @ self.bank.to(feats.device).T
        return sims.topk(self.k, dim=1).values.mean(dim=1).clamp(0.0, 1.0)


def lr_scheduler(optimizer: torch.optim.Optimizer, train_cfg, steps_per_round: int, rounds_done: int):
    """`train.lr_schedule` over the whole federation: num_rounds x steps_per_round optimizer steps, positioned at
    the start of round `rounds_done` (a new optimizer each round, and after --resume, continues the curve).

    The curves are transformers' get_constant_schedule_with_warmup / get_cosine_schedule_with_warmup (linear
    warm-up from 0 over warmup_steps, then constant, or a half cosine down to 0); None when neither applies."""
    if train_cfg.lr_schedule == "constant" and not train_cfg.warmup_steps:
        return None
    from transformers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    offset = rounds_done * steps_per_round
    for group in optimizer.param_groups:  # torch's schedulers start mid-way (last_epoch >= 0) from initial_lr
        group.setdefault("initial_lr", group["lr"])
    if train_cfg.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, train_cfg.warmup_steps,
                                               train_cfg.num_rounds * steps_per_round, last_epoch=offset - 1)
    return get_constant_schedule_with_warmup(optimizer, train_cfg.warmup_steps, last_epoch=offset - 1)


def _groups(items, size: int):
    """Consecutive groups of `size` items (the last may be shorter): one optimizer step's micro-batches."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class SiteTrainer:
    """One site's local training and evaluation, on `device` (model moved there), in `train_cfg.precision`.

    One loop for plain training and DP-SGD (`privacy`: config.PrivacyConfig with mode dpsgd; site.dpsgd): the same
    regularizers, projection, schedule and evaluation; DP-SGD only changes where the batches come from (Poisson
    sampling of images or patients), wraps the model in Opacus's GradSampleModule (strict validation of the trained
    modules) and the optimizer in Opacus's DPOptimizer.

    One optimizer step takes grad_accum_steps micro-batches of `batch_size`. Each micro-batch's loss is weighted by
    its share of the step's images, so a step over N micro-batches of B equals one step over a batch of N x B (for a
    mean loss; class weights make the task loss a weighted mean, exact only per batch). With `dist` (several
    processes, DDP), every process reads its part of each batch (data.ShardedBatches) and the same weighting, times
    the number of processes (DDP averages gradients), makes the step equal to the single-process one."""

    def __init__(self, model: FedOpalModel, datasets: dict, train_cfg, batch_size: int, num_workers: int = 0,
                 device: torch.device | None = None, dist=None, privacy=None, patient_of: list[int] | None = None,
                 roi_size: int | None = None, class_name=str):
        """privacy: DP-SGD's settings (None: plain training). patient_of: the patient index of each training row
        (DP-SGD per patient); None: per image. Segmentation (a model with a decoder): roi_size, the patch edge of
        sliding-window inference (None: whole images); class_name(k) names class k in the metrics."""
        self.roi_size = roi_size
        self.class_name = class_name
        self._seg_loss = dice_ce_loss() if model.segmentation else None
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device)
        self.datasets = datasets
        self.cfg = train_cfg
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.dist = dist  # distributed.DistContext, or None for a single process
        self.rounds_done = 0
        self._weighting: InstanceWeighting | None = None
        self._ddp = None
        if dist is not None:
            from fedopal.site.distributed import wrap_ddp

            self._ddp = wrap_ddp(self.model, dist, self.device)
        self.privacy = privacy
        self.patient_of = patient_of if privacy is not None else None
        if privacy is not None:
            from fedopal.policy.privacy import calibrate_noise

            self.sample_rate = min(1.0, batch_size / self.num_train_samples)
            self.noise_multiplier = privacy.noise_multiplier if privacy.target_epsilon is None else calibrate_noise(
                privacy.target_epsilon, privacy.delta, self.sample_rate, train_cfg.num_rounds * self.steps_per_round,
                privacy.accountant)

    @property
    def num_train_samples(self) -> int:
        return len(self.datasets["train"])

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps per round: local_steps, or local_epochs passes of ceil(batches / grad_accum_steps)."""
        if self.cfg.local_steps:
            return self.cfg.local_steps
        batches = math.ceil(self.num_train_samples / self.batch_size)
        return self.cfg.local_epochs * math.ceil(batches / self.cfg.grad_accum_steps)

    # -- DP-SGD's accounting -----------------------------------------------------------------------------------
    @property
    def dp_unit(self) -> str:
        return "patient" if self.patient_of is not None else "image"

    @property
    def dp_steps(self) -> int:
        """Optimizer steps taken with this site's data so far (all rounds of this job, also across a resume)."""
        return self.rounds_done * self.steps_per_round

    def epsilon(self) -> float:
        from fedopal.policy.privacy import accountant_epsilon

        p = self.privacy
        return accountant_epsilon(self.noise_multiplier, self.sample_rate, self.dp_steps, p.delta, p.accountant)

    def dp_record(self) -> dict:
        """What the site's mechanism did, as sent in the result's meta (contract.DP_META_KEY): settings and epsilon,
        nothing computed from the data but epsilon itself."""
        p = self.privacy
        return {"mode": "dpsgd", "source": "job", "epsilon": self.epsilon(), "delta": p.delta,
                "noise_multiplier": self.noise_multiplier, "clip_norm": p.clip_norm, "steps": self.dp_steps,
                "accountant": p.accountant, "unit": self.dp_unit}

    def _class_weights(self, num_classes: int) -> torch.Tensor | None:
        """Inverse class frequency of this site's training split (absent classes get weight 0)."""
        if self.cfg.class_weights == "none":
            return None
        labels = torch.tensor([int(item["label"]) for item in self.datasets["train"].data])
        counts = torch.bincount(labels, minlength=num_classes).float()
        weights = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), 0.0)
        return weights.to(self.device)

    def _loader(self, split: str, batch_size: int, shuffle: bool, seed: int = 0, shard: bool = False):
        return loader(self.datasets[split], batch_size, shuffle, seed=seed, num_workers=self.num_workers,
                      pin_memory=self.device.type == "cuda",
                      shard=(self.dist.rank, self.dist.world) if shard and self.dist else None)

    def _private(self, optimizer, params, round_seed: int):
        """DP-SGD's three parts: (Opacus's GradSampleModule, its DPOptimizer around `optimizer`, Poisson batches)."""
        from opacus import GradSampleModule
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer

        from fedopal.site.dpsgd import entropy_generator, expected_units, patient_loader, unit_count

        units = unit_count(self.patient_of, self.num_train_samples)
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                   max_grad_norm=self.privacy.clip_norm,
                                   expected_batch_size=expected_units(self.sample_rate, units),
                                   loss_reduction="mean", generator=entropy_generator(self.device))
        if self.patient_of is not None:
            data = patient_loader(self.datasets["train"], self.patient_of, self.sample_rate, self.num_workers)
        else:
            data = DPDataLoader.from_data_loader(self._loader("train", self.batch_size, shuffle=True, seed=round_seed),
                                                 generator=entropy_generator())
        # Opacus records activations only in modules in training mode; the frozen backbone stays in eval mode
        # (FedOpalModel.train), so flag the modules that hold trained tensors (LoRA Linear/Conv, head: no mode-
        # dependent behaviour) themselves. Strict: a trained module Opacus cannot clip per sample is refused.
        for module in self.model.modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                module.training = True
        return GradSampleModule(self.model, loss_reduction="mean", strict=True), dp_optimizer, data

    def train_round(self, progress=None) -> dict[str, float]:
        """Train the spec's trainable tensors for one round's optimizer steps; return mean losses, steps, the
        learning rate at the first and last step, and the seconds spent (and, under DP-SGD, epsilon so far)."""
        model, cfg, private = self.model, self.cfg, self.privacy is not None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        max_steps = self.steps_per_round
        scheduler = lr_scheduler(optimizer, cfg, max_steps, self.rounds_done)  # on AdamW: DPOptimizer shares its groups
        scaler = grad_scaler(self.device, cfg.precision)
        rank, world = (self.dist.rank, self.dist.world) if self.dist else (0, 1)
        round_seed = cfg.seed * 100003 + self.rounds_done
        regularizer = model.spec.regularizer if cfg.orth_lambda > 0 else "none"
        model.train()
        if private:
            forward, optimizer, data = self._private(optimizer, params, round_seed)
            data_free: dict[torch.nn.Parameter, torch.Tensor] = {}  # weight orthogonality: added after the noise
            optimizer.attach_step_hook(lambda opt: [setattr(p, "grad", g.clone() if p.grad is None else p.grad + g)
                                                    for p, g in data_free.items()])
        else:
            forward = self._ddp or model
            data = self._loader("train", self.batch_size, shuffle=True, seed=round_seed, shard=True)
        rep_ctx = RepresentationOrthogonality(model.lora_layers()) if regularizer == "representation" \
            else nullcontext()
        class_weights = None if model.segmentation else self._class_weights(model.head.out_features)
        # running sums stay on the device: a .item() per step would wait for the GPU every step
        task_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        orth_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        lr_first = lr_last = None
        steps, passes, start = 0, 0, time.time()
        try:
            with rep_ctx as rep:
                while steps < max_steps:
                    # every pass over the data draws its own augmentations, the same in any process or worker
                    self.datasets["train"].augment_seed = round_seed * 1000 + passes
                    # DP-SGD: Poisson batches, one per step (their sizes vary: the loss is a mean over each batch)
                    full_sizes = [None] * len(data) if private else batch_sizes(self.num_train_samples,
                                                                                 self.batch_size)
                    for group in _groups(zip(data, full_sizes), cfg.grad_accum_steps):
                        images = len(group[0][0]["label"]) if private else sum(full for _, full in group)
                        lr_last = optimizer.param_groups[0]["lr"]
                        lr_first = lr_last if lr_first is None else lr_first
                        optimizer.zero_grad(set_to_none=True)
                        for i, (batch, full) in enumerate(group):
                            last = i == len(group) - 1
                            share = 1.0 if private else shard_sizes(full, world)[rank] / images
                            sync = self._ddp.no_sync() if self._ddp is not None and not last else nullcontext()
                            with sync:
                                batch = to_device(batch, self.device)
                                labels = batch["label"].long().view(-1)
                                with autocast(self.device, cfg.precision):
                                    logits = forward(batch["image"])
                                task = self._task_loss(logits, labels, batch, class_weights)
                                loss = task * (share * world)
                                if regularizer == "representation" and len(labels):
                                    orth = rep.loss()
                                    loss = loss + cfg.orth_lambda * orth * (share * world)
                                    orth_sum += orth.detach().double() * share
                                elif regularizer == "weight" and last and not private:  # batch-independent: once
                                    orth = weight_orthogonality(model.lora_layers(), cfg.orth_on, cfg.orth_normalize)
                                    loss = loss + cfg.orth_lambda * orth
                                    orth_sum += orth.detach().double() / world
                                scaler.scale(loss).backward()
                            task_sum += task.detach().double() * share
                        if private:
                            if self.patient_of is not None:
                                from fedopal.site.dpsgd import sum_per_patient

                                rows = batch["row"].long().cpu().tolist()
                                sum_per_patient(params, torch.tensor([self.patient_of[r] for r in rows],
                                                                     dtype=torch.long))
                            if regularizer == "weight":  # depends on the weights only: post-processing
                                orth = weight_orthogonality(model.lora_layers(), cfg.orth_on, cfg.orth_normalize)
                                grads = torch.autograd.grad(cfg.orth_lambda * orth, params, allow_unused=True)
                                data_free.clear()
                                data_free.update({p: g for p, g in zip(params, grads) if g is not None})
                                orth_sum += orth.detach().double()
                        scaler.step(optimizer)
                        scaler.update()
                        model.project_personal()  # fedopal_p: back into the complement of the moved A_g
                        if scheduler is not None:
                            scheduler.step()
                        steps += 1
                        if progress:
                            progress(steps, max_steps)
                        if steps >= max_steps:
                            break
                    passes += 1
        finally:
            if private:
                forward._close()  # removes Opacus's hooks and per-sample gradients: evaluation runs the plain model
        self.rounds_done += 1
        task_total, orth_total = task_sum.item(), orth_sum.item()
        if self.dist is not None:  # each process holds its share of the mean losses
            from fedopal.site.distributed import all_reduce_sum

            task_total, orth_total = all_reduce_sum([task_total, orth_total], self.device)
        out = {"task_loss": task_total / max(steps, 1), "orth_loss": orth_total / max(steps, 1), "steps": steps,
               "lr_first": lr_first, "lr_last": lr_last, "train_s": time.time() - start}
        if private:
            out.update(epsilon=self.epsilon(), noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
                       dp_steps=self.dp_steps, unit=self.dp_unit)
        return out

    def _task_loss(self, logits, labels, batch, class_weights):
        if not len(labels):
            return logits.sum() * 0.0  # an empty Poisson batch: noise only
        if self._seg_loss is not None:  # segmentation: Dice + cross-entropy against the mask
            return self._seg_loss(logits.float(), batch["mask"])
        return F.cross_entropy(logits.float(), labels, weight=class_weights)

    def instance_weighting(self) -> InstanceWeighting:
        """FedDPA's weighting of this site (built once: the backbone is frozen); the exports store its bank."""
        if self._weighting is None:
            with autocast(self.device, self.cfg.precision):
                self._weighting = InstanceWeighting(self.model, self.datasets["train"], self.batch_size,
                                                    num_workers=self.num_workers)
        return self._weighting

    def _forward(self, x: torch.Tensor, personalized: bool) -> torch.Tensor:
        if self.model.segmentation and self.roi_size:  # patches: each window is one instance of FedDPA's weighting
            return segment(lambda window: self._forward_once(window, personalized), x, self.roi_size)
        return self._forward_once(x, personalized)

    def _forward_once(self, x: torch.Tensor, personalized: bool) -> torch.Tensor:
        if personalized and self.model.spec.inference_weighting == "instance_similarity":
            with self.model.personal_scaled(self.instance_weighting().weights(x)):
                return self.model(x)
        return self.model(x)

    @torch.no_grad()
    def segment_split(self, split: str, personalized: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Per-image (dice, hd95), each (N, num_classes - 1), of the split (segment.per_image_scores)."""
        self.model.eval()
        dice, hd95 = [], []
        for batch in self._loader(split, self.batch_size * 2, shuffle=False):
            with autocast(self.device, self.cfg.precision):
                logits = self._forward(batch["image"].to(self.device, non_blocking=True), personalized)
            d, h = per_image_scores(logits.float(), batch["mask"].to(self.device), logits.shape[1])
            dice.append(d)
            hd95.append(h)
        return np.concatenate(dice), np.concatenate(hd95)

    @torch.no_grad()
    def predict(self, split: str, personalized: bool = True) -> tuple[np.ndarray, np.ndarray]:
        self.model.eval()
        labels, probs = [], []
        for batch in self._loader(split, self.batch_size * 2, shuffle=False):
            with autocast(self.device, self.cfg.precision):
                logits = self._forward(batch["image"].to(self.device, non_blocking=True), personalized)
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            labels.append(batch["label"].numpy().reshape(-1))
        return np.concatenate(labels).astype(int), np.concatenate(probs)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """How far apart the two adapters are (diagnostics.py): overlap_A, overlap_B, overlap_u on the validation
        split (personalized model, no FedDPA weighting), and what random subspaces give; {} without two adapters."""
        out = adapter_overlaps(self.model.lora_layers())
        if not out:
            return {}
        self.model.eval()
        total, count = 0.0, 0
        with RepresentationOrthogonality(self.model.lora_layers()) as rep:
            for batch in self._loader("val", self.batch_size * 2, shuffle=False):
                with autocast(self.device, self.cfg.precision):
                    segment(self.model, batch["image"].to(self.device, non_blocking=True), self.roi_size)
                total += float(rep.loss()) * len(batch["label"])
                count += len(batch["label"])
        return {**out, "overlap_u": total / max(count, 1)}

    def evaluate(self, splits=("val", "test")) -> dict[str, float]:
        """Personalized model (all adapters) and, where a personal adapter exists, the global-only model.

        Keys look like `personalized/test/balanced_accuracy`; the test split adds each metric's 95 % interval over
        its images (site.intervals): `personalized/test/balanced_accuracy_ci_low` and `..._ci_high`.
        """
        views = {"personalized": None}
        if "personal" in self.model.spec.adapters and "global" in self.model.spec.adapters:
            views["global_only"] = ["global"]
        out = {}
        for view, adapters in views.items():
            ctx = self.model.only_adapters(adapters) if adapters else nullcontext()
            with ctx:
                for split in splits:
                    if self.model.segmentation:
                        dice, hd95 = self.segment_split(split, personalized=adapters is None)
                        for name, value in segmentation_metrics(dice, hd95, self.class_name).items():
                            out[f"{view}/{split}/{name}"] = value
                        if split == "test":
                            out |= interval_keys(f"{view}/{split}/",
                                                 {"dice": dice_interval(dice, N_BOOT, LEVEL)})
                        continue
                    labels, probs = self.predict(split, personalized=adapters is None)
                    for name, value in classification_metrics(labels, probs).items():
                        out[f"{view}/{split}/{name}"] = value
                    if split == "test":  # kept at the site (metrics.jsonl, exports): not in the wire contract
                        out |= interval_keys(f"{view}/{split}/", metric_intervals(labels, probs))
        return out
