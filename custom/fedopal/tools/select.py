"""Choose a method on the consortium's own data: each candidate runs as a real FLARE job, the choice is made on the
sites' validation metrics only.

    fedopal select --config consortium.yaml --methods fedopal_w fedavg_lora local --rounds 3 \\
        --admin-kit /path/to/admin@org.example/startup --username admin@org.example [--out results/select]
    fedopal select --config ... --methods ... --rounds 3 --poc workspace/poc/nvflare_poc     # a POC rehearsal

Why: no method wins everywhere in our benchmark (README, "Which method for my consortium?"), so a consortium chooses
on its own data. Each candidate is exported as a no-code job (the config with train.method and train.num_rounds
replaced), submitted through the FLARE API as the admin, waited for and downloaded, one after the other. What the
choice reads is what the sites' wire policy already lets the server see: each site's `personalized/val/
balanced_accuracy` per round, as FLARE tracking events (the server's tb_events). Per site, a candidate scores its best
validation round; the candidate with the highest site mean is chosen. Test metrics are never read.

Cost: candidates x rounds federated rounds, each training every site. Where a site's policy (or DP) keeps validation
metrics home, the selection cannot see that site: it says so in one line after the first job and stops.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

import numpy as np

from fedopal.config import ConfigError, FedOpalConfig, load_config, parse_overrides
from fedopal.specs.contract import matches
from fedopal.specs.methods import METHODS
from fedopal.tools.bench import paired_bootstrap
from fedopal.tools.flare_admin import FlareAdmin

VAL_TAG = "personalized/val/balanced_accuracy"


class SelectError(RuntimeError):
    """The selection cannot go on; the message is one line naming what and the fix."""


def candidate_config(cfg: FedOpalConfig, method: str, rounds: int) -> FedOpalConfig:
    """The consortium's config with the candidate's method and the round budget (its own job name)."""
    raw = cfg.model_dump(mode="json")
    raw["name"] = f"{cfg.name}_select_{method}"
    raw["train"].update(method=method, num_rounds=rounds)
    from fedopal.config import config_from_dict

    return config_from_dict(raw, source=f"{cfg.name} with train.method={method}")


def validation_by_site(result_dir: str) -> dict[str, dict[int, float]]:
    """{site: {round (from 1): personalized val balanced accuracy}} from the server's TensorBoard event files of a
    downloaded job result (FLARE writes each site's tracking events under tb_events/<site>/)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for folder in sorted(glob.glob(os.path.join(result_dir, "**", "tb_events", "*"), recursive=True)):
        if not os.path.isdir(folder):
            continue
        acc = EventAccumulator(folder)
        acc.Reload()
        if VAL_TAG in acc.Tags().get("scalars", []):
            out[os.path.basename(folder)] = {int(e.step): float(e.value) for e in acc.Scalars(VAL_TAG)}
    return out


def best_validation(rounds: dict[int, float]) -> tuple[int, float] | None:
    """(round, value) where the validation metric peaked (ties: the earlier round); None if none is defined."""
    defined = [(r, v) for r, v in sorted(rounds.items()) if np.isfinite(v)]
    return max(defined, key=lambda rv: rv[1]) if defined else None


def bootstrap_over_sites(values: np.ndarray) -> tuple[float, float]:
    """95 % percentile interval of the mean of `values` (one per site; may be paired differences), resampling sites
    with replacement: the benchmark's paired bootstrap with one seed. (NaN, NaN) with fewer than two sites."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    _, low, high = paired_bootstrap(values[:, None])
    return low, high


class FlareSession(FlareAdmin):
    """A candidate's job on the consortium: submitted, waited for and downloaded (tools.flare_admin)."""

    def __init__(self, username: str, admin_kit: str, timeout_s: float):
        super().__init__(username, admin_kit)
        self.timeout_s = timeout_s

    def run(self, job_folder: str, out_dir: str) -> tuple[str, str, str]:
        """(job id, FLARE's final status, the downloaded result folder)."""
        job_id = self.submit(job_folder)
        timed_out, meta = self.wait(job_id, self.timeout_s)
        status = "TIMEOUT" if timed_out else meta.get("status", "UNKNOWN")
        return job_id, status, self.download(job_id, out_dir)


def poc_admin(workspace: str) -> tuple[str, str]:
    """(admin name, admin startup kit) of a POC prepared by poc_setup/poc.py (its fedopal_poc.json)."""
    path = os.path.join(workspace, "fedopal_poc.json")
    if not os.path.isfile(path):
        raise SelectError(f"{path}: not found, so {workspace} is not a prepared POC. Fix: python poc_setup/poc.py "
                          "prepare && python poc_setup/poc.py start, or give --admin-kit and --username.")
    with open(path) as f:
        state = json.load(f)
    return state["admin"], os.path.join(workspace, state["project"], "prod_00", state["admin"])


def select(cfg: FedOpalConfig, methods: list[str], rounds: int, flare: FlareSession, out_dir: str,
           config_path: str = "<config>") -> dict:
    """Run every candidate, one job after the other; returns the table's rows and the choice (written to out_dir)."""
    from fedopal.tools.job import export_job

    sites = cfg.federation.sites()
    os.makedirs(out_dir, exist_ok=True)
    print(f"select: {len(methods)} candidates x {rounds} rounds = {len(methods) * rounds} federated rounds on "
          f"{len(sites)} sites ({', '.join(sites)}), one job after the other; the choice reads each site's "
          f"{VAL_TAG}, never a test metric", flush=True)
    rows, started = [], time.monotonic()
    for method in methods:
        job_cfg = candidate_config(cfg, method, rounds)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as jobs:
            job_id, status, result = flare.run(export_job(job_cfg, jobs, "no-code"), os.path.join(out_dir, "jobs"))
        wall = time.monotonic() - t0
        if status != "FINISHED:COMPLETED":
            raise SelectError(f"the {method} job ({job_id}) ended with {status}. Fix: see the server's and the "
                              f"sites' log.txt of job {job_id} (downloaded to {result}).")
        by_site = validation_by_site(result)
        silent = [s for s in sites if best_validation(by_site.get(s, {})) is None]
        if silent:
            raise SelectError(
                f"site(s) {', '.join(silent)} sent no {VAL_TAG} (their privacy policy, or differential privacy, keeps "
                "validation metrics home), so the selection cannot see them. Fix: ask those sites to allow "
                f"'personalized/val/*' by name (privacy allow_fields; outside epsilon under DP), or select without "
                "them (federation.site_names).")
        best = {s: best_validation(by_site[s]) for s in sites}
        rows.append({"method": method, "job_id": job_id, "wall_s": round(wall, 1), "rounds": rounds,
                     "val": {s: best[s][1] for s in sites}, "best_round": {s: best[s][0] for s in sites}})
        print(f"select: {method} done in {wall:.0f} s (job {job_id}): site-mean validation balanced accuracy "
              f"{np.mean(list(rows[-1]['val'].values())):.3f}", flush=True)
    for row in rows:
        values = np.array([row["val"][s] for s in sites])
        row["mean"] = float(values.mean())
        row["ci"] = bootstrap_over_sites(values)
    chosen = max(rows, key=lambda r: r["mean"])
    for row in rows:
        diff = np.array([row["val"][s] - chosen["val"][s] for s in sites])
        row["diff"], row["diff_ci"] = float(diff.mean()), bootstrap_over_sites(diff)
    summary = {"config": os.path.abspath(config_path) if config_path != "<config>" else config_path,
               "sites": sites, "rounds": rounds, "rows": rows, "chosen": chosen["method"], "job_name": cfg.name,
               "wall_s": round(time.monotonic() - started, 1)}
    summary["markdown"] = markdown(summary, config_path)
    with open(os.path.join(out_dir, "select.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "markdown"}, f, indent=1)
    with open(os.path.join(out_dir, "select.md"), "w") as f:
        f.write(summary["markdown"] + "\n")
    return summary


def markdown(summary: dict, config_path: str) -> str:
    sites, chosen = summary["sites"], summary["chosen"]
    ci = lambda lo, hi: "n/a" if np.isnan(lo) else f"[{lo:+.3f}, {hi:+.3f}]"  # noqa: E731
    lines = [f"### Method selection on validation: {len(summary['rows'])} candidates x {summary['rounds']} rounds, "
             f"{len(sites)} sites", "",
             "| method | site-mean val. bal. acc. [95 % over sites] | vs the chosen [95 % paired] | "
             + " | ".join(f"{s} (round)" for s in sites) + " | wall s |",
             "|---|---|---|" + "---|" * len(sites) + "---|"]
    for r in sorted(summary["rows"], key=lambda r: -r["mean"]):
        name = f"**{r['method']}**" if r["method"] == chosen else r["method"]
        low, high = r["ci"]
        mean = f"{r['mean']:.3f}" + ("" if np.isnan(low) else f" [{low:.3f}, {high:.3f}]")
        vs = "chosen" if r["method"] == chosen else f"{r['diff']:+.3f} {ci(*r['diff_ci'])}"
        lines.append(f"| {name} | {mean} | {vs} | "
                     + " | ".join(f"{r['val'][s]:.3f} ({r['best_round'][s]})" for s in sites)
                     + f" | {r['wall_s']:.0f} |")
    real = [r["method"] for r in summary["rows"] if r["method"] != chosen and r["diff_ci"][1] < 0]
    lines += ["", f"Chosen: **{chosen}**, the highest site mean of each site's best validation round (test metrics "
                  "are not read). "
              + (f"Behind it beyond the interval: {', '.join(real)}. " if real else
                 "No other candidate is behind it beyond the interval: with these sites, the choice is not clear-cut. ")
              + f"Intervals: 95 % bootstrap over the {len(sites)} sites (coarse with few sites). Wall time "
                f"{summary['wall_s']:.0f} s for {len(summary['rows'])} jobs.", "",
              "Train the chosen method for the full budget:", "", "```",
              f"fedopal job --config {config_path} --set train.method={chosen} --export jobs --flavor no-code",
              f"nvflare job submit -j jobs/{summary['job_name']}   # as the admin (or poc_setup/poc.py submit)",
              "```"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the consortium's config (its sites, data, model)")
    p.add_argument("--methods", nargs="+", required=True, help=f"candidates, from: {', '.join(METHODS)}")
    p.add_argument("--rounds", type=int, required=True, help="rounds per candidate (the budget of each job)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--poc", metavar="WORKSPACE", help="a POC prepared and started by poc_setup/poc.py")
    where.add_argument("--admin-kit", help="the admin's startup kit folder (provisioned by FLARE)")
    p.add_argument("--username", help="with --admin-kit: the admin's name, e.g. admin@org.example")
    p.add_argument("--out", default="results/select", help="where select.md, select.json and the jobs' results go")
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds one candidate's job may take")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            raise SelectError(f"--methods: unknown {unknown}. Fix: choose from {', '.join(METHODS)}.")
        if args.rounds < 1:
            raise SelectError("--rounds must be at least 1. Fix: give the round budget of each candidate's job.")
        if cfg.privacy.enabled and not any(matches(f, VAL_TAG) for f in cfg.privacy.allow_fields or []):
            raise SelectError("privacy is on and privacy.allow_fields does not let validation metrics out, so no site "
                              "would send what the selection reads. Fix: allow 'personalized/val/*' by name (then "
                              "outside epsilon), or select without DP.")
        if args.poc:
            username, kit = poc_admin(args.poc)
        else:
            if not args.username:
                raise SelectError("--admin-kit needs --username (the admin's name in the project).")
            username, kit = args.username, args.admin_kit
        summary = select(cfg, args.methods, args.rounds, FlareSession(username, kit, args.timeout), args.out,
                         args.config)
    except (ConfigError, SelectError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary["markdown"])
    print(f"select: written {os.path.join(args.out, 'select.md')} and select.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
