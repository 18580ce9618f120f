"""The benchmark harness on tiny data: real simulator runs, tuning on validation, tables, studies and plots."""

import csv
import json
import os

import pytest
import yaml

from fedopal.bench import main as bench_main

from conftest import tiny_config

pytestmark = pytest.mark.slow


def test_bench_harness_end_to_end(small_federation, tmp_path, capsys):
    root, _ = small_federation
    raw = tiny_config(root).model_dump(mode="json")
    raw["train"].update(num_rounds=1, local_steps=1)
    raw["bench"] = {"methods": ["local", "fedopal_w"], "seeds": [0, 1], "lr_grid": [0.001, 0.003],
                    "studies": {"lambda_methods": ["fedopal_w"], "orth_lambda": [0.1], "methods": [],
                                "head": [], "lora_rank": []},
                    "out_dir": str(tmp_path / "out")}
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert bench_main(["--config", str(config), "--workspace", str(tmp_path / "ws")]) == 0
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    assert "[1/6]" in printed and "fedopal_w" in printed  # 4 tuning runs + 2 more seeds; the study reuses them

    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert {r["method"] for r in rows} == {"local", "fedopal_w"}
    assert {r["seed"] for r in rows} == {"0", "1"} and {r["site"] for r in rows} == {"site-1", "site-2"}
    assert {r["eval"] for r in rows if r["method"] == "fedopal_w"} == {"personalized", "global_only"}
    assert {r["eval"] for r in rows if r["method"] == "local"} == {"personalized"}
    assert all(float(r["bytes_per_round"]) == 0 for r in rows if r["method"] == "local")
    assert all(float(r["bytes_per_round"]) > 0 for r in rows if r["method"] == "fedopal_w")
    chosen = json.load(open(out / "chosen.json"))
    for method, scores in chosen["tuning"].items():  # the choice is the best validation score
        assert float(max(scores, key=scores.get)) == chosen["chosen_lr"][method]
    md = open(out / "summary.md").read()
    assert "| fedopal_w | personalized |" in md and "Reading" in md and "fedopal_w vs fedavg_lora" not in md
    assert "## fedopal_w: lambda" in open(out / "studies.md").read()
    for png in ("per_site.png", "rounds.png"):
        assert (out / png).stat().st_size > 1000
    assert len(os.listdir(out / "runs")) == 6

    # a second invocation reuses every finished run
    assert bench_main(["--config", str(config), "--workspace", str(tmp_path / "ws")]) == 0
    assert "(cached)" in capsys.readouterr().out
