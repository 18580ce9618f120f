"""Server aggregation: a sample-weighted mean over the shared keys, and nothing else.

Sites send their update as a difference from the global tensors they received (ParamsType.DIFF, so that a
differential-privacy filter can clip and noise it); the mean of the differences is returned as a DIFF, which
FLARE's FedAvg adds to the global model (float32 on the server, whatever the transfer quantization). Full weights
(FULL) are averaged the same way and returned as FULL; one round never mixes the two.

An update with an unexpected key (above all a personal one), a missing key, a wrong shape or dtype,
a non-finite value or a bad weight is rejected and logged; the round goes on with the rest. A round
in which nothing is accepted keeps the previous global model (an empty DIFF). Every update received
is recorded, accepted or not, in `<app dir>/fedopal_updates.jsonl`: site, round, keys, bytes (as averaged, float32),
wire_bytes (what crossed the network, quantized), the update's L2 norm, and the differential-privacy record the
site's filter attached (epsilon, noise, clip).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

from fedopal.adapters import nbytes
from fedopal.methods import NOTHING_SHARED_KEY
from fedopal.privacy import DP_META_KEY, epsilon_of_records

UPDATES_LOG = "fedopal_updates.jsonl"
WIRE_BYTES_KEY = "fedopal_wire_bytes"  # result meta: bytes received before dequantization (transfer.ServerDequantizer)


def expected_spec(shared_state: dict) -> dict[str, tuple[tuple, str]]:
    """key -> (shape, numpy dtype name) of what a valid update holds."""
    out = {}
    for k, v in shared_state.items():
        arr = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        out[k] = (tuple(arr.shape), arr.dtype.name)
    return out


def validate_update(params: dict, weight, expected: dict, max_weight: float) -> Optional[str]:
    """None if the update may be averaged, else the reason it is rejected."""
    if not isinstance(weight, (int, float, np.integer, np.floating)) or isinstance(weight, bool):
        return f"sample weight {weight!r} is not a number"
    if not math.isfinite(float(weight)) or weight <= 0 or weight > max_weight:
        return f"sample weight {weight!r} is outside (0, {max_weight:g}]"
    extra = sorted(set(params) - set(expected))
    if extra:
        return f"{len(extra)} unexpected key(s), e.g. {extra[0]}"
    missing = sorted(set(expected) - set(params))
    if missing:
        return f"{len(missing)} missing key(s), e.g. {missing[0]}"
    for k, value in params.items():
        arr = np.asarray(value)
        shape, dtype = expected[k]
        if tuple(arr.shape) != shape:
            return f"{k}: shape {tuple(arr.shape)} != expected {shape}"
        if arr.dtype.name != dtype:
            return f"{k}: dtype {arr.dtype.name} != expected {dtype}"
        if not np.all(np.isfinite(arr)):
            return f"{k}: non-finite values"
    return None


class SharedKeyAggregator(ModelAggregator):
    def __init__(self, config: dict, max_weight: float = 1e9):
        super().__init__()
        self.config = config
        self.max_weight = max_weight
        self._expected: Optional[dict] = None
        self.reset_stats()

    def expected(self) -> dict:
        if self._expected is None:
            from fedopal.server_model import shared_state_from_config  # builds the model once

            shared = shared_state_from_config(self.config)
            shared.pop(NOTHING_SHARED_KEY, None)  # a placeholder no site sends
            self._expected = expected_spec(shared)
        return self._expected

    def reset_stats(self):
        self._sums: dict[str, np.ndarray] = {}
        self._total_weight = 0.0
        self._metric_sums: dict[str, float] = {}
        self._accepted: list[str] = []
        self._params_type: Optional[ParamsType] = None

    def accept_model(self, model: FLModel):
        meta = model.meta or {}
        site = meta.get("client_name", "unknown")
        weight = meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND)
        params = model.params or {}
        reason = validate_update(params, weight, self.expected(), self.max_weight)
        params_type = model.params_type or ParamsType.FULL
        if reason is None and self._params_type not in (None, params_type):
            reason = f"params type {params_type} in a round of {self._params_type} updates"
        self._record(site, model.current_round, params, weight, reason, meta, params_type)
        if reason:
            self.error(f"rejected the update from {site}: {reason}")
            return
        w = float(weight)
        for k, v in params.items():
            self._sums[k] = self._sums.get(k, 0.0) + w * np.asarray(v, dtype=np.float64)
        for k, v in (model.metrics or {}).items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._metric_sums[k] = self._metric_sums.get(k, 0.0) + w * float(v)
        self._total_weight += w
        self._accepted.append(site)
        self._params_type = params_type

    def aggregate_model(self) -> FLModel:
        if not self._accepted:
            self.warning("no update accepted this round: the global model is kept as it was")
            return FLModel(params_type=ParamsType.DIFF, params={}, metrics={})
        expected = self.expected()
        params = {k: (s / self._total_weight).astype(expected[k][1]) for k, s in self._sums.items()}
        metrics = {k: v / self._total_weight for k, v in self._metric_sums.items()}
        self.info(f"aggregated {len(params)} shared tensors ({self._params_type}) from {self._accepted}")
        return FLModel(params_type=self._params_type, params=params, metrics=metrics)

    def _record(self, site, round_num, params: dict, weight, reason: Optional[str], meta: dict,
                params_type: ParamsType) -> None:
        app_root = self.fl_ctx.get_prop(FLContextKey.APP_ROOT) if self.fl_ctx else None
        if not app_root:
            return
        arrays = {k: np.asarray(v) for k, v in params.items()}
        size = nbytes(arrays)
        floats = [a for a in arrays.values() if np.issubdtype(a.dtype, np.floating)]
        dp = meta.get(DP_META_KEY)
        entry = {"round": round_num, "site": site, "weight": weight if isinstance(weight, (int, float)) else None,
                 "keys": sorted(params), "bytes": size, "wire_bytes": meta.get(WIRE_BYTES_KEY, size),
                 "params_type": getattr(params_type, "value", str(params_type)),
                 "norm": float(np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in floats))),
                 "epsilon": epsilon_of_records(dp if isinstance(dp, list) else [dp] if dp else None), "dp": dp,
                 "accepted": reason is None, "reason": reason}
        with open(os.path.join(app_root, UPDATES_LOG), "a") as f:
            f.write(json.dumps(entry) + "\n")
