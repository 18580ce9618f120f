"""Federated data statistics before the first job: NVFlare's FedStatsRecipe over every site's decoded images.

    fedopal stats --config app_configs/demo.yaml [--workspace workspace] [--out results/stats]
        [--min-count 10] [--noise 0.1 0.3] [--max-bins-percent 10] [--bins 20] [--set KEY=VALUE ...]
    fedopal stats --config consortium.yaml --export jobs/          (then nvflare job submit, download)
    fedopal stats --config consortium.yaml --from <download>/statistics/image_statistics.json [--out ...]

Each site decodes its images exactly as training will (fedopal.site.fedstats, with the site's own decoding) and sends
aggregates only, per split: image counts, counts per class, mean and standard deviation of each image's mean,
1st/99th percentile and maximum, image sizes, and a histogram of every pixel's decoded value over [0, 1]. NVFlare's
privacy filter runs at the site before anything leaves: `--min-count` (MinCountCleanser: a split with fewer images
sends its count and nothing else), `--noise` (AddNoiseToMinMax: the minima and maxima that set the size histograms'
range are widened by 10-30 %), `--max-bins-percent` (HistogramBinsCleanser: a split's histogram needs fewer bins
than that percentage of its images). The defaults are NVFlare's.

Written to --out: stats.md (the tables and the flags), histograms.png (each site's intensity histogram against the
federation's), summary.json (the tables' numbers, the flags, the privacy settings) and nvflare_statistics.json (the
file NVFlare's StatisticsController wrote, as written). Flagged: a site whose decoded images use under 1/8 of [0, 1]
(12-bit values in 16-bit files, say) and a site far from the others (fedopal validate's rule: mean intensity more
than 0.15 from the federation's median site's, or under half of the part of [0, 1] it uses).

--export DIR writes the job instead (no-code: every site runs the fedopal it installed), for `nvflare job submit`;
--from JSON then makes the tables and plot from the statistics file of that job's download.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
import time

from fedopal.config import ConfigError, FedOpalConfig, job_dict, load_config, parse_overrides
from fedopal.site.fedstats import INTENSITY, SIZES, SPLITS, SiteImageStatistics, feature_names, label_feature
from fedopal.site.readers import NARROW
from fedopal.site.validate import far_from_others

# NVFlare's own defaults (FedStatsRecipe, and its federated-statistics example's privacy.json)
MIN_COUNT, NOISE, MAX_BINS_PERCENT, BINS = 10, (0.1, 0.3), 10, 20
SIZE_BINS = 10  # the size and label histograms: over the sites' noised min..max
STATS_FILE = "statistics/image_statistics.json"  # relative to the server's job folder (NVFlare's JsonStatsFileWriter)


def statistic_configs(cfg: FedOpalConfig, bins: int = BINS) -> dict:
    """What NVFlare's StatisticsController asks every site for. Intensity-like features: `bins` bins over [0, 1];
    the others (sizes, labels): SIZE_BINS over the federation's min..max, which the sites send noised."""
    unit = {"bins": bins, "range": [0.0, 1.0]}
    histogram = {name: dict(unit) for name in feature_names(cfg.data) if name.startswith(INTENSITY)}
    histogram["*"] = {"bins": SIZE_BINS}
    return {"count": {}, "failure_count": {}, "sum": {}, "mean": {}, "stddev": {}, "histogram": histogram}


def build_recipe(cfg: FedOpalConfig, bins: int = BINS, min_count: int = MIN_COUNT, noise=NOISE,
                 max_bins_percent: float = MAX_BINS_PERCENT):
    """NVFlare's FedStatsRecipe with FedOPAL's site generator, for the config's sites."""
    from nvflare.recipe.fedstats import FedStatsRecipe

    return FedStatsRecipe(
        name=f"{cfg.name}_stats", stats_output_path=STATS_FILE, sites=cfg.federation.sites(),
        statistic_configs=statistic_configs(cfg, bins),
        stats_generator=SiteImageStatistics(job_config=job_dict(cfg), bins=bins),
        min_count=min_count, min_noise_level=noise[0], max_noise_level=noise[1], max_bins_percent=max_bins_percent)


