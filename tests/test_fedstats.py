"""fedopal stats: NVFlare's federated statistics over each site's decoded images, in the real simulator.

A tiny federation of real PneumoniaMNIST images: site-1 as stored (8-bit PNG), site-2 the same kind of images with
12-bit values in 16-bit PNGs (what a scanner's export often is), site-3 a scanner shift (brighter, flatter). The
statistics must name site-2's narrow range and site-3's distance from the others, count what the manifests hold, and
bring back a histogram equal to numpy's; NVFlare's min_count must keep a split that is too small at its site."""

import csv
import json
import os
from collections import Counter

import numpy as np
import pytest
import yaml
from PIL import Image

from fedopal.config import config_from_dict, job_dict
from fedopal.site.fedstats import SiteImageStatistics
from fedopal.tools import fedstats

from conftest import NPZ

CLASSES = ["normal", "pneumonia"]
SPLIT_SIZES = {"site-1": {"train": 24, "val": 8, "test": 8}, "site-2": {"train": 24, "val": 8, "test": 8},
               "site-3": {"train": 24, "val": 4, "test": 8}}  # site-3 val: under the test's min_count of 5
MIN_COUNT, BINS = 5, 20


def twelve_bit(img: np.ndarray) -> np.ndarray:
    return img.astype(np.uint16) * 16  # 0..4080: 12-bit values, stored in a 16-bit PNG


def scanner_shift(img: np.ndarray) -> np.ndarray:
    # another scanner's response curve: gamma 0.5, contrast x0.75, offset +0.25 (cf. tools/prepare.py SHIFTS)
    return np.round(255 * (0.25 + 0.75 * np.sqrt(img / 255.0))).astype(np.uint8)


STORE = {"site-1": lambda img: img, "site-2": twelve_bit, "site-3": scanner_shift}


def write_federation(root):
    """Three sites of 28x28 PNGs, each with its own images of both classes and a manifest naming the classes."""
    data = np.load(NPZ)
    images, labels = data["train_images"], data["train_labels"].ravel()
    start = 0
    for site, sizes in SPLIT_SIZES.items():
        folder = root / site
        (folder / "images").mkdir(parents=True)
        rows = []
        for split, n in sizes.items():
            for i in range(start, start + n):
                name = f"images/{split}_{i:04d}.png"
                Image.fromarray(STORE[site](images[i])).save(folder / name)
                rows.append((name, CLASSES[labels[i]], split))
            start += n
        with open(folder / "manifest.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label", "split"), *rows])


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats_federation")
    write_federation(root / "data")
    raw = {"name": "stats_test", "data": {"root": str(root / "data"), "image_size": 28, "in_channels": 1,
                                          "class_names": CLASSES},
           "model": {"backbone": "monai_vit", "pretrained": False,
                     "vit": {"patch_size": 7, "hidden_size": 48, "mlp_dim": 96, "num_layers": 1, "num_heads": 3}},
           "federation": {"num_sites": 3}}
    config = root / "stats.yaml"
    config.write_text(yaml.safe_dump(raw))
    return root, str(config), config_from_dict(raw)


def manifest_counts(root, site):
    """(split, class) -> rows, read from the manifest with csv alone."""
    with open(root / "data" / site / "manifest.csv", newline="") as f:
        return Counter((row["split"], row["label"]) for row in csv.DictReader(f))


def decoded_independently(root, site, split):
    """Every pixel of a split's images as PIL reads them, scaled by the file's bit depth, float32 as training."""
    out = []
    for name in sorted(os.listdir(root / "data" / site / "images")):
        if name.startswith(split + "_"):
            arr = np.asarray(Image.open(root / "data" / site / "images" / name))
            out.append((arr.astype(np.float64) / (65535 if arr.dtype == np.uint16 else 255)).astype(np.float32))
    return np.concatenate([a.ravel() for a in out])


