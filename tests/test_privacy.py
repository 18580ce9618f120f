"""Privacy, without a simulator: the DP mechanism against its definition, epsilon against independent references, the
site allow-list on every method's real tensors through the real aggregator, the quantizer filters, checkpoints."""

import json
import math

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel, ParamsType
from opacus.accountants import create_accountant
from scipy.optimize import brentq
from scipy.stats import norm

from fedopal.model.adapters import build_model
from fedopal.server.aggregator import UPDATES_LOG
from fedopal.config import ConfigError, config_from_dict, job_dict
from fedopal.policy.filters import TensorGroupFilter
from fedopal.tools.job import ResumeError, checkpoint_round, update_noise
from fedopal.specs.methods import METHODS, get_method
from fedopal.policy.privacy import (DP_META_KEY, DPUpdateFilter, PrivacyError, accountant_epsilon, clip_and_noise,
                             update_epsilon, update_noise_for_epsilon)
from fedopal.transfer import ServerDequantizer, SiteQuantizer

from conftest import server_side, tiny_config

DELTA = 1e-5


def gaussian_mechanism_epsilon(mu: float, delta: float) -> float:
    """Independent reference, float64: mu-GDP (T Gaussian mechanisms of noise multiplier z compose to mu = sqrt(T)/z)
    is (eps, delta)-DP for delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth & Su 2022,
    Cor. 2.13; Balle & Wang 2018, Thm. 8). Solved for eps by bisection."""
    return brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 200)


# -- epsilon ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma,rounds", [(1.0, 5), (2.0, 5), (4.0, 10), (8.0, 3)])
def test_update_epsilon_matches_the_closed_form_of_composed_gaussians(sigma, rounds):
    # sensitivity 2C, noise sigma*C: noise multiplier sigma/2 per round, sample rate 1
    exact = gaussian_mechanism_epsilon(math.sqrt(rounds) / (sigma / 2), DELTA)
    prv = update_epsilon(sigma, rounds, DELTA, "prv")
    rdp = update_epsilon(sigma, rounds, DELTA, "rdp")
    assert prv == pytest.approx(exact, rel=0.01) and prv >= exact - 1e-6  # PRV: tight, an upper bound
    assert rdp >= exact  # RDP: a valid, looser upper bound


def test_epsilon_is_the_libraries_own_number_grows_with_rounds_and_falls_with_noise():
    for accountant in ("prv", "rdp"):
        acc = create_accountant(mechanism=accountant)
        for _ in range(7):
            acc.step(noise_multiplier=1.5, sample_rate=1.0)
        assert update_epsilon(3.0, 7, DELTA, accountant) == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-9)
        by_rounds = [update_epsilon(3.0, t, DELTA, accountant) for t in (1, 2, 5, 10, 20)]
        by_noise = [update_epsilon(s, 5, DELTA, accountant) for s in (1.0, 2.0, 4.0, 8.0)]
        assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 5
        assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    assert update_epsilon(0.0, 3, DELTA) == math.inf and update_epsilon(2.0, 0, DELTA) == 0.0


def test_dpsgd_epsilon_is_opacus_subsampled_accounting():
    acc = create_accountant(mechanism="rdp")
    for _ in range(65):
        acc.step(noise_multiplier=1.1, sample_rate=0.08)
    assert accountant_epsilon(1.1, 0.08, 65, DELTA, "rdp") == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-9)
    # subsampling amplifies: the same noise over the same steps costs less at q = 0.08 than at q = 1
    assert accountant_epsilon(1.1, 0.08, 65, DELTA) < accountant_epsilon(1.1, 1.0, 65, DELTA) / 5


@pytest.mark.parametrize("target", [1.0, 4.0, 16.0])
def test_calibrated_noise_reaches_the_target_epsilon(target):
    sigma = update_noise_for_epsilon(target, 5, DELTA)
    assert update_epsilon(sigma, 5, DELTA) <= target and update_epsilon(sigma * 0.97, 5, DELTA) > target - 0.05


# -- the mechanism ------------------------------------------------------------------------------------------------

