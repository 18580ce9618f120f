"""The benchmark: every method, the same federation, seeds and tuning budget, through the FLARE simulator.

    fedopal bench --config app_configs/bench.yaml [--quick]

1. Tuning: every method gets the same learning-rate grid (bench.lr_grid) on the first seed; the lr with the
   best mean over sites of the best *validation* headline metric wins (test is never looked at). The headline is the
   task's (config HEADLINE): balanced accuracy for classification, mean foreground Dice for segmentation; every
   table, plot and paired interval below is in it.
2. Main table: every method at its chosen lr, on every seed.
3. Studies: lambda, head shared/personal, LoRA rank and transfer quantization (NVFlare's ModelQuantizer) for the
   FedOPAL variants, on every seed.
4. The privacy study (bench.privacy): each listed method without DP and at each target epsilon in each privacy
   mode (update: clip + noise of the released update; dpsgd: DP-SGD over every trained tensor), accuracy against
   epsilon. `--only privacy` (or `--only quantization`) runs that study alone, with the learning rates of
   <out>/chosen.json.

Each run is the production job (client, filter, aggregator, persistor) in the simulator. A finished run is
cached in <out>/runs/<run id>.json, so an interrupted benchmark resumes where it stopped.
Writes summary.csv, summary.md, studies.md and PNG plots to bench.out_dir (segmentation: also a per-site table, and
the paired differences on the sites whose masks follow another contouring convention, federation.json contour_px).
A difference between two methods is called real when its 95 % paired bootstrap interval over sites x seeds excludes
0 (paired_bootstrap).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import fedopal
from fedopal.config import HEADLINE, ConfigError, FedOpalConfig, load_config, parse_overrides
from fedopal.site.device import DeviceError, check_precision, resolve_device
from fedopal.specs.methods import get_method
from fedopal.site.selection import best_round
from fedopal.site.state import simulation_state_root
from fedopal.tools.report import collect_site_records, covered_mean, site_epsilons, updates_log

EVALS = ("personalized", "global_only")
FEDOPAL = ("fedopal_w", "fedopal_r", "fedopal_p")
CI_METRICS = ("balanced_accuracy", "auc")
DIAGNOSTICS = ("overlap_A", "overlap_B", "overlap_u", "random_A", "random_B", "random_u")
# the headline metric (config HEADLINE, per task): its column label and its name in prose
LABEL = {"balanced_accuracy": "bal. acc.", "dice": "Dice"}
NAME = {"balanced_accuracy": "balanced accuracy", "dice": "Dice"}


def run_metric(result: dict) -> str:
    """The headline metric a run's sites wrote (classification: balanced_accuracy, segmentation: dice), read from
    its records; balanced_accuracy where none is there (a run whose sites measured nothing)."""
    for records in result["sites"].values():
        for record in records:
            for metric in HEADLINE.values():
                if f"personalized/val/{metric}" in record:
                    return metric
    return HEADLINE["classification"]


def _metric(results, metric: str | None) -> str:
    """`metric`, else the one the first of these runs wrote."""
    if metric:
        return metric
    first = next(iter(results), None)
    return run_metric(first) if first is not None else HEADLINE["classification"]


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    lr: float
    orth_lambda: float
    head: str
    lora_rank: int
    quantization: str = "none"
    privacy_mode: str = "none"  # none | update | dpsgd
    target_epsilon: float = 0.0
    clip_norm: float = 1.0
    class_weights: str = ""  # "": the base config's

    @property
    def run_id(self) -> str:
        run = (f"{self.method}-s{self.seed}-lr{self.lr:g}-lam{self.orth_lambda:g}-head{self.head}"
               f"-r{self.lora_rank}")
        if self.quantization != "none":
            run += f"-q{self.quantization}"
        if self.class_weights:
            run += f"-cw{self.class_weights}"
        if self.privacy_mode != "none":
            run += f"-dp{self.privacy_mode}-eps{self.target_epsilon:g}-c{self.clip_norm:g}"
        return run

    def config(self, base: FedOpalConfig) -> FedOpalConfig:
        raw = base.model_dump(mode="json")
        raw["name"] = "bench_" + self.run_id.replace(".", "p")
        raw["train"].update(method=self.method, seed=self.seed, lr=self.lr, orth_lambda=self.orth_lambda)
        raw["model"].update(head=self.head, lora_rank=self.lora_rank)
        raw["federation"]["quantization"] = self.quantization
        if self.class_weights:
            raw["train"]["class_weights"] = self.class_weights
        if self.privacy_mode != "none":
            raw["privacy"] = {**raw.get("privacy", {}), "mode": self.privacy_mode, "noise_multiplier": 0.0,
                              "target_epsilon": self.target_epsilon, "clip_norm": self.clip_norm}
        return FedOpalConfig.model_validate(raw)


def default_spec(base: FedOpalConfig, method: str, seed: int, lr: float, head: str | None = None) -> RunSpec:
    """A run of `method` as the base config says; the head where the method's own design puts it, or `head` (else
    model.head) where the method allows it. The spec names the head actually used, so equal runs share a cache."""
    head = get_method(method, head or base.model.head).head
    return RunSpec(method, seed, lr, base.train.orth_lambda, head, base.model.lora_rank,
                   base.federation.quantization)


# -- one run ---------------------------------------------------------------------------------------------

def received_bytes(job_ws: str) -> dict[str, float]:
    """Mean bytes per round that the server actually received from each site, as they crossed the network
    (quantized, with the quantization state); 0 if it never sent."""
    per_site: dict[str, list[int]] = {}
    for r in updates_log(job_ws):
        per_site.setdefault(r["site"], []).append(r.get("wire_bytes", r["bytes"]))
    return {site: sum(v) / len(v) for site, v in per_site.items()}


def _cpu_seconds() -> float:
    """CPU time of this process and of every finished child (the simulator, its server and site processes)."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_once(base: FedOpalConfig, spec: RunSpec, runs_dir: str, workspace: str, gpus: str | None = None) -> dict:
    from fedopal.tools.job import simulate

    cache = os.path.join(runs_dir, spec.run_id + ".json")
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    cfg = spec.config(base)
    start, cpu_start = time.time(), _cpu_seconds()
    job_ws = simulate(cfg, workspace, gpus=gpus)
    wall = time.time() - start
    result = {"run_id": spec.run_id, "spec": spec.__dict__, "wall_s": round(wall, 1),
              "cpu_s": round(_cpu_seconds() - cpu_start, 1),
              "sites": collect_site_records(job_ws), "bytes_received": received_bytes(job_ws),
              "epsilon": site_epsilons(job_ws)}
    os.makedirs(runs_dir, exist_ok=True)
    tmp = cache + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, cache)
    # the per-run numbers are kept; the checkpoints are not: the job's workspace, and the sites' states beside it
    # (personal state, exports; 60 MB a segmentation run)
    for folder in (job_ws, simulation_state_root(job_ws)):
        shutil.rmtree(folder, ignore_errors=True)
    return result


# -- reading a run ---------------------------------------------------------------------------------------

def site_results(result: dict, view: str, metric: str | None = None) -> list[dict]:
    """Per site: test metrics at the round where that view's validation headline metric (balanced accuracy;
    segmentation: Dice) peaked."""
    metric = metric or run_metric(result)
    if metric != "balanced_accuracy":
        return _segmentation_site_results(result, view, metric)
    rows = []
    for site, records in result["sites"].items():
        key = f"{view}/val/balanced_accuracy"
        if key not in records[0]:
            continue
        best = best_round(records, key) or records[-1]  # no measurable validation round: the final one
        rows.append({
            "site": site, "eval": view, "best_round": best["round"],
            "val_balanced_accuracy": best[key],
            "balanced_accuracy": best[f"{view}/test/balanced_accuracy"],
            "accuracy": best[f"{view}/test/accuracy"], "auc": best[f"{view}/test/auc"],
            # the site's 95 % interval over its test images at that round (site.intervals); "" in runs from before
            # sites wrote them (every cached benchmark run)
            **{f"{m}_ci_{end}": best.get(f"{view}/test/{m}_ci_{end}", "") for m in CI_METRICS
               for end in ("low", "high")},
            "final_balanced_accuracy": records[-1][f"{view}/test/balanced_accuracy"],
            "bytes_per_round": result["bytes_received"].get(site, 0.0),
            "trainable_params": records[-1]["trainable_params"],
            # dual methods: how far apart the adapters are at that round (diagnostics.py); "" for one adapter
            **{k: best.get(k, "") for k in DIAGNOSTICS},
        })
    return rows


