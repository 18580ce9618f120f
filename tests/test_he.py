"""Encrypted aggregation (federation.encryption he): NVFlare's HE filters and aggregator carry a FedOPAL update.

Two sites' shared-tensor DIFFs of a real model go through the site encryptor, FLARE's wire serialization, the
server's checking HE aggregator and global-model update, and back through the site decryptor: the result is the
sample-weighted mean (float64 NumPy) within CKKS precision, with every shape and dtype restored. The server side
holds ciphertexts only and no secret key. The TenSEAL contexts are built as NVFlare's HEBuilder builds them. The real
POC runs (plain against HE) are `make poc-he` (docs/tools.md, "Encrypted aggregation").
"""

import contextlib
import os
import sys

import numpy as np
import pytest
import tenseal as ts
import torch
import yaml
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.apis.utils.decomposers import flare_decomposers
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.decomposers import common_decomposers
from nvflare.app_opt.he import decomposers
from nvflare.fuel.utils import fobs
from nvflare.fuel.utils.fobs.datum import DatumManager

from fedopal.config import ConfigError, config_from_dict
from fedopal.he import HEGlobalUpdater, HESharedKeyAggregator, HESiteDecryptor, HESiteEncryptor
from fedopal.model.adapters import build_model
from fedopal.server.global_model import expected_spec
from fedopal.specs.contract import NUM_SAMPLES_KEY
from fedopal.specs.methods import get_method

from conftest import REPO, tiny_config

SITES = {"site-1": 30, "site-2": 10}  # reported image counts (the samples weights)