def simulate(cfg: FedOpalConfig, workspace: str, recipe) -> str:
    """Run the statistics job in NVFlare's simulator (a fresh job folder); returns the JSON NVFlare wrote."""
    from nvflare.recipe import SimEnv

    from fedopal.tools.job import EXPECTED_SHUTDOWN, filtered_output

    workspace = os.path.abspath(workspace)
    os.environ["FEDOPAL_HOME"] = os.path.abspath(os.environ.get("FEDOPAL_HOME") or os.getcwd())
    job_ws = os.path.join(workspace, f"{cfg.name}_stats")
    if os.path.isdir(job_ws):
        shutil.rmtree(job_ws)
    env = SimEnv(clients=cfg.federation.sites(), workspace_root=workspace, log_config="WARNING")
    with filtered_output(EXPECTED_SHUTDOWN):
        recipe.run(env)
    found = glob.glob(os.path.join(job_ws, "**", STATS_FILE), recursive=True)
    if not found:
        raise RuntimeError(f"NVFlare wrote no statistics under {job_ws} (a site stopped: its log.txt there says "
                           "why; fedopal validate --config ... checks every site's data)")
    return found[0]


# -- what came back: per site and split, then per site -----------------------------------------------------

def _get(stats: dict, feature: str, statistic: str, site: str, split: str):
    return stats.get(feature, {}).get(statistic, {}).get(site, {}).get(split)


def class_title(data_cfg, index: int) -> str:
    return data_cfg.class_name(index) if data_cfg.class_names else f"class {index}"


def split_summary(stats: dict, cfg: FedOpalConfig, site: str, split: str) -> dict:
    """One split of one site as NVFlare brought it back: None where NVFlare's privacy filter withheld a value."""
    data_cfg = cfg.data
    out = {"images": _get(stats, INTENSITY, "count", site, split),
           "failures": _get(stats, INTENSITY, "failure_count", site, split)}
    if data_cfg.task != "segmentation":
        classes = {class_title(data_cfg, c): _get(stats, label_feature(data_cfg.class_name(c)), "sum", site, split)
                   for c in range(data_cfg.num_classes)}
        out["classes"] = {k: int(round(v)) for k, v in classes.items()} if None not in classes.values() else None
    for name in SIZES[data_cfg.spatial_dims]:
        out[name] = {"mean": _get(stats, name, "mean", site, split), "sd": _get(stats, name, "stddev", site, split)}
    for name in ("intensity", "intensity_p01", "intensity_p99", "intensity_max"):
        out[name] = {k: _get(stats, name, k, site, split) for k in ("sum", "mean", "stddev")}
    hist = _get(stats, INTENSITY, "histogram", site, split)
    out["histogram"] = [[float(lo), float(hi), float(n)] for lo, hi, n in hist] if hist else None
    return out


def pooled(splits: dict) -> dict:
    """A site's intensity over the splits NVFlare released (count, sum, mean and sd of image means combined exactly;
    the percentiles and maxima count-weighted) and its pixel histogram over the splits whose histogram came back."""
    have = {s: v for s, v in splits.items() if v["images"] and v["intensity"]["mean"] is not None}
    out = {"images": sum(v["images"] for v in have.values()), "splits": sorted(have, key=SPLITS.index)}
    n = out["images"]
    if not n:
        return out | {"mean": None}
    mean = sum(v["intensity"]["sum"] for v in have.values()) / n
    # the pooled sample variance from each split's count, mean and sd (ddof 1)
    within = sum((v["images"] - 1) * (v["intensity"]["stddev"] or 0.0) ** 2 for v in have.values())
    between = sum(v["images"] * (v["intensity"]["mean"] - mean) ** 2 for v in have.values())
    out |= {"mean": mean, "sd": math.sqrt((within + between) / (n - 1)) if n > 1 else 0.0}
    for name, key in (("intensity_p01", "p01"), ("intensity_p99", "p99"), ("intensity_max", "max")):
        out[key] = sum(v["images"] * v[name]["mean"] for v in have.values()) / n
    out["used"] = out["p99"] - out["p01"]
    hists = {s: v["histogram"] for s, v in splits.items() if v["histogram"]}
    if hists:
        first = next(iter(hists.values()))
        out["histogram"] = {"edges": [b[0] for b in first] + [first[-1][1]],
                            "counts": [sum(h[i][2] for h in hists.values()) for i in range(len(first))],
                            "splits": sorted(hists, key=SPLITS.index)}
        out["pixel_median"] = histogram_percentile(out["histogram"]["edges"], out["histogram"]["counts"], 50)
    return out