def test_an_update_is_clipped_to_the_clip_norm_over_all_tensors_together():
    rng = np.random.default_rng(0)
    update = {"a": rng.normal(size=(8, 3)).astype(np.float32), "b": torch.randn(5, dtype=torch.float32)}
    released, norm_before = clip_and_noise(update, clip_norm=0.5, noise_multiplier=0.0, rng=rng)
    flat = np.concatenate([np.ravel(update["a"]), update["b"].numpy()]).astype(np.float64)
    assert norm_before == pytest.approx(np.linalg.norm(flat))
    out = np.concatenate([np.ravel(released["a"]), released["b"].numpy()]).astype(np.float64)
    assert np.linalg.norm(out) == pytest.approx(0.5, rel=1e-6)
    assert np.allclose(out, flat * 0.5 / np.linalg.norm(flat), atol=1e-6)  # direction kept
    assert released["a"].dtype == np.float32 and isinstance(released["b"], torch.Tensor)
    small = {"a": np.full(4, 0.01, np.float32)}
    assert np.array_equal(clip_and_noise(small, 1.0, 0.0, rng)[0]["a"], small["a"])  # inside the ball: unchanged


def test_noise_has_the_promised_standard_deviation_and_mean():
    clip, sigma = 0.5, 3.0
    update = {"w": np.zeros((200, 250), np.float32)}  # 50,000 draws of the noise alone
    released, _ = clip_and_noise(update, clip, sigma, np.random.default_rng())
    noise = released["w"].astype(np.float64).ravel()
    expected = sigma * clip
    # the sample sd of n Gaussians has sd expected / sqrt(2n): 0.6 % here, so 3 % is a 5-sigma bound
    assert noise.std() == pytest.approx(expected, rel=0.03)
    assert abs(noise.mean()) < 5 * expected / math.sqrt(noise.size)
    assert abs(float(np.mean(noise ** 3))) / expected ** 3 < 0.1  # symmetric


def test_the_filter_refuses_full_weights_and_integer_tensors():
    dp = DPUpdateFilter(clip_norm=1.0, noise_multiplier=1.0)
    weights = DXO(DataKind.WEIGHTS, data={"w": np.ones(3, np.float32)}).to_shareable()
    with pytest.raises(PrivacyError, match="refuses to release full weights"):  # FLARE then fails the task
        dp.process(weights, FLContext())
    with pytest.raises(PrivacyError):
        clip_and_noise({"n": np.array([3], np.int64)}, 1.0, 1.0, np.random.default_rng())
    with pytest.raises(PrivacyError):
        DPUpdateFilter(clip_norm=0.0, noise_multiplier=1.0)


def test_the_filter_accounts_every_release_and_records_only_settings_and_epsilon():
    dp = DPUpdateFilter(clip_norm=1.0, noise_multiplier=2.0, delta=DELTA)
    for release in (1, 2, 3):
        diff = DXO(DataKind.WEIGHT_DIFF, data={"w": np.full(10, 5.0, np.float32)}).to_shareable()
        diff.set_header("current_round", release - 1)
        out = from_shareable(dp.process(diff, FLContext()))
        (record,) = out.get_meta_prop(DP_META_KEY)
        assert record["releases"] == release
        assert record["epsilon"] == pytest.approx(update_epsilon(2.0, release, DELTA), rel=1e-9)
        # nothing computed from the data leaves un-noised: not the update's norm, not whether it was clipped
        assert set(record) == {"mode", "source", "epsilon", "delta", "noise_multiplier", "clip_norm", "releases",
                               "accountant", "unit"}


def test_a_resumed_job_counts_the_releases_of_the_rounds_before_it():
    """2 rounds, then --resume to 3: the new job's filter starts at 0 releases, but the round header says 2 rounds
    came before; epsilon after round 3 is that of 3 releases, as the closed form for 3 Gaussian mechanisms says."""
    first_job, resumed = DPUpdateFilter(1.0, 2.0, DELTA), DPUpdateFilter(1.0, 2.0, DELTA)
    for round_num, dp in ((0, first_job), (1, first_job), (2, resumed)):
        diff = DXO(DataKind.WEIGHT_DIFF, data={"w": np.full(10, 5.0, np.float32)}).to_shareable()
        diff.set_header("current_round", round_num)
        (record,) = from_shareable(dp.process(diff, FLContext())).get_meta_prop(DP_META_KEY)
    assert record["releases"] == 3
    assert record["epsilon"] == pytest.approx(gaussian_mechanism_epsilon(math.sqrt(3) / (2.0 / 2), DELTA), rel=0.01)


