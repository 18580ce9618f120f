"""Encrypted aggregation (federation.encryption he): NVFlare's homomorphic-encryption components, TenSEAL CKKS.

Each site encrypts its shared update (the DIFF of the global adapter) with the CKKS context of its startup kit; the
server sums the ciphertexts and scales the sum (it holds a context without the secret key, so it cannot decrypt);
the sites decrypt the new global tensors when the next round's task arrives. The server never sees one site's update
in the clear. It does see, and store, only ciphertexts of the global model: the aggregate is decrypted at the sites.

What this protects, and what not (docs/tools.md, "Encrypted aggregation"):
- one site's update from the server (and from anyone on the wire between the site and the server);
- not the aggregate: every site decrypts the new global model, so each site learns the mean of the others' updates;
  differential privacy (privacy.mode update: the site clips and noises before it encrypts) is the tool for that, and
  composes: the DP filter runs first, the encryptor second;
- the keys come from provisioning (HEBuilder): every site holds the same secret key, so a site that could read
  another site's ciphertext off the wire could decrypt it (FLARE's TLS keeps the wire closed);
- the server can validate keys, sizes and reported weights only, never values: a non-finite or outsized update is
  caught in the clear by SharedKeyAggregator, here only by the sites' own DP clipping.

The thin subclasses, and why they exist (NVFlare's HE path cannot carry FedOPAL's update unchanged):
- `HESiteDecryptor`: CKKS vectors are flat, and NVFlare's HEModelShareableGenerator flattens the global tensors when
  it adds the first encrypted DIFF; NVFlare's decryptor hands the site flat lists of float64. The site script loads
  tensors by shape, so the decryptor restores each key's shape and dtype from the job's expected spec.
- `HESiteEncryptor`: converts the site's tensors to NumPy before encrypting and records the time it took.
- `HESharedKeyAggregator`: NVFlare's in-time HE aggregator, with SharedKeyAggregator's checks that still make sense
  on ciphertexts (exactly the expected keys, each an encrypted vector of the expected size, a valid reported weight),
  the server's weighting policy (equal weights: NVFlare's aggregator would divide by the sites' reported counts even
  when the sites did not multiply by them), and the update log (fedopal_updates.jsonl) and aggregation times.
- `HEGlobalUpdater`: NVFlare's HEModelShareableGenerator (adds the encrypted mean DIFF to the global model), timed.
Every timing goes to a JSON-lines file in the component's app folder: `fedopal_he_site.jsonl` at a site,
`fedopal_aggregation.jsonl` on the server (the plain SharedKeyAggregator writes the same file).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
from nvflare.app_opt.he.model_shareable_generator import HEModelShareableGenerator

from fedopal.specs.contract import DP_META_KEY, NUM_SAMPLES_KEY

SITE_LOG = "fedopal_he_site.jsonl"
AGGREGATION_LOG = "fedopal_aggregation.jsonl"
UPDATES_LOG = "fedopal_updates.jsonl"  # the same file (and fields) as server.aggregator's
CLIENT_CONTEXT = "client_context.tenseal"  # what HEBuilder writes into each site's startup kit
SERVER_CONTEXT = "server_context.tenseal"  # ... and the server's (no secret key)


def append_jsonl(fl_ctx: FLContext | None, name: str, entry: dict) -> None:
    """One JSON line in <app folder>/name (nothing without an app folder: unit tests)."""
    app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT) if fl_ctx is not None else None
    if app_root:
        with open(os.path.join(app_root, name), "a") as f:
            f.write(json.dumps(entry) + "\n")


def _round(shareable: Shareable):
    r = shareable.get_header("current_round") if isinstance(shareable, Shareable) else None
    return r + 1 if isinstance(r, int) else None  # from 1, as every FedOPAL table


def ckks_bytes(vector) -> tuple[int, int]:
    """(ciphertext bytes, context bytes) of one CKKS vector as NVFlare's FOBS decomposer sends it: it serializes the
    vector's context (public parts, relinearization keys) beside every vector."""
    return len(vector.serialize()), len(vector.context().serialize())


