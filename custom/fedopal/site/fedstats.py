"""What a site computes for NVFlare's federated statistics (`fedopal stats`): aggregates of its decoded images.

NVFlare's FedStatsRecipe puts this generator at every site. At START_RUN it reads the site's manifest and decodes
every file exactly as training does (readers.decode with the site's own decoding, DataConfig.for_site); then NVFlare's
StatisticsExecutor asks it for count, sum, mean, stddev and histograms, per dataset and feature, and NVFlare's
privacy filter (MinCountCleanser, AddNoiseToMinMax, HistogramBinsCleanser, set in the job) cleans them before they
leave. Nothing per image leaves the site.

Datasets are the manifest's splits (train, val, test). A record is an image (NVFlare's image-statistics example:
`count` counts images, so `min_count` is a number of images). Features, one value per image:
- intensity: the image's mean decoded value in [0, 1]; its histogram counts *pixels* (every channel) in fixed bins
  over [0, 1], as NVFlare's image example does;
- intensity_p01, intensity_p99, intensity_max: the image's 1st and 99th percentile and its maximum (a 12-bit image in
  a 16-bit file decodes to at most 4095/65535 = 0.0625);
- height, width (2D; rows x columns as decoded) or size_i, size_j, size_k (3D, the array's axes): the image's size;
- label=<class> (classification): 1 for an image of that class, else 0, so its sum is the class's count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.statistics_spec import Bin, DataType, Feature, Histogram, HistogramType, Statistics

from fedopal.config import config_from_dict
from fedopal.site.data import DataError, read_manifest, site_manifest_path
from fedopal.site.readers import DecodeOptions, decode

SPLITS = ("train", "val", "test")
INTENSITY = "intensity"
PER_IMAGE = ("intensity_p01", "intensity_p99", "intensity_max")  # decoded values, [0, 1]
SIZES = {2: ("height", "width"), 3: ("size_i", "size_j", "size_k")}
LABEL_PREFIX = "label="


def label_feature(name: str) -> str:
    return f"{LABEL_PREFIX}{name}"


def feature_names(data_cfg) -> list[str]:
    """The features every site reports, in order (the same at every site: NVFlare aggregates by name)."""
    names = [INTENSITY, *PER_IMAGE, *SIZES[data_cfg.spatial_dims]]
    if data_cfg.task != "segmentation":
        names += [label_feature(data_cfg.class_name(c)) for c in range(data_cfg.num_classes)]
    return names


def pixel_histogram(image, bins: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Every decoded value of one image (all channels) in `bins` equal bins over [lo, hi], as numpy counts them."""
    return np.histogram(np.asarray(image, dtype=np.float32).ravel(), bins=bins, range=(lo, hi))[0].astype(np.int64)


@dataclass
class SplitValues:
    """One split's per-image values (never sent: NVFlare asks for their aggregates) and its pooled pixel histogram."""

    values: dict[str, list[float]]
    pixels: np.ndarray  # pixel counts in `bins` bins over [0, 1]
    failures: int = 0  # rows whose file did not decode (fedopal validate names them)


