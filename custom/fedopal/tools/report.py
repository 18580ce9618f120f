"""Per-site results table from the sites' metrics logs, plus what the server recorded.

Model selection follows METHOD.md: test metrics are reported at the round where that site's
*validation* balanced accuracy peaked (that round is recorded), and at the final round.
From the server's side (where the job's workspace holds it): the bytes each site's updates took on the wire, the
privacy loss epsilon each site's updates carried (differential privacy), and NVFlare's cross-site evaluation
(`cross_val_results.json`) as a model x site matrix.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

import fedopal
from fedopal.config import HEADLINE
from fedopal.site.selection import defined as _defined, first_eligible_round, site_row
from fedopal.specs.methods import get_method
from fedopal.site.state import METRICS_FILE, read_metrics, simulation_state_root


def metrics_files(job_ws: str) -> list[str]:
    """Every site's metrics log of a job: in its workspace (POC, downloads) or beside it (simulator)."""
    roots = [job_ws, simulation_state_root(job_ws)]
    return sorted(p for root in roots for p in glob.glob(os.path.join(root, "**", METRICS_FILE), recursive=True))


UPDATES_LOG = os.path.join("app_server", "fedopal_updates.jsonl")
CROSS_VAL_RESULTS = os.path.join("cross_site_val", "cross_val_results.json")


def _server_file(job_ws: str, name: str) -> str | None:
    """A server-side file of a job: the simulator's <ws>/server/simulate_job/..., or a download's workspace/..."""
    for root in (os.path.join(job_ws, "server", "simulate_job"), os.path.join(job_ws, "workspace")):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def updates_log(job_ws: str) -> list[dict]:
    """Every update the server's aggregator received (aggregator.UPDATES_LOG), [] where the job has none here."""
    from fedopal.server.recorder import read_wire_log  # one JSON line per entry, as this log

    path = _server_file(job_ws, UPDATES_LOG)
    return read_wire_log(path) if path else []


WIRE_LOG = os.path.join("app_server", "fedopal_wire.jsonl")


def wire_log(job_ws: str) -> list[dict]:
    """Every message the sites sent, as the server's WireRecorder wrote it ([] where the job has none here)."""
    from fedopal.server.recorder import read_wire_log

    path = _server_file(job_ws, WIRE_LOG)
    return read_wire_log(path) if path else []


def wire_fields(lines: list[dict], policy) -> dict:
    """The wire audit of one job: every field the sites sent, per task, held against the wire contract and `policy`
    (specs.contract.WirePolicy). Tensors are counted by group; FLARE's protocol fields (headers, cookies, context
    props) by name. Returns {"messages": {task: n}, "fields": [...], "violations": [...]}, where a violation is a
    field outside the contract or the policy, a personal tensor, or (under DP) a data-derived field that is not
    noised and that the policy does not name."""
    from fedopal.specs.contract import is_protocol, site_field
    from fedopal.specs.methods import group_of

    messages: dict[str, int] = {}
    fields: dict[tuple, dict] = {}
    violations = []
    for index, line in enumerate(lines):
        task = "event" if line["kind"] == "event" else line.get("task") or "unknown"
        messages[task] = messages.get(task, 0) + 1
        for where, name in line["fields"]:
            protocol = is_protocol(where, name, task)
            field = None if protocol else site_field(where, name, task)
            shown = name
            if where == "tensor":
                try:
                    shown = group_of(name)
                except KeyError:
                    shown = name
            entry = fields.setdefault((task, where, shown), {
                "task": task, "where": where, "name": shown, "contract": field.name if field else None,
                "protocol": protocol, "from_data": bool(field and field.from_data), "dp": field.dp if field else None,
                "messages": set(), "names": set(), "sites": set()})
            entry["messages"].add(index)
            entry["names"].add(name)
            entry["sites"].add(line.get("site"))
            problem = None
            if not protocol and field is None:
                problem = "not in the wire contract"
            elif not policy.allows(where, name, task):
                problem = "not allowed by the policy"
            elif where == "tensor" and shown.startswith("personal."):
                problem = "a personal tensor"
            if problem:
                violations.append({"task": task, "site": line.get("site"), "where": where, "name": name,
                                   "problem": problem})
    rows = sorted(fields.values(), key=lambda f: (f["task"], not f["protocol"], f["where"], f["name"]))
    for row in rows:
        row["sites"] = sorted(s for s in row["sites"] if s)
        row["messages"], row["distinct_names"] = len(row["messages"]), len(row.pop("names"))
    return {"messages": messages, "fields": rows, "violations": violations}


