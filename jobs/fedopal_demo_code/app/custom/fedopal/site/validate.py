"""Check a federation's data before any training: seconds here instead of a crash in round 7.

    fedopal validate --config app_configs/demo.yaml [--site site-1 ...] [--deep] [--set KEY=VALUE ...]

For every site: the manifest (columns, labels or class names, splits, files, a file in two splits), the file format
against data.spatial_dims, and every file decoded exactly as the site decodes it (readers.py). The rest of the
site's deterministic pipeline (orientation, spacing, size, channels into the backbone) runs on the first file of
every kind found (format, dtype, channels, shape), or on every file with --deep. So what passes here starts
training. Then per site and split it warns where a metric cannot be measured well: a class missing or under 30
samples in val or test, or one class in train.

The client runs the same check for its own site when a job starts; `fedopal.tools.job --simulate` runs it for all sites
before it touches the workspace.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field

from fedopal.config import ConfigError, load_config, parse_overrides
from fedopal.site.data import (DataError, Sample, build_transforms, file_format, label_counts, read_manifest,
                          site_manifest_path)
from fedopal.site.readers import DecodeOptions, decode

SPLITS = ("train", "val", "test")
MIN_PER_CLASS = 30  # below this, one image moves a class's recall by more than 3 points


@dataclass
class SiteCheck:
    site: str
    samples: list[Sample]
    kinds: Counter = field(default_factory=Counter)  # FileInfo.kind -> files
    model_channels: int = 1
    warnings: list[str] = field(default_factory=list)


def model_input_channels(cfg) -> int:
    """The backbone's input channels, without building it (validate reads data only)."""
    if cfg.model.backbone == "monai_vit":
        return cfg.data.in_channels
    if cfg.model.backbone == "hf":
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(cfg.model.hf_model)
            return int(getattr(getattr(config, "vision_config", config), "num_channels", 3))
        except Exception:  # an unreachable hub id: the job's own preflight names it; 3 is every HF vision default
            return 3
    return 3  # efficientnet_lite0: ImageNet RGB


def check_files(samples: list[Sample], cfg, deep: bool = False, model_channels: int | None = None) -> Counter:
    """Decode every file as the site does; the rest of the deterministic pipeline on the first file of each kind
    (all files with deep). Raises DataError naming the file."""
    data_cfg = cfg.data
    channels = model_input_channels(cfg) if model_channels is None else model_channels
    opts = DecodeOptions.from_config(data_cfg)
    pipeline = build_transforms(data_cfg, channels, None, train=False)
    kinds: Counter = Counter()
    for s in samples:
        image, info = decode(s.path, opts)
        signature = (info.kind, info.shape)
        if deep or signature not in kinds:
            pipeline({"image": image, "label": s.label}, start=1)  # names the file if a step fails
        kinds[signature] += 1
    by_kind: Counter = Counter()
    for (kind, _), n in kinds.items():
        by_kind[kind] += n
    return by_kind


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
    """Everything about one site's data that can fail, in one pass; raises DataError with a one-line message."""
    manifest = manifest or site_manifest_path(cfg, site)
    samples = read_manifest(manifest, cfg.data.num_classes, cfg.data.class_names)
    file_format(samples, cfg.data.spatial_dims, manifest, cfg.data.in_channels)
    channels = model_input_channels(cfg) if model_channels is None else model_channels
    kinds = check_files(samples, cfg, deep, channels)
    return SiteCheck(site, samples, kinds, channels, measurability(samples, cfg.data))


def check_site(cfg, site: str, manifest: str | None = None, deep: bool = False) -> list[Sample]:
    return inspect_site(cfg, site, manifest, deep).samples


def describe(check: SiteCheck, data_cfg=None) -> str:
    """One line per site: what was found (formats, dtypes, channels) and the class counts per split."""
    name = data_cfg.class_name if data_cfg is not None else str
    files = ", ".join(f"{kind} x{n}" for kind, n in sorted(check.kinds.items()))
    parts = [f"{split} {sum(label_counts(check.samples, split).values())} "
             "{" + ", ".join(f"{name(c)}: {n}" for c, n in label_counts(check.samples, split).items()) + "}"
             for split in SPLITS]
    into = f" into {check.model_channels} channel(s)" if files else ""
    return f"{check.site}: ok ({files}{into}; {'; '.join(parts)})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--site", action="append", help="check only these sites (default: the config's sites)")
    p.add_argument("--deep", action="store_true",
                   help="run the whole deterministic pipeline on every file (default: on the first of each kind)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.root=/data/fedopal (value parsed as YAML)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
        for site in args.site or cfg.federation.sites():
            check = inspect_site(cfg, site, deep=args.deep)
            print(describe(check, cfg.data), flush=True)
            for warning in check.warnings:
                print(f"warning: {site} {warning}", flush=True)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
