"""Docs that cannot go stale: the configuration reference and the README's example outputs, generated.

    fedopal docs            # rewrite docs/configuration.md and the generated blocks of README.md, docs/*.md
    fedopal docs --check    # exit 1, naming what differs, if either is not what the generator gives

The configuration reference is read from the pydantic schema (fedopal.config: every key, type, default, allowed
values, bounds and description). A README block is a region

    <!-- generated: NAME -->
    ...
    <!-- end generated -->

whose text comes from committed results (docs/results/..., docs/perf/, docs/bench/), rendered by BLOCKS[NAME].
`make docs` refreshes docs/results from the latest local runs (results/...) and then runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import types
from typing import Literal, Union, get_args, get_origin

from pydantic import BaseModel

from fedopal.config import FedOpalConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # custom/fedopal/tools/
CONFIG_DOC = os.path.join("docs", "configuration.md")
README = "README.md"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


# -- the configuration reference ----------------------------------------------------------------------------

def _type_text(annotation) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        inner = " or ".join(_type_text(a) for a in args)
        return f"{inner} (optional)" if len(args) < len(get_args(annotation)) else inner
    if origin in (list, tuple):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        return f"{origin.__name__} of {_type_text(args[0])}" if args else origin.__name__
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def _bounds(field) -> str:
    parts = []
    for m in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥")):
            if getattr(m, attr, None) is not None:
                parts.append(f"{sign} {getattr(m, attr)}")
        if getattr(m, "pattern", None):
            parts.append(f"pattern `{m.pattern}`")
    return ", ".join(parts)


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def config_rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type and bounds, default, description) for every leaf key of the config, in schema order."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        nested = [a for a in (get_args(annotation) or (annotation,)) if isinstance(a, type) and issubclass(a,
                                                                                                          BaseModel)]
        if nested:
            rows += config_rows(nested[0], key + ".")
            continue
        kind = _type_text(annotation)
        bounds = _bounds(field)
        rows.append((key, kind + (f", {bounds}" if bounds else ""), _default_text(field.default),
                     (field.description or "").replace("|", "\\|")))
    return rows


def configuration_markdown() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the schema (`custom/fedopal/config.py`) by `fedopal docs`; a test fails when "
             "this page and the schema differ. One object, `FedOpalConfig`: YAML files in `app_configs/` are "
             "validated against it, and any key can be set on the command line with `--set KEY=VALUE`. An unknown "
             "key, a wrong type or an out-of-range value stops with one line naming the file, the key, what is "
             "allowed and the fix.", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, description in config_rows(FedOpalConfig):
        lines.append(f"| `{key}` | {kind} | {default} | {description} |")
    return "\n".join(lines) + "\n"


# -- README blocks from committed results --------------------------------------------------------------------

# what writes each committed result, for a block whose source is not there yet
MAKERS = {"docs/results/demo": "make demo", "docs/results/demo_3d": "make demo-3d",
          "docs/results/demo_seg": "make demo-seg", "docs/results/poc": "make poc",
          "docs/results/latejoin": "make latejoin", "docs/results/console": "make console-transcript",
          "docs/perf": "make perf", "docs/bench": "make bench", "docs/results/privacy": "make privacy-audit"}


def _read(path: str) -> str:
    full = os.path.join(REPO, path)
    if not os.path.isfile(full):
        maker = max(((len(prefix), m) for prefix, m in MAKERS.items() if path.startswith(prefix)),
                    default=(0, "its command"))[1]  # the longest prefix: docs/results/demo_3d is not the demo
        return f"*Not measured yet: `{maker}`, then `make docs`, writes `{path}`.*"
    with open(full) as f:
        return f.read().strip()


def _summary_table(path: str) -> str:
    """A summary.md of `fedopal.tools.job --results` (the table, without its heading line)."""
    text = _read(path)
    return "\n".join(line for line in text.splitlines() if not line.startswith("### ")).strip()


def _perf_table() -> str:
    perf = json.loads(_read("docs/perf/summary.json"))
    if "loop_ratio" not in perf:
        return "*Not measured yet: `make perf`, then `make docs`.*"
    from fedopal.tools.perf import method_cost_table, method_cost_targets

    rows = [("(a) `loop_ratio`: site training loop / bare torch + peft loop (EfficientNet-Lite0, `fedopal_w`)",
             f"{perf['loop_ratio']} ({perf['site_images_per_s']} vs {perf['bare_images_per_s']} img/s)", "≥ 0.9"),
            ("(b) `round_overhead_ratio`: simulator wall time per round / bare compute (2 sites)",
             f"{perf['round_overhead_ratio']} ({perf['sim_round_s']} s vs {perf['bare_round_s']} s)", "≤ 1.15"),
            ("`startup_s`: the job's fixed start", f"{perf['startup_s']} s", ""),
            ("(c) `bytes_fraction`: ViT-S, bytes sent per round / the whole model",
             f"{perf['bytes_fraction']} (float16 transfer), {perf['bytes_fraction_float32']} (float32)", "≤ 0.02"),
            ("(d) peak RSS: a site process / the bare loop",
             f"{perf['peak_rss_mb']} / {perf['bare_peak_rss_mb']} MB", "≤ 1.3"),
            ("(e) seconds per round at 800 images in all (tiny ViT)",
             " · ".join(f"{n} sites {s}" for n, s in perf["scaling"].items()), "")]
    lines = [f"Measured on {perf['machine']}, `docs/perf/summary.json`:", "", "| measure | value | target |",
             "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    if perf.get("loop_note"):
        lines += ["", perf["loop_note"]]
    if "method_cost" in perf:
        lines += ["", "(f) each method's site loop, fused adapters (the default) and peft's own path "
                  "(`model.fused_adapters: false`), 64², batch 32, one thread, each in its own process, best of 3:",
                  "",
                  method_cost_table(perf["method_cost"]), "", "| target | value | |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {mark} |" for name, value, mark in method_cost_targets(perf["method_cost"])]
        if perf.get("method_cost_note"):
            lines += ["", perf["method_cost_note"]]
    return "\n".join(lines)


# the real runs docs/privacy.md's "What leaves a site" comes from (their wire_fields.json: tools.report.wire_fields)
WIRE_RUNS = (("no DP", "docs/results/demo/wire_fields.json"),
             ("DP update", "docs/results/privacy/update/wire_fields.json"),
             ("DP-SGD", "docs/results/privacy/dpsgd/wire_fields.json"),
             ("segmentation", "docs/results/demo_seg/wire_fields.json"))
_WHERE_ORDER = {"FLARE protocol": 0, "dxo_kind": 1, "tensor": 2, "meta": 3, "metric": 4, "event_tag": 5}
_TASK_ORDER = {"train": 0, "validate": 1, "event": 2}


def _wire_table() -> str:
    """Every field the sites sent in the real runs of WIRE_RUNS, by task and contract entry, one column per run."""
    runs = []
    for label, path in WIRE_RUNS:
        if not os.path.isfile(os.path.join(REPO, path)):
            return _read(path)  # the "not measured yet" line, naming the command
        runs.append((label, json.loads(_read(path))))
    rows: dict[tuple, dict] = {}
    for i, (_, run) in enumerate(runs):
        for f in run["fields"]:
            where = "FLARE protocol" if f["protocol"] else f["where"]
            key = (f["task"], where, "" if f["protocol"] else (f["contract"] or f["name"]))
            row = rows.setdefault(key, {"from_data": f["from_data"], "dp": f["dp"] or "",
                                        "names": [0] * len(runs), "messages": [0] * len(runs)})
            row["names"][i] += f["distinct_names"]
            row["messages"][i] = max(row["messages"][i], f["messages"])

    def cell(row, i, where):
        if not row["messages"][i]:
            return "—"
        n = row["names"][i]
        return f"✓ {row['messages'][i]}" + (f" ({n} {'tensors' if where == 'tensor' else 'names'})" if n > 1 else "")

    lines = ["| task | where | field (contract) | from data | under DP | " + " | ".join(l for l, _ in runs) + " |",
             "|---|---|---|---|---|" + "---|" * len(runs)]
    for key in sorted(rows, key=lambda k: (_TASK_ORDER.get(k[0], 9), _WHERE_ORDER.get(k[1], 9), k[2])):
        task, where, name = key
        row = rows[key]
        shown = f"`{name}`" if name else "headers, cookies, context props (names in `FLARE_*`)"
        lines.append(f"| {task} | {where} | {shown} | {'yes' if row['from_data'] else 'no'} | {row['dp'] or '—'} | "
                     + " | ".join(cell(row, i, where) for i in range(len(runs))) + " |")
    totals = "; ".join(f"{label}: " + ", ".join(f"{n} {task}" for task, n in sorted(run["messages"].items()))
                       + f" messages, {len(run['violations'])} violations ({run['method']}, "
                       f"{'no DP' if not (run['privacy'].get('noise_multiplier') or run['privacy'].get('target_epsilon')) else run['privacy']['mode']})"
                       for label, run in runs)
    return "\n".join(lines) + f"\n\nMessages per run: {totals}."


BLOCKS = {
    "demo-table": lambda: _summary_table("docs/results/demo/summary.md"),
    "demo-3d-table": lambda: _summary_table("docs/results/demo_3d/summary.md"),
    "demo-seg-table": lambda: _summary_table("docs/results/demo_seg/summary.md").split("\n\nCross-site")[0],
    "demo-seg-hc": lambda: _read("docs/results/demo_seg/hc.md"),
    "poc-table": lambda: _read("docs/results/poc/report.md"),
    "latejoin-table": lambda: "\n\n".join(_read(p) for p in ("docs/results/latejoin/compare.md",
                                                              "docs/results/latejoin/small_site/compare.md")),
    "console": lambda: "```\n" + _read("docs/results/console_transcript.txt") + "\n```",
    "perf-table": _perf_table,
    "guide": lambda: _read("docs/bench/guide.md").removeprefix("# Which method for my consortium?").strip(),
    "wire-table": _wire_table,
}


# -- the README's commands, as a reader runs them ---------------------------------------------------------------

# What the README test (tests/test_readme_commands.py) does not run on this machine, by the command's start, and why;
# every other command the README shows (```bash blocks, and `.venv/bin/...` in the text) runs as written from the
# repository after `make venv`, and must succeed.
NOT_RUN_HERE = {
    "make demo": "the demo itself, minutes; `make test` runs the same set-up first",
    "make test": "the suite this test is part of",
    "fedopal site-policy /opt/": "needs a hospital's startup kit: tests/test_site_policy.py runs it on a provisioned kit",
    "fedopal validate --config consortium.yaml": "a consortium's own config at a hospital; the same command runs here "
                                                 "on app_configs/demo.yaml",
    "nvflare preflight-check": "needs a hospital's startup kit and a running server",
    ".venv/bin/nvflare provision": "writes the consortium's kits to /secure; tests/test_poc_e2e.py provisions the same "
                                   "project.yml on one machine (POC)",
    ".venv/bin/fedopal predict --model <site state>": "needs a trained site's export: tests/test_predict.py runs it",
    ".venv/bin/fedopal latejoin --global-model": "needs a finished federation: tests/test_latejoin_e2e.py runs it",
    "fedopal select --config consortium.yaml": "needs a running consortium and its admin kit: tests/test_poc_e2e.py "
                                               "runs it in a POC, make select-poc on the demo",
}


def readme_commands(text: str) -> list[str]:
    """The shell commands a page shows: each line of its ```bash blocks (continuations joined, comments dropped) and
    each `.venv/bin/...` span of its text."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    commands += [m for m in re.findall(r"`(\.venv/bin/[^`]+)`", text) if m not in commands]
    return commands


def not_run_reason(command: str) -> str | None:
    return next((why for start, why in NOT_RUN_HERE.items() if command.startswith(start)), None)


def render_readme(text: str) -> str:
    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in BLOCKS:
            raise KeyError(f"README.md: unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        return match.group(1) + BLOCKS[name]().rstrip() + "\n" + match.group(4)

    return BLOCK.sub(fill, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a generated text is stale")
    args = p.parse_args(argv)
    targets = {CONFIG_DOC: configuration_markdown()}
    pages = [README] + sorted(os.path.join("docs", n) for n in os.listdir(os.path.join(REPO, "docs"))
                              if n.endswith(".md") and os.path.join("docs", n) != CONFIG_DOC)
    for page in pages:  # every page with generated blocks
        with open(os.path.join(REPO, page)) as f:
            text = f.read()
        if BLOCK.search(text):
            targets[page] = render_readme(text)
    stale = []
    for path, text in targets.items():
        full = os.path.join(REPO, path)
        current = open(full).read() if os.path.isfile(full) else None
        if current != text:
            stale.append(path)
            if not args.check:
                os.makedirs(os.path.dirname(full) or ".", exist_ok=True)
                with open(full, "w") as f:
                    f.write(text)
    if args.check and stale:
        print(f"stale: {', '.join(stale)}. Fix: run `fedopal docs` (or `make docs`) and commit.",
              file=sys.stderr)
        return 1
    print("up to date" if not stale else f"rewrote {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
