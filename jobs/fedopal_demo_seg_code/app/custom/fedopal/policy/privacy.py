"""Differential privacy on what a site releases: clip + Gaussian noise on the shared update, and its accounting.

This module has one role: the site-level DP mechanism of `privacy.mode: update` and the privacy accountant that both
modes use. It is part of the site's policy package (fedopal.policy: nvflare, numpy, fedopal.specs and, lazily,
Opacus's maintained accountants), so that a hospital's own `local/privacy.json` can name
`fedopal.policy.privacy.DPUpdateFilter` from the runtime it installed. FLARE runs a site's filters before the job's,
so the site's own clip and noise apply whatever the job says.

The mechanism (per round, per site): the update is what the site sends, the difference between its shared tensors
after local training and those it received (a WEIGHT_DIFF; `client.py` sends DIFFs). With the L2 norm taken over
every tensor of the update at once,

    released = update * min(1, C / ||update||_2) + N(0, (sigma * C)^2 I)

(C = `clip_norm`, sigma = `noise_multiplier`): the Gaussian mechanism (Dwork & Roth 2014, Thm. A.1) on the clipped
update, as in DP-FedAvg (McMahan et al., ICLR 2018), but applied by each site to its own update (the server is
not trusted to add the noise).

Neighbouring relation and sensitivity: two datasets of the site that differ in one patient's record (replaced), or in
any number of records up to the whole site, give clipped updates in the same ball of radius C, so they differ by at
most 2C in L2 norm: the sensitivity is 2C whatever changed. The noise multiplier relative to that sensitivity is
sigma / 2, and T rounds compose T such Gaussian mechanisms (sample rate 1: a site trains and sends every round).
The guarantee therefore covers the site's whole training set, not just one record, and it holds whatever happens
inside the site: the personal adapter, trained without noise on the same data, only changes which update is
computed, never the bound on it. (DP-SGD on the global adapter alone would *not* give a guarantee here: the personal
adapter, trained without noise on the same data, shapes every later gradient of the global one. `privacy.mode:
dpsgd` therefore runs DP-SGD over every trained tensor; see dpsgd.py.)

Accounting: Opacus's accountants (PRV by default, Gopi et al., NeurIPS 2021; RDP, Mironov 2017). For sample rate 1
the exact answer is known in closed form (T Gaussian mechanisms of noise multiplier z compose to one of z / sqrt(T),
i.e. mu-GDP with mu = sqrt(T) / z; Dong, Roth & Su 2022, Cor. 2.13), which the tests use as the independent
reference.

Noise is drawn from numpy's PCG64 seeded from OS entropy (never from the job's seed, which the server knows). The
floating-point side channels of Gaussian sampling (Mironov, CCS 2012) are not mitigated.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedopal.specs.contract import DP_META_KEY

ACCOUNTANTS = ("prv", "rdp")


class PrivacyError(ValueError):
    """A privacy setting or a release that cannot be honoured; the message says why and what to do."""


# -- accounting -------------------------------------------------------------------------------------------------

def accountant_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                       accountant: str = "prv") -> float:
    """epsilon at `delta` after `steps` compositions of the (Poisson-subsampled) Gaussian mechanism.

    noise_multiplier: noise std / sensitivity (> 0); sample_rate in (0, 1]; steps >= 0. Returns math.inf for no
    noise and 0.0 for no steps. The number is Opacus's own (`opacus.accountants`, PRV or RDP), as its
    `get_epsilon(delta)` computes it. Raises PrivacyError for an unknown accountant."""
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {accountant!r}; allowed: {', '.join(ACCOUNTANTS)}")
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")  # PRV at sample rate 1 takes log(0) on a branch it then discards
        return float(acc.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv") -> float:
    """The smallest noise multiplier (std / sensitivity) whose `steps` compositions stay within target_epsilon at
    delta: Opacus's `get_noise_multiplier` (a bisection on the accountant's epsilon, tolerance 0.01)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=accountant))


# update mode: the sensitivity of the clipped update is 2C (module docstring), so noise sigma * C is a Gaussian
# mechanism of noise multiplier sigma / 2, once per round, sample rate 1.
UPDATE_SENSITIVITY_IN_CLIP_NORMS = 2.0


def update_epsilon(noise_multiplier: float, rounds: int, delta: float, accountant: str = "prv") -> float:
    """epsilon of `rounds` releases of a clipped update (clip C, noise std noise_multiplier * C) at delta."""
    return accountant_epsilon(noise_multiplier / UPDATE_SENSITIVITY_IN_CLIP_NORMS, 1.0, rounds, delta, accountant)