def _segmentation_site_results(result: dict, view: str, metric: str) -> list[dict]:
    """site_results of a segmentation run: mean foreground Dice (the headline), HD95 (pixels of the model's grid),
    each class's Dice and the site's 95 % interval of the Dice over its test images, at the round where the view's
    validation Dice peaked (the rule of site.selection.segmentation_row)."""
    rows = []
    for site, records in result["sites"].items():
        key = f"{view}/val/{metric}"
        if key not in records[0]:
            continue
        best = best_round(records, key) or records[-1]
        prefix = f"{view}/test/{metric}/"
        rows.append({
            "site": site, "eval": view, "best_round": best["round"],
            f"val_{metric}": best[key],
            metric: best[f"{view}/test/{metric}"],
            "hd95": best.get(f"{view}/test/hd95", math.nan),
            **{f"{metric}/{k[len(prefix):]}": v for k, v in best.items() if k.startswith(prefix)},
            **{f"{metric}_ci_{end}": best.get(f"{view}/test/{metric}_ci_{end}", "") for end in ("low", "high")},
            f"final_{metric}": records[-1][f"{view}/test/{metric}"],
            "bytes_per_round": result["bytes_received"].get(site, 0.0),
            "trainable_params": records[-1]["trainable_params"],
            **{k: best.get(k, "") for k in DIAGNOSTICS},
        })
    return rows


def validation_score(result: dict, metric: str | None = None) -> float:
    metric = metric or run_metric(result)
    mean, covered = covered_mean([r[f"val_{metric}"] for r in site_results(result, "personalized", metric)])
    return mean if covered else -math.inf


def curve(result: dict, metric: str | None = None) -> list[float]:
    """Site-mean personalized test headline metric (balanced accuracy; segmentation: Dice) per round."""
    metric = metric or run_metric(result)
    per_round: dict[int, list[float]] = {}
    for records in result["sites"].values():
        for r in records:
            per_round.setdefault(r["round"], []).append(r[f"personalized/test/{metric}"])
    return [covered_mean(v)[0] for _, v in sorted(per_round.items())]


def _mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else float("nan")  # one seed: no sd


def aggregate(results: list[dict], view: str = "personalized", metric: str | None = None) -> dict:
    """Over seeds: mean +- sd of the site-mean headline metric (balanced accuracy; segmentation: Dice), and of the
    worst site. "score" (also under its old name "bacc") is that headline."""
    metric = _metric(results, metric)
    per_seed = [site_results(r, view, metric) for r in results]
    per_seed = [rows for rows in per_seed if rows]
    if not per_seed:
        return {}
    # a site whose test split has one class has no balanced accuracy or AUC: means cover the sites that have one,
    # and say how many (the fewest over seeds)
    site_mean = [covered_mean([x[metric] for x in rows])[0] for rows in per_seed]
    worst = [min((x[metric] for x in rows if not math.isnan(x[metric])), default=math.nan)
             for rows in per_seed]
    score = _mean_sd(site_mean)
    out = {
        "score": score, "bacc": score, "worst": _mean_sd(worst),
        "sites": min(covered_mean([x[metric] for x in rows])[1] for rows in per_seed),
        "total_sites": max(len(rows) for rows in per_seed),
        "bytes_per_round": statistics.fmean(x["bytes_per_round"] for rows in per_seed for x in rows),
        "trainable_params": per_seed[0][0]["trainable_params"],
        "wall_s": statistics.fmean(r["wall_s"] for r in results),
        "n_seeds": len(per_seed),
    }
    if metric == "balanced_accuracy":
        out |= {"auc_sites": min(covered_mean([x["auc"] for x in rows])[1] for rows in per_seed),
                "accuracy": _mean_sd([covered_mean([x["accuracy"] for x in rows])[0] for rows in per_seed]),
                "auc": _mean_sd([covered_mean([x["auc"] for x in rows])[0] for rows in per_seed])}
    else:
        out["hd95"] = _mean_sd([covered_mean([x["hd95"] for x in rows])[0] for rows in per_seed])
    return out


# -- paired intervals: is a difference between two methods real? ---------------------------------------------

PAIRED_LEVEL = 0.95
PAIRED_RESAMPLES = 10_000


