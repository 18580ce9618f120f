"""The model the server persists and broadcasts: only the shared tensors, carried by the job.

The server never builds a site model: it holds no foundation model, needs no GPU and no copy of a (possibly
multi-GB, licence-bound) checkpoint. Whoever builds the job has the model: `fedopal.tools.job` computes the initial
shared state there (the method's shared tensors at the job's seed, identical to every site's own init) and the job
carries it as one string, base64 of a zlib-compressed safetensors blob, with its SHA-256. This module decodes and
checks it; its state_dict() is exactly those tensors.

With FULL transfer the server replaces its parameters wholesale, so an initial model that held the personal adapter
would broadcast it in round 0: these keys are the method's shared keys and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections import OrderedDict

import torch
from torch import nn


class InitialStateError(ValueError):
    """The job's initial shared state cannot be used; the message says why and the fix."""


def encode_state(tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(base64 of zlib(safetensors bytes), SHA-256 hex of the safetensors bytes) for a job's server config."""
    from safetensors.torch import save

    raw = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    return base64.b64encode(zlib.compress(raw, 9)).decode("ascii"), hashlib.sha256(raw).hexdigest()


def decode_state(encoded: str, sha256: str) -> "OrderedDict[str, torch.Tensor]":
    """The tensors `encode_state` packed, in key order; InitialStateError if the blob or its checksum is wrong."""
    from safetensors.torch import load

    try:
        raw = zlib.decompress(base64.b64decode(encoded.encode("ascii"), validate=True))
    except (ValueError, zlib.error, AttributeError) as err:
        raise InitialStateError(f"the job's initial_state is not base64 of a zlib blob ({err}). Fix: export the job "
                                "again with fedopal job --export.") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise InitialStateError("the job's initial_state does not match its initial_state_sha256: the job folder was "
                                "changed after export. Fix: export the job again with fedopal job --export.")
    tensors = load(raw)
    return OrderedDict((k, tensors[k]) for k in sorted(tensors))


def expected_spec(shared_state: dict) -> dict[str, list]:
    """key -> [shape, dtype name] of what a valid update holds (JSON-friendly: the aggregator's constructor arg)."""
    out = {}
    for k, v in shared_state.items():
        arr = v.detach().cpu().numpy() if hasattr(v, "detach") else v
        out[k] = [list(arr.shape), arr.dtype.name]
    return out


class GlobalStateModel(nn.Module):
    """Server model. initial_state, initial_state_sha256: see encode_state (stored under the same names: FLARE's
    job export reads constructor args back from same-named attributes)."""

    def __init__(self, initial_state: str, initial_state_sha256: str):
        super().__init__()
        self.initial_state = initial_state
        self.initial_state_sha256 = initial_state_sha256
        self._shared = decode_state(initial_state, initial_state_sha256)

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
