"""Check a federation's data before any training: seconds here instead of a crash in round 7.

    fedopal validate --config app_configs/demo.yaml [--site site-1 ...] [--deep] [--limit 20] [--set KEY=VALUE ...]

For every site, in one pass, every problem (up to --limit per kind, then a count), grouped by kind, each naming the
manifest row and the file: the manifest (columns, labels or class names, splits, patients, files, a file or a patient
in two splits), each file's type read from its content, and every file decoded exactly as the site decodes it
(readers.py, with the site's own decoding: data.sites). The rest of the site's deterministic pipeline (orientation,
spacing, size, channels into the backbone) runs on the first file of every kind found (format, dtype, channels,
shape), or on every file with --deep. So what passes here starts training; exit status 2 if anything does not.

Per site it prints what was found, the effective decoding settings, how much of [0, 1] the decoded images use, the
readers' warnings (a 16-bit file holding 12-bit values, signed CT/MR without a window), and where a metric cannot be
measured well (a class missing or under 30 samples in val or test, one class in train). --deep adds a table of
intensity statistics per site, after decoding, and flags a site far from the others.

The client runs the same check for its own site when a job starts (it stops on the first problem, with the count);
`fedopal job --simulate` runs it for all sites before it touches the workspace.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fedopal.config import ConfigError, load_config, parse_overrides
from fedopal.site.data import (DataError, Problems, Sample, build_transforms, file_format, label_counts,
                               read_manifest, row_of, site_manifest_path)
from fedopal.site.readers import NARROW, DecodeOptions, decode, format_of

SPLITS = ("train", "val", "test")
MIN_PER_CLASS = 30  # below this, one image moves a class's recall by more than 3 points
# a site is "far from the others" when its median decoded intensity is this far (on [0, 1]) from the federation's
# median site, or when the part of [0, 1] it uses is under this fraction of that site's: a decoding setting to look at
FAR_MEAN, FAR_RANGE = 0.15, 0.5


@dataclass
class FileStats:
    """One decoded file's intensities (every channel, after decoding to [0, 1])."""

    mean: float
    p01: float  # 1st percentile
    p99: float  # 99th percentile

    @classmethod
    def of(cls, image) -> "FileStats":
        values = np.asarray(image, dtype=np.float32).ravel()
        p01, p99 = np.percentile(values, (1, 99))
        return cls(float(values.mean()), float(p01), float(p99))


@dataclass
class SiteCheck:
    site: str
    samples: list[Sample]
    kinds: Counter = field(default_factory=Counter)  # FileInfo.kind -> files
    model_channels: int = 1
    warnings: list[str] = field(default_factory=list)
    problems: Problems = field(default_factory=Problems)
    notes: list[str] = field(default_factory=list)  # the readers' warnings about single files
    stats: list[FileStats] = field(default_factory=list)
    piped: int = 0  # files that went through the whole deterministic pipeline
    # segmentation: per split, the rows whose mask holds each class (the background included)
    mask_classes: dict = field(default_factory=dict)
    empty_masks: list[str] = field(default_factory=list)  # rows whose mask holds background only

    @property
    def intensity(self) -> dict | None:
        """Median over the site's files of each file's mean, 1st and 99th percentile; `used`: p99 - p01."""
        if not self.stats:
            return None
        mean = statistics.median(s.mean for s in self.stats)
        p01, p99 = statistics.median(s.p01 for s in self.stats), statistics.median(s.p99 for s in self.stats)
        return {"files": len(self.stats), "mean": mean, "sd": statistics.pstdev(s.mean for s in self.stats),
                "p01": p01, "p99": p99, "used": p99 - p01}


def model_input_channels(cfg) -> int:
    """The backbone's input channels, without building it (validate reads data only)."""
    if cfg.model.backbone in ("monai_vit", "unetr", "swin_unetr"):
        return cfg.data.in_channels
    if cfg.model.backbone == "hf":
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(cfg.model.hf_model)
            return int(getattr(getattr(config, "vision_config", config), "num_channels", 3))
        except Exception:  # an unreachable hub id: the job's own preflight names it; 3 is every HF vision default
            return 3
    return 3  # efficientnet_lite0: ImageNet RGB


