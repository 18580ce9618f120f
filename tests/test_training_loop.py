"""The site's training loop on any device: autocast precision, gradient accumulation, the learning-rate schedule
across rounds, data-loading workers, gradient checkpointing. References are computed independently (float64
formulas, a plain backward pass), never by the loop under test."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTModel

from fedopal.model.adapters import build_model
from fedopal.config import config_from_dict
from fedopal.site.data import build_datasets, read_manifest
from fedopal.site.device import resolve_device
from fedopal.specs.methods import get_method
from fedopal.site.train import SiteTrainer

from conftest import tiny_config


def site_trainer(federation, site="site-1", method="fedopal_w", batch_size=16, num_workers=0, augment=True,
                 device=None, **train):
    root, _ = federation
    cfg = tiny_config(root, method=method, **train)
    cfg.data.augment = augment
    cfg.data.batch_size = batch_size
    model = build_model(cfg, get_method(method, cfg.model.head), site)
    samples = read_manifest(str(root / site / "manifest.csv"), 2)
    datasets = build_datasets(cfg.data, samples, model.in_channels, model.normalization, seed=cfg.train.seed)
    return SiteTrainer(model, datasets, cfg.train, batch_size, num_workers, device)


def trainable(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if model.spec.is_trainable(k)}


def test_explicit_cpu_and_auto_both_train(small_federation):
    runs = {}
    for name in ("cpu", "auto"):
        trainer = site_trainer(small_federation, device=resolve_device(name), local_steps=2, lr=5e-3)
        stats = trainer.train_round()
        assert stats["steps"] == 2 and math.isfinite(stats["task_loss"])
        runs[name] = (trainer.device, trainer.evaluate())
    if not torch.cuda.is_available():  # auto is the CPU here: the very same run
        assert runs["auto"] == runs["cpu"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_the_cpu_trains_and_everything_kept_or_sent_is_float32(small_federation, precision):
    trainer = site_trainer(small_federation, precision=precision, local_steps=3, lr=5e-3)
    before = trainable(trainer.model)
    stats = trainer.train_round()
    assert math.isfinite(stats["task_loss"]) and math.isfinite(stats["orth_loss"]) and stats["steps"] == 3
    after = trainable(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "nothing trained"
    for state in (trainer.model.shared_state(), trainer.model.site_state()):
        assert state and all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["personalized/test/balanced_accuracy"] <= 1.0


@pytest.mark.parametrize("method", ["fedopal_w", "fedopal_r", "fedavg_lora"])
def test_two_micro_batches_of_8_equal_one_batch_of_16(small_federation, method):
    """Augmentation on: items are seeded per index, so both runs see the same 16 augmented images."""
    one = site_trainer(small_federation, method=method, batch_size=16, local_steps=1, lr=1e-2)
    two = site_trainer(small_federation, method=method, batch_size=8, grad_accum_steps=2, local_steps=1, lr=1e-2)
    start = trainable(one.model)
    assert all(torch.equal(start[k], v) for k, v in trainable(two.model).items())
    stats_one, stats_two = one.train_round(), two.train_round()
    assert stats_one["steps"] == stats_two["steps"] == 1
    got_one, got_two = trainable(one.model), trainable(two.model)
    moved = [k for k in start if not torch.equal(start[k], got_one[k])]
    assert moved
    for k in start:
        torch.testing.assert_close(got_two[k], got_one[k], atol=1e-5, rtol=0)
    assert stats_two["task_loss"] == pytest.approx(stats_one["task_loss"], abs=1e-5)
    assert stats_two["orth_loss"] == pytest.approx(stats_one["orth_loss"], abs=1e-5)


def test_an_accumulated_step_is_one_step_of_the_whole_batch(small_federation):
    """Against a plain reference: one backward over the 16 images, by hand, then AdamW's first step."""
    trainer = site_trainer(small_federation, method="fedavg_lora", batch_size=8, grad_accum_steps=2, local_steps=1,
                           lr=1e-2, augment=False)
    model = trainer.model
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    start = {k: p.detach().clone() for k, p in params.items()}
    order = torch.randperm(len(trainer.datasets["train"]), generator=torch.Generator().manual_seed(
        trainer.cfg.seed * 100003))[:16]  # data.loader's order for round 0
    items = [trainer.datasets["train"][int(i)] for i in order]
    x, y = torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])
    model.train()
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    trainer.train_round()
    for (k, p), g in zip(params.items(), grads):
        # AdamW's first step moves every weight by lr * g / (|g| + eps) (bias corrections cancel), no decay here
        expected = start[k] - 1e-2 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, atol=2e-5, rtol=0)


