"""The fused dual-LoRA forward and the rank-space representation loss equal peft's own path: outputs, losses,
gradients, the global-only and FedDPA-weighted views, in float64, on every backbone family and a 3D conv; the
same state-dict keys; the same tensors sent after a simulator round."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig, ViTModel

from fedopal.model.adapters import FedOpalModel, build_model
from fedopal.model.backbones import Backbone
from fedopal.config import config_from_dict
from fedopal.model.fused_lora import FusedLoraForward
from fedopal.specs.methods import get_method
from fedopal.model.orthogonality import RepresentationOrthogonality, weight_orthogonality

from conftest import tiny_config

TINY_VIT = {"patch_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 3}


class ConvNet3D(nn.Module):
    """A 3x3x3 conv and a 1x1x1 conv, pooled: LoRA A of the first is a k x k x k conv, B a 1x1x1 conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 6, 3, padding=1)
        self.point = nn.Conv3d(6, 8, 1)

    def forward(self, x):
        return self.point(torch.relu(self.conv(x))).mean(dim=(2, 3, 4))


class ConvNet2D(ConvNet3D):
    def __init__(self):
        nn.Module.__init__(self)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.point = nn.Conv2d(6, 8, 1)

    def forward(self, x):
        return self.point(torch.relu(self.conv(x))).mean(dim=(2, 3))


def hf_folder(tmp_path):
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                       intermediate_size=64)).save_pretrained(tmp_path)
    return str(tmp_path)


def build(family, fused, tmp_path, method="fedopal_r", dropout=0.0):
    """(model in float64, input batch) for one backbone family, fused or on peft's path."""
    torch.manual_seed(0)
    spec = get_method(method, "personal")
    if family in ("conv3d", "conv2d"):
        net, x = (ConvNet3D(), torch.randn(3, 1, 6, 6, 6)) if family == "conv3d" else \
            (ConvNet2D(), torch.randn(3, 3, 12, 12))
        backbone = Backbone(net, 8, r"conv|point", net.conv.in_channels, None)
        model = FedOpalModel(backbone, spec, 3, lora_rank=4, lora_alpha=6, lora_dropout=dropout, fused_adapters=fused)
    else:
        model_cfg = {"efficientnet": {"backbone": "efficientnet_lite0", "pretrained": True},
                     "monai_vit": {"backbone": "monai_vit", "pretrained": False, "vit": TINY_VIT},
                     "hf": {"backbone": "hf", "hf_model": hf_folder(tmp_path) if family == "hf" else None}}[family]
        channels = 1 if family == "monai_vit" else 3
        cfg = config_from_dict({"data": {"image_size": 32, "in_channels": channels, "num_classes": 3},
                                "model": {**model_cfg, "lora_rank": 4, "lora_alpha": 6, "lora_dropout": dropout,
                                          "fused_adapters": fused, "head": "personal"},
                                "train": {"method": method}})
        model = build_model(cfg, spec, "site-1")
        x = torch.randn(3, channels, 32, 32, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # every adapter away from its init (B = 0 would make both losses trivial)
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.double(), x.double()


def run(model, x, y):
    """Outputs of every view, both losses, and the gradient of every trainable tensor."""
    model.train()
    with RepresentationOrthogonality(model.lora_layers()) as rep:
        logits = model(x)
        task = F.cross_entropy(logits, y)
        rep_loss = rep.loss()
        captured = "rank space" if not rep._ranks and not rep._outputs else None
    w_loss = weight_orthogonality(model.lora_layers(), "AB", normalize=True)
    model.zero_grad()
    (task + 0.7 * rep_loss + 0.3 * w_loss).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.eval()
    with torch.no_grad():
        with model.only_adapters(["global"]):
            global_only = model(x)
        with model.personal_scaled(torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)):
            weighted = model(x)
    return {"logits": logits.detach(), "task": task.detach(), "rep": rep_loss.detach(), "weight": w_loss.detach(),
            "global_only": global_only, "weighted": weighted}, grads, captured


