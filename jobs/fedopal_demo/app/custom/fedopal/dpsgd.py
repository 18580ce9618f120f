"""`privacy.mode: dpsgd`: patient-level DP-SGD (Abadi et al., CCS 2016) through Opacus, over every trained tensor.

Why every tensor: the global adapter's updates leave the site, but the personal adapter and the personal head,
trained on the same data, shape every later gradient of the global one. DP-SGD on the global adapter alone would
leave that path unprotected, so here every trained tensor (global adapter, personal adapter, head) takes only
clipped, noised per-sample gradients, and everything the site later releases is post-processing of them.

Per optimizer step (Opacus's GradSampleModule + DPOptimizer):
  - a Poisson-subsampled batch: each training record independently with probability q = batch_size / N
    (Opacus's DPDataLoader), its randomness from OS entropy, not from the job's seed;
  - per-sample gradients of the task loss (cross-entropy, mean over the batch; fedopal_r's representation loss is a
    mean of per-sample terms too), each clipped to L2 norm C = privacy.clip_norm over all trained tensors;
  - their sum plus N(0, (sigma C)^2), divided by the expected batch size (sigma = privacy.noise_multiplier, or
    calibrated from privacy.target_epsilon over train.num_rounds rounds);
  - fedopal_w's weight-orthogonality term depends on the weights only, not on data: its gradient is added after
    the noise (post-processing, no privacy cost; Opacus's per-sample hooks would not see it anyway).
Accounting: Opacus's PRV (or RDP) accountant for rounds x steps compositions of the subsampled Gaussian mechanism
at sample rate q, under Opacus's neighbouring relation: one record added or removed.

Limits (config.py refuses them in dpsgd mode): no class weights (they would come from the site's own label counts
and make the per-sample loss depend on other records), fp32 only, one process per site, no gradient accumulation.
Issue 13's fused dual-LoRA forward bypasses the nn.Linear/nn.Conv modules whose hooks Opacus reads: this mode must run
peft's own path (`model.fused_adapters: false`).
"""

from __future__ import annotations

import secrets
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from fedopal.orthogonality import RepresentationOrthogonality, weight_orthogonality
from fedopal.privacy import accountant_epsilon, calibrate_noise
from fedopal.train import SiteTrainer, lr_scheduler


def entropy_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from OS entropy: DP noise and sampling the server cannot replay."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


class DPSGDTrainer(SiteTrainer):
    """SiteTrainer whose train_round is DP-SGD; evaluation is SiteTrainer's. privacy: config.PrivacyConfig."""

    def __init__(self, model, datasets, train_cfg, batch_size, num_workers=0, device=None, privacy=None):
        super().__init__(model, datasets, train_cfg, batch_size, num_workers, device, None)
        self.privacy = privacy
        self.sample_rate = min(1.0, batch_size / self.num_train_samples)
        total_steps = train_cfg.num_rounds * self.steps_per_round
        self.noise_multiplier = privacy.noise_multiplier if privacy.noise_multiplier > 0 else calibrate_noise(
            privacy.target_epsilon, privacy.delta, self.sample_rate, total_steps, privacy.accountant)

    @property
    def dp_steps(self) -> int:
        """Optimizer steps taken with this site's data so far (all rounds, also across a resume)."""
        return self.rounds_done * self.steps_per_round

    def epsilon(self) -> float:
        return accountant_epsilon(self.noise_multiplier, self.sample_rate, self.dp_steps, self.privacy.delta,
                                  self.privacy.accountant)

    def dp_record(self) -> dict:
        """What the site's mechanism did, as sent in the result's meta (privacy.DP_META_KEY)."""
        return {"mode": "dpsgd", "source": "job", "epsilon": self.epsilon(), "delta": self.privacy.delta,
                "noise_multiplier": self.noise_multiplier, "clip_norm": self.privacy.clip_norm,
                "sample_rate": self.sample_rate, "steps": self.dp_steps, "accountant": self.privacy.accountant}

    def train_round(self, progress=None) -> dict[str, float]:
        from opacus import GradSampleModule
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer

        model, cfg = self.model, self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        inner = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        max_steps = self.steps_per_round
        scheduler = lr_scheduler(inner, cfg, max_steps, self.rounds_done)
        optimizer = DPOptimizer(inner, noise_multiplier=self.noise_multiplier, max_grad_norm=self.privacy.clip_norm,
                                expected_batch_size=self.batch_size, loss_reduction="mean",
                                generator=entropy_generator(self.device))
        regularizer = model.spec.regularizer if cfg.orth_lambda > 0 else "none"
        orth_grads: dict[torch.nn.Parameter, torch.Tensor] = {}

        def add_data_free_gradient(opt) -> None:  # Opacus calls this after adding the noise, before the step
            for p, g in orth_grads.items():
                p.grad = g.clone() if p.grad is None else p.grad + g

        optimizer.attach_step_hook(add_data_free_gradient)
        round_seed = cfg.seed * 100003 + self.rounds_done
        data = DPDataLoader.from_data_loader(self._loader("train", self.batch_size, shuffle=True, seed=round_seed),
                                             generator=entropy_generator())
        gsm = GradSampleModule(model, loss_reduction="mean", strict=False)
        rep_ctx = RepresentationOrthogonality(model.lora_layers()) if regularizer == "representation" \
            else nullcontext()
        task_sum = orth_sum = 0.0
        lr_first = lr_last = None
        steps, passes, start = 0, 0, time.time()
        model.train()
        # Opacus records activations only in modules in training mode; the frozen backbone stays in eval mode
        # (FedOpalModel.train), so flag the modules that hold trained tensors (LoRA Linear/Conv, head: no mode-
        # dependent behaviour) themselves.
        for module in model.modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                module.training = True
        try:
            with rep_ctx as rep:
                while steps < max_steps:
                    self.datasets["train"].augment_seed = round_seed * 1000 + passes
                    for batch in data:
                        lr_last = inner.param_groups[0]["lr"]
                        lr_first = lr_last if lr_first is None else lr_first
                        optimizer.zero_grad(set_to_none=True)
                        images = batch["image"].to(self.device)
                        labels = batch["label"].long().view(-1).to(self.device)
                        logits = gsm(images)
                        task = F.cross_entropy(logits.float(), labels) if len(labels) else logits.sum() * 0.0
                        loss = task
                        if regularizer == "representation" and len(labels):
                            orth = rep.loss()
                            loss = loss + cfg.orth_lambda * orth
                            orth_sum += float(orth.detach())
                        loss.backward()
                        orth_grads.clear()
                        if regularizer == "weight":
                            orth = weight_orthogonality(model.lora_layers(), cfg.orth_on, cfg.orth_normalize)
                            trained = [p for p in params if p.requires_grad]
                            grads = torch.autograd.grad(cfg.orth_lambda * orth, trained, allow_unused=True)
                            orth_grads.update({p: g for p, g in zip(trained, grads) if g is not None})
                            orth_sum += float(orth.detach())
                        optimizer.step()
                        if scheduler is not None:
                            scheduler.step()
                        task_sum += float(task.detach())
                        steps += 1
                        if progress:
                            progress(steps, max_steps)
                        if steps >= max_steps:
                            break
                    passes += 1
        finally:
            gsm._close()  # removes Opacus's hooks and per-sample gradients: evaluation runs the plain model
        self.rounds_done += 1
        return {"task_loss": task_sum / max(steps, 1), "orth_loss": orth_sum / max(steps, 1), "steps": steps,
                "lr_first": lr_first, "lr_last": lr_last, "train_s": time.time() - start,
                "epsilon": self.epsilon(), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "dp_steps": self.dp_steps}
