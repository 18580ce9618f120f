"""Per-site results table from the sites' metrics logs.

Model selection follows METHOD.md: test metrics are reported at the round where that site's
*validation* balanced accuracy peaked (that round is recorded), and at the final round.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

from fedopal.methods import get_method
from fedopal.site_state import METRICS_FILE, read_metrics, simulation_state_root


def metrics_files(job_ws: str) -> list[str]:
    """Every site's metrics log of a job: in its workspace (POC, downloads) or beside it (simulator)."""
    roots = [job_ws, simulation_state_root(job_ws)]
    return sorted(p for root in roots for p in glob.glob(os.path.join(root, "**", METRICS_FILE), recursive=True))


def collect_site_records(job_ws: str) -> dict[str, list[dict]]:
    """Per site, one record per round (a resumed job's rounds follow the aborted job's; a round that ran
    twice, once before the abort and once after, counts with its last run)."""
    records: dict[str, dict[int, dict]] = {}
    for path in metrics_files(job_ws):
        for r in read_metrics(os.path.dirname(path)):
            records.setdefault(r["site"], {})[r["round"]] = r
    return {site: [rs[k] for k in sorted(rs)] for site, rs in sorted(records.items())}


def _defined(v) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v)


def best_round(records: list[dict], key: str = "personalized/val/balanced_accuracy") -> dict | None:
    """The record where `key` peaked (ties: the earlier round); None where it is undefined in every round (a val
    split with one class has no balanced accuracy)."""
    defined = [r for r in records if _defined(r.get(key, math.nan))]
    return max(defined, key=lambda r: r[key]) if defined else None


def site_row(site: str, records: list[dict]) -> dict:
    best = best_round(records)
    final = records[-1]
    chosen = best or final  # no measurable validation round: report the final round, and say so
    row = {
        "site": site,
        "best_val_round": best["round"] + 1 if best else "n/a (final)",  # 1-based, as the progress lines
        "bacc_personalized": chosen["personalized/test/balanced_accuracy"],
        "bacc_global_only": chosen.get("global_only/test/balanced_accuracy", float("nan")),
        "accuracy": chosen["personalized/test/accuracy"],
        "auc": chosen["personalized/test/auc"],
        "bacc_personalized_final": final["personalized/test/balanced_accuracy"],
        "bytes_per_round": final["bytes_sent"],
        "trainable_params": final["trainable_params"],
        "rounds": len(records),
    }
    return row


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def covered_mean(values: list[float]) -> tuple[float, int]:
    """(mean over the defined values, how many there were): a mean must say how many sites it covers."""
    vals = [v for v in values if _defined(v)]
    return (sum(vals) / len(vals) if vals else float("nan")), len(vals)


def _fmt_mean(mean: float, covered: int, total: int, bold: bool = True) -> str:
    text = f"**{_fmt(mean)}**" if bold else _fmt(mean)
    return text if covered == total else f"{text} ({covered}/{total} sites)"


