"""The wire contract, enforced on the whole message: tensors by group, metrics, meta, headers, tracking events."""

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FedEventHeader
from nvflare.apis.fl_context import FLContext

from fedopal.config import ConfigError, config_from_dict
from fedopal.model.adapters import build_model
from fedopal.policy.enforcer import WireContractEnforcer
from fedopal.policy.wire import message_fields
from fedopal.site.runtime import job_policy
from fedopal.specs.contract import DP_META_KEY, NUM_SAMPLES_KEY, SITE_FIELDS, WirePolicy, site_field
from fedopal.specs.methods import GROUPS, get_method

from conftest import tiny_config

METRICS = {f"{v}/{s}/{m}": 0.5 for v in ("personalized", "global_only") for s in ("val", "test")
           for m in ("balanced_accuracy", "accuracy", "auc")}


def train_result(model, meta=None, metrics=METRICS):
    everything = {k: v.numpy() for k, v in model.state_dict().items()}
    dxo = DXO(DataKind.WEIGHT_DIFF, data=everything, meta={"initial_metrics": dict(metrics), **(meta or {})})
    return dxo.to_shareable()


def enforcer_for(cfg):
    policy = job_policy(cfg)
    return WireContractEnforcer(list(policy.allow_groups), list(policy.allow_fields), policy.require_dp, "job")


def test_the_job_policy_strips_personal_tensors_and_a_personal_head(tiny_cfg):
    spec = get_method("fedopal_w", "personal")
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.model.head = "personal"
    model = build_model(cfg, spec, "site-1")
    result = train_result(model, {NUM_SAMPLES_KEY: 48})
    removed = enforcer_for(cfg).enforce(result, "train", FLContext())
    sent = from_shareable(result)
    assert set(sent.data) == set(model.shared_state())
    assert not any(".personal." in k or k.startswith("head.") for k in sent.data)
    assert any(r.startswith("tensor:") and ".personal." in r for r in removed)
    assert sent.meta[NUM_SAMPLES_KEY] == 48 and sent.meta["initial_metrics"] == METRICS  # no DP: all allowed


def test_local_sends_no_tensor(tiny_cfg):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.train.method = "local"
    model = build_model(cfg, get_method("local"), "site-1")
    result = train_result(model)
    enforcer_for(cfg).enforce(result, "train", FLContext())
    assert from_shareable(result).data == {}


def test_under_dp_only_the_noised_update_and_the_dp_settings_leave(tiny_cfg):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.privacy.noise_multiplier = 1.0
    model = build_model(cfg, get_method("fedopal_w", cfg.model.head), "site-1")
    record = {"mode": "update", "source": "job", "epsilon": 3.2, "delta": 1e-5, "noise_multiplier": 1.0,
              "clip_norm": 1.0, "releases": 2, "accountant": "prv", "unit": "site",
              "update_norm": 0.731, "clipped": False}  # the two last: computed from the data, not noised
    result = train_result(model, {NUM_SAMPLES_KEY: 48, DP_META_KEY: [record], "secret": "x"})
    result["smuggled"] = "y"
    result.set_header("also_smuggled", 1)
    removed = enforcer_for(cfg).enforce(result, "train", FLContext())
    sent = from_shareable(result)
    assert set(sent.meta) == {DP_META_KEY, "initial_metrics"} and sent.meta["initial_metrics"] == {}
    assert sent.meta[DP_META_KEY] == [{k: v for k, v in record.items() if k not in ("update_norm", "clipped")}]
    assert "smuggled" not in result and "also_smuggled" not in result["__headers__"]
    assert {"meta:fedopal_dp.update_norm", "meta:fedopal_dp.clipped", f"meta:{NUM_SAMPLES_KEY}", "meta:secret",
            "top_level:smuggled", "header:also_smuggled"} <= set(removed)
    assert len([r for r in removed if r.startswith("metric:")]) == len(METRICS)