def test_the_site_generator_aggregates_the_images_training_decodes(federation):
    """NVFlare's Statistics spec, met at a site without FLARE: count, sum, sd, the variance share, the histogram."""
    root, _, cfg = federation
    generator = SiteImageStatistics(job_config=job_dict(cfg), bins=BINS)
    generator.load("site-2")
    pixels = decoded_independently(root, "site-2", "train")
    assert generator.count("train", "intensity") == 24 and generator.failure_count("train", "intensity") == 0
    hist = generator.histogram("train", "intensity", BINS, 0.0, 1.0)
    assert [b.sample_count for b in hist.bins] == np.histogram(pixels, bins=BINS, range=(0, 1))[0].tolist()
    assert generator.max_value("train", "intensity_max") == pixels.max() <= 4080 / 65535  # 1/16 of [0, 1]
    means = pixels.reshape(24, -1).mean(axis=1, dtype=np.float64)
    assert generator.sum("train", "intensity") == pytest.approx(means.sum(), rel=1e-6)
    assert generator.stddev("train", "intensity") == pytest.approx(means.std(ddof=1), rel=1e-5)
    assert generator.variance_with_mean("train", "intensity", 0.5, 100) == pytest.approx(
        ((means - 0.5) ** 2).sum() / 99, rel=1e-6)
    assert generator.sum("train", "label=pneumonia") == manifest_counts(root, "site-2")[("train", "pneumonia")]
    # another binning than the one counted while decoding: the split is decoded again, same numbers as numpy's
    hist = generator.histogram("train", "intensity", 7, 0.0, 0.1)
    assert [b.sample_count for b in hist.bins] == np.histogram(pixels, bins=7, range=(0, 0.1))[0].tolist()


@pytest.mark.slow
def test_federated_statistics_catch_a_12_bit_site_and_a_scanner_shift(federation, capsys):
    root, config, cfg = federation
    out = root / "stats"
    code = fedstats.main(["--config", config, "--workspace", str(root / "ws"), "--out", str(out),
                          "--min-count", str(MIN_COUNT), "--noise", "0", "0", "--max-bins-percent", "100",
                          "--bins", str(BINS)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    summary = json.loads((out / "summary.json").read_text())
    nvflare = json.loads((out / "nvflare_statistics.json").read_text())
    assert (out / "histograms.png").stat().st_size > 10_000 and (out / "stats.md").read_text() in printed.out

    # the flags: site-2's 12-bit values in 16-bit files, site-3's shift; site-1 is the reference
    flags = summary["flags"]
    assert set(flags) == {"site-2", "site-3"}
    assert any("12-bit values in 16-bit files" in why and "data.sites.site-2.intensity_range: [0, 4095]" in why
               for why in flags["site-2"])
    assert flags["site-3"] == [next(why for why in flags["site-3"] if why.startswith("far from the other sites"))]
    assert "mean intensity 0.8" in flags["site-3"][0]
    assert "warning: site-2 decoded images use" in printed.err

    # the counts are the manifests' (per split, and per class where the split has min_count images)
    for site, sizes in SPLIT_SIZES.items():
        rows = manifest_counts(root, site)
        for split, n in sizes.items():
            got = summary["sites"][site]["splits"][split]
            assert nvflare["intensity"]["count"][site][split] == got["images"] == n
            if n >= MIN_COUNT:
                assert got["classes"] == {c: rows[(split, c)] for c in CLASSES}
            assert got["height"] == {"mean": 28.0, "sd": 0.0} or n < MIN_COUNT

    # NVFlare's MinCountCleanser kept site-3's 4 val images home: their count leaves (NVFlare sends counts), not
    # their mean, class counts or histogram
    small = summary["sites"]["site-3"]["splits"]["val"]
    assert small["images"] == 4 and small["classes"] is None and small["intensity"]["mean"] is None
    assert "val" not in nvflare["intensity"]["mean"]["site-3"] and "val" in nvflare["intensity"]["mean"]["site-1"]
    assert "| site-3 | val | 4 | withheld | withheld | withheld |" in printed.out

    # a histogram equal to numpy's on the decoded pixels: the intensity range is fixed to [0, 1], so NVFlare's
    # min/max noise never moves its bins (the test also sets it to 0)
    for site in ("site-1", "site-2"):
        bins = nvflare["intensity"]["histogram"][site]["train"]
        pixels = decoded_independently(root, site, "train")
        counts, edges = np.histogram(pixels, bins=BINS, range=(0, 1))
        assert [b[2] for b in bins] == counts.tolist()
        assert [b[0] for b in bins] == pytest.approx(edges[:-1].tolist(), abs=1e-4)
    # HistogramBinsCleanser: 20 bins need more than 20 images (max_bins_percent 100): val's 8 stay home
    assert "val" not in nvflare["intensity"]["histogram"]["site-1"]
    # with noise 0 the size histogram spans exactly the images' one size (numpy widens a single value by 0.5)
    height = nvflare["height"]["histogram"]["site-1"]["train"]
    assert (height[0][0], height[-1][1]) == (27.5, 28.5) and sum(b[2] for b in height) == 24

    # a real consortium's run (POC, production): the same tables from the JSON of its download, no simulator
    code = fedstats.main(["--config", config, "--from", str(out / "nvflare_statistics.json"), "--out",
                          str(root / "from_json"), "--min-count", str(MIN_COUNT), "--noise", "0", "0",
                          "--max-bins-percent", "100"])
    assert code == 0 and json.loads((root / "from_json" / "summary.json").read_text()) == summary