def site_epsilons(job_ws: str) -> dict[str, float]:
    """Per site, the privacy loss epsilon its last update carried (its accountant covers every round before); sites
    without differential privacy are absent."""
    out: dict[str, tuple[int, float]] = {}
    for r in updates_log(job_ws):
        eps = r.get("epsilon")
        if eps is not None and (r["site"] not in out or r["round"] >= out[r["site"]][0]):
            out[r["site"]] = (r["round"], eps)
    return {site: eps for site, (_, eps) in sorted(out.items())}


def cross_site_matrix(job_ws: str, metric: str = "balanced_accuracy", model: str = "SRV_FL_global_model.pt") -> dict | None:
    """NVFlare's cross-site evaluation as a matrix: rows = models (the final global model, then each site's
    personalized model), columns = the sites whose test split evaluated them. A personalized model is evaluated on
    its own site only (its personal tensors never leave), so the other cells are None. Returns None if the job ran
    no cross-site evaluation. The global row uses the global-only view (personal adapter off; a personal head is
    the evaluating site's own)."""
    path = _server_file(job_ws, CROSS_VAL_RESULTS)
    if path is None:
        return None
    with open(path) as f:
        results = json.load(f)
    if not results:  # FLARE leaves an empty results file in jobs that ran no cross-site evaluation
        return None
    sites = sorted(results)
    rows = ["global"] + sites

    def value(site: str, view: str):
        metrics = results[site].get(model) or {}
        v = metrics.get(f"{view}/test/{metric}", metrics.get(f"personalized/test/{metric}") if view == "global_only"
                        else None)
        return v if _defined(v) else None

    matrix = [[value(site, "global_only") for site in sites]]
    matrix += [[value(site, "personalized") if site == row else None for site in sites] for row in sites]
    return {"metric": f"test {metric}", "model": model, "rows": rows, "columns": sites, "values": matrix}