def check_files(check: SiteCheck, data_cfg, manifest: str, deep: bool = False) -> None:
    """Decode every file as the site does (data_cfg: the site's own, DataConfig.for_site); the rest of the
    deterministic pipeline on the first file of each kind (all files with deep). Every failure is a problem naming
    the row and the file; the readers' notes, the file kinds and intensity statistics are kept on `check`."""
    opts = DecodeOptions.from_config(data_cfg)
    try:
        pipeline = build_transforms(data_cfg, check.model_channels, None, train=False)
    except DataError as err:
        check.problems.add("configuration", str(err))
        return
    signatures: set = set()
    for s in check.samples:
        where = row_of(manifest, s)
        try:
            image, info = decode(s.path, opts)
        except DataError as err:
            check.problems.add("unreadable file", f"{where}: {err}")
            continue
        check.notes += [f"{where}: {note}" for note in info.notes]
        check.stats.append(FileStats.of(image))
        item = {"image": image, "label": s.label}
        if s.mask is not None:
            if not check_mask(check, s, where, (image, info), data_cfg, opts):
                continue
            item["mask"] = s.mask
        signature = (info.kind, info.shape)
        if deep or signature not in signatures:
            try:
                pipeline(item, start=1)  # names the file if a step fails
                check.piped += 1
            except DataError as err:
                check.problems.add("pipeline", f"{where}: {err}")
                continue
        signatures.add(signature)
        check.kinds[info.kind] += 1


def check_mask(check: SiteCheck, s: Sample, where: str, image_info, data_cfg, opts) -> bool:
    """Segmentation: the mask against its image (shape, spacing, orientation, affine, label values: problems), and
    which classes it holds (an empty mask is a warning unless the site expects them: data.empty_masks)."""
    from fedopal.site.masks import check_pair, decode_mask

    problems = check_pair(s.path, s.mask, data_cfg.spatial_dims, data_cfg.num_classes, image_info, opts)
    for problem in problems:
        check.problems.add("mask", f"{where}: {problem}")
    if problems:
        return False
    _, info = decode_mask(s.mask, data_cfg.spatial_dims, like=image_info[0])
    for value in info.labels:
        check.mask_classes.setdefault(s.split, Counter())[value] += 1
    if not any(v > 0 for v in info.labels):
        check.empty_masks.append(where)
    return True


def mask_warnings(check: SiteCheck, data_cfg) -> list[str]:
    """Segmentation: empty masks (unless expected) and foreground classes that no val or test mask holds (their
    Dice is measured on nothing)."""
    out = []
    if check.empty_masks and data_cfg.empty_masks == "warn":
        rows = ", ".join(check.empty_masks[:3]) + (", ..." if len(check.empty_masks) > 3 else "")
        out.append(f"{len(check.empty_masks)} mask(s) hold background only ({rows}); if this site has images "
                   f"without the structure, set data.sites.{check.site}.empty_masks: expected, else fix the masks")
    for split in ("val", "test"):
        counts = check.mask_classes.get(split, Counter())
        absent = [data_cfg.class_name(c) for c in range(1, data_cfg.num_classes) if not counts.get(c)]
        if absent and check.samples:
            out.append(f"{split}: no mask holds {', '.join(absent)} (its Dice is 1 by definition there: nothing to "
                       "find, nothing found)")
    return out


def measurability(samples: list[Sample], data_cfg) -> list[str]:
    """Per split, what makes balanced accuracy or AUC unmeasurable or noisy."""
    out = []

    def name(c: int) -> str:
        return data_cfg.class_name(c) if data_cfg.class_names else f"class {c}"
    train = label_counts(samples, "train")
    if len(train) == 1:
        out.append(f"train holds one class ({name(next(iter(train)))}): the model cannot learn to tell classes "
                   "apart here")
    for split in ("val", "test"):
        counts = label_counts(samples, split)
        missing = [name(c) for c in range(data_cfg.num_classes) if c not in counts]
        few = [f"{name(c)} ({n})" for c, n in counts.items() if n < MIN_PER_CLASS]
        parts = []
        if missing:
            what = "balanced accuracy and AUC are n/a" if len(counts) < 2 else "metrics cover the classes present"
            parts.append(f"class(es) missing: {', '.join(missing)} ({what})")
        if few:
            parts.append(f"under {MIN_PER_CLASS} samples: {', '.join(few)} (one image moves that recall by more "
                         "than 3 points)")
        if parts:
            out.append(f"{split}: " + "; ".join(parts))
    return out


