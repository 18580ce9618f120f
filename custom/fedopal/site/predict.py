"""Run an exported site model on new images or volumes: class probabilities to a CSV, metrics when labels exist.

    fedopal predict --model <site state>/export/best/personalized --manifest site-1/manifest.csv --split test
    fedopal predict --model <site state>/export/best/global_only --input scans/ --out predictions.csv
    fedopal predict --model ... --input scans/ --merged        # the merged copy: no peft needed

Images go through the same MONAI pipeline as in training (evaluation transforms, the backbone's normalization),
configured by the config stored in the export. `--manifest` takes a CSV with a `path` column and optional `label`
and `split` columns, so a site's training manifest works as it is; every row must be readable (its metrics cover
them all).

`--input` decides each file's type by its content, so DICOM files without a suffix are predicted. Every file that
is not predicted (a DICOMDIR, an empty file, a note, an image that fails to decode) is counted on the console and
listed with its reason in `<out stem>.skipped.csv` beside the predictions; the others are predicted all the same.
For DICOM inputs the predictions carry SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID and PatientID, to join
them back to the hospital's records.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import tempfile
from collections import Counter

import numpy as np
import torch

from fedopal.model.backbones import BackboneError
from fedopal.config import ConfigError, parse_overrides
from fedopal.site.data import UNLABELED, DataError, Sample, build_inference_dataset, find_inputs, loader, read_input_manifest
from fedopal.site.device import DeviceError, autocast, resolve_device
from fedopal.site.export import ExportError, load_exported
from fedopal.site.intervals import interval_keys, metric_intervals
from fedopal.site.readers import format_of
from fedopal.site.train import classification_metrics

SPLIT_CHOICES = ("train", "val", "test", "all")
# what a hospital joins predictions back on (PS3.3 C.12.1, C.7.3.1, C.7.2.1, C.7.1.1); a series folder has no one SOP
DICOM_IDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID")


@torch.no_grad()
def predict_files(model: torch.nn.Module, cfg, samples: list[Sample], batch_size: int | None = None,
                  progress: bool = False, source: str = "", device: str = "auto",
                  keep_going: bool = False) -> tuple[np.ndarray, list[str]]:
    """((N, num_classes) softmax probabilities (float32), in the order of `samples`; per sample, why it could not be
    read ('' when it was)). The model runs on `device` (a train.device value; DeviceError if it is not there) in the
    config's train.precision. Without keep_going the first file that fails to decode stops with its DataError; with
    it, that file's row is NaN and its reason says why."""
    from tqdm import tqdm

    dataset = build_inference_dataset(cfg.data, samples, model.in_channels, model.normalization, source,
                                      keep_going=keep_going)
    where = resolve_device(device)
    model.to(where).eval()
    probs, unreadable = [], []
    # disable=None: a bar on a terminal, silence in logs and pipes
    with tqdm(total=len(dataset), unit="image", desc="predict", disable=None if progress else True,
              file=sys.stderr) as bar:
        for batch in loader(dataset, batch_size or cfg.data.batch_size * 2, shuffle=False,
                            num_workers=cfg.data.num_workers, pin_memory=where.type == "cuda"):
            with autocast(where, cfg.train.precision):
                logits = model(batch["image"].to(where, non_blocking=True))
            batch_probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
            reasons = batch.get("unreadable", [""] * len(batch_probs))
            batch_probs[[bool(r) for r in reasons]] = np.nan  # a placeholder's output is no prediction
            probs.append(batch_probs)
            unreadable += list(reasons)
            bar.update(len(batch["image"]))
    return np.concatenate(probs), unreadable


def predict_probabilities(model: torch.nn.Module, cfg, samples: list[Sample], batch_size: int | None = None,
                          progress: bool = False, source: str = "", device: str = "auto") -> np.ndarray:
    """(N, num_classes) softmax probabilities (float32), in the order of `samples`; a file that fails to decode
    stops with its one-line DataError."""
    return predict_files(model, cfg, samples, batch_size, progress, source, device)[0]


def dicom_ids(path: str) -> dict[str, str] | None:
    """The DICOM identifiers of an input (None if it is not DICOM), read from the header only: a file's own; a
    series folder's study, series and patient from its first slice, and no SOPInstanceUID (each slice has its own).
    A tag the file lacks, or a header that cannot be read, is ''."""
    import pydicom

    if format_of(path) != "dicom":
        return None
    first = path
    if os.path.isdir(path):
        slices = sorted(os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
        first = next((f for f in slices if pydicom.misc.is_dicom(f)), None)
    try:
        ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=list(DICOM_IDS)) if first else {}
    except Exception:  # noqa: BLE001  (pydicom raises many types for a foreign file; the decode names its problem)
        ds = {}
    ids = {tag: str(ds.get(tag, "") or "") for tag in DICOM_IDS}
    if os.path.isdir(path):
        ids["SOPInstanceUID"] = ""
    return ids


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
    """Balanced accuracy, accuracy and AUC over the rows that carry a label (None if none does), with the 95 %
    bootstrap intervals of balanced accuracy and AUC (`balanced_accuracy_ci_low`, ...; site.intervals)."""
    labels = np.array([s.label for s in samples])
    known = labels != UNLABELED
    if not known.any():
        return None
    return (classification_metrics(labels[known], probs[known])
            | interval_keys("", metric_intervals(labels[known], probs[known])) | {"n": int(known.sum())})


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