def plot_cross_site(matrix: dict, path: str, title: str) -> None:
    """The cross-site matrix as a heat map; cells that cannot exist (a personalized model on another site) grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in matrix["values"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.3 * len(matrix["columns"]) + 2.5, 0.6 * len(matrix["rows"]) + 1.6))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.5, vmax=1.0)
    ax.set_xticks(range(len(matrix["columns"])), matrix["columns"])
    ax.set_yticks(range(len(matrix["rows"])), [r if r == "global" else f"{r} personalized" for r in matrix["rows"]])
    ax.set_xlabel("test split of site")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "stays on site" if np.isnan(v) and i > 0 else ("n/a" if np.isnan(v) else f"{v:.3f}"),
                    ha="center", va="center", fontsize=7, color="black" if np.isnan(v) or v > 0.75 else "white")
    fig.colorbar(image, ax=ax, label=matrix["metric"])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cross_site_markdown(matrix: dict) -> str:
    lines = [f"Cross-site evaluation (NVFlare), {matrix['metric']}: rows are models, columns the site whose test split "
             "evaluated them. Every row comes from the final round (the global model the server kept, each site's "
             "personal state after its last round), not from the best-validation round of the table above.", "", "| model | " + " | ".join(matrix["columns"]) + " |",
             "|---|" + "---|" * len(matrix["columns"])]
    for name, row in zip(matrix["rows"], matrix["values"]):
        label = "global (final)" if name == "global" else f"{name} personalized"
        lines.append(f"| {label} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)


def collect_site_records(job_ws: str) -> dict[str, list[dict]]:
    """Per site, one record per round (a resumed job's rounds follow the aborted job's; a round that ran
    twice, once before the abort and once after, counts with its last run)."""
    records: dict[str, dict[int, dict]] = {}
    for path in metrics_files(job_ws):
        for r in read_metrics(os.path.dirname(path)):
            records.setdefault(r["site"], {})[r["round"]] = r
    return {site: [rs[k] for k in sorted(rs)] for site, rs in sorted(records.items())}


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _fmt_ci(value, ci) -> str:
    """'0.889 [0.832, 0.941]': a site's value with its 95 % interval, where it has one."""
    if not ci or not _defined(value) or not all(_defined(b) for b in ci):
        return _fmt(value)
    return f"{_fmt(value)} [{ci[0]:.2f}, {ci[1]:.2f}]"


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
    first = first_eligible_round(cfg)
    rows = [site_row(site, rs, first, cfg.data.task) for site, rs in records.items()]
    epsilons = site_epsilons(job_ws)
    wire = {}
    for r in updates_log(job_ws):
        wire.setdefault(r["site"], []).append(r.get("wire_bytes", r["bytes"]))
    for r in rows:
        if r["site"] in wire:  # what the server received (after quantization), not what the script handed FLARE
            r["bytes_per_round"] = round(sum(wire[r["site"]]) / len(wire[r["site"]]))
        r["epsilon"] = epsilons.get(r["site"])
    has_dp = any(r["epsilon"] is not None for r in rows)
    if cfg.data.task == "segmentation":
        lines, mean, coverage, worst = segmentation_table(rows, cfg, has_dp)
        lines += ["", _epsilon_note(job_ws, cfg)] if has_dp else []
        return _summary(job_ws, cfg, wall_s, rows, lines, mean, coverage, worst, epsilons, first, "dice")
    metric_cols = ("bacc_personalized", "bacc_global_only", "accuracy", "auc", "bacc_personalized_final")
    means = {c: covered_mean([r[c] for r in rows]) for c in metric_cols}
    mean = {c: m for c, (m, _) in means.items()}
    coverage = {c: n for c, (_, n) in means.items()}
    measured = [r for r in rows if _defined(r["bacc_personalized"])]
    worst = min(measured, key=lambda r: r["bacc_personalized"]) if measured else None
    total = len(rows)
    has_global = any(_defined(r["bacc_global_only"]) for r in rows)
    header = ("| site | best val round | bal. acc. personalized | bal. acc. global-only | accuracy | AUC | "
              "bal. acc. final round | bytes sent / round |" + (" epsilon |" if has_dp else ""))
    eps_cell = lambda r: (f" {_fmt(r['epsilon'])} |" if r["epsilon"] is not None else " none |") if has_dp else ""  # noqa: E731
    head = get_method(cfg.train.method, cfg.model.head).head
    lines = [f"### {cfg.name}: {cfg.train.method}, {len(rows)} sites, {cfg.train.num_rounds} rounds "
             f"({cfg.model.backbone}, r={cfg.model.lora_rank}, {head} head)", "",
             header, "|" + "---|" * (9 if has_dp else 8)]
    cell = {"bacc_personalized": "bacc_personalized_ci", "auc": "auc_ci"}  # the columns shown with their interval
    for r in rows:
        lines.append(f"| {r['site']} | {_fmt(r['best_val_round'])} | "
                     + " | ".join(_fmt_ci(r[c], r.get(cell.get(c, ""))) for c in metric_cols[:4])
                     + f" | {_fmt(r['bacc_personalized_final'])} | {_fmt(r['bytes_per_round'])} |" + eps_cell(r))
    lines.append("| **mean** | | " + " | ".join(
        _fmt_mean(mean[c], coverage[c], total) if c != "bacc_global_only" or has_global else "**n/a**"
        for c in metric_cols[:4]) + f" | {_fmt_mean(mean['bacc_personalized_final'], coverage['bacc_personalized_final'], total, bold=False)} | |"
        + (" |" if has_dp else ""))
    if worst is not None:
        lines.append(f"| worst site | {worst['site']} | {_fmt(worst['bacc_personalized'])} | | | | | |"
                     + (" |" if has_dp else ""))
    notes = ["Test metrics at each site's best-validation round (balanced accuracy is the headline)."]
    if any(r.get("bacc_personalized_ci") for r in rows):
        notes.append("[low, high]: the 95 % bootstrap interval over the site's test images, stratified by class "
                     "(docs/results.md, \"Intervals\").")
    if first > 1:  # rounds from 1: before `first`, no noised update had come back (DP, update mode)
        excluded = "Round 1" if first == 2 else f"Rounds 1-{first - 1}"
        notes.append(f"{excluded} trained from a global model that had not yet received a noised update "
                     "(differential privacy, update mode): never selected, so the headline reflects what DP leaves "
                     "of the federation.")
    if any(not _defined(r[c]) for r in rows for c in ("bacc_personalized", "auc")):
        notes.append("n/a: undefined on that site's split (one class present: no balanced accuracy or AUC); a mean "
                     "over fewer sites says how many it covers.")
    if any(isinstance(r["best_val_round"], str) for r in rows):
        notes.append("n/a (final): the validation split cannot rank rounds (one class), so the final round is shown.")
    if has_dp:
        notes.append(_epsilon_note(job_ws, cfg))
    lines += ["", " ".join(notes)]
    return _summary(job_ws, cfg, wall_s, rows, lines, mean, coverage,
                    {"site": worst["site"], "bacc_personalized": worst["bacc_personalized"]} if worst else None,
                    epsilons, first, "balanced_accuracy")