class HESiteEncryptor(HEModelEncryptor):
    """NVFlare's HEModelEncryptor on the site's train result (all tensors encrypted); weigh_by_local_iter: multiply
    by the reported image count first (the server's `samples` weighting), False for `equal`."""

    def __init__(self, tenseal_context_file: str = CLIENT_CONTEXT, weigh_by_local_iter: bool = True):
        super().__init__(tenseal_context_file=tenseal_context_file, weigh_by_local_iter=weigh_by_local_iter,
                         data_kinds=[DataKind.WEIGHT_DIFF])

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext):
        dxo.data = {k: np.asarray(v, dtype=np.float64) for k, v in (dxo.data or {}).items()}
        t0 = time.perf_counter()
        out = super().process_dxo(dxo, shareable, fl_ctx)
        seconds = time.perf_counter() - t0
        append_jsonl(fl_ctx, SITE_LOG, {"round": _round(shareable), "op": "encrypt", "seconds": seconds,
                                        "values": int(sum(v.size() for v in out.data.values())),
                                        "tensors": len(out.data)})
        return out


class HESiteDecryptor(HEModelDecryptor):
    """NVFlare's HEModelDecryptor on the task data the site receives, restoring each tensor's shape and dtype.
    expected: key -> [shape, dtype name] (server.global_model.expected_spec of the job's initial state)."""

    def __init__(self, expected: dict, tenseal_context_file: str = CLIENT_CONTEXT):
        super().__init__(tenseal_context_file=tenseal_context_file,
                         data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF])
        self.expected = expected

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext):
        t0 = time.perf_counter()
        out = super().process_dxo(dxo, shareable, fl_ctx)
        seconds = time.perf_counter() - t0
        if out is None:  # round 1: the initial global model is not encrypted
            return None
        out.data = restore_shapes(out.data, self.expected)
        out.update_shareable(shareable)
        append_jsonl(fl_ctx, SITE_LOG, {"round": _round(shareable), "op": "decrypt", "seconds": seconds,
                                        "tensors": len(out.data)})
        return out


def restore_shapes(params: dict, expected: dict) -> dict:
    """Decrypted flat values -> arrays of the expected shape and dtype (ValueError when a size does not match)."""
    out = {}
    for k, v in params.items():
        if k not in expected:
            out[k] = v
            continue
        shape, dtype = expected[k]
        arr = np.asarray(v, dtype=np.float64)
        if arr.size != math.prod(shape):
            raise ValueError(f"{k}: {arr.size} decrypted values, expected shape {tuple(shape)}")
        out[k] = arr.reshape(shape).astype(dtype)
    return out


def validate_encrypted(data: dict, weight, expected: dict, max_weight: float) -> str | None:
    """None if the encrypted update may be summed, else why not: what can be checked without the secret key."""
    import tenseal as ts

    if not isinstance(weight, (int, float, np.integer, np.floating)) or isinstance(weight, bool):
        return f"sample weight {weight!r} is not a number"
    if not math.isfinite(float(weight)) or weight <= 0 or weight > max_weight:
        return f"sample weight {weight!r} is outside (0, {max_weight:g}] (federation.max_site_weight)"
    extra = sorted(set(data) - set(expected))
    if extra:
        return f"{len(extra)} unexpected key(s), e.g. {extra[0]}"
    missing = sorted(set(expected) - set(data))
    if missing:
        return f"{len(missing)} missing key(s), e.g. {missing[0]}"
    for k, v in data.items():
        if not isinstance(v, ts.CKKSVector):
            return f"{k}: not encrypted ({type(v).__name__}): refused, the server takes no update in the clear"
        size = math.prod(expected[k][0])
        if v.size() != size:
            return f"{k}: {v.size()} encrypted values, expected {size} (shape {tuple(expected[k][0])})"
    return None


