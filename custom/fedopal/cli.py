"""`fedopal`: one console command for what the README runs, each subcommand a module's own `main`.

    fedopal validate --config app_configs/demo.yaml            (= python -m fedopal.site.validate ...)
    fedopal job --config app_configs/demo.yaml --simulate      (= python -m fedopal.tools.job ...)

The table below is the whole mapping; a subcommand imports its module only when it runs, so `fedopal --help` and
`fedopal version` load no torch.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, who runs it and what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("fedopal.site.validate", "site: check every row and file of a site's data before training"),
    "predict": ("fedopal.site.predict", "site: an exported model on new images -> CSV (and metrics; masks too)"),
    "export-bundle": ("fedopal.site.bundle", "site: an exported model as a MONAI bundle (MONAI Deploy, MONAI Label)"),
    "latejoin": ("fedopal.site.latejoin", "site: join after training, from the federation's global model"),
    "site-policy": ("fedopal.policy.install", "site: install the site's privacy policy and allow-list in its kit"),
    "privacy": ("fedopal.policy.privacy", "site/ethics board: epsilon for given settings, or noise for an epsilon"),
    "job": ("fedopal.tools.job", "coordinator: export a job (no-code or code-shipping) or run it in the simulator"),
    "stats": ("fedopal.tools.fedstats", "coordinator: federated data statistics (NVFlare) before the first job"),
    "select": ("fedopal.tools.select", "coordinator: run candidate methods on the consortium, choose on validation"),
    "prepare": ("fedopal.tools.prepare", "demo: build a federation from a MedMNIST .npz"),
    "bench": ("fedopal.tools.bench", "study: every method x seeds on one federation, tables and plots"),
    "perf": ("fedopal.tools.perf", "study: what FLARE adds on top of the compute"),
    "gpu-check": ("fedopal.tools.gpucheck", "study: bare loop vs site loop on a CUDA GPU"),
    "docs": ("fedopal.tools.docs", "maintainers: regenerate the README's tables and docs/configuration.md"),
}


def usage() -> str:
    import fedopal

    width = max(map(len, COMMANDS))
    lines = [f"fedopal {fedopal.__version__}: personalized federated fine-tuning on NVIDIA FLARE", "",
             "usage: fedopal <command> [options]   (fedopal <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    lines += [f"  {'version':<{width}}  print the installed version"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("version", "--version"):
        import fedopal

        print(fedopal.__version__)
        return 0
    if command not in COMMANDS:
        print(f"fedopal: unknown command {command!r}. Fix: one of {', '.join([*COMMANDS, 'version'])} "
              "(fedopal --help).", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"fedopal {command}", *rest]  # argparse's usage lines name the subcommand
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