def _epsilon_note(job_ws: str, cfg) -> str:
    p = cfg.privacy
    units = sorted({rec.get("unit", "?") for r in updates_log(job_ws) for rec in (r.get("dp") or [])
                    if isinstance(rec, dict)})
    unit = {"site": "the site's whole dataset", "patient": "per patient", "image": "per image"}
    return (f"epsilon: each site's privacy loss after its last round at delta {p.delta:g}, "
            f"{' / '.join(unit.get(u, u) for u in units)} (privacy.mode {p.mode}, {p.accountant.upper()} "
            "accountant; the tightest bound among the mechanisms applied), as its updates told the server.")


def segmentation_table(rows: list[dict], cfg, has_dp: bool) -> tuple[list[str], dict, dict, dict | None]:
    """(markdown lines, mean, sites covered per mean, worst site) of a segmentation job: test Dice with its
    interval, global-only Dice, each foreground class's Dice (with several), HD95, Dice at the final round."""
    classes = list(rows[0]["dice_per_class"]) if rows else []
    per_class = len(classes) > 1
    cols = ["dice_personalized", "dice_global_only", "hd95", "dice_personalized_final"]
    means = {c: covered_mean([r[c] for r in rows]) for c in cols}
    means |= {f"dice/{k}": covered_mean([r["dice_per_class"].get(k, float("nan")) for r in rows]) for k in classes}
    mean = {c: m for c, (m, _) in means.items()}
    coverage = {c: n for c, (_, n) in means.items()}
    measured = [r for r in rows if _defined(r["dice_personalized"])]
    worst = min(measured, key=lambda r: r["dice_personalized"]) if measured else None
    total, head = len(rows), get_method(cfg.train.method, cfg.model.head).head
    class_cols = [f"Dice {k}" for k in classes] if per_class else []
    header = (["site", "best val round", "Dice personalized", "Dice global-only", *class_cols, "HD95 (px)",
               "Dice final round", "bytes sent / round"] + (["epsilon"] if has_dp else []))
    lines = [f"### {cfg.name}: {cfg.train.method}, {len(rows)} sites, {cfg.train.num_rounds} rounds "
             f"({cfg.model.backbone}, r={cfg.model.lora_rank}, {head} decoder)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["site"], _fmt(r["best_val_round"]), _fmt_ci(r["dice_personalized"], r["dice_personalized_ci"]),
                 _fmt(r["dice_global_only"]), *[_fmt(r["dice_per_class"].get(k)) for k in classes if per_class],
                 _fmt(r["hd95"]), _fmt(r["dice_personalized_final"]), _fmt(r["bytes_per_round"])]
        lines.append("| " + " | ".join(cells + ([_fmt(r["epsilon"]) if r["epsilon"] is not None else "none"]
                                                  if has_dp else [])) + " |")
    cells = ["**mean**", "", *[_fmt_mean(mean[c], coverage[c], total) for c in cols[:2]],
             *[_fmt_mean(mean[f"dice/{k}"], coverage[f"dice/{k}"], total) for k in classes if per_class],
             _fmt_mean(mean["hd95"], coverage["hd95"], total, bold=False),
             _fmt_mean(mean["dice_personalized_final"], coverage["dice_personalized_final"], total, bold=False), ""]
    lines.append("| " + " | ".join(cells + ([""] if has_dp else [])) + " |")
    notes = ["Test metrics at each site's best-validation round (mean Dice over the foreground classes is the "
             "headline; [low, high]: its 95 % bootstrap interval over the site's test images). HD95: the 95th "
             "percentile Hausdorff distance in pixels (voxels) of the model's grid, data.image_size per axis."]
    lines += ["", " ".join(notes)]
    return lines, mean, coverage, ({"site": worst["site"], "dice_personalized": worst["dice_personalized"]}
                                   if worst else None)


