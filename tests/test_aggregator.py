"""Server aggregation over shared keys only, with update validation."""

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel, ParamsType

from fedopal.server.aggregator import validate_update
from fedopal.server.global_model import expected_spec

from conftest import server_side, tiny_config


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def shared(config):
    model, _ = server_side(config)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def aggregator(config, **kwargs):
    return server_side(config, **kwargs)[1]


def update(params, weight=10, site="site-1"):
    return FLModel(params_type=ParamsType.FULL, params=params, metrics={"personalized/val/accuracy": 0.5},
                   meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: weight, "client_name": site})


def test_server_model_holds_only_global_keys(shared):
    assert shared and all(".lora_A.global." in k or ".lora_B.global." in k or k.startswith("head.") for k in shared)


def test_weighted_mean_over_shared_keys(config, shared):
    agg = aggregator(config)
    ones = {k: np.ones_like(v) for k, v in shared.items()}
    threes = {k: np.full_like(v, 3.0) for k, v in shared.items()}
    agg.accept_model(update(ones, weight=30))
    agg.accept_model(update(threes, weight=10, site="site-2"))
    result = agg.aggregate_model()
    assert result.params_type == ParamsType.FULL and set(result.params) == set(shared)
    for k, v in result.params.items():
        assert v.dtype == shared[k].dtype and np.allclose(v, 1.5)
    assert result.metrics["personalized/val/accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize("corrupt,needle", [
    (lambda p: p.update({"backbone.x.lora_A.personal.weight": np.zeros(2, np.float32)}), "unexpected"),
    (lambda p: p.pop(sorted(p)[0]), "missing"),
    (lambda p: p.update({sorted(p)[0]: np.zeros((1, 1), np.float32)}), "shape"),
    (lambda p: p.update({sorted(p)[0]: p[sorted(p)[0]].astype(np.float64)}), "dtype"),
    (lambda p: p[sorted(p)[0]].flat.__setitem__(0, np.nan), "non-finite"),
    (lambda p: p[sorted(p)[0]].flat.__setitem__(0, np.inf), "non-finite"),
])
def test_bad_updates_are_rejected_and_do_not_count(config, shared, corrupt, needle):
    params = {k: v.copy() for k, v in shared.items()}
    corrupt(params)
    assert needle in validate_update(params, 10, expected_spec(shared), 1e9)
    agg = aggregator(config)
    agg.accept_model(update(params, weight=1000))
    agg.accept_model(update({k: np.full_like(v, 2.0) for k, v in shared.items()}, weight=5, site="site-2"))
    assert all(np.allclose(v, 2.0) for v in agg.aggregate_model().params.values())


@pytest.mark.parametrize("weight", [0, -5, float("nan"), 1e12, None, "many", True])
def test_bad_sample_weights_are_rejected(shared, weight):
    assert "weight" in validate_update(dict(shared), weight, expected_spec(shared), 1e9)


def test_round_with_no_accepted_update_keeps_the_global_model(config, shared):
    agg = aggregator(config)
    agg.accept_model(update({"head.weight": np.zeros(3, np.float32)}))
    result = agg.aggregate_model()
    assert result.params_type == ParamsType.DIFF and result.params == {}


def test_diff_updates_are_averaged_into_a_diff_and_a_round_never_mixes_diff_and_full(config):
    agg = aggregator(config)
    expected = agg.expected
    ones = {k: np.ones(shape, np.float32) for k, (shape, _) in expected.items()}
    for site, weight, scale in (("site-1", 1, 1.0), ("site-2", 3, 5.0)):
        model = update({k: v * scale for k, v in ones.items()}, weight=weight, site=site)
        model.params_type = ParamsType.DIFF
        agg.accept_model(model)
    agg.accept_model(update(ones, weight=1, site="site-3"))  # FULL, in a DIFF round: rejected
    result = agg.aggregate_model()
    assert result.params_type == ParamsType.DIFF
    assert all(np.allclose(v, (1 * 1.0 + 3 * 5.0) / 4) and v.dtype == np.float32 for v in result.params.values())


def test_a_site_reporting_a_billion_images_is_rejected_not_averaged(config, shared):
    agg = aggregator(config, max_site_weight=1e6)
    agg.accept_model(update({k: np.full_like(v, 100.0) for k, v in shared.items()}, weight=1e9, site="greedy"))
    agg.accept_model(update({k: np.full_like(v, 2.0) for k, v in shared.items()}, weight=40, site="site-2"))
    result = agg.aggregate_model()
    assert all(np.allclose(v, 2.0) for v in result.params.values())  # the outlier did not move the global model
    assert agg._accepted == ["site-2"]


def test_equal_weights_ignore_what_sites_report(config, shared):
    agg = aggregator(config, weighting="equal")
    agg.accept_model(update({k: np.full_like(v, 1.0) for k, v in shared.items()}, weight=1e12))
    agg.accept_model(update({k: np.full_like(v, 3.0) for k, v in shared.items()}, weight=None, site="site-2"))
    assert all(np.allclose(v, 2.0) for v in agg.aggregate_model().params.values())


def test_under_dp_the_server_weights_sites_equally_by_default():
    dp = tiny_config().model_copy(deep=True)
    dp.privacy.noise_multiplier = 1.0
    assert dp.federation.weighting(dp.privacy.enabled) == "equal"
    assert tiny_config().federation.weighting(False) == "samples"