def contexts():
    """(site context with the secret key, server context without), serialized as HEBuilder writes them."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40],
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    ctx.generate_relin_keys()
    ctx.global_scale = 2 ** 40
    site = ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=True)
    server = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=True)
    return ts.context_from(site), ts.context_from(server)


def site_ctx(name: str) -> FLContext:
    fl_ctx, peer = FLContext(), FLContext()
    fl_ctx.set_peer_context(peer)
    return fl_ctx


def wire(shareable: Shareable) -> Shareable:
    """What the other side receives: FLARE's FOBS serialization there and back. FLARE's own decomposers first, as every
    FLARE process registers them at start: otherwise FOBS auto-registers a data-class decomposer for Shareable in this
    pytest process, and every later in-process FLARE API session (test_poc_e2e's admin login) decodes the server's
    replies as empty Shareables."""
    flare_decomposers.register()
    common_decomposers.register()
    decomposers.register()
    return fobs.deserialize(fobs.serialize(shareable, DatumManager(2 ** 40)), DatumManager(2 ** 40))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = tiny_config()
    initial = {k: v.detach().numpy().copy()
               for k, v in build_model(cfg, get_method(cfg.train.method, cfg.model.head)).shared_state().items()}
    rng = np.random.default_rng(0)
    diffs = {s: {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in initial.items()}
             for s in SITES}
    site, server = contexts()
    return initial, diffs, site, server


def encrypted_update(site_name, diff, site_context, weigh=True):
    enc = HESiteEncryptor(weigh_by_local_iter=weigh)
    enc.tenseal_context, enc.encrypt_layers = site_context, [True]  # what START_RUN does with the kit's file
    dxo = DXO(DataKind.WEIGHT_DIFF, data={k: torch.from_numpy(v.copy()) for k, v in diff.items()},
              meta={NUM_SAMPLES_KEY: SITES[site_name]})
    out = enc.process_dxo(dxo, dxo.to_shareable(), site_ctx(site_name))
    shareable = out.to_shareable()
    shareable.set_header(ReservedHeaderKey.PEER_PROPS, {"__identity_name__": site_name})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
    shareable.set_header("current_round", 0)
    return wire(shareable)


def server_ctx() -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    return fl_ctx


def aggregator(expected, **kwargs) -> HESharedKeyAggregator:
    agg = HESharedKeyAggregator(expected=expected, **kwargs)
    agg.handle_event(EventType.START_RUN, server_ctx())  # NVFlare's aggregator sets itself up at START_RUN
    return agg


def test_the_encrypted_round_trip_is_the_weighted_mean_and_the_server_holds_ciphertexts_only(setup):
    initial, diffs, site_context, server_context = setup
    expected = expected_spec(initial)
    agg = aggregator(expected, weighting="samples")
    fl_ctx = server_ctx()
    for name in SITES:
        received = encrypted_update(name, diffs[name], site_context)
        data = from_shareable(received).data
        assert set(data) == set(initial) and all(isinstance(v, ts.CKKSVector) for v in data.values())
        assert not any(v.context().is_private() for v in data.values())  # the wire carries no secret key
        assert agg.accept(received, fl_ctx)
    # the server's running sums: ciphertexts only, and its context cannot decrypt them
    totals = [v for a in agg.dxo_aggregators.values() for v in a.aggregation_helper.total.values()]
    assert totals and all(isinstance(v, ts.CKKSVector) for v in totals)
    assert not server_context.is_private()
    with pytest.raises(Exception):
        totals[0].decrypt()
    mean_diff = agg.aggregate(fl_ctx)
    # the server adds the encrypted mean to the global model (NVFlare's HE shareable generator), still encrypted
    updater = HEGlobalUpdater()
    updater.tenseal_context = server_context
    fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable({k: v.copy() for k, v in initial.items()}, {}),
                    private=True, sticky=False)
    new_global = updater.shareable_to_learnable(mean_diff, fl_ctx)
    assert all(isinstance(v, ts.CKKSVector) for v in new_global["weights"].values())
    task = wire(updater.learnable_to_shareable(new_global, fl_ctx))
    # the site decrypts and gets tensors of the right shape and dtype back
    dec = HESiteDecryptor(expected=expected)
    dec.tenseal_context = site_context
    got = dec.process_dxo(from_shareable(task), task, site_ctx("site-1")).data
    total = sum(SITES.values())
    worst = 0.0
    for k, v in initial.items():
        want = v.astype(np.float64) + sum(SITES[s] * diffs[s][k].astype(np.float64) for s in SITES) / total
        assert got[k].shape == v.shape and got[k].dtype == v.dtype
        worst = max(worst, float(np.max(np.abs(got[k] - want))))
    assert worst < 1e-4, worst  # CKKS is approximate: scale 2^40, the weight multiplied in before encryption


def test_equal_weights_divide_by_the_number_of_sites(setup):
    initial, diffs, site_context, server_context = setup
    agg = aggregator(expected_spec(initial), weighting="equal")
    fl_ctx = server_ctx()
    for name in SITES:
        assert agg.accept(encrypted_update(name, diffs[name], site_context, weigh=False), fl_ctx)
    data = from_shareable(agg.aggregate(fl_ctx)).data
    k = sorted(initial)[0]
    mean = np.array(data[k].decrypt(site_context.secret_key()))  # (the test holds the sites' key)
    want = (sum(diffs[s][k].astype(np.float64) for s in SITES) / len(SITES)).ravel()
    assert np.max(np.abs(mean - want)) < 1e-5


def test_what_the_server_can_check_on_ciphertexts(setup):
    initial, diffs, site_context, _ = setup
    expected = expected_spec(initial)
    keys = sorted(initial)
    cases = {
        "missing key": {k: v for k, v in diffs["site-1"].items() if k != keys[0]},
        "unexpected key": {**diffs["site-1"], "backbone.personal.lora_A.weight": np.zeros(4, np.float32)},
        "wrong size": {**diffs["site-1"], keys[0]: np.zeros(3, np.float32)},
    }
    for why, update in cases.items():
        agg = aggregator(expected)
        assert not agg.accept(encrypted_update("site-1", update, site_context), server_ctx()), why
    # an update in the clear is refused: the server takes no site update it could read
    plain = DXO(DataKind.WEIGHT_DIFF, data=dict(diffs["site-1"]), meta={NUM_SAMPLES_KEY: 30}).to_shareable()
    plain.set_header(ReservedHeaderKey.PEER_PROPS, {"__identity_name__": "site-1"})
    plain.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
    assert not aggregator(expected).accept(plain, server_ctx())
    # an outsized reported weight is refused as in the clear (federation.max_site_weight)
    agg = aggregator(expected, max_site_weight=20)
    assert not agg.accept(encrypted_update("site-1", diffs["site-1"], site_context), server_ctx())


def test_config_refuses_what_he_cannot_carry():
    raw = tiny_config().model_dump(mode="json")
    for extra, word in (({"quantization": "float16"}, "quantization"), ({"cross_site_eval": True}, "cross_site_eval")):
        bad = {**raw, "federation": {**raw["federation"], "encryption": "he", **extra}}
        with pytest.raises((ConfigError, ValueError), match=word):
            config_from_dict(bad)


def test_the_simulator_is_refused_and_the_poc_gets_he_contexts(tmp_path):
    from nvflare.recipe import SimEnv

    from fedopal.tools.job import CUSTOM_ROOT, JobBuildError, build_recipe

    cfg = config_from_dict({**tiny_config().model_dump(mode="json"),
                            "federation": {"num_sites": 2, "encryption": "he"}})
    with contextlib.chdir(CUSTOM_ROOT):  # as export_job and simulate build it
        recipe = build_recipe(cfg)
    with pytest.raises(JobBuildError, match="simulator"):
        recipe.process_env(SimEnv(num_clients=2, workspace_root=str(tmp_path)))
    sys.path.insert(0, os.path.join(REPO, "poc_setup"))
    import poc

    with open(poc.CONSORTIUM_PROJECT) as f:
        project = poc.poc_project(yaml.safe_load(f), ["site-1", "site-2"], 41235, he=True)
    paths = [b["path"] for b in project["builders"]]
    assert paths[-2:] == ["nvflare.lighter.impl.he.HEBuilder", "nvflare.lighter.impl.signature.SignatureBuilder"]


def test_dp_runs_before_the_encryptor_and_the_enforcer_after(tmp_path):
    import json

    from fedopal.tools.job import export_job

    cfg = config_from_dict({**tiny_config().model_dump(mode="json"),
                            "federation": {"num_sites": 2, "encryption": "he"}, "privacy": {"noise_multiplier": 1.0}})
    job = export_job(cfg, str(tmp_path))
    with open(os.path.join(job, "app", "config", "config_fed_client.json")) as f:
        client = json.load(f)
    result_filters = [flt["path"] for chain in client["task_result_filters"] if "train" in chain["tasks"]
                      for flt in chain["filters"]]
    assert result_filters == ["fedopal.policy.privacy.DPUpdateFilter", "fedopal.he.HESiteEncryptor"]
    data_filters = [flt["path"] for chain in client["task_data_filters"] for flt in chain["filters"]]
    assert data_filters == ["fedopal.he.HESiteDecryptor"]
    # the wire contract's enforcer is a component: it acts on AFTER_TASK_RESULT_FILTER, after every filter
    assert "fedopal.policy.enforcer.WireContractEnforcer" in [c["path"] for c in client["components"]]
