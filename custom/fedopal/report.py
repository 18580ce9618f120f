"""Per-site results table from the sites' metrics logs.

Model selection follows METHOD.md: test metrics are reported at the round where that site's
*validation* balanced accuracy peaked (that round is recorded), and at the final round.
"""

from __future__ import annotations

import glob
import json
import math
import os

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


def site_row(site: str, records: list[dict]) -> dict:
    best = max(records, key=lambda r: r["personalized/val/balanced_accuracy"])
    final = records[-1]
    row = {
        "site": site,
        "best_val_round": best["round"] + 1,  # 1-based, as the progress lines
        "bacc_personalized": best["personalized/test/balanced_accuracy"],
        "bacc_global_only": best.get("global_only/test/balanced_accuracy", float("nan")),
        "accuracy": best["personalized/test/accuracy"],
        "auc": best["personalized/test/auc"],
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


def _nanmean(values):
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(job_ws: str, cfg, wall_s: float) -> dict:
    records = collect_site_records(job_ws)
    if not records:
        raise RuntimeError(f"no site metrics found under {job_ws}: did the job run? See {job_ws}/*/log.txt")
    rows = [site_row(site, rs) for site, rs in records.items()]
    metric_cols = ("bacc_personalized", "bacc_global_only", "accuracy", "auc", "bacc_personalized_final")
    mean = {c: _nanmean([r[c] for r in rows]) for c in metric_cols}
    worst = min(rows, key=lambda r: r["bacc_personalized"])
    header = ("| site | best val round | bal. acc. personalized | bal. acc. global-only | accuracy | AUC | "
              "bal. acc. final round | bytes sent / round |")
    lines = [f"### {cfg.name}: {cfg.train.method}, {len(rows)} sites, {cfg.train.num_rounds} rounds "
             f"({cfg.model.backbone}, r={cfg.model.lora_rank}, head {cfg.model.head})", "",
             header, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['site']} | {r['best_val_round']} | " + " | ".join(_fmt(r[c]) for c in metric_cols[:4])
                     + f" | {_fmt(r['bacc_personalized_final'])} | {_fmt(r['bytes_per_round'])} |")
    lines.append("| **mean** | | " + " | ".join(f"**{_fmt(mean[c])}**" for c in metric_cols[:4])
                 + f" | {_fmt(mean['bacc_personalized_final'])} | |")
    lines.append(f"| worst site | {worst['site']} | {_fmt(worst['bacc_personalized'])} | | | | | |")
    lines += ["", "Test metrics at each site's best-validation round (balanced accuracy is the headline). "
              f"Wall time {wall_s:.0f} s."]
    return {"name": cfg.name, "method": cfg.train.method, "sites": rows, "mean": mean,
            "worst_site": {"site": worst["site"], "bacc_personalized": worst["bacc_personalized"]},
            "wall_s": round(wall_s, 1), "workspace": job_ws, "config": cfg.model_dump(mode="json"),
            "markdown": "\n".join(lines)}


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