class SiteImageStatistics(Statistics):
    """NVFlare `Statistics` generator over a site's decoded images.

    Args (stored under the same names: FLARE's job export reads them back):
        job_config: the job's resolved config (fedopal.config.job_dict): data.root, the manifest, the site's
            decoding (data.sites), class names.
        bins: the intensity histogram's bins over [0, 1]; the job's statistic config asks for the same number, so
            the pixel histogram is counted in the one decoding pass (another number decodes the split again)."""

    def __init__(self, job_config: dict, bins: int = 20):
        super().__init__()
        self.job_config = job_config
        self.bins = bins
        self.site = None
        self.data_cfg = None
        self.samples = []
        self.splits: dict[str, SplitValues] = {}

    def initialize(self, fl_ctx: FLContext):
        self.site = fl_ctx.get_identity_name()
        self.load(self.site)

    def load(self, site: str) -> None:
        """Read the site's manifest and decode every file as training does (outside FLARE: tests, a site's check)."""
        cfg = config_from_dict(self.job_config, source="the job's config")
        self.site = site
        self.data_cfg = cfg.data.for_site(site)
        manifest = site_manifest_path(cfg, site)
        # the first bad row stops here, as at a training job's start: fedopal validate lists them all
        self.samples = read_manifest(manifest, self.data_cfg.num_classes, self.data_cfg.class_names,
                                     sites=cfg.federation.sites(), task=self.data_cfg.task)
        opts = DecodeOptions.from_config(self.data_cfg)
        names = feature_names(self.data_cfg)
        self.splits = {split: SplitValues({n: [] for n in names}, np.zeros(self.bins, np.int64)) for split in SPLITS}
        classify = self.data_cfg.task != "segmentation"
        for s in self.samples:
            split = self.splits[s.split]
            try:
                image, info = decode(s.path, opts)
            except DataError as err:
                split.failures += 1
                self.logger.warning(f"{self.site}: left out of the statistics: {err}")
                continue
            values = np.asarray(image, dtype=np.float32).ravel()
            p01, p99 = np.percentile(values, (1, 99))
            row = {INTENSITY: float(values.mean(dtype=np.float64)), "intensity_p01": float(p01),
                   "intensity_p99": float(p99), "intensity_max": float(values.max())}
            row |= dict(zip(SIZES[self.data_cfg.spatial_dims], map(float, info.shape)))
            if classify:
                row |= {label_feature(self.data_cfg.class_name(c)): float(s.label == c)
                        for c in range(self.data_cfg.num_classes)}
            for name, value in row.items():
                split.values[name].append(value)
            split.pixels += pixel_histogram(values, self.bins)

    # -- NVFlare's Statistics spec ---------------------------------------------------------------------------

    def features(self) -> dict[str, list[Feature]]:
        def kind(name):
            return DataType.FLOAT if name == INTENSITY or name in PER_IMAGE else DataType.INT
        return {split: [Feature(name, kind(name)) for name in feature_names(self.data_cfg)] for split in SPLITS}

    def _values(self, dataset_name: str, feature_name: str) -> np.ndarray:
        return np.asarray(self.splits[dataset_name].values[feature_name], dtype=np.float64)

    def count(self, dataset_name: str, feature_name: str) -> int:
        return len(self.splits[dataset_name].values[feature_name])  # images decoded

    def failure_count(self, dataset_name: str, feature_name: str) -> int:
        return self.splits[dataset_name].failures

    def sum(self, dataset_name: str, feature_name: str) -> float:
        return float(self._values(dataset_name, feature_name).sum())

    def mean(self, dataset_name: str, feature_name: str) -> float:
        return float(self._values(dataset_name, feature_name).mean())

    def stddev(self, dataset_name: str, feature_name: str) -> float:
        values = self._values(dataset_name, feature_name)
        return float(values.std(ddof=1)) if len(values) > 1 else 0.0

    def variance_with_mean(self, dataset_name: str, feature_name: str, global_mean: float,
                           global_count: float) -> float:
        # this site's share of the federation's variance, sum((x - m)^2) / (N - 1): NVFlare adds the shares
        values = self._values(dataset_name, feature_name)
        return float(((values - global_mean) ** 2).sum() / max(global_count - 1, 1))

    def min_value(self, dataset_name: str, feature_name: str) -> float:
        return float(self._values(dataset_name, feature_name).min())  # NVFlare's AddNoiseToMinMax widens it

    def max_value(self, dataset_name: str, feature_name: str) -> float:
        return float(self._values(dataset_name, feature_name).max())

    def histogram(self, dataset_name: str, feature_name: str, num_of_bins: int, global_min_value: float,
                  global_max_value: float) -> Histogram:
        lo, hi = float(global_min_value), float(global_max_value)
        if feature_name == INTENSITY:
            edges = np.linspace(lo, hi, num_of_bins + 1)
            if (num_of_bins, lo, hi) == (self.bins, 0.0, 1.0):
                counts = self.splits[dataset_name].pixels
            else:  # another binning than the one counted while decoding: decode the split again
                counts = self._pixels_again(dataset_name, num_of_bins, lo, hi)
        else:
            counts, edges = np.histogram(self._values(dataset_name, feature_name), bins=num_of_bins, range=(lo, hi))
        return Histogram(HistogramType.STANDARD,
                         [Bin(float(edges[i]), float(edges[i + 1]), int(counts[i])) for i in range(num_of_bins)])

    def _pixels_again(self, split: str, bins: int, lo: float, hi: float) -> np.ndarray:
        opts = DecodeOptions.from_config(self.data_cfg)
        counts = np.zeros(bins, np.int64)
        for s in self.samples:
            if s.split == split:
                try:
                    counts += pixel_histogram(decode(s.path, opts)[0], bins, lo, hi)
                except DataError:
                    continue  # counted in failure_count already
        return counts
