"""Property tests: whatever a site sends, a bad update is rejected and the global state does not move."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel, ParamsType

from conftest import server_side, tiny_config

MODEL, AGG = server_side(tiny_config())
SHARED = {k: v.numpy() for k, v in MODEL.state_dict().items()}
KEYS = sorted(SHARED)


def good_params(fill=1.0):
    return {k: np.full_like(v, fill) for k, v in SHARED.items()}


def update(params, weight, site="site-x"):
    return FLModel(params_type=ParamsType.FULL, params=params,
                   meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: weight, "client_name": site})


def corruptions():
    key = st.sampled_from(KEYS)
    return st.one_of(
        key.map(lambda k: ("nan", k)), key.map(lambda k: ("inf", k)), key.map(lambda k: ("-inf", k)),
        key.map(lambda k: ("shape", k)), key.map(lambda k: ("dtype", k)), key.map(lambda k: ("missing", k)),
        st.sampled_from(["personal", "extra", "backbone"]).map(lambda kind: ("extra_key", kind)),
    )


def corrupt(params, how):
    kind, arg = how
    if kind in ("nan", "inf", "-inf"):
        params[arg] = params[arg].copy()
        params[arg].flat[0] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[kind]
    elif kind == "shape":
        params[arg] = np.zeros(params[arg].size + 1, params[arg].dtype)
    elif kind == "dtype":
        params[arg] = params[arg].astype(np.float16)
    elif kind == "missing":
        del params[arg]
    else:
        name = {"personal": "backbone.base_model.model.net.blocks.0.attn.qkv.lora_A.personal.weight",
                "extra": "something.else", "backbone": "backbone.base_model.model.net.norm.weight"}[arg]
        params[name] = np.zeros(3, np.float32)
    return params


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(how=corruptions(), bad_weight=st.integers(1, 10_000), good_weight=st.integers(1, 10_000))
def test_a_corrupt_update_never_moves_the_average(how, bad_weight, good_weight):
    AGG.reset_stats()
    AGG.accept_model(update(corrupt(good_params(100.0), how), bad_weight, "bad"))
    AGG.accept_model(update(good_params(2.0), good_weight, "good"))
    result = AGG.aggregate_model()
    assert result.params_type == ParamsType.FULL
    assert all(np.allclose(v, 2.0) for v in result.params.values())


@settings(max_examples=40, deadline=None)
@given(weight=st.one_of(st.integers(max_value=0), st.floats(max_value=0.0), st.just(float("nan")),
                        st.just(float("inf")), st.floats(min_value=1e10, max_value=1e300), st.none(),
                        st.text(max_size=3), st.booleans()))
def test_zero_negative_absurd_or_missing_weights_are_rejected(weight):
    AGG.reset_stats()
    AGG.accept_model(update(good_params(5.0), weight))
    result = AGG.aggregate_model()
    assert result.params_type == ParamsType.DIFF and result.params == {}  # the global model is kept


@settings(max_examples=30, deadline=None)
@given(hows=st.lists(corruptions(), min_size=1, max_size=4))
def test_a_round_where_everything_is_rejected_keeps_the_previous_global_model(hows):
    AGG.reset_stats()
    for i, how in enumerate(hows):
        AGG.accept_model(update(corrupt(good_params(float(i)), how), 10, f"site-{i}"))
    result = AGG.aggregate_model()
    assert result.params_type == ParamsType.DIFF and result.params == {}


@settings(max_examples=30, deadline=None)
@given(weights=st.lists(st.integers(1, 1000), min_size=1, max_size=5),
       fills=st.lists(st.floats(-10, 10, allow_nan=False), min_size=5, max_size=5))
def test_good_updates_give_the_sample_weighted_mean(weights, fills):
    AGG.reset_stats()
    for w, fill in zip(weights, fills):
        AGG.accept_model(update(good_params(fill), w))
    expected = sum(w * f for w, f in zip(weights, fills)) / sum(weights)
    result = AGG.aggregate_model()
    assert all(np.allclose(v, expected, atol=1e-4) for v in result.params.values())