def summarize(job_ws: str, cfg, wall_s: float) -> dict:
    records = collect_site_records(job_ws)
    if not records:
        raise RuntimeError(f"no site metrics found under {job_ws}: did the job run? See {job_ws}/*/log.txt")
    rows = [site_row(site, rs) for site, rs in records.items()]
    metric_cols = ("bacc_personalized", "bacc_global_only", "accuracy", "auc", "bacc_personalized_final")
    means = {c: covered_mean([r[c] for r in rows]) for c in metric_cols}
    mean = {c: m for c, (m, _) in means.items()}
    coverage = {c: n for c, (_, n) in means.items()}
    measured = [r for r in rows if _defined(r["bacc_personalized"])]
    worst = min(measured, key=lambda r: r["bacc_personalized"]) if measured else None
    total = len(rows)
    has_global = any(_defined(r["bacc_global_only"]) for r in rows)
    header = ("| site | best val round | bal. acc. personalized | bal. acc. global-only | accuracy | AUC | "
              "bal. acc. final round | bytes sent / round |")
    head = get_method(cfg.train.method, cfg.model.head).head
    lines = [f"### {cfg.name}: {cfg.train.method}, {len(rows)} sites, {cfg.train.num_rounds} rounds "
             f"({cfg.model.backbone}, r={cfg.model.lora_rank}, {head} head)", "",
             header, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['site']} | {_fmt(r['best_val_round'])} | "
                     + " | ".join(_fmt(r[c]) for c in metric_cols[:4])
                     + f" | {_fmt(r['bacc_personalized_final'])} | {_fmt(r['bytes_per_round'])} |")
    lines.append("| **mean** | | " + " | ".join(
        _fmt_mean(mean[c], coverage[c], total) if c != "bacc_global_only" or has_global else "**n/a**"
        for c in metric_cols[:4]) + f" | {_fmt_mean(mean['bacc_personalized_final'], coverage['bacc_personalized_final'], total, bold=False)} | |")
    if worst is not None:
        lines.append(f"| worst site | {worst['site']} | {_fmt(worst['bacc_personalized'])} | | | | | |")
    notes = ["Test metrics at each site's best-validation round (balanced accuracy is the headline)."]
    if any(not _defined(r[c]) for r in rows for c in ("bacc_personalized", "auc")):
        notes.append("n/a: undefined on that site's split (one class present: no balanced accuracy or AUC); a mean "
                     "over fewer sites says how many it covers.")
    if any(isinstance(r["best_val_round"], str) for r in rows):
        notes.append("n/a (final): the validation split cannot rank rounds (one class), so the final round is shown.")
    lines += ["", " ".join(notes)]
    return {"name": cfg.name, "method": cfg.train.method, "sites": rows, "mean": mean,
            "mean_sites": coverage,
            "worst_site": ({"site": worst["site"], "bacc_personalized": worst["bacc_personalized"]} if worst
                           else None),
            "wall_s": round(wall_s, 1), "workspace": job_ws, "config": cfg.model_dump(mode="json"),
            "markdown": "\n".join(lines)}


# a site's own one-line errors (DataError, StateError, BackboneError, ...), as the site's log records them
_FEDOPAL_ERROR = re.compile(r"^fedopal\.[\w.]+\.(\w+Error): (.+)$")
_ANY_ERROR = re.compile(r"^([\w.]+(?:Error|Exception)): (.+)$")


def simulation_failure(job_ws: str) -> str:
    """One line for a simulation that failed: the failing site, its own error, and where its log is."""
    logs = sorted(glob.glob(os.path.join(job_ws, "*", "log.txt")))
    for pattern in (_FEDOPAL_ERROR, _ANY_ERROR):
        for log in logs:
            if os.path.basename(os.path.dirname(log)) == "server":
                continue
            with open(log, errors="replace") as f:
                for line in f:
                    match = pattern.match(line.strip())
                    if match and "abort" not in match.group(2):
                        site = os.path.basename(os.path.dirname(log))
                        text = match.group(2) if pattern is _FEDOPAL_ERROR else f"{match.group(1)}: {match.group(2)}"
                        return f"{site}: {text} (log: {log})"
    server_log = os.path.join(job_ws, "server", "log.txt")
    return (f"the simulation failed and no site logged an error. Fix: read {server_log if os.path.isfile(server_log) else job_ws} "
            "for the cause.")


def plot_rounds(records: dict[str, list[dict]], path: str, title: str) -> None:
    """Balanced accuracy against rounds, per site: personalized (solid) and global-only (dashed), on test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (site, rs) in enumerate(records.items()):
        rounds = [r["round"] + 1 for r in rs]
        color = f"C{i}"
        ax.plot(rounds, [r["personalized/test/balanced_accuracy"] for r in rs], "-o", color=color,
                label=f"{site} personalized")
        if "global_only/test/balanced_accuracy" in rs[0]:
            ax.plot(rounds, [r["global_only/test/balanced_accuracy"] for r in rs], "--", color=color,
                    label=f"{site} global-only")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test balanced accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(summary: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    plot_rounds(collect_site_records(summary["workspace"]), os.path.join(out_dir, "rounds.png"),
                f"{summary['name']}: {summary['method']}")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "markdown"}, f, indent=2)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary["markdown"] + "\n")
