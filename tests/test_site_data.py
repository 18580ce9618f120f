"""Real hospital data: spreadsheet manifests, class names, sites with different formats, measurability warnings,
validate and the site agreeing, metrics defined for any subset of classes (training, report, predict, benchmark),
and a failed simulation ending in the site's own one line."""

import csv
import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from fedopal.tools.bench import aggregate, site_results
from fedopal.config import config_from_dict, job_dict
from fedopal.site.data import DataError, build_datasets, read_manifest
from fedopal.site.predict import write_predictions
from fedopal.tools.report import summarize
from fedopal.site.train import classification_metrics
from fedopal.site.validate import check_site

from conftest import NPZ, REPO, tiny_config
from test_bad_input import assert_one_line_error, run, write_config

ENV = dict(os.environ)


def write_site(folder, files: dict, rows, text=None, encoding="utf-8", newline="\n"):
    """files: name -> callable(path) writing it; rows: (path, label, split) or the manifest's raw text."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in files.items():
        write(folder / name)
    if text is None:
        text = newline.join(["path,label,split"] + [",".join(map(str, r)) for r in rows]) + newline
    (folder / "manifest.csv").write_bytes(text.encode(encoding))
    return folder / "manifest.csv"


def png(value=0, shape=(12, 12), dtype=np.uint8):
    return lambda p: Image.fromarray(np.full(shape, value, dtype)).save(p)


SPLIT_ROWS = [("a.png", 0, "train"), ("b.png", 1, "train"), ("c.png", 0, "val"), ("d.png", 1, "test")]
FILES = {n: png(i * 40) for i, n in enumerate("abcd")}
FILES = {f"{k}.png": v for k, v in FILES.items()}


# -- manifests -------------------------------------------------------------------------------------------------

def test_a_spreadsheet_manifest_with_bom_crlf_and_spaced_header_is_read(tmp_path):
    """Fault 6: UTF-8 BOM + CRLF was refused with `found ['\\ufeffpath', ...]`."""
    text = "\ufeffpath , label,split \r\n" + "".join(f"{p},{lab},{s}\r\n" for p, lab, s in SPLIT_ROWS) + ",,\r\n"
    manifest = write_site(tmp_path / "site-1", FILES, None, text=text)
    samples = read_manifest(str(manifest), 2)
    assert [(os.path.basename(s.path), s.label, s.split) for s in samples] == SPLIT_ROWS


def test_the_same_file_in_two_splits_is_an_error_naming_both(tmp_path):
    rows = SPLIT_ROWS + [("./a.png", 0, "test")]
    manifest = write_site(tmp_path / "site-1", FILES, rows)
    with pytest.raises(DataError) as err:
        read_manifest(str(manifest), 2)
    message = str(err.value)
    assert "a.png" in message and "'test'" in message and "'train'" in message and "row 2" in message
    assert "Fix" in message and "\n" not in message


# -- class names -----------------------------------------------------------------------------------------------

def test_class_names_map_text_labels_to_the_same_index_on_every_site(tmp_path):
    cfg = config_from_dict({"data": {"class_names": ["normal", "pneumonia", "covid"]}})
    assert cfg.data.num_classes == 3 and job_dict(cfg)["data"]["class_names"] == ["normal", "pneumonia", "covid"]
    one = write_site(tmp_path / "site-1", FILES, [("a.png", "covid", "train"), ("b.png", "normal", "train"),
                                                  ("c.png", "pneumonia", "val"), ("d.png", 2, "test")])
    two = write_site(tmp_path / "site-2", FILES, [("a.png", "pneumonia", "train"), ("b.png", "covid", "train"),
                                                  ("c.png", 0, "val"), ("d.png", "normal", "test")])
    labels = lambda m: [s.label for s in read_manifest(str(m), 3, cfg.data.class_names)]  # noqa: E731
    assert labels(one) == [2, 0, 1, 2] and labels(two) == [1, 2, 0, 0]
    bad = write_site(tmp_path / "site-3", FILES, [("a.png", "Pneumonia ", "train")])
    with pytest.raises(DataError, match=r"manifest.csv:2: label 'Pneumonia' is neither one of data.class_names"):
        read_manifest(str(bad), 3, cfg.data.class_names)


def test_class_names_and_num_classes_must_agree():
    from fedopal.config import ConfigError

    with pytest.raises(ConfigError, match="num_classes is 3 but data.class_names names 2"):
        config_from_dict({"data": {"class_names": ["a", "b"], "num_classes": 3}})


def test_predictions_csv_uses_the_class_names(tmp_path):
    from fedopal.site.data import Sample

    samples = [Sample("/x/1.png", 1, "test"), Sample("/x/2.png", -1, "test")]
    probs = np.array([[0.2, 0.8], [0.9, 0.1]])
    write_predictions(str(tmp_path / "p.csv"), samples, probs, ["normal", "pneumonia"])
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "split", "label", "prediction", "prob_normal", "prob_pneumonia"]
    assert (rows[0]["label"], rows[0]["prediction"], rows[1]["label"], rows[1]["prediction"]) == \
        ("pneumonia", "pneumonia", "", "normal")


# -- sites differ; validate reports and warns ------------------------------------------------------------------

def test_an_rgb_jpeg_site_and_a_16_bit_gray_site_train_in_one_job(tmp_path):
    rng = np.random.default_rng(0)
    jpeg = lambda p: Image.fromarray(rng.integers(0, 256, (20, 16, 3)).astype(np.uint8)).save(p)  # noqa: E731
    gray16 = lambda p: Image.fromarray(rng.integers(0, 65536, (18, 22)).astype(np.uint16)).save(p)  # noqa: E731
    rows = [(f"{i}.{{}}", i % 2, ("train", "train", "val", "val", "test", "test")[i]) for i in range(6)]
    write_site(tmp_path / "fed" / "site-1", {f"{i}.jpg": jpeg for i in range(6)},
               [(p.format("jpg"), lab, s) for p, lab, s in rows])
    write_site(tmp_path / "fed" / "site-2", {f"{i}.png": gray16 for i in range(6)},
               [(p.format("png"), lab, s) for p, lab, s in rows])
    config = write_config(tmp_path, tmp_path / "fed", federation={"num_sites": 2})
    code, _ = run("fedopal.site.validate", "--config", config)
    assert code == 0
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        from fedopal.site.validate import main

        main(["--config", config])
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("site-1: ok (jpeg uint8 3ch x6 into 1 channel(s);")
    assert any(line.startswith("site-2: ok (png uint16 1ch x6 into 1 channel(s);") for line in lines)
    cfg = tiny_config(tmp_path / "fed")
    for site in ("site-1", "site-2"):
        ds = build_datasets(cfg.data, check_site(cfg, site), 1, None)
        assert ds["train"][0]["image"].shape == (1, 32, 32)


def validate_output(tmp_path, rows, files=None, **sections):
    write_site(tmp_path / "fed" / "site-1", files or FILES, rows)
    import contextlib
    import io

    from fedopal.site.validate import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--config", write_config(tmp_path, tmp_path / "fed", **sections)])
    return code, out.getvalue()


def test_validate_warns_where_a_split_cannot_be_measured(tmp_path):
    """Fault 7: a one-class val/test split or a one-class train split passed validate silently."""
    rows = [("a.png", 0, "train"), ("b.png", 0, "train"), ("c.png", 0, "val"), ("d.png", 1, "test")]
    code, out = validate_output(tmp_path, rows, data={"class_names": ["normal", "pneumonia"]})
    assert code == 0
    assert "warning: site-1 train holds one class (normal)" in out
    assert "warning: site-1 val: class(es) missing: pneumonia (balanced accuracy and AUC are n/a)" in out
    assert "warning: site-1 test: class(es) missing: normal" in out and "under 30 samples: pneumonia (1)" in out


def test_validate_takes_set_overrides(tmp_path):
    write_site(tmp_path / "elsewhere" / "site-1", FILES, SPLIT_ROWS)
    config = write_config(tmp_path, tmp_path / "nowhere")
    assert run("fedopal.site.validate", "--config", config)[0] == 2
    code, err = run("fedopal.site.validate", "--config", config, "--set", f"data.root={tmp_path / 'elsewhere'}")
    assert code == 0, err


def test_what_passes_validate_starts_training_and_what_fails_fails_alike(tmp_path):
    """Fault 9: data that passed validate failed at site start (here: trailing singleton axes)."""
    vol = lambda shape: lambda p: nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(  # noqa
        np.float32), np.eye(4)), str(p))
    files = {f"{i}.nii.gz": vol((16, 16, 16, 1)) for i in range(4)}
    rows = [(f"{i}.nii.gz", i % 2, ("train", "train", "val", "test")[i]) for i in range(4)]
    manifest = write_site(tmp_path / "fed" / "site-1", files, rows)
    raw = tiny_config(tmp_path / "fed").model_dump(mode="json")
    raw["data"].update(spatial_dims=3, image_size=16)
    raw["model"]["vit"]["patch_size"] = 8
    cfg = config_from_dict(raw)
    samples = check_site(cfg, "site-1")
    assert build_datasets(cfg.data, samples, 1, None, str(manifest))["train"][0]["image"].shape == (1, 16, 16, 16)
    vol((16, 16, 16, 3))(tmp_path / "fed" / "site-1" / "3.nii.gz")  # now one file holds 3 channels
    with pytest.raises(DataError) as at_validate:
        check_site(cfg, "site-1")
    with pytest.raises(DataError) as at_site:
        build_datasets(cfg.data, samples, 1, None, str(manifest))
    # validate names the manifest row too
    assert str(at_site.value) in str(at_validate.value) and "3.nii.gz" in str(at_site.value)
    assert str(at_validate.value).startswith(f"{manifest}:5: ")


# -- metrics for any subset of classes -------------------------------------------------------------------------

@pytest.mark.parametrize("present", [[3], [1, 4], [0, 2, 4], [0, 1, 2, 3, 4]])
def test_metrics_are_defined_or_nan_for_any_subset_of_classes(present):
    """Fault 8: a 5-class site whose test split held two classes crashed roc_auc_score and the job."""
    rng = np.random.default_rng(len(present))
    labels = np.array(present * 12)
    probs = rng.dirichlet(np.ones(5), size=len(labels))
    m = classification_metrics(labels, probs)
    preds = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(np.mean(preds == labels))
    if len(present) == 1:
        assert math.isnan(m["balanced_accuracy"]) and math.isnan(m["auc"])
        return
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, preds))
    sub = probs[:, present] / probs[:, present].sum(1, keepdims=True)
    ref = (roc_auc_score(labels == present[1], sub[:, 1]) if len(present) == 2
           else roc_auc_score(labels, sub, multi_class="ovr", labels=present))
    assert m["auc"] == pytest.approx(ref)


def metrics_record(site, round_num, bacc_val, bacc_test, auc):
    return {"round": round_num, "site": site, "bytes_sent": 10, "trainable_params": 5,
            "personalized/val/balanced_accuracy": bacc_val, "personalized/test/balanced_accuracy": bacc_test,
            "personalized/test/accuracy": 0.5, "personalized/test/auc": auc,
            "global_only/test/balanced_accuracy": bacc_test}


def test_the_report_marks_undefined_metrics_na_and_says_how_many_sites_a_mean_covers(tmp_path):
    for site, recs in {"site-1": [metrics_record("site-1", 1, 0.6, 0.7, 0.8), metrics_record("site-1", 2, 0.9, 0.8, 0.9)],
                       "site-2": [metrics_record("site-2", r, math.nan, math.nan, math.nan) for r in (1, 2)]}.items():
        (tmp_path / site).mkdir()
        (tmp_path / site / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = summarize(str(tmp_path), tiny_config(), 1.0)
    md = summary["markdown"]
    assert "| site-2 | n/a (final) | n/a | n/a | 0.500 | n/a |" in md
    assert "**0.800** (1/2 sites)" in md and "**0.500** |" in md  # accuracy is defined on both
    assert summary["mean_sites"]["bacc_personalized"] == 1 and summary["worst_site"]["site"] == "site-1"


def test_the_benchmark_means_skip_undefined_sites_and_count_them():
    sites = {"site-1": [metrics_record("site-1", 1, 0.9, 0.8, 0.9)],
             "site-2": [metrics_record("site-2", 1, math.nan, math.nan, math.nan)]}
    for records in sites.values():
        for r in records:
            r.update({"global_only/val/balanced_accuracy": r["personalized/val/balanced_accuracy"]})
    result = {"sites": sites, "bytes_received": {}, "wall_s": 1.0, "spec": {"seed": 0}}
    assert len(site_results(result, "personalized")) == 2
    agg = aggregate([result])
    assert agg["bacc"][0] == pytest.approx(0.8) and agg["sites"] == 1 and agg["total_sites"] == 2
    assert agg["worst"][0] == pytest.approx(0.8)


# -- a site that dies at start ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_failed_simulation_prints_the_sites_one_line_error_and_its_log(tmp_path):
    """Fault 9: a failed simulation ended in `RuntimeError: Simulation failed with return code 2` and a traceback."""
    from fedopal.tools.prepare import build_federation

    build_federation(NPZ, str(tmp_path / "fed"), num_sites=2, seed=1, train_per_site=16, val_per_site=8,
                     test_per_site=8, min_test_per_class=3, min_val_per_class=3)
    raw = tiny_config(tmp_path / "fed").model_dump(mode="json")
    raw["train"]["num_rounds"] = 1
    raw["site_state_dir"] = str(tmp_path / "state")
    damaged = tmp_path / "state" / "site-2" / "personal_state.pt"  # a site-start failure validate cannot see
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a torch file")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "fedopal.tools.job", "--config", str(tmp_path / "cfg.yaml"), "--simulate",
                           "--workspace", str(tmp_path / "ws")], capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=400)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last.startswith("error: site-2: ") and "personal_state.pt: cannot be read as a personal state" in last, last
    assert damaged.read_bytes() == b"not a torch file"  # nothing moved or overwritten
    log = os.path.join(str(tmp_path / "ws"), raw["name"], "site-2", "log.txt")
    assert f"(log: {log})" in last and os.path.isfile(log)
    assert "Simulation failed with return code" not in proc.stderr


def test_the_report_shows_each_sites_interval_and_its_plot_marks_the_round_it_reports(tmp_path, monkeypatch):
    """The table's cell carries the site's 95 % interval (from its metrics.jsonl); rounds.png stars the round the
    table reports (the best validation round), not the last one; the cross-site caption names the final round."""
    recs = [metrics_record("site-1", 1, 0.6, 0.7, 0.8), metrics_record("site-1", 2, 0.9, 0.8, 0.9),
            metrics_record("site-1", 3, 0.7, 0.85, 0.95)]
    recs[1] |= {"personalized/test/balanced_accuracy_ci_low": 0.71, "personalized/test/balanced_accuracy_ci_high": 0.88,
                "personalized/test/auc_ci_low": 0.83, "personalized/test/auc_ci_high": 0.96}
    (tmp_path / "site-1").mkdir()
    (tmp_path / "site-1" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = summarize(str(tmp_path), tiny_config(), 1.0)
    assert "| site-1 | 2 | 0.800 [0.71, 0.88] | 0.800 | 0.500 | 0.900 [0.83, 0.96] |" in summary["markdown"]
    assert "[low, high]: the 95 % bootstrap interval over the site's test images" in summary["markdown"]
    figures = []
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    from fedopal.tools.report import cross_site_markdown, write_summary

    write_summary(summary, str(tmp_path / "out"))
    (ax,) = figures[0].axes
    stars = [line for line in ax.lines if line.get_marker() == "*"]
    assert len(stars) == 1 and list(stars[0].get_xdata()) == [2] and list(stars[0].get_ydata()) == [0.8]
    matrix = {"metric": "test balanced_accuracy", "rows": ["global", "site-1"], "columns": ["site-1"],
              "values": [[0.8], [0.9]]}
    assert "Every row comes from the final round" in cross_site_markdown(matrix)


def test_the_dp_note_is_only_in_a_dp_table(tmp_path):
    (tmp_path / "site-1").mkdir()
    (tmp_path / "site-1" / "metrics.jsonl").write_text(
        "".join(json.dumps(metrics_record("site-1", r, 0.6 + r / 10, 0.7, 0.8)) + "\n" for r in (1, 2)))
    assert "differential privacy" not in summarize(str(tmp_path), tiny_config(), 1.0)["markdown"]
    raw = tiny_config().model_dump(mode="json")
    raw["privacy"].update(noise_multiplier=1.0, mode="update")
    raw["federation"]["aggregation_weights"] = "equal"
    md = summarize(str(tmp_path), config_from_dict(raw), 1.0)["markdown"]
    assert "Round 1 trained from a global model that had not yet received a noised update" in md
