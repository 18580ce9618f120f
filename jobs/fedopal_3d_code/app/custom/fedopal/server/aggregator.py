"""Server aggregation: a sample-weighted mean over the shared keys, and nothing else.

Sites send their update as a difference from the global tensors they received (ParamsType.DIFF, so that a
differential-privacy filter can clip and noise it); the mean of the differences is returned as a DIFF, which
FLARE's FedAvg adds to the global model (float32 on the server, whatever the transfer quantization). Full weights
(FULL) are averaged the same way and returned as FULL; one round never mixes the two.

The weights are the server's policy, not the sites' (federation.aggregation_weights): `equal` (every accepted update
counts once: what differential privacy needs, since a reported image count is derived from the data), or `samples`
(the image count each site reports, FLARE's NUM_STEPS_CURRENT_ROUND), refused above `max_site_weight`: one site
reporting 1e9 images cannot take over the global model, its update is rejected with one log line.

An update with an unexpected key (above all a personal one), a missing key, a wrong shape or dtype,
a non-finite value or a bad weight is rejected and logged; the round goes on with the rest. A round
in which nothing is accepted keeps the previous global model (an empty DIFF). Every update received
is recorded, accepted or not, in `<app dir>/fedopal_updates.jsonl`: site, round, keys, bytes (as averaged, float32),
wire_bytes (what crossed the network, quantized), the update's L2 norm, the weight used, and the
differential-privacy record the site's filter attached (settings and epsilon).

The expected keys, shapes and dtypes come with the job (the initial shared state's, server.global_model): the
server builds no model.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import numpy as np
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

from fedopal.policy.privacy import epsilon_of_records
from fedopal.specs.contract import DP_META_KEY, NUM_SAMPLES_KEY, WIRE_BYTES_KEY
from fedopal.specs.methods import NOTHING_SHARED_KEY

UPDATES_LOG = "fedopal_updates.jsonl"
AGGREGATION_LOG = "fedopal_aggregation.jsonl"  # per round: seconds spent accepting and averaging (fedopal.he: same)
WEIGHTINGS = ("samples", "equal")


def nbytes(arrays: dict) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def validate_update(params: dict, weight, expected: dict, max_weight: float) -> Optional[str]:
    """None if the update may be averaged, else the reason it is rejected. expected: key -> (shape, dtype name);
    weight: the weight the server's policy gives this update (None: the site reported none)."""
    if not isinstance(weight, (int, float, np.integer, np.floating)) or isinstance(weight, bool):
        return f"sample weight {weight!r} is not a number"
    if not math.isfinite(float(weight)) or weight <= 0 or weight > max_weight:
        return (f"sample weight {weight!r} is outside (0, {max_weight:g}] (federation.max_site_weight): an outlier, "
                "rejected")
    extra = sorted(set(params) - set(expected))
    if extra:
        return f"{len(extra)} unexpected key(s), e.g. {extra[0]}"
    missing = sorted(set(expected) - set(params))
    if missing:
        return f"{len(missing)} missing key(s), e.g. {missing[0]}"
    for k, value in params.items():
        arr = np.asarray(value)
        shape, dtype = expected[k]
        shape = tuple(shape)
        if tuple(arr.shape) != shape:
            return f"{k}: shape {tuple(arr.shape)} != expected {shape}"
        if arr.dtype.name != dtype:
            return f"{k}: dtype {arr.dtype.name} != expected {dtype}"
        if not np.all(np.isfinite(arr)):
            return f"{k}: non-finite values"
    return None


class SharedKeyAggregator(ModelAggregator):
    """expected: key -> [shape, dtype name] of the shared tensors (server.global_model.expected_spec of the job's
    initial state); weighting: "samples" or "equal"; max_site_weight: the largest image count a site may report
    (weighting samples). Stored under the same names (FLARE's job export reads them back)."""

    def __init__(self, expected: dict, weighting: str = "samples", max_site_weight: float = 1e6):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.expected = {k: v for k, v in expected.items() if k != NOTHING_SHARED_KEY}  # a placeholder no site sends
        self.weighting = weighting
        self.max_site_weight = max_site_weight
        self.reset_stats()

    def weight_of(self, meta: dict):
        """The weight the server's policy gives an update: 1 (equal), or the reported image count (samples)."""
        return 1 if self.weighting == "equal" else meta.get(NUM_SAMPLES_KEY)

    def reset_stats(self):
        self._sums: dict[str, np.ndarray] = {}
        self._total_weight = 0.0
        self._metric_sums: dict[str, float] = {}
        self._accepted: list[str] = []
        self._params_type: Optional[ParamsType] = None
        self._accept_s = 0.0
        self._round = None

    def accept_model(self, model: FLModel):
        t0 = time.perf_counter()
        meta = model.meta or {}
        site = meta.get("client_name", "unknown")
        weight = self.weight_of(meta)
        params = model.params or {}
        reason = validate_update(params, weight, self.expected, self.max_site_weight)
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
        self._accept_s += time.perf_counter() - t0
        self._round = model.current_round

    def aggregate_model(self) -> FLModel:
        t0 = time.perf_counter()
        if not self._accepted:
            self.warning("no update accepted this round: the global model is kept as it was")
            return FLModel(params_type=ParamsType.DIFF, params={}, metrics={})
        params = {k: (s / self._total_weight).astype(self.expected[k][1]) for k, s in self._sums.items()}
        metrics = {k: v / self._total_weight for k, v in self._metric_sums.items()}
        self.info(f"aggregated {len(params)} shared tensors ({self._params_type}) from {self._accepted}, "
                  f"{self.weighting} weights")
        self._log_times(time.perf_counter() - t0)
        return FLModel(params_type=self._params_type, params=params, metrics=metrics)

    def _log_times(self, aggregate_s: float) -> None:
        app_root = self.fl_ctx.get_prop(FLContextKey.APP_ROOT) if self.fl_ctx else None
        if app_root:
            with open(os.path.join(app_root, AGGREGATION_LOG), "a") as f:
                f.write(json.dumps({"round": self._round + 1 if isinstance(self._round, int) else None,
                                    "encrypted": False,
                                    "sites": list(self._accepted), "accept_s": self._accept_s,
                                    "aggregate_s": aggregate_s}) + "\n")

    def _record(self, site, round_num, params: dict, weight, reason: Optional[str], meta: dict,
                params_type: ParamsType) -> None:
        app_root = self.fl_ctx.get_prop(FLContextKey.APP_ROOT) if self.fl_ctx else None
        if not app_root:
            return
        arrays = {k: np.asarray(v) for k, v in params.items()}
        size = nbytes(arrays)
        floats = [a for a in arrays.values() if np.issubdtype(a.dtype, np.floating)]
        dp = meta.get(DP_META_KEY)
        # "round" from 1, as the site's metrics.jsonl and every table (FLARE's current_round counts from 0)
        entry = {"round": round_num + 1 if isinstance(round_num, int) else None, "site": site,
                 "weight": weight if isinstance(weight, (int, float)) else None, "weighting": self.weighting,
                 "keys": sorted(params), "bytes": size, "wire_bytes": meta.get(WIRE_BYTES_KEY, size),
                 "params_type": getattr(params_type, "value", str(params_type)),
                 "norm": float(np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in floats))),
                 "epsilon": epsilon_of_records(dp if isinstance(dp, list) else [dp] if dp else None), "dp": dp,
                 "accepted": reason is None, "reason": reason}
        with open(os.path.join(app_root, UPDATES_LOG), "a") as f:
            f.write(json.dumps(entry) + "\n")