def paired_resamples(n_sites: int, n_seeds: int, n_resamples: int = PAIRED_RESAMPLES,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(site indices (n_resamples, n_sites), seed indices (n_resamples, n_seeds)): every resample draws as many sites
    as there are, and independently as many seeds, uniformly with replacement (numpy default_rng(seed))."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_sites, (n_resamples, n_sites)), rng.integers(0, n_seeds, (n_resamples, n_seeds))


@dataclass(frozen=True)
class PairedDifference:
    """Method a minus method b: the site-mean difference and its 95 % paired bootstrap interval."""
    diff: float
    low: float
    high: float
    n_sites: int
    n_seeds: int

    @property
    def real(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def text(self) -> str:
        """'+0.021 [+0.004, +0.038], real'; one seed or one site: the difference alone, and why."""
        if math.isnan(self.diff):
            return "n/a"
        if math.isnan(self.low):
            return f"{self.diff:+.3f} (one {'seed' if self.n_seeds < 2 else 'site'}: no interval)"
        return f"{self.diff:+.3f} [{self.low:+.3f}, {self.high:+.3f}]" + (", real" if self.real else "")


def paired_bootstrap(diff: np.ndarray, level: float = PAIRED_LEVEL, n_resamples: int = PAIRED_RESAMPLES,
                     seed: int = 0,
                     resamples: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, float, float]:
    """(difference, low, high): the site-mean difference of two methods and its `level` percentile interval from a
    paired two-way bootstrap over sites x seeds.

    diff[s, k] = y_a[s, k] - y_b[s, k]: the two methods' test balanced accuracy on site s with seed k, S sites and
    K seeds (paired: the same site's test set, the same seed). The statistic is the mean over seeds of the
    site-mean difference,

        theta = 1/(S K) sum_s sum_k diff[s, k]      (NaN cells, a site whose metric is undefined, left out).

    Resample b draws sites s*_1..s*_S and, independently, seeds k*_1..k*_K, uniformly with replacement, and takes
    theta*_b = 1/(S K) sum_i sum_j diff[s*_i, k*_j]: the table's rows and columns are resampled jointly, the same
    draw for both methods (the difference table is what is resampled, so what makes a site's test set easy or
    hard for both methods cancels). The interval is the (1 - level)/2 and (1 + level)/2 percentiles of the
    theta*_b (Efron & Tibshirani, An Introduction to the Bootstrap, 1993, ch. 13, the percentile interval).

    Why both, and jointly: sites and seeds are crossed, not nested. One seed is one federated run that trains every
    site together, so its luck is shared by all sites; one site's test set is shared by every seed. Resampling
    seeds alone would treat these 4 hospitals as the only ones (and 3 seeds give 10 distinct resamples); resampling
    sites alone would leave out the training noise; resampling (site, seed) cells as if independent would leave
    out both shared effects and be too narrow. Drawing rows and columns independently carries both: the two-way
    ("pigeonhole") bootstrap for a crossed table (Owen, The pigeonhole bootstrap, Ann. Appl. Stat. 1(2), 2007;
    the hierarchical bootstrap of Davison & Hinkley, Bootstrap Methods and their Application, 1997, sec. 3.8, is
    its nested counterpart). No bootstrap of a crossed table is exact (McCullagh, Bernoulli 6(2), 2000): this one
    is somewhat wide when the (site, seed) noise dominates and too narrow with few sites and seeds; coverage at
    this benchmark's 4 sites x 3 seeds is measured in tests/test_bench.py (about 90 %, not 95 %; 95 % at 8 x 6).

    resamples: the (site, seed) indices to use (paired_resamples), else drawn with `seed`."""
    diff = np.asarray(diff, dtype=np.float64)
    defined = ~np.isnan(diff)
    estimate = float(diff[defined].mean()) if defined.any() else math.nan
    sites, seeds = resamples if resamples is not None else paired_resamples(*diff.shape, n_resamples, seed)
    cells = sites[:, :, None], seeds[:, None, :]  # resample b's table: diff[sites[b]][:, seeds[b]]
    count = defined[cells].sum(axis=(1, 2))
    total = np.where(defined, diff, 0.0)[cells].sum(axis=(1, 2))
    thetas = (total / np.maximum(count, 1))[count > 0]  # a resample of undefined sites only has no theta
    if not len(thetas):
        return estimate, math.nan, math.nan
    low, high = np.percentile(thetas, (100 * (1 - level) / 2, 100 * (1 + level) / 2))
    return estimate, float(low), float(high)


def paired_difference(a: dict[tuple[str, int], float], b: dict[tuple[str, int], float]) -> PairedDifference:
    """a - b over the (site, seed) cells both have: {(site, seed): headline metric} of two methods."""
    sites = sorted({s for s, _ in a} & {s for s, _ in b})
    seeds = sorted({k for _, k in a} & {k for _, k in b})
    table = np.array([[a.get((s, k), math.nan) - b.get((s, k), math.nan) for k in seeds] for s in sites])
    if len(sites) < 2 or len(seeds) < 2:  # an interval over one seed would leave out the training noise
        estimate = float(np.nanmean(table)) if table.size and not np.isnan(table).all() else math.nan
        return PairedDifference(estimate, math.nan, math.nan, len(sites), len(seeds))
    return PairedDifference(*paired_bootstrap(table), len(sites), len(seeds))


def site_seed_scores(results: list[dict], view: str = "personalized",
                     metric: str | None = None) -> dict[tuple[str, int], float]:
    """{(site, seed): test headline metric at the site's best-validation round} of one method's runs."""
    metric = _metric(results, metric)
    return {(row["site"], r["spec"]["seed"]): row[metric] for r in results
            for row in site_results(r, view, metric)}


def _pm(ms: tuple[float, float], covered: int | None = None, total: int | None = None) -> str:
    text = "n/a" if math.isnan(ms[0]) else f"{ms[0]:.3f}" if math.isnan(ms[1]) else f"{ms[0]:.3f} ± {ms[1]:.3f}"
    return text if covered is None or covered == total else f"{text} ({covered}/{total} sites)"


# -- the benchmark ---------------------------------------------------------------------------------------

@dataclass
class Bench:
    base: FedOpalConfig
    out_dir: str
    workspace: str
    gpus: str | None = None  # the simulator's GPU option (job.simulate)
    cpu_s: dict[str, float] = field(default_factory=dict)  # run id -> CPU seconds it took
    chosen_lr: dict[str, float] = field(default_factory=dict)
    tuning: dict[str, dict[float, float]] = field(default_factory=dict)
    done: int = 0
    started: float = field(default_factory=time.time)

    @property
    def runs_dir(self) -> str:
        return os.path.join(self.out_dir, "runs")

    @property
    def metric(self) -> str:
        """The task's headline metric (config HEADLINE): what tuning selects on and the tables lead with."""
        return HEADLINE[self.base.data.task]

    def run(self, spec: RunSpec, total: int) -> dict:
        self.done += 1
        cached = os.path.isfile(os.path.join(self.runs_dir, spec.run_id + ".json"))
        elapsed = time.time() - self.started
        extra = (f" {spec.quantization}" if spec.quantization != "none" else "") + (
            f" DP {spec.privacy_mode} eps {spec.target_epsilon:g}" if spec.privacy_mode != "none" else "")
        print(f"[{self.done}/{total}] {spec.method:<12} seed {spec.seed}  lr {spec.lr:g}  lambda {spec.orth_lambda:g}"
              f"  head {spec.head}  r {spec.lora_rank}{extra}"
              f"{'  (cached)' if cached else ''}   elapsed {elapsed / 60:.1f} min",
              flush=True)
        return self._kept(run_once(self.base, spec, self.runs_dir, self.workspace, self.gpus))

    def _kept(self, result: dict) -> dict:
        self.cpu_s[result["run_id"]] = result.get("cpu_s", math.nan)  # as measured when the run ran
        return result

    def tuning_specs(self) -> list[RunSpec]:
        b = self.base.bench
        return [default_spec(self.base, m, b.seeds[0], lr) for m in b.methods for lr in b.lr_grid]

    def main_specs(self, lrs: dict[str, float]) -> dict[str, list[RunSpec]]:
        return {m: [default_spec(self.base, m, s, lrs[m]) for s in self.base.bench.seeds]
                for m in self.base.bench.methods if m in lrs}

    def study_specs(self, lrs: dict[str, float]) -> dict[str, list[tuple[str, list[RunSpec]]]]:
        """study name -> [(value label, one run per seed)]; runs equal to main-table runs are reused."""
        st = self.base.bench.studies
        if st is None:
            return {}
        seeds = st.seeds or self.base.bench.seeds
        out: dict[str, list[tuple[str, list[RunSpec]]]] = {}
        for method in dict.fromkeys(st.lambda_methods + st.methods):
            d = default_spec(self.base, method, 0, lrs.get(method, self.base.bench.lr_grid[0]))
            vary = {}
            if method in st.lambda_methods:
                vary["lambda"] = [(f"{v:g}", {"orth_lambda": v}) for v in st.orth_lambda]
            if method in st.methods:
                vary["head"] = [(h, {"head": h}) for h in st.head]
                vary["rank"] = [(str(r), {"lora_rank": r}) for r in st.lora_rank]
                vary["quantization"] = [(q, {"quantization": q}) for q in st.quantization]
            for study, values in vary.items():
                out[f"{method}: {study}"] = [
                    (label, [RunSpec(**{**d.__dict__, "seed": s, **change}) for s in seeds])
                    for label, change in values]
        if st.same_head:  # every method with one head placement, where its design allows it to move
            out[f"same head for all ({st.same_head})"] = [
                (f"{m} ({get_method(m, st.same_head).head})",
                 [default_spec(self.base, m, s, lrs.get(m, self.base.bench.lr_grid[0]), st.same_head) for s in seeds])
                for m in self.base.bench.methods]
        return out

    def privacy_specs(self, lrs: dict[str, float]) -> dict[str, list[tuple[str, float, list[RunSpec]]]]:
        """method -> [(mode, target epsilon (inf: no DP), one run per seed)], every run with the study's class
        weights."""
        ps = self.base.bench.privacy
        if ps is None:
            return {}
        seeds = ps.seeds or self.base.bench.seeds
        out = {}
        for method in ps.methods:
            d = default_spec(self.base, method, 0, lrs.get(method, self.base.bench.lr_grid[0]))
            d = RunSpec(**{**d.__dict__, "class_weights": ps.class_weights})
            rows = [("none", math.inf, [RunSpec(**{**d.__dict__, "seed": s}) for s in seeds])]
            for mode in ps.modes:
                clip = ps.clip_norm_update if mode == "update" else ps.clip_norm_dpsgd
                for eps in ps.target_epsilon:
                    rows.append((mode, eps, [RunSpec(**{**d.__dict__, "seed": s, "privacy_mode": mode,
                                                        "target_epsilon": eps, "clip_norm": clip}) for s in seeds]))
            out[method] = rows
        return out

    def run_privacy_study(self, lrs: dict[str, float], cached_only: bool = False) -> dict:
        """Seed by seed (the first seed's whole grid first), so that an interrupted study has complete seeds.
        cached_only: run nothing, report the runs already finished (a partial study says how many seeds each row has)."""
        specs = self.privacy_specs(lrs)
        if cached_only:
            done = lambda s: os.path.isfile(os.path.join(self.runs_dir, s.run_id + ".json"))  # noqa: E731
            specs = {m: [(mode, eps, [s for s in runs if done(s)]) for mode, eps, runs in rows] for m, rows in
                     specs.items()}
        flat = [s for rows in specs.values() for _, _, runs in rows for s in runs]
        total = len(flat)
        for seed in sorted({s.seed for s in flat}):
            for spec in (s for s in flat if s.seed == seed):
                self.run(spec, total)
        return {m: [(mode, eps, [run_once(self.base, s, self.runs_dir, self.workspace, self.gpus) for s in runs])
                    for mode, eps, runs in rows] for m, rows in specs.items()}

    def planned_total(self) -> int:
        """Distinct runs in the plan. The chosen lrs do not change the count: the first seed's main-table run
        is always one of the tuning runs."""
        lrs = {m: self.base.bench.lr_grid[0] for m in self.base.bench.methods}
        ids = {s.run_id for s in self.tuning_specs()}
        ids |= {s.run_id for runs in self.main_specs(lrs).values() for s in runs}
        ids |= {s.run_id for values in self.study_specs(lrs).values() for _, runs in values for s in runs}
        ids |= {s.run_id for rows in self.privacy_specs(lrs).values() for _, _, runs in rows for s in runs}
        return len(ids)

    def finished(self, spec: RunSpec) -> bool:
        return os.path.isfile(os.path.join(self.runs_dir, spec.run_id + ".json"))

    def execute(self, cached_only: bool = False) -> dict:
        """Tuning, then the main table seed by seed (every method's second seed before any third: an interrupted
        benchmark has complete seeds), then the studies. cached_only: run nothing; report the finished runs (a
        method whose tuning is incomplete is left out, and the tables say how many seeds each row has)."""
        b = self.base.bench
        total = self.planned_total()
        print(f"Benchmark: {len(b.methods)} methods x {len(b.seeds)} seeds, lr grid {b.lr_grid}: "
              f"{total} simulator runs (finished runs in {self.runs_dir} are reused)"
              + ("; --cached-only: nothing is run" if cached_only else ""), flush=True)
        tuning = self.tuning_specs()
        if cached_only:
            incomplete = {s.method for s in tuning if not self.finished(s)}
            if incomplete:
                print(f"left out (tuning runs missing): {', '.join(sorted(incomplete))}", flush=True)
            tuning = [s for s in tuning if s.method not in incomplete]
        for spec in tuning:
            score = validation_score(self.run(spec, total), self.metric)
            self.tuning.setdefault(spec.method, {})[spec.lr] = score
        self.chosen_lr = {m: max(scores, key=scores.get) for m, scores in self.tuning.items()}
        seen: set[str] = set()

        def run(spec: RunSpec) -> dict:
            if spec.run_id in seen or self.finished(spec):
                return self._kept(run_once(self.base, spec, self.runs_dir, self.workspace, self.gpus))
            seen.add(spec.run_id)
            return self.run(spec, total)

        keep = self.finished if cached_only else (lambda spec: True)
        main_specs = {m: [s for s in runs if keep(s)] for m, runs in self.main_specs(self.chosen_lr).items()}
        seed_major = sorted((s for runs in main_specs.values() for s in runs), key=lambda s: s.seed)  # stable sort
        by_id = {s.run_id: run(s) for s in seed_major}
        main = {m: [by_id[s.run_id] for s in runs] for m, runs in main_specs.items()}
        studies = {}
        for name, values in self.study_specs(self.chosen_lr).items():
            rows = [(label, [run(s) for s in runs if keep(s)]) for label, runs in values]
            if rows := [(label, results) for label, results in rows if results]:  # cached_only: rows with runs
                studies[name] = rows
        st = self.base.bench.studies
        if st is not None and 0.0 not in st.orth_lambda and "dual_lora" in main:
            # lambda = 0 is dual_lora: its main-table runs (at its own tuned lr) stand in for that row
            seeds = set(st.seeds or b.seeds)
            zero = [r for r in main["dual_lora"] if r["spec"]["seed"] in seeds]
            for name in studies:
                if name.endswith(": lambda"):
                    studies[name].insert(0, ("0 (dual_lora)", zero))
        privacy = self.run_privacy_study(self.chosen_lr, cached_only)
        return {"main": main, "studies": studies, "privacy": privacy}


# -- writing ---------------------------------------------------------------------------------------------

def _main_metric(main: dict[str, list[dict]], metric: str | None) -> str:
    return _metric((r for results in main.values() for r in results), metric)


def write_csv(main: dict[str, list[dict]], path: str, metric: str | None = None) -> None:
    metric = _main_metric(main, metric)
    rows = [{**row, "method": method, "seed": r["spec"]["seed"], "wall_s": r["wall_s"], "lr": r["spec"]["lr"]}
            for method, results in main.items() for r in results for view in EVALS
            for row in site_results(r, view, metric)]
    if metric == "balanced_accuracy":
        cols = ["method", "seed", "site", "eval", "balanced_accuracy", "accuracy", "auc",
                *(f"{m}_ci_{end}" for m in CI_METRICS for end in ("low", "high")), "best_round",
                "final_balanced_accuracy", "bytes_per_round", "trainable_params", "wall_s", "lr", *DIAGNOSTICS]
    else:  # segmentation: Dice (mean over the foreground classes), HD95, each class's Dice, the site's interval
        per_class = sorted({k for row in rows for k in row if k.startswith(f"{metric}/")})
        cols = ["method", "seed", "site", "eval", metric, "hd95", *per_class,
                *(f"{metric}_ci_{end}" for end in ("low", "high")), "best_round", f"final_{metric}",
                "bytes_per_round", "trainable_params", "wall_s", "lr", *DIAGNOSTICS]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def settings_line(cfg: FedOpalConfig) -> str:
    """What every run of the table shared, and what the benchmark left out (segmentation tables)."""
    b = cfg.bench
    return (f"Settings: {cfg.data.image_size}² pixels, {cfg.train.num_rounds} rounds of {cfg.train.local_epochs} local "
            f"epoch(s), batch {cfg.data.batch_size}, LoRA rank {cfg.model.lora_rank}, "
            f"lambda {cfg.train.orth_lambda:g}; "
            + (f"one learning rate for every method ({b.lr_grid[0]:g}: no tuning)" if len(b.lr_grid) == 1 else
               f"lr grid {b.lr_grid} tuned on the first seed's validation")
            + f"; studies: {'none' if b.studies is None else 'studies.md'}; privacy study: "
            + ("none" if b.privacy is None else "privacy.md") + ".")


def main_markdown(bench: Bench, main: dict[str, list[dict]], title: str) -> str:
    metric = bench.metric
    if metric == "balanced_accuracy":
        lines = [f"## {title}", "",
                 "Mean ± sd over seeds. *bal. acc.*: mean over sites of each site's test balanced accuracy at its "
                 "best-validation round. *worst site*: the lowest site, per seed, averaged. Bytes: what the server "
                 "received from one site per round.", "",
                 "| method | eval | bal. acc. | worst site | accuracy | AUC | bytes / round | trainable params "
                 "| wall s / run | lr | seeds |", "|" + "---|" * 11]
    else:
        lines = [f"## {title}", "", settings_line(bench.base), "",
                 f"Mean ± sd over seeds. *{LABEL[metric]}*: mean over sites of each site's test Dice (mean over the "
                 "foreground classes) at its best-validation round (validation Dice). *worst site*: the lowest site, "
                 "per seed, averaged. *HD95*: the site mean of the 95th percentile Hausdorff distance, in pixels of "
                 "the model's grid (data.image_size). *global-only*: the same runs with the personal adapter "
                 "switched off (the site's own head/decoder kept). Bytes: what the server received from one site per "
                 "round.", "",
                 f"| method | eval | {LABEL[metric]} | worst site | HD95 (px) | bytes / round | trainable params "
                 "| wall s / run | lr | seeds |", "|" + "---|" * 10]
    for method, results in main.items():
        for view in EVALS:
            agg = aggregate(results, view, metric)
            if not agg:
                continue
            extra = (f"{_pm(agg['accuracy'])} | {_pm(agg['auc'], agg['auc_sites'], agg['total_sites'])}"
                     if metric == "balanced_accuracy" else _pm(agg["hd95"]))
            lines.append(f"| {method} | {view.replace('_', '-')} | "
                         f"{_pm(agg['score'], agg['sites'], agg['total_sites'])} | {_pm(agg['worst'])} | "
                         f"{extra} | {agg['bytes_per_round']:,.0f} | "
                         f"{agg['trainable_params']:,} | {agg['wall_s']:.0f} | {bench.chosen_lr[method]:g} | "
                         f"{agg['n_seeds']} |")
    lines += ["", f"Learning rate chosen per method on the first seed's validation {NAME[metric]} "
              "(site mean of the best round):", "", "| method | " + " | ".join(
                  f"lr {lr:g}" for lr in bench.base.bench.lr_grid) + " | chosen |",
              "|" + "---|" * (len(bench.base.bench.lr_grid) + 2)]
    for method, scores in bench.tuning.items():
        lines.append(f"| {method} | " + " | ".join(f"{scores[lr]:.3f}" for lr in bench.base.bench.lr_grid)
                     + f" | {bench.chosen_lr[method]:g} |")
    lines += ["", rounds_line(main, bench.base.train.num_rounds), "", diagnostics_markdown(main), "",
              reading(main, metric)]
    if metric != "balanced_accuracy":
        lines += ["", per_site_markdown(main, metric), "",
                  shift_markdown(main, shifted_sites(bench.base.data.root), metric)]
    return "\n".join(lines)


def rounds_line(main: dict[str, list[dict]], num_rounds: int) -> str:
    """Whether the run was long enough: how often the best-validation round is the last one."""
    best = [int(row["best_round"]) for results in main.values() for r in results
            for row in site_results(r, "personalized")]
    last = sum(b == num_rounds for b in best)
    mean_best = statistics.fmean(best) if best else math.nan
    return (f"Rounds: {num_rounds}. The best-validation round is the last one for {last} of {len(best)} site runs "
            f"({100 * last / max(len(best), 1):.0f} %); mean best round {mean_best:.1f}.")


def diagnostics_markdown(main: dict[str, list[dict]]) -> str:
    """Mean over seeds and sites, at each site's best-validation round, of how far apart the two adapters are."""
    lines = ["How far apart the two adapters are at the best-validation round (mean over sites and seeds; "
             "`diagnostics.py`): mean cos² of the principal angles between the row spaces of A_g and A_p "
             "(overlap A) and the column spaces of B_g and B_p (overlap B), and mean cos²(u_g, u_p) on validation "
             "(overlap u); in brackets what random subspaces of the same widths give.", "",
             "| method | overlap A (random) | overlap B (random) | overlap u (random) |", "|---|---|---|---|"]
    for method, results in main.items():
        rows = [row for r in results for row in site_results(r, "personalized") if row.get("overlap_A") != ""]
        if not rows:
            continue
        cells = []
        for name in ("A", "B", "u"):
            got = covered_mean([float(x[f"overlap_{name}"]) for x in rows])[0]
            chance = covered_mean([float(x[f"random_{name}"]) for x in rows])[0]
            cells.append(f"{'n/a' if math.isnan(got) else f'{got:.4f}'} ({chance:.4f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_note(name: str = NAME["balanced_accuracy"]) -> str:
    """How the differences are made, in the headline metric `name` (its name in prose)."""
    return ("Differences: a method minus the one it is compared with (in a table, the row's minus the column's), "
            f"in site-mean test {name} (personalized view, each site at its best-validation round), with "
            "the 95 % interval of a paired bootstrap over sites × seeds (sites and seeds resampled with replacement, "
            "jointly, 10,000 resamples; docs/results.md, \"Intervals\"). *real*: the interval excludes 0.")


PAIRED_NOTE = paired_note()


def _diff_line(name_a: str, a: list[dict], name_b: str, b: list[dict], metric: str | None = None) -> str:
    metric = _metric(a, metric)
    d = paired_difference(site_seed_scores(a, metric=metric), site_seed_scores(b, metric=metric))
    if math.isnan(d.low):
        verdict = "no interval (one seed or one site): not a finding"
    else:
        verdict = "a real difference" if d.real else "no real difference (the interval holds 0)"
    worst = aggregate(a, metric=metric)["worst"][0] - aggregate(b, metric=metric)["worst"][0]
    return f"- {name_a} vs {name_b}: {d.text().removesuffix(', real')}: {verdict}. Worst site: {worst:+.3f}."


def paired_markdown(cells: dict[str, dict[tuple[str, int], float]], means: dict[str, float],
                    references: tuple[str, ...] = ("fedavg_lora", "local"), label: str = LABEL["balanced_accuracy"]
                    ) -> str:
    """Every method against each reference method present: the paired difference and its interval."""
    refs = [r for r in references if r in cells]
    if not refs:
        return ""
    lines = [f"| method | {label} | " + " | ".join(f"vs {r}" for r in refs) + " |", "|" + "---|" * (2 + len(refs))]
    for method in cells:
        lines.append(f"| {method} | {means[method]:.3f} | " + " | ".join(
            "—" if method == r else paired_difference(cells[method], cells[r]).text() for r in refs) + " |")
    return "\n".join(lines)


def reading(main: dict[str, list[dict]], metric: str | None = None) -> str:
    """The comparisons the README asks for, computed from the numbers (real: the paired interval excludes 0)."""
    metric = _main_metric(main, metric)
    main = {m: rs for m, rs in main.items() if aggregate(rs, metric=metric)}
    agg = {m: aggregate(rs, metric=metric) for m, rs in main.items()}
    out = ["### Reading (generated from the numbers)", "", paired_note(NAME[metric]), ""]
    table = paired_markdown({m: site_seed_scores(rs, metric=metric) for m, rs in main.items()},
                            {m: a["score"][0] for m, a in agg.items()}, label=LABEL[metric])
    if table:
        out += [table, ""]
    fedopal = [m for m in FEDOPAL if m in agg]
    for m in fedopal:
        if "dual_lora" in agg:
            out.append(_diff_line(m, main[m], "dual_lora (lambda = 0)", main["dual_lora"], metric))
        if "fedavg_lora" in agg:
            out.append(_diff_line(m, main[m], "fedavg_lora", main["fedavg_lora"], metric))
    if agg:
        ranked = sorted(agg, key=lambda m: -agg[m]["score"][0])
        ranking = ", ".join(f"{m} {agg[m]['score'][0]:.3f}" for m in ranked)
        out.append(f"- Ranking by mean {NAME[metric]} (an order of means, not of real differences): {ranking}.")
        for m in fedopal:
            better = [o for o in agg if o != m and agg[o]["score"][0] > agg[m]["score"][0]]
            worse_worst = [o for o in agg if o != m and agg[o]["worst"][0] > agg[m]["worst"][0]]
            out.append(f"- {m} is beaten on the mean by: {', '.join(better) or 'nobody'}; "
                       f"on the worst site by: {', '.join(worse_worst) or 'nobody'}.")
    return "\n".join(out)


# -- segmentation: per site, and on the sites whose masks follow another contouring convention ----------------------

DUAL = ("dual_lora", "feddpa", "fedopal_w", "fedopal_r", "fedopal_p")  # two adapters: a global-only view exists


def shifted_sites(root: str) -> dict[str, str]:
    """{site: its shift} for the sites of the federation at `root` whose masks were drawn with another contouring
    convention (federation.json: contour_px != 0, as fedopal.tools.hc18 writes it); {} where the federation says
    nothing of it."""
    try:
        with open(os.path.join(root, "federation.json")) as f:
            sites = json.load(f).get("sites", {})
    except (OSError, ValueError):
        return {}
    return {site: info.get("shift_description", info.get("shift", "")) for site, info in sorted(sites.items())
            if isinstance(info, dict) and info.get("contour_px", 0)}


def per_site_markdown(main: dict[str, list[dict]], metric: str | None = None) -> str:
    """Each site's test headline metric, personalized view, mean ± sd over seeds, per method."""
    metric = _main_metric(main, metric)
    cells = {m: site_seed_scores(rs, metric=metric) for m, rs in main.items()}
    sites = sorted({s for c in cells.values() for s, _ in c})
    lines = [f"### Per site (test {NAME[metric]}, personalized view, mean ± sd over seeds)", "",
             "| method | " + " | ".join(sites) + " |", "|" + "---|" * (1 + len(sites))]
    for method, c in cells.items():
        lines.append(f"| {method} | " + " | ".join(
            _pm(_mean_sd([v for (s, _), v in sorted(c.items()) if s == site])) for site in sites) + " |")
    return "\n".join(lines)


def _site_diff(a: dict[tuple[str, int], float], b: dict[tuple[str, int], float], site: str) -> str:
    """One site: mean ± sd over seeds of a - b (too few seeds for an interval of its own)."""
    diffs = [a[k] - b[k] for k in sorted(a) if k[0] == site and k in b]
    mean, sd = _mean_sd(diffs)
    return "n/a" if math.isnan(mean) else f"{mean:+.3f}" if math.isnan(sd) else f"{mean:+.3f} ± {sd:.3f}"


def comparison_rows(main: dict[str, list[dict]], metric: str | None = None
                    ) -> list[tuple[str, dict[tuple[str, int], float], dict[tuple[str, int], float]]]:
    """(label, a, b): the comparisons of the segmentation reading, as {(site, seed): value} of each side. Personal
    against shared state (every method - fedavg_lora, whose adapter and decoder are all averaged); orthogonality
    beyond dual_lora (each dual method - dual_lora, the same two adapters and personal decoder at lambda = 0); and the
    personal adapter alone (a dual method's personalized minus its global-only view: the same run and decoder)."""
    metric = _main_metric(main, metric)
    cells = {m: site_seed_scores(rs, metric=metric) for m, rs in main.items()}
    rows = []
    if "fedavg_lora" in cells:
        rows += [(f"{m} − fedavg_lora", cells[m], cells["fedavg_lora"]) for m in cells if m != "fedavg_lora"]
    if "dual_lora" in cells:
        rows += [(f"{m} − dual_lora", cells[m], cells["dual_lora"]) for m in DUAL if m in cells and m != "dual_lora"]
    for m in DUAL:
        if m in main:
            off = site_seed_scores(main[m], "global_only", metric)
            if off:
                rows.append((f"{m}: personal adapter on − off", cells[m], off))
    return rows


def shift_markdown(main: dict[str, list[dict]], shifted: dict[str, str], metric: str | None = None) -> str:
    """The paired differences over all sites, over the contouring-shift sites together, and on each of them."""
    metric = _main_metric(main, metric)
    sites = list(shifted)
    lines = ["### Personal or shared under a contouring-convention shift", ""]
    if not sites:
        return "\n".join(lines + ["The federation names no site with a contouring shift (federation.json "
                                  "contour_px): no per-shift table."])
    lines += ["Contouring-shift sites (federation.json): " + "; ".join(f"{s}: {d}" for s, d in shifted.items())
              + ".", "",
              f"Paired differences in test {NAME[metric]} (personalized view unless said). *all sites*, *"
              + ", ".join(sites) + "*: the paired bootstrap over those sites × seeds with its 95 % interval (over "
              f"{len(sites)} sites the interval is rougher than over all: few sites to resample); a single site: "
              "mean ± sd over seeds of the per-seed difference (too few seeds for an interval). *personal adapter "
              "on − off*: the same runs with and without the personal adapter (the site's decoder kept).", "",
              "| comparison | all sites | " + ", ".join(sites) + " | " + " | ".join(sites) + " |",
              "|" + "---|" * (3 + len(sites))]
    for label, a, b in comparison_rows(main, metric):
        subset = lambda c: {k: v for k, v in c.items() if k[0] in shifted}  # noqa: E731
        lines.append(f"| {label} | {paired_difference(a, b).text()} | "
                     f"{paired_difference(subset(a), subset(b)).text()} | "
                     + " | ".join(_site_diff(a, b, s) for s in sites) + " |")
    return "\n".join(lines)


def studies_markdown(studies: dict, metric: str | None = None) -> str:
    metric = _metric((r for values in studies.values() for _, rs in values for r in rs), metric)
    lines = ["# Studies", "", f"Each value: mean ± sd over seeds of the site-mean test {NAME[metric]} "
             "(selection on validation), and of the worst site.", ""]
    for name, values in studies.items():
        lines += [f"## {name}", "", f"| value | {LABEL[metric]} | worst site | bytes / round |", "|---|---|---|---|"]
        for label, results in values:
            agg = aggregate(results, metric=metric)
            lines.append(f"| {label} | {_pm(agg['score'], agg['sites'], agg['total_sites'])} | {_pm(agg['worst'])} | {agg['bytes_per_round']:,.0f} |")
        lines.append("")
    return "\n".join(lines)


def _epsilon_reached(results: list[dict]) -> float:
    """The largest epsilon any site reached (final round), the mean over seeds; inf without DP."""
    per_seed = [max(r.get("epsilon", {}).values(), default=math.inf) for r in results]
    return statistics.fmean(per_seed) if per_seed else math.inf


def privacy_markdown(privacy: dict, base: FedOpalConfig) -> str:
    ps = base.bench.privacy
    metric = HEADLINE[base.data.task]
    lines = ["# Privacy study", "",
             f"{base.name}: {base.federation.num_sites} sites, {base.train.num_rounds} rounds, {base.model.backbone} "
             f"at {base.data.image_size}, delta {1e-5:g} (privacy.delta), class weights `{ps.class_weights}` in every "
             "run (DP-SGD needs an unweighted per-sample loss), accountant PRV (Opacus). *update*: each site clips its "
             f"round update to C = {ps.clip_norm_update:g} and adds Gaussian noise (a guarantee for the site's whole "
             f"dataset); *dpsgd*: DP-SGD over every trained tensor, per-sample clip C = {ps.clip_norm_dpsgd:g}, "
             "Poisson batches (a guarantee per patient record, add/remove). The noise is calibrated so that the last "
             "round reaches the target epsilon; *epsilon reached* is the largest any site reported. "
             f"{NAME[metric][0].upper() + NAME[metric][1:]}: site mean of each site's test value at its "
             "best-validation round, mean ± sd over seeds.", "",
             "*final round*: the same at the last round (no selection); *round chosen*: the mean best-validation "
             "round (1-based).", "",
             f"| method | DP mode | target epsilon | epsilon reached | {LABEL[metric]} | worst site | final round | "
             "round chosen | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, rows in privacy.items():
        for mode, eps, results in rows:
            agg = aggregate(results, metric=metric)
            if not agg:
                continue
            reached = _epsilon_reached(results)
            rows_ = [site_results(r, "personalized") for r in results]
            final = _final_mean(results)
            chosen = statistics.fmean(x["best_round"] for rs in rows_ for x in rs)
            lines.append(f"| {method} | {mode if mode != 'none' else 'no DP'} | "
                         f"{'∞' if math.isinf(eps) else f'{eps:g}'} | {'∞' if math.isinf(reached) else f'{reached:.2f}'} | "
                         f"{_pm(agg['score'], agg['sites'], agg['total_sites'])} | {_pm(agg['worst'])} | "
                         f"{_pm(final)} | {chosen:.1f} | {agg['n_seeds']} |")
    return "\n".join(lines) + "\n"


def _final_mean(results: list[dict]) -> tuple[float, float]:
    metric = _metric(results, None)
    rows = [site_results(r, "personalized", metric) for r in results]
    return _mean_sd([covered_mean([x[f"final_{metric}"] for x in rs])[0] for rs in rows if rs])


def plot_privacy(privacy: dict, path: str) -> None:
    """Site-mean headline metric (balanced accuracy; segmentation: Dice) against epsilon (log axis), at the
    best-validation round (left) and at the final round (right): a line per method and mode, no DP dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, title, value in ((axes[0], "at each site's best-validation round", lambda res: aggregate(res)["score"]),
                             (axes[1], "at the final round", _final_mean)):
        for i, (method, rows) in enumerate(privacy.items()):
            color = f"C{i}"
            for mode, marker, style in (("update", "s", ":"), ("dpsgd", "o", "-")):
                pts = [(eps, value(res)) for m, eps, res in rows if m == mode and res]
                if pts:
                    ax.errorbar([e for e, _ in pts], [v[0] for _, v in pts], yerr=[v[1] for _, v in pts],
                                fmt=marker + style, color=color, capsize=2, label=f"{method} {mode}")
            base = [value(res) for m, _, res in rows if m == "none" and res]
            if base:
                ax.axhline(base[0][0], color=color, ls="--", lw=1, label=f"{method} no DP")
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (delta = 1e-5), log scale")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    results = [r for rows in privacy.values() for _, _, res in rows for r in res]
    axes[0].set_ylabel(f"site-mean test {NAME[_metric(results, None)]}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=3, loc="lower center")
    fig.suptitle("Accuracy against the privacy budget (update: dotted squares, dpsgd: solid circles)", fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_privacy(privacy: dict, base: FedOpalConfig, out_dir: str) -> None:
    with open(os.path.join(out_dir, "privacy.md"), "w") as f:
        f.write(privacy_markdown(privacy, base))
    plot_privacy(privacy, os.path.join(out_dir, "privacy.png"))


def plot(main: dict[str, list[dict]], out_dir: str, metric: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric = _main_metric(main, metric)
    name = NAME[metric]
    methods = list(main)
    sites = sorted({s for rs in main.values() for r in rs for s in r["sites"]})
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(sites) * len(methods) / 3), 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        per_site = {s: [] for s in sites}
        for r in main[m]:
            for row in site_results(r, "personalized", metric):
                per_site[row["site"]].append(row[metric])
        means = [np.nanmean(per_site[s]) if per_site[s] else np.nan for s in sites]
        sds = [np.nanstd(per_site[s]) if per_site[s] else np.nan for s in sites]
        ax.bar(np.arange(len(sites)) + i * width, means, width, yerr=sds, label=m, capsize=2)
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2, sites)
    ax.set_ylabel(f"test {name}")
    ax.set_ylim(0.4, 1.0)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(f"Per-site {name} (personalized, mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "per_site.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for m in methods:
        curves = np.array([curve(r, metric) for r in main[m]])
        ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), "-o", label=m, markersize=3)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"site-mean test {name}")
    ax.set_title(f"{name[0].upper() + name[1:]} against rounds (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "rounds.png"), dpi=120)
    plt.close(fig)


# -- "Which method for my consortium?": the guide across federations ------------------------------------------

def csv_metric(summary_csv: str) -> str:
    """The headline metric of a bench summary.csv: the first of HEADLINE's that is one of its columns."""
    with open(summary_csv, newline="") as f:
        columns = next(csv.reader(f), [])
    return next((m for m in HEADLINE.values() if m in columns), HEADLINE["classification"])


def method_scores(summary_csv: str) -> dict[str, dict]:
    """From a bench summary.csv: per method, the site-mean test headline metric (balanced accuracy; segmentation:
    Dice) of the personalized view per seed (undefined sites left out), its worst site per seed, and every
    (site, seed) value (for paired differences)."""
    metric = csv_metric(summary_csv)
    per: dict[str, dict[tuple[str, int], float]] = {}
    with open(summary_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row["eval"] != "personalized":
                continue
            per.setdefault(row["method"], {})[(row["site"], int(row["seed"]))] = float(row[metric])
    out = {}
    for method, cells in per.items():
        seeds = sorted({k for _, k in cells})
        by_seed = [[v for (_, k), v in cells.items() if k == seed] for seed in seeds]
        means = [covered_mean(v)[0] for v in by_seed]
        worst = [min((x for x in v if not math.isnan(x)), default=math.nan) for v in by_seed]
        out[method] = {"score": _mean_sd(means), "worst": _mean_sd(worst), "n_seeds": len(means), "cells": cells}
    return out


def guide_markdown(folders: list[str]) -> str:
    """One row per federation: the highest mean, FedOPAL's best variant and its rank, its paired differences from the
    highest, fedavg_lora and local with their intervals; then every method against fedavg_lora and against local on
    every federation, and a plain reading of which differences are real, all from the committed summaries."""
    metrics = list(dict.fromkeys(csv_metric(os.path.join(folder, "summary.csv")) for folder in folders))
    label, metric_name = " / ".join(LABEL[m] for m in metrics), " / ".join(NAME[m] for m in metrics)
    lines = [f"| federation | highest mean ({label}) | best FedOPAL variant: rank, {label} | "
             "FedOPAL vs the highest | FedOPAL vs fedavg_lora | FedOPAL vs local | worst site: highest / FedOPAL |",
             "|---|---|---|---|---|---|---|"]
    scores_of = {os.path.basename(os.path.normpath(folder)): method_scores(os.path.join(folder, "summary.csv"))
                 for folder in folders}
    readings = []
    for name, scores in scores_of.items():
        ranked = sorted(scores, key=lambda m: -scores[m]["score"][0])
        best = ranked[0]
        ours = max((m for m in FEDOPAL if m in scores), key=lambda m: scores[m]["score"][0], default=None)
        if ours is not None:
            cells = ["—" if other == ours else "n/a" if other not in scores else
                     paired_difference(scores[ours]["cells"], scores[other]["cells"]).text()
                     for other in (best, "fedavg_lora", "local")]
            lines.append(f"| {name} | {best} {_pm(scores[best]['score'])} | {ours}: {ranked.index(ours) + 1} of "
                         f"{len(ranked)}, {_pm(scores[ours]['score'])} | " + " | ".join(cells) +
                         f" | {scores[best]['worst'][0]:.3f} / {scores[ours]['worst'][0]:.3f} |")
        readings.append(f"- **{name}**: " + _guide_reading(scores, best))
    lines += ["", f"*{label}*: mean ± sd over seeds of the site-mean test {metric_name} (personalized view, each "
              "site at its best-validation round). " + paired_note(metric_name), ""]
    methods = list(dict.fromkeys(m for scores in scores_of.values() for m in scores))
    columns = [(name, ref) for name, scores in scores_of.items() for ref in ("fedavg_lora", "local") if ref in scores]
    if columns:
        lines += ["Every method against `fedavg_lora` and against `local`, on each federation:", "",
                  "| method | " + " | ".join(f"{name}: vs {ref}" for name, ref in columns) + " |",
                  "|" + "---|" * (1 + len(columns))]
        for method in methods:
            lines.append(f"| {method} | " + " | ".join(
                "n/a" if method not in scores_of[name] else "—" if method == ref else
                paired_difference(scores_of[name][method]["cells"], scores_of[name][ref]["cells"]).text()
                for name, ref in columns) + " |")
        lines.append("")
    above = [m for m in methods if m != "fedavg_lora" and all(
        m in sc and "fedavg_lora" in sc and _real_sign(sc[m]["cells"], sc["fedavg_lora"]["cells"]) > 0
        for sc in scores_of.values())]
    readings.append(f"- Really above `fedavg_lora` on every federation: {', '.join(above) or 'no method'}.")
    return "\n".join(lines + readings)


def _real_sign(a: dict, b: dict) -> int:
    """+1 where a - b is real and positive, -1 real and negative, 0 otherwise."""
    d = paired_difference(a, b)
    return 0 if not d.real else 1 if d.diff > 0 else -1


def _guide_reading(scores: dict[str, dict], best: str) -> str:
    """The differences that are real on one federation: below the highest mean, and above or below fedavg_lora and
    local."""
    def real(ref: str, sign: int) -> str:
        return ", ".join(m for m in scores if m != ref and _real_sign(scores[m]["cells"], scores[ref]["cells"]) == sign)

    parts = [f"highest mean {best} ({scores[best]['score'][0]:.3f}), really below it: {real(best, -1) or 'none'}"]
    parts += [f"vs {ref}: really above {real(ref, 1) or 'none'}, really below {real(ref, -1) or 'none'}"
              for ref in ("fedavg_lora", "local") if ref in scores and ref != best]
    return "; ".join(parts) + f". Order of means: {', '.join(sorted(scores, key=lambda m: -scores[m]['score'][0]))}."


def run_only(bench: Bench, study: str, cached_only: bool = False) -> int:
    """One study alone, at the learning rates the full benchmark chose (<out>/chosen.json)."""
    chosen = os.path.join(bench.out_dir, "chosen.json")
    lrs = {}
    if os.path.isfile(chosen):
        with open(chosen) as f:
            lrs = {m: float(v) for m, v in json.load(f)["chosen_lr"].items()}
    if study == "privacy":
        privacy = bench.run_privacy_study(lrs, cached_only)
        write_privacy(privacy, bench.base, bench.out_dir)
        print(privacy_markdown(privacy, bench.base))
        print(f"written: {bench.out_dir}/privacy.md, privacy.png")
        return 0
    studies = {k: v for k, v in bench.study_specs(lrs).items() if k.endswith(": quantization")}
    total = sum(len(runs) for values in studies.values() for _, runs in values)
    results = {name: [(label, [bench.run(s, total) for s in runs]) for label, runs in values]
               for name, values in studies.items()}
    text = studies_markdown(results, bench.metric).replace(
        "# Studies", "# Transfer quantization (NVFlare ModelQuantizer)", 1)
    with open(os.path.join(bench.out_dir, "quantization.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="the benchmark's config (one federation)")
    p.add_argument("--guide", nargs="+", metavar="FOLDER",
                   help="instead of running: the 'which method' table from these finished benchmark folders")
    p.add_argument("--quick", action="store_true", help="one seed, the first lr, no studies, 2 rounds")
    p.add_argument("--workspace", default="workspace/bench")
    p.add_argument("--out", help="--guide: also write the table to this markdown file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--gpus", default=None, metavar="IDS", help="GPUs for the simulated sites, as fedopal.tools.job --gpus")
    p.add_argument("--cached-only", action="store_true",
                   help="write the tables from the runs already finished, run nothing (a method whose tuning is "
                        "incomplete is left out; each row says its number of seeds)")
    p.add_argument("--only", choices=["privacy", "quantization"],
                   help="run only that study, with the learning rates of <out>/chosen.json (else the grid's first)")
    args = p.parse_args(argv)
    if args.guide:
        missing = [f for f in args.guide if not os.path.isfile(os.path.join(f, "summary.csv"))]
        if missing:
            print(f"error: {missing[0]}: no summary.csv. Fix: run the benchmark of that federation first "
                  "(make bench).", file=sys.stderr)
            return 2
        text = "# Which method for my consortium?\n\n" + guide_markdown(args.guide) + "\n"
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return 0
    if not args.config:
        p.error("give --config (or --guide FOLDER ...)")
    try:
        overrides = parse_overrides(args.set)
        if args.quick:
            overrides.update({"bench.lr_grid": None, "bench.studies": None, "train.num_rounds": 2,
                              "bench.out_dir": None})
            base = load_config(args.config, {k: v for k, v in overrides.items() if v is not None})
            overrides.update({"bench.seeds": base.bench.seeds[:1], "bench.lr_grid": base.bench.lr_grid[:1],
                              "bench.out_dir": base.bench.out_dir.rstrip("/") + "_quick"})
        cfg = load_config(args.config, overrides)
        check_precision(resolve_device(cfg.train.device), cfg.train.precision)
    except (ConfigError, DeviceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("FEDOPAL_HOME", os.getcwd())
    out_dir = cfg.bench.out_dir
    os.makedirs(out_dir, exist_ok=True)
    bench = Bench(cfg, out_dir, os.path.abspath(args.workspace), gpus=args.gpus)
    if args.only:
        return run_only(bench, args.only, args.cached_only)
    start = time.time()
    results = bench.execute(args.cached_only)
    wall = time.time() - start
    if not results["main"]:  # before anything is written: the committed tables stay as they are
        print(f"error: {bench.runs_dir} holds no finished run these settings can use (--cached-only runs nothing). "
              "Fix: run without --cached-only, or point bench.out_dir at the folder whose runs/ holds them.",
              file=sys.stderr)
        return 1
    title = (f"{cfg.name}: {len(cfg.bench.methods)} methods, seeds {cfg.bench.seeds}, {cfg.train.num_rounds} rounds, "
             f"{cfg.model.backbone} at {cfg.data.image_size}, {cfg.federation.num_sites} sites")
    write_csv(results["main"], os.path.join(out_dir, "summary.csv"), bench.metric)
    cpu = [v for v in bench.cpu_s.values() if not math.isnan(v)]
    md = main_markdown(bench, results["main"], title) + (
        f"\n\nBenchmark wall time: {wall / 60:.1f} min (this invocation). CPU time of the {len(bench.cpu_s)} runs "
        f"behind these tables, as measured when each ran: {sum(cpu) / 3600:.2f} h"
        + (f" ({len(bench.cpu_s) - len(cpu)} runs from before CPU time was recorded)" if len(cpu) < len(bench.cpu_s)
           else "") + ".\n")
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(md)
    if results["studies"]:
        with open(os.path.join(out_dir, "studies.md"), "w") as f:
            f.write(studies_markdown(results["studies"], bench.metric))
    with open(os.path.join(out_dir, "chosen.json"), "w") as f:
        json.dump({"fedopal_version": fedopal.__version__, "chosen_lr": bench.chosen_lr, "tuning": {m: {str(k): v for k, v in s.items()}
                                                            for m, s in bench.tuning.items()}}, f, indent=2)
    plot(results["main"], out_dir, bench.metric)
    if results["privacy"]:
        write_privacy(results["privacy"], cfg, out_dir)
    print(md)
    print(f"written: {out_dir}/summary.csv, summary.md, per_site.png, rounds.png"
          + (", studies.md" if results["studies"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
