"""The benchmark harness on tiny data: real simulator runs, tuning on validation, tables, studies and plots."""

import csv
import json
import os

import pytest
import yaml

from fedopal.tools.bench import main as bench_main

from conftest import tiny_config

pytestmark = pytest.mark.slow


def test_bench_harness_end_to_end(small_federation, tmp_path, capsys):
    root, _ = small_federation
    raw = tiny_config(root).model_dump(mode="json")
    raw["train"].update(num_rounds=1, local_steps=1)
    raw["model"]["head"] = None  # every method at its own design: fedopal_p's head is personal
    raw["bench"] = {"methods": ["local", "fedopal_p"], "seeds": [0, 1], "lr_grid": [0.001, 0.003],
                    "studies": {"lambda_methods": [], "methods": [], "head": [], "lora_rank": [],
                                "same_head": "shared"},
                    "out_dir": str(tmp_path / "out")}
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert bench_main(["--config", str(config), "--workspace", str(tmp_path / "ws")]) == 0
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    # 4 tuning runs + 2 more seeds; the same-head study adds fedopal_p with a shared head (local keeps its own)
    assert "[1/8]" in printed and "fedopal_p" in printed

    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {r["method"] for r in rows} == {"local", "fedopal_p"}
    assert {r["seed"] for r in rows} == {"0", "1"} and {r["site"] for r in rows} == {"site-1", "site-2"}
    assert {r["eval"] for r in rows if r["method"] == "fedopal_p"} == {"personalized", "global_only"}
    assert {r["eval"] for r in rows if r["method"] == "local"} == {"personalized"}
    assert all(float(r["bytes_per_round"]) == 0 for r in rows if r["method"] == "local")
    assert all(float(r["bytes_per_round"]) > 0 for r in rows if r["method"] == "fedopal_p")
    # the diagnostics: exactly orthogonal A for fedopal_p, nothing for a one-adapter method
    assert all(abs(float(r["overlap_A"])) < 1e-6 and 0 <= float(r["overlap_u"]) <= 1 and float(r["random_A"]) > 0
               for r in rows if r["method"] == "fedopal_p")
    assert all(r["overlap_A"] == "" for r in rows if r["method"] == "local")
    chosen = json.load(open(out / "chosen.json"))
    for method, scores in chosen["tuning"].items():  # the choice is the best validation score
        assert float(max(scores, key=scores.get)) == chosen["chosen_lr"][method]
    md = open(out / "summary.md").read()
    assert "| fedopal_p | personalized |" in md and "Reading" in md and "| fedopal_p | 0.0000" in md
    studies = open(out / "studies.md").read()
    assert "## same head for all (shared)" in studies and "| fedopal_p (shared) |" in studies
    assert "| local (personal) |" in studies
    for png in ("per_site.png", "rounds.png"):
        assert (out / png).stat().st_size > 1000
    assert len(os.listdir(out / "runs")) == 8

    # a second invocation reuses every finished run
    assert bench_main(["--config", str(config), "--workspace", str(tmp_path / "ws")]) == 0
    assert "(cached)" in capsys.readouterr().out

    # --cached-only runs nothing: without fedopal_p's second seed, the row says 1 seed; without a tuning run of
    # local, local is left out (its lr could not be chosen)
    runs = sorted(os.listdir(out / "runs"))
    os.remove(out / "runs" / next(p for p in runs if p.startswith("fedopal_p-s1") and "headpersonal" in p))
    os.remove(out / "runs" / next(p for p in runs if p.startswith("local-s0")))
    assert bench_main(["--config", str(config), "--workspace", str(tmp_path / "ws"), "--cached-only"]) == 0
    assert "left out (tuning runs missing): local" in capsys.readouterr().out
    assert len(os.listdir(out / "runs")) == 6
    md = open(out / "summary.md").read()
    assert "| local | personalized |" not in md
    row = next(line for line in md.splitlines() if line.startswith("| fedopal_p | personalized |"))
    assert row.endswith("| 1 |") and " ± " not in row.split("|")[3]

    # with no usable run it says so in one line and leaves the tables that are there alone
    for name in os.listdir(out / "runs"):
        os.rename(out / "runs" / name, tmp_path / name)
    assert bench_main(["--config", str(config), "--workspace", str(tmp_path / "ws"), "--cached-only"]) == 1
    err = capsys.readouterr().err.strip()
    assert "holds no finished run" in err and "Fix:" in err and "\n" not in err
    assert open(out / "summary.md").read() == md


def test_the_guide_reads_the_committed_summaries(tmp_path):
    """Hand-made summary.csv: two methods, two seeds, two sites; the means and sds are easy to check by hand."""
    import statistics

    from fedopal.tools.bench import main as bench

    folder = tmp_path / "concept"
    folder.mkdir()
    rows = [("ffa_lora", "0", 0.90, 0.80), ("ffa_lora", "1", 0.92, 0.84), ("fedopal_p", "0", 0.70, 0.60),
            ("fedopal_p", "1", 0.72, 0.62)]
    with open(folder / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "site", "eval", "balanced_accuracy"])
        for method, seed, a, b in rows:
            w.writerow([method, seed, "site-1", "personalized", a])
            w.writerow([method, seed, "site-2", "personalized", b])
            w.writerow([method, seed, "site-1", "global_only", 0.0])  # other views are not the headline
    assert bench(["--guide", str(folder), "--out", str(tmp_path / "guide.md")]) == 0
    text = open(tmp_path / "guide.md").read()
    ffa = statistics.mean([0.85, 0.88]), statistics.stdev([0.85, 0.88])
    ours = statistics.mean([0.65, 0.67]), statistics.stdev([0.65, 0.67])
    assert f"| concept | ffa_lora {ffa[0]:.3f} ± {ffa[1]:.3f} | fedopal_p: 2 of 2, {ours[0]:.3f} ± {ours[1]:.3f} |" \
        in text
    assert f"{ours[0] - ffa[0]:+.3f} (2 sd {2 * max(ffa[1], ours[1]):.3f}, real)" in text
    assert bench(["--guide", str(tmp_path / "nothing")]) == 2