def histogram_percentile(edges: list[float], counts: list[float], q: float) -> float | None:
    """The q-th percentile of the values a histogram counts, linear within its bin."""
    total = sum(counts)
    if not total:
        return None
    target, seen = total * q / 100, 0.0
    for i, n in enumerate(counts):
        if n and seen + n >= target:
            return edges[i] + (edges[i + 1] - edges[i]) * (target - seen) / n
        seen += n
    return edges[-1]


def narrow_flag(site: str, p: dict) -> str | None:
    """A site whose decoded images use a sliver of [0, 1]: what it looks like, and the key that fixes it."""
    if p.get("mean") is None or p["used"] >= NARROW:
        return None
    why = f"decoded images use {100 * p['used']:.0f}% of [0, 1] (1st-99th percentile {p['p01']:.3f}-{p['p99']:.3f})"
    stored = round(p["max"] * 65535)
    if 0 < stored < 65536 * NARROW:  # as a 16-bit file would store it: a scanner's 10-14 bits
        bits = stored.bit_length()
        why += (f"; the images' maxima average {p['max']:.4f} = {stored} of 65535: {bits}-bit values in 16-bit "
                f"files? Set data.sites.{site}.intensity_range: [0, {2 ** bits - 1}] (fedopal validate at the site "
                "names the range each file uses)")
    return why


def summarize(stats: dict, cfg: FedOpalConfig, privacy: dict) -> dict:
    sites = [s for s in cfg.federation.sites() if s in stats.get(INTENSITY, {}).get("count", {})]
    out = {"sites": {}, "flags": {}, "privacy": privacy,
           "classes": [class_title(cfg.data, c) for c in range(cfg.data.num_classes)]
           if cfg.data.task != "segmentation" else [], "sizes": list(SIZES[cfg.data.spatial_dims])}
    for site in sites:
        splits = {split: split_summary(stats, cfg, site, split) for split in SPLITS}
        out["sites"][site] = {"splits": splits, "pooled": pooled(splits)}
    flags: dict[str, list[str]] = {}
    for site, s in out["sites"].items():
        why = narrow_flag(site, s["pooled"])
        if why:
            flags.setdefault(site, []).append(why)
    have = [{"site": site, "mean": s["pooled"]["mean"], "used": s["pooled"]["used"]}
            for site, s in out["sites"].items() if s["pooled"].get("mean") is not None]
    for site, why in far_from_others(have, mean_name="mean intensity").items():
        flags.setdefault(site, []).append(f"far from the other sites: {why}")
    out["flags"] = flags
    return out


# -- tables, plot ------------------------------------------------------------------------------------------

def _num(value, fmt=".3f") -> str:
    return "withheld" if value is None else format(value, fmt)


def _size(split: dict, names) -> str:
    parts = []
    for name in names:
        mean, sd = split[name]["mean"], split[name]["sd"]
        if mean is None:
            return "withheld"
        parts.append(f"{mean:g}" if not sd else f"{mean:.1f} (sd {sd:.1f})")
    return " × ".join(parts)