def _summary(job_ws, cfg, wall_s, rows, lines, mean, coverage, worst, epsilons, first, metric) -> dict:
    """The summary both tasks share: the table's lines, then cross-site evaluation and the wire audit."""
    matrix = cross_site_matrix(job_ws, metric)
    if matrix is not None and all(v is None for row in matrix["values"] for v in row):
        lines += ["", "Cross-site evaluation ran; its metrics stayed at the sites (the wire policy lets no test "
                      "metric out: differential privacy, or a site's own policy)."]
        matrix = None
    if matrix is not None:
        lines += ["", cross_site_markdown(matrix)]
    from fedopal.specs.contract import policy_for_job

    spec = get_method(cfg.train.method, cfg.model.head)
    wire = wire_fields(wire_log(job_ws), policy_for_job(spec.shared, cfg.privacy.enabled, cfg.privacy.allow_fields))
    return {"name": cfg.name, "method": cfg.train.method, "sites": rows, "mean": mean, "wire": wire,
            "fedopal_version": fedopal.__version__, "first_eligible_round": first,
            "mean_sites": coverage, "worst_site": worst,
            "epsilon": epsilons or None, "cross_site": matrix,
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


def plot_rounds(records: dict[str, list[dict]], path: str, title: str, first_eligible: int = 1,
                selected: dict[str, int] | None = None, metric: str = "balanced_accuracy") -> None:
    """Balanced accuracy (or `metric`, e.g. dice) against rounds, per site: personalized (solid) and global-only (dashed), on test. Rounds
    before `first_eligible` (no noised global model yet, DP update mode) are shaded and labelled. `selected`: each
    site's round the summary table reports (its best validation round), marked with a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (site, rs) in enumerate(records.items()):
        rounds = [r["round"] for r in rs]
        color = f"C{i}"
        ax.plot(rounds, [r[f"personalized/test/{metric}"] for r in rs], "-o", color=color,
                label=f"{site} personalized")
        if f"global_only/test/{metric}" in rs[0]:
            ax.plot(rounds, [r[f"global_only/test/{metric}"] for r in rs], "--", color=color,
                    label=f"{site} global-only")
        chosen = [r for r in rs if (selected or {}).get(site) == r["round"]]
        if chosen:
            ax.plot([chosen[0]["round"]], [chosen[0][f"personalized/test/{metric}"]], "*", color=color,
                    markersize=15, markeredgecolor="black",
                    label="round in the table (best validation)" if i == 0 else None)
    if first_eligible > 1:
        ax.axvspan(0.5, first_eligible - 0.5, color="grey", alpha=0.15, label="before any noised update (not selected)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {metric.replace('_', ' ')}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(summary: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    selected = {r["site"]: r["best_val_round"] for r in summary["sites"] if isinstance(r["best_val_round"], int)}
    plot_rounds(collect_site_records(summary["workspace"]), os.path.join(out_dir, "rounds.png"),
                f"{summary['name']}: {summary['method']}", summary.get("first_eligible_round", 1), selected,
                HEADLINE[summary["config"]["data"]["task"]])
    if summary.get("cross_site"):
        plot_cross_site(summary["cross_site"], os.path.join(out_dir, "cross_site.png"),
                        f"{summary['name']}: {summary['method']}, cross-site evaluation after the final round "
                        f"({summary['config']['train']['num_rounds']})")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k not in ("markdown", "wire")}, f, indent=2)
    with open(os.path.join(out_dir, "wire_fields.json"), "w") as f:  # the wire audit (docs/privacy.md's table)
        json.dump({"name": summary["name"], "method": summary["method"],
                   "privacy": summary["config"]["privacy"], **summary["wire"]}, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary["markdown"] + "\n")
