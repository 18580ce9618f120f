"""Shared fixtures: a small real federation (PneumoniaMNIST PNGs) and tiny-model configs."""

import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)  # fedopal itself is installed (make venv): no sys.path entry for it

from fedopal.config import config_from_dict  # noqa: E402
from fedopal.tools.prepare import build_federation  # noqa: E402

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


def server_side(cfg, weighting=None, max_site_weight=1e9):
    """The server's model and aggregator as a FedOPAL job builds them: the initial shared state computed where the
    job is built, carried to the server as the job's arguments (tools.job.build_recipe)."""
    from fedopal.server.aggregator import SharedKeyAggregator
    from fedopal.server.global_model import GlobalStateModel, encode_state, expected_spec
    from fedopal.tools.job import initial_shared_state

    initial = initial_shared_state(cfg)
    model = GlobalStateModel(*encode_state(initial))
    aggregator = SharedKeyAggregator(expected_spec(initial), weighting or cfg.federation.weighting(cfg.privacy.enabled),
                                     max_site_weight)
    return model, aggregator