def inspect_site(cfg, site: str, manifest: str | None = None, deep: bool = False,
                 model_channels: int | None = None) -> SiteCheck:
    """Everything about one site's data that can fail, in one pass: the problems are on the returned check."""
    manifest = manifest or site_manifest_path(cfg, site)
    data_cfg = cfg.data.for_site(site)
    problems = Problems()
    samples = read_manifest(manifest, data_cfg.num_classes, data_cfg.class_names, problems, cfg.federation.sites(),
                            task=data_cfg.task)
    channels = model_input_channels(cfg) if model_channels is None else model_channels
    check = SiteCheck(site, [], model_channels=channels, problems=problems)
    if samples:
        file_format(samples, data_cfg.spatial_dims, manifest, data_cfg.in_channels, problems)
        check.samples = [s for s in samples if format_of(s.path) is not None]  # the others are problems already
        if not any(k == "shape" for k, _ in problems.items):
            check_files(check, data_cfg, manifest, deep)
        per_task = mask_warnings(check, data_cfg) if data_cfg.task == "segmentation" else measurability(samples,
                                                                                                         data_cfg)
        check.warnings = per_task + intensity_warnings(check, data_cfg)
    return check


def intensity_warnings(check: SiteCheck, data_cfg) -> list[str]:
    """What the decoded intensities say about the site's decoding, even with no other site to compare with: every
    image a single value is a problem (nothing to learn from: a range or window outside the values); most values in
    a sliver of [0, 1] is a warning."""
    if not check.stats:
        return []
    key = f"data.sites.{check.site}.intensity_range"
    if all(s.p99 - s.p01 == 0 and s.mean in (0.0, 1.0) for s in check.stats):
        check.problems.add("intensity", f"{check.site}: every decoded image is a single value "
                                        f"({check.stats[0].mean:g}): the decoding range misses the files' values. "
                                        f"Fix: set {key} to the range the values use (or remove it), or "
                                        "window_from_file.")
        return []
    used = check.intensity["used"]
    if used < NARROW:
        return [f"decoded images use {100 * used:.0f}% of [0, 1] (median 1st-99th percentile "
                f"{check.intensity['p01']:.3f}-{check.intensity['p99']:.3f}): most of the model's input range is "
                f"empty; set {key} to the range the values use (the warnings above name it), or window_from_file"]
    return []


def check_site(cfg, site: str, manifest: str | None = None, deep: bool = False) -> list[Sample]:
    """A site's samples, every file checked; DataError with the first problem and how many more (site start)."""
    check = inspect_site(cfg, site, manifest, deep)
    check.problems.raise_first()
    return check.samples


def describe(check: SiteCheck, data_cfg=None) -> str:
    """One line per site: what was found (formats, dtypes, channels) and the class counts per split."""
    name = data_cfg.class_name if data_cfg is not None else str
    files = ", ".join(f"{kind} x{n}" for kind, n in sorted(check.kinds.items()))
    def counts(split):  # classification: images per class; segmentation: masks holding each class
        if check.mask_classes or (data_cfg is not None and data_cfg.task == "segmentation"):
            return dict(sorted(check.mask_classes.get(split, {}).items()))
        return label_counts(check.samples, split)
    parts = [f"{split} {sum(1 for s in check.samples if s.split == split)} "
             "{" + ", ".join(f"{name(c)}: {n}" for c, n in counts(split).items()) + "}" for split in SPLITS]
    if check.mask_classes:
        parts[-1] += " (masks holding each class)"
    into = f" into {check.model_channels} channel(s)" if files else ""
    status = "ok" if not check.problems else f"{len(check.problems)} problem{'s' if len(check.problems) > 1 else ''}"
    if not check.samples:
        return f"{check.site}: {status} (no usable row)"
    return f"{check.site}: {status} ({files}{into}; {'; '.join(parts)})"


def describe_decoding(data_cfg, site: str) -> str:
    """The site's effective decoding settings, each marked (site) where data.sites sets it."""
    def show(key, value):
        if key == "intensity_range":
            return f"[{value[0]:g}, {value[1]:g}]" if value else "each file's own encoding"
        return str(value).lower() if isinstance(value, bool) else str(value)
    return ", ".join(f"{k} {show(k, v)}{' (site)' if src == 'site' else ''}"
                     for k, (v, src) in data_cfg.decoding(site).items())


def describe_intensity(check: SiteCheck) -> str:
    i = check.intensity
    return (f"median over {i['files']} files: mean {i['mean']:.3f}, 1st-99th percentile {i['p01']:.3f}-"
            f"{i['p99']:.3f}: uses {100 * i['used']:.0f}% of [0, 1]") if i else "no file decoded"