def reference_lr(step, base_lr, warmup, total, schedule):
    """float64, from the formulas (linear warm-up from 0, then constant or a half cosine to 0)."""
    if step < warmup:
        return base_lr * step / warmup
    if schedule == "constant":
        return base_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_learning_rate_schedule_spans_the_federation_and_continues_after_a_restart(small_federation, schedule):
    kw = dict(lr_schedule=schedule, warmup_steps=3, num_rounds=4, local_steps=4, lr=1e-2)
    trainer = site_trainer(small_federation, **kw)
    firsts, lasts = [], []
    for _ in range(3):
        stats = trainer.train_round()
        firsts.append(stats["lr_first"])
        lasts.append(stats["lr_last"])
    for k, lr in enumerate(firsts):
        assert lr == pytest.approx(reference_lr(4 * k, 1e-2, 3, 16, schedule), abs=1e-12)
        assert lasts[k] == pytest.approx(reference_lr(4 * k + 3, 1e-2, 3, 16, schedule), abs=1e-12)
    if schedule == "cosine":
        assert firsts[0] == 0.0 and firsts[1] > firsts[2] > 0.0
    # a site restarted after round 2 (client.py sets rounds_done from its saved personal state) continues the curve
    restarted = site_trainer(small_federation, **kw)
    restarted.rounds_done = 2
    assert restarted.train_round()["lr_first"] == pytest.approx(firsts[2], abs=1e-12)


def test_data_loading_workers_change_nothing(small_federation):
    """Augmentation on: with 2 workers every image, every step and every metric are those of 0 workers."""
    runs = []
    for workers in (0, 2):
        trainer = site_trainer(small_federation, num_workers=workers, local_steps=4, batch_size=8, lr=5e-3)
        stats = trainer.train_round()
        runs.append((stats, trainer.evaluate(), trainable(trainer.model)))
    (s0, m0, p0), (s2, m2, p2) = runs
    assert m2 == m0
    assert s2["task_loss"] == s0["task_loss"] and s2["orth_loss"] == s0["orth_loss"]
    assert all(torch.equal(p0[k], p2[k]) for k in p0)


def test_an_items_augmentation_depends_on_the_seed_and_the_item_only(small_federation):
    trainer = site_trainer(small_federation)
    train = trainer.datasets["train"]
    train.augment_seed = 7
    first = train[3]["image"]
    _ = [train[i] for i in (0, 5, 1)]  # other reads in between change nothing
    assert torch.equal(train[3]["image"], first)
    train.augment_seed = 8
    assert not torch.equal(train[3]["image"], first)


# -- gradient checkpointing -------------------------------------------------------------------------------------

def _hf_folder(tmp_path):
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                       intermediate_size=64)).save_pretrained(tmp_path)
    return str(tmp_path)


def _backbone_cfg(backbone, folder, checkpointing):
    model = {"backbone": backbone, "pretrained": backbone == "hf", "lora_rank": 4,
             "gradient_checkpointing": checkpointing}
    if backbone == "hf":
        model["hf_model"] = folder
    else:
        model["vit"] = {"patch_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 3}
    return config_from_dict({"data": {"image_size": 32, "in_channels": 3 if backbone == "hf" else 1},
                             "model": model, "train": {"method": "fedopal_r"}})


@pytest.mark.parametrize("backbone", ["hf", "monai_vit"])
def test_gradient_checkpointing_recomputes_blocks_and_changes_no_number(tmp_path, backbone):
    folder = _hf_folder(tmp_path) if backbone == "hf" else None
    results = {}
    for checkpointing in (False, True):
        cfg = _backbone_cfg(backbone, folder, checkpointing)
        model = build_model(cfg, get_method("fedopal_r"), "site-1").double()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # B away from zero, so every adapter has a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        # adapters run inside the blocks, so a recomputed block runs them again (pre-hooks: torch stops a
        # recomputation early, once it has what the backward pass needs, before some forward hooks would fire)
        adapters = [layer for _, layer in model.lora_layers()]  # the adapted layers (fused or peft's path)
        calls = []
        hooks = [a.register_forward_pre_hook(lambda *a: calls.append(1)) for a in adapters]
        model.train()
        x = torch.randn(2, cfg.data.in_channels, 32, 32, generator=torch.Generator().manual_seed(0)).double()
        loss = model(x).square().sum()
        loss.backward()
        for h in hooks:
            h.remove()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results[checkpointing] = (loss.item(), grads, len(calls), list(model.state_dict()))
    (loss0, g0, calls0, keys0), (loss1, g1, calls1, keys1) = results[False], results[True]
    assert calls0 == len(adapters) and calls1 > calls0, "checkpointed blocks run again in the backward pass"
    assert keys1 == keys0, "checkpointing must not rename a single tensor"
    assert loss1 == pytest.approx(loss0, rel=1e-12)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-9, atol=1e-12)


def test_gradient_checkpointing_is_refused_for_the_cnn():
    from fedopal.config import ConfigError

    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        config_from_dict({"model": {"backbone": "efficientnet_lite0", "gradient_checkpointing": True}})