# -- the site policy on every method ---------------------------------------------------------------------------------

class _Ctx(FLContext):
    def __init__(self, app_root):
        super().__init__()
        self.set_prop(FLContextKey.APP_ROOT, app_root, private=True, sticky=False)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "late_join"])
def test_a_site_policy_allowing_only_the_global_adapter_is_all_the_server_gets(method, tmp_path):
    """Every method's real outgoing tensors (its update plus, as a leaking script would, everything it keeps) go
    through the site's allow-list as FLARE runs it, then to the real aggregator: its log is what the server got."""
    cfg = tiny_config(method=method)
    raw = job_dict(cfg)
    raw["model"]["head"] = "personal"
    cfg = config_from_dict(raw)
    spec = get_method(method, cfg.model.head)
    model = build_model(cfg, spec, site_name="site-1")
    outgoing = {**{k: v.numpy() for k, v in model.shared_state().items()},
                **{k: v.numpy() for k, v in model.site_state().items()}}
    policy = TensorGroupFilter(allow=["global.A", "global.B"])
    shareable = DXO(DataKind.WEIGHT_DIFF, data=outgoing).to_shareable()
    sent = from_shareable(policy.process(shareable, FLContext())).data

    _, aggregator = server_side(cfg)
    aggregator.fl_ctx = _Ctx(str(tmp_path))
    aggregator.accept_model(FLModel(params=sent, params_type=ParamsType.DIFF,
                                    meta={"client_name": "site-1", FLMetaKey.NUM_STEPS_CURRENT_ROUND: 10}))
    (received,) = [json.loads(line) for line in open(tmp_path / UPDATES_LOG)]
    groups = {TensorGroupFilter(["head"]).group_of(k) for k in received["keys"]}
    assert groups <= {"global.A", "global.B"}
    global_keys = {k for k in outgoing if ".lora_A.global." in k or ".lora_B.global." in k}
    assert set(received["keys"]) == global_keys  # everything of the global adapter the site had, nothing else
    # the aggregator takes it where the job shares exactly what the site allows: it rejects an update missing the
    # head (fedavg_lora, ffa_lora share it) or the backbone (full_ft), or holding FedSA's B (allowed by this site,
    # never shared by the job), and keeps the global model as it was for those
    assert received["accepted"] == (method in {"local", "dual_lora", "fedopal_w", "fedopal_r", "fedopal_p", "feddpa"})


def test_an_unknown_group_in_a_site_policy_stops_the_filter():
    with pytest.raises(ValueError, match="unknown tensor group"):
        TensorGroupFilter(allow=["global.a"])


# -- config ---------------------------------------------------------------------------------------------------------

def test_privacy_config_errors_are_one_line_with_a_fix():
    raw = job_dict(tiny_config())
    cases = [({"privacy": {"mode": "dpsgd", "noise_multiplier": 1.0}, "train": {"class_weights": "balanced"}},
              "train.class_weights"),
             ({"privacy": {"noise_multiplier": 1.0, "target_epsilon": 4.0}}, "both set"),
             ({"train": {"method": "full_ft"}, "privacy": {"noise_multiplier": 1.0}}, "full_ft"),
             ({"federation": {"transfer_dtype": "float16"}}, "federation.quantization")]
    for change, fragment in cases:
        bad = json.loads(json.dumps(raw))
        for section, values in change.items():
            bad[section].update(values)
        with pytest.raises(ConfigError, match=fragment) as err:
            config_from_dict(bad, "x.yaml")
        assert "\n" not in str(err.value) and "x.yaml" in str(err.value)


def test_the_job_calibrates_update_noise_from_the_target_epsilon():
    raw = job_dict(tiny_config())
    raw["privacy"] = {"target_epsilon": 4.0}
    cfg = config_from_dict(raw)
    sigma = update_noise(cfg)
    assert update_epsilon(sigma, cfg.train.num_rounds, cfg.privacy.delta) == pytest.approx(4.0, abs=0.05)