def _write_csv(path: str, header: list[str], rows) -> None:
    """Written to a temp file then renamed: no half CSV, and an earlier one stays if writing fails."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_predictions(path: str, samples: list[Sample], probs: np.ndarray, class_names=None,
                      ids: list[dict | None] | None = None) -> None:
    """path, [SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID, PatientID], [split], [label], prediction,
    prob_<class>...; the DICOM columns when any input is DICOM (`ids`, per sample, from dicom_ids); with
    data.class_names the labels, predictions and columns are the names."""
    names = list(class_names) if class_names else [str(c) for c in range(probs.shape[1])]
    ids = ids or [None] * len(samples)
    with_ids = any(i is not None for i in ids)
    with_split = any(s.split for s in samples)
    with_label = any(s.label != UNLABELED for s in samples)
    header = ["path"] + (list(DICOM_IDS) if with_ids else []) + (["split"] if with_split else [])
    header += (["label"] if with_label else []) + ["prediction"] + [f"prob_{name}" for name in names]
    rows = []
    for s, p, i in zip(samples, probs, ids):
        row = [s.path] + ([(i or {}).get(tag, "") for tag in DICOM_IDS] if with_ids else [])
        row += ([s.split] if with_split else [])
        row += ([names[s.label] if s.label != UNLABELED else ""] if with_label else [])
        rows.append(row + [names[int(p.argmax())]] + [f"{x:.6f}" for x in p])
    _write_csv(path, header, rows)


def skipped_path(out: str) -> str:
    """Where the files not predicted are listed: beside the predictions, predictions.csv -> predictions.skipped.csv."""
    return os.path.splitext(out)[0] + ".skipped.csv"


def _short(reason: str) -> str:
    """A reason's kind for the console count: 'a DICOMDIR (an index ...)' -> 'DICOMDIR', 'empty file (0 bytes)' ->
    'empty file', 'a PDF document, not one of the supported formats' -> 'PDF document'."""
    return re.sub(r"^(an?|the) ", "", re.split(r" \(|: |; |, |\. ", reason, maxsplit=1)[0]).strip()


def _kinds(skipped: list[tuple[str, str, str]]) -> str:
    counts = Counter(kind for _, kind, _ in skipped)
    return ", ".join(f"{counts[kind]} {kind}" for kind in sorted(counts, key=lambda kind: (-counts[kind], kind)))


def files_line(predicted: int, skipped: list[tuple[str, str, str]], listed_in: str) -> str:
    """'40 files: 38 predicted, 2 skipped (1 DICOMDIR, 1 not an image), listed in predictions.skipped.csv'."""
    line = f"{predicted + len(skipped)} files: {predicted} predicted"
    if skipped:
        line += f", {len(skipped)} skipped ({_kinds(skipped)}), listed in {listed_in}"
    return line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an export view folder, e.g. <site state>/export/best/personalized")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV with a path column (optional: label, split)")
    source.add_argument("--input", nargs="+", help="image/volume files or folders (searched recursively)")
    p.add_argument("--split", choices=SPLIT_CHOICES, default="all", help="with --manifest: which rows (default all)")
    p.add_argument("--out", default="predictions.csv", help="predictions CSV (default predictions.csv)")
    p.add_argument("--masks-dir", default=None, help="segmentation: where the predicted masks go (default: "
                                                     "<out stem>_masks beside the CSV)")
    p.add_argument("--merged", action="store_true", help="use the merged copy (runs without peft)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU if torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a stored config key, e.g. model.checkpoint=/models/vit.pt where the backbone moved")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    skipped: list[tuple[str, str, str]] = []  # (path, kind, reason) of each --input file not predicted
    try:
        model, cfg, manifest = load_exported(args.model, merged=args.merged, overrides=parse_overrides(args.set))
        if args.manifest:
            samples = read_input_manifest(args.manifest, cfg.data.num_classes, cfg.data.class_names)
            samples = select_split(samples, args.split, args.manifest)
        else:
            samples, unsupported = find_inputs(args.input)
            skipped = [(path, _short(reason), reason) for path, reason in unsupported]
        if cfg.data.task == "segmentation":
            return _segment(model, cfg, manifest, samples, skipped, args)
        if samples:
            probs, unreadable = predict_files(model, cfg, samples, args.batch_size, progress=True,
                                              source=args.manifest or "--input", device=args.device,
                                              keep_going=not args.manifest)
            for s, reason in zip(samples, unreadable):
                if reason:  # the reason's own first words name the file; the CSV has a path column
                    skipped.append((s.path, "unreadable", reason.removeprefix(f"{s.path}: ")))
            read = [k for k, reason in enumerate(unreadable) if not reason]
            samples, probs = [samples[k] for k in read], probs[read]
    except (ExportError, DataError, ConfigError, BackboneError, DeviceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.input:
        try:  # always written with --input: a list left from an earlier run would describe other files
            _write_csv(skipped_path(args.out), ["path", "reason"], sorted((path, reason) for path, _, reason in skipped))
        except OSError as err:
            print(f"error: cannot write {skipped_path(args.out)} ({err.strerror}). Fix: choose a writable --out "
                  "path.", file=sys.stderr)
            return 2
    if not samples:
        print(f"error: --input: none of the {len(skipped)} files can be predicted ({_kinds(skipped)}), listed in "
              f"{skipped_path(args.out)}. Fix: point --input at PNG, JPEG, NPY, NIfTI or DICOM images.",
              file=sys.stderr)
        return 2
    try:
        write_predictions(args.out, samples, probs, cfg.data.class_names, [dicom_ids(s.path) for s in samples])
    except OSError as err:
        print(f"error: cannot write {args.out} ({err.strerror}). Fix: choose a writable --out path.", file=sys.stderr)
        return 2
    if args.input:
        print(files_line(len(samples), skipped, skipped_path(args.out)))
    round_num = manifest.get("round")
    where = f"{manifest.get('site') or 'site'} {manifest['view']}, {manifest['method']}" + (
        f", round {round_num}" if isinstance(round_num, int) else "")
    print(f"{len(samples)} predictions from {where} ({'merged' if args.merged else 'adapters'}) -> {args.out}")
    metrics = labelled_metrics(samples, probs)
    if metrics:
        fmt = lambda v: "n/a" if np.isnan(v) else f"{v:.3f}"  # noqa: E731  (n/a: one class among the labels)

        def with_ci(name: str) -> str:
            low, high = metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"]
            return fmt(metrics[name]) + ("" if np.isnan(low) else f" [{low:.3f}, {high:.3f}]")
        print(f"on {metrics['n']} labelled images: balanced accuracy {with_ci('balanced_accuracy')}, "
              f"accuracy {fmt(metrics['accuracy'])}, AUC {with_ci('auc')} ([95 % bootstrap interval over the "
              "images, by class])")
    return 0


def _segment(model, cfg, manifest: dict, samples: list[Sample], skipped: list, args) -> int:
    """A segmentation export: masks under --masks-dir, a row per input in --out, Dice where references exist."""
    from fedopal.site.intervals import LEVEL, N_BOOT
    from fedopal.site.segment import dice_interval
    from fedopal.site.segment_predict import predict_masks

    if not samples:
        print(f"error: --input: none of the {len(skipped)} files can be segmented ({_kinds(skipped)}). Fix: point "
              "--input at PNG, JPEG, NPY, NIfTI, NRRD or DICOM images.", file=sys.stderr)
        return 2
    masks_dir = args.masks_dir or os.path.splitext(args.out)[0] + "_masks"
    try:
        rows = predict_masks(model, cfg, samples, masks_dir, device=args.device, progress=True)
    except (DataError, DeviceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    header = list(dict.fromkeys(k for row in rows for k in row))
    try:
        _write_csv(args.out, header, [[_cell(row.get(k, "")) for k in header] for row in rows])
    except OSError as err:
        print(f"error: cannot write {args.out} ({err.strerror}). Fix: choose a writable --out path.", file=sys.stderr)
        return 2
    print(f"{len(rows)} masks from {manifest.get('site') or 'site'} {manifest['view']}, {manifest['method']} -> "
          f"{masks_dir}; one row each in {args.out}")
    scored = np.array([[row[k] for k in header if k.startswith("dice/")] for row in rows if "dice" in row])
    if len(scored):
        low, high = dice_interval(scored, N_BOOT, LEVEL)
        ci = "" if np.isnan(low) else f" [{low:.3f}, {high:.3f}]"
        print(f"on {len(scored)} images with a reference mask: Dice {scored.mean(axis=1).mean():.3f}{ci} "
              "([95 % bootstrap interval over the images])")
    return 0


def _cell(value):
    return f"{value:.6f}" if isinstance(value, float) else value


if __name__ == "__main__":
    sys.exit(main())
