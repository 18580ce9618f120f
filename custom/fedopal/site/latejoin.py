"""A hospital that joins after the federation trained: it starts from the global adapter and learns only its own part.

    fedopal latejoin --global-model <FL_global_model.pt | a global_only export> \\
        --site-dir <folder with manifest.csv> --out <folder> [--config app_configs/demo.yaml] [--set KEY=VALUE]
    fedopal latejoin --compare --global-model ... --site-dir ... --out results/latejoin --seeds 0 1 2

Late join is the `late_join` method spec: the global adapter (and the shared head, as a starting point) come from the
federation; the global adapter stays frozen; the personal adapter and the head train on the site's own data. The
budget is one federation run's (train.num_rounds x local_epochs or local_steps), evaluated after every "round" and
selected on validation, as the federation's sites are. Nothing leaves the site. --out becomes a site state folder:
metrics.jsonl, personal_state.pt and export/{last,best}/<view>, which fedopal.site.predict loads.

--compare answers "what does joining buy a new hospital?" on the site's test split: (1) the global model with no
training, (2) late join, (3) local-only training from scratch (method `local`) with the same data, budget and lr;
over several seeds; writes compare.md and compare.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import replace

import torch

import fedopal
from fedopal.model.adapters import FedOpalModel, build_model, count_params
from fedopal.model.backbones import BackboneError
from fedopal.config import HEADLINE, ConfigError, FedOpalConfig, config_with_overrides, load_config, parse_overrides
from fedopal.site.data import DataError, build_datasets, read_manifest
from fedopal.site.device import DeviceError, resolve_device
from fedopal.site.export import (ADAPTERS, ExportError, SiteExporter, backbone_fingerprint,
                            read_manifest as read_export_manifest, read_tensors, write_view)
from fedopal.specs.methods import get_method, group_of
from fedopal.site.predict import evaluate_export
from fedopal.site.selection import site_row
from fedopal.site.state import METRICS_FILE, SiteStore
from fedopal.site.train import SiteTrainer

GLOBAL_GROUPS = ("global.A", "global.B", "head")
GLOBAL_EXPORT = "global_model"  # --compare: the federation's global model, exported for fedopal.site.predict


class LateJoinError(ValueError):
    """A global model or site that cannot be used; the message names the file and the fix."""


# -- the federation's global model ----------------------------------------------------------------------------

def load_global_model(path: str) -> tuple[dict, dict | None, int | None]:
    """(global adapter + head tensors, the config stored with them if any, the round they come from if known).

    Accepts the server's FL_global_model.pt (a dict whose "model" holds the shared tensors) or a global_only
    export folder (fedopal.site.export)."""
    if os.path.isdir(path):
        manifest = read_export_manifest(path)
        if "personal" in manifest.get("adapters", []):
            raise LateJoinError(f"{path}: a personalized export holds another site's personal adapter. "
                                "Fix: pass its global_only sibling, or the server's FL_global_model.pt.")
        exported = manifest.get("round")  # counted from 1 in exports; FLARE's current_round below counts from 0
        return (read_tensors(path, ADAPTERS, manifest), manifest.get("config"),
                exported - 1 if isinstance(exported, int) else None)
    if not os.path.isfile(path):
        raise LateJoinError(f"{path}: global model not found. Fix: pass <workspace>/<job>/server/simulate_job/"
                            "app_server/FL_global_model.pt (or the server's copy), or a global_only export folder.")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise LateJoinError(f"{path}: not a readable torch file ({type(err).__name__}). "
                            "Fix: copy FL_global_model.pt again from the server.") from None
    state = saved.get("model", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise LateJoinError(f"{path}: holds no tensor dict (expected FL_global_model.pt's 'model'). "
                            "Fix: pass the server's FL_global_model.pt.")
    round_num = (saved.get("meta_props") or {}).get("current_round") if isinstance(saved, dict) else None
    return dict(state), None, round_num


def load_into(model: FedOpalModel, tensors: dict, source: str) -> list[str]:
    """Copy the global adapter (and head, if present) into `model`. Returns the groups found.

    A federation that shares only part of the global adapter (ffa_lora: B; fedsa_lora: A) leaves the other part at
    the common init from train.seed, which every site had too; anything else that does not fit is an error."""
    own = model.state_dict()
    personal = [k for k in tensors if group_of_safe(k) not in GLOBAL_GROUPS]
    unexpected = [k for k in tensors if k not in own]
    wrong = [k for k in tensors if k in own and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if personal or unexpected or wrong:
        parts = [f"{what}: {keys[:3]}" for what, keys in (("not global", personal), ("unknown", unexpected),
                                                          ("wrong shape", wrong)) if keys]
        raise LateJoinError(f"{source}: does not fit the model of this config ({'; '.join(parts)}). "
                            "Fix: use the config the federation trained with (--config, same backbone, LoRA rank "
                            "and targets).")
    groups = sorted({group_of(k) for k in tensors})
    missing = [k for k in own if group_of(k) in groups and group_of(k) != "head" and k not in tensors]
    if not any(g.startswith("global.") for g in groups) or missing:
        raise LateJoinError(f"{source}: {'misses ' + str(missing[:3]) if missing else 'holds no global adapter'}. "
                            "Fix: pass the global model of a federation with a global adapter (not method local).")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)
    return groups


def group_of_safe(key: str) -> str:
    try:
        return group_of(key)
    except KeyError:
        return "unknown"


# -- one site's local training (late join or local-only) ------------------------------------------------------

def train_site(cfg: FedOpalConfig, method: str, site: str, datasets: dict, global_tensors: dict | None = None,
               source: str = "", out: str | None = None, log=print) -> dict:
    """cfg.train.num_rounds rounds of local training, evaluated before the first and after each; the federation's
    selection rule (selection.site_row: test at the best validation round). The evaluation before training (round -1,
    reported as best round 0) lets validation say "keep the starting model": for a late joiner that is exactly the
    global model, since the personal adapter starts with B = 0. out: a site state folder (metrics, personal state,
    export)."""
    spec = get_method(method, cfg.model.head)
    model = build_model(cfg, spec, site_name=site)
    if global_tensors is not None:
        load_into(model, global_tensors, source)
    datasets["train"].transform.set_random_state(cfg.train.seed)  # augmentation draws: the same for every method
    trainer = SiteTrainer(model, datasets, cfg.train, cfg.data.batch_size, cfg.data.num_workers,
                          resolve_device(cfg.train.device), roi_size=cfg.data.roi_size,
                          class_name=cfg.data.class_name)
    headline = HEADLINE[cfg.data.task]
    trainable = count_params({k: v for k, v in model.state_dict().items() if k in set(model.trainable_keys())})
    store = SiteStore(out) if out else None
    run_id = f"{method}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%S}"
    exporter = SiteExporter(model, cfg, out, site, datasets["train"], run_id=run_id,
                            weighting=trainer.instance_weighting) if out else None
    records, start = [], time.time()
    for round_num in range(-1, cfg.train.num_rounds):
        t0 = time.time()
        stats = trainer.train_round() if round_num >= 0 else {"task_loss": math.nan, "orth_loss": math.nan,
                                                              "steps": 0, "train_s": 0.0}
        metrics = trainer.evaluate()
        # rounds from 1, as every log a person reads; round 0 is the evaluation before any training
        record = {"round": round_num + 1, "site": site, "method": spec.name, "n_train": trainer.num_train_samples,
                  "bytes_sent": 0, "trainable_params": trainable, "wall_s": round(time.time() - t0, 3),
                  **stats, **metrics}
        records.append(record)
        if store:
            store.save_personal(model.site_state(), round_num, spec.name, metrics)
            store.append_metrics(record)
            exporter.write(round_num, metrics, cfg.train.num_rounds)
        log(f"  {spec.name} seed {cfg.train.seed} round {round_num + 1}/{cfg.train.num_rounds}: task loss "
            f"{stats['task_loss']:.3f}, val {headline.replace('_', ' ')} {metrics[f'personalized/val/{headline}']:.3f}"
            + ("  (before training)" if round_num < 0 else ""))
    row = site_row(site, records, task=cfg.data.task)
    if cfg.data.task == "segmentation":  # the comparison's columns, with Dice in the headline's place
        row |= {"bacc_personalized": row["dice_personalized"], "accuracy": float("nan"), "auc": float("nan")}
    return {"method": spec.name, "seed": cfg.train.seed, "wall_s": round(time.time() - start, 1), **row}


def limit_train(samples: list, limit: int, seed: int = 0) -> list:
    """Keep `limit` training samples, stratified by class (at least one each), the same subset for every method and
    seed: a smaller hospital. Validation and test are untouched."""
    train = [s for s in samples if s.split == "train"]
    by_class: dict[int, list] = {}
    for s in train:
        by_class.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    kept = [x for label, items in sorted(by_class.items())
            for x in rng.sample(items, min(len(items), max(1, round(limit * len(items) / len(train)))))]
    return [s for s in samples if s.split != "train"] + kept


def site_data(cfg: FedOpalConfig, site_dir: str, train_limit: int | None = None) -> tuple[str, dict]:
    """(manifest path, cached datasets) for one site folder; every model of one config shares the pipeline."""
    manifest = os.path.join(site_dir, cfg.data.manifest)
    samples = read_manifest(manifest, cfg.data.num_classes, cfg.data.class_names, task=cfg.data.task)
    if train_limit:
        samples = limit_train(samples, train_limit)
    probe = build_model(cfg, get_method("local"))  # the backbone's input channels and normalization
    data_cfg = cfg.data.for_site(os.path.basename(os.path.normpath(site_dir)))  # the site's own decoding, if set
    return manifest, build_datasets(data_cfg, samples, probe.in_channels, probe.normalization, manifest)


def export_global_model(cfg: FedOpalConfig, tensors: dict, round_num: int | None, folder: str, source: str) -> str:
    """The federation's global model as a global_only export view (fedopal.site.predict, another late join)."""
    model = build_model(cfg, replace(get_method(cfg.train.method, cfg.model.head), adapters=("global",)))
    load_into(model, tensors, source)
    return write_view(model, cfg, "global_only", ("global",), folder, round_num, {}, merged=False,
                      fingerprint=backbone_fingerprint(model), site="federation",
                      total_rounds=cfg.train.num_rounds, run_id="federation")


