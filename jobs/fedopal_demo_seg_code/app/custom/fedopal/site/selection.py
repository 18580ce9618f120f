"""Which round a site reports: test metrics at the round where its validation balanced accuracy (segmentation: Dice)
peaked.

One rule for every table (the job summary, the benchmark, the late joiner) and for the site's `best` export
(METHOD.md): never selected on test. Under differential privacy in update mode, the rounds before the first noised
global model came back are not eligible (`first_eligible_round`): round 1 trains from the clean initial global model,
so its numbers say nothing about what DP leaves of the federation.
"""

from __future__ import annotations

import math


def first_eligible_round(cfg) -> int:
    """The first round (counted from 1, as in metrics.jsonl) whose numbers may be reported: under DP in update mode,
    round 1 trains from the clean initial global model (no noised update had come back yet), so it is not eligible."""
    return 2 if cfg.privacy.enabled and cfg.privacy.mode == "update" else 1


def defined(v) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v)


def best_round(records: list[dict], key: str = "personalized/val/balanced_accuracy",
               first_eligible_round: int = 0) -> dict | None:
    """The record where `key` peaked (ties: the earlier round) among rounds >= first_eligible_round; None
    where it is undefined in every eligible round (a val split with one class has no balanced accuracy)."""
    eligible = [r for r in records if r["round"] >= first_eligible_round and defined(r.get(key, math.nan))]
    return max(eligible, key=lambda r: r[key]) if eligible else None


def interval(record: dict, key: str) -> list[float] | None:
    """[low, high] of the metric `key` in a metrics.jsonl record, None where the record has none."""
    low, high = record.get(f"{key}_ci_low"), record.get(f"{key}_ci_high")
    return [low, high] if low is not None and high is not None else None


def site_row(site: str, records: list[dict], first_eligible_round: int = 0, task: str = "classification") -> dict:
    if task == "segmentation":
        return segmentation_row(site, records, first_eligible_round)
    best = best_round(records, first_eligible_round=first_eligible_round)
    final = records[-1]
    chosen = best or final  # no measurable validation round: report the final round, and say so
    row = {
        "site": site,
        "best_val_round": best["round"] if best else "n/a (final)",
        "bacc_personalized": chosen["personalized/test/balanced_accuracy"],
        "bacc_global_only": chosen.get("global_only/test/balanced_accuracy", float("nan")),
        "accuracy": chosen["personalized/test/accuracy"],
        "auc": chosen["personalized/test/auc"],
        # 95 % bootstrap intervals over the site's test images (site.intervals); None in logs that predate them
        "bacc_personalized_ci": interval(chosen, "personalized/test/balanced_accuracy"),
        "auc_ci": interval(chosen, "personalized/test/auc"),
        "bacc_personalized_final": final["personalized/test/balanced_accuracy"],
        "bytes_per_round": final["bytes_sent"],
        "trainable_params": final["trainable_params"],
        "rounds": len(records),
    }
    return row




def segmentation_row(site: str, records: list[dict], first_eligible_round: int = 0) -> dict:
    """A segmentation site's row: test Dice (with its interval), HD95 and each class's Dice at the round where its
    validation Dice peaked."""
    best = best_round(records, "personalized/val/dice", first_eligible_round)
    final = records[-1]
    chosen = best or final
    prefix = "personalized/test/dice/"
    return {
        "site": site,
        "best_val_round": best["round"] if best else "n/a (final)",
        "dice_personalized": chosen["personalized/test/dice"],
        "dice_global_only": chosen.get("global_only/test/dice", float("nan")),
        "hd95": chosen["personalized/test/hd95"],
        "dice_per_class": {k[len(prefix):]: v for k, v in chosen.items() if k.startswith(prefix)},
        "dice_personalized_ci": interval(chosen, "personalized/test/dice"),
        "dice_personalized_final": final["personalized/test/dice"],
        "bytes_per_round": final["bytes_sent"],
        "trainable_params": final["trainable_params"],
        "rounds": len(records),
    }