def grouped_notes(notes: list[str], site: str) -> list[str]:
    """The readers' notes, one group per message (the file and its numbers aside): the first, and how many more.
    The key a note names is the site's own (data.sites.<site>.*): set job-wide, it would re-map every other site."""
    groups: dict[str, list[str]] = {}
    for note in notes:
        text = note.split(": ", 2)[-1] if note.count(": ") >= 2 else note
        groups.setdefault(re.sub(r"-?\d[\d.,]*", "#", text), []).append(note)
    out = []
    for members in groups.values():
        first = re.sub(r"\bdata\.(intensity_range|window_from_file)", rf"data.sites.{site}.\1", members[0])
        out.append(first + (f" (and {len(members) - 1} more file(s) alike)" if len(members) > 1 else ""))
    return out


def far_sites(checks: list[SiteCheck]) -> dict[str, str]:
    """site -> why its decoded intensities are far from the other sites' (needs two sites with files)."""
    return far_from_others([c.intensity | {"site": c.site} for c in checks if c.intensity])


def far_from_others(have: list[dict], mean_name: str = "median intensity") -> dict[str, str]:
    """site -> why it is far, from each site's {"site", "mean", "used"}: its typical intensity (`mean_name` says
    which) and the part of [0, 1] it uses. fedopal stats calls it on what NVFlare's federated statistics bring back."""
    if len(have) < 2:
        return {}
    # the federation's median site: with two sites both are flagged when they differ (which one is off, a person says)
    mean = statistics.median(i["mean"] for i in have)
    used = statistics.median(i["used"] for i in have)
    out = {}
    for mine in have:
        why = []
        if abs(mine["mean"] - mean) > FAR_MEAN:
            why.append(f"{mean_name} {mine['mean']:.2f} vs {mean:.2f} for the federation's median site")
        if used > 0 and mine["used"] < FAR_RANGE * used:
            why.append(f"uses {100 * mine['used']:.0f}% of [0, 1] vs {100 * used:.0f}% for the federation's median "
                       "site")
        if why:
            out[mine["site"]] = "; ".join(why)
    return out


def intensity_table(checks: list[SiteCheck]) -> list[str]:
    far = far_sites(checks)
    lines = ["| site | files | mean | sd of file means | 1st pct | 99th pct | [0, 1] used | far from the others |",
             "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        i = c.intensity
        if i:
            lines.append(f"| {c.site} | {i['files']} | {i['mean']:.3f} | {i['sd']:.3f} | {i['p01']:.3f} | "
                         f"{i['p99']:.3f} | {100 * i['used']:.0f}% | {far.get(c.site, '')} |")
    return lines


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--site", action="append", help="check only these sites (default: the config's sites)")
    p.add_argument("--deep", action="store_true",
                   help="run the whole deterministic pipeline on every file (default: on the first of each kind) "
                        "and print intensity statistics per site")
    p.add_argument("--limit", type=positive, default=20,
                   help="problems shown per kind and site (default 20), then a count")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.root=/data/fedopal (value parsed as YAML)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    checks = []
    for site in args.site or cfg.federation.sites():
        check = inspect_site(cfg, site, deep=args.deep)
        checks.append(check)
        data_cfg = cfg.data.for_site(site)
        print(describe(check, data_cfg), flush=True)
        print(f"  decoding: {describe_decoding(cfg.data, site)}")
        print(f"  intensity after decoding: {describe_intensity(check)}")
        if args.deep:
            print(f"  --deep: {check.piped} of {len(check.samples)} files through the whole pipeline")
        for kind, messages in check.problems.by_kind().items():
            print(f"  {kind} ({len(messages)}):")
            for message in messages[:args.limit]:
                print(f"    {message}")
            if len(messages) > args.limit:
                print(f"    ... and {len(messages) - args.limit} more")
        for note in grouped_notes(check.notes, site):
            print(f"warning: {site} {note}", flush=True)
        for warning in check.warnings:
            print(f"warning: {site} {warning}", flush=True)
    if args.deep:
        print("\nintensity after decoding, per site (median over its files):")
        print("\n".join(intensity_table(checks)))
    for site, why in far_sites(checks).items():
        print(f"warning: {site} is far from the other sites after decoding ({why}): check its decoding "
              "(data.sites.<site>.intensity_range, window_from_file)")
    bad = [c for c in checks if c.problems]
    if bad:
        kinds = Counter(k for c in bad for k, _ in c.problems.items)
        total = sum(kinds.values())
        first = bad[0].problems.items[0][1]
        more = (f" (+{total - 1} more in {len(bad)} of {len(checks)} site(s): "
                + ", ".join(f"{k} {n}" for k, n in kinds.most_common()) + "; each listed above with its fix)"
                if total > 1 else "")
        print(f"error: {first}{more}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