def update_noise_for_epsilon(target_epsilon: float, rounds: int, delta: float, accountant: str = "prv") -> float:
    """The update-mode noise multiplier (std in clip norms) that reaches target_epsilon after `rounds` releases."""
    return UPDATE_SENSITIVITY_IN_CLIP_NORMS * calibrate_noise(target_epsilon, delta, 1.0, rounds, accountant)


# -- the mechanism ----------------------------------------------------------------------------------------------

def _as_float64(value) -> np.ndarray:
    arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    if not np.issubdtype(arr.dtype, np.floating):
        raise PrivacyError(f"cannot add noise to a {arr.dtype} tensor (DP covers floating-point updates only)")
    return arr.astype(np.float64)


def _like(original, values: np.ndarray):
    """values in the original's container (numpy array or torch tensor) and dtype."""
    if hasattr(original, "detach"):
        import torch

        return torch.from_numpy(values.astype(original.detach().cpu().numpy().dtype))
    return values.astype(np.asarray(original).dtype)


def clip_and_noise(update: dict[str, Any], clip_norm: float, noise_multiplier: float,
                   rng: np.random.Generator) -> tuple[dict[str, Any], float]:
    """The Gaussian mechanism on a clipped update: returns (released update, the update's L2 norm before clipping).

    update: key -> array/tensor (floating point; any shapes); the norm is over all of them together, in float64.
    Each released value is update * min(1, clip_norm / norm) + N(0, (noise_multiplier * clip_norm)^2), cast back to
    the input's dtype and container. Raises PrivacyError for a non-floating tensor or clip_norm <= 0."""
    if clip_norm <= 0:
        raise PrivacyError(f"clip_norm must be > 0, got {clip_norm}")
    arrays = {k: _as_float64(v) for k, v in update.items()}
    norm = math.sqrt(sum(float(np.sum(a * a)) for a in arrays.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip_norm
    released = {}
    for k, a in arrays.items():
        noised = a * scale + (rng.normal(0.0, std, size=a.shape) if std > 0 else 0.0)
        released[k] = _like(update[k], np.asarray(noised))
    return released, norm


class DPUpdateFilter(DXOFilter):
    """NVFlare result filter: clip + Gaussian noise on a site's update (WEIGHT_DIFF), with per-round accounting.

    Args (stored under the same names: FLARE's job export reads them back):
        clip_norm: C, the L2 bound of the whole update (> 0).
        noise_multiplier: sigma, the noise std in units of C (>= 0; 0 clips only and reports epsilon = inf).
        delta: the delta epsilon is reported at.
        accountant: "prv" or "rdp" (Opacus).
        source: who asked for it, for the log ("job" or "site policy").

    Full weights (WEIGHTS) are refused (PrivacyError, so FLARE fails the task and nothing leaves): noise calibrated
    to an update cannot protect absolute weights. Every release adds one round to this filter's accountant (one per
    job: FLARE builds a job's filters when the job starts), logs one line to the site log, sends `privacy/epsilon`
    to the job's experiment tracking (TensorBoard), and records what it did in the result's meta (DP_META_KEY),
    which the server's aggregator writes to fedopal_updates.jsonl."""

    def __init__(self, clip_norm: float, noise_multiplier: float, delta: float = 1e-5, accountant: str = "prv",
                 source: str = "job"):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF],
                         data_kinds_to_filter=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF])
        if clip_norm <= 0 or noise_multiplier < 0 or not 0 < delta < 1 or accountant not in ACCOUNTANTS:
            raise PrivacyError(f"DPUpdateFilter: need clip_norm > 0, noise_multiplier >= 0, 0 < delta < 1 and "
                               f"accountant in {ACCOUNTANTS}; got {clip_norm}, {noise_multiplier}, {delta}, "
                               f"{accountant!r}. Fix the filter's args (privacy.json or the job config).")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.accountant = accountant
        self.source = source
        self.releases = 0
        self._rng = np.random.default_rng()  # OS entropy: the server must not be able to replay the noise

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise PrivacyError(f"differential privacy ({self.source}) refuses to release full weights ({dxo.data_kind}): "
                               "noise is calibrated to an update. Fix: run a FedOPAL job (its site script sends "
                               "updates as WEIGHT_DIFF).")
        released, norm = clip_and_noise(dxo.data, self.clip_norm, self.noise_multiplier, self._rng)
        # Releases so far: this job's own count, but never fewer than the round says (a resumed job's filter starts
        # at 0; rounds 0..current were all released by this site). Over-counting a round a site missed only
        # over-reports epsilon; under-reporting is what must not happen.
        current_round = shareable.get_header("current_round")
        self.releases = max(self.releases + 1, (current_round + 1) if isinstance(current_round, int) else 0)
        eps = update_epsilon(self.noise_multiplier, self.releases, self.delta, self.accountant)
        # settings and epsilon only: the update's norm is computed from the data and not noised, so it stays in the
        # site's own log
        record = {"mode": "update", "source": self.source, "epsilon": eps, "delta": self.delta,
                  "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                  "releases": self.releases, "accountant": self.accountant, "unit": "site"}
        dxo.data = released
        previous = dxo.get_meta_prop(DP_META_KEY)
        # a site policy and the job may both noise: each record stands alone (later noise is post-processing)
        dxo.set_meta_prop(DP_META_KEY, (previous or []) + [record])
        self.log_info(fl_ctx, f"differential privacy ({self.source}): update norm {norm:.4g} clipped to "
                              f"{min(norm, self.clip_norm):.4g}, Gaussian noise std {self.noise_multiplier * self.clip_norm:.4g}; "
                              f"epsilon {eps:.3f} at delta {self.delta:g} after {self.releases} released round(s)")
        self._track(fl_ctx, eps)
        return dxo

    def _track(self, fl_ctx: FLContext, eps: float) -> None:
        """privacy/epsilon to the job's experiment tracking (the server's TensorBoard receiver, tb_events/<site>)."""
        if not math.isfinite(eps):
            return
        from nvflare.apis.analytix import AnalyticsDataType, LogWriterName
        from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo

        tag = "privacy/epsilon" if self.source == "job" else "privacy/epsilon_site_policy"
        analytic = create_analytic_dxo(tag=tag, value=eps, data_type=AnalyticsDataType.SCALAR,
                                       writer=LogWriterName.TORCH_TB, global_step=self.releases)  # the round, from 1
        send_analytic_dxo(self, dxo=analytic, fl_ctx=fl_ctx)


def update_signal_to_noise(noise_multiplier: float, num_params: int, num_sites: int) -> float:
    """Expected signal-to-noise ratio of the averaged update in update mode: an update's norm is at most C, the noise
    of the mean over K sites has norm about sigma C sqrt(d) / sqrt(K) (d parameters), so SNR = sqrt(K) / (sigma
    sqrt(d)). Below 1, the averaged update is mostly noise."""
    if noise_multiplier <= 0:
        return math.inf
    return math.sqrt(num_sites) / (noise_multiplier * math.sqrt(max(num_params, 1)))


def epsilon_of_records(records: list[dict] | None) -> float | None:
    """The epsilon a released update carries: the smallest over the mechanisms applied to it (each alone is a valid
    bound, later ones being post-processing of earlier ones); None if none was applied."""
    eps = [r["epsilon"] for r in records or [] if isinstance(r, dict) and "epsilon" in r]
    return min(eps) if eps else None


def main(argv=None) -> int:
    """`fedopal privacy`: epsilon for a site's settings, or the noise for a target epsilon (update mode;
    with --sample-rate and --steps-per-round, DP-SGD). For an ethics board's question before anything runs."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, required=True, help="rounds the site will train and send")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--noise-multiplier", type=float, help="sigma (noise std in clip norms): print epsilon")
    group.add_argument("--target-epsilon", type=float, help="print the noise multiplier that reaches it")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="prv")
    p.add_argument("--sample-rate", type=float, help="DP-SGD: batch size / training records")
    p.add_argument("--steps-per-round", type=int, help="DP-SGD: optimizer steps per round")
    args = p.parse_args(argv)
    dpsgd = args.sample_rate is not None
    if dpsgd != (args.steps_per_round is not None):
        p.error("DP-SGD needs both --sample-rate and --steps-per-round")
    steps = args.rounds * (args.steps_per_round or 1)
    mode = f"dpsgd, sample rate {args.sample_rate:g}, {steps} steps" if dpsgd else f"update, {args.rounds} releases"
    if args.noise_multiplier is not None:
        eps = (accountant_epsilon(args.noise_multiplier, args.sample_rate, steps, args.delta, args.accountant) if dpsgd
               else update_epsilon(args.noise_multiplier, args.rounds, args.delta, args.accountant))
        print(f"epsilon {eps:.4f} at delta {args.delta:g} ({mode}, noise multiplier {args.noise_multiplier:g}, "
              f"{args.accountant.upper()})")
    else:
        sigma = (calibrate_noise(args.target_epsilon, args.delta, args.sample_rate, steps, args.accountant) if dpsgd
                 else update_noise_for_epsilon(args.target_epsilon, args.rounds, args.delta, args.accountant))
        print(f"noise multiplier {sigma:.4f} reaches epsilon {args.target_epsilon:g} at delta {args.delta:g} "
              f"({mode}, {args.accountant.upper()})")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