@pytest.mark.parametrize("family", ["monai_vit", "hf", "efficientnet", "conv3d", "conv2d"])
def test_fused_forward_equals_peft_on_every_backbone(family, tmp_path):
    y = torch.tensor([0, 2, 1])
    fused, x = build(family, True, tmp_path)
    plain, _ = build(family, False, tmp_path)
    assert list(fused.state_dict()) == list(plain.state_dict()), "fusing must not rename a single tensor"
    n_fused = sum(isinstance(m, FusedLoraForward) for m in fused.modules())
    assert n_fused == len(list(fused.lora_layers())) > 0 and not any(
        isinstance(m, FusedLoraForward) for m in plain.modules())
    out_f, grads_f, _ = run(fused, x, y)
    out_p, grads_p, _ = run(plain, x, y)
    assert float(out_p["rep"]) > 1e-4, "the representation loss must be non-trivial to test anything"
    for key in out_p:
        torch.testing.assert_close(out_f[key], out_p[key], rtol=1e-6, atol=1e-12, msg=key)
    assert not torch.allclose(out_p["weighted"], out_p["logits"]) and not torch.allclose(out_p["global_only"],
                                                                                           out_p["logits"])
    assert sorted(grads_f) == sorted(grads_p)
    for key in grads_p:
        torch.testing.assert_close(grads_f[key], grads_p[key], rtol=1e-6, atol=1e-10, msg=key)


def test_the_fused_model_computes_the_loss_in_rank_space_and_peft_records_outputs(tmp_path):
    fused, x = build("monai_vit", True, tmp_path)
    plain, _ = build("monai_vit", False, tmp_path)
    for model, expect_ranks in ((fused, True), (plain, False)):
        with RepresentationOrthogonality(model.lora_layers()) as rep:
            model(x)
            assert bool(rep._ranks) == expect_ranks and bool(rep._outputs) != expect_ranks
            rep.loss()
        assert all(getattr(layer, "rank_space_recorder", None) is None for _, layer in model.lora_layers())


def test_lora_dropout_falls_back_to_peft_in_training_and_fuses_in_evaluation(tmp_path):
    model, x = build("monai_vit", True, tmp_path, dropout=0.3)
    model.train()
    with RepresentationOrthogonality(model.lora_layers()) as rep:
        model(x)
        assert not rep._ranks and rep._outputs, "one dropout mask per adapter: peft's path"
    plain, _ = build("monai_vit", False, tmp_path, dropout=0.3)
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["fedavg_lora", "ffa_lora", "local", "late_join"])
def test_one_adapter_methods_take_the_fused_path_and_match(method, tmp_path):
    fused, x = build("monai_vit", True, tmp_path, method=method)
    plain, _ = build("monai_vit", False, tmp_path, method=method)
    fused.train()
    plain.train()
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-9, atol=1e-12)


def test_merged_export_of_a_fused_model_equals_its_forward(tmp_path):
    from fedopal.site.export import merged_state

    model, x = build("monai_vit", True, tmp_path)
    model.eval()
    state = merged_state(model, ("global", "personal"))
    plain_net = build_model(config_from_dict({"data": {"image_size": 32, "in_channels": 1, "num_classes": 3},
                                              "model": {"backbone": "monai_vit", "pretrained": False,
                                                        "vit": TINY_VIT}, "train": {"method": "full_ft"}}),
                            get_method("full_ft"))
    plain_net.double().load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(plain_net.eval()(x), model(x), rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_fused_and_peft_runs_send_the_same_tensors(small_federation, tmp_path):
    from fedopal.tools.job import simulate

    root, _ = small_federation
    sent = {}
    for fused in (True, False):
        cfg = tiny_config(root, method="fedopal_r", num_rounds=1, local_steps=3, lr=5e-3)
        cfg.model.fused_adapters = fused
        job_ws = simulate(cfg.model_copy(update={"name": f"fused_{fused}"}), str(tmp_path / "ws"))
        path = os.path.join(job_ws, "server", "simulate_job", "app_server", "FL_global_model.pt")
        sent[fused] = torch.load(path, map_location="cpu", weights_only=False)["model"]
    assert sorted(sent[True]) == sorted(sent[False])
    moved = [k for k, v in sent[False].items() if ".lora_B." in k and float(torch.as_tensor(v).abs().max()) > 0]
    assert moved, "round 1 must have trained the global adapter"
    for k in sent[False]:
        torch.testing.assert_close(torch.as_tensor(sent[True][k]), torch.as_tensor(sent[False][k]), atol=1e-5,
                                   rtol=0)
