"""fedopal validate: every problem of every site in one pass (grouped, each with its row, file and fix), near misses
named, each site's own decoding, and what the decoded intensities look like (plain and --deep)."""

import contextlib
import io

import numpy as np
import pytest
import yaml
from PIL import Image

from fedopal.config import ConfigError, config_from_dict, load_config
from fedopal.site.data import DataError
from fedopal.site.validate import check_site, main

from conftest import tiny_config
from test_bad_input import write_config
from test_site_data import FILES, SPLIT_ROWS, png, write_site


def validate(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue().strip()


def test_every_problem_of_every_site_is_reported_in_one_pass_with_its_row(tmp_path):
    """Fifteen mislabelled rows took fifteen runs: now one run lists them all, and the other kinds beside them."""
    files = {f"{i}.png": png(i) for i in range(20)}
    rows = [(f"{i}.png", "pneumonai" if i < 15 else i % 2, ("train", "val", "test")[i % 3]) for i in range(20)]
    rows += [("gone.png", 0, "train"), ("images\\0.png", 0, "train"), ("16.png", 1, "tets"),
             ("17.png", 0, "Validation")]
    write_site(tmp_path / "fed" / "site-1", files, rows)
    (tmp_path / "fed" / "site-1" / "images").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "fed" / "site-1" / "images" / "0.png")
    write_site(tmp_path / "fed" / "site-2", FILES, SPLIT_ROWS)
    config = write_config(tmp_path, tmp_path / "fed", federation={"num_sites": 2},
                          data={"class_names": ["normal", "pneumonia"]})
    code, out, err = validate("--config", config, "--limit", "10")
    assert code == 2
    manifest = str(tmp_path / "fed" / "site-1" / "manifest.csv")
    assert "site-1: 19 problems" in out and "site-2: ok" in out
    assert "  label (15):" in out
    for i in range(10):  # the limit, then a count
        assert f"{manifest}:{i + 2}: label 'pneumonai' is neither one of data.class_names" in out
    assert f"{manifest}:12:" not in out and "    ... and 5 more" in out
    assert "Fix: did you mean 'pneumonia'?" in out
    assert f"  file not found (2):" in out and f"{manifest}:22: image file not found:" in out
    assert (f"{manifest}:23: 'images\\\\0.png' is a Windows path (backslashes), which names no file here; "
            f"{tmp_path / 'fed' / 'site-1' / 'images/0.png'} exists. Fix: write the manifest's paths with forward "
            "slashes (images/0.png).") in out
    assert f"{manifest}:24: split 'tets' is not one of train, val, test. Fix: did you mean 'test'?" in out
    assert f"{manifest}:25: split 'Validation' is not one of train, val, test. Fix: did you mean 'val'?" in out
    # one line on stderr: the first problem, and how many more of which kind
    assert err.count("\n") == 0 and err.startswith(f"error: {manifest}:2: label 'pneumonai'")
    assert "(+18 more in 1 of 2 site(s): label 15, file not found 2, split 2;" in err


def test_a_site_start_stops_on_the_first_problem_and_says_how_many_more(tmp_path):
    rows = [("a.png", 5, "train"), ("b.png", 7, "train"), ("c.png", 0, "val"), ("d.png", 1, "test")]
    write_site(tmp_path / "fed" / "site-1", FILES, rows)
    with pytest.raises(DataError) as err:
        check_site(tiny_config(tmp_path / "fed"), "site-1")
    assert "manifest.csv:2: label 5 is out of range 0..1" in str(err.value)
    assert "(+1 more problem in this site's data: fedopal validate lists them all)" in str(err.value)


def test_near_misses_are_named(tmp_path):
    write_site(tmp_path / "fed" / "hospital_a", FILES, SPLIT_ROWS)
    config = write_config(tmp_path, tmp_path / "fed", federation={"site_names": ["hospital-a"]})
    code, out, err = validate("--config", config)
    assert code == 2
    assert "manifest not found. Found the folder 'hospital_a'" in err
    assert "rename it to 'hospital-a', or set federation.site_names to the folders' names." in err
    (tmp_path / "fed" / "hospital_a").rename(tmp_path / "fed" / "hospital-a")
    (tmp_path / "fed" / "hospital-a" / "manifest.csv").rename(tmp_path / "fed" / "hospital-a" / "Manifest.csv")
    code, _, err = validate("--config", config)
    assert "Found 'Manifest.csv'" in err and "set data.manifest: Manifest.csv" in err
    (tmp_path / "fed" / "hospital-a" / "Manifest.csv").write_text("Path,label,split\na.png,0,train\n")
    code, _, err = validate("--config", config, "--set", "data.manifest=Manifest.csv")
    assert "missing column(s) ['path']" in err and "rename 'Path' -> 'path'" in err