def test_a_site_may_allow_named_metrics_under_dp():
    policy = WirePolicy(("global.A", "global.B"), ("personalized/val/*",), require_dp=True)
    allowed = {m for m in METRICS if policy.allows("metric", m, "train")}
    assert allowed == {m for m in METRICS if m.startswith("personalized/val/")}
    assert not policy.allows("meta", NUM_SAMPLES_KEY, "train")


def test_require_dp_withholds_an_update_that_carries_no_dp_record(tiny_cfg):
    model = build_model(tiny_cfg, get_method("fedopal_w", tiny_cfg.model.head), "site-1")
    result = train_result(model)
    WireContractEnforcer(["global.A", "global.B", "head"], [], True).enforce(result, "train", FLContext())
    assert from_shareable(result).data == {}


def test_a_task_outside_the_contract_leaves_with_no_content(tiny_cfg):
    model = build_model(tiny_cfg, get_method("fedopal_w", tiny_cfg.model.head), "site-1")
    result = train_result(model)
    removed = WireContractEnforcer().enforce(result, "submit_model", FLContext())
    assert "DXO" not in result and removed == ["content:submit_model"]


def event(tag):
    from nvflare.apis.analytix import AnalyticsDataType
    from nvflare.apis.utils.analytix_utils import create_analytic_dxo

    shareable = create_analytic_dxo(tag=tag, value=0.5, data_type=AnalyticsDataType.SCALAR).to_shareable()
    shareable.set_header(FedEventHeader.DIRECTION, "out")
    return shareable


def test_tracking_events_leave_only_with_an_allowed_tag():
    enforcer = WireContractEnforcer(allow_fields=["personalized/val/*"], require_dp=True)
    for tag, leaves in (("privacy/epsilon", True), ("personalized/val/auc", True), ("train/task_loss", False),
                        ("diagnostics/overlap_A", False), ("anything/else", False)):
        data = event(tag)
        assert enforcer.enforce_event("fed.analytix_log_stats", data) is leaves
        assert data.get_header(FedEventHeader.DIRECTION) == ("out" if leaves else "in")  # "in": FLARE does not send it
    assert enforcer.enforce_event("fed.some_other_event", event("privacy/epsilon")) is False


def test_every_field_the_site_script_writes_is_in_the_contract():
    tags = ["train/task_loss", "train/orth_loss", "train/lr_first", "privacy/epsilon", "privacy/epsilon_site_policy",
            *METRICS, *(f"diagnostics/{k}" for k in ("overlap_A", "overlap_B", "overlap_u", "random_A", "random_B",
                                                      "random_u"))]
    assert all(site_field("event_tag", t, "event") for t in tags)
    assert all(site_field("metric", m, "train") and site_field("metric", m, "validate") for m in METRICS)
    assert {f.name for f in SITE_FIELDS if f.where == "tensor"} == set(GROUPS)


def test_message_fields_name_every_leaf():
    dxo = DXO(DataKind.WEIGHT_DIFF, data={"backbone.x.lora_A.global.weight": np.zeros(2)},
              meta={"initial_metrics": {"personalized/val/auc": 0.5}, DP_META_KEY: [{"epsilon": 1.0}]})
    fields = message_fields(dxo.to_shareable())
    assert {("tensor", "backbone.x.lora_A.global.weight"), ("metric", "personalized/val/auc"),
            ("meta", "fedopal_dp.epsilon"), ("dxo_kind", "WEIGHT_DIFF")} <= fields


def test_policy_typos_stop_the_job_they_open_nothing():
    with pytest.raises(ValueError, match="unknown tensor group"):
        WireContractEnforcer(allow_groups=["global.a"])
    raw = tiny_config().model_dump(mode="json")
    raw["privacy"].update(noise_multiplier=1.0, allow_fields=["personalised/val/*"])
    with pytest.raises(ConfigError, match="names no data-derived field"):
        config_from_dict(raw)
    raw["privacy"]["allow_fields"] = ["personalized/val/*", "NUM_STEPS_CURRENT_ROUND"]
    assert config_from_dict(raw).privacy.allow_fields
