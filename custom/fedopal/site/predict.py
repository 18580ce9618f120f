"""Run an exported site model on new images or volumes: class probabilities to a CSV, metrics when labels exist.

    fedopal predict --model <site state>/export/best/personalized --manifest site-1/manifest.csv --split test
    fedopal predict --model <site state>/export/best/global_only --input scans/ --out predictions.csv
    fedopal predict --model ... --input scans/ --merged        # the merged copy: no peft needed

Images go through the same MONAI pipeline as in training (evaluation transforms, the backbone's normalization),
configured by the config stored in the export. `--manifest` takes a CSV with a `path` column and optional `label`
and `split` columns, so a site's training manifest works as it is.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile

import numpy as np
import torch

from fedopal.model.backbones import BackboneError
from fedopal.config import ConfigError, parse_overrides
from fedopal.site.data import UNLABELED, DataError, Sample, build_inference_dataset, find_inputs, loader, read_input_manifest
from fedopal.site.device import DeviceError, autocast, resolve_device
from fedopal.site.export import ExportError, load_exported
from fedopal.site.train import classification_metrics

SPLIT_CHOICES = ("train", "val", "test", "all")


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, cfg, samples: list[Sample], batch_size: int | None = None,
                          progress: bool = False, source: str = "", device: str = "auto") -> np.ndarray:
    """(N, num_classes) softmax probabilities (float32), in the order of `samples`. The model runs on `device`
    (a train.device value; DeviceError if it is not there) in the config's train.precision."""
    from tqdm import tqdm

    dataset = build_inference_dataset(cfg.data, samples, model.in_channels, model.normalization, source)
    where = resolve_device(device)
    model.to(where).eval()
    probs = []
    # disable=None: a bar on a terminal, silence in logs and pipes
    with tqdm(total=len(dataset), unit="image", desc="predict", disable=None if progress else True,
              file=sys.stderr) as bar:
        for batch in loader(dataset, batch_size or cfg.data.batch_size * 2, shuffle=False,
                            num_workers=cfg.data.num_workers, pin_memory=where.type == "cuda"):
            with autocast(where, cfg.train.precision):
                logits = model(batch["image"].to(where, non_blocking=True))
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            bar.update(len(batch["image"]))
    return np.concatenate(probs)


def select_split(samples: list[Sample], split: str, source: str) -> list[Sample]:
    if split == "all":
        return samples
    if not any(s.split for s in samples):
        raise DataError(f"{source}: no 'split' column, so --split {split} selects nothing. "
                        "Fix: drop --split, or add a split column.")
    chosen = [s for s in samples if s.split == split]
    if not chosen:
        raise DataError(f"{source}: no row has split '{split}'. Fix: choose another --split, or --split all.")
    return chosen


def labelled_metrics(samples: list[Sample], probs: np.ndarray) -> dict[str, float] | None:
    """Balanced accuracy, accuracy and AUC over the rows that carry a label (None if none does)."""
    labels = np.array([s.label for s in samples])
    known = labels != UNLABELED
    if not known.any():
        return None
    return classification_metrics(labels[known], probs[known]) | {"n": int(known.sum())}


def evaluate_export(folder: str, manifest_path: str, split: str = "test", merged: bool = False,
                    overrides: dict | None = None, device: str = "auto") -> dict[str, float]:
    """Metrics of an exported model on one split of a site manifest: e.g. a global-only export on a site that never
    trained (README, "Use your trained models")."""
    model, cfg, _ = load_exported(folder, merged=merged, overrides=overrides)
    samples = select_split(read_input_manifest(manifest_path, cfg.data.num_classes, cfg.data.class_names), split,
                           manifest_path)
    metrics = labelled_metrics(samples, predict_probabilities(model, cfg, samples, source=manifest_path,
                                                              device=device))
    if metrics is None:
        raise DataError(f"{manifest_path}: no labels in split '{split}', so nothing to evaluate. "
                        "Fix: add a label column, or run fedopal.site.predict for predictions only.")
    return metrics


def write_predictions(path: str, samples: list[Sample], probs: np.ndarray, class_names=None) -> None:
    """path, [split], [label], prediction, prob_<class>...; with data.class_names the labels, predictions and
    columns are the names. Written to a temp file then renamed (no half CSV)."""
    names = list(class_names) if class_names else [str(c) for c in range(probs.shape[1])]
    with_split = any(s.split for s in samples)
    with_label = any(s.label != UNLABELED for s in samples)
    header = ["path"] + (["split"] if with_split else []) + (["label"] if with_label else []) + ["prediction"]
    header += [f"prob_{name}" for name in names]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for s, p in zip(samples, probs):
                row = [s.path] + ([s.split] if with_split else [])
                row += ([names[s.label] if s.label != UNLABELED else ""] if with_label else [])
                writer.writerow(row + [names[int(p.argmax())]] + [f"{x:.6f}" for x in p])
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an export view folder, e.g. <site state>/export/best/personalized")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV with a path column (optional: label, split)")
    source.add_argument("--input", nargs="+", help="image/volume files or folders (searched recursively)")
    p.add_argument("--split", choices=SPLIT_CHOICES, default="all", help="with --manifest: which rows (default all)")
    p.add_argument("--out", default="predictions.csv", help="predictions CSV (default predictions.csv)")
    p.add_argument("--merged", action="store_true", help="use the merged copy (runs without peft)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a stored config key, e.g. model.checkpoint=/models/vit.pt where the backbone moved")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, cfg, manifest = load_exported(args.model, merged=args.merged, overrides=parse_overrides(args.set))
        if args.manifest:
            samples = read_input_manifest(args.manifest, cfg.data.num_classes, cfg.data.class_names)
            samples = select_split(samples, args.split, args.manifest)
        else:
            samples = find_inputs(args.input)
        probs = predict_probabilities(model, cfg, samples, args.batch_size, progress=True,
                                      source=args.manifest or "--input", device=args.device)
    except (ExportError, DataError, ConfigError, BackboneError, DeviceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        write_predictions(args.out, samples, probs, cfg.data.class_names)
    except OSError as err:
        print(f"error: cannot write {args.out} ({err.strerror}). Fix: choose a writable --out path.", file=sys.stderr)
        return 2
    round_num = manifest.get("round")
    where = f"{manifest.get('site') or 'site'} {manifest['view']}, {manifest['method']}" + (
        f", round {round_num}" if isinstance(round_num, int) else "")
    print(f"{len(samples)} predictions from {where} ({'merged' if args.merged else 'adapters'}) -> {args.out}")
    metrics = labelled_metrics(samples, probs)
    if metrics:
        fmt = lambda v: "n/a" if np.isnan(v) else f"{v:.3f}"  # noqa: E731  (n/a: one class among the labels)
        print(f"on {metrics['n']} labelled images: balanced accuracy {fmt(metrics['balanced_accuracy'])}, "
              f"accuracy {fmt(metrics['accuracy'])}, AUC {fmt(metrics['auc'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