# -- NVFlare's quantizer filters ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,max_rel_err,max_ratio", [("float16", 1e-3, 0.51), ("blockwise8", 0.02, 0.27),
                                                        ("normfloat4", 0.2, 0.16)])
def test_quantized_updates_come_back_float32_with_fewer_bytes(mode, max_rel_err, max_ratio):
    rng = np.random.default_rng(0)
    data = {f"t{i}": (rng.normal(size=(64, 512)) * 0.01).astype(np.float32) for i in range(3)}
    raw_bytes = sum(v.nbytes for v in data.values())
    shareable = DXO(DataKind.WEIGHT_DIFF, data={k: v.copy() for k, v in data.items()}).to_shareable()
    shareable = SiteQuantizer(quantization_type=mode).process(shareable, FLContext())
    on_wire = from_shareable(shareable)
    assert on_wire.get_meta_prop("quantized_flag")
    back = from_shareable(ServerDequantizer().process(shareable, FLContext()))
    wire = back.get_meta_prop("fedopal_wire_bytes")
    assert wire <= max_ratio * raw_bytes
    for k, v in data.items():
        out = np.asarray(back.data[k])
        assert out.dtype == np.float32 and out.shape == v.shape
        assert np.abs(out - v).max() <= max_rel_err * np.abs(v).max()


# -- checkpoints from a path the user gives ------------------------------------------------------------------------

class _Payload:  # any object torch can only restore through pickle
    pass


def test_a_checkpoint_that_needs_pickle_is_refused(tmp_path):
    bad = tmp_path / "FL_global_model.pt"
    torch.save({"model": {}, "meta_props": {"current_round": 1}, "extra": _Payload()}, bad)
    with pytest.raises(ResumeError, match="only pickle can load") as err:
        checkpoint_round(str(bad), 5)
    assert "\n" not in str(err.value)
    good = tmp_path / "ok.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "meta_props": {"current_round": 1}}, good)
    assert checkpoint_round(str(good), 5) == 1


def test_dpsgd_runs_peft_unfused_path_that_opacus_hooks_see():
    raw = job_dict(tiny_config())
    raw["privacy"] = {"mode": "dpsgd", "noise_multiplier": 1.0}
    assert config_from_dict(raw).model.fused_adapters is False
    raw["privacy"] = {"mode": "update", "noise_multiplier": 1.0}
    assert config_from_dict(raw).model.fused_adapters is True
def test_the_epsilon_command_answers_before_anything_runs(capsys):
    from fedopal.policy.privacy import main

    assert main(["--rounds", "5", "--noise-multiplier", "2"]) == 0
    assert f"epsilon {update_epsilon(2.0, 5, DELTA):.4f}" in capsys.readouterr().out
    assert main(["--rounds", "5", "--target-epsilon", "4", "--sample-rate", "0.08", "--steps-per-round", "13"]) == 0
    sigma = float(capsys.readouterr().out.split()[2])
    assert accountant_epsilon(sigma, 0.08, 65, DELTA) <= 4.0 < accountant_epsilon(sigma * 0.95, 0.08, 65, DELTA)


def test_a_dp_headline_never_picks_a_round_before_the_first_noised_update():
    from fedopal.site.selection import first_eligible_round, site_row

    raw = job_dict(tiny_config())
    raw["privacy"] = {"mode": "update", "noise_multiplier": 1.0}
    dp = config_from_dict(raw)
    assert first_eligible_round(dp) == 2 and first_eligible_round(tiny_config()) == 1  # rounds from 1
    records = [{"round": r, "personalized/val/balanced_accuracy": v, "personalized/test/balanced_accuracy": t,
                "personalized/test/accuracy": t, "personalized/test/auc": t, "bytes_sent": 1, "trainable_params": 1}
               for r, v, t in ((1, 0.85, 0.848), (2, 0.55, 0.51), (3, 0.60, 0.50))]
    assert site_row("site-1", records)["bacc_personalized"] == 0.848  # without the rule: round 1, before any noise
    row = site_row("site-1", records, first_eligible_round(dp))
    assert row["best_val_round"] == 3 and row["bacc_personalized"] == 0.50
