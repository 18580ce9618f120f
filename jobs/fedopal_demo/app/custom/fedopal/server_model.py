"""The model the server persists and broadcasts: only the shared tensors.

With FULL transfer the server replaces its parameters wholesale, so an initial model that held the
personal adapter would broadcast it in round 0. This module's state_dict() is exactly the method's
shared keys, built from the same config and seed as every site's model (so the global init matches).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from fedopal.adapters import build_model
from fedopal.config import config_from_dict
from fedopal.methods import NOTHING_SHARED_KEY, get_method


def shared_state_from_config(config: dict) -> "OrderedDict":
    cfg = config_from_dict(config, source="job config")
    spec = get_method(cfg.train.method, cfg.model.head)
    shared = build_model(cfg, spec).shared_state()
    return OrderedDict(shared or {NOTHING_SHARED_KEY: torch.zeros(1)})


class GlobalStateModel(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = config  # the exporter reads constructor args back from same-named attributes
        self._shared = shared_state_from_config(config)

    def state_dict(self, *args, **kwargs):
        return OrderedDict(self._shared)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        unexpected = [k for k in state_dict if k not in self._shared]
        if strict and unexpected:
            raise KeyError(f"not shared keys of this job: {unexpected[:5]}")
        for k, v in state_dict.items():
            if k in self._shared:
                self._shared[k] = v
        return None

    def forward(self, *args, **kwargs):
        raise RuntimeError("GlobalStateModel only carries the shared tensors; it is not run")
