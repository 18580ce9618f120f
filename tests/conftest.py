"""Shared fixtures: a small real federation (PneumoniaMNIST PNGs) and tiny-model configs."""

import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "custom"))
torch.set_num_threads(1)

from fedopal.config import config_from_dict  # noqa: E402
from fedopal.prepare import build_federation  # noqa: E402

NPZ = os.path.join(REPO, "data", "medmnist", "pneumoniamnist.npz")


@pytest.fixture(scope="session")
def small_federation(tmp_path_factory):
    """2 sites of real PneumoniaMNIST PNGs, small enough for unit tests."""
    out = tmp_path_factory.mktemp("federation")
    summary = build_federation(NPZ, str(out), num_sites=2, seed=1, train_per_site=48, val_per_site=16,
                               test_per_site=16, min_test_per_class=6, min_val_per_class=4)
    return out, summary


def tiny_config(root=".", **train):
    raw = {
        "name": "fedopal_tiny_test",
        "data": {"root": str(root), "image_size": 32, "in_channels": 1, "num_classes": 2, "batch_size": 16},
        "model": {"backbone": "monai_vit", "pretrained": False, "lora_rank": 4, "lora_alpha": 8, "head": "shared",
                  "vit": {"patch_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_layers": 2, "num_heads": 3}},
        "train": {"method": "fedopal_w", "num_rounds": 2, "local_steps": 2, "lr": 1e-3, **train},
        "federation": {"num_sites": 2},
    }
    return config_from_dict(raw)


@pytest.fixture
def tiny_cfg():
    return tiny_config()