def test_config_keys_get_did_you_mean(tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"class_name": ["a", "b"]}}, source="cfg.yaml")
    assert "cfg.yaml: unknown key 'data.class_name'. Did you mean 'class_names'?" in str(err.value)
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"sites": {"site-1": {"intensty_range": [0, 1]}}}}, source="cfg.yaml")
    assert "unknown key 'data.sites.site-1.intensty_range'. Did you mean 'intensity_range'?" in str(err.value)
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": {"sites": {"site_1": {"intensity_range": [0, 4095]}}}}, source="cfg.yaml")
    assert "data.sites names 'site_1', which is not a site of this federation; did you mean 'site-1'?" in \
        str(err.value)
    # a name far from every site is a late joiner's: allowed
    assert config_from_dict({"data": {"sites": {"hospital-z": {"window_from_file": True}}}}).data.sites


def test_one_site_sets_its_own_decoding(tmp_path):
    """site-2 stores 12-bit values in 16-bit PNGs: its own data.sites.site-2.intensity_range maps them to [0, 1]
    while site-1 keeps each file's own encoding; validate prints each site's effective settings."""
    values = np.linspace(1665, 3281, 144).reshape(12, 12).astype(np.uint16)
    files16 = {f"{k}.png": (lambda p, v=values: Image.fromarray(v).save(p)) for k in "abcd"}
    write_site(tmp_path / "fed" / "site-1", FILES, SPLIT_ROWS)
    write_site(tmp_path / "fed" / "site-2", files16, SPLIT_ROWS)
    config = write_config(tmp_path, tmp_path / "fed", federation={"num_sites": 2},
                          data={"sites": {"site-2": {"intensity_range": [0, 4095]}}})
    code, out, err = validate("--config", config)
    assert code == 0, err
    assert "  decoding: intensity_range each file's own encoding, window_from_file false, channel_adapt adapt" in out
    assert "  decoding: intensity_range [0, 4095] (site), window_from_file false, channel_adapt adapt" in out
    cfg = load_config(config)
    from fedopal.site.readers import DecodeOptions, decode

    reference = np.asarray(Image.open(tmp_path / "fed" / "site-2" / "a.png"), dtype=np.float64) / 4095
    at_site_2 = decode(str(tmp_path / "fed" / "site-2" / "a.png"),
                       DecodeOptions.from_config(cfg.data.for_site("site-2")))
    np.testing.assert_allclose(at_site_2[0][0].numpy(), reference, atol=1e-6)
    at_site_1 = decode(str(tmp_path / "fed" / "site-1" / "a.png"),
                       DecodeOptions.from_config(cfg.data.for_site("site-1")))
    np.testing.assert_allclose(at_site_1[0][0].numpy(), np.asarray(Image.open(tmp_path / "fed" / "site-1" / "a.png"),
                                                                    dtype=np.float64) / 255, atol=1e-6)


def test_deep_runs_every_file_and_shows_intensities_and_a_site_far_from_the_others(tmp_path):
    """Plain validate says how much of [0, 1] each site's images use; --deep runs every file through the pipeline and
    prints the per-site table, flagging the site whose 12-bit data in 16-bit PNGs decodes into 2 % of [0, 1]."""
    rng = np.random.default_rng(0)
    bright = lambda p: Image.fromarray(rng.integers(0, 256, (12, 12)).astype(np.uint8)).save(p)  # noqa: E731
    dark = lambda p: Image.fromarray(rng.integers(1665, 3282, (12, 12)).astype(np.uint16)).save(p)  # noqa: E731
    for site in ("site-1", "site-2"):
        write_site(tmp_path / "fed" / site, {f"{k}.png": bright for k in "abcd"}, SPLIT_ROWS)
    write_site(tmp_path / "fed" / "site-3", {f"{k}.png": dark for k in "abcd"}, SPLIT_ROWS)
    config = write_config(tmp_path, tmp_path / "fed", federation={"num_sites": 3})
    code, plain, _ = validate("--config", config)
    assert code == 0
    # the reference: each file's 1st and 99th percentile of v / 65535, their median over the site's files
    per_file = [np.percentile(np.asarray(Image.open(tmp_path / "fed" / "site-3" / f"{k}.png"), np.float64) / 65535,
                              (1, 99)) for k in "abcd"]
    used = np.median([p[1] for p in per_file]) - np.median([p[0] for p in per_file])
    assert f"median over 4 files" in plain and f"uses {100 * used:.0f}% of [0, 1]" in plain
    assert "--deep" not in plain and "| site |" not in plain
    assert "warning: site-3 is far from the other sites after decoding" in plain
    code, deep, _ = validate("--config", config, "--deep")
    assert code == 0
    assert deep.count("--deep: 4 of 4 files through the whole pipeline") == 3
    table = [line for line in deep.splitlines() if line.startswith("| site-")]
    assert len(table) == 3 and "uses 2% of [0, 1] vs 98%" in table[2] and table[0].endswith("|  |")