class HESharedKeyAggregator(HEInTimeAccumulateWeightedAggregator):
    """expected, weighting, max_site_weight: as SharedKeyAggregator's (stored under the same names for FLARE's
    export). Sums encrypted WEIGHT_DIFFs; never decrypts (the server's context has no secret key)."""

    def __init__(self, expected: dict, weighting: str = "samples", max_site_weight: float = 1e6):
        from fedopal.specs.methods import NOTHING_SHARED_KEY

        if weighting not in ("samples", "equal"):
            raise ValueError(f"weighting must be samples or equal, got {weighting!r}")
        super().__init__(expected_data_kind=DataKind.WEIGHT_DIFF, weigh_by_local_iter=False)
        self.expected = {k: v for k, v in expected.items() if k != NOTHING_SHARED_KEY}
        self.weighting = weighting
        self.max_site_weight = max_site_weight
        self._accept_s = 0.0
        self._accepted: list[str] = []

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        t0 = time.perf_counter()
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        try:
            dxo = from_shareable(shareable)
        except Exception:
            self.log_error(fl_ctx, f"rejected the update from {site}: no DXO")
            return False
        meta = dxo.meta or {}
        reported = meta.get(NUM_SAMPLES_KEY)
        weight = 1 if self.weighting == "equal" else reported
        data = dxo.data if isinstance(dxo.data, dict) else {}
        reason = None if dxo.data_kind == DataKind.WEIGHT_DIFF else f"data kind {dxo.data_kind}, not WEIGHT_DIFF"
        reason = reason or validate_encrypted(data, weight, self.expected, self.max_site_weight)
        accepted = False
        if reason is None:
            # the weight NVFlare's aggregator divides by: what the site multiplied by (equal: 1)
            dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, weight)
            dxo.update_shareable(shareable)
            accepted = super().accept(shareable, fl_ctx)
            if not accepted:
                reason = "refused by NVFlare's aggregator (wrong round, twice in a round, or an error code)"
        seconds = time.perf_counter() - t0
        self._record(fl_ctx, site, shareable, data, weight, meta, reason)
        if accepted:
            self._accept_s += seconds
            self._accepted.append(site)
        else:
            self.log_error(fl_ctx, f"rejected the update from {site}: {reason}")
        return accepted

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        from nvflare.app_common.app_constant import AppConstants

        t0 = time.perf_counter()
        out = super().aggregate(fl_ctx)
        seconds = time.perf_counter() - t0
        round_num = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        append_jsonl(fl_ctx, AGGREGATION_LOG, {
            "round": round_num + 1 if isinstance(round_num, int) else None, "encrypted": True,
            "sites": list(self._accepted), "accept_s": self._accept_s, "aggregate_s": seconds})
        self.log_info(fl_ctx, f"summed {len(self.expected)} encrypted shared tensors from {self._accepted}, "
                              f"{self.weighting} weights")
        self._accept_s, self._accepted = 0.0, []
        return out

    def _record(self, fl_ctx, site, shareable, data: dict, weight, meta: dict, reason) -> None:
        import tenseal as ts

        cipher = context = 0
        for v in data.values():
            if isinstance(v, ts.CKKSVector):
                c, x = ckks_bytes(v)
                cipher, context = cipher + c, context + x
        dp = meta.get(DP_META_KEY)
        from fedopal.policy.privacy import epsilon_of_records

        append_jsonl(fl_ctx, UPDATES_LOG, {
            "round": _round(shareable), "site": site, "weight": weight if isinstance(weight, (int, float)) else None,
            "weighting": self.weighting, "keys": sorted(data), "bytes": cipher, "wire_bytes": cipher + context,
            "params_type": "DIFF", "encrypted": True, "norm": None,
            "epsilon": epsilon_of_records(dp if isinstance(dp, list) else [dp] if dp else None), "dp": dp,
            "accepted": reason is None, "reason": reason})


class HEGlobalUpdater(HEModelShareableGenerator):
    """NVFlare's HEModelShareableGenerator (the global model plus the encrypted mean DIFF, in encrypted space),
    timed into fedopal_aggregation.jsonl as the round's `update_s`."""

    def __init__(self, tenseal_context_file: str = SERVER_CONTEXT):
        super().__init__(tenseal_context_file=tenseal_context_file)

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext):
        from nvflare.app_common.app_constant import AppConstants

        t0 = time.perf_counter()
        out = super().shareable_to_learnable(shareable, fl_ctx)
        round_num = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        append_jsonl(fl_ctx, AGGREGATION_LOG, {"round": round_num + 1 if isinstance(round_num, int) else None,
                                               "encrypted": True, "update_s": time.perf_counter() - t0})
        return out


WIRE_SIZE_LOG = "fedopal_wire_bytes.jsonl"


class WireSizeProbe(FLComponent):
    """Server component for measurements (tools/he_compare.py, plain and encrypted alike): the size of every train
    result as FLARE's FOBS serializes it for the network, one line per result in fedopal_wire_bytes.jsonl. It
    serializes the message a second time, so only measuring jobs carry it."""

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        from nvflare.fuel.utils import fobs
        from nvflare.fuel.utils.fobs.datum import DatumManager

        if event_type != EventType.BEFORE_TASK_RESULT_FILTER or fl_ctx.get_prop(FLContextKey.TASK_NAME) != "train":
            return
        result = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
        if isinstance(result, Shareable):
            peer = fl_ctx.get_peer_context()
            append_jsonl(fl_ctx, WIRE_SIZE_LOG, {"round": _round(result),
                                                 "site": peer.get_identity_name() if peer else None,
                                                 "message_bytes": len(fobs.serialize(result, DatumManager(2 ** 40)))})
                                                 # (a threshold nothing reaches: every value inline, counted)