# -- the comparison ---------------------------------------------------------------------------------------------

ROWS = (("global_only", "global model, no training"),
        ("late_join", "late join: global frozen, personal adapter + head trained"),
        ("local", "local only: personal adapter + head from scratch"))


def _mean_sd(values: list[float]) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def compare(cfg: FedOpalConfig, global_path: str, site_dir: str, seeds: list[int], out: str,
            train_limit: int | None = None, log=print) -> dict:
    tensors, _, round_num = load_global_model(global_path)
    site = os.path.basename(os.path.normpath(site_dir))
    manifest, datasets = site_data(cfg, site_dir, train_limit)
    start = time.time()
    results: dict[str, list[dict]] = {"global_only": [], "late_join": [], "local": []}
    if "head" in {group_of(k) for k in tensors} and cfg.data.task == "segmentation":
        log("segmentation: no global-only row here; fedopal predict --model <the global export> --manifest ... "
            "gives its Dice")
    elif "head" in {group_of(k) for k in tensors}:
        folder = export_global_model(cfg, tensors, round_num, os.path.join(out, GLOBAL_EXPORT), global_path)
        m = evaluate_export(folder, manifest, split="test", device=cfg.train.device)
        results["global_only"].append({"bacc_personalized": m["balanced_accuracy"], "accuracy": m["accuracy"],
                                       "auc": m["auc"], "best_val_round": 0, "trainable_params": 0, "wall_s": 0.0,
                                       "seed": None})
        log(f"global model on {site} test, no training: balanced accuracy {m['balanced_accuracy']:.3f}")
    else:
        log("the global model has no shared head (model.head: personal): no global-only row")
    for seed in seeds:
        seeded = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
        results["late_join"].append(train_site(seeded, "late_join", site, datasets, tensors, global_path, log=log))
        results["local"].append(train_site(seeded, "local", site, datasets, log=log))
    summary = {"site": site, "site_dir": os.path.abspath(site_dir), "global_model": os.path.abspath(global_path),
               "global_round": round_num, "seeds": seeds, "budget": budget_text(cfg), "lr": cfg.train.lr,
               "train_images": len(datasets["train"]),
               "results": results, "wall_s": round(time.time() - start, 1), "fedopal_version": fedopal.__version__}
    summary["markdown"] = compare_table(summary, cfg)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "markdown"}, f, indent=2)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(summary["markdown"] + "\n")
    return summary