def test_what_validate_names_is_what_the_site_names(tmp_path):
    """The readers' notes (here: a 16-bit file holding 12-bit values) reach validate's output, once per kind."""
    values = np.full((12, 12), 3000, np.uint16)
    files16 = {f"{k}.png": (lambda p: Image.fromarray(values).save(p)) for k in "abcd"}
    write_site(tmp_path / "fed" / "site-1", files16, SPLIT_ROWS)
    code, out, _ = validate("--config", write_config(tmp_path, tmp_path / "fed"))
    assert code == 0
    warnings = [line for line in out.splitlines() if line.startswith("warning: site-1") and "intensity_range" in line]
    assert warnings and "12 bit" in " ".join(warnings)
    assert sum("... the same for" in line for line in out.splitlines()) <= 1


def test_a_misnamed_folder_is_matched_to_its_site_never_to_another_sites_folder(tmp_path):
    """hospital_a for hospital-a beside hospital-b: the hint names hospital_a (hospital-b is a site's own folder)."""
    write_site(tmp_path / "fed" / "hospital_a", FILES, SPLIT_ROWS)
    write_site(tmp_path / "fed" / "hospital-b", FILES, SPLIT_ROWS)
    config = write_config(tmp_path, tmp_path / "fed", federation={"site_names": ["hospital-a", "hospital-b"],
                                                                  "num_sites": 2})
    code, out, err = validate("--config", config)
    assert code == 2 and "Found the folder 'hospital_a'" in err and "'hospital-b'" not in err
    assert "hospital-a: 1 problem (no usable row)" in out


def test_a_range_that_blanks_every_image_is_a_problem_and_a_sliver_a_warning_naming_the_sites_key(tmp_path):
    with pytest.raises(ConfigError, match=r"intensity_range \[4095.0, 0.0\] must be \[low, high\] with low < high"):
        config_from_dict({"data": {"intensity_range": [4095, 0]}})
    with pytest.raises(ConfigError, match="must be"):
        config_from_dict({"data": {"sites": {"site-1": {"intensity_range": [5, 5]}}}})
    values = np.full((12, 12), 3000, np.uint16)
    files16 = {f"{k}.png": (lambda p: Image.fromarray(values).save(p)) for k in "abcd"}
    write_site(tmp_path / "fed" / "site-1", files16, SPLIT_ROWS)
    config = write_config(tmp_path, tmp_path / "fed")
    code, out, err = validate("--config", config, "--set", "data.sites={site-1: {intensity_range: [5000, 6000]}}")
    assert code == 2 and "every decoded image is a single value (0)" in err
    assert "Fix: set data.sites.site-1.intensity_range" in err
    code, out, _ = validate("--config", config)  # 3000 / 65535: a sliver of [0, 1]
    assert code == 0
    assert "warning: site-1 decoded images use 0% of [0, 1]" in out and "set data.sites.site-1.intensity_range" in out
    notes = [line for line in out.splitlines() if "fit 12 bits" in line]
    assert len(notes) == 1 and "(and 3 more file(s) alike)" in notes[0]
    assert "data.sites.site-1.intensity_range: [0, 4095]" in notes[0]


def test_a_repeated_row_is_a_problem_and_limit_must_be_positive(tmp_path):
    rows = SPLIT_ROWS + [("a.png", 0, "train")]
    write_site(tmp_path / "fed" / "site-1", FILES, rows)
    config = write_config(tmp_path, tmp_path / "fed")
    code, out, _ = validate("--config", config)
    assert code == 2 and "manifest.csv:6:" in out and "is listed again (first at row 2, also 'train')" in out
    with pytest.raises(SystemExit):
        validate("--config", config, "--limit", "0")


def test_a_simulation_stops_before_it_starts_naming_every_broken_site(tmp_path):
    from fedopal.tools.job import preflight

    write_site(tmp_path / "fed" / "site-1", FILES, [("a.png", 5, "train")] + SPLIT_ROWS[1:])
    write_site(tmp_path / "fed" / "site-2", FILES, [("a.png", 0, "tets")] + SPLIT_ROWS[1:])
    with pytest.raises(DataError) as err:
        preflight(tiny_config(tmp_path / "fed"))
    assert "manifest.csv:2: label 5 is out of range" in str(err.value)
    assert "(+1 more problem: site-1 1, site-2 1; fedopal validate lists them all)" in str(err.value)


def test_predict_may_mix_format_families_a_site_may_not(tmp_path):
    """A site's training data is one format family; files to predict may mix PNG and DICOM, each decoded as itself."""
    from dicomgen import write_dicom

    from fedopal.site.data import Sample, build_inference_dataset, file_format

    Image.fromarray(np.full((12, 12), 40, np.uint8)).save(tmp_path / "a.png")
    write_dicom(tmp_path / "IM0001", np.full((12, 12), 40, np.uint8))
    samples = [Sample(str(tmp_path / "a.png"), -1, ""), Sample(str(tmp_path / "IM0001"), -1, "")]
    with pytest.raises(DataError, match="mixed file types: 1 image files and 1 dicom"):
        file_format(samples, 2, "manifest.csv")
    cfg = tiny_config(tmp_path)
    images = [item["image"] for item in build_inference_dataset(cfg.data, samples, 1, None)]
    np.testing.assert_allclose(images[0].numpy(), images[1].numpy(), atol=1e-6)