def markdown(summary: dict) -> str:
    classes, sizes = summary["classes"], summary["sizes"]
    pv = summary["privacy"]
    lines = [f"## Federated statistics: {pv['job']}", "",
             f"NVFlare {pv['nvflare']} FedStatsRecipe, {len(summary['sites'])} sites; privacy at each site: "
             f"min_count {pv['min_count']} images, min/max noise {pv['noise'][0]:g}-{pv['noise'][1]:g}, "
             f"max_bins_percent {pv['max_bins_percent']:g}; intensity histogram {pv['bins']} bins over [0, 1].",
             "", "### Images per split and class", "",
             "| site | split | images | " + " | ".join(classes + [" × ".join(sizes)]) + " |",
             "|---|---|---|" + "---|" * (len(classes) + 1)]
    for site, s in summary["sites"].items():
        for split, v in s["splits"].items():
            cls = [str(v["classes"][c]) if v.get("classes") else "withheld" for c in classes]
            failed = f" ({v['failures']} not decoded)" if v.get("failures") else ""
            lines.append(f"| {site} | {split} | {v['images']}{failed} | " + " | ".join(cls + [_size(v, sizes)])
                         + " |")
    lines += ["", "### Intensity after decoding (each site's released splits)", "",
              "| site | images | mean | sd of image means | 1st pct | 99th pct | [0, 1] used | max | pixel median "
              "(histogram) | histogram of | flag |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for site, s in summary["sites"].items():
        p = s["pooled"]
        if p.get("mean") is None:
            lines.append(f"| {site} | 0 | withheld |  |  |  |  |  |  |  |  |")
            continue
        hist = p.get("histogram")
        flag = "; ".join(f.split(":")[0] if f.startswith("far") else "narrow range" for f in
                         summary["flags"].get(site, []))
        lines.append(f"| {site} | {p['images']} ({', '.join(p['splits'])}) | {p['mean']:.3f} | {p['sd']:.3f} | "
                     f"{p['p01']:.3f} | {p['p99']:.3f} | {100 * p['used']:.0f}% | {p['max']:.3f} | "
                     f"{_num(p.get('pixel_median'))} | {', '.join(hist['splits']) if hist else 'withheld'} | "
                     f"{flag} |")
    lines += [""]
    if summary["flags"]:
        lines += [f"- **{site}**: {why}" for site, whys in summary["flags"].items() for why in whys]
    else:
        lines += ["No site flagged: every site's decoded images use at least 1/8 of [0, 1] and none is far from the "
                  "others."]
    lines += ["", "Mean, sd, percentiles and max are over images (each image's mean, 1st and 99th percentile and "
              "maximum), as fedopal validate's; the pixel median is read from the pooled pixel histogram. "
              "`withheld`: NVFlare's privacy filter kept it at the site (under min_count images, or a histogram "
              "with too many bins for the split's images)."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
    """One panel per site: its pixel histogram (fraction of its pixels per bin) on the federation's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = {site: s["pooled"]["histogram"] for site, s in summary["sites"].items() if s["pooled"].get("histogram")}
    if not sites:
        return
    edges = next(iter(sites.values()))["edges"]
    total = [sum(h["counts"][i] for h in sites.values()) for i in range(len(edges) - 1)]
    cols = min(len(sites), 4)
    rows = math.ceil(len(sites) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False, sharex=True)
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    width = edges[1] - edges[0]
    for ax, (site, h) in zip(axes.flat, sites.items()):
        n = sum(h["counts"]) or 1
        flagged = site in summary["flags"]
        ax.bar(centers, [c / n for c in h["counts"]], width=width, color="tab:red" if flagged else "tab:blue",
               alpha=0.75, label=site)
        ax.step(edges, [total[0] / sum(total)] + [c / sum(total) for c in total], where="pre", color="black",
                linewidth=1, label="all sites")
        ax.set_title(site + (" (flagged)" if flagged else ""), fontsize=10)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(sites):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("decoded value", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of pixels", fontsize=9)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{summary['privacy']['job']}: intensity after decoding ({summary['privacy']['bins']} bins)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(summary: dict, nvflare_json: str, out: str) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {"table": os.path.join(out, "stats.md"), "plot": os.path.join(out, "histograms.png"),
             "summary": os.path.join(out, "summary.json"), "nvflare": os.path.join(out, "nvflare_statistics.json")}
    with open(paths["table"], "w") as f:
        f.write(markdown(summary))
    with open(paths["summary"], "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    if not (os.path.exists(paths["nvflare"]) and os.path.samefile(nvflare_json, paths["nvflare"])):
        shutil.copyfile(nvflare_json, paths["nvflare"])
    plot(summary, paths["plot"])
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--workspace", default="workspace", help="simulator workspace root (kept)")
    p.add_argument("--out", default="results/stats", help="where stats.md, histograms.png and the JSON go")
    p.add_argument("--min-count", type=int, default=MIN_COUNT,
                   help=f"NVFlare's MinCountCleanser: fewer images in a split send only their count (default "
                        f"{MIN_COUNT})")
    p.add_argument("--noise", type=float, nargs=2, default=NOISE, metavar=("MIN", "MAX"),
                   help="NVFlare's AddNoiseToMinMax: minima and maxima widened by MIN..MAX of their value "
                        f"(default {NOISE[0]} {NOISE[1]})")
    p.add_argument("--max-bins-percent", type=float, default=MAX_BINS_PERCENT,
                   help="NVFlare's HistogramBinsCleanser: a histogram needs bins < this %% of the split's images "
                        f"(default {MAX_BINS_PERCENT})")
    p.add_argument("--bins", type=int, default=BINS, help=f"intensity histogram bins over [0, 1] (default {BINS})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.root=/data/fedopal (value parsed as YAML)")
    p.add_argument("--export", metavar="JOBS_DIR",
                   help="export the statistics job to JOBS_DIR/<name>_stats (no-code) instead of simulating it")
    p.add_argument("--from", dest="from_json", metavar="JSON",
                   help="no run: the tables and plot from the statistics JSON of a job run in POC or production "
                        "(its download's statistics/image_statistics.json); give the job's privacy settings too")
    args = p.parse_args(argv)
    sys.argv = sys.argv[:1]  # NVFlare's recipe module would otherwise read --export itself
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
        recipe = build_recipe(cfg, args.bins, args.min_count, tuple(args.noise), args.max_bins_percent)
    except (ConfigError, ValueError) as err:  # NVFlare's cleansers refuse settings out of range
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.export:
        recipe._job.set_app_packages(["fedopal"])  # the sites run the fedopal they installed; nothing is shipped
        target = os.path.join(os.path.abspath(args.export), f"{cfg.name}_stats")
        recipe.export(os.path.abspath(args.export))
        print(f"exported {target} (deploys to server, {', '.join(cfg.federation.sites())})")
        return 0
    t0 = time.time()
    if args.from_json:
        nvflare_json = args.from_json
    else:
        from fedopal.site.validate import inspect_site

        bad = [c for c in (inspect_site(cfg, site) for site in cfg.federation.sites()) if c.problems]
        if bad:  # as fedopal job --simulate: no run on data a site would refuse
            print(f"error: {bad[0].problems.items[0][1]} (fedopal validate --config {args.config} lists every "
                  "problem)", file=sys.stderr)
            return 2
        print(f"Running {cfg.name}_stats in the FLARE simulator: NVFlare federated statistics, "
              f"{len(cfg.federation.sites())} sites", flush=True)
        try:
            nvflare_json = simulate(cfg, args.workspace, recipe)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    import nvflare

    with open(nvflare_json) as f:
        stats = json.load(f)
    privacy = {"job": f"{cfg.name}_stats", "nvflare": nvflare.__version__, "min_count": args.min_count,
               "noise": list(args.noise), "max_bins_percent": args.max_bins_percent, "bins": args.bins}
    summary = summarize(stats, cfg, privacy)
    paths = write(summary, nvflare_json, args.out)
    print("\n" + markdown(summary))
    for site, whys in summary["flags"].items():
        for why in whys:
            print(f"warning: {site} {why}", file=sys.stderr)
    print(f"results:    {paths['table']}, {paths['plot']}, {paths['summary']}, {paths['nvflare']}")
    print(f"wall time:  {time.time() - t0:.0f} s" + ("" if args.from_json else " (every site's data checked, "
                                                      "then the statistics job)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