def budget_text(cfg: FedOpalConfig) -> str:
    per_round = f"{cfg.train.local_steps} steps" if cfg.train.local_steps else f"{cfg.train.local_epochs} epoch(s)"
    return f"{cfg.train.num_rounds} rounds x {per_round}"


def compare_table(summary: dict, cfg: FedOpalConfig) -> str:
    lines = [f"### Late joiner {summary['site']} ({summary['train_images']} training images): {cfg.model.backbone}, "
             f"r={cfg.model.lora_rank}, {summary['budget']}, lr {cfg.train.lr:g}, seeds {summary['seeds']}", "",
             f"| model on the new site | {'Dice' if cfg.data.task == 'segmentation' else 'bal. acc.'} (test) | "
             "accuracy | AUC | best val round | trained params |",
             "|---|---|---|---|---|---|"]
    for key, label in ROWS:
        runs = summary["results"][key]
        if not runs:
            continue
        rounds = sorted({r["best_val_round"] for r in runs})
        lines.append(f"| {label} | {_mean_sd([r['bacc_personalized'] for r in runs])} | "
                     f"{_mean_sd([r['accuracy'] for r in runs])} | {_mean_sd([r['auc'] for r in runs])} | "
                     f"{'-' if key == 'global_only' else ', '.join(map(str, rounds))} | "
                     f"{runs[0]['trainable_params']:,} |")
    lines += ["", "Test metrics at the best-validation round (mean ± sd over seeds; round 0 = the model before "
              "training); the global model is evaluated as is. Wall time "
              f"{summary['wall_s']:.0f} s."]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--global-model", required=True, help="FL_global_model.pt, or a global_only export folder")
    p.add_argument("--site-dir", required=True, help="the new site's folder, holding its manifest")
    p.add_argument("--out", required=True, help="late join: the site's state folder; --compare: the results folder")
    p.add_argument("--config", help="the federation's config (default: the one stored in a global export)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--site-name", help="default: the site folder's name (seeds the personal adapter)")
    p.add_argument("--compare", action="store_true", help="global model vs late join vs local only, on test")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: train.seed")
    p.add_argument("--train-limit", type=int, default=None, metavar="N",
                   help="--compare: use only N of the site's training images (stratified), as a smaller hospital")
    args = p.parse_args(argv)
    try:
        tensors, stored_cfg, _ = load_global_model(args.global_model)
        overrides = parse_overrides(args.set)
        if args.config:
            cfg = load_config(args.config, overrides)
        elif stored_cfg is not None:
            cfg = config_with_overrides(stored_cfg, overrides, args.global_model)
        else:
            raise ConfigError(f"{args.global_model}: carries no config. Fix: pass --config, the federation's config "
                              "(e.g. app_configs/demo.yaml).")
        torch.set_num_threads(cfg.train.threads)
        seeds = args.seeds or [cfg.train.seed]
        if args.compare:
            summary = compare(cfg, args.global_model, args.site_dir, seeds, args.out, args.train_limit)
            print(summary["markdown"])
            print(f"written: {os.path.join(args.out, 'compare.md')} and compare.json")
            return 0
        if args.train_limit:
            raise ConfigError("--train-limit only simulates a smaller site in --compare. Fix: drop it, or add "
                              "--compare.")
        if os.path.isfile(os.path.join(args.out, METRICS_FILE)):
            raise LateJoinError(f"{args.out}: already holds a run ({METRICS_FILE}). Fix: choose another --out, "
                                "or move that folder away.")
        site = args.site_name or os.path.basename(os.path.normpath(args.site_dir))
        seeded = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seeds[0]})})
        _, datasets = site_data(seeded, args.site_dir)
        row = train_site(seeded, "late_join", site, datasets, tensors, args.global_model, out=args.out)
    except (LateJoinError, ExportError, DataError, ConfigError, BackboneError, DeviceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{site} joined: test {'Dice' if cfg.data.task == 'segmentation' else 'balanced accuracy'} "
          f"{row['bacc_personalized']:.3f} at the best validation round "
          f"{row['best_val_round']} ({row['trainable_params']:,} trained params, {row['wall_s']:.0f} s)")
    print(f"model: {os.path.join(args.out, 'export', 'best', 'personalized')} (fedopal predict --model ...)")
    return 0



if __name__ == "__main__":
    sys.exit(main())
